package guard

import (
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
)

// MaybeRun turns the process into a guard if Start started it as one,
// and then never returns. Binaries whose daemon starts a guard call it
// first thing in main (and test binaries in TestMain): the guard is the
// binary re-executed, and must not run the binary's own main.
func MaybeRun() {
	v := os.Getenv(DaemonEnv)
	if v == "" {
		return
	}
	daemon, err1 := strconv.Atoi(v)
	n, err2 := strconv.Atoi(os.Getenv(holdsEnv))
	if err1 != nil || err2 != nil || n < 1 || n > MaxHolds {
		os.Exit(2)
	}
	gp := &proc{
		log:    slog.New(slog.NewTextHandler(os.Stderr, nil)).With("guard", os.Getpid(), "daemon", daemon),
		daemon: daemon,
		msg:    msgFD,
		lns:    map[string]int{},
	}
	for i := range n {
		gp.holds = append(gp.holds, Holding{Group: fanotify.FromFD(firstFD + 2*i), Inotify: firstFD + 2*i + 1})
	}
	unix.SetNonblock(msgFD, true)
	gp.run()
	os.Exit(0)
}

// proc is the state of a guard process. It is one poll loop: an event it
// read is answered before it looks at anything else, so it never hands a
// group over with an event of its own unanswered.
type proc struct {
	log    *slog.Logger
	daemon int
	msg    int // -1 once the daemon is gone
	msgBuf []byte
	update Update
	holds  []Holding // holds[0] is the daemon's own group, unless update.Supervised
	lns    map[string]int
	gone   bool // the daemon died or let go
}

func (gp *proc) run() {
	buf := make([]byte, 64<<10)
	for {
		var fds []unix.PollFd
		if gp.msg >= 0 {
			fds = append(fds, unix.PollFd{Fd: int32(gp.msg), Events: unix.POLLIN})
		}
		lnAt := len(fds)
		var lnFDs []int
		for _, fd := range gp.lns {
			fds = append(fds, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
			lnFDs = append(lnFDs, fd)
		}
		// A supervised daemon's guard reads no event: they wait for the
		// successor.
		gAt, gone, deny := len(fds), gp.gone, gp.gone && !gp.update.Supervised
		if gone {
			for _, h := range gp.holds {
				ev := int16(unix.POLLIN)
				if !deny {
					ev = 0
				}
				fds = append(fds, unix.PollFd{Fd: int32(h.Group.FD()), Events: ev})
			}
			// Woken by IN_IGNORED, so it exits at once; the timeout
			// covers a watch that went while another process read the
			// shared instance.
			for _, h := range gp.holds {
				fds = append(fds, unix.PollFd{Fd: int32(h.Inotify), Events: unix.POLLIN})
			}
		}
		timeout := -1
		if gp.gone {
			timeout = int(poll / time.Millisecond)
		}
		if _, err := unix.Poll(fds, timeout); err != nil && !errors.Is(err, unix.EINTR) {
			gp.log.Error("fanotify guard: poll", "err", err)
			time.Sleep(poll)
			continue
		}
		if gp.msg >= 0 && fds[0].Revents != 0 {
			gp.readUpdates()
			if gp.msg < 0 {
				gp.daemonGone()
			}
		}
		if gone {
			// Events first, so none is held across a hand-over below.
			for i, h := range gp.holds {
				if deny && fds[gAt+i].Revents&unix.POLLIN != 0 {
					denyAll(h.Group, buf, gp.log)
				}
				if fds[gAt+len(gp.holds)+i].Revents&unix.POLLIN != 0 {
					// Drained only to sleep again: fdinfo is the truth.
					for {
						if _, err := unix.Read(h.Inotify, buf); !errors.Is(err, unix.EINTR) && err != nil {
							break
						}
					}
				}
			}
		}
		for i, fd := range lnFDs {
			if fds[lnAt+i].Revents&unix.POLLIN != 0 {
				gp.serveConn(fd)
			}
		}
		if gp.gone {
			gp.dropIdle()
			if len(gp.holds) == 0 {
				gp.log.Info("fanotify guard: every mount of the dead daemon is gone; exiting")
				gp.exit()
			}
		}
	}
}

// readUpdates reads the daemon's pending updates; at EOF the daemon is
// gone (dead, or let go while a mount lingers) and gp.msg becomes -1.
func (gp *proc) readUpdates() {
	var b [4096]byte
	for {
		n, err := unix.Read(gp.msg, b[:])
		if n > 0 {
			gp.msgBuf = append(gp.msgBuf, b[:n]...)
			continue
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		// EOF or a broken pipe: the daemon is gone.
		unix.Close(gp.msg)
		gp.msg = -1
		break
	}
	var us []Update
	us, gp.msgBuf = splitUpdates(gp.msgBuf)
	for _, u := range us {
		gp.update = u
		gp.listen(u.Dirs)
	}
}

// listen binds this guard's socket in each cache directory not yet
// listened in.
func (gp *proc) listen(dirs []string) {
	for _, dir := range dirs {
		path := sockPath(dir, os.Getpid())
		if _, ok := gp.lns[path]; ok {
			continue
		}
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			gp.log.Error("fanotify guard: socket", "err", err)
			return
		}
		addr, done, err := sockAddr(path)
		if err == nil {
			os.Remove(path) // a stale one of an earlier process with our pid
			err = unix.Bind(fd, &unix.SockaddrUnix{Name: addr})
			done()
		}
		if err == nil {
			// Only root (our uid) may take a group; serveConn checks the
			// peer too.
			err = errors.Join(os.Chmod(path, 0o600), unix.Listen(fd, 8))
		}
		if err != nil {
			unix.Close(fd)
			gp.log.Error("fanotify guard: cannot listen; a successor on this cache directory cannot take the group over", "path", path, "err", err)
			continue
		}
		gp.lns[path] = fd
	}
}

// daemonGone detaches the daemon's mounts and denies the events it held.
func (gp *proc) daemonGone() {
	gp.gone = true
	var mnts []string
	if !gp.update.Supervised {
		mnts = gp.update.Mounts
	}
	for _, m := range mnts {
		// The daemon watches each mount it makes; this covers one it
		// made right before dying. Not an EROFS root: already gone.
		if err := WatchRoot(gp.holds[0].Inotify, m); err != nil {
			continue
		}
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			gp.log.Error("fanotify guard: detach", "mountpoint", m, "err", err)
		}
	}
	// Events the daemon read and never answered stay pending until
	// answered by their fd number: their readers would block forever
	// (and keep a detached mount, and so this guard, alive). Every
	// number the daemon could have been given is tried.
	orphans := 0
	for _, h := range gp.holds {
		orphans += h.Group.DenyOrphans(gp.update.maxFD())
	}
	if gp.update.Supervised {
		gp.log.Error("fanotify guard: supervised daemon gone; the groups it took over from a crashed daemon are held, their events waiting for its successor",
			"groups", len(gp.holds), "orphans_denied", orphans)
		return
	}
	gp.log.Error("fanotify guard: daemon gone without a supervisor; its mounts are detached and their reads fail with EIO until a new daemon on the same cache takes over or the last reader closes",
		"mounts", mnts, "orphans_denied", orphans)
}

// denyAll answers every queued event of g with EIO.
func denyAll(g *fanotify.Group, buf []byte, log *slog.Logger) {
	n, err := unix.Read(g.FD(), buf)
	if err != nil {
		if !errors.Is(err, unix.EINTR) && !errors.Is(err, unix.EAGAIN) {
			log.Error("fanotify guard: read", "err", err)
		}
		return
	}
	evs, _ := fanotify.ParseEvents(buf[:n])
	for _, ev := range evs {
		if ev.Fd >= 0 {
			g.Deny(ev.Fd, unix.EIO)
			unix.Close(ev.Fd)
		}
	}
}

// dropIdle closes the groups no mount reads through any more.
func (gp *proc) dropIdle() {
	keep := gp.holds[:0]
	for _, h := range gp.holds {
		if n, err := Watches(h.Inotify); err == nil && n == 0 {
			h.Group.Close()
			unix.Close(h.Inotify)
			continue
		}
		keep = append(keep, h)
	}
	gp.holds = keep
}

// serveConn answers one client of listener ln.
func (gp *proc) serveConn(ln int) {
	fd, _, err := unix.Accept4(ln, unix.SOCK_CLOEXEC)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(int64(5 * time.Second))
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil || int(cred.Uid) != os.Geteuid() {
		gp.log.Warn("fanotify guard: refused a client of another user", "err", err)
		return
	}
	var op [1]byte
	if n, _ := unix.Read(fd, op[:]); n != 1 {
		return
	}
	if !gp.gone {
		// The daemon may have died a moment ago: look before answering.
		p := []unix.PollFd{{Fd: int32(gp.msg), Events: unix.POLLIN}}
		if k, _ := unix.Poll(p, 0); k > 0 {
			gp.readUpdates()
			if gp.msg < 0 {
				gp.daemonGone()
			}
		}
	}
	gp.dropIdle()
	rep := Reply{Daemon: gp.daemon, Guard: os.Getpid(), Alive: !gp.gone, Groups: len(gp.holds)}
	raw, _ := json.Marshal(rep)
	if op[0] != opTake || !gp.gone || len(gp.holds) == 0 {
		unix.Write(fd, raw)
		return
	}
	var fds []int
	for _, h := range gp.holds {
		fds = append(fds, h.Group.FD(), h.Inotify)
	}
	if err := unix.Sendmsg(fd, raw, unix.UnixRights(fds...), nil, 0); err != nil {
		gp.log.Error("fanotify guard: hand-over", "err", err)
		return
	}
	if n, _ := unix.Read(fd, op[:]); n != 1 || op[0] != opAck {
		// The successor died or gave up: keep guarding.
		gp.log.Error("fanotify guard: successor did not acknowledge the hand-over; still guarding")
		return
	}
	gp.log.Info("fanotify guard: groups handed to a new daemon; exiting", "groups", len(gp.holds), "pid", cred.Pid)
	gp.exit()
}

func (gp *proc) exit() {
	gp.closeListeners()
	os.Exit(0)
}

// closeListeners removes and closes every socket the guard listens on.
func (gp *proc) closeListeners() {
	for path, fd := range gp.lns {
		os.Remove(path)
		unix.Close(fd)
	}
}

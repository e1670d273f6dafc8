package fanotifyfs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
)

// The guard: a daemon without a supervisor is the only holder of its
// group; if it died, the kernel would allow every pending and later read
// of the cache files and readers would see their holes as file data. The
// guard is a child process holding a copy of every group the daemon
// serves. While the daemon lives it only holds them. When the daemon dies
// (or closes while a mount it detached lazily is still read) the guard
// detaches the daemon's mounts, denies with EIO the events the daemon had
// read and never answered, and then every event still arriving: the loss
// is loud, never silent zeros.
//
// Exit condition. A detached mount lives on while a file of it is open,
// and its reads still raise events, so the guard must outlive it, but no
// longer: while the guard lives its marks deny reads of the cache files to
// everyone. Each group comes with an inotify instance watching the root of
// every mount reading through it (the daemon adds a watch per mount; the
// guard adds one before it detaches). Measured on Linux 6.18: an inotify
// watch does not pin the superblock (a plain umount succeeds with one in
// place), a detached EROFS mount with an open file raises nothing, and
// when the last file closes the superblock shuts down, IN_UNMOUNT and
// IN_IGNORED arrive and the watch leaves /proc/PID/fdinfo/FD of the
// inotify fd. So a group whose inotify instance has no watch left serves
// no mount any more: the guard closes it (its marks go), and exits once it
// holds none.
//
// Restart on the same cache. While a guard holds its group, the group's
// marks stay on the cache files, so a new daemon on the same cache
// directory would have its own fetcher's writes and its readers' events
// denied by the old guard. So each guard listens on a unix socket in every
// cache directory of its daemon (guardSockPrefix<guard pid>.sock). A new
// daemon, before it opens a cache directory, asks every guard listening
// there: a guard whose daemon is dead hands over all its groups and their
// inotify instances (SCM_RIGHTS), waits for the new daemon's
// acknowledgement (sent once the new daemon's own guard holds copies too)
// and exits; it answers every event it read before it hands over. The new
// daemon then serves the old groups' events with its own Server: they name
// the same cache files, so the readers of the old, detached mounts read
// the right bytes again, and it drops an old group once its inotify
// instance has no watch left. A guard whose daemon lives refuses (two
// daemons on one cache directory serve each other's events, as before).

const (
	guardEnv      = "RAFSD_FANOTIFY_GUARD"        // the daemon's pid (for logs and ps)
	guardHoldsEnv = "RAFSD_FANOTIFY_GUARD_GROUPS" // number of (group, inotify) pairs
	guardMsgFD    = 3                             // updates from the daemon; EOF: it is gone
	guardFirstFD  = 4                             // group, inotify, group, inotify, ...
	// guardSockPrefix names a guard's socket in a cache directory.
	guardSockPrefix = "rafsd-fanotify-guard."
	// guardMaxHolds bounds the groups handed over in one message
	// (SCM_MAX_FD is 253 fds).
	guardMaxHolds = 64
	// guardPoll is how often a guard whose daemon is gone looks at its
	// inotify instances: the daemon's successor may read their events
	// too (a shared file description), so the guard does not rely on
	// waking for them.
	guardPoll = 500 * time.Millisecond
)

// Guard protocol, on a guard's socket: the client sends one byte,
// guardQuery or guardTake; the guard answers a guardReply (JSON) and, for
// guardTake when its daemon is gone, the fds of its holdings with it; the
// client then sends guardAck once it holds them safely, and the guard
// exits.
const (
	guardQuery = '?'
	guardTake  = 'T'
	guardAck   = 'A'
)

type guardReply struct {
	Daemon int  `json:"daemon"`
	Guard  int  `json:"guard"`
	Alive  bool `json:"alive"`
	Groups int  `json:"groups"`
}

// guardUpdate is what the daemon tells its guard whenever it changes: the
// mounts to detach if it dies and the cache directories to listen in.
type guardUpdate struct {
	Mounts []string `json:"mounts"`
	Dirs   []string `json:"dirs"`
}

// holding is a group and the inotify instance watching the roots of the
// mounts that read through it.
type holding struct {
	g   *fanotify.Group
	ino int
}

// watchCount is the number of live watches of inotify fd ino (its
// fdinfo lists one "inotify wd:" line per watch).
func watchCount(ino int) (int, error) {
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(ino))
	if err != nil {
		return 0, fmt.Errorf("fanotifyfs: inotify fdinfo: %w", err)
	}
	return bytes.Count(b, []byte("inotify wd:")), nil
}

// watchRoot adds a watch on the root of the EROFS mount at mp to inotify
// fd ino. Nothing else is watched: a mountpoint that is not (or no longer)
// an EROFS root would keep a guard alive for nothing. IN_DELETE_SELF never
// fires on a read-only EROFS; IN_UNMOUNT and IN_IGNORED come regardless
// of the mask.
func watchRoot(ino int, mp string) error {
	var sf unix.Statfs_t
	if err := unix.Statfs(mp, &sf); err != nil {
		return fmt.Errorf("fanotifyfs: statfs %s: %w", mp, err)
	}
	if uint32(sf.Type) != unix.EROFS_SUPER_MAGIC_V1 {
		return fmt.Errorf("fanotifyfs: %s is not an EROFS mount (f_type %#x)", mp, sf.Type)
	}
	if _, err := unix.InotifyAddWatch(ino, mp, unix.IN_DELETE_SELF|unix.IN_ONLYDIR); err != nil {
		return fmt.Errorf("fanotifyfs: inotify watch %s: %w", mp, err)
	}
	return nil
}

// sockAddr returns an address for the unix socket at path: the path
// itself, or, if too long for sockaddr_un, the same name through
// /proc/self/fd of its directory (close is then to be called once bound
// or connected).
func sockAddr(path string) (addr string, close func(), err error) {
	if len(path) < len(unix.RawSockaddrUnix{}.Path)-1 {
		return path, func() {}, nil
	}
	dfd, err := unix.Open(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("fanotifyfs: guard socket dir: %w", err)
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", dfd, filepath.Base(path)), func() { unix.Close(dfd) }, nil
}

// guardSock is the socket path of guard pid in cache directory dir.
func guardSock(dir string, pid int) string {
	return filepath.Join(dir, guardSockPrefix+strconv.Itoa(pid)+".sock")
}

// MaybeRunGuard turns the process into a guard if it was started as one
// by the Daemon, and then never returns. Binaries that run a Daemon
// without a supervisor call it first thing in main (and test binaries in
// TestMain).
func MaybeRunGuard() {
	v := os.Getenv(guardEnv)
	if v == "" {
		return
	}
	daemon, err1 := strconv.Atoi(v)
	n, err2 := strconv.Atoi(os.Getenv(guardHoldsEnv))
	if err1 != nil || err2 != nil || n < 1 || n > guardMaxHolds {
		os.Exit(2)
	}
	gp := &guardProc{
		log:    slog.New(slog.NewTextHandler(os.Stderr, nil)).With("guard", os.Getpid(), "daemon", daemon),
		daemon: daemon,
		msg:    guardMsgFD,
		lns:    map[string]int{},
	}
	for i := range n {
		gp.holds = append(gp.holds, holding{g: fanotify.FromFD(guardFirstFD + 2*i), ino: guardFirstFD + 2*i + 1})
	}
	unix.SetNonblock(guardMsgFD, true)
	gp.run()
	os.Exit(0)
}

// guardProc is the state of a guard process. It is one poll loop: an
// event it read is answered before it looks at anything else, so it never
// hands a group over with an event of its own unanswered.
type guardProc struct {
	log    *slog.Logger
	daemon int
	msg    int // -1 once the daemon is gone
	msgBuf []byte
	update guardUpdate
	holds  []holding // holds[0] is the daemon's own group
	lns    map[string]int
	gone   bool // the daemon died or let go
}

func (gp *guardProc) run() {
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
		gAt, gone := len(fds), gp.gone
		if gone {
			for _, h := range gp.holds {
				fds = append(fds, unix.PollFd{Fd: int32(h.g.FD()), Events: unix.POLLIN})
			}
			// Woken by IN_IGNORED, so it exits at once; the timeout
			// covers a watch that went while another process read the
			// shared instance.
			for _, h := range gp.holds {
				fds = append(fds, unix.PollFd{Fd: int32(h.ino), Events: unix.POLLIN})
			}
		}
		timeout := -1
		if gp.gone {
			timeout = int(guardPoll / time.Millisecond)
		}
		if _, err := unix.Poll(fds, timeout); err != nil && !errors.Is(err, unix.EINTR) {
			gp.log.Error("fanotifyfs guard: poll", "err", err)
			time.Sleep(guardPoll)
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
				if fds[gAt+i].Revents&unix.POLLIN != 0 {
					denyAll(h.g, buf, gp.log)
				}
				if fds[gAt+len(gp.holds)+i].Revents&unix.POLLIN != 0 {
					// Drained only to sleep again: fdinfo is the truth.
					for {
						if _, err := unix.Read(h.ino, buf); !errors.Is(err, unix.EINTR) && err != nil {
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
				gp.log.Info("fanotifyfs guard: every mount of the dead daemon is gone; exiting")
				gp.exit()
			}
		}
	}
}

// readUpdates reads the daemon's pending updates; at EOF the daemon is
// gone (dead, or closed while a mount lingers) and gp.msg becomes -1.
func (gp *guardProc) readUpdates() {
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
	for {
		k := bytes.IndexByte(gp.msgBuf, '\n')
		if k < 0 {
			break
		}
		var u guardUpdate
		if json.Unmarshal(gp.msgBuf[:k], &u) == nil {
			gp.update = u
			gp.listen(u.Dirs)
		}
		gp.msgBuf = gp.msgBuf[k+1:]
	}
}

// listen binds this guard's socket in each cache directory not yet
// listened in.
func (gp *guardProc) listen(dirs []string) {
	for _, dir := range dirs {
		path := guardSock(dir, os.Getpid())
		if _, ok := gp.lns[path]; ok {
			continue
		}
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			gp.log.Error("fanotifyfs guard: socket", "err", err)
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
			gp.log.Error("fanotifyfs guard: cannot listen; a successor on this cache directory cannot take the group over", "path", path, "err", err)
			continue
		}
		gp.lns[path] = fd
	}
}

// daemonGone detaches the daemon's mounts and denies the events it held.
func (gp *guardProc) daemonGone() {
	gp.gone = true
	mnts := gp.update.Mounts
	for _, m := range mnts {
		// The daemon watches each mount it makes; this covers one it
		// made right before dying. Not an EROFS root: already gone.
		if err := watchRoot(gp.holds[0].ino, m); err != nil {
			continue
		}
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			gp.log.Error("fanotifyfs guard: detach", "mountpoint", m, "err", err)
		}
	}
	// Events the daemon read and never answered stay pending until
	// answered by their fd number: their readers would block forever
	// (and keep a detached mount, and so this guard, alive).
	orphans := 0
	for _, h := range gp.holds {
		orphans += h.g.DenyOrphans(4096)
	}
	gp.log.Error("fanotifyfs guard: daemon gone without a supervisor; its mounts are detached and their reads fail with EIO until a new daemon on the same cache takes over or the last reader closes",
		"mounts", mnts, "orphans_denied", orphans)
}

// denyAll answers every queued event of g with EIO.
func denyAll(g *fanotify.Group, buf []byte, log *slog.Logger) {
	n, err := unix.Read(g.FD(), buf)
	if err != nil {
		if !errors.Is(err, unix.EINTR) && !errors.Is(err, unix.EAGAIN) {
			log.Error("fanotifyfs guard: read", "err", err)
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
func (gp *guardProc) dropIdle() {
	keep := gp.holds[:0]
	for _, h := range gp.holds {
		if n, err := watchCount(h.ino); err == nil && n == 0 {
			h.g.Close()
			unix.Close(h.ino)
			continue
		}
		keep = append(keep, h)
	}
	gp.holds = keep
}

// serveConn answers one client of listener ln.
func (gp *guardProc) serveConn(ln int) {
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
		gp.log.Warn("fanotifyfs guard: refused a client of another user", "err", err)
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
	rep := guardReply{Daemon: gp.daemon, Guard: os.Getpid(), Alive: !gp.gone, Groups: len(gp.holds)}
	raw, _ := json.Marshal(rep)
	if op[0] != guardTake || !gp.gone || len(gp.holds) == 0 {
		unix.Write(fd, raw)
		return
	}
	var fds []int
	for _, h := range gp.holds {
		fds = append(fds, h.g.FD(), h.ino)
	}
	if err := unix.Sendmsg(fd, raw, unix.UnixRights(fds...), nil, 0); err != nil {
		gp.log.Error("fanotifyfs guard: hand-over", "err", err)
		return
	}
	if n, _ := unix.Read(fd, op[:]); n != 1 || op[0] != guardAck {
		// The successor died or gave up: keep guarding.
		gp.log.Error("fanotifyfs guard: successor did not acknowledge the hand-over; still guarding")
		return
	}
	gp.log.Info("fanotifyfs guard: groups handed to a new daemon; exiting", "groups", len(gp.holds), "pid", cred.Pid)
	gp.exit()
}

func (gp *guardProc) exit() {
	for path, fd := range gp.lns {
		os.Remove(path)
		unix.Close(fd)
	}
	os.Exit(0)
}

// Guard is a running guard process.
type Guard struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	w    *os.File // updates; closed: the daemon let go
	dirs []string
	done chan struct{}
}

// update tells the guard the daemon's mountpoints (the ones to detach if
// it dies) and cache directories (to listen in for a successor).
func (gd *Guard) update(u guardUpdate) error {
	line, _ := json.Marshal(u)
	gd.mu.Lock()
	defer gd.mu.Unlock()
	gd.dirs = u.Dirs
	if _, err := gd.w.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("fanotifyfs: guard: %w", err)
	}
	return nil
}

// startGuard starts a guard for this process holding copies of holds
// (holds[0]: the daemon's own group). The binary must call MaybeRunGuard
// at start.
func startGuard(holds []holding, u guardUpdate) (*Guard, error) {
	if len(holds) == 0 || len(holds) > guardMaxHolds {
		return nil, fmt.Errorf("fanotifyfs: guard: %d groups (1 to %d)", len(holds), guardMaxHolds)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("fanotifyfs: guard: %w", err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("fanotifyfs: guard: %w", err)
	}
	defer pr.Close()
	files := []*os.File{pr}
	defer func() {
		for _, f := range files[1:] {
			f.Close()
		}
	}()
	for _, h := range holds {
		// Dups: an *os.File closes its fd when collected.
		for _, fd := range []int{h.g.FD(), h.ino} {
			dfd, err := unix.Dup(fd)
			if err != nil {
				pw.Close()
				return nil, fmt.Errorf("fanotifyfs: guard: %w", err)
			}
			files = append(files, os.NewFile(uintptr(dfd), "guarded"))
		}
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), guardEnv+"="+strconv.Itoa(os.Getpid()), guardHoldsEnv+"="+strconv.Itoa(len(holds)))
	cmd.ExtraFiles = files
	cmd.Stderr = os.Stderr
	// Its own session: a ^C to the daemon's terminal must not take it too.
	cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return nil, fmt.Errorf("fanotifyfs: start guard: %w", err)
	}
	gd := &Guard{cmd: cmd, w: pw, done: make(chan struct{})}
	go func() { cmd.Wait(); close(gd.done) }()
	if err := gd.update(u); err != nil {
		gd.Stop()
		return nil, err
	}
	return gd, nil
}

// Pid is the guard's process id.
func (gd *Guard) Pid() int { return gd.cmd.Process.Pid }

// Stop ends the guard: when the daemon closes cleanly with no mount left,
// or hands the guarding to a new guard.
func (gd *Guard) Stop() {
	_ = gd.cmd.Process.Kill()
	<-gd.done
	gd.mu.Lock()
	gd.w.Close()
	dirs := gd.dirs
	gd.mu.Unlock()
	for _, dir := range dirs {
		os.Remove(guardSock(dir, gd.Pid()))
	}
}

// letGo leaves the guard to its job, as if the daemon had died: the
// daemon closes while a mount it detached lazily is still read.
func (gd *Guard) letGo() {
	gd.mu.Lock()
	defer gd.mu.Unlock()
	gd.w.Close()
}

// askGuard asks the guard listening at path for its state and, with take
// and its daemon gone, for its groups. conn is set (to acknowledge with)
// only when holds are returned. A stale socket (no guard) is removed and
// reported as nothing.
func askGuard(path string, take bool) (rep guardReply, holds []holding, conn *net.UnixConn, err error) {
	addr, done, err := sockAddr(path)
	if err != nil {
		return rep, nil, nil, err
	}
	c, err := net.DialTimeout("unix", addr, 5*time.Second)
	done()
	if err != nil {
		if errors.Is(err, unix.ECONNREFUSED) {
			os.Remove(path)
			return rep, nil, nil, nil
		}
		if errors.Is(err, unix.ENOENT) {
			return rep, nil, nil, nil
		}
		return rep, nil, nil, fmt.Errorf("fanotifyfs: guard %s: %w", path, err)
	}
	uc := c.(*net.UnixConn)
	ok := false
	defer func() {
		if !ok {
			uc.Close()
		}
	}()
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	op := []byte{guardQuery}
	if take {
		op[0] = guardTake
	}
	if _, err := uc.Write(op); err != nil {
		return rep, nil, nil, fmt.Errorf("fanotifyfs: guard %s: %w", path, err)
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(2*guardMaxHolds*4))
	n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
	if err != nil {
		return rep, nil, nil, fmt.Errorf("fanotifyfs: guard %s: %w", path, err)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return rep, nil, nil, fmt.Errorf("fanotifyfs: guard %s: %w", path, err)
		}
		for _, m := range msgs {
			if rights, err := unix.ParseUnixRights(&m); err == nil {
				fds = append(fds, rights...)
			}
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if err := json.Unmarshal(buf[:n], &rep); err != nil {
		closeAll()
		return rep, nil, nil, fmt.Errorf("fanotifyfs: guard %s: reply: %w", path, err)
	}
	if len(fds) == 0 {
		return rep, nil, nil, nil
	}
	if len(fds) != 2*rep.Groups {
		closeAll()
		return rep, nil, nil, fmt.Errorf("fanotifyfs: guard %s sent %d fds for %d groups", path, len(fds), rep.Groups)
	}
	for i := 0; i < len(fds); i += 2 {
		unix.CloseOnExec(fds[i])
		unix.CloseOnExec(fds[i+1])
		holds = append(holds, holding{g: fanotify.FromFD(fds[i]), ino: fds[i+1]})
	}
	ok = true
	return rep, holds, uc, nil
}

// guardSocks lists the guard sockets in cache directory dir.
func guardSocks(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), guardSockPrefix) && strings.HasSuffix(e.Name(), ".sock") {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	return out
}

package guard

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
)

// Guard is a running guard process, as its daemon sees it.
type Guard struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	w    *os.File // updates; closed: the daemon let go
	dirs []string
	done chan struct{}
}

// Start starts a guard for this process holding copies of holds
// (holds[0]: the daemon's own group, whose inotify instance also gets the
// watches of mounts the guard detaches; with u.Supervised only groups
// taken over, the supervisor holding the daemon's own) and tells it u. The binary must
// call MaybeRun first thing in main.
func Start(holds []Holding, u Update) (*Guard, error) {
	if len(holds) == 0 || len(holds) > MaxHolds {
		return nil, fmt.Errorf("guard: %d groups (1 to %d)", len(holds), MaxHolds)
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("guard: %w", err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("guard: %w", err)
	}
	defer pr.Close()
	files := []*os.File{pr}
	defer func() {
		for _, f := range files[1:] {
			f.Close()
		}
	}()
	for _, h := range holds {
		// Dups: an *os.File closes its fd when collected. Close-on-exec:
		// the child gets them as ExtraFiles only, not also at these
		// numbers (nor does any other child started meanwhile).
		for _, fd := range []int{h.Group.FD(), h.Inotify} {
			dfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				pw.Close()
				return nil, fmt.Errorf("guard: %w", err)
			}
			files = append(files, os.NewFile(uintptr(dfd), "guarded"))
		}
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), DaemonEnv+"="+strconv.Itoa(os.Getpid()), holdsEnv+"="+strconv.Itoa(len(holds)))
	cmd.ExtraFiles = files
	cmd.Stderr = os.Stderr
	// Its own session: a ^C to the daemon's terminal must not take it too.
	cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return nil, fmt.Errorf("guard: start: %w", err)
	}
	gd := &Guard{cmd: cmd, w: pw, done: make(chan struct{})}
	go func() { cmd.Wait(); close(gd.done) }()
	if err := gd.Update(u); err != nil {
		gd.Stop()
		return nil, err
	}
	return gd, nil
}

// Update tells the guard the daemon's mountpoints (the ones to detach if
// it dies) and cache directories (to listen in for a successor). Each
// update replaces the last.
func (gd *Guard) Update(u Update) error {
	line, _ := json.Marshal(u)
	gd.mu.Lock()
	defer gd.mu.Unlock()
	gd.dirs = u.Dirs
	if _, err := gd.w.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("guard: %w", err)
	}
	return nil
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
		os.Remove(sockPath(dir, gd.Pid()))
	}
}

// LetGo leaves the guard to its job, as if the daemon had died: for a
// daemon that closes while a mount it detached lazily is still read.
func (gd *Guard) LetGo() {
	gd.mu.Lock()
	defer gd.mu.Unlock()
	gd.w.Close()
}

// Sockets lists the guard sockets in cache directory dir.
func Sockets(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var out []string
	for _, e := range ents {
		if isSock(e.Name()) {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	return out
}

// Handover is the groups a guard whose daemon is gone handed over. The
// guard keeps guarding them (and denying their events) until Ack.
type Handover struct {
	// Holds are the groups and their inotify instances, owned by the
	// caller from now on (close-on-exec).
	Holds []Holding
	conn  *net.UnixConn
}

// Ack tells the guard that the groups are held safely (by the caller's
// own guard too): it exits.
func (h *Handover) Ack() error {
	_, err := h.conn.Write([]byte{opAck})
	h.conn.Close()
	if err != nil {
		return fmt.Errorf("guard: acknowledge: %w", err)
	}
	return nil
}

// Abort ends the hand-over without an acknowledgement: the guard keeps
// guarding the groups. The caller still owns its copies in Holds.
func (h *Handover) Abort() { h.conn.Close() }

// Ask asks the guard listening at socket path for its state and, with
// take and its daemon gone, for its groups: the Handover is then non-nil
// and must be acknowledged or aborted. A stale socket (no guard) is
// removed and answered with a zero Reply.
func Ask(path string, take bool) (Reply, *Handover, error) {
	var rep Reply
	addr, done, err := sockAddr(path)
	if err != nil {
		return rep, nil, err
	}
	c, err := net.DialTimeout("unix", addr, 5*time.Second)
	done()
	if err != nil {
		if errors.Is(err, unix.ECONNREFUSED) {
			os.Remove(path)
			return rep, nil, nil
		}
		if errors.Is(err, unix.ENOENT) {
			return rep, nil, nil
		}
		return rep, nil, fmt.Errorf("guard %s: %w", path, err)
	}
	uc := c.(*net.UnixConn)
	ok := false
	defer func() {
		if !ok {
			uc.Close()
		}
	}()
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	op := []byte{opQuery}
	if take {
		op[0] = opTake
	}
	if _, err := uc.Write(op); err != nil {
		return rep, nil, fmt.Errorf("guard %s: %w", path, err)
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(2*MaxHolds*4))
	n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
	if err != nil {
		return rep, nil, fmt.Errorf("guard %s: %w", path, err)
	}
	fds, err := parseRights(oob[:oobn])
	if err == nil {
		rep, err = decodeReply(buf[:n], len(fds))
	}
	if err != nil {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return rep, nil, fmt.Errorf("guard %s: %w", path, err)
	}
	if len(fds) == 0 {
		return rep, nil, nil
	}
	h := &Handover{conn: uc}
	for i := 0; i < len(fds); i += 2 {
		unix.CloseOnExec(fds[i])
		unix.CloseOnExec(fds[i+1])
		h.Holds = append(h.Holds, Holding{Group: fanotify.FromFD(fds[i]), Inotify: fds[i+1]})
	}
	ok = true
	return rep, h, nil
}

package fanotifyfs

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
)

// A daemon without a supervisor is the only holder of its group: if it
// died, the kernel would allow every pending and later read of the cache
// files and readers would see their holes as file data. The guard is a
// child process holding a copy of the group; when the daemon dies it
// detaches the mounts and fails every read still arriving with EIO, so
// the loss is loud, never silent zeros.

const (
	guardEnv    = "RAFSD_FANOTIFY_GUARD"     // the daemon's pid
	guardMntEnv = "RAFSD_FANOTIFY_GUARD_MNT" // mountpoints, a JSON list
	guardFD     = 3                          // the group, as ExtraFiles[0]
	guardMntFD  = 4                          // mountpoint updates, ExtraFiles[1]
)

// MaybeRunGuard turns the process into a guard if it was started as one
// by StartGuard, and then never returns. Binaries that run RunDaemon
// without a supervisor call it first thing in main (and test binaries in
// TestMain).
func MaybeRunGuard() {
	v := os.Getenv(guardEnv)
	if v == "" {
		return
	}
	pid, err := strconv.Atoi(v)
	if err != nil {
		os.Exit(2)
	}
	var mnts []string
	if err := json.Unmarshal([]byte(os.Getenv(guardMntEnv)), &mnts); err != nil {
		os.Exit(2)
	}
	runGuard(pid, mnts)
	os.Exit(0)
}

func runGuard(daemon int, mnts []string) {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("guard", os.Getpid(), "daemon", daemon)
	// The daemon sends the whole list of its mountpoints, a JSON line,
	// whenever it changes; EOF comes when it dies.
	var mu sync.Mutex
	eof := make(chan struct{})
	go func() {
		defer close(eof)
		sc := bufio.NewScanner(os.NewFile(guardMntFD, "mounts"))
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			var l []string
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				mu.Lock()
				mnts = l
				mu.Unlock()
			}
		}
	}()
	pfd, err := unix.PidfdOpen(daemon, 0)
	if err == nil {
		fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil || !errors.Is(err, unix.EINTR) {
				break
			}
		}
	} else if !errors.Is(err, unix.ESRCH) {
		log.Error("fanotifyfs guard: cannot watch the daemon", "err", err)
	}
	// The daemon is gone (a clean exit kills the guard first); its last
	// update is in the pipe already.
	select {
	case <-eof:
	case <-time.After(time.Second):
	}
	mu.Lock()
	cur := append([]string(nil), mnts...)
	mu.Unlock()
	for _, m := range cur {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil {
			log.Error("fanotifyfs guard: detach", "mountpoint", m, "err", err)
		}
	}
	log.Error("fanotifyfs guard: daemon died without a supervisor; mounts detached, failing their reads with EIO", "mounts", cur)
	g := fanotify.FromFD(guardFD)
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(guardFD, buf)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
				continue
			}
			log.Error("fanotifyfs guard: read", "err", err)
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
}

// Guard is a running guard process.
type Guard struct {
	cmd *exec.Cmd
	mu  sync.Mutex
	w   *os.File // mountpoint updates
}

// SetMounts tells the guard the daemon's mountpoints now (the ones to
// detach if the daemon dies).
func (gd *Guard) SetMounts(mnts []string) error {
	line, _ := json.Marshal(mnts)
	gd.mu.Lock()
	defer gd.mu.Unlock()
	if _, err := gd.w.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("fanotifyfs: guard: %w", err)
	}
	return nil
}

// StartGuard starts a guard for this process holding a copy of g, which
// will detach mnts and fail reads with EIO if this process dies. The
// binary must call MaybeRunGuard at start.
func StartGuard(g *fanotify.Group, mnts []string) (*Guard, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("fanotifyfs: guard: %w", err)
	}
	// A dup: an *os.File closes its fd when collected.
	dfd, err := unix.Dup(g.FD())
	if err != nil {
		return nil, fmt.Errorf("fanotifyfs: guard: %w", err)
	}
	gf := os.NewFile(uintptr(dfd), "fanotify-group")
	defer gf.Close()
	list, _ := json.Marshal(mnts)
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("fanotifyfs: guard: %w", err)
	}
	defer pr.Close()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), guardEnv+"="+strconv.Itoa(os.Getpid()), guardMntEnv+"="+string(list))
	cmd.ExtraFiles = []*os.File{gf, pr}
	cmd.Stderr = os.Stderr
	// Its own session: a ^C to the daemon's terminal must not take it too.
	cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		pw.Close()
		return nil, fmt.Errorf("fanotifyfs: start guard: %w", err)
	}
	return &Guard{cmd: cmd, w: pw}, nil
}

// Pid is the guard's process id.
func (gd *Guard) Pid() int { return gd.cmd.Process.Pid }

// Stop ends the guard (on a clean exit, after the mounts are gone).
func (gd *Guard) Stop() {
	_ = gd.cmd.Process.Kill()
	_ = gd.cmd.Wait()
	gd.w.Close()
}

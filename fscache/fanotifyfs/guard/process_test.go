package guard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// guarded is a group with a marked file and an inotify instance with one
// watch (on a plain directory: the guard only counts watches), as a
// daemon would hand Start.
type guarded struct {
	g     *fanotify.Group
	ino   int
	wd    int
	file  string // marked: its reads raise events in g
	cache string // the cache directory the guard listens in
}

func newGuarded(t *testing.T) *guarded {
	t.Helper()
	fstest.RequireRoot(t)
	g, err := fanotify.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	ino, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(ino) })
	root := t.TempDir()
	wd, err := unix.InotifyAddWatch(ino, root, unix.IN_DELETE_SELF|unix.IN_ONLYDIR)
	if err != nil {
		t.Fatal(err)
	}
	gd := &guarded{g: g, ino: ino, wd: wd, file: filepath.Join(root, "f"), cache: t.TempDir()}
	if err := os.WriteFile(gd.file, []byte("cached bytes"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := g.Mark(gd.file); err != nil {
		t.Fatal(err)
	}
	return gd
}

// start starts a guard of gd and waits for its socket.
func (gd *guarded) start(t *testing.T) (*Guard, string) {
	t.Helper()
	guard, err := Start([]Holding{{gd.g, gd.ino}}, Update{Dirs: []string{gd.cache}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(guard.Stop)
	sock := sockPath(gd.cache, guard.Pid())
	waitFor(t, "the guard's socket", func() bool { _, err := os.Stat(sock); return err == nil })
	return guard, sock
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func exited(guard *Guard) bool {
	select {
	case <-guard.done:
		return true
	default:
		return false
	}
}

// readErr reads gd.file in a fresh open (so that its reads raise events)
// and fails the test if nobody answers.
func (gd *guarded) readErr(t *testing.T) error {
	t.Helper()
	res := make(chan error, 1)
	go func() {
		_, err := os.ReadFile(gd.file)
		res <- err
	}()
	select {
	case err := <-res:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("a read of the guarded file was not answered")
		return nil
	}
}

// A guard whose daemon lives refuses to hand over; once the daemon lets
// go it fails reads of the marked file with EIO (not the bytes of a
// hole), hands its group over only with an acknowledgement (an aborted
// hand-over leaves it guarding), and exits when acknowledged, removing its
// socket.
func TestHandOver(t *testing.T) {
	gd := newGuarded(t)
	guard, sock := gd.start(t)
	if socks := Sockets(gd.cache); len(socks) != 1 || socks[0] != sock {
		t.Fatalf("Sockets = %v, want [%s]", socks, sock)
	}
	rep, ho, err := Ask(sock, true)
	if err != nil {
		t.Fatal(err)
	}
	want := Reply{Daemon: os.Getpid(), Guard: guard.Pid(), Alive: true, Groups: 1}
	if rep != want || ho != nil {
		t.Fatalf("take from a live daemon's guard: %+v, handover %v; want %+v and none", rep, ho, want)
	}

	guard.LetGo()
	if err := gd.readErr(t); !errors.Is(err, unix.EIO) {
		t.Fatalf("read of a guarded file once the daemon let go: %v, want EIO", err)
	}
	if rep, ho, err = Ask(sock, false); err != nil || ho != nil || rep.Alive || rep.Groups != 1 {
		t.Fatalf("query after let go: %+v, %v, %v; want the daemon gone, 1 group, nothing handed over", rep, ho, err)
	}

	rep, ho, err = Ask(sock, true)
	if err != nil || ho == nil || len(ho.Holds) != 1 || rep.Alive {
		t.Fatalf("take: %+v, %+v, %v; want one holding", rep, ho, err)
	}
	h := ho.Holds[0]
	if n, err := Watches(h.Inotify); err != nil || n != 1 {
		t.Fatalf("handed inotify instance: %d watches (%v), want 1", n, err)
	}
	if !sameFile(t, h.Group.FD(), gd.g.FD()) || !sameFile(t, h.Inotify, gd.ino) || sameFile(t, h.Group.FD(), gd.ino) {
		t.Fatal("handed fds are not the guarded group and inotify instance")
	}
	h.Group.Close()
	unix.Close(h.Inotify)
	ho.Abort()
	time.Sleep(100 * time.Millisecond)
	if exited(guard) {
		t.Fatal("guard exited after an aborted hand-over")
	}
	if err := gd.readErr(t); !errors.Is(err, unix.EIO) {
		t.Fatalf("read after an aborted hand-over: %v, want EIO", err)
	}

	_, ho, err = Ask(sock, true)
	if err != nil || ho == nil {
		t.Fatalf("second take: %+v, %v", ho, err)
	}
	for _, h := range ho.Holds {
		h.Group.Close()
		unix.Close(h.Inotify)
	}
	if err := ho.Ack(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the guard to exit after the acknowledged hand-over", func() bool { return exited(guard) })
	if socks := Sockets(gd.cache); len(socks) != 0 {
		t.Fatalf("sockets left: %v", socks)
	}
	if rep, ho, err := Ask(sock, true); err != nil || rep != (Reply{}) || ho != nil {
		t.Fatalf("ask a gone guard: %+v, %v, %v; want nothing", rep, ho, err)
	}
}

// sameFile says whether fds a and b of this process are the same open
// file description (kcmp KCMP_FILE: anon inodes of one kind share their
// inode, so fstat cannot tell).
func sameFile(t *testing.T, a, b int) bool {
	t.Helper()
	const kcmpFile = 0
	pid := uintptr(os.Getpid())
	r, _, errno := unix.Syscall6(unix.SYS_KCMP, pid, pid, kcmpFile, uintptr(a), uintptr(b), 0)
	if errno != 0 {
		t.Fatalf("kcmp: %v", errno)
	}
	return r == 0
}

// A guard whose daemon is gone exits, and its marks go, once the last
// watch of its inotify instance goes (the last mount it guards is gone).
func TestExitsWithLastWatch(t *testing.T) {
	gd := newGuarded(t)
	guard, sock := gd.start(t)
	guard.LetGo()
	if err := gd.readErr(t); !errors.Is(err, unix.EIO) {
		t.Fatalf("read once the daemon let go: %v, want EIO", err)
	}
	time.Sleep(100 * time.Millisecond)
	if exited(guard) {
		t.Fatal("guard exited with a watch left")
	}
	if _, err := unix.InotifyRmWatch(gd.ino, uint32(gd.wd)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the guard to exit with no watch left", func() bool { return exited(guard) })
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left: %v", err)
	}
	// The group's last other holder is this process: unmarking lets the
	// file be read without anyone answering.
	if err := gd.g.Unmark(gd.file); err != nil {
		t.Fatal(err)
	}
	if err := gd.readErr(t); err != nil {
		t.Fatal(err)
	}
}

// Stop ends a guard at once and removes its sockets.
func TestStop(t *testing.T) {
	gd := newGuarded(t)
	guard, sock := gd.start(t)
	guard.Stop()
	if !exited(guard) {
		t.Fatal("guard still running after Stop")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after Stop: %v", err)
	}
	if err := guard.Update(Update{}); err == nil {
		t.Fatal("update of a stopped guard succeeded")
	}
}

// A guard process carries its daemon's pid in DaemonEnv.
func TestDaemonEnv(t *testing.T) {
	gd := newGuarded(t)
	guard, _ := gd.start(t)
	env, err := os.ReadFile("/proc/" + strconv.Itoa(guard.Pid()) + "/environ")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(env, []byte(DaemonEnv+"="+strconv.Itoa(os.Getpid())+"\x00")) {
		t.Fatalf("guard environment lacks %s=%d", DaemonEnv, os.Getpid())
	}
}

// allowAll is a Filler that has nothing to fill: every event is allowed.
type allowAll struct{}

func (allowAll) Fill(context.Context, *os.File, fanotify.Event) error { return nil }

// The guard of a supervised daemon, once the daemon is gone, answers no
// event: a read of the marked file waits (neither EIO nor the file's
// bytes unfilled) until a successor takes the group over and answers it.
func TestSupervisedGuardLeavesEventsWaiting(t *testing.T) {
	gd := newGuarded(t)
	guard, err := Start([]Holding{{gd.g, gd.ino}}, Update{Dirs: []string{gd.cache}, Supervised: true, MaxFD: 100})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(guard.Stop)
	sock := sockPath(gd.cache, guard.Pid())
	waitFor(t, "the guard's socket", func() bool { _, err := os.Stat(sock); return err == nil })
	guard.LetGo()
	res := make(chan error, 1)
	go func() {
		b, err := os.ReadFile(gd.file)
		if err == nil && string(b) != "cached bytes" {
			err = fmt.Errorf("read %q", b)
		}
		res <- err
	}()
	select {
	case err := <-res:
		t.Fatalf("read answered while only the guard of a dead supervised daemon holds the group: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	rep, ho, err := Ask(sock, true)
	if err != nil || ho == nil || rep.Alive || len(ho.Holds) != 1 {
		t.Fatalf("take: %+v, %v, %v; want one holding", rep, ho, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- ho.Holds[0].Group.Serve(ctx, allowAll{}, fanotify.Options{}) }()
	defer func() {
		cancel()
		<-served
		ho.Holds[0].Group.Close()
		unix.Close(ho.Holds[0].Inotify)
	}()
	select {
	case err := <-res:
		if err != nil {
			t.Fatalf("read answered by the successor: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("read still waiting 10s after the successor took the group")
	}
	if err := ho.Ack(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the guard to exit after the hand-over", func() bool { return exited(guard) })
}

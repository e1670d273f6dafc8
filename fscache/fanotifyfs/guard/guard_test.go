package guard

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// The guards Start starts are this test binary re-executed.
func TestMain(m *testing.M) {
	MaybeRun()
	os.Exit(m.Run())
}

// A guard listens in cache directories whose socket path is longer than
// sockaddr_un holds (through /proc/self/fd of the directory), and a client
// reaches it there; a guard whose daemon lives says so and hands nothing
// over.
func TestSocketLongPath(t *testing.T) {
	fstest.RequireRoot(t)
	g, err := fanotify.New()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	ino, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ino)
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	gp := &proc{log: slog.New(slog.NewTextHandler(t.Output(), nil)), daemon: 4242, msg: -1, lns: map[string]int{}, holds: []Holding{{g, ino}}}
	gp.listen([]string{dir})
	t.Cleanup(gp.closeListeners)
	socks := Sockets(dir)
	if len(socks) != 1 || len(socks[0]) < 108 {
		t.Fatalf("guard sockets %v, want one with a path longer than sockaddr_un", socks)
	}
	type answer struct {
		rep Reply
		ho  *Handover
		err error
	}
	res := make(chan answer, 1)
	go func() {
		rep, ho, err := Ask(socks[0], true)
		if ho != nil {
			ho.Abort()
		}
		res <- answer{rep, ho, err}
	}()
	// One accept, as the guard's loop would on POLLIN.
	for _, fd := range gp.lns {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if n, _ := unix.Poll(p, 10000); n != 1 {
			t.Fatal("no client reached the guard's socket")
		}
		gp.serveConn(fd)
	}
	a := <-res
	if a.err != nil {
		t.Fatal(a.err)
	}
	if !a.rep.Alive || a.rep.Daemon != 4242 || a.rep.Guard != os.Getpid() || a.ho != nil {
		t.Fatalf("reply %+v, handover %v, want the daemon alive and nothing handed over", a.rep, a.ho)
	}
}

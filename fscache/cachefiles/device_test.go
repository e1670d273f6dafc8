package cachefiles

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/internal/testutil"
)

// fakeDevice is a SOCK_SEQPACKET pair standing in for /dev/cachefiles
// (the host kernel has no on-demand mode): the daemon's end keeps message
// boundaries as the device does, the test's end sees its commands.
func fakeDevice(t *testing.T) (*os.File, int) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "cachefiles"), fds[1]
}

// nextCommand waits up to 5 s for the daemon's next command on the fake
// device ("" if none came).
func nextCommand(t *testing.T, peer int) string {
	t.Helper()
	if !testutil.Readable(peer, 5*time.Second) {
		return ""
	}
	buf := make([]byte, 256)
	n, err := unix.Read(peer, buf)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

// TestAdoptedDeviceRestoresOnServe: adopting a handed-over device sends
// nothing (during a live upgrade the old daemon still serves it, and
// "restore" would deliver its in-flight requests twice); Serve sends
// "restore" before answering anything, then serves as usual.
func TestAdoptedDeviceRestoresOnServe(t *testing.T) {
	f, peer := fakeDevice(t)
	peerOpen := true
	d, err := New(Config{Device: f, Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		unix.Close(peer)
		t.Fatal(err)
	}
	defer d.Close()
	// Runs before d.Close: a read blocked on the socket returns only when
	// our end closes, and Close waits for Serve.
	defer func() {
		if peerOpen {
			unix.Close(peer)
		}
	}()
	if testutil.Readable(peer, 200*time.Millisecond) {
		t.Fatalf("adopting the device sent %q", nextCommand(t, peer))
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	if got := nextCommand(t, peer); got != "restore" {
		t.Fatalf("first command on Serve = %q, want restore", got)
	}
	// An OPEN nothing is bound for: refused, its fd closed.
	fd, _ := cacheFile(t)
	msg := AppendMsg(nil, Msg{ID: 7, Opcode: OpOpen, ObjectID: 1, Open: &OpenMsg{VolumeKey: "erofs,x", CookieKey: "y", FD: uint32(fd)}})
	if _, err := unix.Write(peer, msg); err != nil {
		t.Fatal(err)
	}
	if got := nextCommand(t, peer); got != "copen 7,-2" {
		t.Fatalf("reply to an unbound OPEN = %q, want copen 7,-2", got)
	}
	if fdOpen(fd) {
		t.Error("the refused OPEN's fd is still open")
	}
	// The socket blocks in read where the device would return 0: closing
	// our end lets the daemon's read return so it sees the wake-up.
	cancel()
	unix.Close(peer)
	peerOpen = false
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
}

package cachefiles

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
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

// fakeServer is a Daemon on a fake device and the test's end of it.
type fakeServer struct {
	t      *testing.T
	d      *Daemon
	peer   int // -1 once closed
	cancel context.CancelFunc
	served chan error
}

// newFakeServer creates a Daemon on a fake device with cfg (Device and
// Logger filled in). Cleanup closes the test's end before the daemon: a
// read blocked on the socket returns only when that end closes, and
// Close waits for Serve.
func newFakeServer(t *testing.T, cfg Config) *fakeServer {
	t.Helper()
	f, peer := fakeDevice(t)
	cfg.Device, cfg.Logger = f, slog.New(slog.NewTextHandler(testWriter{t}, nil))
	d, err := New(cfg)
	if err != nil {
		unix.Close(peer)
		t.Fatal(err)
	}
	s := &fakeServer{t: t, d: d, peer: peer}
	t.Cleanup(func() { d.Close() })
	t.Cleanup(func() {
		if s.peer >= 0 {
			unix.Close(s.peer)
		}
	})
	return s
}

// completions diverts READ completions (READ_COMPLETE on the object's fd)
// to the returned channel, by message id.
func (s *fakeServer) completions() <-chan uint32 {
	ch := make(chan uint32, 16)
	s.d.complete = func(fd int, id uint32) error { ch <- id; return nil }
	return ch
}

// serve starts Serve; its first command must be "restore".
func (s *fakeServer) serve() {
	s.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.served = cancel, make(chan error, 1)
	go func() { s.served <- s.d.Serve(ctx) }()
	if got := nextCommand(s.t, s.peer); got != "restore" {
		s.t.Fatalf("first command on Serve = %q, want restore", got)
	}
}

// send writes one message to the daemon.
func (s *fakeServer) send(b []byte) {
	s.t.Helper()
	if _, err := unix.Write(s.peer, b); err != nil {
		s.t.Fatal(err)
	}
}

// stop ends Serve and waits for it: the socket blocks in read where the
// device would return 0, so closing our end lets the daemon's read
// return and see its context ended.
func (s *fakeServer) stop(within time.Duration) {
	s.t.Helper()
	s.cancel()
	unix.Close(s.peer)
	s.peer = -1
	select {
	case err := <-s.served:
		if err != nil {
			s.t.Fatalf("Serve: %v", err)
		}
	case <-time.After(within):
		s.t.Fatal("Serve did not return after its context ended")
	}
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
	srv := newFakeServer(t, Config{})
	if testutil.Readable(srv.peer, 200*time.Millisecond) {
		t.Fatalf("adopting the device sent %q", nextCommand(t, srv.peer))
	}
	srv.serve()
	// An OPEN nothing is bound for: refused, its fd closed.
	fd, _ := cacheFile(t)
	msg := AppendMsg(nil, Msg{ID: 7, Opcode: OpOpen, ObjectID: 1, Open: &OpenMsg{VolumeKey: "erofs,x", CookieKey: "y", FD: uint32(fd)}})
	srv.send(msg)
	if got := nextCommand(t, srv.peer); got != "copen 7,-2" {
		t.Fatalf("reply to an unbound OPEN = %q, want copen 7,-2", got)
	}
	if fdOpen(fd) {
		t.Error("the refused OPEN's fd is still open")
	}
	srv.stop(5 * time.Second)
}

// TestServeBadRequests drives Serve through the fake device with what a
// broken or hostile kernel could send: a READ for an object never opened
// (nothing to answer it on: dropped and counted, as nydusd does), a READ
// past the object's end (completed with nothing written, so the kernel
// fails the reader with EIO), an OPEN whose keys do not add up (refused
// with -EINVAL), bytes that are no message at all. The daemon survives
// each and then serves a good READ with the right bytes.
func TestServeBadRequests(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, 9, map[string]int{"f": 300 << 10})
	im := buildImage(t, src, t.TempDir())
	srv := newFakeServer(t, Config{Threads: 2, NoReadAhead: true})
	d, peer, send := srv.d, srv.peer, srv.send
	completed := srv.completions()
	if err := d.BindBlob(bindReq("img", "", im)); err != nil {
		t.Fatal(err)
	}
	srv.serve()
	fd, cachePath := cacheFile(t)
	blob := im.img.Blobs[0]
	send(AppendMsg(nil, Msg{ID: 1, Opcode: OpOpen, ObjectID: 5, Open: &OpenMsg{VolumeKey: "erofs,img", CookieKey: blob.ID, FD: uint32(fd)}}))
	reply := nextCommand(t, peer)
	var size uint64
	if _, err := fmt.Sscanf(reply, "copen 1,%d", &size); err != nil || size < blob.UncompressedSize {
		t.Fatalf("OPEN of the blob: reply %q, want copen 1,<size >= %d>", reply, blob.UncompressedSize)
	}
	noCompletion := func(what string) {
		t.Helper()
		select {
		case id := <-completed:
			t.Fatalf("%s: READ %d completed", what, id)
		case <-time.After(100 * time.Millisecond):
		}
	}

	send(AppendMsg(nil, Msg{ID: 2, Opcode: OpRead, ObjectID: 77, Read: &ReadMsg{Off: 0, Len: 4096}}))
	noCompletion("READ of an unknown object")
	send(AppendMsg(nil, Msg{ID: 3, Opcode: OpRead, ObjectID: 5, Read: &ReadMsg{Off: size + 1<<20, Len: 4096}}))
	select {
	case id := <-completed:
		if id != 3 {
			t.Fatalf("completed READ %d, want 3", id)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a READ past the object's end was never completed: its reader would hang")
	}
	bad := AppendMsg(nil, Msg{ID: 4, Opcode: OpOpen, ObjectID: 6, Open: &OpenMsg{VolumeKey: "erofs,img", CookieKey: blob.ID, FD: 1000}})
	binary.LittleEndian.PutUint32(bad[headerSize+4:], 9999) // cookie key size
	send(bad)
	if got, want := nextCommand(t, peer), fmt.Sprintf("copen 4,%d", -int(syscall.EINVAL)); got != want {
		t.Fatalf("reply to an OPEN with bad key sizes = %q, want %q", got, want)
	}
	send([]byte{1, 2, 3})
	send(AppendMsg(nil, Msg{ID: 5, Opcode: Opcode(9), ObjectID: 5}))
	noCompletion("garbage")

	// Still serving: a good READ of the whole object fills the cache file.
	send(AppendMsg(nil, Msg{ID: 6, Opcode: OpRead, ObjectID: 5, Read: &ReadMsg{Off: 0, Len: size}}))
	select {
	case id := <-completed:
		if id != 6 {
			t.Fatalf("completed READ %d, want 6", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the good READ was never completed")
	}
	cache, _ := os.ReadFile(cachePath)
	if checkFiles(t, im, blob, cache, nil) == 0 {
		t.Fatal("no chunk checked")
	}
	s := d.Stats()
	if s.BadMessages != 4 || s.Reads != 2 || s.ReadFailures != 1 || s.BytesWritten == 0 {
		t.Errorf("stats %+v: want 4 bad messages (unknown object, bad OPEN, short, unknown opcode), 2 READs answered, 1 failed", s)
	}
	srv.stop(5 * time.Second)
}

// TestServeParallelAndHungBackend: READs of different objects are served
// in parallel, so a READ whose backend never answers (a registry that
// accepts connections and stays silent) holds up no other object's READ;
// and it is itself completed, failed, once Config.ReadTimeout passes, so
// the kernel returns EIO to its reader instead of leaving it hanging.
func TestServeParallelAndHungBackend(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var heldMu sync.Mutex
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			heldMu.Lock()
			held = append(held, c)
			heldMu.Unlock()
		}
	}()
	defer func() {
		silent.Close()
		heldMu.Lock()
		for _, c := range held {
			c.Close()
		}
		heldMu.Unlock()
	}()

	srcA, srcB := t.TempDir(), t.TempDir()
	writeTree(t, srcA, 10, map[string]int{"a": 200 << 10})
	writeTree(t, srcB, 11, map[string]int{"b": 200 << 10})
	imA := buildImage(t, srcA, t.TempDir())
	imB := buildImage(t, srcB, t.TempDir())
	const timeout = 3 * time.Second
	srv := newFakeServer(t, Config{Threads: 2, NoReadAhead: true, ReadTimeout: timeout})
	d, peer := srv.d, srv.peer
	completed := srv.completions()
	reqA := bindReq("hung", "", imA)
	reqA.Config.BackendType = "registry"
	reqA.Config.BackendConfig, _ = json.Marshal(map[string]any{"scheme": "http", "host": silent.Addr().String(), "repo": "x/y", "timeout": 60, "retry_limit": 0})
	if err := d.BindBlob(reqA); err != nil {
		t.Fatal(err)
	}
	if err := d.BindBlob(bindReq("ok", "", imB)); err != nil {
		t.Fatal(err)
	}
	srv.serve()
	send := func(m Msg) { t.Helper(); srv.send(AppendMsg(nil, m)) }
	for i, x := range []struct {
		domain string
		im     *testImage
	}{{"hung", imA}, {"ok", imB}} {
		fd, _ := cacheFile(t)
		id := uint32(i + 1)
		send(Msg{ID: id, Opcode: OpOpen, ObjectID: id, Open: &OpenMsg{VolumeKey: "erofs," + x.domain, CookieKey: x.im.img.Blobs[0].ID, FD: uint32(fd)}})
		if got := nextCommand(t, peer); !strings.HasPrefix(got, fmt.Sprintf("copen %d,", id)) || strings.HasPrefix(got, fmt.Sprintf("copen %d,-", id)) {
			t.Fatalf("OPEN %d: reply %q", id, got)
		}
	}
	start := time.Now()
	send(Msg{ID: 10, Opcode: OpRead, ObjectID: 1, Read: &ReadMsg{Off: 0, Len: 64 << 10}})
	send(Msg{ID: 11, Opcode: OpRead, ObjectID: 2, Read: &ReadMsg{Off: 0, Len: 64 << 10}})
	wait := func(want uint32, within time.Duration) time.Duration {
		t.Helper()
		select {
		case id := <-completed:
			if id != want {
				t.Fatalf("READ %d completed after %s, want %d first", id, time.Since(start), want)
			}
		case <-time.After(within):
			t.Fatalf("READ %d not completed within %s", want, within)
		}
		return time.Since(start)
	}
	okAt := wait(11, timeout-500*time.Millisecond)
	hungAt := wait(10, timeout+10*time.Second)
	t.Logf("READ of the healthy object completed after %s, the hung one failed after %s", okAt.Round(time.Millisecond), hungAt.Round(time.Millisecond))
	if hungAt < timeout {
		t.Fatalf("the hung READ completed after %s, before its %s timeout: nothing was waited for", hungAt, timeout)
	}
	if s := d.Stats(); s.Reads != 2 || s.ReadFailures != 1 {
		t.Errorf("stats %+v: want 2 READs answered, the hung one failed", s)
	}
	// One image on a registry, one on localfs: the sum names no single type.
	if m, err := d.BackendMetrics(""); err != nil || m.BackendType != "mixed" {
		t.Errorf("BackendMetrics over a registry and a localfs image: type %q, %v; want mixed", m.BackendType, err)
	}
	srv.stop(10 * time.Second)
}

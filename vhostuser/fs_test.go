package vhostuser

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// testTree creates a directory with a few files and returns it with the
// content of big.bin.
func testTree(t testing.TB) (string, []byte) {
	dir := t.TempDir()
	big := make([]byte, 1<<20+333)
	rand.New(rand.NewSource(1)).Read(big)
	files := map[string][]byte{
		"hello.txt":    []byte("hello, virtio-fs\n"),
		"big.bin":      big,
		"sub/a":        []byte("a"),
		"sub/deeper/b": []byte("b"),
		"empty":        nil,
	}
	for name, data := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir, big
}

func loopbackFS(t testing.TB, dir string) fuse.RawFileSystem {
	root, err := fs.NewLoopbackRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	return fs.NewNodeFS(root, &fs.Options{})
}

// startDevice serves dev on a fresh socket until the test ends and checks
// that Serve returns promptly then.
func startDevice(t testing.TB, raw fuse.RawFileSystem, opts FSOptions) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "vhost.sock")
	d := NewFSDevice(raw, opts)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- d.ServeListener(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return sock
}

// session is a FUSE client speaking over a frontend's request queue.
type session struct {
	t  testing.TB
	fe *frontend
	q  int
}

func (s *session) call(op uint32, node uint64, body, extra []byte, outSize int) []byte {
	s.t.Helper()
	return s.fe.fuseCall(s.q, fuseReq(op, node, body, extra), []int{0}, []int{outSize}, false)
}

func (s *session) init() {
	s.t.Helper()
	in := fuse.InitIn{Major: 7, Minor: 31, MaxReadAhead: 1 << 17, Flags: fuse.CAP_READDIRPLUS | fuse.CAP_ASYNC_READ}
	body := mustOK(s.t, s.call(opInit, 0, structBody(&in), nil, 16+int(unsafe.Sizeof(fuse.InitOut{}))))
	out := fromBytes[fuse.InitOut](body)
	if out.Major != 7 {
		s.t.Fatalf("INIT major %d", out.Major)
	}
}

func (s *session) lookup(parent uint64, name string) *fuse.EntryOut {
	s.t.Helper()
	return fromBytes[fuse.EntryOut](mustOK(s.t, s.call(opLookup, parent, nil, cstr(name), 16+int(unsafe.Sizeof(fuse.EntryOut{})))))
}

func (s *session) open(op uint32, node uint64) uint64 {
	s.t.Helper()
	in := fuse.OpenIn{Flags: unix.O_RDONLY}
	return fromBytes[fuse.OpenOut](mustOK(s.t, s.call(op, node, structBody(&in), nil, 16+int(unsafe.Sizeof(fuse.OpenOut{}))))).Fh
}

func readReq(node, fh uint64, off int64, size int) []byte {
	in := fuse.ReadIn{Fh: fh, Offset: uint64(off), Size: uint32(size)}
	return fuseReq(opRead, node, structBody(&in), nil)
}

func TestFSDeviceServesLoopback(t *testing.T) {
	dir, big := testTree(t)
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{Tag: "myfs"})
	fe := dialFrontend(t, sock)
	fe.connect(2)
	s := &session{t: t, fe: fe, q: 1}
	s.init()

	// GET_CONFIG: tag and request queue count.
	if fe.proto&protoConfig != 0 {
		req := binary.LittleEndian.AppendUint32(nil, 0)
		req = binary.LittleEndian.AppendUint32(req, 40)
		req = binary.LittleEndian.AppendUint32(req, 0)
		req = append(req, make([]byte, 40)...)
		fe.send(reqGetConfig, 0, req)
		p := fe.recv(reqGetConfig)
		if len(p) != 52 || string(bytes.TrimRight(p[12:48], "\x00")) != "myfs" || binary.LittleEndian.Uint32(p[48:]) != 1 {
			t.Fatalf("config %q", p)
		}
	}

	e := s.lookup(1, "big.bin")
	if e.Attr.Size != uint64(len(big)) || e.NodeId == 0 {
		t.Fatalf("lookup big.bin: size %d node %d", e.Attr.Size, e.NodeId)
	}
	in := fuse.GetAttrIn{}
	a := fromBytes[fuse.AttrOut](mustOK(t, s.call(opGetattr, e.NodeId, structBody(&in), nil, 16+int(unsafe.Sizeof(fuse.AttrOut{})))))
	if a.Size != uint64(len(big)) || a.Mode&unix.S_IFMT != unix.S_IFREG {
		t.Fatalf("getattr: %+v", a.Attr)
	}
	fh := s.open(opOpen, e.NodeId)

	reads := []struct {
		name     string
		off      int64
		size     int
		inSplit  []int
		outSplit []int
		indirect bool
	}{
		{"one descriptor each", 0, 4096, []int{0}, []int{16 + 4096}, false},
		{"split header and data", 4096 + 7, 65536, []int{8, 0}, []int{16, 1000, 30000, 34536}, false},
		{"indirect", 300000, 131072, []int{40, 0}, []int{20, 4096, 126972}, true},
		{"indirect odd splits", 1 << 19, 100000, []int{3, 17, 0}, []int{7, 9, 50000, 50000}, true},
		{"short read at EOF", int64(len(big)) - 100, 4096, []int{0}, []int{16 + 4096}, false},
	}
	for _, r := range reads {
		t.Run(r.name, func(t *testing.T) {
			rep := fe.fuseCall(1, readReq(e.NodeId, fh, r.off, r.size), r.inSplit, r.outSplit, r.indirect)
			data := mustOK(t, rep)
			end := min(int(r.off)+r.size, len(big))
			if !bytes.Equal(data, big[r.off:end]) {
				t.Fatalf("read %d@%d: %d bytes, content differs", r.size, r.off, len(data))
			}
		})
	}

	// Missing name: ENOENT travels back as an error reply.
	if st, _ := replyStatus(t, s.call(opLookup, 1, nil, cstr("nope"), 16+int(unsafe.Sizeof(fuse.EntryOut{})))); st != -int32(unix.ENOENT) {
		t.Fatalf("lookup nope: status %d", st)
	}

	// READDIRPLUS of the root.
	dfh := s.open(opOpendir, 1)
	rin := fuse.ReadIn{Fh: dfh, Size: 8192}
	body := mustOK(t, s.call(opReaddirplus, 1, structBody(&rin), nil, 16+8192))
	var names []string
	esz := int(unsafe.Sizeof(fuse.EntryOut{}))
	for len(body) >= esz+24 {
		nl := int(binary.LittleEndian.Uint32(body[esz+16:]))
		name := string(body[esz+24 : esz+24+nl])
		if name != "." && name != ".." {
			names = append(names, name)
		}
		body = body[(esz+24+nl+7)&^7:]
	}
	sort.Strings(names)
	if got := strings.Join(names, ","); got != "big.bin,empty,hello.txt,sub" {
		t.Fatalf("readdirplus names %q", got)
	}

	// FORGET on the high-priority queue: no reply, used len 0.
	fin := fuse.ForgetIn{Nlookup: 1}
	if r := fe.fuseCall(0, fuseReq(2, e.NodeId, structBody(&fin), nil), []int{0}, nil, false); len(r) != 0 {
		t.Fatalf("FORGET got a %d-byte reply", len(r))
	}
	// The request queue still answers after the forget.
	if e2 := s.lookup(1, "hello.txt"); e2.Attr.Size != 17 {
		t.Fatalf("hello.txt size %d", e2.Attr.Size)
	}
}

// blockingFS holds READs until released, to have requests in flight.
type blockingFS struct {
	fuse.RawFileSystem
	entered chan struct{}
	gate    chan struct{}
}

func (b *blockingFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	b.entered <- struct{}{}
	<-b.gate
	return b.RawFileSystem.Read(cancel, in, buf)
}

// TestStopWithRequestsInFlight: GET_VRING_BASE waits for in-flight
// requests, returns the ring position, and the ring restarts from there
// (what QEMU does when the guest reboots).
func TestStopWithRequestsInFlight(t *testing.T) {
	dir, big := testTree(t)
	bfs := &blockingFS{RawFileSystem: loopbackFS(t, dir), entered: make(chan struct{}, 8), gate: make(chan struct{})}
	sock := startDevice(t, bfs, FSOptions{})
	fe := dialFrontend(t, sock)
	fe.connect(2)
	s := &session{t: t, fe: fe, q: 1}
	s.init()
	e := s.lookup(1, "big.bin")
	fh := s.open(opOpen, e.NodeId)

	q := fe.queues[1]
	const inflight = 3
	var outs []uint64
	for i := 0; i < inflight; i++ {
		req := readReq(e.NodeId, fh, int64(i)*1000, 1000)
		in := fe.alloc(len(req))
		copy(fe.mem[in:], req)
		out := fe.alloc(16 + 1000)
		outs = append(outs, out)
		fe.submit(q, []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: fe.gpaOf(out), len: 1016, write: true}}, false)
	}
	for i := 0; i < inflight; i++ {
		select {
		case <-bfs.entered:
		case <-time.After(10 * time.Second):
			t.Fatal("reads never reached the filesystem")
		}
	}
	got := make(chan []byte, 1)
	fe.send(reqGetVringBase, 0, vstate(1, 0))
	go func() {
		var h [headerSize + 8]byte
		fe.c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if _, err := readAll(fe.c, h[:]); err != nil {
			got <- nil
			return
		}
		got <- h[headerSize:]
	}()
	select {
	case <-got:
		t.Fatal("GET_VRING_BASE answered while requests were in flight")
	case <-time.After(200 * time.Millisecond):
	}
	close(bfs.gate)
	var p []byte
	select {
	case p = <-got:
	case <-time.After(20 * time.Second):
		t.Fatal("GET_VRING_BASE hangs")
	}
	fe.c.SetReadDeadline(time.Time{})
	if p == nil {
		t.Fatal("GET_VRING_BASE: no reply")
	}
	base := uint16(binary.LittleEndian.Uint32(p[4:]))
	if base != q.availIdx {
		t.Fatalf("base %d, want %d", base, q.availIdx)
	}
	// All in-flight requests completed into the used ring before the reply.
	if used := binary.LittleEndian.Uint16(fe.mem[q.used+2:]); used != q.availIdx {
		t.Fatalf("used idx %d, want %d", used, q.availIdx)
	}
	for i := 0; i < inflight; i++ {
		if _, _, ok := fe.waitUsed(q, time.Second); !ok {
			t.Fatal("missing completion")
		}
		data := mustOK(t, fe.mem[outs[i]:outs[i]+1016])
		if !bytes.Equal(data, big[i*1000:i*1000+1000]) {
			t.Fatalf("in-flight read %d: wrong bytes", i)
		}
	}
	// A stopped ring does not consume new entries...
	req := readReq(e.NodeId, fh, 0, 10)
	in := fe.alloc(len(req))
	copy(fe.mem[in:], req)
	out := fe.alloc(26)
	fe.submit(q, []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: fe.gpaOf(out), len: 26, write: true}}, false)
	if _, _, ok := fe.waitUsed(q, 200*time.Millisecond); ok {
		t.Fatal("stopped ring processed a request")
	}
	// ...until it is started again from the returned base.
	fe.startQueue(q, base)
	if _, _, ok := fe.waitUsed(q, 10*time.Second); !ok {
		t.Fatal("restarted ring did not process the pending request")
	}
	if data := mustOK(t, fe.mem[out:out+26]); !bytes.Equal(data, big[:10]) {
		t.Fatal("wrong bytes after restart")
	}
}

// TestGuestRebootAndReset replays QEMU's stop/start sequence (a guest
// reboot) and RESET_DEVICE; the guest's next FUSE_INIT must work.
func TestGuestRebootAndReset(t *testing.T) {
	dir, _ := testTree(t)
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{})
	fe := dialFrontend(t, sock)
	fe.connect(2)
	s := &session{t: t, fe: fe, q: 1}
	s.init()
	s.lookup(1, "hello.txt")

	// vhost_dev_stop: disable, then GET_VRING_BASE on every ring.
	for i := range fe.queues {
		fe.mustAck(reqSetVringEnable, vstate(uint32(i), 0))
	}
	bases := make([]uint16, len(fe.queues))
	for i := range fe.queues {
		bases[i] = fe.getVringBase(i)
	}
	// vhost_dev_start after reboot.
	fe.mustAck(reqSetFeatures, u64Bytes(fsFeatures|FeatureProtocolFeatures))
	fe.setMemTable()
	for i, q := range fe.queues {
		fe.startQueue(q, bases[i])
	}
	s.init()
	s.lookup(1, "hello.txt")

	// RESET_DEVICE: the rings are gone until set up again, from scratch.
	fe.mustAck(reqResetDevice, nil)
	fe.negotiate(^uint64(0))
	fe.setMemTable()
	for _, q := range fe.queues {
		clear(fe.mem[q.desc : q.desc+0x4000])
		q.nextDesc, q.availIdx, q.lastUsed = 0, 0, 0
		fe.startQueue(q, 0)
	}
	s.init()
	if e := s.lookup(1, "sub"); e.Attr.Mode&unix.S_IFMT != unix.S_IFDIR {
		t.Fatalf("sub mode %o", e.Attr.Mode)
	}
}

// TestReconnect: a front end that goes away and comes back (QEMU restart)
// is served again without restarting the device.
func TestReconnect(t *testing.T) {
	dir, _ := testTree(t)
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{})
	before := openFds(t)
	for i := 0; i < 3; i++ {
		fe := dialFrontend(t, sock)
		fe.connect(2)
		s := &session{t: t, fe: fe, q: 1}
		s.init()
		if e := s.lookup(1, "hello.txt"); e.Attr.Size != 17 {
			t.Fatalf("round %d: size %d", i, e.Attr.Size)
		}
		fe.close() // disconnect without stopping the rings
	}
	// The device drops everything a front end gave it (memfd mapping,
	// kick/call/err eventfds, the connection) when it goes away.
	deadline := time.Now().Add(5 * time.Second)
	for openFds(t) > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := openFds(t); n > before {
		t.Fatalf("%d fds open after 3 front ends came and went, %d before", n, before)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(maps), "memfd:guest-ram"); n != 0 {
		t.Fatalf("%d guest memory mappings left", n)
	}
}

func openFds(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

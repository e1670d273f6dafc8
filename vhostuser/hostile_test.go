package vhostuser

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/internal/testutil"
	"github.com/rafsd/rafsd/vhostuser/virtqueue"
)

// TestHostileChains: malformed descriptor chains fail their own request
// (with an EIO reply when a writable buffer was decoded) and the queue
// keeps serving.
func TestHostileChains(t *testing.T) {
	dir, _ := testTree(t)
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{})
	fe := dialFrontend(t, sock)
	fe.connect(2)
	s := &session{t: t, fe: fe, q: 1}
	s.init()
	q := fe.queues[1]

	getattr := func() (uint64, []byte) {
		in := fuse.GetAttrIn{}
		req := fuseReq(opGetattr, 1, structBody(&in), nil)
		off := fe.alloc(len(req))
		copy(fe.mem[off:], req)
		return off, req
	}
	outside := uint64(feGPA + feMemSize + 4096)
	cases := []struct {
		name      string
		descs     func() []desc
		indirect  bool
		wantReply bool // an EIO reply, else used len 0
	}{
		{"writable outside memory after a good one", func() []desc {
			in, req := getattr()
			out := fe.alloc(16)
			return []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: fe.gpaOf(out), len: 16, write: true}, {addr: outside, len: 100, write: true}}
		}, false, true},
		{"readable outside memory", func() []desc {
			in, req := getattr()
			return []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: 0x1000, len: 8}, {addr: fe.gpaOf(fe.alloc(200)), len: 200, write: true}}
		}, false, false},
		{"length runs past the end of memory", func() []desc {
			in, req := getattr()
			out := fe.alloc(16)
			return []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: fe.gpaOf(out), len: 16, write: true}, {addr: feGPA + feMemSize - 8, len: 0xffffffff, write: true}}
		}, true, true},
		{"address wraps", func() []desc {
			return []desc{{addr: ^uint64(0) - 4, len: 64}}
		}, false, false},
		{"indirect inside indirect", func() []desc {
			return []desc{{addr: fe.gpaOf(fe.alloc(32)), len: 32, flags: virtqueue.DescFIndirect}}
		}, true, false},
		{"readable after writable", func() []desc {
			in, req := getattr()
			out := fe.alloc(200)
			return []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: fe.gpaOf(out), len: 200, write: true}, {addr: fe.gpaOf(in), len: 8}}
		}, false, true},
		{"truncated fuse header", func() []desc {
			in := fe.alloc(8)
			out := fe.alloc(200)
			return []desc{{addr: fe.gpaOf(in), len: 8}, {addr: fe.gpaOf(out), len: 200, write: true}}
		}, false, false},
		{"reply buffer too small", func() []desc {
			in, req := getattr()
			out := fe.alloc(20)
			return []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: fe.gpaOf(out), len: 20, write: true}}
		}, false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ds := tc.descs()
			head := fe.submit(q, ds, tc.indirect)
			id, n, ok := fe.waitUsed(q, 5*time.Second)
			if !ok || id != head {
				t.Fatalf("completion ok=%v id=%d head=%d", ok, id, head)
			}
			if tc.wantReply {
				if n != 16 {
					t.Fatalf("used len %d, want a 16-byte error reply", n)
				}
				var w desc
				for _, d := range ds {
					if d.write {
						w = d
						break
					}
				}
				r := fe.mem[w.addr-fe.gpa : w.addr-fe.gpa+16]
				if st := int32(binary.LittleEndian.Uint32(r[4:])); st != -int32(unix.EIO) {
					t.Fatalf("status %d, want -EIO", st)
				}
			} else if n != 0 {
				t.Fatalf("used len %d, want 0", n)
			}
			// The queue still works.
			if e := s.lookup(1, "hello.txt"); e.Attr.Size != 17 {
				t.Fatal("queue no longer serves")
			}
		})
	}

	t.Run("descriptor loop", func(t *testing.T) {
		in, req := getattr()
		head := q.nextDesc
		table := fe.mem[q.desc:]
		putDescAt(table, int(head), desc{addr: fe.gpaOf(in), len: uint32(len(req)), loop: true, next: head}, false, head)
		q.nextDesc = (q.nextDesc + 1) % q.size
		fe.publish(q, head)
		if id, n, ok := fe.waitUsed(q, 5*time.Second); !ok || id != head || n != 0 {
			t.Fatalf("loop: ok=%v id=%d n=%d", ok, id, n)
		}
		if e := s.lookup(1, "hello.txt"); e.Attr.Size != 17 {
			t.Fatal("queue no longer serves")
		}
	})
}

// TestBrokenQueueIsolated: a ring the guest corrupts (avail index jumping
// past the ring) is marked broken and signalled on the error eventfd; the
// other request queue keeps serving and the broken one can still be stopped.
func TestBrokenQueueIsolated(t *testing.T) {
	dir, _ := testTree(t)
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{RequestQueues: 2})
	fe := dialFrontend(t, sock)
	fe.connect(3)
	s := &session{t: t, fe: fe, q: 1}
	s.init()
	q := fe.queues[1]
	q.availIdx += 1000
	binary.LittleEndian.PutUint16(fe.mem[q.avail+2:], q.availIdx)
	fe.kick(q)
	if !testutil.Readable(q.errFd, 5*time.Second) {
		t.Fatal("error eventfd not signalled for a broken ring")
	}
	s2 := &session{t: t, fe: fe, q: 2}
	if e := s2.lookup(1, "hello.txt"); e.Attr.Size != 17 {
		t.Fatal("second request queue does not serve")
	}
	fe.getVringBase(1) // must not hang
}

// TestHostileMessages: protocol-level abuse gets a NACK or drops the
// connection, and the device keeps serving the next front end.
func TestHostileMessages(t *testing.T) {
	dir, _ := testTree(t)
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{})
	works := func() {
		t.Helper()
		fe := dialFrontend(t, sock)
		fe.connect(2)
		s := &session{t: t, fe: fe, q: 1}
		s.init()
		if e := s.lookup(1, "hello.txt"); e.Attr.Size != 17 {
			t.Fatal("device broken")
		}
		fe.close()
	}
	efds := func(n int) []int {
		var fds []int
		for i := 0; i < n; i++ {
			fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			fds = append(fds, fd)
		}
		t.Cleanup(func() {
			for _, fd := range fds {
				unix.Close(fd)
			}
		})
		return fds
	}

	t.Run("nacked requests keep the connection", func(t *testing.T) {
		fe := dialFrontend(t, sock)
		fe.negotiate(^uint64(0))
		region := func(gpa, size, uva, off uint64) []byte {
			p := binary.LittleEndian.AppendUint32(nil, 1)
			p = binary.LittleEndian.AppendUint32(p, 0)
			for _, v := range []uint64{gpa, size, uva, off} {
				p = binary.LittleEndian.AppendUint64(p, v)
			}
			return p
		}
		bad := []struct {
			name    string
			req     uint32
			payload []byte
			fds     []int
		}{
			{"too many fds", reqSetVringCall, u64Bytes(0), efds(12)},
			{"two fds for one", reqSetVringKick, u64Bytes(0), efds(2)},
			{"kick without fd", reqSetVringKick, u64Bytes(0x100), nil},
			{"vring index out of range", reqSetVringNum, vstate(99, 64), nil},
			{"vring size not power of two", reqSetVringNum, vstate(0, 100), nil},
			{"vring size too big", reqSetVringNum, vstate(0, 65536), nil},
			{"short payload", reqSetVringNum, []byte{1, 2, 3}, nil},
			{"region beyond memfd", reqSetMemTable, region(0, 2*feMemSize, feUVA, 0), []int{fe.memfd}},
			{"region offset beyond memfd", reqSetMemTable, region(0, 4096, feUVA, feMemSize), []int{fe.memfd}},
			{"region wraps", reqSetMemTable, region(^uint64(0)-10, 4096, feUVA, 0), []int{fe.memfd}},
			{"mem table without fd", reqSetMemTable, region(0, 4096, feUVA, 0), nil},
			{"mem table with 9 regions", reqSetMemTable, binary.LittleEndian.AppendUint32(make([]byte, 0), 9), nil},
			{"features not offered", reqSetFeatures, u64Bytes(1 << 63), nil},
			{"unknown request", 200, nil, nil},
			{"remove unknown region", reqRemMemReg, make([]byte, 40), nil},
			{"set config", reqSetConfig, make([]byte, 16), nil},
		}
		for _, b := range bad {
			if st := fe.ack(b.req, b.payload, b.fds...); st == 0 {
				t.Errorf("%s: acked as success", b.name)
			}
		}
		// SET_LOG_BASE has its own reply: failure.
		fe.send(reqSetLogBase, 0, make([]byte, 16), efds(1)...)
		if p := fe.recv(reqSetLogBase); binary.LittleEndian.Uint64(p) == 0 {
			t.Error("SET_LOG_BASE accepted")
		}
		// Still the same healthy connection.
		fe.setMemTable()
		fe.setupQueues(2)
		s := &session{t: t, fe: fe, q: 1}
		s.init()
		s.lookup(1, "hello.txt")
		fe.close()
	})

	drops := []struct {
		name string
		raw  []byte
	}{
		{"truncated payload", append(hdr(reqSetVringAddr, flagVersion, 40), 1, 2, 3, 4, 5)},
		{"truncated header", []byte{1, 0, 0}},
		{"bad version", hdr(reqGetFeatures, 2, 0)},
		{"reply flag from front end", hdr(reqGetFeatures, flagVersion|flagReply, 0)},
		{"oversized payload", hdr(reqSetMemTable, flagVersion, 1<<20)},
	}
	for _, d := range drops {
		t.Run(d.name, func(t *testing.T) {
			c, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write(d.raw)
			c.(*net.UnixConn).CloseWrite()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadAll(c); err != nil {
				t.Fatalf("connection not closed by the device: %v", err)
			}
			works()
		})
	}
}

func hdr(req, flags, size uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, req)
	b = binary.LittleEndian.AppendUint32(b, flags)
	return binary.LittleEndian.AppendUint32(b, size)
}

// FuzzVhostUserMessage feeds arbitrary bytes as a front end's message
// stream to a device (no fds: memory can't be mapped, everything else is
// reachable): no panic, no hang, the connection ends when the stream does.
func FuzzVhostUserMessage(f *testing.F) {
	dir := f.TempDir()
	os.WriteFile(dir+"/f", []byte("x"), 0o644)
	dev := NewFSDevice(loopbackFS(f, dir), FSOptions{Logger: discardLogger()})
	seeds := [][]byte{
		hdr(reqGetFeatures, flagVersion, 0),
		append(hdr(reqSetProtocolFeatures, flagVersion, 8), u64Bytes(protoReplyAck)...),
		append(append(hdr(reqSetVringNum, flagVersion|flagNeedReply, 8), vstate(1, 64)...), append(hdr(reqGetVringBase, flagVersion, 8), vstate(1, 0)...)...),
		append(hdr(reqSetVringAddr, flagVersion, 40), make([]byte, 40)...),
		append(hdr(reqGetConfig, flagVersion, 16), 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4),
		append(hdr(reqSetMemTable, flagVersion, 40), 1, 0, 0, 0),
		append(hdr(reqAddMemReg, flagVersion, 40), make([]byte, 40)...),
		hdr(reqResetDevice, flagVersion|flagNeedReply, 0),
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		ours := os.NewFile(uintptr(fds[0]), "front")
		defer ours.Close()
		theirs := os.NewFile(uintptr(fds[1]), "back")
		fc, err := net.FileConn(theirs)
		theirs.Close()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			ServeConn(context.Background(), fc.(*net.UnixConn), dev, Options{Logger: discardLogger()})
		}()
		go io.Copy(io.Discard, ours)
		ours.Write(data)
		unix.Shutdown(fds[0], unix.SHUT_WR)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("ServeConn hangs")
		}
	})
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

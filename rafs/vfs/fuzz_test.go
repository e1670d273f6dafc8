package vfs_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"log"
	"sync"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/vfs"
)

var fuzzVFS struct {
	once sync.Once
	v    *vfs.VFS
}

// fuzzTarget is a VFS with two images at sub-paths, the shape a daemon
// serves; it is stateless across requests, so one is shared.
func fuzzTarget(t testing.TB) *vfs.VFS {
	fuzzVFS.once.Do(func() {
		v := vfs.New(vfs.Options{})
		v.Mount("/rafs/a/lowerdir", buildImage(t, 7, 12, true).fs())
		v.Mount("/rafs/b", buildImage(t, 8, 5, false).fs())
		fuzzVFS.v = v
	})
	return fuzzVFS.v
}

// FuzzFUSERequest feeds raw FUSE request bytes, as a hostile virtio-fs
// guest could send them, through go-fuse's protocol server into the VFS.
// The input is a sequence of requests, each as long as its header says
// (clipped to what is left), so the fuzzer can chain lookups and reads.
// Any panic fails; a filesystem panic is re-raised past go-fuse's recovery.
func FuzzFUSERequest(f *testing.F) {
	img := uint64(1) << 56 // index 1: /rafs/a/lowerdir, rafs root ino 1
	f.Add(fstest.Concat(
		fstest.Request(fstest.OpLookup, 1, fstest.CString("rafs")),
		fstest.Request(fstest.OpLookup, 2, fstest.CString("a")),
		fstest.Request(fstest.OpGetattr, img|2, fstest.U32s(0, 0), fstest.U64s(0)),
		fstest.Request(fstest.OpOpen, img|3, fstest.U32s(0, 0)),
		fstest.Request(fstest.OpRead, img|3, fstest.ReadIn(0, 0, 4096)),
		fstest.Request(fstest.OpRead, img|5, fstest.ReadIn(0, 1<<40, 4096)),
		fstest.Request(fstest.OpRelease, img|3, fstest.U64s(0), fstest.U32s(0, 0), fstest.U64s(0)),
	))
	f.Add(fstest.Concat(
		fstest.Request(fstest.OpOpendir, 1, fstest.U32s(0, 0)),
		fstest.Request(fstest.OpReaddirplus, 1, fstest.ReadIn(0, 0, 4096)),
		fstest.Request(fstest.OpReaddir, 2, fstest.ReadIn(0, 1, 4096)),
		fstest.Request(fstest.OpReaddirplus, img|2, fstest.ReadIn(0, 0, 300)),
		fstest.Request(fstest.OpReaddir, img|2, fstest.ReadIn(0, 5, 4096)),
		fstest.Request(fstest.OpReleasedir, img|2, fstest.U64s(0), fstest.U32s(0, 0), fstest.U64s(0)),
	))
	f.Add(fstest.Concat(
		fstest.Request(fstest.OpGetxattr, img|3, fstest.U32s(0, 0), fstest.CString("user.k")),
		fstest.Request(fstest.OpGetxattr, img|3, fstest.U32s(1, 0), fstest.CString("user.k")),
		fstest.Request(fstest.OpListxattr, img|3, fstest.U32s(0, 0)),
		fstest.Request(fstest.OpListxattr, img|3, fstest.U32s(3, 0)),
		fstest.Request(fstest.OpReadlink, img|15),
		fstest.Request(fstest.OpStatfs, img|1),
		fstest.Request(fstest.OpAccess, img|3, fstest.U32s(7, 0)),
		fstest.Request(fstest.OpLseek, img|3, fstest.U64s(0, 10), fstest.U32s(3, 0)),
	))
	f.Add(fstest.Concat(
		fstest.Request(fstest.OpForget, img|3, fstest.U64s(5)),
		fstest.Request(fstest.OpBatchForget, 0, fstest.U32s(2, 0), fstest.U64s(img|3, 1, 1<<60, 9)),
		fstest.Request(fstest.OpInterrupt, 0, fstest.U64s(1)),
		fstest.Request(fstest.OpMkdir, 2, fstest.U32s(0o755, 0), fstest.CString("x")),
		fstest.Request(fstest.OpSetattr, img|3, make([]byte, 88)),
		fstest.Request(fstest.OpLookup, 1<<63, fstest.CString("..")),
		fstest.Request(fstest.OpLookup, 255<<56|1, fstest.CString("x")),
	))
	f.Add(fstest.Request(fstest.OpRead, img|3, fstest.ReadIn(0, ^uint64(0)-10, ^uint32(0))))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		v := fuzzTarget(t)
		ps := fuse.NewProtocolServer(v, &fuse.MountOptions{
			MaxWrite:     1 << 17,
			PanicHandler: func(r any) fuse.Status { panic(r) },
			Logger:       log.New(io.Discard, "", 0),
		})
		out := make([]byte, 1<<17+4096)
		// Negotiate first, as the kernel (or a guest) always does.
		if _, st := ps.HandleRequest([][]byte{fstest.InitRequest()}, [][]byte{out}); !st.Ok() {
			t.Fatalf("INIT: %v", st)
		}
		for _, r := range fstest.SplitRequests(data, 64) {
			// Split a request over two iovecs sometimes, as guest memory
			// regions can.
			in := [][]byte{r}
			if l := len(r); l > 48 && r[l-1]&1 == 1 {
				in = [][]byte{r[:l/2], r[l/2:]}
			}
			ps.HandleRequest(in, [][]byte{out})
		}
	})
}

// TestProtocolServerRead drives the VFS the way the virtio-fs transport
// does, with raw requests through go-fuse's protocol server, and checks
// the reply bytes.
func TestProtocolServerRead(t *testing.T) {
	v := vfs.New(vfs.Options{})
	img := buildImage(t, 11, 4, false)
	if _, err := v.Mount("/rafs/a", img.fs()); err != nil {
		t.Fatal(err)
	}
	ps := fuse.NewProtocolServer(v, &fuse.MountOptions{MaxWrite: 1 << 17, Logger: log.New(io.Discard, "", 0)})
	out := make([]byte, 1<<17+4096)
	call := func(req []byte) (int32, []byte) {
		n, st := ps.HandleRequest([][]byte{req}, [][]byte{out})
		if !st.Ok() || n < 16 {
			t.Fatalf("HandleRequest: %d, %v", n, st)
		}
		return int32(binary.LittleEndian.Uint32(out[4:])), out[16:n]
	}
	call(fstest.InitRequest())
	lookup := func(parent uint64, name string) uint64 {
		errno, body := call(fstest.Request(fstest.OpLookup, parent, fstest.CString(name)))
		if errno != 0 {
			t.Fatalf("lookup %q: errno %d", name, -errno)
		}
		return binary.LittleEndian.Uint64(body)
	}
	id := lookup(lookup(lookup(lookup(1, "rafs"), "a"), "etc"), "f003")
	if id>>56 != 1 {
		t.Errorf("node id %#x is not in mount index 1", id)
	}
	if errno, _ := call(fstest.Request(fstest.OpOpen, id, fstest.U32s(0, 0))); errno != 0 {
		t.Fatalf("open: errno %d", -errno)
	}
	errno, data := call(fstest.Request(fstest.OpRead, id, fstest.ReadIn(0, 100, 5000)))
	want := fstest.Bytes(11*1000+3, 3*3000)[100:5100]
	if errno != 0 || !bytes.Equal(data, want) {
		t.Errorf("read: errno %d, %d bytes, content equal %v", -errno, len(data), bytes.Equal(data, want))
	}
	if errno, _ := call(fstest.Request(fstest.OpLookup, 1, fstest.CString("missing"))); errno != -int32(syscall.ENOENT) {
		t.Errorf("lookup of a missing name: errno %d", -errno)
	}
}

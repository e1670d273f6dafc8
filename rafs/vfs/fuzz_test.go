package vfs_test

import (
	"encoding/binary"
	"io"
	"log"
	"sync"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/rafs/vfs"
)

// FUSE opcodes and sizes used to build seed requests (linux/fuse.h).
const (
	opLookup      = 1
	opForget      = 2
	opGetattr     = 3
	opSetattr     = 4
	opReadlink    = 5
	opMkdir       = 9
	opOpen        = 14
	opRead        = 15
	opStatfs      = 17
	opRelease     = 18
	opGetxattr    = 22
	opListxattr   = 23
	opInit        = 26
	opOpendir     = 27
	opReaddir     = 28
	opReleasedir  = 29
	opAccess      = 34
	opInterrupt   = 36
	opBatchForget = 42
	opReaddirplus = 44
	opLseek       = 46
	inHeaderSize  = 40
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

// req builds one FUSE request: header, fixed part, then payload.
func req(op uint32, node uint64, body ...[]byte) []byte {
	n := inHeaderSize
	for _, b := range body {
		n += len(b)
	}
	p := make([]byte, inHeaderSize, n)
	le := binary.LittleEndian
	le.PutUint32(p[0:], uint32(n))
	le.PutUint32(p[4:], op)
	le.PutUint64(p[8:], 1)
	le.PutUint64(p[16:], node)
	for _, b := range body {
		p = append(p, b...)
	}
	return p
}

func u32s(v ...uint32) []byte {
	p := make([]byte, 4*len(v))
	for k, x := range v {
		binary.LittleEndian.PutUint32(p[4*k:], x)
	}
	return p
}

func u64s(v ...uint64) []byte {
	p := make([]byte, 8*len(v))
	for k, x := range v {
		binary.LittleEndian.PutUint64(p[8*k:], x)
	}
	return p
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func concat(reqs ...[]byte) []byte {
	var out []byte
	for _, r := range reqs {
		out = append(out, r...)
	}
	return out
}

// readIn is fuse_read_in after the header: fh, offset, size, read_flags,
// lock_owner, flags, padding.
func readIn(fh, off uint64, size uint32) []byte {
	return concat(u64s(fh, off), u32s(size, 0), u64s(0), u32s(0, 0))
}

// FuzzFUSERequest feeds raw FUSE request bytes, as a hostile virtio-fs
// guest could send them, through go-fuse's protocol server into the VFS.
// The input is a sequence of requests, each as long as its header says
// (clipped to what is left), so the fuzzer can chain lookups and reads.
// Any panic fails; a filesystem panic is re-raised past go-fuse's recovery.
func FuzzFUSERequest(f *testing.F) {
	img := uint64(1) << 56 // index 1: /rafs/a/lowerdir, rafs root ino 1
	f.Add(concat(
		req(opLookup, 1, cstr("rafs")),
		req(opLookup, 2, cstr("a")),
		req(opGetattr, img|2, u32s(0, 0), u64s(0)),
		req(opOpen, img|3, u32s(0, 0)),
		req(opRead, img|3, readIn(0, 0, 4096)),
		req(opRead, img|5, readIn(0, 1<<40, 4096)),
		req(opRelease, img|3, u64s(0), u32s(0, 0), u64s(0)),
	))
	f.Add(concat(
		req(opOpendir, 1, u32s(0, 0)),
		req(opReaddirplus, 1, readIn(0, 0, 4096)),
		req(opReaddir, 2, readIn(0, 1, 4096)),
		req(opReaddirplus, img|2, readIn(0, 0, 300)),
		req(opReaddir, img|2, readIn(0, 5, 4096)),
		req(opReleasedir, img|2, u64s(0), u32s(0, 0), u64s(0)),
	))
	f.Add(concat(
		req(opGetxattr, img|3, u32s(0, 0), cstr("user.k")),
		req(opGetxattr, img|3, u32s(1, 0), cstr("user.k")),
		req(opListxattr, img|3, u32s(0, 0)),
		req(opListxattr, img|3, u32s(3, 0)),
		req(opReadlink, img|15),
		req(opStatfs, img|1),
		req(opAccess, img|3, u32s(7, 0)),
		req(opLseek, img|3, u64s(0, 10), u32s(3, 0)),
	))
	f.Add(concat(
		req(opForget, img|3, u64s(5)),
		req(opBatchForget, 0, u32s(2, 0), u64s(img|3, 1, 1<<60, 9)),
		req(opInterrupt, 0, u64s(1)),
		req(opMkdir, 2, u32s(0o755, 0), cstr("x")),
		req(opSetattr, img|3, make([]byte, 88)),
		req(opLookup, 1<<63, cstr("..")),
		req(opLookup, 255<<56|1, cstr("x")),
	))
	f.Add(req(opRead, img|3, readIn(0, ^uint64(0)-10, ^uint32(0))))
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
		init := req(opInit, 0, u32s(7, 41, 1<<17, 0xffffffff, 0xffffffff), make([]byte, 44))
		if _, st := ps.HandleRequest([][]byte{init}, [][]byte{out}); !st.Ok() {
			t.Fatalf("INIT: %v", st)
		}
		for n := 0; len(data) > 0 && n < 64; n++ {
			l := len(data)
			if l >= 4 {
				if h := int(binary.LittleEndian.Uint32(data)); h > 0 && h < l {
					l = h
				}
			}
			// Split the request over two iovecs sometimes, as guest
			// memory regions can.
			in := [][]byte{data[:l]}
			if l > 48 && data[l-1]&1 == 1 {
				in = [][]byte{data[:l/2], data[l/2 : l]}
			}
			ps.HandleRequest(in, [][]byte{out})
			data = data[l:]
		}
	})
}

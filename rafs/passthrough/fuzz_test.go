package passthrough

import (
	"io"
	"log"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// bounded keeps a fuzzed guest from filling the disk: fallocate is
// limited to 1 MiB (writes are bounded by the request size already).
type bounded struct{ *FS }

func (b bounded) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	if in.Offset > 1<<20 || in.Length > 1<<20 {
		return fuse.Status(syscall.EFBIG)
	}
	return b.FS.Fallocate(cancel, in)
}

// FuzzPassthroughRequest sends raw FUSE request sequences, as a hostile
// virtio-fs guest could, to a passthrough of a fresh directory, and checks
// that nothing panics and nothing beside the shared directory changes.
func FuzzPassthroughRequest(f *testing.F) {
	r, c, u32, u64, s := fstest.Request, fstest.Concat, fstest.U32s, fstest.U64s, fstest.CString
	writeIn := func(fh, off uint64, data string) []byte {
		return c(u64(fh, off), u32(uint32(len(data)), 0), u64(0), u32(0, 0), []byte(data))
	}
	// Node ids are handed out in order from 2, handles from 1.
	f.Add(c(
		r(fstest.OpCreate, 1, u32(uint32(os.O_RDWR), 0o644, 0o22, 0), s("f")), // node 2, fh 1
		r(fstest.OpWrite, 2, writeIn(1, 0, "hello")),
		r(fstest.OpRead, 2, fstest.ReadIn(1, 0, 100)),
		r(fstest.OpSetxattr, 2, u32(2, 0), s("user.a"), []byte("v")),
		r(fstest.OpListxattr, 2, u32(100, 0)),
		r(fstest.OpGetxattr, 2, u32(100, 0), s("user.a")),
		r(fstest.OpFallocate, 2, u64(1, 0, 4096), u32(0, 0)),
		r(fstest.OpLseek, 2, u64(1, 0), u32(3, 0)),
		r(fstest.OpFsync, 2, u64(1), u32(1, 0)),
		r(fstest.OpRelease, 2, u64(1), u32(0, 0), u64(0)),
	))
	f.Add(c(
		r(fstest.OpMkdir, 1, u32(0o755, 0), s("d")), // node 2
		r(fstest.OpSymlink, 1, s("s"), s("/")),      // node 3
		r(fstest.OpSymlink, 2, s("up"), s("../..")), // node 4
		r(fstest.OpLookup, 3, s("etc")),
		r(fstest.OpLookup, 1, s("..")),
		r(fstest.OpCreate, 3, u32(uint32(os.O_RDWR), 0o644, 0, 0), s("x")),
		r(fstest.OpRename, 1, u64(2), s("s"), s("moved")),
		r(fstest.OpRename2, 1, u64(1), u32(2, 0), s("d"), s("moved")),
		r(fstest.OpLink, 1, u64(3), s("hard")),
		r(fstest.OpReadlink, 3),
		r(fstest.OpOpendir, 1, u32(0, 0)), // fh 1
		r(fstest.OpReaddirplus, 1, fstest.ReadIn(1, 0, 4096)),
		r(fstest.OpReaddir, 1, fstest.ReadIn(1, 2, 4096)),
		r(fstest.OpReleasedir, 1, u64(1), u32(0, 0), u64(0)),
	))
	f.Add(c(
		r(fstest.OpMknod, 1, u32(syscall.S_IFBLK|0o600, 8<<8, 0, 0), s("disk")), // node 2
		r(fstest.OpOpen, 2, u32(uint32(os.O_RDONLY), 0)),
		r(fstest.OpGetxattr, 2, u32(100, 0), s("user.a")),
		r(fstest.OpSetattr, 2, make([]byte, 88)),
		r(fstest.OpAccess, 2, u32(7, 0)),
		r(fstest.OpStatfs, 1),
		r(fstest.OpUnlink, 1, s("disk")),
		r(fstest.OpRmdir, 1, s("nope")),
		r(fstest.OpForget, 2, u64(1)),
		r(fstest.OpBatchForget, 0, u32(2, 0), u64(2, 1, 1, 1)),
	))
	f.Fuzz(fuzzPassthrough)
}

// fuzzPassthrough runs one input against a fresh directory.
func fuzzPassthrough(t *testing.T, data []byte) {
	fstest.RequireRoot(t)
	top := t.TempDir()
	shared, outside := filepath.Join(top, "shared"), filepath.Join(top, "outside")
	os.Mkdir(shared, 0o755)
	os.Mkdir(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "secret"), []byte("secret"), 0o600)
	pt, err := New(shared, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pt.Close()
	ps := fuse.NewProtocolServer(bounded{pt}, &fuse.MountOptions{
		MaxWrite:     1 << 17,
		PanicHandler: func(r any) fuse.Status { panic(r) },
		Logger:       log.New(io.Discard, "", 0),
	})
	out := make([]byte, 1<<17+4096)
	if _, st := ps.HandleRequest([][]byte{fstest.InitRequest()}, [][]byte{out}); !st.Ok() {
		t.Fatalf("INIT: %v", st)
	}
	for _, req := range fstest.SplitRequests(data, 64) {
		ps.HandleRequest([][]byte{req}, [][]byte{out})
	}
	ents, _ := os.ReadDir(top)
	if len(ents) != 2 {
		t.Fatalf("entries beside the shared directory: %v", ents)
	}
	checkOutsideUntouched(t, outside)
	if st := mustStat(t, top); st.Mode&0o7777 != 0o700 && st.Mode&0o7777 != 0o755 {
		t.Fatalf("parent directory mode changed to %o", st.Mode)
	}
}

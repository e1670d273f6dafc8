package blobcache

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// syncFailNode is a loopback FUSE node whose open files fail fsync with
// EIO while fail is set: a disk whose writeback fails.
type syncFailNode struct {
	fs.LoopbackNode
	fail *atomic.Bool
}

type syncFailFile struct {
	*fs.LoopbackFile
	fail *atomic.Bool
}

func (f *syncFailFile) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if f.fail.Load() {
		return syscall.EIO
	}
	return f.LoopbackFile.Fsync(ctx, flags)
}

func (n *syncFailNode) wrap(fh fs.FileHandle) fs.FileHandle {
	if lf, ok := fh.(*fs.LoopbackFile); ok {
		return &syncFailFile{LoopbackFile: lf, fail: n.fail}
	}
	return fh
}

func (n *syncFailNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	return n.wrap(fh), fl, errno
}

func (n *syncFailNode) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	in, fh, fl, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	return in, n.wrap(fh), fl, errno
}

// mountSyncFail mounts a loopback of a fresh directory whose fsync fails
// while the returned switch is set.
func mountSyncFail(t *testing.T) (string, *atomic.Bool) {
	t.Helper()
	fstest.RequireRoot(t)
	backing, mnt := t.TempDir(), t.TempDir()
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		t.Fatal(err)
	}
	fail := new(atomic.Bool)
	root := &fs.LoopbackRoot{Path: backing, Dev: st.Dev}
	root.NewNode = func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
		return &syncFailNode{LoopbackNode: fs.LoopbackNode{RootData: r}, fail: fail}
	}
	root.RootNode = root.NewNode(root, nil, "", &st)
	srv, err := fs.Mount(mnt, root.RootNode, &fs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	return mnt, fail
}

// TestFailedFlushForgetsChunks: when fdatasync of a cache file fails, the
// chunks written since the last flush may never reach the disk (Linux
// reports a writeback error once, then fsync succeeds): they must stop
// counting as cached, stay unmarked in the map file, and be cacheable
// again once the disk works.
func TestFailedFlushForgetsChunks(t *testing.T) {
	dir, fail := mountSyncFail(t)
	s, err := Open(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	b := testBlob(strings.Repeat("c", 64), 4, 4*4096)
	cb, err := s.Blob(b, false)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{9}, 4096)
	if err := cb.WriteChunks([]Write{{Index: 0, Off: 0, Data: data}}); err != nil {
		t.Fatal(err)
	}
	if err := cb.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := cb.WriteChunks([]Write{{Index: 1, Off: 4096, Data: data}, {Index: 2, Off: 2 * 4096, Data: data}}); err != nil {
		t.Fatal(err)
	}
	fail.Store(true)
	if err := cb.Flush(); err == nil || !strings.Contains(err.Error(), "fdatasync") {
		t.Fatalf("Flush with fsync failing: %v, want an fdatasync error", err)
	}
	fail.Store(false)
	// A retry has nothing left to mark: the failed chunks are gone.
	if err := cb.Flush(); err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{true, false, false, false} {
		if got := cb.Has(uint32(i)); got != want {
			t.Errorf("after the failed flush: Has(%d) = %v, want %v", i, got, want)
		}
	}
	if r, n := cb.Ready(); r != 1 || n != 4 {
		t.Errorf("Ready = %d/%d, want 1/4", r, n)
	}
	// Cached again once the disk works, and durable.
	if err := cb.WriteChunks([]Write{{Index: 1, Off: 4096, Data: data}}); err != nil {
		t.Fatal(err)
	}
	if err := cb.Flush(); err != nil {
		t.Fatal(err)
	}
	cmap, err := os.ReadFile(filepath.Join(dir, b.ID+MapSuffix))
	if err != nil {
		t.Fatal(err)
	}
	if got := cmap[mapHeader] & (mask(0) | mask(1) | mask(2) | mask(3)); got != mask(0)|mask(1) {
		t.Errorf("map file byte %08b, want chunks 0 and 1 durable, 2 never", cmap[mapHeader])
	}
}

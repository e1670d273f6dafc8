package vfs_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/passthrough"
	"github.com/rafsd/rafsd/rafs/vfs"
)

type image struct {
	img *rafs.Image
	cr  rafs.ChunkReader
}

func (i image) fs() *fs.FS {
	return fs.New(i.img, i.cr, fs.Options{EntryTimeout: time.Second, AttrTimeout: time.Second})
}

func buildImage(t testing.TB, seed int64, files int, xattrs bool) image {
	t.Helper()
	b := fstest.NewBuilder(16<<10, codec.Zstd, codec.Blake3)
	b.Dir("/etc", 0o755)
	for k := range files {
		f := b.File(fmt.Sprintf("/etc/f%03d", k), 0o644, fstest.Bytes(seed*1000+int64(k), k*3000))
		if xattrs && k%3 == 0 {
			f.Xattrs = []rafs.Xattr{{Name: "user.k", Value: []byte(fmt.Sprint(k))}}
		}
	}
	b.Symlink("/etc/link", "f001")
	b.File(fmt.Sprintf("/only-in-%d", seed), 0o600, []byte("marker"))
	img, blob, err := b.Image()
	if err != nil {
		t.Fatal(err)
	}
	return image{img, fstest.MemReader(map[string][]byte{img.Blobs[0].ID: blob})}
}

func names(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("readdir %s: %v", dir, err)
	}
	var n []string
	for _, e := range ents {
		n = append(n, e.Name())
	}
	sort.Strings(n)
	return strings.Join(n, " ")
}

// TestTwoImagesAndPassthrough mounts two images and a passthrough
// directory under one FUSE mount, unmounts one image while the other is
// read, and mounts it again.
func TestTwoImagesAndPassthrough(t *testing.T) {
	a, b := buildImage(t, 1, 40, true), buildImage(t, 2, 25, false)
	shared := t.TempDir()
	os.WriteFile(shared+"/host", []byte("from the host"), 0o644)
	pt, err := passthrough.New(shared, passthrough.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pt.Close() })

	v := vfs.New(vfs.Options{EntryTimeout: time.Second, AttrTimeout: time.Second})
	ia, err := v.Mount("/rafs/a/lowerdir", a.fs())
	if err != nil {
		t.Fatal(err)
	}
	ib, err := v.Mount("/rafs/b/lowerdir", b.fs())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Mount("/containers/shared", pt); err != nil {
		t.Fatal(err)
	}
	mnt := fstest.Mount(t, v, nil)

	if got := names(t, mnt); got != "containers rafs" {
		t.Errorf("root lists %q", got)
	}
	if got := names(t, mnt+"/rafs"); got != "a b" {
		t.Errorf("/rafs lists %q", got)
	}
	fstest.CheckMounted(t, a.img, a.cr, mnt+"/rafs/a/lowerdir", 1)
	fstest.CheckMounted(t, b.img, b.cr, mnt+"/rafs/b/lowerdir", 2)
	// b has no xattrs; inside a VFS that must not switch xattrs off for a.
	if _, err := unix.Lgetxattr(mnt+"/rafs/b/lowerdir/etc/f000", "user.k", nil); !errors.Is(err, unix.ENODATA) {
		t.Errorf("getxattr on the image without xattrs: %v, want ENODATA", err)
	}
	fstest.CheckMounted(t, a.img, a.cr, mnt+"/rafs/a/lowerdir", 3)

	// Passthrough is writable through the VFS.
	if err := os.WriteFile(mnt+"/containers/shared/new", []byte("written"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(shared + "/new"); string(got) != "written" {
		t.Errorf("write through the vfs landed as %q", got)
	}
	if err := os.Rename(mnt+"/containers/shared/new", mnt+"/rafs/a/lowerdir/new"); !errors.Is(err, syscall.EXDEV) {
		t.Errorf("rename across filesystems: %v, want EXDEV", err)
	}
	if err := os.Mkdir(mnt+"/rafs/c", 0o755); !errors.Is(err, syscall.EROFS) {
		t.Errorf("mkdir in a pseudo directory: %v, want EROFS", err)
	}

	// Keep an open file on b, then unmount b while a is being read.
	open, err := os.Open(mnt + "/rafs/b/lowerdir/etc/f010")
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	stop := make(chan struct{})
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		want, _ := os.ReadFile(mnt + "/rafs/a/lowerdir/etc/f039")
		for {
			select {
			case <-stop:
				return
			default:
			}
			got, err := os.ReadFile(mnt + "/rafs/a/lowerdir/etc/f039")
			if err != nil || !bytes.Equal(got, want) {
				errs <- fmt.Errorf("reading a during umount of b: %v", err)
				return
			}
		}
	}()
	time.Sleep(50 * time.Millisecond)
	if err := v.Umount("/rafs/b/lowerdir"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(mnt + "/rafs/b/lowerdir/etc/f000"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat under an unmounted image: %v, want ENOENT", err)
	}
	if got := names(t, mnt+"/rafs"); got != "a" {
		t.Errorf("/rafs lists %q after umount of b", got)
	}
	// Drop what the page cache holds of it: the read must then reach the
	// VFS and fail cleanly.
	if err := unix.Fadvise(int(open.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 100)
	if _, err := open.ReadAt(p, 20000); err == nil {
		t.Errorf("read of an open file of an unmounted image succeeded")
	} else if !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ENOENT) {
		t.Errorf("read of an open file of an unmounted image: %v, want EIO", err)
	}
	time.Sleep(50 * time.Millisecond)
	close(stop)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}

	// Mount b again: the same path works, with a new index.
	ib2, err := v.Mount("/rafs/b/lowerdir", b.fs())
	if err != nil {
		t.Fatal(err)
	}
	if ib2 == ib {
		t.Errorf("index %d reused at once; it should come back last", ib)
	}
	fstest.CheckMounted(t, b.img, b.cr, mnt+"/rafs/b/lowerdir", 4)
	if got := names(t, mnt+"/rafs"); got != "a b" {
		t.Errorf("/rafs lists %q after remount", got)
	}
	mounts := v.Mounts()
	if len(mounts) != 3 || mounts[0].Index != ia || mounts[0].Path != "/rafs/a/lowerdir" {
		t.Errorf("Mounts() = %+v", mounts)
	}
}

func TestSingleMount(t *testing.T) {
	a := buildImage(t, 3, 30, false)
	v := vfs.New(vfs.Options{})
	if _, err := v.Mount("/", a.fs()); err != nil {
		t.Fatal(err)
	}
	mnt := fstest.Mount(t, v, nil)
	fstest.CheckMounted(t, a.img, a.cr, mnt, 5)
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil || st.Ino != 1 {
		t.Errorf("root inode %d, %v; want 1", st.Ino, err)
	}
	// Alone at /, an image without xattrs may switch them off for the mount.
	if _, err := unix.Lgetxattr(mnt+"/etc/f001", "security.selinux", nil); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("getxattr: %v, want EOPNOTSUPP", err)
	}
	if _, err := v.Mount("/other", a.fs()); !errors.Is(err, vfs.ErrBusy) {
		t.Errorf("mount beside /: %v, want ErrBusy", err)
	}
}

func TestMountErrors(t *testing.T) {
	a := buildImage(t, 4, 1, false)
	v := vfs.New(vfs.Options{})
	if _, err := v.Mount("/x/y", a.fs()); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		path string
		want error
	}{
		{"/x/y", vfs.ErrBusy},
		{"/x/y/", vfs.ErrBusy},
		{"/x/y/z", vfs.ErrBusy},
		{"/x", vfs.ErrBusy},
		{"/", vfs.ErrBusy},
		{"relative", vfs.ErrBadPath},
		{"", vfs.ErrBadPath},
		{"/" + strings.Repeat("n", 256), vfs.ErrBadPath},
	}
	for _, c := range cases {
		if _, err := v.Mount(c.path, a.fs()); !errors.Is(err, c.want) {
			t.Errorf("Mount(%q): %v, want %v", c.path, err, c.want)
		}
	}
	if err := v.Umount("/x"); !errors.Is(err, vfs.ErrNotFound) {
		t.Errorf("Umount of a pseudo dir: %v", err)
	}
	if err := v.Umount("/nope/x"); !errors.Is(err, vfs.ErrNotFound) {
		t.Errorf("Umount of nothing: %v", err)
	}
	if err := v.MountAt(0, "/z", a.fs()); err == nil {
		t.Error("MountAt(0) succeeded")
	}
	idx := v.Mounts()[0].Index
	if err := v.MountAt(idx, "/z", a.fs()); !errors.Is(err, vfs.ErrBusy) {
		t.Errorf("MountAt a used index: %v", err)
	}
	for k := 0; k < vfs.MaxMounts-1; k++ {
		if _, err := v.Mount(fmt.Sprintf("/m/%d", k), a.fs()); err != nil {
			t.Fatalf("mount %d: %v", k, err)
		}
	}
	if _, err := v.Mount("/full", a.fs()); !errors.Is(err, vfs.ErrFull) {
		t.Errorf("mount past %d: %v, want ErrFull", vfs.MaxMounts, err)
	}
}

// TestTakeoverNodeIDs: a second VFS built from Mounts() with MountAt
// answers the node ids the first one handed out.
func TestTakeoverNodeIDs(t *testing.T) {
	a, b := buildImage(t, 5, 5, false), buildImage(t, 6, 5, false)
	v1 := vfs.New(vfs.Options{})
	v1.Mount("/rafs/a", a.fs())
	v1.Mount("/rafs/tmp", a.fs())
	v1.Mount("/rafs/b", b.fs())
	v1.Umount("/rafs/tmp")
	v2 := vfs.New(vfs.Options{})
	for _, m := range v1.Mounts() {
		img := a
		if strings.HasSuffix(m.Path, "/b") {
			img = b
		}
		if err := v2.MountAt(m.Index, m.Path, img.fs()); err != nil {
			t.Fatal(err)
		}
	}
	never := make(chan struct{})
	walk := func(v *vfs.VFS, path ...string) (uint64, fuse.Attr) {
		id := uint64(1)
		var out fuse.EntryOut
		for _, n := range path {
			if st := v.Lookup(never, &fuse.InHeader{NodeId: id}, n, &out); !st.Ok() {
				t.Fatalf("lookup %v: %v", path, st)
			}
			id = out.NodeId
		}
		return id, out.Attr
	}
	for _, p := range [][]string{{"rafs"}, {"rafs", "a", "etc", "f003"}, {"rafs", "b", "etc", "link"}, {"rafs", "b"}} {
		id1, at1 := walk(v1, p...)
		id2, at2 := walk(v2, p...)
		if id1 != id2 || at1 != at2 {
			t.Errorf("%v: node %d / %d after takeover", p, id1, id2)
		}
		// The old id works on the new VFS directly.
		var ao fuse.AttrOut
		if st := v2.GetAttr(never, &fuse.GetAttrIn{InHeader: fuse.InHeader{NodeId: id1}}, &ao); !st.Ok() || ao.Ino != id1 {
			t.Errorf("%v: getattr of old id %d: %v ino %d", p, id1, st, ao.Ino)
		}
	}
}

// TestReplace swaps an image for another at the same path while the
// mount is served: the path never disappears and now shows the new image.
func TestReplace(t *testing.T) {
	a, b := buildImage(t, 9, 10, false), buildImage(t, 10, 12, false)
	for _, path := range []string{"/rafs/x/lowerdir", "/"} {
		v := vfs.New(vfs.Options{})
		idx, err := v.Mount(path, a.fs())
		if err != nil {
			t.Fatal(err)
		}
		mnt := fstest.Mount(t, v, nil)
		root := strings.TrimSuffix(mnt+path, "/")
		fstest.CheckMounted(t, a.img, a.cr, root, 1)
		if _, err := v.Replace(path, b.fs()); err != nil {
			t.Fatal(err)
		}
		if _, idx2, ok := v.Get(path); !ok || idx2 != idx {
			t.Fatalf("index after replace: %d, %v; want %d", idx2, ok, idx)
		}
		if _, err := os.Stat(root + "/only-in-10"); err != nil {
			t.Errorf("new image's file after replace: %v", err)
		}
		if _, err := v.Replace("/nothing/here", b.fs()); !errors.Is(err, vfs.ErrNotFound) {
			t.Errorf("replace of nothing: %v", err)
		}
	}
}

// TestPassthroughInVFS: a passthrough directory inside the VFS gets the
// FUSE server, so kernel passthrough works there too.
func TestPassthroughInVFS(t *testing.T) {
	shared := t.TempDir()
	data := fstest.Bytes(5, 1<<20)
	os.WriteFile(shared+"/f", data, 0o644)
	fstest.RequireRoot(t)
	pt, err := passthrough.New(shared, passthrough.Options{KernelPassthrough: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pt.Close() })
	v := vfs.New(vfs.Options{})
	mnt := fstest.Mount(t, v, nil)
	// Mounted after Init: the VFS must still hand over the server.
	c := &countReads{FS: pt}
	if _, err := v.Mount("/shared", c); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(mnt + "/shared/f")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := io.ReadAll(f)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %d bytes, %v", len(got), err)
	}
	if n := c.reads.Load(); n != 0 {
		t.Errorf("%d READ requests reached the passthrough; kernel passthrough is off", n)
	}
}

type countReads struct {
	*passthrough.FS
	reads atomic.Int64
}

func (c *countReads) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	c.reads.Add(1)
	return c.FS.Read(cancel, in, buf)
}

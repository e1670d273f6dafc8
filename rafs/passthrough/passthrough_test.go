package passthrough

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

func newFS(t *testing.T, dir string) *FS {
	t.Helper()
	fstest.RequireRoot(t)
	f, err := New(dir, Options{EntryTimeout: time.Second, AttrTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func mustStat(t *testing.T, p string) *unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// TestReadWrite drives every modifying operation through a real FUSE
// mount and checks the result on the host directory.
func TestReadWrite(t *testing.T) {
	src := t.TempDir()
	if err := os.WriteFile(src+"/owned", []byte("hello"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(src+"/owned", 1000, 1001); err != nil {
		t.Fatal(err)
	}
	mnt := fstest.Mount(t, newFS(t, src), nil)

	st := mustStat(t, mnt+"/owned")
	if st.Uid != 1000 || st.Gid != 1001 || st.Mode != syscall.S_IFREG|0o640 || st.Size != 5 {
		t.Errorf("existing file: uid %d gid %d mode %o size %d", st.Uid, st.Gid, st.Mode, st.Size)
	}
	steps := []struct {
		name  string
		do    func() error
		check func() error
	}{
		{"create+write", func() error { return os.WriteFile(mnt+"/new", []byte("data"), 0o600) }, func() error {
			b, err := os.ReadFile(src + "/new")
			if err != nil || string(b) != "data" {
				return errors.New("content on host: " + string(b))
			}
			if st := mustStat(t, src+"/new"); st.Mode != syscall.S_IFREG|0o600 {
				return errors.New("mode on host")
			}
			return nil
		}},
		{"append", func() error {
			f, err := os.OpenFile(mnt+"/new", os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err = f.Write([]byte("+more")); err != nil {
				return err
			}
			return f.Sync()
		}, func() error {
			if b, _ := os.ReadFile(src + "/new"); string(b) != "data+more" {
				return errors.New("after append: " + string(b))
			}
			return nil
		}},
		{"truncate", func() error { return os.Truncate(mnt+"/new", 2) }, func() error {
			if b, _ := os.ReadFile(src + "/new"); string(b) != "da" {
				return errors.New("after truncate: " + string(b))
			}
			return nil
		}},
		{"mkdir", func() error { return os.Mkdir(mnt+"/dir", 0o751) }, func() error {
			if st := mustStat(t, src+"/dir"); st.Mode != syscall.S_IFDIR|0o751 {
				return errors.New("mkdir mode")
			}
			return nil
		}},
		{"rename", func() error { return os.Rename(mnt+"/new", mnt+"/dir/moved") }, func() error {
			_, err := os.Stat(src + "/dir/moved")
			return err
		}},
		{"link", func() error { return os.Link(mnt+"/dir/moved", mnt+"/hard") }, func() error {
			if st := mustStat(t, src+"/hard"); st.Nlink != 2 {
				return errors.New("nlink after link")
			}
			return nil
		}},
		{"symlink", func() error { return os.Symlink("/etc/passwd", mnt+"/sym") }, func() error {
			if s, err := os.Readlink(src + "/sym"); err != nil || s != "/etc/passwd" {
				return errors.New("symlink target on host: " + s)
			}
			if s, err := os.Readlink(mnt + "/sym"); err != nil || s != "/etc/passwd" {
				return errors.New("readlink through mount: " + s)
			}
			return nil
		}},
		{"chmod", func() error { return unix.Chmod(mnt+"/hard", 0o4755) }, func() error {
			if st := mustStat(t, src+"/hard"); st.Mode&0o7777 != 0o4755 {
				return fmt.Errorf("chmod on host: %o", st.Mode)
			}
			return nil
		}},
		{"chown", func() error { return os.Lchown(mnt+"/hard", 1234, 5678) }, func() error {
			if st := mustStat(t, src+"/hard"); st.Uid != 1234 || st.Gid != 5678 {
				return errors.New("chown on host")
			}
			return nil
		}},
		{"lchown symlink", func() error { return os.Lchown(mnt+"/sym", 77, 78) }, func() error {
			if st := mustStat(t, src+"/sym"); st.Uid != 77 || st.Gid != 78 {
				return errors.New("lchown on host")
			}
			if st := mustStat(t, "/etc/passwd"); st.Uid == 77 {
				return errors.New("lchown followed the symlink")
			}
			return nil
		}},
		{"utimes", func() error {
			return os.Chtimes(mnt+"/hard", time.Unix(1000, 5), time.Unix(2000, 7))
		}, func() error {
			if st := mustStat(t, src+"/hard"); st.Mtim.Sec != 2000 || st.Mtim.Nsec != 7 || st.Atim.Sec != 1000 {
				return errors.New("times on host")
			}
			return nil
		}},
		{"setxattr", func() error { return unix.Setxattr(mnt+"/hard", "user.k", []byte("v1"), 0) }, func() error {
			v := make([]byte, 16)
			n, err := unix.Getxattr(src+"/hard", "user.k", v)
			if err != nil || string(v[:n]) != "v1" {
				return errors.New("xattr on host")
			}
			n, err = unix.Getxattr(mnt+"/hard", "user.k", v)
			if err != nil || string(v[:n]) != "v1" {
				return errors.New("getxattr through mount")
			}
			n, err = unix.Listxattr(mnt+"/hard", v)
			if err != nil || !bytes.Contains(v[:n], []byte("user.k\x00")) {
				return errors.New("listxattr through mount")
			}
			return nil
		}},
		{"removexattr", func() error { return unix.Removexattr(mnt+"/hard", "user.k") }, func() error {
			if _, err := unix.Getxattr(src+"/hard", "user.k", nil); !errors.Is(err, unix.ENODATA) {
				return errors.New("xattr still on host")
			}
			return nil
		}},
		{"mkfifo", func() error { return unix.Mkfifo(mnt+"/fifo", 0o640) }, func() error {
			if st := mustStat(t, src+"/fifo"); st.Mode != syscall.S_IFIFO|0o640 {
				return errors.New("fifo mode on host")
			}
			return nil
		}},
		{"unlink", func() error { return os.Remove(mnt + "/hard") }, func() error {
			if _, err := os.Lstat(src + "/hard"); !os.IsNotExist(err) {
				return errors.New("still on host")
			}
			return nil
		}},
		{"rmdir non-empty", func() error {
			if err := unix.Rmdir(mnt + "/dir"); !errors.Is(err, unix.ENOTEMPTY) {
				return errors.New("rmdir of a non-empty dir: " + err.Error())
			}
			return nil
		}, func() error { return nil }},
		{"rmdir", func() error {
			if err := os.Remove(mnt + "/dir/moved"); err != nil {
				return err
			}
			return os.Remove(mnt + "/dir")
		}, func() error {
			if _, err := os.Lstat(src + "/dir"); !os.IsNotExist(err) {
				return errors.New("dir still on host")
			}
			return nil
		}},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if err := s.check(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
	}
	// A directory bigger than one READDIR(PLUS) reply lists completely.
	os.Mkdir(src+"/big", 0o755)
	for k := range 600 {
		os.WriteFile(fmt.Sprintf("%s/big/a-rather-long-file-name-%04d", src, k), nil, 0o644)
	}
	if big, err := os.ReadDir(mnt + "/big"); err != nil || len(big) != 600 {
		t.Errorf("listing 600 files: %d, %v", len(big), err)
	}
	os.RemoveAll(src + "/big")
	ents, err := os.ReadDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	want, _ := os.ReadDir(src)
	if len(names) != len(want) {
		t.Errorf("readdir through mount %q, host has %d", names, len(want))
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(mnt, &sfs); err != nil || sfs.Bsize == 0 {
		t.Errorf("statfs: %v", err)
	}
}

func hdr(ino uint64) *fuse.InHeader { return &fuse.InHeader{NodeId: ino} }

// TestEscapes sends hostile names and node ids straight to the
// filesystem, as a hostile virtio-fs guest could: nothing outside the
// shared directory may be read, created, changed or reported.
func TestEscapes(t *testing.T) {
	top := t.TempDir()
	src, outside := top+"/shared", top+"/outside"
	for _, d := range []string{src, outside, src + "/sub"} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(outside+"/secret", []byte("secret"), 0o600)
	os.Symlink("/", src+"/toroot")
	os.Symlink(outside, src+"/abs")
	os.Symlink("../outside", src+"/rel")
	os.Symlink("../../outside/secret", src+"/sub/deep")
	f := newFS(t, src)
	never := make(chan struct{})

	lookup := func(parent uint64, name string) (uint64, fuse.Status) {
		var out fuse.EntryOut
		st := f.Lookup(never, hdr(parent), name, &out)
		return out.NodeId, st
	}
	sub, st := lookup(1, "sub")
	if !st.Ok() {
		t.Fatal(st)
	}
	names := []struct {
		parent uint64
		name   string
	}{
		{1, ".."}, {1, "."}, {sub, ".."}, {1, "../outside"}, {1, "sub/../../outside"},
		{1, "/etc"}, {1, ""}, {1, "abs/secret"}, {1, "toroot/etc"}, {1, "rel/secret"},
		{sub, "deep/x"}, {1, "a\x00b"},
	}
	for _, n := range names {
		if id, st := lookup(n.parent, n.name); st.Ok() {
			t.Errorf("lookup(%d, %q) = node %d, want an error", n.parent, n.name, id)
		}
	}
	// A symlink is a node of its own; no operation on it reaches its target.
	for _, l := range []string{"abs", "toroot", "rel"} {
		id, st := lookup(1, l)
		if !st.Ok() {
			t.Fatalf("lookup %s: %v", l, st)
		}
		var ao fuse.AttrOut
		if st := f.GetAttr(never, &fuse.GetAttrIn{InHeader: *hdr(id)}, &ao); !st.Ok() || ao.Mode&syscall.S_IFMT != syscall.S_IFLNK {
			t.Errorf("%s: getattr %v mode %o, want the symlink itself", l, st, ao.Mode)
		}
		var oo fuse.OpenOut
		if st := f.Open(never, &fuse.OpenIn{InHeader: *hdr(id)}, &oo); st.Ok() {
			t.Errorf("%s: open of a symlink node succeeded", l)
		}
		if st := f.OpenDir(never, &fuse.OpenIn{InHeader: *hdr(id)}, &oo); st.Ok() {
			t.Errorf("%s: opendir of a symlink node succeeded", l)
		}
		var eo fuse.EntryOut
		var co fuse.CreateOut
		if st := f.Create(never, &fuse.CreateIn{InHeader: *hdr(id), Flags: uint32(os.O_WRONLY), Mode: 0o644}, "planted", &co); st.Ok() {
			t.Errorf("%s: create under a symlink node succeeded", l)
		}
		if st := f.Mkdir(never, &fuse.MkdirIn{InHeader: *hdr(id), Mode: 0o755}, "planted", &eo); st.Ok() {
			t.Errorf("%s: mkdir under a symlink node succeeded", l)
		}
		if st := f.Symlink(never, hdr(id), "x", "planted", &eo); st.Ok() {
			t.Errorf("%s: symlink under a symlink node succeeded", l)
		}
		if st := f.SetAttr(never, &fuse.SetAttrIn{SetAttrInCommon: fuse.SetAttrInCommon{InHeader: *hdr(id), Valid: fuse.FATTR_MODE, Mode: 0o777}}, &ao); st.Ok() {
			t.Errorf("%s: chmod of a symlink node succeeded", l)
		}
		if st := f.SetXAttr(never, &fuse.SetXAttrIn{InHeader: *hdr(id)}, "user.x", []byte("1")); st.Ok() {
			t.Errorf("%s: setxattr on a symlink node succeeded", l)
		}
	}
	// Creating through a name that is a symlink must not follow it.
	var co fuse.CreateOut
	if st := f.Create(never, &fuse.CreateIn{InHeader: *hdr(1), Flags: uint32(os.O_WRONLY | os.O_TRUNC), Mode: 0o644}, "rel", &co); st.Ok() {
		t.Error("create over a symlink succeeded")
	}
	// Renames cannot take names outside either.
	if st := f.Rename(never, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1}, "sub", "../escaped"); st.Ok() {
		t.Error("rename to ../escaped succeeded")
	}
	if st := f.Rename(never, &fuse.RenameIn{InHeader: *hdr(1), Newdir: 1}, "../outside", "stolen"); st.Ok() {
		t.Error("rename of ../outside succeeded")
	}
	if st := f.Link(never, &fuse.LinkIn{InHeader: *hdr(1), Oldnodeid: 1}, "../rootlink", &fuse.EntryOut{}); st.Ok() {
		t.Error("link to ../rootlink succeeded")
	}
	// Unknown node ids are refused, not guessed.
	if _, st := lookup(1<<40, "x"); st != fuse.ENOENT {
		t.Errorf("lookup in an unknown node: %v", st)
	}
	checkOutsideUntouched(t, outside)
	if fi, _ := os.Lstat(top + "/escaped"); fi != nil {
		t.Error("rename escaped the shared directory")
	}
}

func checkOutsideUntouched(t *testing.T, outside string) {
	t.Helper()
	ents, _ := os.ReadDir(outside)
	if len(ents) != 1 || ents[0].Name() != "secret" {
		t.Errorf("outside directory changed: %v", ents)
	}
	if st := mustStat(t, outside); st.Mode&0o777 != 0o755 {
		t.Errorf("outside directory mode changed to %o", st.Mode)
	}
	if st := mustStat(t, outside+"/secret"); st.Mode&0o777 != 0o600 || st.Size != 6 {
		t.Errorf("secret changed: mode %o size %d", st.Mode, st.Size)
	}
}

// TestRenameRace swaps a directory with a symlink to the outside on the
// host while the filesystem looks the name up and creates in it: a file
// may land in the directory, never outside.
func TestRenameRace(t *testing.T) {
	top := t.TempDir()
	src, outside := top+"/shared", top+"/outside"
	os.Mkdir(src, 0o755)
	os.Mkdir(outside, 0o755)
	os.WriteFile(outside+"/secret", []byte("secret"), 0o600)
	os.Mkdir(src+"/d", 0o755)
	os.Symlink(outside, src+"/swap")
	f := newFS(t, src)
	never := make(chan struct{})

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			unix.Renameat2(unix.AT_FDCWD, src+"/d", unix.AT_FDCWD, src+"/swap", unix.RENAME_EXCHANGE)
		}
	}()
	created := 0
	deadline := time.Now().Add(time.Second)
	for k := 0; time.Now().Before(deadline); k++ {
		var eo fuse.EntryOut
		if st := f.Lookup(never, hdr(1), "d", &eo); !st.Ok() {
			continue
		}
		var co fuse.CreateOut
		if st := f.Create(never, &fuse.CreateIn{InHeader: *hdr(eo.NodeId), Flags: uint32(os.O_WRONLY), Mode: 0o644}, "f", &co); st.Ok() {
			created++
			f.Release(never, &fuse.ReleaseIn{InHeader: *hdr(co.NodeId), Fh: co.Fh})
			f.Unlink(never, hdr(eo.NodeId), "f")
		}
		var mo fuse.EntryOut
		if st := f.Mkdir(never, &fuse.MkdirIn{InHeader: *hdr(eo.NodeId), Mode: 0o755}, "m", &mo); st.Ok() {
			f.Rmdir(never, hdr(eo.NodeId), "m")
		}
		f.Forget(eo.NodeId, 1)
	}
	close(stop)
	wg.Wait()
	if created == 0 {
		t.Error("the race never let a create through to the real directory; the test proves nothing")
	}
	checkOutsideUntouched(t, outside)
}

// TestForgetReleases checks that node descriptors are dropped when the
// kernel forgets them, so a long-running server does not leak fds.
func TestForgetReleases(t *testing.T) {
	src := t.TempDir()
	for _, n := range []string{"a", "b", "c"} {
		os.WriteFile(filepath.Join(src, n), nil, 0o644)
	}
	f := newFS(t, src)
	never := make(chan struct{})
	var ids []uint64
	for _, n := range []string{"a", "b", "c", "a"} {
		var eo fuse.EntryOut
		if st := f.Lookup(never, hdr(1), n, &eo); !st.Ok() {
			t.Fatal(st)
		}
		ids = append(ids, eo.NodeId)
	}
	if ids[0] != ids[3] {
		t.Errorf("the same file got two node ids: %d, %d", ids[0], ids[3])
	}
	if n := f.Nodes(); n != 4 {
		t.Fatalf("%d nodes held, want 4 (root + 3)", n)
	}
	f.Forget(ids[0], 1)
	if n := f.Nodes(); n != 4 {
		t.Errorf("forgot one of two lookups of a: %d nodes, want 4", n)
	}
	f.Forget(ids[0], 1)
	f.Forget(ids[1], 1)
	f.Forget(ids[2], 5)
	f.Forget(1, 100) // the root stays
	f.Forget(999, 1) // unknown ids are ignored
	if n := f.Nodes(); n != 1 {
		t.Errorf("%d nodes held after forgetting all, want 1", n)
	}
}

// TestCallerOwnership: files a non-root caller creates are owned by it,
// and, with default_permissions (the kernel checks mode bits; the server
// acts as root), it cannot write what it may not write.
func TestCallerOwnership(t *testing.T) {
	src := t.TempDir()
	os.Chmod(src, 0o777)
	os.WriteFile(src+"/rootonly", []byte("x"), 0o644)
	os.Mkdir(src+"/sgid", 0o2777)
	os.Chown(src+"/sgid", 0, 4321)
	unix.Chmod(src+"/sgid", 0o2777)
	mnt := fstest.Mount(t, newFS(t, src), &fuse.MountOptions{AllowOther: true, Options: []string{"default_permissions"}})
	os.Chmod(filepath.Dir(mnt), 0o755) // let uid 1000 reach the mount point
	as := func(script string) error {
		cmd := exec.Command("sh", "-c", script)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: 1000}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	if err := as("umask 022; echo hi > " + mnt + "/mine && mkdir " + mnt + "/d && ln -s x " + mnt + "/l && echo x > " + mnt + "/sgid/f"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		uid, gid uint32
		perm     uint32
	}{{"mine", 1000, 1000, 0o644}, {"d", 1000, 1000, 0o755}, {"l", 1000, 1000, 0o777}, {"sgid/f", 1000, 4321, 0o644}} {
		st := mustStat(t, src+"/"+c.name)
		if st.Uid != c.uid || st.Gid != c.gid || st.Mode&0o7777 != c.perm {
			t.Errorf("%s: uid %d gid %d perm %o, want %d %d %o", c.name, st.Uid, st.Gid, st.Mode&0o7777, c.uid, c.gid, c.perm)
		}
	}
	if err := as("echo y > " + mnt + "/rootonly"); err == nil {
		t.Error("uid 1000 wrote a root-owned 0644 file")
	}
	if b, _ := os.ReadFile(src + "/rootonly"); string(b) != "x" {
		t.Errorf("rootonly changed to %q", b)
	}
}

// counting counts the READ and WRITE requests that reach the server.
type counting struct {
	*FS
	reads, writes atomic.Int64
}

func (c *counting) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	c.reads.Add(1)
	return c.FS.Read(cancel, in, buf)
}

func (c *counting) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	c.writes.Add(1)
	return c.FS.Write(cancel, in, data)
}

// TestKernelPassthrough: with KernelPassthrough, file data moves between
// the kernel and the host file without READ or WRITE requests, and the
// results are the same.
func TestKernelPassthrough(t *testing.T) {
	src := t.TempDir()
	data := fstest.Bytes(3, 3<<20)
	os.WriteFile(src+"/big", data, 0o644)
	fstest.RequireRoot(t)
	pt, err := New(src, Options{KernelPassthrough: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pt.Close() })
	c := &counting{FS: pt}
	mnt := fstest.Mount(t, c, nil)
	got, err := os.ReadFile(mnt + "/big")
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through passthrough: %d bytes, %v", len(got), err)
	}
	if err := os.WriteFile(mnt+"/new", []byte("written via the kernel"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(src + "/new"); string(b) != "written via the kernel" {
		t.Errorf("host sees %q", b)
	}
	// Two opens of one inode share its backing file.
	f1, err1 := os.Open(mnt + "/big")
	f2, err2 := os.OpenFile(mnt+"/big", os.O_RDWR, 0)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if _, err := f2.WriteAt([]byte("XY"), 10); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 2)
	if _, err := f1.ReadAt(p, 10); err != nil || string(p) != "XY" {
		t.Errorf("read back %q, %v", p, err)
	}
	f1.Close()
	f2.Close()
	if r, w := c.reads.Load(), c.writes.Load(); r != 0 || w != 0 {
		t.Errorf("%d READ and %d WRITE requests reached the server; want none", r, w)
	}
}

package erofs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	goerofs "github.com/erofs/go-erofs"
	"golang.org/x/sys/unix"
)

// want is what a path of a test tree must look like from any reader.
type want struct {
	mode      uint32
	uid, gid  uint32
	mtime     uint64
	nsec      uint32
	nlink     uint32
	rdev      uint64
	target    string
	data      []byte
	xattrs    []Xattr
	entries   []string
	nid       uint64
	isDevData bool
}

// expect flattens a node tree into path -> want, with nlink resolved as
// Build resolves it.
func expect(t *testing.T, root *Node) map[string]*want {
	t.Helper()
	out := map[string]*want{}
	refs := map[*Node]uint32{}
	var count func(n *Node)
	count = func(n *Node) {
		for _, e := range n.Entries {
			refs[e.Node]++
			if refs[e.Node] == 1 && e.Node.IsDirNode() {
				count(e.Node)
			}
		}
	}
	count(root)
	var walk func(p string, n *Node)
	walk = func(p string, n *Node) {
		w := &want{mode: n.Mode, uid: n.UID, gid: n.GID, mtime: n.Mtime, nsec: n.MtimeNsec, rdev: n.Rdev,
			target: n.Target, data: n.Data, xattrs: n.Xattrs, nid: n.Nid}
		w.nlink = n.Nlink
		if w.nlink == 0 {
			if n.IsDirNode() {
				w.nlink = 2
				for _, e := range n.Entries {
					if e.Node.IsDirNode() {
						w.nlink++
					}
				}
			} else {
				w.nlink = max(refs[n], 1)
			}
		}
		out[p] = w
		prefix := strings.TrimSuffix(p, "/") + "/"
		for _, e := range n.Entries {
			w.entries = append(w.entries, e.Name)
			walk(prefix+e.Name, e.Node)
		}
		sort.Strings(w.entries)
	}
	walk("/", root)
	return out
}

const fixedMtime = 1700000000

func file(mode uint32, data []byte) *Node {
	return &Node{Mode: 0o100000 | mode, UID: 1000, GID: 1000, Mtime: fixedMtime, MtimeNsec: 123, Data: data}
}

func dir(ents ...Entry) *Node {
	return &Node{Mode: 0o040755, Mtime: fixedMtime, Entries: ents}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	return b
}

// testTree exercises every node type and layout the writer produces.
func testTree() *Node {
	hard := file(0o644, []byte("linked twice\n"))
	long := strings.Repeat("n", 255)
	var many []Entry
	for i := range 600 { // several dirent blocks
		many = append(many, Entry{Name: fmt.Sprintf("file-%04d-%s", i, strings.Repeat("x", i%40)), Node: file(0o600, []byte(fmt.Sprint(i)))})
	}
	xf := file(0o644, []byte("with xattrs"))
	xf.Xattrs = []Xattr{
		{Name: "user.comment", Value: []byte("hello")},
		{Name: "trusted.overlay.opaque", Value: []byte("y")},
		{Name: "security.capability", Value: []byte{1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
		{Name: "user.empty", Value: nil},
	}
	big := file(0o755, pattern(3*BlockSize+100, 1))
	exact := file(0o644, pattern(2*BlockSize, 2))
	bigOwner := file(0o640, []byte("owned by a large uid"))
	bigOwner.UID, bigOwner.GID = 100000, 200000
	sym := &Node{Mode: 0o120777, Target: "../target/of/link", Mtime: fixedMtime}
	longSym := &Node{Mode: 0o120777, Target: strings.Repeat("a/", 1500), Mtime: fixedMtime}
	chr := &Node{Mode: 0o020644, Rdev: unix.Mkdev(1, 3), Mtime: fixedMtime}
	blk := &Node{Mode: 0o060600, Rdev: unix.Mkdev(259, 70000), Mtime: fixedMtime}
	fifo := &Node{Mode: 0o010644, Mtime: fixedMtime}
	sock := &Node{Mode: 0o140755, Mtime: fixedMtime}
	deep := dir()
	cur := deep
	for i := range 30 {
		d := dir()
		cur.Entries = append(cur.Entries, Entry{Name: fmt.Sprintf("d%d", i), Node: d})
		cur = d
	}
	cur.Entries = append(cur.Entries, Entry{Name: "leaf", Node: hard})
	xd := dir(Entry{Name: "f", Node: file(0o644, nil)})
	xd.Xattrs = []Xattr{{Name: "system.posix_acl_default", Value: []byte{2, 0, 0, 0}}, {Name: "user.dir", Value: []byte("d")}}
	return dir(
		Entry{Name: "empty", Node: file(0o644, nil)},
		Entry{Name: "small", Node: file(0o644, []byte("small file\n"))},
		Entry{Name: "big", Node: big},
		Entry{Name: "exact", Node: exact},
		Entry{Name: "hard1", Node: hard},
		Entry{Name: "hard2", Node: hard},
		Entry{Name: "xattrs", Node: xf},
		Entry{Name: "owner", Node: bigOwner},
		Entry{Name: "symlink", Node: sym},
		Entry{Name: "longlink", Node: longSym},
		Entry{Name: "chr", Node: chr},
		Entry{Name: "blk", Node: blk},
		Entry{Name: "fifo", Node: fifo},
		Entry{Name: "sock", Node: sock},
		Entry{Name: "deep", Node: deep},
		Entry{Name: "many", Node: dir(many...)},
		Entry{Name: "xdir", Node: xd},
		Entry{Name: "ünïcødé-名前", Node: file(0o644, []byte("unicode"))},
		Entry{Name: long, Node: file(0o644, []byte("long name"))},
		Entry{Name: "-before-dot", Node: file(0o644, []byte("sorts before ."))},
	)
}

func buildImage(t testing.TB, root *Node, o Options) []byte {
	t.Helper()
	img, err := Build(root, o)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return img
}

func writeTemp(t testing.TB, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// checkReader compares the image, read with our Reader, with the tree.
func checkReader(t *testing.T, rd *Reader, exp map[string]*want) {
	t.Helper()
	seen := 0
	err := rd.Walk(func(p string, in *Inode) error {
		w := exp[p]
		if w == nil {
			return fmt.Errorf("unexpected path %q", p)
		}
		seen++
		if in.Mode != w.mode || in.UID != w.uid || in.GID != w.gid || in.Mtime != w.mtime || in.MtimeNsec != w.nsec || in.Nlink != w.nlink {
			return fmt.Errorf("%s: got mode %#o uid %d gid %d mtime %d.%d nlink %d, want %#o %d %d %d.%d %d",
				p, in.Mode, in.UID, in.GID, in.Mtime, in.MtimeNsec, in.Nlink, w.mode, w.uid, w.gid, w.mtime, w.nsec, w.nlink)
		}
		if in.Rdev() != w.rdev {
			return fmt.Errorf("%s: rdev %#x, want %#x", p, in.Rdev(), w.rdev)
		}
		xs, err := rd.Xattrs(in)
		if err != nil {
			return err
		}
		if !xattrsEqual(xs, w.xattrs) {
			return fmt.Errorf("%s: xattrs %q, want %q", p, xs, w.xattrs)
		}
		switch {
		case in.IsSymlink():
			got, err := rd.Readlink(in)
			if err != nil || got != w.target {
				return fmt.Errorf("%s: readlink %q %v", p, got, err)
			}
		case in.IsRegular():
			buf := make([]byte, in.Size+10)
			n, err := rd.ReadAt(in, buf, 0)
			if err != nil && err != io.EOF {
				return fmt.Errorf("%s: %w", p, err)
			}
			if !bytes.Equal(buf[:n], w.data) {
				return fmt.Errorf("%s: content differs (%d bytes, want %d)", p, n, len(w.data))
			}
		case in.IsDir():
			ents, err := rd.ReadDir(in)
			if err != nil {
				return err
			}
			var names []string
			for _, e := range ents {
				if e.Name != "." && e.Name != ".." {
					names = append(names, e.Name)
				}
			}
			if fmt.Sprint(names) != fmt.Sprint(w.entries) {
				return fmt.Errorf("%s: entries %d, want %d", p, len(names), len(w.entries))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(exp) {
		t.Fatalf("walked %d paths, want %d", seen, len(exp))
	}
}

func xattrsEqual(a, b []Xattr) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Name != b[i].Name || !bytes.Equal(a[i].Value, b[i].Value) {
			return false
		}
	}
	return true
}

func TestBuildRead(t *testing.T) {
	root := testTree()
	for _, o := range []Options{{}, {Checksum: true, BuildTime: fixedMtime, UUID: [16]byte{1, 2, 3}, VolumeName: "vol"}} {
		img := buildImage(t, root, o)
		rd, err := Open(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		checkReader(t, rd, expect(t, root))
	}
}

// mountErofs mounts an image file read-only and unmounts it at cleanup.
func mountErofs(t *testing.T, image, opts string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts EROFS and must run as root")
	}
	dir := t.TempDir()
	if err := unix.Mount(image, dir, "erofs", unix.MS_RDONLY, opts); err != nil {
		t.Fatalf("mount -t erofs %s (%s): %v", image, opts, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	return dir
}

// checkMounted compares a kernel-mounted tree with the expectation.
func checkMounted(t *testing.T, mnt string, exp map[string]*want) {
	t.Helper()
	for p, w := range exp {
		full := filepath.Join(mnt, p)
		var st unix.Stat_t
		if err := unix.Lstat(full, &st); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if st.Mode != w.mode || st.Uid != w.uid || st.Gid != w.gid || uint64(st.Mtim.Sec) != w.mtime ||
			uint32(st.Mtim.Nsec) != w.nsec || uint32(st.Nlink) != w.nlink || st.Rdev != w.rdev {
			t.Errorf("%s: kernel stat mode %#o uid %d gid %d mtime %d.%d nlink %d rdev %#x; want %#o %d %d %d.%d %d %#x",
				p, st.Mode, st.Uid, st.Gid, st.Mtim.Sec, st.Mtim.Nsec, st.Nlink, st.Rdev, w.mode, w.uid, w.gid, w.mtime, w.nsec, w.nlink, w.rdev)
		}
		checkMountedXattrs(t, full, p, w.xattrs)
		switch w.mode & syscall.S_IFMT {
		case syscall.S_IFLNK:
			if got, err := os.Readlink(full); err != nil || got != w.target {
				t.Errorf("%s: readlink %q %v", p, got, err)
			}
		case syscall.S_IFREG:
			got, err := os.ReadFile(full)
			if err != nil || !bytes.Equal(got, w.data) {
				t.Errorf("%s: kernel read %d bytes (%v), want %d identical", p, len(got), err, len(w.data))
			}
		case syscall.S_IFDIR:
			ents, err := os.ReadDir(full)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			if fmt.Sprint(names) != fmt.Sprint(w.entries) {
				t.Errorf("%s: kernel lists %d entries, want %d", p, len(names), len(w.entries))
			}
		}
	}
}

func checkMountedXattrs(t *testing.T, full, p string, want []Xattr) {
	t.Helper()
	sz, err := unix.Llistxattr(full, nil)
	if err != nil {
		t.Fatalf("%s: listxattr: %v", p, err)
	}
	buf := make([]byte, sz)
	if sz > 0 {
		if sz, err = unix.Llistxattr(full, buf); err != nil {
			t.Fatal(err)
		}
	}
	var names []string
	for _, n := range strings.Split(string(buf[:sz]), "\x00") {
		if n != "" {
			names = append(names, n)
		}
	}
	var wantNames []string
	for _, x := range want {
		wantNames = append(wantNames, x.Name)
		if strings.HasPrefix(x.Name, "system.posix_acl") {
			continue // the kernel parses ACLs; compare their presence only
		}
		v := make([]byte, 65536)
		n, err := unix.Lgetxattr(full, x.Name, v)
		if err != nil || !bytes.Equal(v[:n], x.Value) {
			t.Errorf("%s: getxattr %s = %q %v, want %q", p, x.Name, v[:max(n, 0)], err, x.Value)
		}
	}
	sort.Strings(names)
	sort.Strings(wantNames)
	if fmt.Sprint(names) != fmt.Sprint(wantNames) {
		t.Errorf("%s: listxattr %q, want %q", p, names, wantNames)
	}
}

func TestKernelMount(t *testing.T) {
	root := testTree()
	// An ACL the kernel accepts: ACL_USER_OBJ rwx, ACL_GROUP_OBJ r-x, ACL_OTHER r-x.
	acl := []byte{2, 0, 0, 0, 1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff, 4, 0, 5, 0, 0xff, 0xff, 0xff, 0xff, 0x20, 0, 5, 0, 0xff, 0xff, 0xff, 0xff}
	for _, e := range root.Entries {
		if e.Name == "xdir" {
			e.Node.Xattrs[0].Value = acl
		}
	}
	// BuildTime = the tree's usual mtime: inodes with no nanoseconds go compact.
	img := buildImage(t, root, Options{Checksum: true, BuildTime: fixedMtime})
	path := writeTemp(t, "image.erofs", img)
	mnt := mountErofs(t, path, "")
	checkMounted(t, mnt, expect(t, root))
}

func TestErofsUtilsAccept(t *testing.T) {
	img := buildImage(t, testTree(), Options{})
	path := writeTemp(t, "image.erofs", img)
	for _, args := range [][]string{{"fsck.erofs", path}, {"dump.erofs", "-s", path}, {"dump.erofs", "--path=/xattrs", path}} {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	// fsck.erofs extracts every file; compare one with the tree.
	dst := filepath.Join(t.TempDir(), "out")
	if out, err := exec.Command("fsck.erofs", "--extract="+dst, path).CombinedOutput(); err != nil {
		t.Fatalf("fsck.erofs --extract: %v\n%s", err, out)
	}
	got, err := os.ReadFile(filepath.Join(dst, "big"))
	if err != nil || !bytes.Equal(got, pattern(3*BlockSize+100, 1)) {
		t.Fatalf("fsck.erofs extracted big: %d bytes, %v", len(got), err)
	}
}

// TestGoErofsOracle reads our images with an independent reader.
func TestGoErofsOracle(t *testing.T) {
	root := testTree()
	img := buildImage(t, root, Options{})
	fsys, err := goerofs.Open(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	exp := expect(t, root)
	for p, w := range exp {
		name := strings.TrimPrefix(p, "/")
		if name == "" {
			name = "."
		}
		lfs, ok := fsys.(interface {
			Lstat(string) (fs.FileInfo, error)
		})
		if !ok {
			t.Fatalf("go-erofs has no Lstat")
		}
		fi, err := lfs.Lstat(name)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		st, ok := fi.Sys().(*goerofs.Stat)
		if !ok {
			t.Fatalf("%s: Sys() is %T", p, fi.Sys())
		}
		if st.UID != w.uid || st.GID != w.gid || st.Mtime != w.mtime || uint32(st.Nlink) != w.nlink {
			t.Errorf("%s: go-erofs uid %d gid %d mtime %d nlink %d; want %d %d %d %d", p, st.UID, st.GID, st.Mtime, st.Nlink, w.uid, w.gid, w.mtime, w.nlink)
		}
		for _, x := range w.xattrs {
			name := x.Name
			if strings.HasPrefix(name, "system.posix_acl") {
				name += "." // go-erofs spells the ACL names with a trailing dot
			}
			if v, ok := st.Xattrs[name]; !ok || v != string(x.Value) {
				t.Errorf("%s: go-erofs xattr %s = %q %v", p, x.Name, v, ok)
			}
		}
		if w.mode&syscall.S_IFMT == syscall.S_IFREG {
			got, err := fs.ReadFile(fsys, name)
			if err != nil || !bytes.Equal(got, w.data) {
				t.Errorf("%s: go-erofs read %d bytes %v", p, len(got), err)
			}
		}
	}
}

// TestReadMkfsImage reads an image made by mkfs.erofs (erofs-utils) from a
// real directory, shared xattrs included.
func TestReadMkfsImage(t *testing.T) {
	src := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(src, "a/b/c"), 0o755))
	must(os.WriteFile(filepath.Join(src, "a/b/c/data"), pattern(70000, 9), 0o644))
	must(os.WriteFile(filepath.Join(src, "small"), []byte("hi"), 0o600))
	must(os.Symlink("a/b", filepath.Join(src, "link")))
	must(os.Link(filepath.Join(src, "small"), filepath.Join(src, "a/hardlink")))
	for _, f := range []string{"small", "a/b/c/data", "a"} {
		must(unix.Lsetxattr(filepath.Join(src, f), "user.shared", []byte("same value"), 0))
		must(unix.Lsetxattr(filepath.Join(src, f), "trusted.t", []byte("tv"), 0))
	}
	img := filepath.Join(t.TempDir(), "mkfs.erofs")
	// -x 1: share every xattr used at least once, so shared xattrs are read.
	if out, err := exec.Command("mkfs.erofs", "-x1", img, src).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v\n%s", err, out)
	}
	f, err := os.Open(img)
	must(err)
	defer f.Close()
	fi, _ := f.Stat()
	rd, err := Open(f, fi.Size())
	must(err)
	n := 0
	must(rd.Walk(func(p string, in *Inode) error {
		n++
		full := filepath.Join(src, p)
		var st unix.Stat_t
		if err := unix.Lstat(full, &st); err != nil {
			return err
		}
		if in.Mode != st.Mode || in.Nlink != uint32(st.Nlink) || (in.IsRegular() && in.Size != uint64(st.Size)) {
			return fmt.Errorf("%s: mode %#o nlink %d size %d; source %#o %d %d", p, in.Mode, in.Nlink, in.Size, st.Mode, st.Nlink, st.Size)
		}
		if in.IsRegular() {
			want, _ := os.ReadFile(full)
			got := make([]byte, in.Size)
			if _, err := rd.ReadAt(in, got, 0); err != nil && err != io.EOF {
				return err
			}
			if !bytes.Equal(got, want) {
				return fmt.Errorf("%s: content differs", p)
			}
		}
		if in.IsSymlink() {
			got, err := rd.Readlink(in)
			want, _ := os.Readlink(full)
			if err != nil || got != want {
				return fmt.Errorf("%s: readlink %q %v", p, got, err)
			}
		}
		if p == "/small" || p == "/a" {
			xs, err := rd.Xattrs(in)
			if err != nil {
				return err
			}
			m := map[string]string{}
			for _, x := range xs {
				m[x.Name] = string(x.Value)
			}
			if m["user.shared"] != "same value" || m["trusted.t"] != "tv" {
				return fmt.Errorf("%s: xattrs %q", p, xs)
			}
		}
		return nil
	}))
	if n != 8 {
		t.Fatalf("walked %d paths, want 8", n)
	}
}

// TestChunkedDevice writes chunk-based files whose data lives on an extra
// device and mounts image + device with the kernel.
func TestChunkedDevice(t *testing.T) {
	blob := pattern(5*BlockSize, 3)
	chunked := func(size uint64, bits uint8, idx ...ChunkIndex) *Node {
		return &Node{Mode: 0o100644, Mtime: fixedMtime, Size: size, ChunkBits: bits, Chunks: idx}
	}
	// a: two 4 KiB chunks at blocks 3 and 1; b: a hole then block 4 (partial);
	// c: one 8 KiB chunk covering blocks 0-1.
	a := chunked(2*BlockSize, 12, ChunkIndex{DeviceID: 1, BlkAddr: 3}, ChunkIndex{DeviceID: 1, BlkAddr: 1})
	b := chunked(BlockSize+100, 12, ChunkIndex{BlkAddr: NullAddr}, ChunkIndex{DeviceID: 1, BlkAddr: 4})
	c := chunked(2*BlockSize, 13, ChunkIndex{DeviceID: 1, BlkAddr: 0})
	root := dir(Entry{Name: "a", Node: a}, Entry{Name: "b", Node: b}, Entry{Name: "c", Node: c})
	img := buildImage(t, root, Options{Devices: []Device{{Tag: "blob", Blocks: 5}}})
	wantData := map[string][]byte{
		"a": append(append([]byte{}, blob[3*BlockSize:4*BlockSize]...), blob[BlockSize:2*BlockSize]...),
		"b": append(make([]byte, BlockSize), blob[4*BlockSize:4*BlockSize+100]...),
		"c": blob[:2*BlockSize],
	}
	rd, err := Open(bytes.NewReader(img), int64(len(img)))
	if err != nil {
		t.Fatal(err)
	}
	if d := rd.Devices(); len(d) != 1 || d[0].Tag != "blob" || d[0].Blocks != 5 {
		t.Fatalf("devices %+v", d)
	}
	rd.SetDevices(bytes.NewReader(blob))
	imgPath := writeTemp(t, "image.erofs", img)
	blobPath := writeTemp(t, "blob", blob)
	mnt := mountErofs(t, imgPath, "device="+blobPath)
	for name, want := range wantData {
		in, err := rd.Inode(rootEntry(t, rd, name))
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if _, err := rd.ReadAt(in, got, 0); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: our reader differs", name)
		}
		kern, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil || !bytes.Equal(kern, want) {
			t.Errorf("%s: kernel read %d bytes %v, want %d identical", name, len(kern), err, len(want))
		}
	}
	fsys, err := goerofs.Open(bytes.NewReader(img), goerofs.WithExtraDevices(bytes.NewReader(blob)))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range wantData {
		got, err := fs.ReadFile(fsys, name)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: go-erofs read %d bytes %v", name, len(got), err)
		}
	}
}

func rootEntry(t *testing.T, rd *Reader, name string) uint64 {
	t.Helper()
	root, err := rd.Inode(rd.RootNid())
	if err != nil {
		t.Fatal(err)
	}
	ents, err := rd.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Name == name {
			return e.Nid
		}
	}
	t.Fatalf("no %q in root", name)
	return 0
}

// readAll exercises every read path of the Reader over the whole tree and
// returns the first error.
func readAll(r io.ReaderAt, size int64) error {
	rd, err := Open(r, size)
	if err != nil {
		return err
	}
	return rd.Walk(func(p string, in *Inode) error {
		if _, err := rd.Xattrs(in); err != nil {
			return err
		}
		switch {
		case in.IsSymlink():
			_, err = rd.Readlink(in)
		case in.IsRegular():
			buf := make([]byte, min(in.Size, 64<<10))
			_, err = rd.ReadAt(in, buf, 0)
			if err == io.EOF {
				err = nil
			}
			if in.Layout == LayoutChunkBased {
				_, err = rd.ChunkIndexes(in, -1)
			}
		}
		return err
	})
}

func TestHostileImages(t *testing.T) {
	good := buildImage(t, dir(Entry{Name: "sub", Node: dir(Entry{Name: "f", Node: file(0o644, []byte("data"))})},
		Entry{Name: "x", Node: file(0o644, pattern(5000, 1))}), Options{})
	if err := readAll(bytes.NewReader(good), int64(len(good))); err != nil {
		t.Fatal(err)
	}
	rd, _ := Open(bytes.NewReader(good), int64(len(good)))
	sb := rd.SuperBlock()
	meta := int(sb.MetaBlkAddr) << BlockBits
	rootOff := meta + int(sb.RootNid)<<SlotBits
	root, _ := rd.Inode(rd.RootNid())
	subNid := rootEntry(t, rd, "sub")
	sub, _ := rd.Inode(subNid)
	// The root's dirents are tail-packed right after its inode.
	rootDirents := int(rd.tailOffset(root))
	subDirents := int(rd.tailOffset(sub))

	mutate := func(f func(b []byte)) []byte {
		b := bytes.Clone(good)
		f(b)
		return b
	}
	le := func(b []byte, off int, v uint64, n int) {
		for i := range n {
			b[off+i] = byte(v >> (8 * i))
		}
	}
	cases := map[string][]byte{
		"empty":          nil,
		"bad magic":      mutate(func(b []byte) { b[SuperBlockOffset] ^= 1 }),
		"block size":     mutate(func(b []byte) { b[SuperBlockOffset+12] = 30 }),
		"meta past end":  mutate(func(b []byte) { le(b, SuperBlockOffset+40, 1<<30, 4) }),
		"root nid range": mutate(func(b []byte) { le(b, SuperBlockOffset+14, 0xFFFF, 2) }),
		"unknown incompat": mutate(func(b []byte) {
			le(b, SuperBlockOffset+80, 0x8000, 4)
		}),
		"bad checksum": mutate(func(b []byte) { b[SuperBlockOffset+8] |= FeatureCompatSbChksum }),
		"devices outside": mutate(func(b []byte) {
			le(b, SuperBlockOffset+80, FeatureIncompatDevTable, 4)
			le(b, SuperBlockOffset+86, 0xFFFF, 2)
		}),
		"huge dir size":   mutate(func(b []byte) { le(b, rootOff+8, 0xFFFFFFFF, 4) }),
		"dirent past end": mutate(func(b []byte) { le(b, rootDirents+8, 0xFFF0, 2) }),
		"name with slash": mutate(func(b []byte) {
			// Names follow 4 dirents: ".", "..", "sub", "x" -> "./..subx"
			i := bytes.Index(b[rootDirents:rootDirents+100], []byte("sub"))
			b[rootDirents+i+1] = '/'
		}),
		"name dotdot": mutate(func(b []byte) {
			// Rename "sub" to a second ".." by moving the next name's start.
			i := bytes.Index(b[rootDirents:rootDirents+100], []byte("subx"))
			copy(b[rootDirents+i:], "..")
			le(b, rootDirents+3*DirentSize+8, uint64(i+2), 2)
		}),
		"directory loop": mutate(func(b []byte) {
			// sub's entry "f" points back at sub itself.
			le(b, subDirents+2*DirentSize, uint64(subNid), 8)
			b[subDirents+2*DirentSize+10] = FTDir
		}),
		"nid out of range": mutate(func(b []byte) { le(b, rootDirents+2*DirentSize, 1<<40, 8) }),
		"xattr count huge": mutate(func(b []byte) { le(b, rootOff+2, 0xFFFF, 2) }),
		"inode format":     mutate(func(b []byte) { le(b, rootOff, 0xFF, 2) }),
		"plain blkaddr out": mutate(func(b []byte) {
			xNid := rootEntry(t, rd, "x")
			off := meta + int(xNid)<<SlotBits
			le(b, off+16, 0xFFFFFF, 4)
		}),
	}
	for name, img := range cases {
		t.Run(name, func(t *testing.T) {
			err := readAll(bytes.NewReader(img), int64(len(img)))
			if err == nil {
				t.Fatal("hostile image accepted")
			}
			if !errors.Is(err, ErrFormat) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error does not wrap ErrFormat/ErrUnsupported: %v", err)
			}
		})
	}
	// Every truncation and many bit flips: errors or success, never a panic.
	for n := 0; n < len(good); n += 97 {
		_ = readAll(bytes.NewReader(good[:n]), int64(n))
	}
	for i := 0; i < len(good); i += 13 {
		b := bytes.Clone(good)
		b[i] ^= 0x5a
		_ = readAll(bytes.NewReader(b), int64(len(b)))
	}
}

func FuzzErofsReader(f *testing.F) {
	// Seeds stay small: the fuzzer mutates and copies whole inputs.
	small := file(0o644, []byte("x"))
	small.Xattrs = []Xattr{{Name: "user.a", Value: []byte("b")}, {Name: "security.c", Value: []byte("d")}}
	f.Add(buildImage(f, dir(Entry{Name: "d", Node: dir(Entry{Name: "f", Node: small})},
		Entry{Name: "l", Node: &Node{Mode: 0o120777, Target: "d/f"}},
		Entry{Name: "h", Node: small},
		Entry{Name: "p", Node: file(0o644, pattern(BlockSize+10, 4))}), Options{Checksum: true}))
	f.Add(buildImage(f, dir(Entry{Name: "c", Node: &Node{Mode: 0o100644, Size: 3 * BlockSize, ChunkBits: 12,
		Chunks: []ChunkIndex{{BlkAddr: 1}, {BlkAddr: NullAddr}, {DeviceID: 1, BlkAddr: 0}}}}), Options{Devices: []Device{{Tag: "d", Blocks: 1}}}))
	if b, err := os.ReadFile("../rafs/v6/testdata/v6-zstd-blake3/bootstrap"); err == nil {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = readAll(bytes.NewReader(b), int64(len(b)))
	})
}

package fs_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// testImage builds an image with every kind of inode and the chunk
// layouts that matter: empty, sub-chunk, exact chunk, chunk+1, many
// chunks, holes, deduplicated chunks, hardlinks, odd symlinks.
func testImage(t testing.TB, cs uint32, c codec.Compressor, d codec.Digester, xattrs bool) (*rafs.Image, rafs.ChunkReader) {
	t.Helper()
	b := fstest.NewBuilder(cs, c, d)
	n := int(cs)
	b.Dir("/bin", 0o755)
	b.File("/bin/empty", 0o644, nil)
	b.File("/bin/one", 0o600, []byte("x"))
	b.File("/bin/sub", 0o755, fstest.Bytes(1, n-1))
	b.File("/bin/exact", 0o644, fstest.Bytes(2, n))
	b.File("/bin/plus1", 0o644, fstest.Bytes(3, n+1))
	big := fstest.Bytes(4, 5*n+123)
	b.File("/bin/big", 0o644, big)
	sparse := append(append(fstest.Bytes(5, 100), make([]byte, 3*n)...), fstest.Bytes(6, 77)...)
	b.File("/bin/sparse", 0o644, sparse)
	b.File("/bin/dup", 0o644, big) // all chunks shared with big
	compressible := bytes.Repeat([]byte("rafs "), 3*n/5)
	b.File("/bin/text", 0o444, compressible)
	b.Hardlink("/bin/link", "/bin/big")
	b.Symlink("/bin/abs", "/etc/passwd")
	b.Symlink("/bin/root", "/")
	b.Symlink("/bin/slashes", "/////////////////")
	b.Symlink("/bin/dangling", "../nowhere/at/all")
	b.Dir("/dev", 0o755)
	b.Special("/dev/null", syscall.S_IFCHR|0o666, unix.Mkdev(1, 3))
	b.Special("/dev/sda", syscall.S_IFBLK|0o660, unix.Mkdev(8, 0))
	b.Special("/dev/fifo", syscall.S_IFIFO|0o644, 0)
	b.Special("/dev/sock", syscall.S_IFSOCK|0o755, 0)
	home := b.Dir("/home", 0o700)
	home.UID, home.GID = 1000, 1000
	own := b.File("/home/owned", 0o640, []byte("mine"))
	own.UID, own.GID = 1000, 100
	b.Dir("/many", 0o755)
	for k := range 700 { // several READDIR(PLUS) batches
		b.File(fmt.Sprintf("/many/entry-with-a-longish-name-%04d", k), 0o644, nil)
	}
	b.File("/"+strings.Repeat("n", 255), 0o644, []byte("long name"))
	if xattrs {
		own.Xattrs = []rafs.Xattr{{Name: "user.a", Value: []byte("1")}, {Name: "security.capability", Value: []byte{0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}, {Name: "trusted.empty", Value: nil}}
		home.Xattrs = []rafs.Xattr{{Name: "user.big", Value: bytes.Repeat([]byte("v"), 3000)}}
	}
	img, blob, err := b.Image()
	if err != nil {
		t.Fatal(err)
	}
	return img, fstest.MemReader(map[string][]byte{img.Blobs[0].ID: blob})
}

func TestMountMatchesModel(t *testing.T) {
	cases := []struct {
		name   string
		cs     uint32
		c      codec.Compressor
		d      codec.Digester
		xattrs bool
	}{
		{"zstd-blake3-xattrs", 64 << 10, codec.Zstd, codec.Blake3, true},
		{"lz4-sha256", 4 << 10, codec.LZ4Block, codec.SHA256, false},
		{"none-sha256-xattrs", 1 << 20, codec.None, codec.SHA256, true},
		{"gzip-blake3", 16 << 10, codec.Gzip, codec.Blake3, false},
	}
	for k, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			img, cr := testImage(t, tc.cs, tc.c, tc.d, tc.xattrs)
			mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
			fstest.CheckMounted(t, img, cr, mnt, int64(k))
			if !tc.xattrs {
				// No xattrs in the image: the filesystem says so once and the
				// kernel answers EOPNOTSUPP by itself from then on.
				_, err := unix.Lgetxattr(mnt+"/bin/big", "security.selinux", nil)
				if !errors.Is(err, unix.EOPNOTSUPP) {
					t.Errorf("getxattr on an image without xattrs: %v, want EOPNOTSUPP", err)
				}
			}
		})
	}
}

func TestReadOnly(t *testing.T) {
	img, cr := testImage(t, 64<<10, codec.Zstd, codec.Blake3, true)
	mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
	ops := []struct {
		name string
		do   func() error
	}{
		{"create", func() error { return os.WriteFile(mnt+"/new", nil, 0o644) }},
		{"open for write", func() error {
			f, err := os.OpenFile(mnt+"/bin/big", os.O_WRONLY, 0)
			if err == nil {
				f.Close()
			}
			return err
		}},
		{"truncate", func() error { return os.Truncate(mnt+"/bin/big", 0) }},
		{"mkdir", func() error { return os.Mkdir(mnt+"/d", 0o755) }},
		{"remove", func() error { return os.Remove(mnt + "/bin/one") }},
		{"rmdir", func() error { return os.Remove(mnt + "/dev") }},
		{"rename", func() error { return os.Rename(mnt+"/bin/one", mnt+"/bin/two") }},
		{"link", func() error { return os.Link(mnt+"/bin/one", mnt+"/bin/two") }},
		{"symlink", func() error { return os.Symlink("x", mnt+"/bin/two") }},
		{"chmod", func() error { return os.Chmod(mnt+"/bin/one", 0o777) }},
		{"chown", func() error { return os.Lchown(mnt+"/bin/one", 5, 5) }},
		{"setxattr", func() error { return unix.Lsetxattr(mnt+"/bin/one", "user.x", []byte("1"), 0) }},
		{"removexattr", func() error { return unix.Lremovexattr(mnt+"/home/owned", "user.a") }},
		{"access W_OK", func() error { return unix.Access(mnt+"/bin/one", unix.W_OK) }},
	}
	for _, op := range ops {
		if err := op.do(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", op.name, err)
		}
	}
	if err := unix.Access(mnt+"/bin/one", unix.R_OK); err != nil {
		t.Errorf("access R_OK: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil || st.Files != uint64(len(img.Inodes)) || st.Namelen != 255 {
		t.Errorf("statfs: %+v, %v", st, err)
	}
}

func TestReadErrorIsEIO(t *testing.T) {
	img, _ := testImage(t, 64<<10, codec.Zstd, codec.Blake3, false)
	cr := fstest.FailingReader{Err: errors.New("injected backend failure")}
	mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
	done := make(chan error, 1)
	go func() {
		_, err := os.ReadFile(mnt + "/bin/big")
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read with a failing chunk reader: %v, want EIO", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("read with a failing chunk reader hangs")
	}
	// Metadata and holes need no chunk reads and still work.
	if fi, err := os.Stat(mnt + "/bin/big"); err != nil || fi.Size() == 0 {
		t.Errorf("stat: %v", err)
	}
	if b, err := os.ReadFile(mnt + "/bin/empty"); err != nil || len(b) != 0 {
		t.Errorf("read empty file: %q, %v", b, err)
	}
}

// A corrupt blob (a flipped byte) must fail the digest check: EIO, never
// wrong bytes.
func TestCorruptBlobIsEIO(t *testing.T) {
	b := fstest.NewBuilder(4<<10, codec.None, codec.SHA256)
	data := fstest.Bytes(9, 3<<12)
	b.File("/f", 0o644, data)
	img, blob, err := b.Image()
	if err != nil {
		t.Fatal(err)
	}
	blob[5000] ^= 0xff // inside the second chunk
	cr := fstest.MemReader(map[string][]byte{img.Blobs[0].ID: blob})
	mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
	f, err := os.Open(mnt + "/f")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, 4096)
	if _, err := f.ReadAt(p, 0); err != nil || !bytes.Equal(p, data[:4096]) {
		t.Errorf("first chunk: %v", err)
	}
	if _, err := f.ReadAt(p, 4096); !errors.Is(err, syscall.EIO) {
		t.Errorf("corrupt chunk: %v, want EIO", err)
	}
}

func TestReadDirOffsetsStable(t *testing.T) {
	img, cr := testImage(t, 64<<10, codec.Zstd, codec.Blake3, false)
	for _, plus := range []bool{false, true} {
		t.Run(fmt.Sprintf("plus=%v", plus), func(t *testing.T) {
			mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), &fuse.MountOptions{DisableReadDirPlus: !plus})
			fd, err := unix.Open(mnt+"/many", unix.O_RDONLY|unix.O_DIRECTORY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fd)
			// Read a little, remember the offset, read on, seek back: the
			// names after the offset must be the same both times.
			buf := make([]byte, 1024)
			n, err := unix.Getdents(fd, buf)
			if err != nil || n == 0 {
				t.Fatalf("getdents: %d, %v", n, err)
			}
			off, _ := unix.Seek(fd, 0, 1)
			first := direntNames(t, fd)
			if _, err := unix.Seek(fd, off, 0); err != nil {
				t.Fatal(err)
			}
			again := direntNames(t, fd)
			if strings.Join(first, "/") != strings.Join(again, "/") || len(first) == 0 {
				t.Fatalf("names after offset %d differ: %d vs %d", off, len(first), len(again))
			}
			ents, err := os.ReadDir(mnt + "/many")
			if err != nil || len(ents) != 700 {
				t.Fatalf("readdir: %d entries, %v", len(ents), err)
			}
		})
	}
}

func direntNames(t *testing.T, fd int) []string {
	var names []string
	buf := make([]byte, 8192)
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return names
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
}

// The same files on disk, served by rafs/fs, must look identical to
// filepath.Walk apart from what the image does not keep (atime, ctime).
func TestWalkLikeDisk(t *testing.T) {
	img, cr := testImage(t, 64<<10, codec.Zstd, codec.Blake3, false)
	mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
	var n int
	err := filepath.Walk(mnt, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := len(fstest.ModelPaths(img)); n != want {
		t.Fatalf("walked %d paths, want %d", n, want)
	}
}

// blockingReader blocks every chunk read until its context ends, and
// reports that one started and that it was cancelled.
type blockingReader struct{ entered, cancelled chan struct{} }

func (r blockingReader) ReadChunkAt(ctx context.Context, b *rafs.Blob, c *rafs.Chunk, p []byte, off uint32) error {
	select {
	case r.entered <- struct{}{}:
	default:
	}
	select {
	case <-ctx.Done():
		r.cancelled <- struct{}{}
		return ctx.Err()
	case <-time.After(time.Minute):
		return errors.New("never cancelled")
	}
}

// TestReadCancelledByInterrupt kills a process blocked in read(2): the
// kernel sends FUSE_INTERRUPT and the chunk read's context must end, so a
// stuck backend does not pin the request.
func TestReadCancelledByInterrupt(t *testing.T) {
	img, _ := testImage(t, 64<<10, codec.Zstd, codec.Blake3, false)
	cr := blockingReader{entered: make(chan struct{}, 16), cancelled: make(chan struct{}, 16)}
	mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
	// O_DIRECT makes read(2) a synchronous FUSE READ; buffered reads go
	// out as background readahead, which the kernel never interrupts.
	cmd := exec.Command("dd", "if="+mnt+"/bin/big", "of=/dev/null", "bs=4096", "count=1", "iflag=direct")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill only once the READ reached the chunk reader: a kill before
	// (a fixed sleep overrun on a loaded box) interrupts nothing.
	select {
	case <-cr.entered:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("dd's read never reached the chunk reader")
	}
	cmd.Process.Kill()
	cmd.Wait()
	select {
	case <-cr.cancelled:
	case <-time.After(20 * time.Second):
		t.Fatal("killing the reader did not cancel the chunk read")
	}
}

func TestFileMetrics(t *testing.T) {
	img, cr := testImage(t, 64<<10, codec.Zstd, codec.Blake3, false)
	opts := fs.DefaultOptions()
	opts.FilesAccount, opts.AccessPattern = true, true
	rf := fs.New(img, cr, opts)
	mnt := fstest.Mount(t, rf, nil)
	data, err := os.ReadFile(mnt + "/bin/plus1")
	if err != nil {
		t.Fatal(err)
	}
	ino := fstest.ModelPaths(img)["bin/plus1"].Ino
	var files map[string]struct {
		TotalFops uint64   `json:"total_fops"`
		DataRead  uint64   `json:"data_read"`
		FopHits   []uint64 `json:"fop_hits"`
	}
	raw, err := rf.FilesJSON()
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &files); err != nil {
		t.Fatal(err)
	}
	st, ok := files[fmt.Sprint(ino)]
	if !ok || st.DataRead != uint64(len(data)) || st.FopHits[fs.FopRead] == 0 || st.FopHits[fs.FopOpen] != 1 {
		t.Errorf("files metrics for ino %d: %+v (%s)", ino, st, raw)
	}
	var pat []struct {
		Ino    uint64 `json:"ino"`
		NrRead uint64 `json:"nr_read"`
		Secs   int64  `json:"first_access_time_secs"`
	}
	raw, _ = rf.AccessPatternsJSON()
	if err := json.Unmarshal(raw, &pat); err != nil {
		t.Fatal(err)
	}
	if len(pat) != 1 || pat[0].Ino != ino || pat[0].NrRead == 0 || pat[0].Secs < time.Now().Unix()-60 {
		t.Errorf("access pattern %s, want only ino %d", raw, ino)
	}
}

// TestSeekHoles: SEEK_DATA/SEEK_HOLE follow the chunk layout, so sparse
// files stay sparse when copied.
func TestSeekHoles(t *testing.T) {
	const n = 64 << 10
	img, cr := testImage(t, n, codec.Zstd, codec.Blake3, false)
	mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
	f, err := os.Open(mnt + "/bin/sparse") // data [0,n), holes [n,3n), data [3n, 3n+177)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	cases := []struct {
		off    int64
		whence int
		want   int64
		err    error
	}{
		{0, unix.SEEK_DATA, 0, nil},
		{0, unix.SEEK_HOLE, n, nil},
		{n + 5, unix.SEEK_DATA, 3 * n, nil},
		{n + 5, unix.SEEK_HOLE, n + 5, nil},
		{3*n + 10, unix.SEEK_HOLE, 3*n + 177, nil},
		{3*n + 177, unix.SEEK_DATA, 0, syscall.ENXIO},
	}
	for _, c := range cases {
		got, err := unix.Seek(fd, c.off, c.whence)
		if c.err != nil {
			if !errors.Is(err, c.err) {
				t.Errorf("seek(%d, %d): %d, %v; want %v", c.off, c.whence, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("seek(%d, %d) = %d, %v; want %d", c.off, c.whence, got, err, c.want)
		}
	}
	// A file without holes is all data, with the hole at its end.
	g, _ := os.Open(mnt + "/bin/big")
	defer g.Close()
	if got, err := unix.Seek(int(g.Fd()), 10, unix.SEEK_HOLE); err != nil || got != 5*n+123 {
		t.Errorf("SEEK_HOLE in a dense file: %d, %v", got, err)
	}
}

// TestOddImage serves an image that passes Validate but is strange in
// ways a hostile or buggy builder could make it: the filesystem must answer
// every request (an error is fine) without panicking or hanging.
func TestOddImage(t *testing.T) {
	b := fstest.NewBuilder(4<<10, codec.None, codec.SHA256)
	b.Symlink("/empty-target", "")              // empty symlink
	huge := b.File("/huge", 0o644, []byte("x")) // 1 TiB, one byte of data
	huge.Size = 1 << 40
	z := b.File("/nlink0", 0o000, nil)
	z.Nlink = 0
	d := b.Dir("/d", 0o755)
	d.Parent = huge.Ino // ".." of a directory is a regular file
	b.Special("/dev", syscall.S_IFCHR|0o600, ^uint64(0))
	img, blob, err := b.Image()
	if err != nil {
		t.Fatal(err)
	}
	cr := fstest.MemReader(map[string][]byte{img.Blobs[0].ID: blob})
	mnt := fstest.Mount(t, fs.New(img, cr, fs.DefaultOptions()), nil)
	root, err := os.Open(mnt)
	if err != nil {
		t.Fatal(err)
	}
	names, err := root.Readdirnames(-1)
	root.Close()
	if err != nil || len(names) != 5 {
		t.Fatalf("readdir: %q, %v", names, err)
	}
	for _, n := range names {
		os.Lstat(mnt + "/" + n) // errors are fine; no panic, no hang
		os.Readlink(mnt + "/" + n)
	}
	f, err := os.Open(mnt + "/huge")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, 8192)
	n, err := f.ReadAt(p, 1<<40-100)
	if n != 100 || !bytes.Equal(p[:100], make([]byte, 100)) {
		t.Errorf("read at the end of a 1 TiB hole: %d bytes, %v", n, err)
	}
	if n, _ := f.ReadAt(p[:1], 0); n != 1 || p[0] != 'x' {
		t.Errorf("first byte %q", p[:n])
	}
	if names, err := readdirnames(mnt + "/d/.."); err != nil || len(names) != 5 {
		t.Errorf("readdir of d/..: %q, %v", names, err)
	}
	if _, err := os.Readlink(mnt + "/empty-target"); !errors.Is(err, syscall.EIO) {
		t.Errorf("readlink of an empty symlink: %v, want EIO", err)
	}
	if fi, err := os.Stat(mnt + "/empty-target"); err == nil {
		t.Errorf("stat through an empty symlink succeeded: %v", fi.Mode())
	}
}

func readdirnames(p string) ([]string, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Readdirnames(-1)
}

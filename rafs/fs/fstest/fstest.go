// Package fstest builds small RAFS images in memory and mounts FUSE
// filesystems for tests of the serving packages (rafs/fs, rafs/vfs,
// rafs/passthrough). Mounts are real (go-fuse over /dev/fuse, as root)
// and are unmounted when the test ends.
package fstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// Builder assembles a rafs.Image and its single blob in memory. Paths are
// absolute and slash-separated; parents must be added before children.
type Builder struct {
	ChunkSize  uint32
	Compressor codec.Compressor
	Digester   codec.Digester
	Mtime      int64

	inodes []*rafs.Inode
	byPath map[string]*rafs.Inode
	blob   bytes.Buffer
	chunks map[codec.Digest]*rafs.Chunk
	nchunk uint32
	uncomp uint64
	err    error
}

// NewBuilder returns a builder with a root directory (mode 0755).
func NewBuilder(chunkSize uint32, c codec.Compressor, d codec.Digester) *Builder {
	b := &Builder{ChunkSize: chunkSize, Compressor: c, Digester: d, Mtime: 1700000000,
		byPath: map[string]*rafs.Inode{}, chunks: map[codec.Digest]*rafs.Chunk{}}
	root := &rafs.Inode{Ino: 1, Parent: 1, Mode: syscall.S_IFDIR | 0o755, Nlink: 2, Mtime: b.Mtime}
	b.inodes = append(b.inodes, root)
	b.byPath["/"] = root
	return b
}

func (b *Builder) add(p string, i *rafs.Inode) *rafs.Inode {
	if b.err != nil {
		return i
	}
	dir, name := path.Split(p)
	dir = path.Clean(dir)
	parent := b.byPath[dir]
	if parent == nil || !parent.IsDir() {
		b.err = fmt.Errorf("fstest: parent of %s missing", p)
		return i
	}
	if i.Ino == 0 {
		i.Ino = uint64(len(b.inodes) + 1)
		i.Parent = parent.Ino
		if i.Mtime == 0 {
			i.Mtime = b.Mtime + int64(i.Ino)
			i.MtimeNsec = uint32(i.Ino * 1000)
		}
		b.inodes = append(b.inodes, i)
	}
	if i.IsDir() {
		parent.Nlink++
	}
	parent.Entries = append(parent.Entries, rafs.Dirent{Name: name, Ino: i.Ino})
	b.byPath[p] = i
	return i
}

// Dir adds a directory.
func (b *Builder) Dir(p string, perm uint32) *rafs.Inode {
	return b.add(p, &rafs.Inode{Mode: syscall.S_IFDIR | perm, Nlink: 2})
}

// Symlink adds a symbolic link.
func (b *Builder) Symlink(p, target string) *rafs.Inode {
	return b.add(p, &rafs.Inode{Mode: syscall.S_IFLNK | 0o777, Nlink: 1, Target: target, Size: uint64(len(target))})
}

// Special adds a device, fifo or socket node.
func (b *Builder) Special(p string, mode uint32, rdev uint64) *rafs.Inode {
	return b.add(p, &rafs.Inode{Mode: mode, Nlink: 1, Rdev: rdev})
}

// Hardlink adds another name for the inode at old.
func (b *Builder) Hardlink(p, old string) *rafs.Inode {
	i := b.byPath[old]
	if i == nil {
		b.err = fmt.Errorf("fstest: hardlink target %s missing", old)
		return nil
	}
	i.Nlink++
	return b.add(p, i)
}

// File adds a regular file with data; runs of zeros a whole chunk long
// become holes, so sparse files are easy to make.
func (b *Builder) File(p string, perm uint32, data []byte) *rafs.Inode {
	i := &rafs.Inode{Mode: syscall.S_IFREG | perm, Nlink: 1, Size: uint64(len(data))}
	for off := 0; off < len(data); off += int(b.ChunkSize) {
		piece := data[off:min(off+int(b.ChunkSize), len(data))]
		if allZero(piece) && len(piece) == int(b.ChunkSize) {
			continue
		}
		c, err := b.chunk(piece)
		if err != nil {
			b.err = err
			break
		}
		i.Chunks = append(i.Chunks, rafs.FileChunk{FileOffset: uint64(off), Chunk: c})
	}
	return b.add(p, i)
}

func allZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

func (b *Builder) chunk(data []byte) (*rafs.Chunk, error) {
	d := b.Digester.Sum(data)
	if c, ok := b.chunks[d]; ok {
		return c, nil
	}
	out, compressed, err := codec.Compress(b.Compressor, nil, data)
	if err != nil {
		return nil, err
	}
	if !compressed {
		out = data
	}
	c := &rafs.Chunk{
		Digest: d, Index: b.nchunk,
		CompressedOffset: uint64(b.blob.Len()), CompressedSize: uint32(len(out)),
		UncompressedOffset: b.uncomp, UncompressedSize: uint32(len(data)),
		Compressed: compressed,
	}
	b.blob.Write(out)
	b.nchunk++
	b.uncomp += uint64(len(data)+4095) &^ 4095
	b.chunks[d] = c
	return c, nil
}

// Image finishes the image: sorts directories, fills the blob table and
// validates. The blob's bytes are returned alongside.
func (b *Builder) Image() (*rafs.Image, []byte, error) {
	if b.err != nil {
		return nil, nil, b.err
	}
	for _, i := range b.inodes {
		sort.Slice(i.Entries, func(x, y int) bool { return i.Entries[x].Name < i.Entries[y].Name })
	}
	blob := bytes.Clone(b.blob.Bytes())
	id := codec.SHA256.Sum(blob).String()
	bl := &rafs.Blob{ID: id, Compressor: b.Compressor, Digester: b.Digester, ChunkSize: b.ChunkSize,
		ChunkCount: b.nchunk, CompressedSize: uint64(len(blob)), UncompressedSize: b.uncomp}
	img := &rafs.Image{Version: 6, ChunkSize: b.ChunkSize, Compressor: b.Compressor, Digester: b.Digester,
		Blobs: []*rafs.Blob{bl}, Inodes: b.inodes}
	if err := img.Validate(); err != nil {
		return nil, nil, err
	}
	return img, blob, nil
}

// cached keeps every verified chunk it has decoded, so tests that read
// the same chunks many times do not pay for decompression each time.
// Images in tests are small; nothing is evicted.
type cached struct {
	r      rafs.BlobChunkReader
	mu     sync.Mutex
	chunks map[*rafs.Chunk][]byte
}

func (c *cached) ReadChunkAt(ctx context.Context, b *rafs.Blob, ch *rafs.Chunk, p []byte, off uint32) error {
	c.mu.Lock()
	data, ok := c.chunks[ch]
	c.mu.Unlock()
	if !ok {
		var err error
		if data, err = c.r.ReadChunk(b, ch); err != nil {
			return err
		}
		c.mu.Lock()
		c.chunks[ch] = data
		c.mu.Unlock()
	}
	if uint64(off)+uint64(len(p)) > uint64(len(data)) {
		return fmt.Errorf("chunk %d: read past its end", ch.Index)
	}
	copy(p, data[off:])
	return nil
}

func cache(r rafs.BlobChunkReader) rafs.ChunkReader {
	return &cached{r: r, chunks: map[*rafs.Chunk][]byte{}}
}

// MemReader returns a ChunkReader over in-memory blobs keyed by blob id.
func MemReader(blobs map[string][]byte) rafs.ChunkReader {
	return cache(rafs.BlobChunkReader{Open: func(b *rafs.Blob) (io.ReaderAt, error) {
		p, ok := blobs[b.ID]
		if !ok {
			return nil, fmt.Errorf("blob %s: %w", b.ID, os.ErrNotExist)
		}
		return bytes.NewReader(p), nil
	}})
}

// DirReader returns a ChunkReader reading blob files named by id in dir.
// Blob files stay open for the life of the test process.
func DirReader(dir string) rafs.ChunkReader {
	var mu sync.Mutex
	open := map[string]*os.File{}
	return cache(rafs.BlobChunkReader{Open: func(b *rafs.Blob) (io.ReaderAt, error) {
		mu.Lock()
		defer mu.Unlock()
		if f, ok := open[b.ID]; ok {
			return f, nil
		}
		f, err := os.Open(dir + "/" + b.ID)
		if err != nil {
			return nil, err
		}
		open[b.ID] = f
		return f, nil
	}})
}

// FailingReader fails every chunk read with Err after optional Delay,
// honouring ctx.
type FailingReader struct {
	Err   error
	Delay time.Duration
}

// ReadChunkAt implements rafs.ChunkReader.
func (r FailingReader) ReadChunkAt(ctx context.Context, b *rafs.Blob, c *rafs.Chunk, p []byte, off uint32) error {
	if r.Delay > 0 {
		select {
		case <-time.After(r.Delay):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return r.Err
}

// RequireRoot skips the test when not root: FUSE mounts need it. CI runs
// as root, so there the tests always run.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for FUSE mounts")
	}
}

// Mount serves fs at a fresh directory and unmounts it when the test
// ends (lazily if the filesystem is busy). opts may be nil.
func Mount(t testing.TB, fs fuse.RawFileSystem, opts *fuse.MountOptions) string {
	t.Helper()
	RequireRoot(t)
	mnt := t.TempDir()
	o := fuse.MountOptions{}
	if opts != nil {
		o = *opts
	}
	if o.FsName == "" {
		o.FsName = "fstest"
	}
	o.DirectMount = true
	if o.Logger == nil {
		// go-fuse logs splice fallbacks and unknown opcodes; tests
		// assert on results instead.
		o.Logger = log.New(io.Discard, "", 0)
	}
	if o.MaxWrite == 0 {
		o.MaxWrite = 1 << 20
	}
	srv, err := fuse.NewServer(fs, mnt, &o)
	if err != nil {
		t.Fatalf("mount %s: %v", mnt, err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		t.Fatalf("wait mount: %v", err)
	}
	t.Cleanup(func() { Unmount(t, srv, mnt) })
	return mnt
}

// Unmount unmounts mnt, falling back to a lazy detach so a stuck test
// never leaves a mount behind.
func Unmount(t testing.TB, srv *fuse.Server, mnt string) {
	done := make(chan error, 1)
	go func() { done <- srv.Unmount() }()
	select {
	case err := <-done:
		if err == nil {
			return
		}
		t.Logf("unmount %s: %v; detaching", mnt, err)
	case <-time.After(10 * time.Second):
		t.Logf("unmount %s timed out; detaching", mnt)
	}
	if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		t.Errorf("detach %s: %v", mnt, err)
	}
}

// ModelPaths lists the image's paths (relative, "" for the root).
func ModelPaths(img *rafs.Image) map[string]*rafs.Inode {
	out := map[string]*rafs.Inode{}
	img.Walk(func(p string, i *rafs.Inode) error {
		out[strings.TrimPrefix(p, "/")] = i
		return nil
	})
	return out
}

// CheckMounted compares the tree mounted at dir with img, read through cr:
// names, file types, permission bits, owners, sizes, mtimes, link counts,
// device numbers, symlink targets, xattrs, whole contents and random
// ranges (seeded by seed).
func CheckMounted(t testing.TB, img *rafs.Image, cr rafs.ChunkReader, dir string, seed int64) {
	t.Helper()
	rnd := newRand(seed)
	err := img.Walk(func(p string, i *rafs.Inode) error {
		hp := dir + p
		var st unix.Stat_t
		if err := unix.Lstat(hp, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", p, err)
		}
		if st.Mode != i.Mode || st.Uid != i.UID || st.Gid != i.GID {
			return fmt.Errorf("%s: mode/uid/gid %o/%d/%d, want %o/%d/%d", p, st.Mode, st.Uid, st.Gid, i.Mode, i.UID, i.GID)
		}
		if st.Mtim.Sec != i.Mtime || st.Mtim.Nsec != int64(i.MtimeNsec) {
			return fmt.Errorf("%s: mtime %d.%09d, want %d.%09d", p, st.Mtim.Sec, st.Mtim.Nsec, i.Mtime, i.MtimeNsec)
		}
		if want := max(i.Nlink, 1); uint32(st.Nlink) != want {
			return fmt.Errorf("%s: nlink %d, want %d", p, st.Nlink, want)
		}
		if !i.IsDir() && uint64(st.Size) != i.Size {
			return fmt.Errorf("%s: size %d, want %d", p, st.Size, i.Size)
		}
		if i.Mode&syscall.S_IFMT == syscall.S_IFCHR || i.Mode&syscall.S_IFMT == syscall.S_IFBLK {
			if st.Rdev != i.Rdev {
				return fmt.Errorf("%s: rdev %#x, want %#x", p, st.Rdev, i.Rdev)
			}
		}
		if img.HasXattrs() {
			if err := checkXattrs(hp, i); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
		switch {
		case i.IsSymlink():
			got, err := os.Readlink(hp)
			if err != nil || got != i.Target {
				return fmt.Errorf("%s: readlink %q, %v; want %q", p, got, err, i.Target)
			}
		case i.IsDir():
			ents, err := os.ReadDir(hp)
			if err != nil {
				return fmt.Errorf("readdir %s: %w", p, err)
			}
			if len(ents) != len(i.Entries) {
				return fmt.Errorf("%s: %d entries, want %d", p, len(ents), len(i.Entries))
			}
			for k, e := range ents {
				if e.Name() != i.Entries[k].Name {
					return fmt.Errorf("%s: entry %d is %q, want %q", p, k, e.Name(), i.Entries[k].Name)
				}
			}
		case i.IsRegular():
			if err := checkContent(img, cr, i, hp, rnd); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func checkXattrs(p string, i *rafs.Inode) error {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil {
		return fmt.Errorf("listxattr: %w", err)
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(p, buf)
	if err != nil {
		return fmt.Errorf("listxattr: %w", err)
	}
	var names []string
	for _, n := range strings.Split(string(buf[:sz]), "\x00") {
		if n != "" {
			names = append(names, n)
		}
	}
	if len(names) != len(i.Xattrs) {
		return fmt.Errorf("xattrs %q, want %d", names, len(i.Xattrs))
	}
	for k, x := range i.Xattrs {
		if names[k] != x.Name {
			return fmt.Errorf("xattr %d is %q, want %q", k, names[k], x.Name)
		}
		v := make([]byte, len(x.Value)+16)
		n, err := unix.Lgetxattr(p, x.Name, v)
		if err != nil || !bytes.Equal(v[:n], x.Value) {
			return fmt.Errorf("getxattr %s = %q, %v; want %q", x.Name, v[:max(n, 0)], err, x.Value)
		}
	}
	if _, err := unix.Lgetxattr(p, "user.fstest-missing", nil); !errors.Is(err, unix.ENODATA) {
		return fmt.Errorf("getxattr of a missing name: %v, want ENODATA", err)
	}
	return nil
}

func checkContent(img *rafs.Image, cr rafs.ChunkReader, i *rafs.Inode, p string, rnd *lcg) error {
	want := make([]byte, i.Size)
	if n, err := img.ReadAt(context.Background(), cr, i, want, 0); err != nil && !errors.Is(err, io.EOF) || uint64(n) != i.Size {
		return fmt.Errorf("model read: %d, %v", n, err)
	}
	got, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("content differs (%d bytes, want %d)", len(got), len(want))
	}
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if i.Size == 0 {
		return nil
	}
	scratch := make([]byte, min(3*int(img.ChunkSize), int(i.Size)+10))
	for range 8 {
		off := rnd.intn(int(i.Size) + 10)
		n := rnd.intn(len(scratch) + 1)
		buf := scratch[:n]
		m, err := f.ReadAt(buf, int64(off))
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("pread [%d,+%d): %w", off, n, err)
		}
		lo, hi := min(off, len(want)), min(off+n, len(want))
		if m != hi-lo || !bytes.Equal(buf[:m], want[lo:hi]) {
			return fmt.Errorf("pread [%d,+%d): %d bytes, differing from the model", off, n, m)
		}
	}
	return nil
}

// lcg is a tiny deterministic generator so failures reproduce by seed.
type lcg struct{ s uint64 }

func newRand(seed int64) *lcg { return &lcg{uint64(seed)*2862933555777941757 + 3037000493} }

func (r *lcg) intn(n int) int {
	if n <= 0 {
		return 0
	}
	r.s = r.s*6364136223846793005 + 1442695040888963407
	return int((r.s >> 33) % uint64(n))
}

// Bytes returns n pseudo-random, poorly compressible bytes.
func Bytes(seed int64, n int) []byte {
	r := newRand(seed)
	p := make([]byte, n)
	for k := range p {
		r.s = r.s*6364136223846793005 + 1442695040888963407
		p[k] = byte(r.s >> 56)
	}
	return p
}

// SetReadAhead raises the kernel readahead of the FUSE mount at mnt to kb
// KiB (the kernel offers only 128 KiB by default; see
// /work/shared/notes/fuse-performance.md). Failure is logged, not fatal:
// it only changes speed.
func SetReadAhead(t testing.TB, mnt string, kb int) {
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		t.Logf("readahead: stat %s: %v", mnt, err)
		return
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(p, []byte(fmt.Sprint(kb)), 0o644); err != nil {
		t.Logf("readahead: %v", err)
	}
}

// CompareTrees checks that the tree at got matches the tree at want on
// disk: names, file types, permission bits, owners, sizes, mtimes, link
// counts of non-directories, device numbers, symlink targets, contents and
// xattr names and values. The roots' own attributes are not compared.
func CompareTrees(t testing.TB, want, got string) {
	t.Helper()
	err := filepathWalk(want, func(rel string) error {
		wp, gp := want+rel, got+rel
		var ws, gs unix.Stat_t
		if err := unix.Lstat(wp, &ws); err != nil {
			return err
		}
		if err := unix.Lstat(gp, &gs); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if rel == "" {
			return nil
		}
		if ws.Mode != gs.Mode || ws.Uid != gs.Uid || ws.Gid != gs.Gid {
			return fmt.Errorf("%s: mode/uid/gid %o/%d/%d, want %o/%d/%d", rel, gs.Mode, gs.Uid, gs.Gid, ws.Mode, ws.Uid, ws.Gid)
		}
		if ws.Mtim != gs.Mtim {
			return fmt.Errorf("%s: mtime %v, want %v", rel, gs.Mtim, ws.Mtim)
		}
		isDir := ws.Mode&syscall.S_IFMT == syscall.S_IFDIR
		if !isDir && (ws.Size != gs.Size || ws.Nlink != gs.Nlink) {
			return fmt.Errorf("%s: size/nlink %d/%d, want %d/%d", rel, gs.Size, gs.Nlink, ws.Size, ws.Nlink)
		}
		if ws.Rdev != gs.Rdev && (ws.Mode&syscall.S_IFMT == syscall.S_IFCHR || ws.Mode&syscall.S_IFMT == syscall.S_IFBLK) {
			return fmt.Errorf("%s: rdev %#x, want %#x", rel, gs.Rdev, ws.Rdev)
		}
		if err := sameXattrs(wp, gp); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		switch ws.Mode & syscall.S_IFMT {
		case syscall.S_IFLNK:
			a, _ := os.Readlink(wp)
			b, err := os.Readlink(gp)
			if err != nil || a != b {
				return fmt.Errorf("%s: readlink %q, %v; want %q", rel, b, err, a)
			}
		case syscall.S_IFREG:
			a, err := os.ReadFile(wp)
			if err != nil {
				return err
			}
			b, err := os.ReadFile(gp)
			if err != nil || !bytes.Equal(a, b) {
				return fmt.Errorf("%s: content differs (%d vs %d bytes, %v)", rel, len(b), len(a), err)
			}
		case syscall.S_IFDIR:
			a, _ := os.ReadDir(wp)
			b, err := os.ReadDir(gp)
			if err != nil || len(a) != len(b) {
				return fmt.Errorf("%s: %d entries, want %d (%v)", rel, len(b), len(a), err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func filepathWalk(root string, fn func(rel string) error) error {
	var walk func(rel string) error
	walk = func(rel string) error {
		if err := fn(rel); err != nil {
			return err
		}
		fi, err := os.Lstat(root + rel)
		if err != nil || !fi.IsDir() {
			return err
		}
		ents, err := os.ReadDir(root + rel)
		if err != nil {
			return err
		}
		for _, e := range ents {
			if err := walk(rel + "/" + e.Name()); err != nil {
				return err
			}
		}
		return nil
	}
	return walk("")
}

func listXattrs(p string) (map[string]string, error) {
	out := map[string]string{}
	sz, err := unix.Llistxattr(p, nil)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) {
		return out, nil
	}
	if err != nil || sz == 0 {
		return out, err
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	for _, n := range strings.Split(string(buf[:sz]), "\x00") {
		if n == "" {
			continue
		}
		v := make([]byte, 65536)
		k, err := unix.Lgetxattr(p, n, v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", n, err)
		}
		out[n] = string(v[:k])
	}
	return out, nil
}

func sameXattrs(want, got string) error {
	a, err := listXattrs(want)
	if err != nil {
		return err
	}
	b, err := listXattrs(got)
	if err != nil {
		return err
	}
	if fmt.Sprint(a) != fmt.Sprint(b) {
		return fmt.Errorf("xattrs %v, want %v", b, a)
	}
	return nil
}

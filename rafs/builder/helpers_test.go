package builder

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/builder/unpack"
)

// built is an image with its new blob stored in a blob dir.
type built struct {
	img     *rafs.Image
	blob    *rafs.Blob
	blobDir string
}

func (b built) reader() rafs.BlobChunkReader { return blobDirReader(b.blobDir) }

var (
	openMu    sync.Mutex
	openBlobs = map[string]*os.File{}
)

// blobDirReader reads blobs from dir, keeping each open for the rest of
// the test binary (blob files are never rewritten under one name).
func blobDirReader(dir string) rafs.BlobChunkReader {
	return rafs.BlobChunkReader{Open: func(bl *rafs.Blob) (io.ReaderAt, error) {
		p := filepath.Join(dir, bl.ID)
		openMu.Lock()
		defer openMu.Unlock()
		if f, ok := openBlobs[p]; ok {
			return f, nil
		}
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		openBlobs[p] = f
		return f, nil
	}}
}

// build runs one build; add is AddDir or AddTar on the builder.
func build(t testing.TB, opts Options, blobDir string, add func(b *Builder) error) built {
	t.Helper()
	if blobDir == "" {
		blobDir = t.TempDir()
	}
	f, err := os.CreateTemp(blobDir, ".blob-*")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := New(opts, f)
	if err != nil {
		t.Fatal(err)
	}
	if err := add(b); err != nil {
		t.Fatal(err)
	}
	res, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if res.Blob != nil {
		if err := os.Rename(f.Name(), filepath.Join(blobDir, res.Blob.ID)); err != nil {
			t.Fatal(err)
		}
	} else {
		os.Remove(f.Name())
	}
	return built{res.Image, res.Blob, blobDir}
}

func buildDir(t testing.TB, opts Options, src string) built {
	return build(t, opts, "", func(b *Builder) error { return b.AddDir(context.Background(), src) })
}

// tmpfsDir returns a fresh directory on a tmpfs mounted for the test:
// big trees are created and compared in RAM instead of on the CI disk.
func tmpfsDir(t testing.TB) string {
	t.Helper()
	d := t.TempDir()
	if err := unix.Mount("tmpfs", d, "tmpfs", 0, "size=2g,mode=0755"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(d, 0); err != nil {
			unix.Unmount(d, unix.MNT_DETACH)
		}
	})
	return d
}

func unpackDir(t testing.TB, img *rafs.Image, cr rafs.ChunkReader) string {
	t.Helper()
	return unpackInto(t, img, cr, t.TempDir())
}

func unpackInto(t testing.TB, img *rafs.Image, cr rafs.ChunkReader, out string) string {
	t.Helper()
	if err := unpack.ToDir(context.Background(), img, cr, out); err != nil {
		t.Fatal(err)
	}
	return out
}

// fileInfo is everything compared between two trees for one path.
type fileInfo struct {
	mode     uint32
	uid, gid uint32
	size     int64
	mtime    unix.Timespec
	rdev     uint64
	nlink    uint64
	target   string
	xattrs   string
	content  string // sha of content, for regular files
	linkID   int    // hardlink group, numbered by first path in walk order
}

// snapshot describes a tree for comparison; hardlink groups are
// numbered in walk order so that they compare across trees. Contents and
// xattrs are read by one worker per CPU.
func snapshot(t testing.TB, root string) map[string]fileInfo {
	t.Helper()
	type item struct {
		rel, path string
		fi        fileInfo
	}
	var items []*item
	groups := map[[2]uint64]int{}
	err := filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		fi := fileInfo{mode: st.Mode, uid: st.Uid, gid: st.Gid, mtime: st.Mtim, nlink: uint64(st.Nlink)}
		typ := st.Mode & syscall.S_IFMT
		switch typ {
		case syscall.S_IFREG:
			fi.size = st.Size
		case syscall.S_IFCHR, syscall.S_IFBLK:
			fi.rdev = st.Rdev
		}
		if typ != syscall.S_IFDIR {
			key := [2]uint64{st.Dev, st.Ino}
			if _, ok := groups[key]; !ok {
				groups[key] = len(groups)
			}
			fi.linkID = groups[key]
		}
		items = append(items, &item{rel, p, fi})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	ch := make(chan *item)
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range ch {
				if err := fillSnapshot(it.path, &it.fi); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	for _, it := range items {
		ch <- it
	}
	close(ch)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	out := make(map[string]fileInfo, len(items))
	for _, it := range items {
		out[it.rel] = it.fi
	}
	return out
}

func fillSnapshot(p string, fi *fileInfo) error {
	switch fi.mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		fi.content = fmt.Sprintf("%x", rafsSum(data))
	case syscall.S_IFLNK:
		fi.target, _ = os.Readlink(p)
	}
	xs, err := readXattrs(p)
	if err != nil {
		return err
	}
	var sb strings.Builder
	for _, x := range xs {
		fmt.Fprintf(&sb, "%s=%q;", x.Name, x.Value)
	}
	fi.xattrs = sb.String()
	return nil
}

func rafsSum(b []byte) [32]byte { return sha256Sum(b) }

func compareTrees(t testing.TB, want, got string) {
	t.Helper()
	w, g := snapshot(t, want), snapshot(t, got)
	var paths []string
	for p := range w {
		paths = append(paths, p)
	}
	for p := range g {
		if _, ok := w[p]; !ok {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	bad := 0
	for _, p := range paths {
		wi, wok := w[p]
		gi, gok := g[p]
		switch {
		case !wok:
			t.Errorf("%s: extra in unpacked tree", p)
		case !gok:
			t.Errorf("%s: missing from unpacked tree", p)
		case wi != gi:
			t.Errorf("%s:\n want %+v\n  got %+v", p, wi, gi)
		default:
			continue
		}
		if bad++; bad > 20 {
			t.Fatal("too many differences")
		}
	}
}

// writeFile creates a file with content and attributes.
func writeFile(t testing.TB, p string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// setTimes gives every path of root a distinct ns mtime, directories
// last (deepest first) so that later changes do not touch them.
func setTimes(t testing.TB, root string) {
	t.Helper()
	var paths []string
	filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err == nil {
			paths = append(paths, p)
		}
		return nil
	})
	for k := len(paths) - 1; k >= 0; k-- {
		ts := unix.Timespec{Sec: 1_600_000_000 + int64(k), Nsec: int64(k*7919) % 1e9}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, paths[k], []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			t.Fatal(err)
		}
	}
}

func pseudoRandom(n int, seed byte) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for k := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[k] = byte(x)
	}
	return b
}

// genTree makes a tree with every kind of file and attribute the builder
// must keep.
func genTree(t testing.TB, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(root, "empty"), nil)
	writeFile(t, filepath.Join(root, "small.txt"), []byte("hello, rafs\n"))
	// Large, with a repeated chunk (dedup within a file) and an odd tail.
	big := append(append(pseudoRandom(1<<20, 1), pseudoRandom(1<<20, 1)...), pseudoRandom(300_001, 2)...)
	writeFile(t, filepath.Join(root, "big/large.bin"), big)
	writeFile(t, filepath.Join(root, "big/compressible.txt"), bytes.Repeat([]byte("compress me "), 200_000))
	// Sparse: 8 MiB hole with data at 5 MiB.
	f, err := os.Create(filepath.Join(root, "big/sparse"))
	must(err)
	_, err = f.WriteAt(pseudoRandom(10000, 3), 5<<20)
	must(err)
	must(f.Truncate(8 << 20))
	f.Close()
	// Deep path.
	deep := root
	for k := range 40 {
		deep = filepath.Join(deep, fmt.Sprintf("d%02d", k))
	}
	writeFile(t, filepath.Join(deep, "leaf"), []byte("deep"))
	// Hardlinks across directories.
	writeFile(t, filepath.Join(root, "links/a"), []byte("linked content"))
	must(os.MkdirAll(filepath.Join(root, "links/sub"), 0o755))
	must(os.Link(filepath.Join(root, "links/a"), filepath.Join(root, "links/b")))
	must(os.Link(filepath.Join(root, "links/a"), filepath.Join(root, "links/sub/c")))
	// Symlinks: relative, absolute, dangling, odd.
	must(os.Symlink("../small.txt", filepath.Join(root, "links/rel")))
	must(os.Symlink("/etc/passwd", filepath.Join(root, "links/abs")))
	must(os.Symlink("does/not/exist", filepath.Join(root, "links/dangling")))
	must(os.Symlink("/////////////////", filepath.Join(root, "links/slashes")))
	// Special files.
	must(os.MkdirAll(filepath.Join(root, "dev"), 0o755))
	must(unix.Mknod(filepath.Join(root, "dev/null"), syscall.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mknod(filepath.Join(root, "dev/loop9"), syscall.S_IFBLK|0o660, int(unix.Mkdev(7, 9))))
	must(unix.Mkfifo(filepath.Join(root, "dev/fifo"), 0o640))
	// Names: unicode, 255 bytes, odd characters.
	writeFile(t, filepath.Join(root, "names/héllo wörld ✓ 日本語"), []byte("unicode"))
	writeFile(t, filepath.Join(root, "names", strings.Repeat("n", 255)), []byte("long name"))
	writeFile(t, filepath.Join(root, "names", strings.Repeat("é", 127)+"x"), []byte("long unicode name"))
	writeFile(t, filepath.Join(root, "names/.hidden"), []byte("dot"))
	writeFile(t, filepath.Join(root, "names/with\nnewline"), []byte("nl"))
	// Owners, modes, xattrs.
	writeFile(t, filepath.Join(root, "attrs/owned"), []byte("owned"))
	must(os.Lchown(filepath.Join(root, "attrs/owned"), 1234, 5678))
	must(os.Chmod(filepath.Join(root, "attrs/owned"), 0o4751))
	must(os.Lchown(filepath.Join(root, "links/rel"), 42, 43))
	must(unix.Lsetxattr(filepath.Join(root, "attrs/owned"), "user.comment", []byte("a value"), 0))
	must(unix.Lsetxattr(filepath.Join(root, "attrs/owned"), "trusted.overlay.x", []byte{0, 1, 2, 255}, 0))
	must(unix.Lsetxattr(filepath.Join(root, "attrs/owned"), "user.empty", nil, 0))
	must(unix.Lsetxattr(filepath.Join(root, "attrs"), "user.dir", []byte("on a dir"), 0))
	must(unix.Lsetxattr(filepath.Join(root, "links/rel"), "trusted.sym", []byte("on a symlink"), 0))
	must(os.Mkdir(filepath.Join(root, "attrs/sticky"), 0o1777))
	must(os.Chmod(filepath.Join(root, "attrs/sticky"), 0o1777))
	must(os.Mkdir(filepath.Join(root, "attrs/emptydir"), 0o700))
	setTimes(t, root)
}

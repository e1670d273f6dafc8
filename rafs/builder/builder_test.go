package builder

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/internal/testutil"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/builder/unpack"
	"github.com/rafsd/rafsd/rafs/codec"
)

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (devices, owners, trusted xattrs); the suite runs as root")
	}
}

func ptr[T any](v T) *T { return &v }

func TestDirRoundTrip(t *testing.T) {
	requireRoot(t)
	src := t.TempDir()
	genTree(t, src)
	for _, version := range []int{5, 6} {
		t.Run(fmt.Sprint("v", version), func(t *testing.T) {
			b := buildDir(t, Options{Version: version, ChunkSize: 64 << 10}, src)
			checkBlob(t, b)
			for _, img := range roundTrips(t, b.img) {
				compareTrees(t, src, unpackDir(t, img, b.reader()))
			}
		})
	}
}

// TestTarRoundTrip writes the image of a tree as a tar (plain, gzip,
// zstd), builds from that tar and compares with the tree.
func TestTarRoundTrip(t *testing.T) {
	requireRoot(t)
	src := t.TempDir()
	genTree(t, src)
	a := buildDir(t, Options{}, src)
	var plain bytes.Buffer
	if err := unpack.ToTar(context.Background(), a.img, a.reader(), &plain); err != nil {
		t.Fatal(err)
	}
	var gz, zs bytes.Buffer
	gw := gzip.NewWriter(&gz)
	gw.Write(plain.Bytes())
	gw.Close()
	zw, _ := zstd.NewWriter(&zs)
	zw.Write(plain.Bytes())
	zw.Close()
	for name, data := range map[string][]byte{"plain": plain.Bytes(), "gzip": gz.Bytes(), "zstd": zs.Bytes()} {
		t.Run(name, func(t *testing.T) {
			b := build(t, Options{Compressor: ptr(codec.LZ4Block), Digester: ptr(codec.SHA256)}, "", func(b *Builder) error {
				return b.AddTar(context.Background(), bytes.NewReader(data))
			})
			checkBlob(t, b)
			for _, img := range roundTrips(t, b.img) {
				compareTrees(t, src, unpackDir(t, img, b.reader()))
			}
		})
	}
}

// TestCodecs builds with every compressor and digester and reads back.
func TestCodecs(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "a"), append(pseudoRandom(50_000, 9), bytes.Repeat([]byte("z"), 90_000)...))
	writeFile(t, filepath.Join(src, "b"), bytes.Repeat([]byte("z"), 16<<10)) // same chunk as part of a
	for _, c := range []codec.Compressor{codec.None, codec.LZ4Block, codec.Gzip, codec.Zstd} {
		for _, d := range []codec.Digester{codec.Blake3, codec.SHA256} {
			b := buildDir(t, Options{ChunkSize: 16 << 10, Compressor: &c, Digester: &d}, src)
			checkBlob(t, b)
			if b.blob.Compressor != c || b.blob.Digester != d {
				t.Errorf("%s/%s: blob says %s/%s", c, d, b.blob.Compressor, b.blob.Digester)
			}
			for _, name := range []string{"a", "b"} {
				i, err := b.img.Lookup(b.img.Root(), name)
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, i.Size)
				if _, err := b.img.ReadAt(context.Background(), b.reader(), i, got, 0); err != nil {
					t.Fatalf("%s/%s %s: %v", c, d, name, err)
				}
				want, _ := os.ReadFile(filepath.Join(src, name))
				if !bytes.Equal(got, want) {
					t.Errorf("%s/%s: %s differs", c, d, name)
				}
			}
		}
	}
}

// checkBlob verifies the blob's invariants: named by its sha256, chunks
// 4 KiB aligned uncompressed, raw blobs with file offset == uncompressed
// offset, and (v6) a blob meta that matches the chunk table.
func checkBlob(t *testing.T, b built) {
	t.Helper()
	if b.blob == nil {
		t.Fatal("no blob")
	}
	data, err := os.ReadFile(filepath.Join(b.blobDir, b.blob.ID))
	if err != nil {
		t.Fatal(err)
	}
	if id := fmt.Sprintf("%x", sha256.Sum256(data)); id != b.blob.ID || uint64(len(data)) != b.blob.CompressedSize {
		t.Fatalf("blob %s: sha256 %s, %d bytes (says %d)", b.blob.ID, id, len(data), b.blob.CompressedSize)
	}
	chunks := map[uint32]*rafs.Chunk{}
	for _, i := range b.img.Inodes {
		for _, fc := range i.Chunks {
			if b.img.Blobs[fc.BlobIndex] != b.blob {
				continue
			}
			chunks[fc.Index] = fc.Chunk
			if fc.UncompressedOffset%4096 != 0 {
				t.Errorf("chunk %d: uncompressed offset %d not aligned", fc.Index, fc.UncompressedOffset)
			}
			if b.blob.Compressor == codec.None && fc.CompressedOffset != fc.UncompressedOffset {
				t.Errorf("chunk %d: raw blob but compressed offset %d != %d", fc.Index, fc.CompressedOffset, fc.UncompressedOffset)
			}
		}
	}
	if uint32(len(chunks)) != b.blob.ChunkCount {
		t.Errorf("%d chunks referenced, blob has %d", len(chunks), b.blob.ChunkCount)
	}
	if b.img.Version != 6 {
		if b.blob.Meta.CompressedSize != 0 {
			t.Errorf("v5 blob with blob meta")
		}
		return
	}
	m, err := blobmeta.ReadTail(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	if m.Header.CIOffset != b.blob.Meta.Offset || m.Header.CICompressedSize != b.blob.Meta.CompressedSize || m.Header.Features != b.blob.Features {
		t.Errorf("blob meta header %+v vs blob %+v", m.Header, b.blob)
	}
	for k, ci := range m.Chunks {
		c := chunks[uint32(k)]
		if c == nil {
			t.Errorf("blob meta entry %d: no such chunk", k)
			continue
		}
		if ci.CompressedOffset != c.CompressedOffset || ci.CompressedSize != c.CompressedSize ||
			ci.UncompressedOffset != c.UncompressedOffset || ci.UncompressedSize != c.UncompressedSize || ci.Compressed != c.Compressed {
			t.Errorf("blob meta entry %d: %+v, chunk %+v", k, ci, c)
		}
	}
}

func TestDedupAndSparse(t *testing.T) {
	src := t.TempDir()
	data := pseudoRandom(64<<10, 5)
	writeFile(t, filepath.Join(src, "one"), data)
	writeFile(t, filepath.Join(src, "two"), data)
	f, _ := os.Create(filepath.Join(src, "sparse"))
	f.Truncate(10 << 20)
	f.Close()
	b := buildDir(t, Options{ChunkSize: 64 << 10}, src)
	// one chunk for one/two, one zero chunk for all 160 chunks of the
	// sparse file: nydus stores holes as (deduplicated) zero chunks.
	if b.blob.ChunkCount != 2 {
		t.Errorf("%d chunks stored, want 2", b.blob.ChunkCount)
	}
	sp, _ := b.img.Lookup(b.img.Root(), "sparse")
	if len(sp.Chunks) != 160 || sp.Size != 10<<20 {
		t.Errorf("sparse: %d chunks, size %d", len(sp.Chunks), sp.Size)
	}
}

// TestAllEntryTypeFixture builds nydus's all-entry-type.tar.
func TestAllEntryTypeFixture(t *testing.T) {
	f, err := os.Open(filepath.Join(testutil.NydusFixtures(), "tar/all-entry-type.tar"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := build(t, Options{}, "", func(b *Builder) error { return b.AddTar(context.Background(), f) })
	img := b.img
	look := func(p string) *rafs.Inode {
		t.Helper()
		var n *rafs.Inode = img.Root()
		for _, part := range strings.Split(p, "/") {
			c, err := img.Lookup(n, part)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			n = c
		}
		return n
	}
	h := look("tar/dir1/dir3/hardlink1.txt")
	for _, p := range []string{"tar/dir1/dir3/xfile.txt", "tar/dir1/hardlink2.txt", "tar/dir2/hardlink3.txt"} {
		if look(p) != h {
			t.Errorf("%s is not the same inode as hardlink1.txt", p)
		}
	}
	if h.Nlink != 4 || h.Size != 15 {
		t.Errorf("hardlink1.txt: nlink %d size %d", h.Nlink, h.Size)
	}
	s := look("tar/dir2/symlink1.txt")
	if !s.IsSymlink() || s.Target != "../dir1/dir3/file1.txt" {
		t.Errorf("symlink1.txt: mode %o target %q", s.Mode, s.Target)
	}
	got := make([]byte, 15)
	if _, err := img.ReadAt(context.Background(), b.reader(), h, got, 0); err != nil {
		t.Fatal(err)
	}
	for _, img := range roundTrips(t, img) {
		compareTrees(t, unpackDir(t, b.img, b.reader()), unpackDir(t, img, b.reader()))
	}
}

// TestHostileTars feeds malformed layers: each must fail with ErrTar.
func TestHostileTars(t *testing.T) {
	mk := func(hdrs ...*tar.Header) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, h := range hdrs {
			tw.WriteHeader(h)
			if h.Typeflag == tar.TypeReg {
				tw.Write(make([]byte, h.Size))
			}
		}
		tw.Close()
		return buf.Bytes()
	}
	cases := map[string][]byte{
		"dotdot":        mk(&tar.Header{Name: "../evil", Typeflag: tar.TypeReg, Mode: 0o644}),
		"dotdot-mid":    mk(&tar.Header{Name: "a/../../evil", Typeflag: tar.TypeReg, Mode: 0o644}),
		"link-missing":  mk(&tar.Header{Name: "a", Typeflag: tar.TypeLink, Linkname: "nope"}),
		"link-dir":      mk(&tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755}, &tar.Header{Name: "a", Typeflag: tar.TypeLink, Linkname: "d"}),
		"link-root":     mk(&tar.Header{Name: "a", Typeflag: tar.TypeLink, Linkname: "/"}),
		"root-file":     mk(&tar.Header{Name: ".", Typeflag: tar.TypeReg, Mode: 0o644}),
		"long-name":     mk(&tar.Header{Name: strings.Repeat("x", 256), Typeflag: tar.TypeReg, Mode: 0o644, Format: tar.FormatPAX}),
		"path-max":      mk(&tar.Header{Name: strings.Repeat("a/", 2500) + "f", Typeflag: tar.TypeReg, Mode: 0o644, Format: tar.FormatPAX}),
		"empty-symlink": mk(&tar.Header{Name: "s", Typeflag: tar.TypeSymlink}),
		"truncated":     mk(&tar.Header{Name: "f", Typeflag: tar.TypeReg, Size: 100000})[:1536],
		"garbage":       bytes.Repeat([]byte{0x55}, 4096),
		"bad-gzip":      {0x1f, 0x8b, 8, 0, 1, 2, 3},
		"bad-zstd":      {0x28, 0xb5, 0x2f, 0xfd, 9, 9, 9, 9},
		"negative-uid":  mk(&tar.Header{Name: "f", Typeflag: tar.TypeReg, Uid: -5, Format: tar.FormatPAX}),
		"xattr-no-name": mk(&tar.Header{Name: "f", Typeflag: tar.TypeReg, PAXRecords: map[string]string{"SCHILY.xattr.": "v"}}),
		"unknown-type":  mk(&tar.Header{Name: "f", Typeflag: 'Z'}),
	}
	for name, data := range cases {
		b, err := New(Options{}, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		err = b.AddTar(context.Background(), bytes.NewReader(data))
		if err == nil {
			if _, err = b.Finish(); err == nil {
				t.Errorf("%s: built", name)
				continue
			}
		}
		if !errors.Is(err, ErrTar) {
			t.Errorf("%s: error %v does not wrap ErrTar", name, err)
		}
	}
}

func TestOptions(t *testing.T) {
	for _, o := range []Options{{Version: 4}, {ChunkSize: 1000}, {ChunkSize: 32 << 20}, {Compressor: ptr(codec.Compressor(7))}} {
		if _, err := New(o, io.Discard); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
	b, _ := New(Options{}, io.Discard)
	if err := b.AddTar(context.Background(), bytes.NewReader(nil)); err != nil {
		t.Fatal(err)
	}
	if err := b.AddDir(context.Background(), t.TempDir()); err == nil {
		t.Error("second layer accepted")
	}
	res, err := b.Finish()
	if err != nil || res.Blob != nil || len(res.Image.Inodes) != 1 {
		t.Fatalf("empty layer: %v %+v", err, res)
	}
	if _, err := b.Finish(); err == nil {
		t.Error("second Finish accepted")
	}
}

func TestPrefetch(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "0first"), []byte("z"))
	writeFile(t, filepath.Join(src, "a/b"), []byte("x"))
	writeFile(t, filepath.Join(src, "c"), []byte("y"))
	if err := os.Symlink("/usr", filepath.Join(src, "usr")); err != nil {
		t.Fatal(err)
	}
	b := buildDir(t, Options{Prefetch: []string{"/c", "/a", "/missing", "/usr/bin"}}, src)
	c, _ := b.img.Lookup(b.img.Root(), "c")
	a, _ := b.img.Lookup(b.img.Root(), "a")
	if len(b.img.Prefetch) != 2 || b.img.Prefetch[0] != c.Ino || b.img.Prefetch[1] != a.Ino {
		t.Errorf("prefetch %v, want [%d %d]", b.img.Prefetch, c.Ino, a.Ino)
	}
	if b.blob.ChunkCount != 3 {
		t.Errorf("%d chunks stored, want 3 (nothing through the /usr symlink)", b.blob.ChunkCount)
	}
	// Prefetched data comes first in the blob, in prefetch order.
	ab, _ := b.img.Lookup(a, "b")
	if c.Chunks[0].Index != 0 || ab.Chunks[0].Index != 1 {
		t.Errorf("blob order: c at %d, a/b at %d", c.Chunks[0].Index, ab.Chunks[0].Index)
	}
}

func TestManyFiles(t *testing.T) {
	requireRoot(t)
	t0 := time.Now()
	n := 100_000
	src := tmpfsDir(t)
	for k := range n {
		d := filepath.Join(src, fmt.Sprintf("d%03d", k%300))
		if k < 300 {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("file-%06d", k)), []byte(fmt.Sprintf("content of file %d\n", k%5000)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("generate: %v", time.Since(t0))
	setTimes(t, src)
	t0 = time.Now()
	b := buildDir(t, Options{ChunkSize: 4096}, src)
	t.Logf("build: %v", time.Since(t0))
	if got := len(b.img.Inodes); got != n+301 {
		t.Fatalf("%d inodes, want %d", got, n+301)
	}
	if b.blob.ChunkCount != 5000 {
		t.Errorf("%d chunks stored, want 5000 (deduplicated)", b.blob.ChunkCount)
	}
	for _, img := range roundTrips(t, b.img)[1:] {
		if len(img.Inodes) != len(b.img.Inodes) {
			t.Errorf("v%d: %d inodes", img.Version, len(img.Inodes))
		}
	}
	t0 = time.Now()
	out := unpackInto(t, b.img, b.reader(), tmpfsDir(t))
	t.Logf("unpack: %v", time.Since(t0))
	t0 = time.Now()
	compareTrees(t, src, out)
	t.Logf("compare: %v", time.Since(t0))
}

// TestSymlinkDevices checks the modes the builder records for special
// files against what stat(2) reports for them.
func TestSpecialModes(t *testing.T) {
	requireRoot(t)
	src := t.TempDir()
	genTree(t, src)
	b := buildDir(t, Options{}, src)
	want := map[string]uint32{"dev/null": syscall.S_IFCHR, "dev/loop9": syscall.S_IFBLK, "dev/fifo": syscall.S_IFIFO, "links/rel": syscall.S_IFLNK}
	err := b.img.Walk(func(p string, i *rafs.Inode) error {
		if typ, ok := want[strings.TrimPrefix(p, "/")]; ok {
			if i.Mode&syscall.S_IFMT != typ {
				t.Errorf("%s: mode %o", p, i.Mode)
			}
			delete(want, strings.TrimPrefix(p, "/"))
		}
		return nil
	})
	if err != nil || len(want) != 0 {
		t.Errorf("walk: %v, not found %v", err, want)
	}
}

func FuzzAddTar(f *testing.F) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755})
	tw.WriteHeader(&tar.Header{Name: "d/f", Typeflag: tar.TypeReg, Mode: 0o644, Size: 5, PAXRecords: map[string]string{"SCHILY.xattr.user.a": "b"}})
	tw.Write([]byte("hello"))
	tw.WriteHeader(&tar.Header{Name: "d/l", Typeflag: tar.TypeLink, Linkname: "d/f"})
	tw.WriteHeader(&tar.Header{Name: "d/.wh.x", Typeflag: tar.TypeReg})
	tw.WriteHeader(&tar.Header{Name: "s", Typeflag: tar.TypeSymlink, Linkname: "d/f"})
	tw.Close()
	f.Add(buf.Bytes())
	if fx, err := os.ReadFile(filepath.Join(testutil.NydusFixtures(), "tar/all-entry-type.tar")); err == nil {
		f.Add(fx)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := New(Options{ChunkSize: 4096}, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.AddTar(context.Background(), bytes.NewReader(data)); err != nil {
			return
		}
		res, err := b.Finish()
		if err != nil {
			t.Fatalf("tar accepted but image invalid: %v", err)
		}
		if err := res.Image.Validate(); err != nil {
			t.Fatal(err)
		}
	})
}

// TestSparseTar builds from GNU tar's sparse encodings (old GNU and PAX
// 1.0), which archive/tar expands into holes of zeros.
func TestSparseTar(t *testing.T) {
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	data := pseudoRandom(5000, 7)
	f.WriteAt(data, 3<<20)
	f.Truncate(6 << 20)
	f.Close()
	want, _ := os.ReadFile(filepath.Join(src, "sparse"))
	for _, format := range []string{"gnu", "posix"} {
		out := filepath.Join(t.TempDir(), "l.tar")
		cmd := exec.Command("tar", "--sparse", "--format="+format, "-cf", out, "-C", src, "sparse")
		if msg, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("tar: %v\n%s", err, msg)
		}
		tf, _ := os.Open(out)
		b := build(t, Options{ChunkSize: 1 << 20}, "", func(b *Builder) error { return b.AddTar(context.Background(), tf) })
		tf.Close()
		i, err := b.img.Lookup(b.img.Root(), "sparse")
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, i.Size)
		if _, err := b.img.ReadAt(context.Background(), b.reader(), i, got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: sparse file differs", format)
		}
		if b.blob.ChunkCount != 2 { // the zero chunk and the one with data
			t.Errorf("%s: %d chunks stored", format, b.blob.ChunkCount)
		}
	}
}

// TestLoneDirLayerDropsWhiteouts: like nydus-image, a directory layer
// built without a parent leaves whiteout markers out of the image.
func TestLoneDirLayerDropsWhiteouts(t *testing.T) {
	src := t.TempDir()
	writeFile(t, filepath.Join(src, ".wh.gone"), nil)
	writeFile(t, filepath.Join(src, "d/.wh..wh..opq"), nil)
	writeFile(t, filepath.Join(src, "d/kept"), []byte("k"))
	b := buildDir(t, Options{}, src)
	var paths []string
	b.img.Walk(func(p string, _ *rafs.Inode) error { paths = append(paths, p); return nil })
	if strings.Join(paths, " ") != "/ /d /d/kept" {
		t.Errorf("paths %q", paths)
	}
}

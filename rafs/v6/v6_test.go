package v6

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	goerofs "github.com/erofs/go-erofs"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/erofs"
	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

const fixture = "testdata/v6-zstd-blake3"

func readFile(t testing.TB, path string) *rafs.Image {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	img, err := Read(f, fi.Size())
	if err != nil {
		t.Fatalf("Read %s: %v", path, err)
	}
	return img
}

// dirReader opens blobs by id from a directory, as a localfs backend does.
func dirReader(dir string) rafs.BlobChunkReader {
	return rafs.BlobChunkReader{Open: func(b *rafs.Blob) (io.ReaderAt, error) {
		return os.Open(filepath.Join(dir, b.ID))
	}}
}

func readAllFile(t testing.TB, img *rafs.Image, cr rafs.ChunkReader, in *rafs.Inode) []byte {
	t.Helper()
	buf := make([]byte, in.Size)
	n, err := img.ReadAt(context.Background(), cr, in, buf, 0)
	if err != nil && err != io.EOF {
		t.Fatalf("read inode %d: %v", in.Ino, err)
	}
	return buf[:n]
}

// TestReadNydusFixture decodes a bootstrap built by nydus-image and reads
// every file back through its digest-checked chunks.
func TestReadNydusFixture(t *testing.T) {
	img := readFile(t, filepath.Join(fixture, "bootstrap"))
	if img.Version != 6 || img.Compressor != codec.Zstd || img.Digester != codec.Blake3 || img.ChunkSize != 1<<20 {
		t.Fatalf("image %d %s %s %#x", img.Version, img.Compressor, img.Digester, img.ChunkSize)
	}
	if len(img.Blobs) != 1 || img.Blobs[0].ID != "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef" {
		t.Fatalf("blobs %+v", img.Blobs)
	}
	cr := dirReader(filepath.Join(fixture, "blobs"))
	var names []string
	err := img.Walk(func(p string, in *rafs.Inode) error {
		if !in.IsRegular() {
			return nil
		}
		names = append(names, p)
		want, err := os.ReadFile(filepath.Join(fixture, "source", p))
		if err != nil {
			return err
		}
		if got := readAllFile(t, img, cr, in); !bytes.Equal(got, want) || in.Size != uint64(len(want)) {
			return fmt.Errorf("%s: %d bytes read differ from source's %d", p, len(got), len(want))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(names) != "[/lib.rs /sync_io.rs]" {
		t.Fatalf("files %v", names)
	}
}

// builder makes rafs.Images in tests, with an uncompressed blob whose
// chunks are 4 KiB aligned so the blob is also an EROFS device.
type builder struct {
	img    *rafs.Image
	blob   []byte
	chunks map[codec.Digest]*rafs.Chunk
}

const testChunkSize = 16 << 10

func newBuilder() *builder {
	b := &builder{img: &rafs.Image{Version: 6, ChunkSize: testChunkSize, Compressor: codec.None, Digester: codec.SHA256},
		chunks: map[codec.Digest]*rafs.Chunk{}}
	b.add(&rafs.Inode{Mode: syscall.S_IFDIR | 0o755, Mtime: 1700000000, MtimeNsec: 5}, 0, "")
	return b
}

// add appends inode i under directory parent (0: i is the root).
func (b *builder) add(i *rafs.Inode, parent uint64, name string) *rafs.Inode {
	i.Ino = uint64(len(b.img.Inodes) + 1)
	i.Parent = parent
	if parent == 0 {
		i.Parent = i.Ino
	}
	if i.Nlink == 0 {
		i.Nlink = 1
		if i.IsDir() {
			i.Nlink = 2
		}
	}
	b.img.Inodes = append(b.img.Inodes, i)
	if parent != 0 {
		b.link(i, parent, name)
		if i.IsDir() {
			b.img.Inodes[parent-1].Nlink++
		}
	}
	return i
}

func (b *builder) link(i *rafs.Inode, parent uint64, name string) {
	d := b.img.Inodes[parent-1]
	d.Entries = append(d.Entries, rafs.Dirent{Name: name, Ino: i.Ino})
}

func (b *builder) dir(parent uint64, name string) *rafs.Inode {
	return b.add(&rafs.Inode{Mode: syscall.S_IFDIR | 0o755, UID: 1, GID: 2, Mtime: 1600000000, MtimeNsec: 7}, parent, name)
}

// file adds a regular file; holes lists chunk slots left as holes.
func (b *builder) file(parent uint64, name string, data []byte, holes ...int) *rafs.Inode {
	in := b.add(&rafs.Inode{Mode: syscall.S_IFREG | 0o644, UID: 1000, GID: 1000, Size: uint64(len(data)), Mtime: 1690000000, MtimeNsec: 123456789}, parent, name)
	isHole := map[int]bool{}
	for _, h := range holes {
		isHole[h] = true
	}
	for k, off := 0, 0; off < len(data); k, off = k+1, off+testChunkSize {
		if isHole[k] {
			continue
		}
		part := data[off:min(off+testChunkSize, len(data))]
		d := b.img.Digester.Sum(part)
		c := b.chunks[d]
		if c == nil {
			at := uint64(len(b.blob))
			b.blob = append(b.blob, part...)
			b.blob = append(b.blob, make([]byte, (erofs.BlockSize-len(part)%erofs.BlockSize)%erofs.BlockSize)...)
			c = &rafs.Chunk{Digest: d, Index: uint32(len(b.chunks)), CompressedOffset: at, CompressedSize: uint32(len(part)),
				UncompressedOffset: at, UncompressedSize: uint32(len(part))}
			b.chunks[d] = c
		}
		in.Chunks = append(in.Chunks, rafs.FileChunk{FileOffset: uint64(off), Chunk: c})
	}
	return in
}

// finish sets the blob table from the blob bytes.
func (b *builder) finish() (*rafs.Image, []byte) {
	for _, d := range b.img.Inodes {
		sort.Slice(d.Entries, func(x, y int) bool { return d.Entries[x].Name < d.Entries[y].Name })
	}
	id := codec.SHA256.Sum(b.blob).String()
	b.img.Blobs = []*rafs.Blob{{ID: id, Compressor: codec.None, Digester: b.img.Digester, ChunkSize: testChunkSize,
		ChunkCount: uint32(len(b.chunks)), CompressedSize: uint64(len(b.blob)), UncompressedSize: uint64(len(b.blob)),
		Features: BlobFeatureAligned | BlobFeatureInlinedChunkDigest | BlobFeatureHasTOC | BlobFeatureCapTarTOC,
		// Where a builder would append the chunk-info array (16 bytes a chunk).
		Meta: rafs.BlobMeta{Offset: uint64(len(b.blob)), CompressedSize: 16 * uint64(len(b.chunks)), UncompressedSize: 16 * uint64(len(b.chunks))}}}
	return b.img, b.blob
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i/3) ^ seed ^ byte(i>>12)
	}
	return p
}

// richImage has every kind of inode and the layouts Write must handle.
func richImage() (*rafs.Image, []byte) {
	b := newBuilder()
	d := b.dir(1, "dir")
	deep := d.Ino
	for i := range 40 {
		deep = b.dir(deep, fmt.Sprintf("level%02d", i)).Ino
	}
	b.file(deep, "bottom", []byte("deep file\n"))
	b.file(1, "empty", nil)
	b.file(1, "small", []byte("hello, world\n"))
	b.file(1, "large", pattern(5*testChunkSize+1234, 1))                 // contiguous chunks
	b.file(1, "sparse", pattern(4*testChunkSize, 2), 1, 2)               // holes in the middle
	b.file(1, "dup", pattern(5*testChunkSize+1234, 1)[:3*testChunkSize]) // shares chunks with large
	h := b.file(d.Ino, "hardlink-a", []byte("one inode, two names\n"))
	h.Nlink = 2
	b.link(h, 1, "hardlink-b")
	b.add(&rafs.Inode{Mode: syscall.S_IFLNK | 0o777, Target: "dir/hardlink-a", Size: 14, Mtime: 1}, 1, "symlink")
	long := strings.Repeat("t/", 1000) + "end"
	b.add(&rafs.Inode{Mode: syscall.S_IFLNK | 0o777, Target: long, Size: uint64(len(long))}, d.Ino, "longlink")
	b.add(&rafs.Inode{Mode: syscall.S_IFCHR | 0o666, Rdev: unix.Mkdev(1, 3), Mtime: 2}, 1, "null")
	b.add(&rafs.Inode{Mode: syscall.S_IFBLK | 0o600, Rdev: unix.Mkdev(259, 1<<16+5), UID: 70000, GID: 80000}, 1, "blk")
	b.add(&rafs.Inode{Mode: syscall.S_IFIFO | 0o644}, 1, "fifo")
	b.add(&rafs.Inode{Mode: syscall.S_IFSOCK | 0o755}, 1, "sock")
	x := b.file(1, "xattrs", []byte("attributes"))
	x.Xattrs = []rafs.Xattr{
		{Name: "user.mime_type", Value: []byte("text/plain")},
		{Name: "security.selinux", Value: []byte("system_u:object_r:etc_t:s0\x00")},
		{Name: "trusted.overlay.opaque", Value: []byte("y")},
		{Name: "user.empty", Value: []byte{}},
	}
	b.file(1, "ünïcødé 名前 🙂", []byte("unicode name"))
	b.file(1, strings.Repeat("L", 255), []byte("longest name"))
	b.file(1, "-sorts-before-dot", []byte("-"))
	many := b.dir(1, "many")
	for i := range 500 {
		b.file(many.Ino, fmt.Sprintf("entry-%03d-%s", i, strings.Repeat("z", i%50)), []byte{byte(i)})
	}
	img, blob := b.finish()
	img.Prefetch = []uint64{x.Ino, d.Ino}
	return img, blob
}

// normalize prepares a written model for comparison with its decoded
// copy: directory sizes are the on-disk dirent bytes, and Parent is the
// directory an inode is first found in, depth-first in name order.
func normalize(t *testing.T, want, got *rafs.Image) {
	t.Helper()
	if len(want.Inodes) != len(got.Inodes) {
		t.Fatalf("%d inodes decoded, want %d", len(got.Inodes), len(want.Inodes))
	}
	for k, in := range want.Inodes {
		if in.IsDir() {
			if got.Inodes[k].Size == 0 {
				t.Fatalf("directory %d has size 0", in.Ino)
			}
			in.Size = got.Inodes[k].Size
		}
	}
	seen := map[uint64]bool{1: true}
	want.Root().Parent = 1
	var walk func(d *rafs.Inode)
	walk = func(d *rafs.Inode) {
		for _, e := range d.Entries {
			c := want.Inodes[e.Ino-1]
			if !seen[c.Ino] {
				seen[c.Ino] = true
				c.Parent = d.Ino
				if c.IsDir() {
					walk(c)
				}
			}
		}
	}
	walk(want.Root())
}

func roundTrip(t testing.TB, img *rafs.Image) ([]byte, *rafs.Image) {
	t.Helper()
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatalf("Write: %v", err)
	}
	got, err := Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	return buf.Bytes(), got
}

func TestRoundTrip(t *testing.T) {
	img, blob := richImage()
	boot, got := roundTrip(t, img)
	normalize(t, img, got)
	if !reflect.DeepEqual(img, got) {
		for k := range img.Inodes {
			if !reflect.DeepEqual(img.Inodes[k], got.Inodes[k]) {
				t.Errorf("inode %d:\n got %+v\nwant %+v", k+1, *got.Inodes[k], *img.Inodes[k])
			}
		}
		if !reflect.DeepEqual(img.Blobs, got.Blobs) {
			t.Errorf("blobs:\n got %+v\nwant %+v", *got.Blobs[0], *img.Blobs[0])
		}
		t.Fatalf("decoded model differs (prefetch %v/%v)", got.Prefetch, img.Prefetch)
	}
	// Writing the decoded model again gives the same bytes.
	var again bytes.Buffer
	if err := Write(&again, got); err != nil || !bytes.Equal(again.Bytes(), boot) {
		t.Fatalf("rewrite differs (%v)", err)
	}
	// Every file reads back through digest-checked chunks.
	cr := rafs.BlobChunkReader{Open: func(*rafs.Blob) (io.ReaderAt, error) { return bytes.NewReader(blob), nil }}
	for k, in := range img.Inodes {
		if in.IsRegular() {
			w := readAllFile(t, img, cr, in)
			g := readAllFile(t, got, cr, got.Inodes[k])
			if !bytes.Equal(w, g) {
				t.Fatalf("inode %d reads differently", in.Ino)
			}
		}
	}
}

// TestRoundTrip100k writes and reads an image of 100k files.
func TestRoundTrip100k(t *testing.T) {
	b := newBuilder()
	var dirs []uint64
	for d := range 100 {
		dirs = append(dirs, b.dir(1, fmt.Sprintf("d%03d", d)).Ino)
	}
	for i := range 100000 {
		// 1000 distinct contents keep the blob small (chunks pad to 4 KiB).
		b.file(dirs[i%100], fmt.Sprintf("file-%06d", i), []byte(fmt.Sprint(i%1000)))
	}
	img, _ := b.finish()
	start := time.Now()
	boot, got := roundTrip(t, img)
	t.Logf("100k files: bootstrap %d bytes, write+read %v", len(boot), time.Since(start))
	normalize(t, img, got)
	if !reflect.DeepEqual(img, got) {
		t.Fatal("100k-file model differs after a round trip")
	}
}

// mountRafs mounts a bootstrap with its blob as the EROFS extra device.
func mountRafs(t *testing.T, boot, blob []byte) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts EROFS and must run as root")
	}
	tmp := t.TempDir()
	bp, dp := filepath.Join(tmp, "bootstrap"), filepath.Join(tmp, "blob")
	if err := os.WriteFile(bp, boot, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dp, blob, 0o644); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(tmp, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(bp, mnt, "erofs", unix.MS_RDONLY, "device="+dp); err != nil {
		t.Fatalf("mount -t erofs -o device=%s %s: %v", dp, bp, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	return mnt
}

// TestKernelMountsWrittenBootstrap mounts our bootstrap with the kernel and
// compares what it serves with the model.
func TestKernelMountsWrittenBootstrap(t *testing.T) {
	img, blob := richImage()
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	mnt := mountRafs(t, buf.Bytes(), blob)
	cr := rafs.BlobChunkReader{Open: func(*rafs.Blob) (io.ReaderAt, error) { return bytes.NewReader(blob), nil }}
	n := 0
	err := img.Walk(func(p string, in *rafs.Inode) error {
		n++
		full := filepath.Join(mnt, p)
		var st unix.Stat_t
		if err := unix.Lstat(full, &st); err != nil {
			return err
		}
		if st.Mode != in.Mode || st.Uid != in.UID || st.Gid != in.GID || st.Mtim.Sec != in.Mtime ||
			uint32(st.Mtim.Nsec) != in.MtimeNsec || uint32(st.Nlink) != in.Nlink || st.Rdev != in.Rdev {
			return fmt.Errorf("%s: kernel stat %+v, model %+v", p, st, *in)
		}
		if !in.IsDir() && uint64(st.Size) != in.Size {
			return fmt.Errorf("%s: kernel size %d, model %d", p, st.Size, in.Size)
		}
		for _, x := range in.Xattrs {
			v := make([]byte, 4096)
			m, err := unix.Lgetxattr(full, x.Name, v)
			if err != nil || !bytes.Equal(v[:m], x.Value) {
				return fmt.Errorf("%s: getxattr %s: %q %v", p, x.Name, v[:max(m, 0)], err)
			}
		}
		if sz, _ := unix.Llistxattr(full, make([]byte, 4096)); (sz > 0) != (len(in.Xattrs) > 0) {
			return fmt.Errorf("%s: listxattr gives %d bytes, model has %d xattrs", p, sz, len(in.Xattrs))
		}
		switch {
		case in.IsSymlink():
			if got, err := os.Readlink(full); err != nil || got != in.Target {
				return fmt.Errorf("%s: readlink %.40q %v", p, got, err)
			}
		case in.IsRegular():
			got, err := os.ReadFile(full)
			if err != nil {
				return err
			}
			if want := readAllFile(t, img, cr, in); !bytes.Equal(got, want) {
				return fmt.Errorf("%s: kernel read differs from the model", p)
			}
		case in.IsDir():
			ents, err := os.ReadDir(full)
			if err != nil {
				return err
			}
			if len(ents) != len(in.Entries) {
				return fmt.Errorf("%s: kernel lists %d entries, model %d", p, len(ents), len(in.Entries))
			}
			for k, e := range ents {
				if e.Name() != in.Entries[k].Name {
					return fmt.Errorf("%s: entry %d is %q, model %q", p, k, e.Name(), in.Entries[k].Name)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 500 {
		t.Fatalf("walked only %d paths", n)
	}
}

// TestErofsToolsAndOracle: erofs-utils and go-erofs accept our bootstraps.
func TestErofsToolsAndOracle(t *testing.T) {
	img, blob := richImage()
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	bp, dp := filepath.Join(tmp, "bootstrap"), filepath.Join(tmp, "blob")
	_ = os.WriteFile(bp, buf.Bytes(), 0o644)
	_ = os.WriteFile(dp, blob, 0o644)
	out := filepath.Join(tmp, "extract")
	for _, args := range [][]string{
		{"fsck.erofs", "--device=" + dp, bp},
		{"fsck.erofs", "--device=" + dp, "--extract=" + out, bp},
		{"dump.erofs", "--device=" + dp, "-s", bp},
		{"dump.erofs", "--device=" + dp, "--path=/large", bp},
	} {
		if o, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, o)
		}
	}
	cr := rafs.BlobChunkReader{Open: func(*rafs.Blob) (io.ReaderAt, error) { return bytes.NewReader(blob), nil }}
	fsys, err := goerofs.Open(bytes.NewReader(buf.Bytes()), goerofs.WithExtraDevices(bytes.NewReader(blob)))
	if err != nil {
		t.Fatal(err)
	}
	err = img.Walk(func(p string, in *rafs.Inode) error {
		if !in.IsRegular() {
			return nil
		}
		want := readAllFile(t, img, cr, in)
		// erofs-utils 1.5 (Debian 12) extracts holes by skipping them
		// without seeking, so only hole-free files compare; the kernel
		// and go-erofs read the sparse ones.
		if uint64(len(in.Chunks)) == (in.Size+testChunkSize-1)/testChunkSize {
			extracted, err := os.ReadFile(filepath.Join(out, p))
			if err != nil || !bytes.Equal(extracted, want) {
				return fmt.Errorf("%s: fsck.erofs extracted %d bytes (%v), want %d identical", p, len(extracted), err, len(want))
			}
		}
		got, err := fs.ReadFile(fsys, strings.TrimPrefix(p, "/"))
		if err != nil || !bytes.Equal(got, want) {
			return fmt.Errorf("%s: go-erofs read %d bytes (%v), want %d identical", p, len(got), err, len(want))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestWriteRejects covers models RAFS v6 cannot express.
func TestWriteRejects(t *testing.T) {
	cases := map[string]func(img *rafs.Image){
		"unaligned chunk offset": func(img *rafs.Image) {
			f := findFile(img, "large")
			c := *f.Chunks[1].Chunk
			c.UncompressedOffset += 512
			c.CompressedOffset += 512
			f.Chunks[1].Chunk = &c
		},
		"short middle chunk": func(img *rafs.Image) {
			f := findFile(img, "large")
			c := *f.Chunks[1].Chunk
			c.UncompressedSize, c.CompressedSize = 100, 100
			f.Chunks[1].Chunk = &c
		},
		"lustre xattr": func(img *rafs.Image) {
			findFile(img, "small").Xattrs = []rafs.Xattr{{Name: "lustre.x", Value: []byte("1")}}
		},
		"unknown xattr namespace": func(img *rafs.Image) {
			findFile(img, "small").Xattrs = []rafs.Xattr{{Name: "os2.x", Value: []byte("1")}}
		},
		"invalid model": func(img *rafs.Image) { img.Root().Entries[0].Name = "a/b" },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			img, _ := richImage()
			mutate(img)
			if err := Write(io.Discard, img); err == nil {
				t.Fatal("Write accepted it")
			}
		})
	}
}

func findFile(img *rafs.Image, name string) *rafs.Inode {
	in, err := img.Lookup(img.Root(), name)
	if err != nil {
		panic(err)
	}
	return in
}

func TestHostileBootstraps(t *testing.T) {
	img, _ := richImage()
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	good := buf.Bytes()
	rd, err := erofs.Open(bytes.NewReader(good), int64(len(good)))
	if err != nil {
		t.Fatal(err)
	}
	sb := rd.SuperBlock()
	var ext extSuperBlock
	ext.unmarshal(good[ExtSuperBlockOffset:])
	meta := uint64(sb.MetaBlkAddr) * erofs.BlockSize
	nidOf := func(name string) uint64 {
		root, _ := rd.Inode(rd.RootNid())
		ents, _ := rd.ReadDir(root)
		for _, e := range ents {
			if e.Name == name {
				return e.Nid
			}
		}
		t.Fatalf("no %s", name)
		return 0
	}
	put := func(b []byte, off uint64, v uint64, n int) {
		for i := range n {
			b[off+uint64(i)] = byte(v >> (8 * i))
		}
	}
	mut := func(f func(b []byte)) []byte {
		b := bytes.Clone(good)
		f(b)
		return b
	}
	large, _ := rd.Inode(nidOf("large"))
	largeIdx := alignUp(meta+large.Nid*32+32, 8) // compact inode, no xattrs
	if large.Extended {
		largeIdx = alignUp(meta+large.Nid*32+64, 8)
	}
	root, _ := rd.Inode(rd.RootNid())
	rootDirents := uint64(root.RawU) * erofs.BlockSize
	if root.Layout == erofs.LayoutFlatInline && root.Size < erofs.BlockSize {
		rootDirents = meta + root.Nid*32 + 64
	}
	cases := map[string][]byte{
		"not rafs":         mut(func(b []byte) { put(b, erofs.SuperBlockOffset+8, 0, 4) }),
		"two compressors":  mut(func(b []byte) { b[ExtSuperBlockOffset] |= FlagCompressZstd }),
		"no digester":      mut(func(b []byte) { b[ExtSuperBlockOffset] &^= FlagHashSHA256 | FlagHashBlake3 }),
		"chunk size":       mut(func(b []byte) { put(b, ExtSuperBlockOffset+20, 3000, 4) }),
		"blob table range": mut(func(b []byte) { put(b, ExtSuperBlockOffset+8, 1<<40, 8) }),
		"blob table size":  mut(func(b []byte) { put(b, ExtSuperBlockOffset+16, 100, 4) }),
		"chunk table huge": mut(func(b []byte) { put(b, ExtSuperBlockOffset+32, 1<<62, 8) }),
		"blob index": mut(func(b []byte) {
			put(b, ext.ChunkTableOffset+32, 7, 4)
		}),
		"chunk past blob": mut(func(b []byte) {
			put(b, ext.ChunkTableOffset+48, 1<<36, 8) // compressed offset
		}),
		"chunk uncompressed size": mut(func(b []byte) {
			put(b, ext.ChunkTableOffset+44, 1<<30, 4)
		}),
		"chunk index unknown": mut(func(b []byte) {
			put(b, largeIdx+4, 0xABCDE, 4)
		}),
		"chunk index blob 0": mut(func(b []byte) {
			put(b, largeIdx+2, 0, 2)
		}),
		"file size absurd": mut(func(b []byte) {
			off := meta + large.Nid*32 + 8
			if large.Extended {
				put(b, off, 1<<60, 8)
			} else {
				put(b, off, 0xFFFFFFFF, 4)
			}
		}),
		"blob id slash": mut(func(b []byte) { b[ext.BlobTableOffset+3] = '/' }),
		"device mismatch": mut(func(b []byte) {
			b[DevTableOffset] ^= 1
		}),
		"prefetch nid": mut(func(b []byte) { put(b, ext.PrefetchTableOffset, 0xFFFFFF, 4) }),
		"dirent nid": mut(func(b []byte) {
			put(b, rootDirents+3*erofs.DirentSize, 1<<40, 8)
		}),
		"dirent loop": mut(func(b []byte) {
			// Point the root's entry for "dir" at the root itself.
			ents, _ := rd.ReadDir(root)
			for k, e := range ents {
				if e.Name == "dir" {
					put(b, rootDirents+uint64(k)*erofs.DirentSize, root.Nid, 8)
				}
			}
		}),
		"truncated": good[:len(good)/2],
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Read(bytes.NewReader(b), int64(len(b)))
			if err == nil {
				t.Fatal("hostile bootstrap accepted")
			}
			if !errors.Is(err, rafs.ErrInvalid) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error wraps neither rafs.ErrInvalid nor ErrUnsupported: %v", err)
			}
		})
	}
	// Truncations and bit flips everywhere: errors or images, never a panic
	// or hang; accepted images still validate.
	small := smallBootstrap(t)
	for n := 0; n < len(small); n += 61 {
		checkNoPanic(t, small[:n])
	}
	for i := 0; i < len(small); i++ {
		b := bytes.Clone(small)
		b[i] ^= 1 << (i % 8)
		checkNoPanic(t, b)
	}
}

func checkNoPanic(t *testing.T, b []byte) {
	t.Helper()
	img, err := Read(bytes.NewReader(b), int64(len(b)))
	if err == nil {
		if verr := img.Validate(); verr != nil {
			t.Fatalf("Read returned an image that does not validate: %v", verr)
		}
	}
}

// smallBootstrap is a few inodes of every kind: a fast subject for
// exhaustive mutation and a fuzz seed.
func smallBootstrap(t testing.TB) []byte {
	b := newBuilder()
	d := b.dir(1, "d")
	x := b.file(d.Ino, "f", pattern(2*testChunkSize+10, 3), 0)
	x.Xattrs = []rafs.Xattr{{Name: "user.a", Value: []byte("b")}}
	h := b.file(1, "h", pattern(3*testChunkSize, 4))
	h.Nlink = 2
	b.link(h, d.Ino, "h2")
	b.add(&rafs.Inode{Mode: syscall.S_IFLNK | 0o777, Target: "d/f", Size: 3}, 1, "l")
	b.add(&rafs.Inode{Mode: syscall.S_IFCHR | 0o777, Rdev: 0x103}, d.Ino, "c")
	img, _ := b.finish()
	img.Prefetch = []uint64{x.Ino}
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func FuzzV6Read(f *testing.F) {
	fx, err := os.ReadFile(filepath.Join(fixture, "bootstrap"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(fx)
	f.Add(smallBootstrap(f))
	zb, _ := zranBootstrap(f)
	f.Add(zb)
	f.Fuzz(func(t *testing.T, b []byte) {
		checkNoPanic(t, b)
	})
}

// TestKernelAgreesOnNydusFixture mounts the nydus-built bootstrap alone
// (its data is zstd, so only metadata is compared) and checks that the
// kernel and Read see the same tree.
func TestKernelAgreesOnNydusFixture(t *testing.T) {
	boot, err := os.ReadFile(filepath.Join(fixture, "bootstrap"))
	if err != nil {
		t.Fatal(err)
	}
	img := readFile(t, filepath.Join(fixture, "bootstrap"))
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts EROFS and must run as root")
	}
	tmp := t.TempDir()
	bp, mnt := filepath.Join(tmp, "bootstrap"), filepath.Join(tmp, "mnt")
	if err := os.WriteFile(bp, boot, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(bp, mnt, "erofs", unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount -t erofs %s: %v", bp, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	n := 0
	err = img.Walk(func(p string, in *rafs.Inode) error {
		n++
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(mnt, p), &st); err != nil {
			return err
		}
		if st.Mode != in.Mode || uint64(st.Size) != in.Size || st.Mtim.Sec != in.Mtime || uint32(st.Mtim.Nsec) != in.MtimeNsec ||
			uint32(st.Nlink) != in.Nlink || st.Uid != in.UID || st.Gid != in.GID {
			return fmt.Errorf("%s: kernel %+v, Read %+v", p, st, *in)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Fatalf("walked %d paths, want 3", n)
	}
}

// BenchmarkRead100k decodes a 100k-file bootstrap and reports the time
// relative to go-erofs walking and stat'ing the same bootstrap in the same
// run (ratio < 1: Read is faster than that baseline).
func BenchmarkRead100k(b *testing.B) {
	bd := newBuilder()
	var dirs []uint64
	for d := range 100 {
		dirs = append(dirs, bd.dir(1, fmt.Sprintf("d%03d", d)).Ino)
	}
	for i := range 100000 {
		bd.file(dirs[i%100], fmt.Sprintf("file-%06d", i), []byte(fmt.Sprint(i%1000)))
	}
	img, _ := bd.finish()
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		b.Fatal(err)
	}
	boot := buf.Bytes()
	var ours, base time.Duration
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if _, err := Read(bytes.NewReader(boot), int64(len(boot))); err != nil {
			b.Fatal(err)
		}
		ours += time.Since(start)
		start = time.Now()
		fsys, err := goerofs.Open(bytes.NewReader(boot), goerofs.WithExtraDevices(bytes.NewReader(nil)))
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		if err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if _, err := d.Info(); err != nil {
				return err
			}
			n++
			return nil
		}); err != nil {
			b.Fatal(err)
		}
		base += time.Since(start)
		if n != 100101 {
			b.Fatalf("go-erofs walked %d paths", n)
		}
	}
	b.ReportMetric(float64(ours.Nanoseconds())/float64(b.N), "read-ns/op")
	b.ReportMetric(float64(ours)/float64(base), "ratio-vs-go-erofs-walk")
	b.ReportMetric(float64(len(boot))/100101, "bootstrap-bytes/inode")
}

// TestTwoBlobsKernel spreads files over two blobs with chunk-info indexes
// past 16 bits (so chunk index entries carry bits in DeviceID's high byte,
// which the kernel must mask off) and mounts bootstrap + both blobs.
func TestTwoBlobsKernel(t *testing.T) {
	b := newBuilder()
	f1 := b.file(1, "one", pattern(3*testChunkSize+5, 1))
	img, blob0 := b.finish()
	for _, fc := range f1.Chunks {
		fc.Index += 70000
	}
	// A second blob of its own chunks.
	b2 := newBuilder()
	f2in := b2.file(1, "two", pattern(2*testChunkSize, 9))
	_, blob1 := b2.finish()
	f2 := b.add(&rafs.Inode{Mode: f2in.Mode, UID: 5, GID: 6, Size: f2in.Size, Mtime: 3, Nlink: 1}, 1, "two")
	for _, fc := range f2in.Chunks {
		c := *fc.Chunk
		c.BlobIndex, c.Index = 1, c.Index+0x20000
		f2.Chunks = append(f2.Chunks, rafs.FileChunk{FileOffset: fc.FileOffset, Chunk: &c})
	}
	sort.Slice(img.Root().Entries, func(x, y int) bool { return img.Root().Entries[x].Name < img.Root().Entries[y].Name })
	blob1Info := *img.Blobs[0]
	blob1Info.ID = codec.SHA256.Sum(blob1).String()
	blob1Info.CompressedSize, blob1Info.UncompressedSize = uint64(len(blob1)), uint64(len(blob1))
	blob1Info.ChunkCount = uint32(len(f2in.Chunks))
	blob1Info.Meta.Offset = uint64(len(blob1))
	blob1Info.Meta.CompressedSize, blob1Info.Meta.UncompressedSize = 16*uint64(len(f2in.Chunks)), 16*uint64(len(f2in.Chunks))
	img.Blobs = append(img.Blobs, &blob1Info)

	boot, got := roundTrip(t, img)
	normalize(t, img, got)
	if !reflect.DeepEqual(img, got) {
		t.Fatal("two-blob model differs after a round trip")
	}
	if err := nydusRules(boot); err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	bp := filepath.Join(tmp, "bootstrap")
	d0, d1 := filepath.Join(tmp, "blob0"), filepath.Join(tmp, "blob1")
	for p, data := range map[string][]byte{bp: boot, d0: blob0, d1: blob1} {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mnt := filepath.Join(tmp, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(bp, mnt, "erofs", unix.MS_RDONLY, "device="+d0+",device="+d1); err != nil {
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	blobs := [][]byte{blob0, blob1}
	cr := rafs.BlobChunkReader{Open: func(bl *rafs.Blob) (io.ReaderAt, error) {
		for i, x := range img.Blobs {
			if x == bl {
				return bytes.NewReader(blobs[i]), nil
			}
		}
		return nil, fmt.Errorf("unknown blob %s", bl.ID)
	}}
	for name, want := range map[string][]byte{"one": pattern(3*testChunkSize+5, 1), "two": pattern(2*testChunkSize, 9)} {
		in := findFile(img, name)
		if got := readAllFile(t, img, cr, in); !bytes.Equal(got, want) {
			t.Fatalf("%s: model read differs", name)
		}
		kern, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil || !bytes.Equal(kern, want) {
			t.Fatalf("%s: kernel read %d bytes (%v), want %d identical", name, len(kern), err, len(want))
		}
	}
}

// nydusRules applies the checks nydusd makes when it loads a RAFS v6
// bootstrap (nydus rafs/src/metadata/layout/v6.rs validate functions,
// direct_v6.rs inode validation and chunk map), as a stand-in for running
// nydusd, which this machine does not have.
func nydusRules(boot []byte) error {
	size := uint64(len(boot))
	rd, err := erofs.Open(bytes.NewReader(boot), int64(len(boot)))
	if err != nil {
		return err
	}
	sb := rd.SuperBlock()
	fail := func(f string, a ...any) error { return fmt.Errorf("nydusd would reject: "+f, a...) }
	switch {
	case size < erofs.BlockSize || size%erofs.BlockSize != 0:
		return fail("metadata size %d", size)
	case uint64(sb.MetaBlkAddr)*erofs.BlockSize > size:
		return fail("meta block address")
	case sb.Checksum != 0 || sb.BlkSzBits != 12 || sb.ExtSlots != 0 || sb.Inos == 0 || sb.U1 != 0 || sb.XattrBlkAddr != 0:
		return fail("superblock fields %+v", sb)
	case sb.ExtraDevices == 0 && sb.Blocks != 0 && sb.Blocks != 4096:
		return fail("blocks %d without devices", sb.Blocks)
	case uint64(sb.DevtSlotOff)*128 != DevTableOffset:
		return fail("device table slot offset %d", sb.DevtSlotOff)
	case sb.FeatureIncompat != erofs.FeatureIncompatChunked|erofs.FeatureIncompatDevTable:
		return fail("incompat features %#x", sb.FeatureIncompat)
	case sb.FeatureCompat&erofs.FeatureCompatRafsV6 == 0:
		return fail("compat features %#x", sb.FeatureCompat)
	}
	var ext extSuperBlock
	ext.unmarshal(boot[ExtSuperBlockOffset:])
	if _, err := oneFlag(ext.Flags, compressorFlags); err != nil {
		return fail("compression flags %#x", ext.Flags)
	}
	if _, err := oneFlag(ext.Flags, digesterFlags); err != nil {
		return fail("digest flags %#x", ext.Flags)
	}
	if !rafs.ValidChunkSize(ext.ChunkSize) {
		return fail("chunk size %#x", ext.ChunkSize)
	}
	nblobs := uint64(ext.BlobTableSize) / BlobEntrySize
	devEnd := DevTableOffset + nblobs*erofs.DeviceSlotSize
	bo, bs := ext.BlobTableOffset, uint64(ext.BlobTableSize)
	if bo%erofs.BlockSize != 0 || bo < erofs.BlockSize || bo < devEnd || bs%BlobEntrySize != 0 || bo+bs > size {
		return fail("blob table %#x+%#x", bo, bs)
	}
	overlap := func(o1, s1, o2, s2 uint64) bool { return o1 < o2+s2 && o2 < o1+s1 }
	co, cs := ext.ChunkTableOffset, ext.ChunkTableSize
	if cs > 0 && (co < erofs.BlockSize || co%erofs.BlockSize != 0 || co < devEnd || cs%ChunkInfoSize != 0 || co+cs > size || overlap(bo, bs, co, cs)) {
		return fail("chunk table %#x+%#x", co, cs)
	}
	if po, ps := ext.PrefetchTableOffset, uint64(ext.PrefetchTableSize); ps > 0 && po != 0 &&
		(po < erofs.BlockSize || ps%4 != 0 || po < devEnd || po+ps > size || overlap(bo, bs, po, ps) || overlap(co, cs, po, ps)) {
		return fail("prefetch table %#x+%#x", po, ps)
	}
	ids := map[string]bool{}
	for i := range nblobs {
		var e blobEntry
		e.unmarshal(boot[bo+i*BlobEntrySize:])
		switch {
		case len(e.ID) != BlobIDLen || e.Index != uint32(i) || e.ChunkSize != ext.ChunkSize || e.ChunkCount > 1<<24:
			return fail("blob %d: %+v", i, e)
		case e.Features&BlobFeatureAligned == 0:
			return fail("blob %d without the ALIGNED feature", i)
		case e.CICompressedSize > e.CIUncompressedSize || e.CIUncompressedSize != uint64(e.ChunkCount)*16:
			return fail("blob %d: chunk-info sizes %d/%d for %d chunks", i, e.CICompressedSize, e.CIUncompressedSize, e.ChunkCount)
		}
	}
	for i, d := range rd.Devices() {
		if len(d.Tag) != BlobIDLen || d.Blocks == 0 || ids[d.Tag] {
			return fail("device %d: %+v", i, d)
		}
		ids[d.Tag] = true
	}
	chunkMap := map[chunkKey]bool{}
	for p := co; p < co+cs; p += ChunkInfoSize {
		var ci chunkInfo
		ci.get(boot[p:])
		chunkMap[chunkKey{ci.BlobIndex, ci.Index & 0xFFFFFF, uint32(ci.UncompressedOffset / erofs.BlockSize)}] = true
	}
	err = rd.Walk(func(p string, in *erofs.Inode) error {
		if in.Nlink == 0 || uint64(in.Ino) > sb.Inos {
			return fmt.Errorf("%s: nlink %d ino %d", p, in.Nlink, in.Ino)
		}
		if in.IsSymlink() && in.Size == 0 {
			return fmt.Errorf("%s: empty symlink", p)
		}
		if !in.IsRegular() {
			return nil
		}
		n := (in.Size + uint64(ext.ChunkSize) - 1) / uint64(ext.ChunkSize)
		idx, err := rd.ChunkIndexes(in, int(n))
		if err != nil {
			return err
		}
		for k, c := range idx {
			key, err := keyOfIndex(c)
			if err != nil || uint64(key.blob) >= nblobs || !chunkMap[key] {
				return fmt.Errorf("%s: chunk %d address %+v has no chunk record (%v)", p, k, c, err)
			}
		}
		return nil
	})
	if err != nil {
		return fail("%v", err)
	}
	return nil
}

// TestNydusdRules checks written bootstraps against nydusd's load-time
// validation. Holes are left out: nydusd has no hole chunks.
func TestNydusdRules(t *testing.T) {
	img, _ := richImage()
	sparse := findFile(img, "sparse")
	sparse.Size = testChunkSize // keep only its first chunk
	sparse.Chunks = sparse.Chunks[:1]
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	if err := nydusRules(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	fx, err := os.ReadFile(filepath.Join(fixture, "bootstrap"))
	if err != nil {
		t.Fatal(err)
	}
	if err := nydusRules(fx); err != nil { // the checker accepts nydus-image output
		t.Fatal(err)
	}
	// and rejects what nydusd rejects: holes, blobs without ALIGNED.
	withHoles, _ := richImage()
	buf.Reset()
	if err := Write(&buf, withHoles); err != nil {
		t.Fatal(err)
	}
	if err := nydusRules(buf.Bytes()); err == nil || !strings.Contains(err.Error(), "no chunk record") {
		t.Fatalf("holes not flagged: %v", err)
	}
	withHoles.Blobs[0].Features &^= BlobFeatureAligned
	buf.Reset()
	if err := Write(&buf, withHoles); err != nil {
		t.Fatal(err)
	}
	if err := nydusRules(buf.Bytes()); err == nil || !strings.Contains(err.Error(), "ALIGNED") {
		t.Fatalf("missing ALIGNED not flagged: %v", err)
	}
}

package v5

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// imageBuilder assembles a rafs.Image and its single blob in memory, the
// way a builder would, numbering inodes in creation order (which is not
// the order v5 numbers them in, so round trips exercise renumbering).
type imageBuilder struct {
	t      testing.TB
	img    *rafs.Image
	blob   *rafs.Blob
	data   []byte // the blob's bytes
	byHash map[codec.Digest]*rafs.Chunk
	uoff   uint64
}

func newImageBuilder(t testing.TB, c codec.Compressor, d codec.Digester, chunkSize uint32) *imageBuilder {
	sum := sha256.Sum256([]byte(t.Name()))
	b := &rafs.Blob{ID: fmt.Sprintf("%x", sum), Compressor: c, Digester: d, ChunkSize: chunkSize}
	ib := &imageBuilder{
		t:      t,
		img:    &rafs.Image{Version: 5, ChunkSize: chunkSize, Compressor: c, Digester: d, Blobs: []*rafs.Blob{b}},
		blob:   b,
		byHash: map[codec.Digest]*rafs.Chunk{},
	}
	ib.add(0, "", &rafs.Inode{Mode: syscall.S_IFDIR | 0o755, Mtime: 1700000000})
	return ib
}

// add creates inode i named name in directory parent (0: i is the root).
func (ib *imageBuilder) add(parent uint64, name string, i *rafs.Inode) uint64 {
	i.Ino = uint64(len(ib.img.Inodes) + 1)
	if parent == 0 {
		i.Parent = i.Ino
	} else {
		i.Parent = parent
		ib.link(parent, name, i.Ino)
	}
	ib.img.Inodes = append(ib.img.Inodes, i)
	return i.Ino
}

// link adds another name for ino.
func (ib *imageBuilder) link(parent uint64, name string, ino uint64) {
	d := ib.img.Inodes[parent-1]
	d.Entries = append(d.Entries, rafs.Dirent{Name: name, Ino: ino})
}

func (ib *imageBuilder) dir(parent uint64, name string) uint64 {
	return ib.add(parent, name, &rafs.Inode{Mode: syscall.S_IFDIR | 0o755, UID: 1000, GID: 1000, Mtime: 1700000001, MtimeNsec: 5})
}

// chunk stores data as one chunk (deduplicated by digest).
func (ib *imageBuilder) chunk(data []byte) *rafs.Chunk {
	dg := ib.img.Digester.Sum(data)
	if c := ib.byHash[dg]; c != nil {
		return c
	}
	stored, compressed, err := codec.Compress(ib.img.Compressor, nil, data)
	if err != nil {
		ib.t.Fatal(err)
	}
	if !compressed {
		stored = data
	}
	c := &rafs.Chunk{
		Digest:             dg,
		Index:              uint32(len(ib.byHash)),
		CompressedOffset:   uint64(len(ib.data)),
		CompressedSize:     uint32(len(stored)),
		UncompressedOffset: ib.uoff,
		UncompressedSize:   uint32(len(data)),
		Compressed:         compressed,
	}
	ib.data = append(ib.data, stored...)
	ib.uoff += uint64(len(data))
	ib.byHash[dg] = c
	return c
}

// file creates a regular file; extents maps file offsets to data at
// chunk-aligned offsets, gaps are holes.
func (ib *imageBuilder) file(parent uint64, name string, size uint64, extents map[uint64][]byte) uint64 {
	i := &rafs.Inode{Mode: syscall.S_IFREG | 0o644, Size: size, UID: 7, GID: 8, Mtime: 1600000000, MtimeNsec: 999999999}
	offs := make([]uint64, 0, len(extents))
	for off := range extents {
		offs = append(offs, off)
	}
	slices.Sort(offs)
	cs := uint64(ib.img.ChunkSize)
	for _, off := range offs {
		data := extents[off]
		for k := uint64(0); k < uint64(len(data)); k += cs {
			piece := data[k:min(k+cs, uint64(len(data)))]
			i.Chunks = append(i.Chunks, rafs.FileChunk{FileOffset: off + k, Chunk: ib.chunk(piece)})
		}
	}
	return ib.add(parent, name, i)
}

// dense creates a regular file holding data.
func (ib *imageBuilder) dense(parent uint64, name string, data []byte) uint64 {
	if len(data) == 0 {
		return ib.file(parent, name, 0, nil)
	}
	return ib.file(parent, name, uint64(len(data)), map[uint64][]byte{0: data})
}

func (ib *imageBuilder) symlink(parent uint64, name, target string) uint64 {
	return ib.add(parent, name, &rafs.Inode{Mode: syscall.S_IFLNK | 0o777, Size: uint64(len(target)), Target: target, Mtime: -5})
}

func (ib *imageBuilder) special(parent uint64, name string, mode uint32, rdev uint64) uint64 {
	return ib.add(parent, name, &rafs.Inode{Mode: mode, Rdev: rdev, UID: 0xfffffffe, GID: 0xfffffffd, Mtime: 1})
}

// finish sorts entries, counts links, sizes the blob and validates.
func (ib *imageBuilder) finish() (*rafs.Image, []byte) {
	img := ib.img
	for _, i := range img.Inodes {
		slices.SortFunc(i.Entries, cmpDirent)
		if i.IsDir() {
			i.Size = PseudoDirSize(i)
		}
	}
	countLinks(img)
	ib.blob.ChunkCount = uint32(len(ib.byHash))
	ib.blob.CompressedSize = uint64(len(ib.data))
	ib.blob.UncompressedSize = ib.uoff
	if err := img.Validate(); err != nil {
		ib.t.Fatalf("test image invalid: %v", err)
	}
	return img, ib.data
}

// memBlobs serves blobs from memory by id.
func memBlobs(blobs map[string][]byte) rafs.BlobChunkReader {
	return rafs.BlobChunkReader{Open: func(b *rafs.Blob) (io.ReaderAt, error) {
		d, ok := blobs[b.ID]
		if !ok {
			return nil, fmt.Errorf("no blob %s", b.ID)
		}
		return bytes.NewReader(d), nil
	}}
}

func readFile(t testing.TB, img *rafs.Image, cr rafs.ChunkReader, i *rafs.Inode) []byte {
	t.Helper()
	buf := make([]byte, i.Size)
	n, err := img.ReadAt(context.Background(), cr, i, buf, 0)
	if err != nil && err != io.EOF {
		t.Fatalf("read inode %d: %v", i.Ino, err)
	}
	if uint64(n) != i.Size {
		t.Fatalf("read inode %d: %d of %d bytes", i.Ino, n, i.Size)
	}
	return buf
}

func encode(t testing.TB, img *rafs.Image) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := Write(&b, img); err != nil {
		t.Fatalf("Write: %v", err)
	}
	return b.Bytes()
}

func decode(t testing.TB, b []byte) *rafs.Image {
	t.Helper()
	img, err := Read(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	return img
}

// describe renders an image as text keyed by path, independent of inode
// numbering: attributes, xattrs, chunks, hardlink groups (by the first
// path of each inode) and the prefetch list.
func describe(img *rafs.Image) string {
	var sb strings.Builder
	first := map[uint64]string{}
	err := img.Walk(func(p string, i *rafs.Inode) error {
		if f, ok := first[i.Ino]; ok {
			fmt.Fprintf(&sb, "%s => %s\n", p, f)
			return nil
		}
		first[i.Ino] = p
		fmt.Fprintf(&sb, "%s mode=%o uid=%d gid=%d size=%d mtime=%d.%d rdev=%#x nlink=%d target=%q\n",
			p, i.Mode, i.UID, i.GID, i.Size, i.Mtime, i.MtimeNsec, i.Rdev, i.Nlink, i.Target)
		for _, x := range i.Xattrs {
			fmt.Fprintf(&sb, "  xattr %q=%q\n", x.Name, x.Value)
		}
		for _, c := range i.Chunks {
			fmt.Fprintf(&sb, "  chunk @%d %+v\n", c.FileOffset, *c.Chunk)
		}
		return nil
	})
	if err != nil {
		return "walk: " + err.Error()
	}
	for _, ino := range img.Prefetch {
		fmt.Fprintf(&sb, "prefetch %s\n", first[ino])
	}
	for _, b := range img.Blobs {
		fmt.Fprintf(&sb, "blob %+v\n", *b)
	}
	fmt.Fprintf(&sb, "image v%d chunk=%d %s %s inodes=%d\n", img.Version, img.ChunkSize, img.Compressor, img.Digester, len(img.Inodes))
	return sb.String()
}

// checkParents verifies Parent is the directory an inode is first reached
// from in inode-number order of directories.
func checkParents(t testing.TB, img *rafs.Image) {
	t.Helper()
	if img.Root().Parent != rafs.RootIno {
		t.Errorf("root parent %d", img.Root().Parent)
	}
	for _, d := range img.Inodes {
		for _, e := range d.Entries {
			c := img.Inodes[e.Ino-1]
			p := img.Inodes[c.Parent-1]
			if !p.IsDir() || !slices.ContainsFunc(p.Entries, func(x rafs.Dirent) bool { return x.Ino == c.Ino }) {
				t.Errorf("inode %d: parent %d does not list it", c.Ino, c.Parent)
			}
		}
	}
}

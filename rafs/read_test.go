package rafs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"syscall"
	"testing"

	"github.com/rafsd/rafsd/rafs/codec"
)

// testImage builds a small image in memory: / with file "a" (three chunks
// of 4 KiB with a hole in the middle), "dir/b" and a symlink. The blob holds
// zstd-compressed chunks.
func testImage(t testing.TB) (*Image, []byte, []byte) {
	t.Helper()
	const cs = 4096
	content := make([]byte, 3*cs+100)
	for i := range content {
		content[i] = byte(i * 7)
	}
	clear(content[cs : 2*cs]) // hole
	blob := &Blob{ID: strings.Repeat("ab", 32), Compressor: codec.Zstd, Digester: codec.Blake3, ChunkSize: cs}
	var data []byte
	var uoff uint64
	addChunk := func(p []byte) *Chunk {
		out, compressed, err := codec.Compress(blob.Compressor, nil, p)
		if err != nil {
			t.Fatal(err)
		}
		c := &Chunk{Digest: blob.Digester.Sum(p), Index: blob.ChunkCount, CompressedOffset: uint64(len(data)),
			CompressedSize: uint32(len(out)), UncompressedOffset: uoff, UncompressedSize: uint32(len(p)), Compressed: compressed}
		data = append(data, out...)
		uoff += uint64(cs)
		blob.ChunkCount++
		return c
	}
	c0 := addChunk(content[:cs])
	c2 := addChunk(content[2*cs : 3*cs])
	c3 := addChunk(content[3*cs:])
	blob.CompressedSize, blob.UncompressedSize = uint64(len(data)), uoff
	img := &Image{Version: 6, ChunkSize: cs, Compressor: codec.Zstd, Digester: codec.Blake3, Blobs: []*Blob{blob}}
	img.Inodes = []*Inode{
		{Ino: 1, Parent: 1, Mode: syscall.S_IFDIR | 0o755, Nlink: 3, Entries: []Dirent{{"a", 2}, {"dir", 3}, {"link", 5}}},
		{Ino: 2, Parent: 1, Mode: syscall.S_IFREG | 0o644, Nlink: 1, Size: uint64(len(content)),
			Chunks: []FileChunk{{0, c0}, {2 * cs, c2}, {3 * cs, c3}}, Xattrs: []Xattr{{"user.k", []byte("v")}}},
		{Ino: 3, Parent: 1, Mode: syscall.S_IFDIR | 0o755, Nlink: 2, Entries: []Dirent{{"b", 4}}},
		{Ino: 4, Parent: 3, Mode: syscall.S_IFREG | 0o600, Nlink: 1},
		{Ino: 5, Parent: 1, Mode: syscall.S_IFLNK | 0o777, Nlink: 1, Target: "a", Size: 1},
	}
	if err := img.Validate(); err != nil {
		t.Fatal(err)
	}
	return img, data, content
}

func blobReader(data []byte) BlobChunkReader {
	return BlobChunkReader{Open: func(*Blob) (io.ReaderAt, error) { return bytes.NewReader(data), nil }}
}

func TestReadAt(t *testing.T) {
	img, data, content := testImage(t)
	f, err := img.Lookup(img.Root(), "a")
	if err != nil {
		t.Fatal(err)
	}
	cr := blobReader(data)
	for _, tc := range []struct{ off, n int }{
		{0, len(content)}, {0, 1}, {4095, 2}, {4096, 4096}, {5000, 5000}, {len(content) - 1, 10},
		{100, 20000}, {3 * 4096, 100}, {8191, 1},
	} {
		p := make([]byte, tc.n)
		n, err := img.ReadAt(context.Background(), cr, f, p, int64(tc.off))
		want := content[tc.off:min(tc.off+tc.n, len(content))]
		if n != len(want) || !bytes.Equal(p[:n], want) {
			t.Errorf("ReadAt(%d,%d): n=%d, bytes differ", tc.off, tc.n, n)
		}
		if (n < tc.n) != errors.Is(err, io.EOF) || (err != nil && !errors.Is(err, io.EOF)) {
			t.Errorf("ReadAt(%d,%d): err=%v", tc.off, tc.n, err)
		}
	}
	if _, err := img.ReadAt(context.Background(), cr, f, make([]byte, 1), int64(len(content))); err != io.EOF {
		t.Errorf("read at EOF: %v", err)
	}
	if _, err := img.ReadAt(context.Background(), cr, img.Root(), make([]byte, 1), 0); Errno(err) != syscall.EISDIR {
		t.Errorf("read of dir: %v", err)
	}
}

func TestReadAtCorruptBlob(t *testing.T) {
	img, data, _ := testImage(t)
	f, _ := img.Lookup(img.Root(), "a")
	for i := range data {
		bad := bytes.Clone(data)
		bad[i] ^= 0x40
		p := make([]byte, f.Size)
		n, err := img.ReadAt(context.Background(), blobReader(bad), f, p, 0)
		if err == nil {
			t.Fatalf("flipped byte %d: read succeeded (n=%d)", i, n)
		}
		if Errno(err) != syscall.EIO {
			t.Fatalf("flipped byte %d: errno %v for %v", i, Errno(err), err)
		}
	}
}

func TestLookupWalk(t *testing.T) {
	img, _, _ := testImage(t)
	var paths []string
	err := img.Walk(func(p string, i *Inode) error { paths = append(paths, fmt.Sprintf("%s:%d", p, i.Ino)); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(paths, " "), "/:1 /a:2 /dir:3 /dir/b:4 /link:5"; got != want {
		t.Errorf("walk %q want %q", got, want)
	}
	if _, err := img.Lookup(img.Root(), "zz"); Errno(err) != syscall.ENOENT {
		t.Errorf("missing: %v", err)
	}
	a, _ := img.Lookup(img.Root(), "a")
	if _, err := img.Lookup(a, "x"); Errno(err) != syscall.ENOTDIR {
		t.Errorf("lookup in file: %v", err)
	}
	if v, err := a.Getxattr("user.k"); err != nil || string(v) != "v" {
		t.Errorf("xattr %q %v", v, err)
	}
	if _, err := a.Getxattr("user.none"); Errno(err) != syscall.ENODATA {
		t.Errorf("missing xattr: %v", err)
	}
	if _, err := img.Inode(0); err == nil {
		t.Error("inode 0")
	}
	if _, err := img.Inode(99); err == nil {
		t.Error("inode 99")
	}
	if !img.HasXattrs() {
		t.Error("HasXattrs")
	}
}

func TestValidateRejects(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(img *Image)
	}{
		{"slash in name", func(img *Image) { img.Inodes[0].Entries[0].Name = "a/b" }},
		{"dotdot", func(img *Image) { img.Inodes[0].Entries[0].Name = ".." }},
		{"empty name", func(img *Image) { img.Inodes[0].Entries[0].Name = "" }},
		{"long name", func(img *Image) { img.Inodes[0].Entries[0].Name = strings.Repeat("x", 256) }},
		{"unsorted", func(img *Image) { e := img.Inodes[0].Entries; e[0], e[1] = e[1], e[0] }},
		{"dir loop", func(img *Image) { img.Inodes[2].Entries = append(img.Inodes[2].Entries, Dirent{"up", 1}) }},
		{"dangling", func(img *Image) { img.Inodes[2].Entries[0].Ino = 77 }},
		{"root not dir", func(img *Image) { img.Inodes[0].Mode = syscall.S_IFREG }},
		{"bad ino slot", func(img *Image) { img.Inodes[1].Ino = 9 }},
		{"chunk past blob", func(img *Image) { img.Inodes[1].Chunks[2].Chunk.CompressedOffset = 1 << 30 }},
		{"chunk past file", func(img *Image) { img.Inodes[1].Size = 10 }},
		{"chunk overlap", func(img *Image) { img.Inodes[1].Chunks[1].FileOffset = 100 }},
		{"blob index", func(img *Image) { img.Inodes[1].Chunks[0].Chunk.BlobIndex = 3 }},
		{"absurd size", func(img *Image) { img.Inodes[3].Size = 1 << 50 }},
		{"chunk size", func(img *Image) { img.ChunkSize = 3000 }},
		{"bad blob id", func(img *Image) { img.Blobs[0].ID = "../x" }},
		{"prefetch", func(img *Image) { img.Prefetch = []uint64{42} }},
		{"entries on file", func(img *Image) { img.Inodes[3].Entries = []Dirent{{"x", 2}} }},
		{"no file type", func(img *Image) { img.Inodes[3].Mode = 0o644 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, _, _ := testImage(t)
			tc.mutate(img)
			if err := img.Validate(); !errors.Is(err, ErrInvalid) {
				t.Fatalf("Validate = %v, want ErrInvalid", err)
			}
		})
	}
}

func TestSpansHoles(t *testing.T) {
	img, _, _ := testImage(t)
	f := img.Inodes[1]
	spans := f.Spans(4000, 5000)
	var got []string
	for _, s := range spans {
		got = append(got, fmt.Sprintf("%d+%d/%v@%d", s.FileOffset, s.Len, s.Chunk != nil, s.ChunkOffset))
	}
	if want := "4000+96/true@4000 4096+4096/false@0 8192+808/true@0"; strings.Join(got, " ") != want {
		t.Errorf("spans %v want %s", got, want)
	}
	if s := f.Spans(f.Size, 10); s != nil {
		t.Errorf("spans past EOF: %v", s)
	}
	// A file that is all hole.
	h := &Inode{Mode: syscall.S_IFREG, Size: 10000}
	if s := h.Spans(0, 1<<20); len(s) != 1 || s[0].Chunk != nil || s[0].Len != 10000 {
		t.Errorf("hole file spans %+v", s)
	}
}

func TestBlobLayout(t *testing.T) {
	img, _, _ := testImage(t)
	ls := img.BlobLayouts()
	if len(ls) != 1 || len(ls[0].Chunks) != 3 {
		t.Fatalf("layouts %+v", ls)
	}
	l := ls[0]
	for _, tc := range []struct {
		off, n uint64
		want   int
	}{{0, 1, 1}, {0, 4096, 1}, {0, 4097, 2}, {4095, 2, 2}, {8192, 100, 1}, {9000, 1 << 40, 0}, {0, ^uint64(0), 3}} {
		if got := l.Range(tc.off, tc.n); len(got) != tc.want {
			t.Errorf("Range(%d,%d) = %d chunks, want %d", tc.off, tc.n, len(got), tc.want)
		}
	}
}

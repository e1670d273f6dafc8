package rafs

import (
	"slices"
	"testing"
)

func TestFileExtents(t *testing.T) {
	b0, b1 := &Blob{ID: "b0"}, &Blob{ID: "b1"}
	chunk := func(blob uint32, off, size uint64) FileChunk {
		return FileChunk{Chunk: &Chunk{BlobIndex: blob, UncompressedOffset: off, UncompressedSize: uint32(size)}}
	}
	img := &Image{Blobs: []*Blob{b0, b1}, Inodes: []*Inode{
		{Ino: 1}, // a directory: no chunks
		{Ino: 2, Chunks: []FileChunk{chunk(0, 0, 4096), chunk(0, 4096, 4096), chunk(0, 8192, 100)}},  // back to back
		{Ino: 3, Chunks: []FileChunk{chunk(0, 12288, 1000), chunk(0, 16384, 500)}},                   // next 4 KiB boundary
		{Ino: 4, Chunks: []FileChunk{chunk(0, 20480, 4096), chunk(0, 0, 4096), chunk(0, 24576, 10)}}, // a deduplicated chunk inside
		{Ino: 5, Chunks: []FileChunk{chunk(0, 0, 4096), chunk(0, 28672, 100)}},                       // one first: two extents
		{Ino: 6, Chunks: []FileChunk{chunk(0, 32768, 100), chunk(0, 40960, 100)}},                    // a gap
		{Ino: 7, Chunks: []FileChunk{chunk(1, 0, 1<<20)}},                                            // another blob
		nil,
	}}
	es := img.FileExtents(b0)
	want := []Extent{{0, 8292}, {0, 4096}, {12288, 16884}, {20480, 24586}, {28672, 28772}, {32768, 32868}, {40960, 41060}}
	if !slices.Equal(es, want) {
		t.Fatalf("FileExtents(b0) =\n%v, want\n%v", es, want)
	}
	for _, tc := range []struct {
		off  uint64
		want Extent
		ok   bool
	}{
		{0, Extent{0, 8292}, true}, // the furthest of the two holding it
		{5000, Extent{0, 8292}, true},
		{8292, Extent{}, false},
		{16000, Extent{12288, 16884}, true},
		{24580, Extent{20480, 24586}, true},
		{36000, Extent{}, false},
		{41059, Extent{40960, 41060}, true},
		{1 << 40, Extent{}, false},
	} {
		if got, ok := ExtentAt(es, tc.off); got != tc.want || ok != tc.ok {
			t.Errorf("ExtentAt(%d) = %v, %v; want %v, %v", tc.off, got, ok, tc.want, tc.ok)
		}
	}
	if es := img.FileExtents(b1); !slices.Equal(es, []Extent{{0, 1 << 20}}) {
		t.Errorf("FileExtents(b1) = %v", es)
	}
}

package builder

import (
	"archive/tar"
	"fmt"
	"io"
	"slices"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/zran"
)

// ZranLayer makes a build reference an original gzip layer instead of
// writing a blob (nydus-image create --type targz-ref, nydusify --oci-ref):
// AddTar reads the layer as usual, and every chunk becomes a range of its
// uncompressed tar, read by inflating from a checkpoint (rafs.Zran). The
// blob is the layer itself, named by its digest.
type ZranLayer struct {
	// ID is the layer's hex sha256 (its OCI digest).
	ID string
	// R reads the layer's Size bytes; Finish scans it for checkpoints.
	R    io.ReaderAt
	Size int64
	// Span is the uncompressed distance between checkpoints
	// (zran.DefaultSpan if 0).
	Span int64
}

// zranState is what a zran build gathers while AddTar runs.
type zranState struct {
	layer  *ZranLayer
	pos    *countingReader // offset in the uncompressed tar
	spans  []zran.Span     // by chunk index
	chunks []*rafs.Chunk
	uoff   uint64
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// add records a new chunk whose data starts at the current tar offset
// minus len(data) (the chunk was just read).
func (z *zranState) add(data []byte, dg codec.Digest) (*rafs.Chunk, error) {
	if len(z.chunks) >= blobmeta.MaxChunks {
		return nil, fmt.Errorf("layer has more than %d chunks: use a larger chunk size", blobmeta.MaxChunks)
	}
	c := &rafs.Chunk{
		Digest: dg, Index: uint32(len(z.chunks)), UncompressedOffset: z.uoff,
		UncompressedSize: uint32(len(data)), Compressed: true,
	}
	z.uoff += (uint64(len(data)) + blockSize - 1) &^ (blockSize - 1)
	z.spans = append(z.spans, zran.Span{Off: z.pos.n - int64(len(data)), Size: uint32(len(data))})
	z.chunks = append(z.chunks, c)
	return c, nil
}

// sparse reports whether a tar entry stores its data sparsely: its bytes
// are then not one range of the stream.
func sparse(h *tar.Header) bool {
	if h.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range h.PAXRecords {
		if len(k) > 11 && k[:11] == "GNU.sparse." {
			return true
		}
	}
	return false
}

// finish scans the layer, places the chunks and describes the blob.
func (z *zranState) finish(dig codec.Digester, chunkSize uint32) (*rafs.Blob, error) {
	l := z.layer
	// Checkpoints near chunk starts: a chunk read inflates little before
	// its data.
	starts := make([]int64, len(z.spans))
	for i, s := range z.spans {
		starts[i] = s.Off
	}
	slices.Sort(starts)
	ix, err := zran.ScanFor(io.NewSectionReader(l.R, 0, l.Size), l.Span, slices.Compact(starts))
	if err != nil {
		return nil, fmt.Errorf("builder: layer %s: %w", l.ID, err)
	}
	zt, ext, err := ix.Place(l.R, l.Size, z.spans)
	if err != nil {
		return nil, fmt.Errorf("builder: layer %s: %w", l.ID, err)
	}
	for i, c := range z.chunks {
		c.CompressedOffset, c.CompressedSize = ext[i].Offset, ext[i].Size
	}
	b := &rafs.Blob{
		ID: l.ID, Compressor: codec.Gzip, Digester: dig, ChunkSize: chunkSize,
		ChunkCount: uint32(len(z.chunks)), CompressedSize: uint64(l.Size), UncompressedSize: z.uoff,
		Features: blobmeta.FeatureCapTarTOC | blobmeta.FeatureZran, Zran: zt,
	}
	// Read back, through the reader daemons use, the first and the last
	// chunk of every checkpoint (the last needs the longest extent).
	first := map[uint32]int{}
	last := map[uint32]int{}
	for i := range z.chunks {
		ci := zt.Chunks[i].Context
		if _, ok := first[ci]; !ok {
			first[ci] = i
		}
		if j, ok := last[ci]; !ok || z.spans[i].Off > z.spans[j].Off {
			last[ci] = i
		}
	}
	check := func(i int) error {
		c := z.chunks[i]
		raw := make([]byte, c.CompressedSize)
		if _, err := l.R.ReadAt(raw, int64(c.CompressedOffset)); err != nil {
			return err
		}
		_, err := rafs.DecodeChunkBytes(b, c, raw)
		return err
	}
	for ci, i := range first {
		if err := check(i); err != nil {
			return nil, fmt.Errorf("builder: layer %s: zran read-back: %w", l.ID, err)
		}
		if err := check(last[ci]); err != nil {
			return nil, fmt.Errorf("builder: layer %s: zran read-back: %w", l.ID, err)
		}
	}
	return b, nil
}

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
// blob is the layer itself, named by its digest; what the build writes to
// its blob writer is the blob's separate blob meta (contexts, chunk infos,
// digests, TOC), the blob named by the hex of Blob.Meta.Digest
// (rafs/zran.MetaBlobID) that readers fetch the contexts from.
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

// finish scans the layer, lays the chunks out over its checkpoints as
// nydus does, writes the blob meta to meta (nydus's separate "RAFS blob
// for ZRAN": rafs/blobmeta.WriteSeparate) and describes the layer as the
// blob. The chunks keep nydus's compressed extents; readers attach the
// contexts from the meta (rafs/zran.Resolve), so the returned blob has no
// Zran.
func (z *zranState) finish(meta io.Writer, dig codec.Digester, chunkSize uint32) (*rafs.Blob, error) {
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
	zt, ext, err := ix.Layout(z.spans)
	if err != nil {
		return nil, fmt.Errorf("builder: layer %s: %w", l.ID, err)
	}
	infos := make([]blobmeta.ChunkInfo, len(z.chunks))
	digests := make([]codec.Digest, len(z.chunks))
	for i, c := range z.chunks {
		c.CompressedOffset, c.CompressedSize = ext[i].Offset, ext[i].Size
		zc := zt.Chunks[i]
		infos[i] = blobmeta.ChunkInfo{
			CompressedOffset: c.CompressedOffset, CompressedSize: c.CompressedSize,
			UncompressedOffset: c.UncompressedOffset, UncompressedSize: c.UncompressedSize,
			Compressed: true, Flags: blobmeta.ZranFlag, Data: uint64(zc.Context)<<32 | uint64(zc.Offset),
		}
		digests[i] = c.Digest
	}
	sep, err := blobmeta.WriteSeparate(meta, 0, infos, zran.EncodeContexts(zt.Contexts), uint32(len(zt.Contexts)), digests)
	if err != nil {
		return nil, fmt.Errorf("builder: layer %s: %w", l.ID, err)
	}
	b := &rafs.Blob{
		ID: l.ID, Compressor: codec.Gzip, Digester: dig, ChunkSize: chunkSize,
		ChunkCount: uint32(len(z.chunks)), CompressedSize: uint64(l.Size), UncompressedSize: z.uoff,
		Features: sep.Header.Features,
		Meta: rafs.BlobMeta{
			Compressor: sep.Header.CICompressor, Offset: sep.Header.CIOffset,
			CompressedSize: sep.Header.CICompressedSize, UncompressedSize: sep.Header.CIUncompressedSize,
			TOCSize: sep.TOCSize, TOCDigest: sep.TOCDigest, Digest: sep.Digest, Size: sep.Size,
		},
	}
	if err := z.readBack(b, zt, ext); err != nil {
		return nil, fmt.Errorf("builder: layer %s: zran read-back: %w", l.ID, err)
	}
	return b, nil
}

// readBack reads, as a reader attaching the contexts would, the first and
// the last chunk of every context (the last needs the longest extent),
// on copies: the build's chunks keep nydus's extents.
func (z *zranState) readBack(b *rafs.Blob, zt *rafs.Zran, ext []zran.Extent) error {
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
	tb := *b
	in := &rafs.Inode{Ino: rafs.RootIno}
	ends := make([]uint64, len(z.chunks))
	for i, c := range z.chunks {
		ends[i] = ext[i].Offset + uint64(ext[i].Size)
		cc := *c
		cc.BlobIndex = 0
		in.Chunks = append(in.Chunks, rafs.FileChunk{Chunk: &cc})
	}
	img := &rafs.Image{Blobs: []*rafs.Blob{&tb}, Inodes: []*rafs.Inode{in}}
	l := z.layer
	readLayer := func(p []byte, off int64) error {
		_, err := l.R.ReadAt(p, off)
		return err
	}
	cz := &rafs.Zran{Contexts: slices.Clone(zt.Contexts), Chunks: zt.Chunks}
	if err := zran.Attach(img, 0, cz, ends, readLayer); err != nil {
		return err
	}
	check := func(i int) error {
		c := in.Chunks[i].Chunk
		raw := make([]byte, c.CompressedSize)
		if err := readLayer(raw, int64(c.CompressedOffset)); err != nil {
			return err
		}
		_, err := rafs.DecodeChunkBytes(&tb, c, raw)
		return err
	}
	for ci, i := range first {
		if err := check(i); err != nil {
			return err
		}
		if err := check(last[ci]); err != nil {
			return err
		}
	}
	return nil
}

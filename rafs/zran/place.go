package zran

import (
	"fmt"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
)

// Span is a chunk to place: a range of the uncompressed stream.
type Span struct {
	Off  int64
	Size uint32
}

// Extent is where a chunk's stored bytes are in the gzip stream
// (rafs.Chunk CompressedOffset/CompressedSize).
type Extent struct {
	Offset uint64
	Size   uint32
}

// Layout maps spans (chunk i is spans[i]) to checkpoints the way nydus
// lays out a zran blob (ZranGenerator, utils/src/compress/zlib_random.rs):
// one context per checkpoint some span uses, covering all of its chunks
// (InLen compressed bytes from InOffset yield OutLen bytes, at most 16
// MiB: nydusd inflates a context whole), and each chunk's compressed
// extent as its chunk info records it, from the byte where the deflate
// block holding its first byte starts (never before its context) to the
// byte after the block holding its last byte.
func (ix *Index) Layout(spans []Span) (*rafs.Zran, []Extent, error) {
	z := &rafs.Zran{Chunks: make([]rafs.ZranChunk, len(spans))}
	ext := make([]Extent, len(spans))
	ctxOf := map[int]uint32{} // checkpoint -> context
	for i, s := range spans {
		if s.Off < 0 || s.Size == 0 || s.Off+int64(s.Size) > ix.Size {
			return nil, nil, fmt.Errorf("zran: chunk %d [%d,+%d) outside the %d uncompressed bytes", i, s.Off, s.Size, ix.Size)
		}
		k := ix.checkpointFor(s.Off)
		ci, ok := ctxOf[k]
		if !ok {
			cp := ix.Checkpoints[k]
			ci = uint32(len(z.Contexts))
			ctxOf[k] = ci
			// Scan places checkpoints on bytes: CtxBits stays 0.
			z.Contexts = append(z.Contexts, rafs.ZranContext{InOffset: uint64(cp.InBit / 8), OutOffset: uint64(cp.Out), Dict: cp.Dict})
		}
		c := &z.Contexts[ci]
		out := uint64(s.Off+int64(s.Size)) - c.OutOffset
		if out > maxContextOut {
			return nil, nil, fmt.Errorf("zran: chunk %d ends %d bytes after its checkpoint (nydusd inflates at most %d): use a smaller chunk size", i, out, maxContextOut)
		}
		end := uint64(ix.endByte(s.Off + int64(s.Size) - 1))
		start := max(uint64(ix.Blocks[ix.blockFor(s.Off)].InBit/8), c.InOffset)
		if end-start > blobmeta.MaxChunkSize-1 || end-c.InOffset > 1<<32-1 {
			return nil, nil, fmt.Errorf("zran: chunk %d needs %d compressed bytes: the stream compresses too little for zran", i, end-start)
		}
		z.Chunks[i] = rafs.ZranChunk{Context: ci, Offset: uint32(uint64(s.Off) - c.OutOffset)}
		c.OutLen = max(c.OutLen, uint32(out))
		c.InLen = max(c.InLen, uint32(end-c.InOffset))
		ext[i] = Extent{Offset: start, Size: uint32(end - start)}
	}
	return z, ext, nil
}

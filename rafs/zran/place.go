package zran

import (
	"fmt"
	"io"
	"sort"

	"github.com/rafsd/rafsd/rafs"
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

// MaxExtent bounds one chunk's stored extent (rafs.Validate's limit).
const MaxExtent = 2 * rafs.MaxChunkSize

// Place maps spans (chunk i is spans[i]) to checkpoints and stored
// extents of the stream ra (of size bytes) and returns the blob's zran
// table. Only checkpoints some span uses are kept. Chunks that restart at
// the same checkpoint get distinct extent offsets (the bytes skipped go to
// the context's Head).
func (ix *Index) Place(ra io.ReaderAt, size int64, spans []Span) (*rafs.Zran, []Extent, error) {
	z := &rafs.Zran{Chunks: make([]rafs.ZranChunk, len(spans))}
	ext := make([]Extent, len(spans))
	ctxOf := map[int]uint32{} // checkpoint -> context
	var cps []int
	for i, s := range spans {
		if s.Off < 0 || s.Size == 0 || s.Off+int64(s.Size) > ix.Size {
			return nil, nil, fmt.Errorf("zran: chunk %d [%d,+%d) outside the %d uncompressed bytes", i, s.Off, s.Size, ix.Size)
		}
		k := ix.checkpointFor(s.Off)
		ci, ok := ctxOf[k]
		if !ok {
			ci = uint32(len(cps))
			ctxOf[k] = ci
			cps = append(cps, k)
		}
		cp := ix.Checkpoints[k]
		if s.Off-cp.Out > 1<<32-1 {
			return nil, nil, fmt.Errorf("zran: chunk %d is %d bytes after its checkpoint", i, s.Off-cp.Out)
		}
		z.Chunks[i] = rafs.ZranChunk{Context: ci, Offset: uint32(s.Off - cp.Out)}
	}
	z.Contexts = make([]rafs.ZranContext, len(cps))
	for ci, k := range cps {
		cp := ix.Checkpoints[k]
		// Scan places checkpoints on bytes: CtxBits stays 0.
		c := rafs.ZranContext{InOffset: uint64(cp.InBit / 8), OutOffset: uint64(cp.Out), Dict: cp.Dict}
		next := Block{InBit: ix.EndBit, Out: ix.Size}
		if k+1 < len(ix.Checkpoints) {
			next = ix.Checkpoints[k+1].Block
		}
		c.InLen = uint32(min((next.InBit+7)/8-int64(c.InOffset), 1<<32-1))
		c.OutLen = uint32(min(next.Out-cp.Out, 1<<32-1))
		z.Contexts[ci] = c
	}

	// Distinct offsets: chunks in checkpoint order take the first free
	// byte at or after their checkpoint.
	order := make([]int, len(spans))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool {
		return z.Contexts[z.Chunks[order[a]].Context].InOffset < z.Contexts[z.Chunks[order[b]].Context].InOffset
	})
	used := map[uint64]bool{}
	head := make([]uint64, len(cps))
	for _, i := range order {
		ci := z.Chunks[i].Context
		c := &z.Contexts[ci]
		o := c.InOffset
		for used[o] {
			o++
		}
		used[o] = true
		head[ci] = max(head[ci], o-c.InOffset)
		end := uint64(ix.endByte(spans[i].Off + int64(spans[i].Size) - 1))
		end = max(end, o+1)
		if end > uint64(size) {
			return nil, nil, fmt.Errorf("zran: chunk %d needs the stream to byte %d of %d", i, end, size)
		}
		if end-o > MaxExtent {
			return nil, nil, fmt.Errorf("zran: chunk %d needs %d compressed bytes from its checkpoint (more than %d): the stream compresses too little for zran with this chunk size", i, end-o, MaxExtent)
		}
		ext[i] = Extent{Offset: o, Size: uint32(end - o)}
	}
	for ci := range z.Contexts {
		if head[ci] == 0 {
			continue
		}
		c := &z.Contexts[ci]
		c.Head = make([]byte, head[ci])
		if _, err := ra.ReadAt(c.Head, int64(c.InOffset)); err != nil {
			return nil, nil, fmt.Errorf("zran: read head bytes: %w", err)
		}
	}
	return z, ext, nil
}

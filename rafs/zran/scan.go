package zran

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"

	"github.com/rafsd/rafsd/rafs/zran/deflate"
)

// Block is where a deflate block starts.
type Block struct {
	InBit int64 // bit offset in the gzip stream
	Out   int64 // uncompressed offset
}

// Checkpoint is a block start at which inflating can restart.
type Checkpoint struct {
	Block
	Dict []byte // the output before it, at most 32 KiB
}

// Index is what Scan learned about a gzip stream.
type Index struct {
	// Size is the uncompressed size; EndBit the bit after the final block.
	Size   int64
	EndBit int64
	// Blocks lists every block start; Checkpoints the chosen ones (the
	// first block always), both in stream order.
	Blocks      []Block
	Checkpoints []Checkpoint
}

// DefaultSpan is the output between checkpoints Scan aims for: a chunk
// read inflates at most about this much before its data. Each checkpoint
// costs its 32 KiB window in the bootstrap.
const DefaultSpan = 1 << 20

// Scan inflates the gzip stream r (one member or several), checking each
// member's CRC-32 and size, and records a checkpoint at the first byte-aligned block start
// after every span bytes of output (DefaultSpan if span <= 0). Blocks end
// at any bit; about one in eight starts on a byte (and every one after a
// stored block), so checkpoints are a few blocks further apart than span.
func Scan(r io.Reader, span int64) (*Index, error) {
	return ScanFor(r, span, nil)
}

// ScanFor is Scan that also puts a checkpoint at the last byte-aligned
// block start at or before each offset of starts (sorted; the chunks'
// first bytes), unless that is within span/2 of the previous checkpoint:
// a chunk then inflates from close to its start instead of from up to a
// span before it.
func ScanFor(r io.Reader, span int64, starts []int64) (*Index, error) {
	if span <= 0 {
		span = DefaultSpan
	}
	var cand *Checkpoint // the last byte-aligned block start not taken
	br := deflate.NewReader(bufio.NewReaderSize(r, 64<<10))
	ix := &Index{}
	w := deflate.NewWindow(nil)
	var crc uint32
	w.Sink = func(p []byte) { crc = crc32.Update(crc, crc32.IEEETable, p) }
	// consume passes the wanted offsets before out (the stream has gone
	// past them): the candidate is the last aligned start at or before them.
	consume := func(out int64) {
		for len(starts) > 0 && starts[0] < out {
			if n := len(ix.Checkpoints); cand != nil && n > 0 && cand.Out-ix.Checkpoints[n-1].Out >= span/2 {
				ix.Checkpoints = append(ix.Checkpoints, *cand)
			}
			cand = nil
			starts = starts[1:]
		}
	}
	// Members one after another (concatenated gzip files: pigz
	// --independent, bgzip); each checked against its own trailer.
	for member := 0; ; member++ {
		ok, err := deflate.NextMember(br)
		if err != nil {
			return nil, fmt.Errorf("%w: member %d: %v", ErrFormat, member, err)
		}
		if !ok {
			if member == 0 {
				return nil, formatErr("empty stream")
			}
			break
		}
		crc = 0
		memberStart := w.Total
		for {
			start := Block{InBit: br.Pos(), Out: w.Total}
			ix.Blocks = append(ix.Blocks, start)
			consume(start.Out)
			// Only byte-aligned block starts: compress/flate reads from a
			// byte, and stored blocks later on depend on the stream's
			// alignment.
			if start.InBit%8 == 0 {
				if n := len(ix.Checkpoints); n == 0 || w.Total-ix.Checkpoints[n-1].Out >= span {
					ix.Checkpoints = append(ix.Checkpoints, Checkpoint{Block: start, Dict: w.Dict()})
					cand = nil
				} else if len(starts) > 0 {
					cand = &Checkpoint{Block: start, Dict: w.Dict()}
				}
			}
			final, err := br.Block(w)
			if err != nil {
				if errors.Is(err, deflate.ErrFormat) {
					return nil, fmt.Errorf("%w: %v", ErrFormat, err)
				}
				return nil, err
			}
			if final {
				break
			}
		}
		ix.EndBit = br.Pos()
		w.Flush()
		br.Align()
		var tr [8]byte
		for i := range tr {
			v, err := br.Bits(8)
			if err != nil {
				return nil, formatErr("truncated gzip trailer")
			}
			tr[i] = byte(v)
		}
		if c := binary.LittleEndian.Uint32(tr[:4]); c != crc {
			return nil, formatErr("member %d: CRC-32 %08x, stream says %08x", member, crc, c)
		}
		if isize := binary.LittleEndian.Uint32(tr[4:]); isize != uint32(w.Total-memberStart) {
			return nil, formatErr("member %d: size %d, stream says %d (mod 2^32)", member, w.Total-memberStart, isize)
		}
	}
	ix.Size = w.Total
	consume(w.Total)
	return ix, nil
}

// checkpointFor is the last checkpoint at or before uncompressed off.
func (ix *Index) checkpointFor(off int64) int {
	return sort.Search(len(ix.Checkpoints), func(i int) bool { return ix.Checkpoints[i].Out > off }) - 1
}

// blockFor is the block holding uncompressed byte off.
func (ix *Index) blockFor(off int64) int {
	return max(sort.Search(len(ix.Blocks), func(i int) bool { return ix.Blocks[i].Out > off })-1, 0)
}

// endByte is the byte after the block holding uncompressed byte last:
// inflating that far yields it.
func (ix *Index) endByte(last int64) int64 {
	k := sort.Search(len(ix.Blocks), func(i int) bool { return ix.Blocks[i].Out > last })
	end := ix.EndBit
	if k < len(ix.Blocks) {
		end = ix.Blocks[k].InBit
	}
	return (end + 7) / 8
}

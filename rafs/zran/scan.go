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

// Scan inflates the single-member gzip stream r, checking its CRC-32 and
// size, and records a checkpoint at the first byte-aligned block start
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
	if err := gzipHeader(br); err != nil {
		return nil, err
	}
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
	for {
		start := Block{InBit: br.Pos(), Out: w.Total}
		ix.Blocks = append(ix.Blocks, start)
		consume(start.Out)
		// Only byte-aligned block starts: compress/flate reads from a byte,
		// and stored blocks later on depend on the stream's alignment.
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
	ix.Size = w.Total
	consume(w.Total)
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
		return nil, formatErr("CRC-32 %08x, stream says %08x", crc, c)
	}
	if isize := binary.LittleEndian.Uint32(tr[4:]); isize != uint32(w.Total) {
		return nil, formatErr("size %d, stream says %d (mod 2^32)", w.Total, isize)
	}
	// A second member (concatenated gzip files) would restart the stream;
	// layers are one member. Trailing zeros are tolerated, as gzip does.
	for {
		c, err := br.ReadByte()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if c != 0 {
			return nil, formatErr("data after the gzip member (multi-member streams are not supported)")
		}
	}
	return ix, nil
}

func gzipHeader(b *deflate.Reader) error {
	var h [10]byte
	for i := range h {
		v, err := b.Bits(8)
		if err != nil {
			return formatErr("truncated gzip header")
		}
		h[i] = byte(v)
	}
	if h[0] != 0x1f || h[1] != 0x8b || h[2] != 8 {
		return formatErr("not gzip (magic %02x%02x, method %d)", h[0], h[1], h[2])
	}
	flg := h[3]
	if flg&0xe0 != 0 {
		return formatErr("reserved gzip flags %#x", flg)
	}
	if flg&4 != 0 { // FEXTRA
		n, err := b.Bits(16)
		if err != nil {
			return formatErr("truncated gzip header")
		}
		for range n {
			if _, err := b.Bits(8); err != nil {
				return formatErr("truncated gzip header")
			}
		}
	}
	for _, f := range []byte{8, 16} { // FNAME, FCOMMENT: zero-terminated
		if flg&f == 0 {
			continue
		}
		for {
			c, err := b.Bits(8)
			if err != nil {
				return formatErr("truncated gzip header")
			}
			if c == 0 {
				break
			}
		}
	}
	if flg&2 != 0 { // FHCRC
		if _, err := b.Bits(16); err != nil {
			return formatErr("truncated gzip header")
		}
	}
	return nil
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

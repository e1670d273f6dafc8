package zran

import (
	"bufio"
	"encoding/binary"
	"io"
	"sort"
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
	br := &bitReader{r: bufio.NewReaderSize(r, 64<<10)}
	if err := br.gzipHeader(); err != nil {
		return nil, err
	}
	ix := &Index{}
	w := &window{buf: make([]byte, 0, windowCap)}
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
		start := Block{InBit: br.pos(), Out: w.total}
		ix.Blocks = append(ix.Blocks, start)
		consume(start.Out)
		// Only byte-aligned block starts: compress/flate reads from a byte,
		// and stored blocks later on depend on the stream's alignment.
		if start.InBit%8 == 0 {
			if n := len(ix.Checkpoints); n == 0 || w.total-ix.Checkpoints[n-1].Out >= span {
				ix.Checkpoints = append(ix.Checkpoints, Checkpoint{Block: start, Dict: w.dict()})
				cand = nil
			} else if len(starts) > 0 {
				cand = &Checkpoint{Block: start, Dict: w.dict()}
			}
		}
		hdr, err := br.bits(3)
		if err != nil {
			return nil, err
		}
		switch hdr >> 1 {
		case 0:
			err = br.stored(w)
		case 1:
			err = br.codes(w, fixedLit, fixedDist)
		case 2:
			err = br.dynamic(w)
		default:
			err = formatErr("block type 3 at bit %d", start.InBit)
		}
		if err != nil {
			return nil, err
		}
		if hdr&1 != 0 {
			break
		}
	}
	ix.EndBit = br.pos()
	ix.Size = w.total
	consume(w.total)
	w.flush()
	br.align()
	var tr [8]byte
	for i := range tr {
		v, err := br.bits(8)
		if err != nil {
			return nil, formatErr("truncated gzip trailer")
		}
		tr[i] = byte(v)
	}
	if crc := binary.LittleEndian.Uint32(tr[:4]); crc != w.crc {
		return nil, formatErr("CRC-32 %08x, stream says %08x", w.crc, crc)
	}
	if isize := binary.LittleEndian.Uint32(tr[4:]); isize != uint32(w.total) {
		return nil, formatErr("size %d, stream says %d (mod 2^32)", w.total, isize)
	}
	// A second member (concatenated gzip files) would restart the stream;
	// layers are one member. Trailing zeros are tolerated, as gzip does.
	for {
		c, err := br.r.ReadByte()
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

func (b *bitReader) gzipHeader() error {
	var h [10]byte
	for i := range h {
		v, err := b.bits(8)
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
		n, err := b.bits(16)
		if err != nil {
			return err
		}
		for range n {
			if _, err := b.bits(8); err != nil {
				return err
			}
		}
	}
	for _, f := range []byte{8, 16} { // FNAME, FCOMMENT: zero-terminated
		if flg&f == 0 {
			continue
		}
		for {
			c, err := b.bits(8)
			if err != nil {
				return err
			}
			if c == 0 {
				break
			}
		}
	}
	if flg&2 != 0 { // FHCRC
		if _, err := b.bits(16); err != nil {
			return err
		}
	}
	return nil
}

func (b *bitReader) stored(w *window) error {
	b.align()
	v, err := b.bits(32)
	if err != nil {
		return err
	}
	n, nn := v&0xffff, v>>16
	if n != ^nn&0xffff {
		return formatErr("stored block length %d / %d", n, nn)
	}
	w.room(int(n))
	for range n {
		c, err := b.bits(8)
		if err != nil {
			return err
		}
		w.buf = append(w.buf, byte(c))
	}
	w.total += int64(n)
	return nil
}

func (b *bitReader) dynamic(w *window) error {
	v, err := b.bits(14)
	if err != nil {
		return err
	}
	nlen, ndist, ncode := int(v&31)+257, int(v>>5&31)+1, int(v>>10)+4
	if nlen > 286 || ndist > 30 {
		return formatErr("dynamic block with %d/%d codes", nlen, ndist)
	}
	var cl [19]uint8
	for i := range ncode {
		x, err := b.bits(3)
		if err != nil {
			return err
		}
		cl[clOrder[i]] = uint8(x)
	}
	ch, err := newHuffman(cl[:])
	if err != nil {
		return err
	}
	lengths := make([]uint8, nlen+ndist)
	for i := 0; i < len(lengths); {
		sym, err := b.decode(ch)
		if err != nil {
			return err
		}
		if sym < 16 {
			lengths[i] = uint8(sym)
			i++
			continue
		}
		var rep uint32
		var val uint8
		switch sym {
		case 16:
			if i == 0 {
				return formatErr("repeat with no previous length")
			}
			val = lengths[i-1]
			x, err := b.bits(2)
			if err != nil {
				return err
			}
			rep = 3 + x
		case 17:
			x, err := b.bits(3)
			if err != nil {
				return err
			}
			rep = 3 + x
		default:
			x, err := b.bits(7)
			if err != nil {
				return err
			}
			rep = 11 + x
		}
		if i+int(rep) > len(lengths) {
			return formatErr("code lengths overflow")
		}
		for range rep {
			lengths[i] = val
			i++
		}
	}
	if lengths[256] == 0 {
		return formatErr("no end-of-block code")
	}
	lh, err := newHuffman(lengths[:nlen])
	if err != nil {
		return err
	}
	dh, err := newHuffman(lengths[nlen:])
	if err != nil {
		return err
	}
	return b.codes(w, lh, dh)
}

func (b *bitReader) codes(w *window, lh, dh *huffman) error {
	for {
		sym, err := b.decode(lh)
		if err != nil {
			return err
		}
		if sym < 256 {
			w.room(1)
			w.buf = append(w.buf, byte(sym))
			w.total++
			continue
		}
		if sym == 256 {
			return nil
		}
		sym -= 257
		if sym >= 29 {
			return formatErr("length code %d", sym+257)
		}
		x, err := b.bits(uint(lenExtra[sym]))
		if err != nil {
			return err
		}
		n := int(lenBase[sym]) + int(x)
		ds, err := b.decode(dh)
		if err != nil {
			return err
		}
		if ds >= 30 {
			return formatErr("distance code %d", ds)
		}
		x, err = b.bits(uint(dstExtra[ds]))
		if err != nil {
			return err
		}
		d := int(dstBase[ds]) + int(x)
		if int64(d) > w.total {
			return formatErr("distance %d before the start of the stream", d)
		}
		w.room(n)
		p := len(w.buf) - d
		for k := range n {
			w.buf = append(w.buf, w.buf[p+k])
		}
		w.total += int64(n)
	}
}

// checkpointFor is the last checkpoint at or before uncompressed off.
func (ix *Index) checkpointFor(off int64) int {
	return sort.Search(len(ix.Checkpoints), func(i int) bool { return ix.Checkpoints[i].Out > off }) - 1
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

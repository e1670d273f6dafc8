// Package zran indexes gzip streams for random access (nydus "zran",
// after zlib's examples/zran.c): it inflates a stream once, noting where
// each deflate block starts (to the bit) and keeping the 32 KiB window at
// checkpoints, so that any range of the uncompressed data can later be
// inflated from the checkpoint before it. The builder uses it to make RAFS
// chunks that are ranges of an original OCI gzip layer (rafs.Zran); the
// read side is rafs.DecodeChunkBytes, with compress/flate.
//
// compress/flate does not report block boundaries, so Scan carries its own
// inflater; it checks the gzip trailer's CRC-32 and size, so a boundary it
// reports is one of the real stream.
package zran

import (
	"bufio"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// ErrFormat is wrapped by every error about the stream's contents.
var ErrFormat = errors.New("zran: bad gzip stream")

func formatErr(f string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(f, a...))
}

// bitReader reads a deflate stream LSB first and counts the bits it has
// consumed.
type bitReader struct {
	r     *bufio.Reader
	bytes int64 // bytes taken from r
	buf   uint64
	n     uint
}

// pos is the bit position of the next unread bit.
func (b *bitReader) pos() int64 { return b.bytes*8 - int64(b.n) }

func (b *bitReader) need(n uint) error {
	for b.n < n {
		c, err := b.r.ReadByte()
		if err != nil {
			if err == io.EOF {
				return formatErr("truncated at byte %d", b.bytes)
			}
			return err
		}
		b.bytes++
		b.buf |= uint64(c) << b.n
		b.n += 8
	}
	return nil
}

func (b *bitReader) bits(n uint) (uint32, error) {
	if n == 0 {
		return 0, nil
	}
	if err := b.need(n); err != nil {
		return 0, err
	}
	v := uint32(b.buf & (1<<n - 1))
	b.buf >>= n
	b.n -= n
	return v, nil
}

// align drops the bits left in the current byte.
func (b *bitReader) align() {
	d := b.n % 8
	b.buf >>= d
	b.n -= d
}

// huffman is a canonical code as puff.c keeps it (counts per length,
// symbols in code order), plus a lookup table for codes of up to fastBits
// bits indexed by the next stream bits.
type huffman struct {
	count  [16]uint16
	symbol []uint16
	fast   [1 << fastBits]uint32 // symbol | length<<16; 0: longer code
}

const fastBits = 9

func newHuffman(lengths []uint8) (*huffman, error) {
	h := &huffman{symbol: make([]uint16, len(lengths))}
	for _, l := range lengths {
		h.count[l]++
	}
	if int(h.count[0]) == len(lengths) {
		return h, nil // no codes: only an error if used
	}
	left := 1
	for l := 1; l < 16; l++ {
		left = left<<1 - int(h.count[l])
		if left < 0 {
			return nil, formatErr("over-subscribed huffman code")
		}
	}
	var offs [16]uint16
	for l := 1; l < 15; l++ {
		offs[l+1] = offs[l] + h.count[l]
	}
	for s, l := range lengths {
		if l != 0 {
			h.symbol[offs[l]] = uint16(s)
			offs[l]++
		}
	}
	// Canonical codes in symbol order of each length; the stream sends
	// them most significant bit first, so the table is indexed reversed.
	code := 0
	k := 0
	for l := 1; l <= fastBits; l++ {
		for range h.count[l] {
			r := bitsReverse(code, l)
			for x := r; x < 1<<fastBits; x += 1 << l {
				h.fast[x] = uint32(h.symbol[k]) | uint32(l)<<16
			}
			code++
			k++
		}
		code <<= 1
	}
	return h, nil
}

func bitsReverse(c, n int) int {
	r := 0
	for range n {
		r = r<<1 | c&1
		c >>= 1
	}
	return r
}

func (b *bitReader) decode(h *huffman) (int, error) {
	if b.need(fastBits) == nil {
		if e := h.fast[b.buf&(1<<fastBits-1)]; e != 0 {
			l := uint(e >> 16)
			b.buf >>= l
			b.n -= l
			return int(e & 0xffff), nil
		}
	}
	// A longer code, or the stream's last bits: one bit at a time.
	code, first, index := 0, 0, 0
	for l := 1; l < 16; l++ {
		v, err := b.bits(1)
		if err != nil {
			return 0, err
		}
		code |= int(v)
		count := int(h.count[l])
		if code-count < first {
			return int(h.symbol[index+(code-first)]), nil
		}
		index += count
		first += count
		first <<= 1
		code <<= 1
	}
	return 0, formatErr("invalid huffman code")
}

var (
	lenBase  = [29]uint16{3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258}
	lenExtra = [29]uint8{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0}
	dstBase  = [30]uint16{1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577}
	dstExtra = [30]uint8{0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13}
	clOrder  = [19]uint8{16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15}

	fixedLit, fixedDist = func() (*huffman, *huffman) {
		var l [288]uint8
		for i := range l {
			switch {
			case i < 144:
				l[i] = 8
			case i < 256:
				l[i] = 9
			case i < 280:
				l[i] = 7
			default:
				l[i] = 8
			}
		}
		var d [30]uint8
		for i := range d {
			d[i] = 5
		}
		lh, _ := newHuffman(l[:])
		dh, _ := newHuffman(d[:])
		return lh, dh
	}()
)

// window keeps the output: at least the last 32 KiB (matches reach that
// far back), flushed to a CRC in large steps.
type window struct {
	buf     []byte
	crcDone int // buf[:crcDone] is in crc
	crc     uint32
	total   int64
}

const (
	windowSize = 32 << 10
	windowCap  = 256 << 10
)

func (w *window) flush() {
	w.crc = crc32.Update(w.crc, crc32.IEEETable, w.buf[w.crcDone:])
	w.crcDone = len(w.buf)
}

func (w *window) room(n int) {
	if len(w.buf)+n <= windowCap {
		return
	}
	w.flush()
	keep := w.buf[len(w.buf)-windowSize:]
	w.buf = append(w.buf[:0], keep...)
	w.crcDone = len(w.buf)
}

// dict is a copy of the last 32 KiB of output.
func (w *window) dict() []byte {
	return append([]byte(nil), w.buf[max(0, len(w.buf)-windowSize):]...)
}

package zran

import (
	"encoding/binary"
	"fmt"

	"github.com/rafsd/rafsd/rafs"
)

// The zran table of a blob, as a RAFS v6 bootstrap stores it (rafsd's
// layout; nydus keeps the same context records in a separate blob meta):
//
//	header   16 bytes: magic "RZR1", context count, chunk count, 0
//	contexts count x 48 bytes: nydus's ZranInflateContext (in_offset u64,
//	         out_offset u64, dict_offset u64, in_len u32, out_len u32,
//	         dict_size u32, ctx_byte u8, ctx_bits u8, 2 reserved) followed
//	         by head_offset u32, head_size u32
//	chunks   count x 8 bytes: context u32, offset u32 (by chunk index)
//	data     dictionaries and heads, at their offsets from its start
const (
	tableMagic   = "RZR1"
	headerSize   = 16
	contextSize  = 48
	chunkRecSize = 8
)

// MarshalTable encodes z.
func MarshalTable(z *rafs.Zran) []byte {
	dataOff := headerSize + len(z.Contexts)*contextSize + len(z.Chunks)*chunkRecSize
	n := dataOff
	for _, c := range z.Contexts {
		n += len(c.Dict) + len(c.Head)
	}
	b := make([]byte, dataOff, n)
	le := binary.LittleEndian
	copy(b, tableMagic)
	le.PutUint32(b[4:], uint32(len(z.Contexts)))
	le.PutUint32(b[8:], uint32(len(z.Chunks)))
	for i, c := range z.Contexts {
		r := b[headerSize+i*contextSize:]
		le.PutUint64(r[0:], c.InOffset)
		le.PutUint64(r[8:], c.OutOffset)
		le.PutUint64(r[16:], uint64(len(b)-dataOff))
		le.PutUint32(r[24:], c.InLen)
		le.PutUint32(r[28:], c.OutLen)
		le.PutUint32(r[32:], uint32(len(c.Dict)))
		r[36], r[37] = c.CtxByte, c.CtxBits
		b = append(b, c.Dict...)
		le.PutUint32(r[40:], uint32(len(b)-dataOff))
		le.PutUint32(r[44:], uint32(len(c.Head)))
		b = append(b, c.Head...)
	}
	for i, c := range z.Chunks {
		r := b[headerSize+len(z.Contexts)*contextSize+i*chunkRecSize:]
		le.PutUint32(r[0:], c.Context)
		le.PutUint32(r[4:], c.Offset)
	}
	return b
}

// UnmarshalTable decodes a table written by MarshalTable for a blob of
// chunkCount chunks, checking every count, offset and size against b.
func UnmarshalTable(b []byte, chunkCount uint32) (*rafs.Zran, error) {
	if len(b) < headerSize || string(b[:4]) != tableMagic {
		return nil, fmt.Errorf("%w: zran table: bad header", rafs.ErrInvalid)
	}
	le := binary.LittleEndian
	nctx, nch := uint64(le.Uint32(b[4:])), uint64(le.Uint32(b[8:]))
	if nch != uint64(chunkCount) {
		return nil, fmt.Errorf("%w: zran table has %d chunks, blob %d", rafs.ErrInvalid, nch, chunkCount)
	}
	dataOff := headerSize + nctx*contextSize + nch*chunkRecSize
	if dataOff > uint64(len(b)) {
		return nil, fmt.Errorf("%w: zran table: %d contexts and %d chunks in %d bytes", rafs.ErrInvalid, nctx, nch, len(b))
	}
	data := b[dataOff:]
	slice := func(off, n uint64, what string, i uint64) ([]byte, error) {
		if off > uint64(len(data)) || n > uint64(len(data))-off {
			return nil, fmt.Errorf("%w: zran context %d: %s [%d,+%d) outside %d data bytes", rafs.ErrInvalid, i, what, off, n, len(data))
		}
		if n == 0 {
			return nil, nil
		}
		return data[off : off+n : off+n], nil
	}
	z := &rafs.Zran{Contexts: make([]rafs.ZranContext, nctx), Chunks: make([]rafs.ZranChunk, nch)}
	for i := range nctx {
		r := b[headerSize+i*contextSize:]
		c := rafs.ZranContext{
			InOffset: le.Uint64(r[0:]), OutOffset: le.Uint64(r[8:]),
			InLen: le.Uint32(r[24:]), OutLen: le.Uint32(r[28:]),
			CtxByte: r[36], CtxBits: r[37],
		}
		if c.CtxBits > 7 {
			return nil, fmt.Errorf("%w: zran context %d: %d context bits", rafs.ErrInvalid, i, c.CtxBits)
		}
		if c.InOffset > 1<<40 || c.OutOffset > 1<<44 {
			return nil, fmt.Errorf("%w: zran context %d at %d/%d", rafs.ErrInvalid, i, c.InOffset, c.OutOffset)
		}
		ds := uint64(le.Uint32(r[32:]))
		if ds > rafs.MaxZranDict {
			return nil, fmt.Errorf("%w: zran context %d: %d-byte dictionary", rafs.ErrInvalid, i, ds)
		}
		var err error
		if c.Dict, err = slice(le.Uint64(r[16:]), ds, "dictionary", i); err != nil {
			return nil, err
		}
		if c.Head, err = slice(uint64(le.Uint32(r[40:])), uint64(le.Uint32(r[44:])), "head", i); err != nil {
			return nil, err
		}
		z.Contexts[i] = c
	}
	for i := range nch {
		r := b[headerSize+nctx*contextSize+i*chunkRecSize:]
		c := rafs.ZranChunk{Context: le.Uint32(r[0:]), Offset: le.Uint32(r[4:])}
		if uint64(c.Context) >= nctx {
			return nil, fmt.Errorf("%w: zran chunk %d: context %d of %d", rafs.ErrInvalid, i, c.Context, nctx)
		}
		z.Chunks[i] = c
	}
	return z, nil
}

package rafs

import (
	"bytes"
	"compress/flate"
	"errors"
	"fmt"
	"io"
)

// Zran makes a blob an unmodified gzip stream (an OCI layer) whose chunks
// are ranges of the uncompressed tar inside it (nydus "zran", nydusify
// --oci-ref). A chunk is read by inflating from a checkpoint, a place where
// deflate can restart given the 32 KiB of output before it.
//
// A chunk's stored extent [CompressedOffset, +CompressedSize) lies in the
// gzip stream at or after its context's InOffset and reaches far enough to
// inflate the chunk; the bytes between InOffset and CompressedOffset come
// from the context's Head. (Each chunk of a blob keeps a distinct
// CompressedOffset, the key chunk fetchers index chunks by, even when
// several chunks restart at the same checkpoint.)
type Zran struct {
	Contexts []ZranContext
	// Chunks maps a chunk's Index to its checkpoint.
	Chunks []ZranChunk
}

// ZranContext is one inflate checkpoint (nydus ZranInflateContext).
type ZranContext struct {
	// InOffset is the first whole byte of the deflate stream after the
	// checkpoint; OutOffset the uncompressed offset there.
	InOffset  uint64
	OutOffset uint64
	// InLen and OutLen are the extent of the stream the context serves
	// (informational, as in nydus).
	InLen, OutLen uint32
	// CtxBits (0..7) high bits of CtxByte, the byte before InOffset, would
	// be the first bits of the stream after the checkpoint (nydus's
	// fields). Only byte-aligned checkpoints (CtxBits 0) are read:
	// compress/flate starts at a byte, and shifting the input would move
	// the byte alignment stored blocks rely on.
	CtxByte, CtxBits uint8
	// Dict is the output before the checkpoint (at most 32 KiB).
	Dict []byte
	// Head holds the stream bytes from InOffset on, as far as the
	// CompressedOffset of the context's last chunk.
	Head []byte
}

// ZranChunk places a chunk relative to its checkpoint.
type ZranChunk struct {
	Context uint32
	// Offset is where the chunk starts in the output after the checkpoint.
	Offset uint32
}

// MaxZranDict is deflate's window: the most output a checkpoint needs.
const MaxZranDict = 32 << 10

// decodeZran inflates chunk c of zran blob b from its stored extent raw.
func decodeZran(b *Blob, c *Chunk, raw []byte) ([]byte, error) {
	z := b.Zran
	if int64(c.Index) >= int64(len(z.Chunks)) {
		return nil, fmt.Errorf("chunk %d of blob %s: no zran record (%d): %w", c.Index, b.ID, len(z.Chunks), ErrInvalid)
	}
	zc := z.Chunks[c.Index]
	if int64(zc.Context) >= int64(len(z.Contexts)) {
		return nil, fmt.Errorf("chunk %d of blob %s: zran context %d of %d: %w", c.Index, b.ID, zc.Context, len(z.Contexts), ErrInvalid)
	}
	ctx := &z.Contexts[zc.Context]
	if c.CompressedOffset < ctx.InOffset || c.CompressedOffset-ctx.InOffset > uint64(len(ctx.Head)) || ctx.CtxBits != 0 || len(ctx.Dict) > MaxZranDict {
		return nil, fmt.Errorf("chunk %d of blob %s at %d: zran context at %d (%d head bytes, %d bits): %w",
			c.Index, b.ID, c.CompressedOffset, ctx.InOffset, len(ctx.Head), ctx.CtxBits, ErrInvalid)
	}
	head := ctx.Head[:c.CompressedOffset-ctx.InOffset]
	in := make([]byte, 0, len(head)+len(raw))
	in = append(append(in, head...), raw...)
	fr := flate.NewReaderDict(bytes.NewReader(in), ctx.Dict)
	defer fr.Close()
	if _, err := io.CopyN(io.Discard, fr, int64(zc.Offset)); err != nil {
		return nil, fmt.Errorf("chunk %d of blob %s: inflate to offset %d from checkpoint %d: %w", c.Index, b.ID, zc.Offset, zc.Context, zranErr(err))
	}
	data := make([]byte, c.UncompressedSize)
	if _, err := io.ReadFull(fr, data); err != nil {
		return nil, fmt.Errorf("chunk %d of blob %s: inflate from checkpoint %d: %w", c.Index, b.ID, zc.Context, zranErr(err))
	}
	return data, nil
}

// zranErr marks a stream that ends early or is corrupt as bad data.
func zranErr(err error) error {
	var ce flate.CorruptInputError
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &ce) {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return err
}

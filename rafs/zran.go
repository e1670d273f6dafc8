package rafs

import (
	"fmt"

	"github.com/rafsd/rafsd/rafs/zran/deflate"
)

// Zran makes a blob an unmodified gzip stream (an OCI layer) whose chunks
// are ranges of the uncompressed tar inside it (nydus "zran", nydusify
// --oci-ref). A chunk is read by inflating from a checkpoint (a context),
// a deflate block boundary where inflating can restart given the 32 KiB of
// output before it, as nydus's blob meta records them (ZranInflateContext
// and the chunk's zran index and offset, storage/src/meta/zran.rs).
//
// A chunk's stored extent [CompressedOffset, +CompressedSize) is the part
// of the gzip stream a read fetches. It reaches far enough to inflate the
// chunk and normally starts at or before its context's InOffset (the bytes
// before InOffset are skipped). Each chunk of a blob keeps a distinct
// CompressedOffset, the key chunk fetchers index chunks by, even when
// several chunks restart at the same context: rafs/zran.Attach assigns
// them. A chunk that must start after InOffset gets the bytes between from
// its context's Head.
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
	// InLen and OutLen are the extent of the stream the context serves:
	// inflating InLen bytes from InOffset yields at least OutLen bytes,
	// which cover every chunk of the context (nydusd inflates them whole).
	InLen, OutLen uint32
	// CtxBits (0..7) high bits of CtxByte, the byte before InOffset, are
	// the first bits of the stream after the checkpoint (zlib's
	// inflatePrime), for checkpoints that are not on a byte.
	CtxByte, CtxBits uint8
	// Dict is the output before the checkpoint (at most 32 KiB).
	Dict []byte
	// Head holds the stream bytes from InOffset on, as far as the
	// CompressedOffset of the context's last chunk starting after InOffset
	// (usually none).
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

// blobFeatureZran is nydus's BlobFeatures::ZRAN bit.
const blobFeatureZran = 0x8

// IsZran reports whether b is a gzip layer read through zran contexts
// (nydus's ZRAN feature bit or a loaded Zran).
func (b *Blob) IsZran() bool { return b.Zran != nil || b.Features&blobFeatureZran != 0 }

// decodeZran inflates chunk c of zran blob b from its stored extent raw.
func decodeZran(b *Blob, c *Chunk, raw []byte) ([]byte, error) {
	z := b.Zran
	if z == nil {
		return nil, fmt.Errorf("chunk %d of blob %s: zran contexts not loaded (the blob meta %x was not read): %w", c.Index, b.ID, b.Meta.Digest, ErrInvalid)
	}
	if int64(c.Index) >= int64(len(z.Chunks)) {
		return nil, fmt.Errorf("chunk %d of blob %s: no zran record (%d): %w", c.Index, b.ID, len(z.Chunks), ErrInvalid)
	}
	zc := z.Chunks[c.Index]
	if int64(zc.Context) >= int64(len(z.Contexts)) {
		return nil, fmt.Errorf("chunk %d of blob %s: zran context %d of %d: %w", c.Index, b.ID, zc.Context, len(z.Contexts), ErrInvalid)
	}
	ctx := &z.Contexts[zc.Context]
	if ctx.CtxBits > 7 || len(ctx.Dict) > MaxZranDict {
		return nil, fmt.Errorf("chunk %d of blob %s: zran context %d (%d bits, %d-byte dictionary): %w", c.Index, b.ID, zc.Context, ctx.CtxBits, len(ctx.Dict), ErrInvalid)
	}
	var in []byte
	switch {
	case c.CompressedOffset <= ctx.InOffset && ctx.InOffset-c.CompressedOffset <= uint64(len(raw)):
		in = raw[ctx.InOffset-c.CompressedOffset:]
	case c.CompressedOffset > ctx.InOffset && c.CompressedOffset-ctx.InOffset <= uint64(len(ctx.Head)):
		head := ctx.Head[:c.CompressedOffset-ctx.InOffset]
		in = make([]byte, 0, len(head)+len(raw))
		in = append(append(in, head...), raw...)
	default:
		return nil, fmt.Errorf("chunk %d of blob %s: extent [%d,+%d) does not reach zran context %d at %d (%d head bytes): %w",
			c.Index, b.ID, c.CompressedOffset, len(raw), zc.Context, ctx.InOffset, len(ctx.Head), ErrInvalid)
	}
	data := make([]byte, c.UncompressedSize)
	if err := deflate.Inflate(in, ctx.CtxBits, ctx.CtxByte, ctx.Dict, int64(zc.Offset), data); err != nil {
		return nil, fmt.Errorf("chunk %d of blob %s: inflate from checkpoint %d: %w: %v", c.Index, b.ID, zc.Context, ErrInvalid, err)
	}
	return data, nil
}

package rafs

import (
	"fmt"

	"github.com/rafsd/rafsd/rafs/blobmeta"
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

// IsZran reports whether b is a gzip layer read through zran contexts
// (nydus's ZRAN feature bit or a loaded Zran).
func (b *Blob) IsZran() bool { return b.Zran != nil || b.Features&blobmeta.FeatureZran != 0 }

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
	data := make([]byte, c.UncompressedSize)
	if err := z.Inflate(zc.Context, raw, c.CompressedOffset, int64(zc.Offset), data); err != nil {
		return nil, fmt.Errorf("chunk %d of blob %s: %w", c.Index, b.ID, err)
	}
	return data, nil
}

// Inflate inflates output [skip, skip+len(out)) of context ci (offsets in
// the context's output, as ZranChunk.Offset) from raw, the layer's bytes
// from offset lo on. raw starts at or before the context's InOffset, or
// after it within the context's Head. A chunk read inflates one chunk
// (DecodeChunkBytes); a fetcher may inflate a context once for all of its
// chunks it fetched together (rafs/zran.InflateContext).
func (z *Zran) Inflate(ci uint32, raw []byte, lo uint64, skip int64, out []byte) error {
	if int64(ci) >= int64(len(z.Contexts)) {
		return fmt.Errorf("%w: zran context %d of %d", ErrInvalid, ci, len(z.Contexts))
	}
	ctx := &z.Contexts[ci]
	if ctx.CtxBits > 7 || len(ctx.Dict) > MaxZranDict || skip < 0 {
		return fmt.Errorf("%w: zran context %d (%d bits, %d-byte dictionary, skip %d)", ErrInvalid, ci, ctx.CtxBits, len(ctx.Dict), skip)
	}
	var in []byte
	switch {
	case lo <= ctx.InOffset && ctx.InOffset-lo <= uint64(len(raw)):
		in = raw[ctx.InOffset-lo:]
	case lo > ctx.InOffset && lo-ctx.InOffset <= uint64(len(ctx.Head)):
		head := ctx.Head[:lo-ctx.InOffset]
		in = make([]byte, 0, len(head)+len(raw))
		in = append(append(in, head...), raw...)
	default:
		return fmt.Errorf("%w: bytes [%d,+%d) do not reach zran context %d at %d (%d head bytes)", ErrInvalid, lo, len(raw), ci, ctx.InOffset, len(ctx.Head))
	}
	if err := deflate.Inflate(in, ctx.CtxBits, ctx.CtxByte, ctx.Dict, skip, out); err != nil {
		return fmt.Errorf("inflate from zran context %d: %w: %v", ci, ErrInvalid, err)
	}
	return nil
}

// Package zran indexes gzip streams for random access (nydus "zran",
// after zlib's examples/zran.c): it inflates a stream once, noting where
// each deflate block starts (to the bit) and keeping the 32 KiB window at
// checkpoints, so that any range of the uncompressed data can later be
// inflated from the checkpoint before it. The builder uses it to make RAFS
// chunks that are ranges of an original OCI gzip layer (rafs.Zran); the
// read side is rafs.DecodeChunkBytes, with compress/flate.
//
// compress/flate does not report block boundaries, so Scan inflates with
// rafs/zran/deflate; it checks the gzip trailer's CRC-32 and size, so a boundary it
// reports is one of the real stream.
package zran

import (
	"errors"
	"fmt"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/zran/deflate"
)

// ErrFormat is wrapped by every error about the stream's contents.
var ErrFormat = errors.New("zran: bad gzip stream")

func formatErr(f string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(f, a...))
}

// InflateContext inflates output [skip, skip+len(out)) of context ci of z
// (offsets in the context's output, as ZranChunk.Offset) from raw, the
// layer's bytes from offset lo on. It is how a fetcher inflates a context
// once for all of its chunks it fetched together, as nydus's ZranDecoder
// does, instead of once per chunk; the caller still checks each chunk's
// digest. raw starts at or before the context's InOffset, or after it
// within the context's Head.
func InflateContext(z *rafs.Zran, ci uint32, raw []byte, lo uint64, skip int64, out []byte) error {
	if int64(ci) >= int64(len(z.Contexts)) {
		return fmt.Errorf("%w: zran context %d of %d", rafs.ErrInvalid, ci, len(z.Contexts))
	}
	ctx := &z.Contexts[ci]
	if ctx.CtxBits > 7 || len(ctx.Dict) > rafs.MaxZranDict || skip < 0 {
		return fmt.Errorf("%w: zran context %d (%d bits, %d-byte dictionary, skip %d)", rafs.ErrInvalid, ci, ctx.CtxBits, len(ctx.Dict), skip)
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
		return fmt.Errorf("%w: bytes [%d,+%d) do not reach zran context %d at %d (%d head bytes)", rafs.ErrInvalid, lo, len(raw), ci, ctx.InOffset, len(ctx.Head))
	}
	if err := deflate.Inflate(in, ctx.CtxBits, ctx.CtxByte, ctx.Dict, skip, out); err != nil {
		return fmt.Errorf("inflate from zran context %d: %w: %v", ci, rafs.ErrInvalid, err)
	}
	return nil
}

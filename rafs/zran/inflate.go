// Package zran indexes gzip streams for random access (nydus "zran",
// after zlib's examples/zran.c): it inflates a stream once, noting where
// each deflate block starts (to the bit) and keeping the 32 KiB window at
// checkpoints, so that any range of the uncompressed data can later be
// inflated from the checkpoint before it. The builder uses it to make RAFS
// chunks that are ranges of an original OCI gzip layer (rafs.Zran); the
// read side is rafs.DecodeChunkBytes, through rafs.Zran.Inflate.
//
// compress/flate does not report block boundaries, so Scan inflates with
// rafs/zran/deflate; it checks the gzip trailer's CRC-32 and size, so a boundary it
// reports is one of the real stream.
package zran

import (
	"errors"
	"fmt"

	"github.com/rafsd/rafsd/rafs"
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
// digest. It is rafs.Zran.Inflate, which DecodeChunkBytes uses too.
func InflateContext(z *rafs.Zran, ci uint32, raw []byte, lo uint64, skip int64, out []byte) error {
	return z.Inflate(ci, raw, lo, skip, out)
}

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
)

// ErrFormat is wrapped by every error about the stream's contents.
var ErrFormat = errors.New("zran: bad gzip stream")

func formatErr(f string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(f, a...))
}

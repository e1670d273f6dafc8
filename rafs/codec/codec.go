// Package codec compresses, decompresses and digests RAFS chunks with the
// algorithms nydus uses, under the names and numbers nydus gives them.
//
// Decompression always writes into a buffer of the expected uncompressed
// size and fails if the input would produce more or fewer bytes, so a
// hostile blob cannot make a chunk expand beyond what the bootstrap declares
// (no decompression bombs).
package codec

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/zeebo/blake3"
)

// Compressor is a chunk compression algorithm. The values are nydus's
// (utils/src/compress: None=0, Lz4Block=1, GZip=2, Zstd=3).
type Compressor uint32

// Compression algorithms.
const (
	None     Compressor = 0
	LZ4Block Compressor = 1
	Gzip     Compressor = 2
	Zstd     Compressor = 3
)

var compressorNames = map[Compressor]string{None: "none", LZ4Block: "lz4_block", Gzip: "gzip", Zstd: "zstd"}

func (c Compressor) String() string {
	if n, ok := compressorNames[c]; ok {
		return n
	}
	return fmt.Sprintf("compressor(%d)", uint32(c))
}

// Valid reports whether c is a known algorithm.
func (c Compressor) Valid() bool { _, ok := compressorNames[c]; return ok }

// ParseCompressor parses a nydus compressor name ("none", "lz4_block",
// "gzip", "zstd").
func ParseCompressor(s string) (Compressor, error) {
	for c, n := range compressorNames {
		if n == s {
			return c, nil
		}
	}
	return 0, fmt.Errorf("unknown compressor %q (want none, lz4_block, gzip or zstd)", s)
}

// Digester is a chunk digest algorithm. The values are nydus's
// (utils/src/digest: Blake3=0, Sha256=1).
type Digester uint32

// Digest algorithms.
const (
	Blake3 Digester = 0
	SHA256 Digester = 1
)

func (d Digester) String() string {
	switch d {
	case Blake3:
		return "blake3"
	case SHA256:
		return "sha256"
	}
	return fmt.Sprintf("digester(%d)", uint32(d))
}

// Valid reports whether d is a known algorithm.
func (d Digester) Valid() bool { return d == Blake3 || d == SHA256 }

// ParseDigester parses "blake3" or "sha256".
func ParseDigester(s string) (Digester, error) {
	switch s {
	case "blake3":
		return Blake3, nil
	case "sha256":
		return SHA256, nil
	}
	return 0, fmt.Errorf("unknown digester %q (want blake3 or sha256)", s)
}

// Digest is a 32-byte chunk digest (blake3-256 or sha256).
type Digest [32]byte

func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// Sum digests data with algorithm d.
func (d Digester) Sum(data []byte) Digest {
	if d == SHA256 {
		return sha256.Sum256(data)
	}
	var out Digest
	h := blake3.New()
	_, _ = h.Write(data)
	h.Sum(out[:0])
	return out
}

// ErrDigestMismatch is wrapped by Verify's errors.
var ErrDigestMismatch = errors.New("digest mismatch")

// Verify checks that data digests to want, and names both digests if not.
func (d Digester) Verify(data []byte, want Digest) error {
	if got := d.Sum(data); got != want {
		return fmt.Errorf("%w: %s want %s got %s", ErrDigestMismatch, d, want, got)
	}
	return nil
}

// ErrCorrupt is wrapped by Decompress errors for input that does not
// decompress to exactly the expected size.
var ErrCorrupt = errors.New("corrupt compressed chunk")

var (
	zstdEncOnce sync.Once
	zstdEnc     *zstd.Encoder
	zstdDecOnce sync.Once
	zstdDec     *zstd.Decoder
)

func encoder() *zstd.Encoder {
	zstdEncOnce.Do(func() {
		// EncodeAll is serialised on this many encoders: one per CPU lets
		// callers (the builder) compress chunks in parallel.
		zstdEnc, _ = zstd.NewWriter(nil, zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)))
	})
	return zstdEnc
}

func decoder() *zstd.Decoder {
	zstdDecOnce.Do(func() {
		// Memory is bounded per call by the destination capacity below; the
		// window limit stops a frame header from asking for more.
		zstdDec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxWindow(64<<20), zstd.WithDecoderMaxMemory(64<<20))
	})
	return zstdDec
}

// Compress compresses src with c and appends the result to dst. Like
// nydus, it reports compressed=false and returns src unchanged when the
// algorithm is None, src is empty, or compression does not make it smaller;
// such chunks are stored raw and flagged as uncompressed.
func Compress(c Compressor, dst, src []byte) (out []byte, compressed bool, err error) {
	if c == None || len(src) == 0 {
		return src, false, nil
	}
	start := len(dst)
	switch c {
	case Zstd:
		dst = encoder().EncodeAll(src, dst)
	case LZ4Block:
		bound := lz4.CompressBlockBound(len(src))
		dst = grow(dst, bound)
		var cmp lz4.Compressor
		n, err := cmp.CompressBlock(src, dst[start:start+bound])
		if err != nil {
			return nil, false, fmt.Errorf("lz4 compress: %w", err)
		}
		dst = dst[:start+n]
		if n == 0 { // incompressible: lz4 reports 0
			return src, false, nil
		}
	case Gzip:
		var buf bytes.Buffer
		w := kgzip.NewWriter(&buf)
		if _, err := w.Write(src); err != nil {
			return nil, false, fmt.Errorf("gzip compress: %w", err)
		}
		if err := w.Close(); err != nil {
			return nil, false, fmt.Errorf("gzip compress: %w", err)
		}
		dst = append(dst, buf.Bytes()...)
	default:
		return nil, false, fmt.Errorf("compress: unknown %s", c)
	}
	if len(dst)-start >= len(src) {
		return src, false, nil
	}
	return dst[start:], true, nil
}

func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b[:len(b)+n]
	}
	nb := make([]byte, len(b)+n)
	copy(nb, b)
	return nb
}

// Decompress decompresses src with c into dst, which must have exactly the
// chunk's uncompressed size. It fails, wrapping ErrCorrupt, if src does not
// produce exactly len(dst) bytes.
func Decompress(c Compressor, dst, src []byte) error {
	switch c {
	case None:
		if len(src) != len(dst) {
			return fmt.Errorf("%w: raw chunk has %d bytes, want %d", ErrCorrupt, len(src), len(dst))
		}
		copy(dst, src)
		return nil
	case Zstd:
		out, err := decoder().DecodeAll(src, dst[:0:len(dst)])
		if err != nil {
			return fmt.Errorf("%w: zstd: %v", ErrCorrupt, err)
		}
		if len(out) != len(dst) || (len(out) > 0 && &out[0] != &dst[0]) {
			return fmt.Errorf("%w: zstd produced %d bytes, want %d", ErrCorrupt, len(out), len(dst))
		}
		return nil
	case LZ4Block:
		n, err := lz4.UncompressBlock(src, dst)
		if err != nil {
			return fmt.Errorf("%w: lz4: %v", ErrCorrupt, err)
		}
		if n != len(dst) {
			return fmt.Errorf("%w: lz4 produced %d bytes, want %d", ErrCorrupt, n, len(dst))
		}
		return nil
	case Gzip:
		r, err := kgzip.NewReader(bytes.NewReader(src))
		if err != nil {
			return fmt.Errorf("%w: gzip: %v", ErrCorrupt, err)
		}
		if _, err := io.ReadFull(r, dst); err != nil {
			return fmt.Errorf("%w: gzip: %v", ErrCorrupt, err)
		}
		// One more byte means the stream is longer than declared.
		var one [1]byte
		if n, _ := r.Read(one[:]); n != 0 {
			return fmt.Errorf("%w: gzip produced more than %d bytes", ErrCorrupt, len(dst))
		}
		return nil
	}
	return fmt.Errorf("decompress: unknown %s", c)
}

package builder

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/codec"
)

const blockSize = 4096

// blobWriter streams one data blob: chunks are compressed and written as
// they come, so a build never holds more than one chunk of data.
type blobWriter struct {
	w    io.Writer
	sum  hash.Hash
	comp codec.Compressor
	dig  codec.Digester
	// off is the compressed (file) cursor, uoff the uncompressed one,
	// always 4 KiB aligned as nydus's v6 layout (and EROFS) require.
	off, uoff uint64
	infos     []blobmeta.ChunkInfo
	buf       []byte
	pad       []byte
}

func newBlobWriter(w io.Writer, c codec.Compressor, d codec.Digester) *blobWriter {
	return &blobWriter{w: w, sum: sha256.New(), comp: c, dig: d, pad: make([]byte, blockSize)}
}

func (bw *blobWriter) write(p []byte) error {
	if _, err := bw.w.Write(p); err != nil {
		return fmt.Errorf("write blob: %w", err)
	}
	bw.sum.Write(p)
	bw.off += uint64(len(p))
	return nil
}

// add stores one chunk (already digested as dg) and returns its record;
// BlobIndex is left for the caller.
func (bw *blobWriter) add(data []byte, dg codec.Digest) (*rafs.Chunk, error) {
	if len(bw.infos) >= blobmeta.MaxChunks {
		return nil, fmt.Errorf("blob has more than %d chunks: use a larger chunk size", blobmeta.MaxChunks)
	}
	stored, compressed, err := codec.Compress(bw.comp, bw.buf[:0], data)
	if err != nil {
		return nil, err
	}
	if compressed {
		bw.buf = stored[:0]
	}
	if bw.comp == codec.None {
		// Pad so that file offset == uncompressed offset: an uncompressed
		// blob is then directly usable as an EROFS extra device.
		for bw.off < bw.uoff {
			n := min(uint64(len(bw.pad)), bw.uoff-bw.off)
			if err := bw.write(bw.pad[:n]); err != nil {
				return nil, err
			}
		}
	}
	c := &rafs.Chunk{
		Digest:             dg,
		Index:              uint32(len(bw.infos)),
		CompressedOffset:   bw.off,
		CompressedSize:     uint32(len(stored)),
		UncompressedOffset: bw.uoff,
		UncompressedSize:   uint32(len(data)),
		Compressed:         compressed,
	}
	if err := bw.write(stored); err != nil {
		return nil, err
	}
	bw.uoff += (uint64(len(data)) + blockSize - 1) &^ (blockSize - 1)
	bw.infos = append(bw.infos, blobmeta.ChunkInfo{
		CompressedOffset: c.CompressedOffset, CompressedSize: c.CompressedSize,
		UncompressedOffset: c.UncompressedOffset, UncompressedSize: c.UncompressedSize,
		Compressed: compressed,
	})
	return c, nil
}

// finish appends the blob meta (v6 only, like nydus-image) and describes
// the finished blob.
func (bw *blobWriter) finish(version int, chunkSize uint32) (*rafs.Blob, error) {
	b := &rafs.Blob{
		Compressor: bw.comp,
		Digester:   bw.dig,
		ChunkSize:  chunkSize,
		ChunkCount: uint32(len(bw.infos)),
		// The uncompressed size covers the last chunk's aligned extent:
		// that is the size of the blob's cache file.
		UncompressedSize: bw.uoff,
	}
	if version == 6 && len(bw.infos) > 0 {
		dataEnd := bw.off
		h, _, err := blobmeta.Write(hashingWriter{bw}, dataEnd, bw.comp, blobmeta.FeatureCapTarTOC, bw.infos)
		if err != nil {
			return nil, err
		}
		b.Features = h.Features
		b.Meta = rafs.BlobMeta{
			Compressor:       h.CICompressor,
			Offset:           h.CIOffset,
			CompressedSize:   h.CICompressedSize,
			UncompressedSize: h.CIUncompressedSize,
		}
	}
	b.CompressedSize = bw.off
	b.ID = hex.EncodeToString(bw.sum.Sum(nil))
	return b, nil
}

// hashingWriter routes blob meta bytes through blobWriter.write so they
// count in the blob's digest and offset.
type hashingWriter struct{ bw *blobWriter }

func (h hashingWriter) Write(p []byte) (int, error) {
	if err := h.bw.write(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

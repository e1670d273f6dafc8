// Package blobmeta encodes and decodes nydus's "blob meta": the chunk
// compression-information table (ci table) and its 4 KiB header that a RAFS
// v6 data blob carries after its chunk data, so that nydusd (and rafsd) can
// map uncompressed blob ranges to compressed ones without the bootstrap.
//
// Layout written by nydus-image (storage/src/meta/mod.rs) and by this
// package, for a native data blob without TOC:
//
//	chunk data | ci table (maybe compressed) | header (4096 bytes)
//
// The header's ci_offset points at the table; the table is followed
// immediately by the header. Every integer is little-endian.
package blobmeta

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/rafsd/rafsd/rafs/codec"
)

// Magic marks both ends of the header (BLOB_CCT_MAGIC).
const Magic = 0xb10bb10b

// HeaderSize is the on-disk size of Header.
const HeaderSize = 4096

// Entry sizes of the two chunk-info formats.
const (
	EntrySizeV1 = 16
	EntrySizeV2 = 24
)

// MaxChunks bounds a blob's chunk count (nydus RAFS_MAX_CHUNKS_PER_BLOB).
const MaxChunks = 1 << 24

// MaxChunkSize is the largest chunk size the 24-bit size fields can hold.
const MaxChunkSize = 1 << 24

// MaxTableSize bounds a ci table, stored or uncompressed: nydus caps it
// at 24 times the largest chunk (BLOB_CCT_V2_MAX_SIZE).
const MaxTableSize = 24 * MaxChunkSize

// Blob feature bits (nydus BlobFeatures). Only the ones this project sets
// or must reject are named.
const (
	FeatureAligned            = 0x0000_0001
	FeatureInlinedFSMeta      = 0x0000_0002
	FeatureChunkInfoV2        = 0x0000_0004
	FeatureZran               = 0x0000_0008
	FeatureSeparate           = 0x0000_0010
	FeatureInlinedChunkDigest = 0x0000_0020
	FeatureTarfs              = 0x0000_0040
	FeatureBatch              = 0x0000_0080
	FeatureEncrypted          = 0x0000_0100
	FeatureHasTarHeader       = 0x1000_0000
	FeatureHasTOC             = 0x2000_0000
	// FeatureCapTarTOC marks blobs built by nydus-image 2.2 or newer; it is
	// set on every blob this project builds, as nydus-image does.
	FeatureCapTarTOC = 0x4000_0000
)

// ErrFormat is wrapped by every decoding error.
var ErrFormat = errors.New("invalid blob meta")

// Header is BlobCompressionContextHeader.
type Header struct {
	Features         uint32
	CICompressor     codec.Compressor
	CIEntries        uint32
	CIOffset         uint64
	CICompressedSize uint64
	// CIUncompressedSize is the size of the decoded table, including any
	// ZRan/batch context appended to it.
	CIUncompressedSize uint64
	CIZranOffset       uint64
	CIZranSize         uint64
	CIZranCount        uint32
}

// V2 reports whether the table uses the 24-byte chunk-info format.
func (h *Header) V2() bool { return h.Features&FeatureChunkInfoV2 != 0 }

// EntrySize is the size of one table entry.
func (h *Header) EntrySize() int {
	if h.V2() {
		return EntrySizeV2
	}
	return EntrySizeV1
}

// MarshalBinary encodes h into its 4096-byte on-disk form.
func (h *Header) MarshalBinary() ([]byte, error) {
	b := make([]byte, HeaderSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], Magic)
	le.PutUint32(b[4:], h.Features)
	le.PutUint32(b[8:], uint32(h.CICompressor))
	le.PutUint32(b[12:], h.CIEntries)
	le.PutUint64(b[16:], h.CIOffset)
	le.PutUint64(b[24:], h.CICompressedSize)
	le.PutUint64(b[32:], h.CIUncompressedSize)
	le.PutUint64(b[40:], h.CIZranOffset)
	le.PutUint64(b[48:], h.CIZranSize)
	le.PutUint32(b[56:], h.CIZranCount)
	le.PutUint32(b[HeaderSize-4:], Magic)
	return b, nil
}

// UnmarshalBinary decodes a 4096-byte header and checks both magics.
func (h *Header) UnmarshalBinary(b []byte) error {
	if len(b) != HeaderSize {
		return fmt.Errorf("%w: header is %d bytes, want %d", ErrFormat, len(b), HeaderSize)
	}
	le := binary.LittleEndian
	if m1, m2 := le.Uint32(b[0:]), le.Uint32(b[HeaderSize-4:]); m1 != Magic || m2 != Magic {
		return fmt.Errorf("%w: bad magic %#x/%#x", ErrFormat, m1, m2)
	}
	*h = Header{
		Features:           le.Uint32(b[4:]),
		CIEntries:          le.Uint32(b[12:]),
		CIOffset:           le.Uint64(b[16:]),
		CICompressedSize:   le.Uint64(b[24:]),
		CIUncompressedSize: le.Uint64(b[32:]),
		CIZranOffset:       le.Uint64(b[40:]),
		CIZranSize:         le.Uint64(b[48:]),
		CIZranCount:        le.Uint32(b[56:]),
	}
	// nydus treats any unknown ci compressor value as None; we refuse it
	// instead, since it can only come from a corrupt header.
	h.CICompressor = codec.Compressor(le.Uint32(b[8:]))
	if !h.CICompressor.Valid() {
		return fmt.Errorf("%w: ci compressor %d", ErrFormat, uint32(h.CICompressor))
	}
	return h.check()
}

func (h *Header) check() error {
	if h.CIEntries == 0 || h.CIEntries > MaxChunks {
		return fmt.Errorf("%w: %d entries", ErrFormat, h.CIEntries)
	}
	if h.Features&FeatureEncrypted != 0 {
		return fmt.Errorf("%w: encrypted blobs are not supported", ErrFormat)
	}
	need := uint64(h.CIEntries) * uint64(h.EntrySize())
	if h.Features&(FeatureZran|FeatureBatch) != 0 {
		if !h.V2() {
			return fmt.Errorf("%w: zran/batch context without chunk info v2", ErrFormat)
		}
		if h.CIUncompressedSize < need {
			return fmt.Errorf("%w: table of %d bytes for %d entries", ErrFormat, h.CIUncompressedSize, h.CIEntries)
		}
	} else if h.CIUncompressedSize != need {
		return fmt.Errorf("%w: table of %d bytes for %d entries of %d bytes", ErrFormat, h.CIUncompressedSize, h.CIEntries, h.EntrySize())
	}
	if h.CIUncompressedSize > MaxTableSize || h.CICompressedSize > MaxTableSize {
		return fmt.Errorf("%w: table of %d/%d bytes is too large", ErrFormat, h.CICompressedSize, h.CIUncompressedSize)
	}
	// A table of distinct, increasing offsets never compresses 256:1; a
	// header claiming so would only make us allocate for a bomb.
	if h.CIUncompressedSize > 256*h.CICompressedSize+1<<20 {
		return fmt.Errorf("%w: table of %d bytes claims to expand to %d", ErrFormat, h.CICompressedSize, h.CIUncompressedSize)
	}
	if h.CICompressor == codec.None && h.CICompressedSize != h.CIUncompressedSize {
		return fmt.Errorf("%w: uncompressed table stored in %d bytes for %d", ErrFormat, h.CICompressedSize, h.CIUncompressedSize)
	}
	if h.Features&FeatureZran != 0 {
		// nydus's validate_header: the zran region follows the entries,
		// lies inside the table and holds its 40-byte contexts.
		if h.CIZranOffset != need || h.CIZranSize > h.CIUncompressedSize-need ||
			h.CIZranCount > h.CIEntries || uint64(h.CIZranCount)*ZranContextSize > h.CIZranSize {
			return fmt.Errorf("%w: zran region at %d size %d with %d contexts, table of %d bytes for %d entries",
				ErrFormat, h.CIZranOffset, h.CIZranSize, h.CIZranCount, h.CIUncompressedSize, h.CIEntries)
		}
	}
	return nil
}

// ZranContextSize is the on-disk size of nydus's ZranInflateContext.
const ZranContextSize = 40

// ChunkInfo is one entry of the ci table: where a chunk's stored bytes
// are in the blob and where its uncompressed bytes go in the blob's cache.
type ChunkInfo struct {
	CompressedOffset   uint64
	CompressedSize     uint32
	UncompressedOffset uint64
	UncompressedSize   uint32
	// Compressed is explicit in v2; in v1 it is derived from the sizes.
	Compressed bool
	// Flags are the other v2 flag bits (zran, batch, crc32...); Data the
	// v2 misc word. Both are zero for v1.
	Flags uint8
	Data  uint64
}

// v2 flag bits (top byte of uncomp_info).
const (
	flagCompressed = 0x01
	flagZran       = 0x02
	flagBatch      = 0x04
	flagEncrypted  = 0x08
	flagCRC32      = 0x10
)

const (
	offsetMask40 = 1<<40 - 1
	sizeMask24   = 1<<24 - 1
)

// EncodeTable encodes infos in the v1 or v2 format. It fails on values
// the format cannot hold (unaligned uncompressed offsets, sizes of 0 or
// above 16 MiB, offsets past 2^40) instead of truncating them.
func EncodeTable(infos []ChunkInfo, v2 bool) ([]byte, error) {
	size := EntrySizeV1
	if v2 {
		size = EntrySizeV2
	}
	out := make([]byte, len(infos)*size)
	le := binary.LittleEndian
	for k, c := range infos {
		if c.UncompressedSize == 0 || c.UncompressedSize > MaxChunkSize || c.CompressedSize > MaxChunkSize {
			return nil, fmt.Errorf("chunk %d: sizes %d/%d out of range", k, c.CompressedSize, c.UncompressedSize)
		}
		if c.UncompressedOffset&0xfff != 0 || c.UncompressedOffset >= 1<<44 || c.CompressedOffset > offsetMask40 {
			return nil, fmt.Errorf("chunk %d: offsets %#x/%#x not encodable", k, c.CompressedOffset, c.UncompressedOffset)
		}
		e := out[k*size:]
		if !v2 {
			if c.CompressedSize == 0 {
				return nil, fmt.Errorf("chunk %d: zero compressed size", k)
			}
			if c.Compressed == (c.CompressedSize == c.UncompressedSize) {
				// v1 has no flag: a chunk is compressed iff its sizes differ.
				return nil, fmt.Errorf("chunk %d: v1 cannot express compressed=%v with sizes %d/%d", k, c.Compressed, c.CompressedSize, c.UncompressedSize)
			}
			us, cs := uint64(c.UncompressedSize-1), uint64(c.CompressedSize-1)
			uncomp := (us&0xfffff)<<44 | c.UncompressedOffset | (us&0xf00000)>>12
			comp := (cs&0xfffff)<<44 | (cs&0xf00000)<<20 | c.CompressedOffset
			le.PutUint64(e[0:], uncomp)
			le.PutUint64(e[8:], comp)
			continue
		}
		if c.CompressedSize > sizeMask24 || c.UncompressedOffset>>12 > 0xffffffff {
			return nil, fmt.Errorf("chunk %d: not encodable in chunk info v2", k)
		}
		flags := uint64(c.Flags) &^ flagCompressed
		if c.Compressed {
			flags |= flagCompressed
		}
		uncomp := flags<<56 | uint64(c.UncompressedSize-1)<<32 | c.UncompressedOffset>>12
		comp := uint64(c.CompressedSize)<<40 | c.CompressedOffset
		le.PutUint64(e[0:], uncomp)
		le.PutUint64(e[8:], comp)
		le.PutUint64(e[16:], c.Data)
	}
	return out, nil
}

// DecodeTable decodes n entries from an uncompressed table. Extra bytes
// after the entries (ZRan or batch context) are ignored.
func DecodeTable(b []byte, n uint32, v2 bool) ([]ChunkInfo, error) {
	size := EntrySizeV1
	if v2 {
		size = EntrySizeV2
	}
	if n > MaxChunks || uint64(len(b)) < uint64(n)*uint64(size) {
		return nil, fmt.Errorf("%w: %d bytes for %d entries", ErrFormat, len(b), n)
	}
	out := make([]ChunkInfo, n)
	le := binary.LittleEndian
	for k := range out {
		e := b[k*size:]
		uncomp, comp := le.Uint64(e[0:]), le.Uint64(e[8:])
		c := &out[k]
		if !v2 {
			c.UncompressedOffset = uncomp & 0xfff_ffff_f000
			c.UncompressedSize = uint32(uncomp>>44|(uncomp&0xf00)<<12) + 1
			c.CompressedOffset = comp & offsetMask40
			c.CompressedSize = uint32(comp>>44|(comp&0xf0000000000)>>20) + 1
			c.Compressed = c.CompressedSize != c.UncompressedSize
			continue
		}
		flags := uint8(uncomp >> 56)
		if flags&^(flagCompressed|flagZran|flagBatch|flagEncrypted|flagCRC32) != 0 {
			return nil, fmt.Errorf("%w: entry %d: unknown flags %#x", ErrFormat, k, flags)
		}
		c.Compressed = flags&flagCompressed != 0
		c.Flags = flags &^ flagCompressed
		c.UncompressedOffset = (uncomp & 0xffffffff) << 12
		c.UncompressedSize = uint32((uncomp>>32)&sizeMask24) + 1
		c.CompressedOffset = comp & offsetMask40
		c.CompressedSize = uint32(comp >> 40 & sizeMask24)
		c.Data = le.Uint64(e[16:])
	}
	return out, nil
}

// Meta is a decoded blob meta: header and chunk table.
type Meta struct {
	Header Header
	Chunks []ChunkInfo
	// Table is the whole uncompressed ci table: the chunk entries and,
	// for zran blobs, the context and dictionary tables after them
	// (CIZranOffset/CIZranSize; see rafs/zran.DecodeContexts).
	Table []byte
}

// ZranChunk reports whether a v2 entry is a zran chunk, and its zran
// context index and its offset in that context's output (the v2 misc
// word, chunk_info_v2.rs set_zran_index/set_zran_offset).
func (c *ChunkInfo) ZranChunk() (zran bool, index, offset uint32) {
	return c.Flags&flagZran != 0, uint32(c.Data >> 32), uint32(c.Data)
}

// ZranFlag is the v2 flag bit of a zran chunk, for ChunkInfo.Flags.
const ZranFlag = flagZran

// Write appends the ci table for infos (compressed with c when that makes
// it smaller, as nydus-image does) and the header to w, which is at blob
// offset off. It returns the header written; its CIOffset is off.
func Write(w io.Writer, off uint64, c codec.Compressor, features uint32, infos []ChunkInfo) (Header, int64, error) {
	v2 := features&FeatureChunkInfoV2 != 0
	table, err := EncodeTable(infos, v2)
	if err != nil {
		return Header{}, 0, fmt.Errorf("encode blob meta: %w", err)
	}
	stored, compressed, err := codec.Compress(c, nil, table)
	if err != nil {
		return Header{}, 0, fmt.Errorf("compress blob meta: %w", err)
	}
	if !compressed {
		c = codec.None
	}
	h := Header{
		Features:           features | FeatureAligned,
		CICompressor:       c,
		CIEntries:          uint32(len(infos)),
		CIOffset:           off,
		CICompressedSize:   uint64(len(stored)),
		CIUncompressedSize: uint64(len(table)),
	}
	hb, _ := h.MarshalBinary()
	if _, err := w.Write(stored); err != nil {
		return Header{}, 0, fmt.Errorf("write blob meta: %w", err)
	}
	if _, err := w.Write(hb); err != nil {
		return Header{}, 0, fmt.Errorf("write blob meta header: %w", err)
	}
	return h, int64(len(stored) + len(hb)), nil
}

// Read reads and decodes the blob meta whose table starts at ciOffset
// and is compressedSize bytes long (both from the bootstrap's blob table);
// the header follows the table.
func Read(r io.ReaderAt, ciOffset, compressedSize uint64) (*Meta, error) {
	if compressedSize > MaxTableSize {
		return nil, fmt.Errorf("%w: table of %d bytes is too large", ErrFormat, compressedSize)
	}
	hb := make([]byte, HeaderSize)
	if _, err := r.ReadAt(hb, int64(ciOffset+compressedSize)); err != nil {
		return nil, fmt.Errorf("read blob meta header at %d: %w", ciOffset+compressedSize, err)
	}
	var h Header
	if err := h.UnmarshalBinary(hb); err != nil {
		return nil, err
	}
	if h.CIOffset != ciOffset || h.CICompressedSize != compressedSize {
		return nil, fmt.Errorf("%w: header says table at %d+%d, expected %d+%d", ErrFormat, h.CIOffset, h.CICompressedSize, ciOffset, compressedSize)
	}
	return readTable(r, h)
}

// ReadTail decodes the blob meta of a blob whose last HeaderSize bytes are
// the header (nydus-image's default layout, without a TOC).
func ReadTail(r io.ReaderAt, size int64) (*Meta, error) {
	if size < HeaderSize {
		return nil, fmt.Errorf("%w: blob of %d bytes has no room for a header", ErrFormat, size)
	}
	hb := make([]byte, HeaderSize)
	if _, err := r.ReadAt(hb, size-HeaderSize); err != nil {
		return nil, fmt.Errorf("read blob meta header: %w", err)
	}
	var h Header
	if err := h.UnmarshalBinary(hb); err != nil {
		return nil, err
	}
	if h.CIOffset+h.CICompressedSize != uint64(size-HeaderSize) {
		return nil, fmt.Errorf("%w: table at %d+%d does not end at the header (%d)", ErrFormat, h.CIOffset, h.CICompressedSize, size-HeaderSize)
	}
	return readTable(r, h)
}

func readTable(r io.ReaderAt, h Header) (*Meta, error) {
	raw := make([]byte, h.CICompressedSize)
	if _, err := r.ReadAt(raw, int64(h.CIOffset)); err != nil {
		return nil, fmt.Errorf("read blob meta table at %d: %w", h.CIOffset, err)
	}
	return Decode(h, raw)
}

// Decode decodes the stored (maybe compressed) table raw described by h.
func Decode(h Header, raw []byte) (*Meta, error) {
	if err := h.check(); err != nil {
		return nil, err
	}
	if uint64(len(raw)) != h.CICompressedSize {
		return nil, fmt.Errorf("%w: table of %d bytes, header says %d", ErrFormat, len(raw), h.CICompressedSize)
	}
	table := raw
	if h.CICompressor != codec.None {
		table = make([]byte, h.CIUncompressedSize)
		if err := codec.Decompress(h.CICompressor, table, raw); err != nil {
			return nil, fmt.Errorf("%w: table: %v", ErrFormat, err)
		}
	}
	chunks, err := DecodeTable(table, h.CIEntries, h.V2())
	if err != nil {
		return nil, err
	}
	return &Meta{Header: h, Chunks: chunks, Table: table}, nil
}

// DecodeCacheFile decodes a blob meta in the form nydusd caches it as
// <blob id>.blob.meta (and nydus-snapshotter packs it beside image.boot):
// the uncompressed ci table, zeros up to a 4 KiB boundary, then the
// header (storage/src/meta/mod.rs, BlobCompressionContextInfo::new).
func DecodeCacheFile(b []byte) (*Meta, error) {
	if len(b) < HeaderSize {
		return nil, fmt.Errorf("%w: cache file of %d bytes", ErrFormat, len(b))
	}
	var h Header
	if err := h.UnmarshalBinary(b[len(b)-HeaderSize:]); err != nil {
		return nil, err
	}
	aligned := (h.CIUncompressedSize + 0xfff) &^ 0xfff
	if aligned+HeaderSize != uint64(len(b)) {
		return nil, fmt.Errorf("%w: cache file of %d bytes for a %d-byte table", ErrFormat, len(b), h.CIUncompressedSize)
	}
	if err := h.check(); err != nil {
		return nil, err
	}
	table := b[:h.CIUncompressedSize:h.CIUncompressedSize]
	chunks, err := DecodeTable(table, h.CIEntries, h.V2())
	if err != nil {
		return nil, err
	}
	return &Meta{Header: h, Chunks: chunks, Table: table}, nil
}

// Package v6 decodes and encodes RAFS v6 bootstraps: EROFS images (package
// erofs) with nydus's extension — the RAFS_V6 compat feature, an extended
// superblock after the EROFS one, a blob table, a device table naming the
// blobs, an optional prefetch table, and a chunk table of RafsV5ChunkInfo
// records that chunk-based inodes point into. The layout follows nydus
// rafs/src/metadata/layout/v6.rs and builder/src/core/v6.rs, so
// bootstraps written by nydus-image read here and ours read in nydusd and
// mount with the kernel's EROFS (bootstrap plus blobs as devices).
package v6

import (
	"encoding/binary"
	"fmt"

	"github.com/rafsd/rafsd/erofs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// On-disk layout constants.
const (
	// ExtSuperBlockOffset is where the RAFS extended superblock follows
	// the EROFS superblock.
	ExtSuperBlockOffset = erofs.SuperBlockOffset + erofs.SuperBlockSize
	ExtSuperBlockSize   = 256
	// DevTableOffset is where nydus puts the device table (slot 11).
	DevTableOffset = ExtSuperBlockOffset + ExtSuperBlockSize
	// BlobEntrySize is the size of a blob table entry (RafsV6Blob).
	BlobEntrySize = 256
	// ChunkInfoSize is the size of a chunk table record (RafsV5ChunkInfo).
	ChunkInfoSize = 80
	// BlobIDLen is the length of a blob id (hex sha256).
	BlobIDLen = 64
	// MaxBlobs is the most blobs a bootstrap can reference: chunk indexes
	// keep blob index + 1 in one byte.
	MaxBlobs = 254
	// mappedAlign is the alignment of a blob's mapped block address.
	mappedAlign = 0x80000
)

// Superblock flags (RafsSuperFlags).
const (
	FlagCompressNone       = 0x1
	FlagCompressLZ4        = 0x2
	FlagHashBlake3         = 0x4
	FlagHashSHA256         = 0x8
	FlagExplicitUIDGID     = 0x10
	FlagHasXattr           = 0x20
	FlagCompressGzip       = 0x40
	FlagCompressZstd       = 0x80
	FlagInlinedChunkDigest = 0x100
	FlagTarfsMode          = 0x200
	FlagEncryptionNone     = 0x0100_0000
	FlagEncryptionAES      = 0x0200_0000
)

// Blob features (BlobFeatures), kept in rafs.Blob.Features.
const (
	BlobFeatureAligned            = 0x1
	BlobFeatureInlinedFSMeta      = 0x2
	BlobFeatureChunkInfoV2        = 0x4
	BlobFeatureZran               = 0x8
	BlobFeatureSeparate           = 0x10
	BlobFeatureInlinedChunkDigest = 0x20
	BlobFeatureTarfs              = 0x40
	BlobFeatureBatch              = 0x80
	BlobFeatureEncrypted          = 0x100
	BlobFeatureHasTarHeader       = 0x1000_0000
	BlobFeatureHasTOC             = 0x2000_0000
	BlobFeatureCapTarTOC          = 0x4000_0000
)

// Chunk flags (BlobChunkFlags).
const (
	ChunkFlagCompressed = 0x1
	ChunkFlagHole       = 0x2
	ChunkFlagEncrypted  = 0x4
	ChunkFlagBatch      = 0x8
	ChunkFlagHasCRC32   = 0x10
)

var compressorFlags = map[codec.Compressor]uint64{
	codec.None: FlagCompressNone, codec.LZ4Block: FlagCompressLZ4, codec.Gzip: FlagCompressGzip, codec.Zstd: FlagCompressZstd,
}

var digesterFlags = map[codec.Digester]uint64{codec.Blake3: FlagHashBlake3, codec.SHA256: FlagHashSHA256}

// extSuperBlock is RafsV6SuperBlockExt.
type extSuperBlock struct {
	Flags               uint64
	BlobTableOffset     uint64
	BlobTableSize       uint32
	ChunkSize           uint32
	ChunkTableOffset    uint64
	ChunkTableSize      uint64
	PrefetchTableOffset uint64
	PrefetchTableSize   uint32
}

func (e *extSuperBlock) marshal() []byte {
	b := make([]byte, ExtSuperBlockSize)
	le := binary.LittleEndian
	le.PutUint64(b[0:], e.Flags)
	le.PutUint64(b[8:], e.BlobTableOffset)
	le.PutUint32(b[16:], e.BlobTableSize)
	le.PutUint32(b[20:], e.ChunkSize)
	le.PutUint64(b[24:], e.ChunkTableOffset)
	le.PutUint64(b[32:], e.ChunkTableSize)
	le.PutUint64(b[40:], e.PrefetchTableOffset)
	le.PutUint32(b[48:], e.PrefetchTableSize)
	return b
}

func (e *extSuperBlock) unmarshal(b []byte) {
	le := binary.LittleEndian
	e.Flags = le.Uint64(b[0:])
	e.BlobTableOffset = le.Uint64(b[8:])
	e.BlobTableSize = le.Uint32(b[16:])
	e.ChunkSize = le.Uint32(b[20:])
	e.ChunkTableOffset = le.Uint64(b[24:])
	e.ChunkTableSize = le.Uint64(b[32:])
	e.PrefetchTableOffset = le.Uint64(b[40:])
	e.PrefetchTableSize = le.Uint32(b[48:])
}

// blobEntry is RafsV6Blob.
type blobEntry struct {
	ID                 string
	Index              uint32
	ChunkSize          uint32
	ChunkCount         uint32
	Compressor         uint32
	Digester           uint32
	Features           uint32
	CompressedSize     uint64
	UncompressedSize   uint64
	TOCSize            uint32
	CICompressor       uint32
	CIOffset           uint64
	CICompressedSize   uint64
	CIUncompressedSize uint64
	TOCDigest          [32]byte
	MetaDigest         [32]byte
	MetaSize           uint64
	CipherIV           [8]byte
	CipherAlgo         uint32
	// 36 reserved bytes (reserved2) end the 256-byte entry.
}

func (e *blobEntry) marshal() []byte {
	b := make([]byte, BlobEntrySize)
	le := binary.LittleEndian
	copy(b[0:64], e.ID)
	le.PutUint32(b[64:], e.Index)
	le.PutUint32(b[68:], e.ChunkSize)
	le.PutUint32(b[72:], e.ChunkCount)
	le.PutUint32(b[76:], e.Compressor)
	le.PutUint32(b[80:], e.Digester)
	le.PutUint32(b[84:], e.Features)
	le.PutUint64(b[88:], e.CompressedSize)
	le.PutUint64(b[96:], e.UncompressedSize)
	le.PutUint32(b[104:], e.TOCSize)
	le.PutUint32(b[108:], e.CICompressor)
	le.PutUint64(b[112:], e.CIOffset)
	le.PutUint64(b[120:], e.CICompressedSize)
	le.PutUint64(b[128:], e.CIUncompressedSize)
	copy(b[136:168], e.TOCDigest[:])
	copy(b[168:200], e.MetaDigest[:])
	le.PutUint64(b[200:], e.MetaSize)
	copy(b[208:216], e.CipherIV[:])
	le.PutUint32(b[216:], e.CipherAlgo)
	return b
}

func (e *blobEntry) unmarshal(b []byte) {
	le := binary.LittleEndian
	id := b[0:64]
	for i, c := range id {
		if c == 0 {
			id = id[:i]
			break
		}
	}
	e.ID = string(id)
	e.Index = le.Uint32(b[64:])
	e.ChunkSize = le.Uint32(b[68:])
	e.ChunkCount = le.Uint32(b[72:])
	e.Compressor = le.Uint32(b[76:])
	e.Digester = le.Uint32(b[80:])
	e.Features = le.Uint32(b[84:])
	e.CompressedSize = le.Uint64(b[88:])
	e.UncompressedSize = le.Uint64(b[96:])
	e.TOCSize = le.Uint32(b[104:])
	e.CICompressor = le.Uint32(b[108:])
	e.CIOffset = le.Uint64(b[112:])
	e.CICompressedSize = le.Uint64(b[120:])
	e.CIUncompressedSize = le.Uint64(b[128:])
	copy(e.TOCDigest[:], b[136:168])
	copy(e.MetaDigest[:], b[168:200])
	e.MetaSize = le.Uint64(b[200:])
	copy(e.CipherIV[:], b[208:216])
	e.CipherAlgo = le.Uint32(b[216:])
}

// chunkInfo is RafsV5ChunkInfo, the chunk table record.
type chunkInfo struct {
	Digest             codec.Digest
	BlobIndex          uint32
	Flags              uint32
	CompressedSize     uint32
	UncompressedSize   uint32
	CompressedOffset   uint64
	UncompressedOffset uint64
	FileOffset         uint64
	Index              uint32
	CRC32              uint32
}

func (c *chunkInfo) put(b []byte) {
	le := binary.LittleEndian
	copy(b[0:32], c.Digest[:])
	le.PutUint32(b[32:], c.BlobIndex)
	le.PutUint32(b[36:], c.Flags)
	le.PutUint32(b[40:], c.CompressedSize)
	le.PutUint32(b[44:], c.UncompressedSize)
	le.PutUint64(b[48:], c.CompressedOffset)
	le.PutUint64(b[56:], c.UncompressedOffset)
	le.PutUint64(b[64:], c.FileOffset)
	le.PutUint32(b[72:], c.Index)
	le.PutUint32(b[76:], c.CRC32)
}

func (c *chunkInfo) get(b []byte) {
	le := binary.LittleEndian
	copy(c.Digest[:], b[0:32])
	c.BlobIndex = le.Uint32(b[32:])
	c.Flags = le.Uint32(b[36:])
	c.CompressedSize = le.Uint32(b[40:])
	c.UncompressedSize = le.Uint32(b[44:])
	c.CompressedOffset = le.Uint64(b[48:])
	c.UncompressedOffset = le.Uint64(b[56:])
	c.FileOffset = le.Uint64(b[64:])
	c.Index = le.Uint32(b[72:])
	c.CRC32 = le.Uint32(b[76:])
}

// chunkKey is what a chunk index entry identifies a chunk by, as nydusd's
// chunk map does: blob index, 24-bit chunk-info index and block address.
type chunkKey struct {
	blob    uint32
	ciIndex uint32
	blkAddr uint32
}

// chunkIndexEntry encodes a chunk's EROFS chunk index: the 16 low bits of
// the chunk-info index in Advise, blob index + 1 in the low byte of
// DeviceID and bits 16..23 of the chunk-info index in its high byte.
func chunkIndexEntry(k chunkKey) erofs.ChunkIndex {
	return erofs.ChunkIndex{
		Advise:   uint16(k.ciIndex),
		DeviceID: uint16(k.blob+1) | uint16(k.ciIndex>>16&0xff)<<8,
		BlkAddr:  k.blkAddr,
	}
}

func keyOfIndex(c erofs.ChunkIndex) (chunkKey, error) {
	dev := uint32(c.DeviceID & 0xff)
	if dev == 0 {
		return chunkKey{}, fmt.Errorf("chunk index with blob index 0")
	}
	return chunkKey{blob: dev - 1, ciIndex: uint32(c.DeviceID>>8)<<16 | uint32(c.Advise), blkAddr: c.BlkAddr}, nil
}

// Package v5 reads and writes RAFS v5 bootstraps, the metadata format of
// nydus images before v6 (nydus rafs/src/metadata/layout/v5.rs), to and
// from the rafs.Image model.
//
// A v5 bootstrap is, in this order: an 8 KiB superblock; the inode table
// (one u32 per inode-table index, the record's offset >> 3); the prefetch
// table (u32 inode numbers); the blob table (readahead offset and size, blob
// id, NUL-separated); the extended blob table (64 bytes a blob); then one
// record per table index: a 128-byte inode, its name and symlink target
// (each padded to 8 bytes), its xattrs and, for regular files, its 80-byte
// chunk infos. Every structure is little endian and 8-byte aligned.
//
// A directory's children occupy a contiguous run of table indexes
// [child_index, child_index+child_count), sorted by name. Hardlinked
// regular files have one record per name, all carrying the inode number
// (i_ino) of the first; that table index holds the canonical record.
package v5

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// On-disk constants (nydus layout/v5.rs, metadata/mod.rs).
const (
	// Magic is the superblock magic "RAFS", stored little endian at offset 0.
	Magic = 0x52414653
	// Version is s_fs_version of v5 images (v4 images carry 0x400 and are
	// not supported).
	Version = 0x500
	// SuperblockSize is the on-disk size of the superblock.
	SuperblockSize = 8192
	// MaxMetadataSize bounds a bootstrap (nydus RAFS_MAX_METADATA_SIZE).
	MaxMetadataSize = 0x8000_0000

	align           = 8
	inodeSize       = 128
	chunkInfoSize   = 80
	extBlobSize     = 64
	xattrHeaderSize = 8
	maxName         = 255
	// Offsets in the inode table are stored >> 3 and must stay below 2^29.
	maxTableOffset = 1 << 29
)

// Superblock flags (nydus RafsSuperFlags).
const (
	FlagCompressNone   = 0x1
	FlagCompressLZ4    = 0x2
	FlagHashBlake3     = 0x4
	FlagHashSHA256     = 0x8
	FlagExplicitUIDGID = 0x10
	FlagHasXattr       = 0x20
	FlagCompressGzip   = 0x40
	FlagCompressZstd   = 0x80

	flagInlinedChunkDigest = 0x100
	flagTarfsMode          = 0x200
	flagEncryptNone        = 0x0100_0000
	flagEncryptAES128XTS   = 0x0200_0000
	flagPreservedCompat    = 0xfc00_0000 // PRESERVED_COMPAT_0..5

	knownSuperFlags = 0x3ff | flagEncryptNone | flagEncryptAES128XTS | flagPreservedCompat
)

// Inode flags (nydus RafsInodeFlags).
const (
	inodeFlagSymlink  = 0x1
	inodeFlagHardlink = 0x2
	inodeFlagXattr    = 0x4
	inodeFlagHasHole  = 0x8
	knownInodeFlags   = 0xf
)

// Chunk flags (nydus BlobChunkFlags).
const (
	chunkFlagCompressed = 0x1
	chunkFlagHole       = 0x2
	chunkFlagEncrypted  = 0x4
	chunkFlagBatch      = 0x8
	chunkFlagHasCRC32   = 0x10
)

// blobFeatureNoExtTable is nydus's internal _V5_NO_EXT_BLOB_TABLE bit; it
// never belongs on disk.
const blobFeatureNoExtTable = 0x8000_0000

// ErrNotV5 is returned by Read for input that does not start with a v5
// superblock, so a caller can try another format.
var ErrNotV5 = errors.New("not a RAFS v5 bootstrap")

// IsV5 reports whether hdr (the first bytes of a bootstrap, at least 8)
// starts with a RAFS v5 superblock.
func IsV5(hdr []byte) bool {
	return len(hdr) >= 8 && le.Uint32(hdr) == Magic && le.Uint32(hdr[4:]) == Version
}

var le = binary.LittleEndian

func alignUp(n uint64) uint64 { return (n + align - 1) &^ (align - 1) }

// superblock is RafsV5SuperBlock without its reserved tail.
type superblock struct {
	magic, version, sbSize, blockSize uint32
	flags                             uint64
	inodesCount                       uint64
	inodeTableOffset                  uint64
	prefetchTableOffset               uint64
	blobTableOffset                   uint64
	inodeTableEntries                 uint32
	prefetchTableEntries              uint32
	blobTableSize                     uint32
	extBlobTableEntries               uint32
	extBlobTableOffset                uint64
}

func (s *superblock) decode(b []byte) {
	s.magic = le.Uint32(b[0:])
	s.version = le.Uint32(b[4:])
	s.sbSize = le.Uint32(b[8:])
	s.blockSize = le.Uint32(b[12:])
	s.flags = le.Uint64(b[16:])
	s.inodesCount = le.Uint64(b[24:])
	s.inodeTableOffset = le.Uint64(b[32:])
	s.prefetchTableOffset = le.Uint64(b[40:])
	s.blobTableOffset = le.Uint64(b[48:])
	s.inodeTableEntries = le.Uint32(b[56:])
	s.prefetchTableEntries = le.Uint32(b[60:])
	s.blobTableSize = le.Uint32(b[64:])
	s.extBlobTableEntries = le.Uint32(b[68:])
	s.extBlobTableOffset = le.Uint64(b[72:])
}

func (s *superblock) encode(b []byte) {
	le.PutUint32(b[0:], s.magic)
	le.PutUint32(b[4:], s.version)
	le.PutUint32(b[8:], s.sbSize)
	le.PutUint32(b[12:], s.blockSize)
	le.PutUint64(b[16:], s.flags)
	le.PutUint64(b[24:], s.inodesCount)
	le.PutUint64(b[32:], s.inodeTableOffset)
	le.PutUint64(b[40:], s.prefetchTableOffset)
	le.PutUint64(b[48:], s.blobTableOffset)
	le.PutUint32(b[56:], s.inodeTableEntries)
	le.PutUint32(b[60:], s.prefetchTableEntries)
	le.PutUint32(b[64:], s.blobTableSize)
	le.PutUint32(b[68:], s.extBlobTableEntries)
	le.PutUint64(b[72:], s.extBlobTableOffset)
}

// compressor maps superblock flags to the chunk compressor the way nydus
// does (first match wins, lz4_block when none is set).
func compressorOf(flags uint64) codec.Compressor {
	switch {
	case flags&FlagCompressNone != 0:
		return codec.None
	case flags&FlagCompressLZ4 != 0:
		return codec.LZ4Block
	case flags&FlagCompressGzip != 0:
		return codec.Gzip
	case flags&FlagCompressZstd != 0:
		return codec.Zstd
	}
	return codec.LZ4Block
}

// digesterOf maps superblock flags to the digest algorithm (blake3 unless
// only sha256 is set).
func digesterOf(flags uint64) codec.Digester {
	if flags&FlagHashBlake3 == 0 && flags&FlagHashSHA256 != 0 {
		return codec.SHA256
	}
	return codec.Blake3
}

func compressorFlag(c codec.Compressor) (uint64, error) {
	switch c {
	case codec.None:
		return FlagCompressNone, nil
	case codec.LZ4Block:
		return FlagCompressLZ4, nil
	case codec.Gzip:
		return FlagCompressGzip, nil
	case codec.Zstd:
		return FlagCompressZstd, nil
	}
	return 0, fmt.Errorf("rafs v5: unsupported compressor %s", c)
}

func digesterFlag(d codec.Digester) (uint64, error) {
	switch d {
	case codec.Blake3:
		return FlagHashBlake3, nil
	case codec.SHA256:
		return FlagHashSHA256, nil
	}
	return 0, fmt.Errorf("rafs v5: unsupported digester %s", d)
}

// inode is RafsV5Inode.
type inode struct {
	digest      codec.Digest
	parent      uint64
	ino         uint64
	uid, gid    uint32
	projid      uint32
	mode        uint32
	size        uint64
	blocks      uint64
	flags       uint64
	nlink       uint32
	childIndex  uint32
	childCount  uint32
	nameSize    uint16
	symlinkSize uint16
	rdev        uint32
	mtimeNsec   uint32
	mtime       uint64
}

func (i *inode) decode(b []byte) {
	copy(i.digest[:], b[0:32])
	i.parent = le.Uint64(b[32:])
	i.ino = le.Uint64(b[40:])
	i.uid = le.Uint32(b[48:])
	i.gid = le.Uint32(b[52:])
	i.projid = le.Uint32(b[56:])
	i.mode = le.Uint32(b[60:])
	i.size = le.Uint64(b[64:])
	i.blocks = le.Uint64(b[72:])
	i.flags = le.Uint64(b[80:])
	i.nlink = le.Uint32(b[88:])
	i.childIndex = le.Uint32(b[92:])
	i.childCount = le.Uint32(b[96:])
	i.nameSize = le.Uint16(b[100:])
	i.symlinkSize = le.Uint16(b[102:])
	i.rdev = le.Uint32(b[104:])
	i.mtimeNsec = le.Uint32(b[108:])
	i.mtime = le.Uint64(b[112:])
}

func (i *inode) encode(b []byte) {
	copy(b[0:32], i.digest[:])
	le.PutUint64(b[32:], i.parent)
	le.PutUint64(b[40:], i.ino)
	le.PutUint32(b[48:], i.uid)
	le.PutUint32(b[52:], i.gid)
	le.PutUint32(b[56:], i.projid)
	le.PutUint32(b[60:], i.mode)
	le.PutUint64(b[64:], i.size)
	le.PutUint64(b[72:], i.blocks)
	le.PutUint64(b[80:], i.flags)
	le.PutUint32(b[88:], i.nlink)
	le.PutUint32(b[92:], i.childIndex)
	le.PutUint32(b[96:], i.childCount)
	le.PutUint16(b[100:], i.nameSize)
	le.PutUint16(b[102:], i.symlinkSize)
	le.PutUint32(b[104:], i.rdev)
	le.PutUint32(b[108:], i.mtimeNsec)
	le.PutUint64(b[112:], i.mtime)
	clear(b[120:128])
}

// chunkInfo is RafsV5ChunkInfo.
type chunkInfo struct {
	digest             codec.Digest
	blobIndex          uint32
	flags              uint32
	compressedSize     uint32
	uncompressedSize   uint32
	compressedOffset   uint64
	uncompressedOffset uint64
	fileOffset         uint64
	index              uint32
	crc32              uint32
}

func (c *chunkInfo) decode(b []byte) {
	copy(c.digest[:], b[0:32])
	c.blobIndex = le.Uint32(b[32:])
	c.flags = le.Uint32(b[36:])
	c.compressedSize = le.Uint32(b[40:])
	c.uncompressedSize = le.Uint32(b[44:])
	c.compressedOffset = le.Uint64(b[48:])
	c.uncompressedOffset = le.Uint64(b[56:])
	c.fileOffset = le.Uint64(b[64:])
	c.index = le.Uint32(b[72:])
	c.crc32 = le.Uint32(b[76:])
}

func (c *chunkInfo) encode(b []byte) {
	copy(b[0:32], c.digest[:])
	le.PutUint32(b[32:], c.blobIndex)
	le.PutUint32(b[36:], c.flags)
	le.PutUint32(b[40:], c.compressedSize)
	le.PutUint32(b[44:], c.uncompressedSize)
	le.PutUint64(b[48:], c.compressedOffset)
	le.PutUint64(b[56:], c.uncompressedOffset)
	le.PutUint64(b[64:], c.fileOffset)
	le.PutUint32(b[72:], c.index)
	le.PutUint32(b[76:], c.crc32)
}

// errf builds a decode error that wraps rafs.ErrInvalid.
func errf(format string, args ...any) error {
	return fmt.Errorf("rafs v5: %s: %w", fmt.Sprintf(format, args...), rafs.ErrInvalid)
}

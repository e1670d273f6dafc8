// Package erofs reads and writes the EROFS on-disk format (Linux
// fs/erofs/erofs_fs.h) with 4 KiB blocks: superblock, device table,
// compact and extended inodes, directories, inline and shared xattrs, flat
// (plain and tail-packed) data and chunk-based files whose chunks live on
// extra devices. It is the container format of RAFS v6 bootstraps
// (package rafs/v6) and of images mounted with `mount -t erofs`.
//
// Compressed layouts are not supported: their inodes can be listed but
// their data cannot be read.
package erofs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// On-disk constants.
const (
	// Magic is the superblock magic number.
	Magic = 0xE0F5E1E2
	// SuperBlockOffset is where the superblock starts in the image.
	SuperBlockOffset = 1024
	// SuperBlockSize is the size of the base superblock.
	SuperBlockSize = 128
	// BlockBits and BlockSize are the block size this package writes.
	BlockBits = 12
	BlockSize = 1 << BlockBits
	// SlotBits is log2 of the inode slot size: nid = (offset - meta start) >> SlotBits.
	SlotBits = 5
	SlotSize = 1 << SlotBits
	// CompactInodeSize and ExtendedInodeSize are the two on-disk inode sizes.
	CompactInodeSize  = 32
	ExtendedInodeSize = 64
	// DirentSize is the size of an on-disk directory entry (before its name).
	DirentSize = 12
	// DeviceSlotSize is the size of a device table entry.
	DeviceSlotSize = 128
	// ChunkIndexSize is the size of a chunk index entry.
	ChunkIndexSize = 8
	// MaxNameLen is the longest file name.
	MaxNameLen = 255
	// NullAddr is the block address of a hole in a chunk index.
	NullAddr = 0xFFFFFFFF
)

// Feature flags.
const (
	FeatureCompatSbChksum   = 0x00000001
	FeatureCompatMtime      = 0x00000002
	FeatureCompatXattrFilt  = 0x00000004
	FeatureCompatRafsV6     = 0x40000000
	FeatureIncompatZeroPad  = 0x00000001
	FeatureIncompatCompCfgs = 0x00000002
	FeatureIncompatChunked  = 0x00000004
	FeatureIncompatDevTable = 0x00000008
	FeatureIncompatZTail    = 0x00000010
	FeatureIncompatFragment = 0x00000020
	FeatureIncompatXPrefix  = 0x00000040
	FeatureIncompat48Bit    = 0x00000080

	// incompatSupported are the incompatible features this package can
	// read: chunk-based files, extra devices, and (for listing only) the
	// compression-related bits, whose data reads fail.
	incompatSupported = FeatureIncompatZeroPad | FeatureIncompatCompCfgs | FeatureIncompatChunked |
		FeatureIncompatDevTable | FeatureIncompatZTail | FeatureIncompatFragment
)

// Inode data layouts (i_format bits 1..3).
const (
	LayoutFlatPlain          = 0
	LayoutCompressedFull     = 1
	LayoutFlatInline         = 2
	LayoutCompressedCompact  = 3
	LayoutChunkBased         = 4
	inodeFormatExtendedBit   = 0x1
	inodeFormatNlink1Bit     = 0x10
	inodeFormatKnownBits     = 0x1F
	chunkFormatBlkBitsMask   = 0x1F
	chunkFormatIndexes       = 0x20
	chunkFormatKnownBits     = 0x3F
	xattrIbodyHeaderSize     = 12
	xattrEntrySize           = 4
	xattrLongPrefixIndexFlag = 0x80
)

// Directory entry file types.
const (
	FTUnknown = iota
	FTRegFile
	FTDir
	FTChrdev
	FTBlkdev
	FTFifo
	FTSock
	FTSymlink
)

// Errors.
var (
	// ErrFormat is wrapped by every error about malformed image bytes.
	ErrFormat = errors.New("erofs: invalid image")
	// ErrUnsupported is wrapped by errors about valid features this
	// package does not implement (compression, long xattr prefixes...).
	ErrUnsupported = errors.New("erofs: unsupported feature")
)

func formatErr(f string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(f, a...))
}

// SuperBlock is the on-disk superblock (struct erofs_super_block).
type SuperBlock struct {
	Magic           uint32
	Checksum        uint32
	FeatureCompat   uint32
	BlkSzBits       uint8
	ExtSlots        uint8
	RootNid         uint16
	Inos            uint64
	BuildTime       uint64
	BuildTimeNsec   uint32
	Blocks          uint32
	MetaBlkAddr     uint32
	XattrBlkAddr    uint32
	UUID            [16]byte
	VolumeName      [16]byte
	FeatureIncompat uint32
	U1              uint16
	ExtraDevices    uint16
	DevtSlotOff     uint16
	DirBlkBits      uint8
	XattrPrefixCnt  uint8
	XattrPrefixOff  uint32
	PackedNid       uint64
	XattrFilterRes  uint8
	Reserved        [23]byte
}

// MarshalBinary encodes the superblock's 128 bytes.
func (s *SuperBlock) MarshalBinary() ([]byte, error) {
	b := make([]byte, SuperBlockSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], s.Magic)
	le.PutUint32(b[4:], s.Checksum)
	le.PutUint32(b[8:], s.FeatureCompat)
	b[12] = s.BlkSzBits
	b[13] = s.ExtSlots
	le.PutUint16(b[14:], s.RootNid)
	le.PutUint64(b[16:], s.Inos)
	le.PutUint64(b[24:], s.BuildTime)
	le.PutUint32(b[32:], s.BuildTimeNsec)
	le.PutUint32(b[36:], s.Blocks)
	le.PutUint32(b[40:], s.MetaBlkAddr)
	le.PutUint32(b[44:], s.XattrBlkAddr)
	copy(b[48:64], s.UUID[:])
	copy(b[64:80], s.VolumeName[:])
	le.PutUint32(b[80:], s.FeatureIncompat)
	le.PutUint16(b[84:], s.U1)
	le.PutUint16(b[86:], s.ExtraDevices)
	le.PutUint16(b[88:], s.DevtSlotOff)
	b[90] = s.DirBlkBits
	b[91] = s.XattrPrefixCnt
	le.PutUint32(b[92:], s.XattrPrefixOff)
	le.PutUint64(b[96:], s.PackedNid)
	b[104] = s.XattrFilterRes
	copy(b[105:], s.Reserved[:])
	return b, nil
}

// UnmarshalBinary decodes a superblock from at least 128 bytes. It checks
// nothing but the length; Open validates.
func (s *SuperBlock) UnmarshalBinary(b []byte) error {
	if len(b) < SuperBlockSize {
		return formatErr("superblock: %d bytes", len(b))
	}
	le := binary.LittleEndian
	s.Magic = le.Uint32(b[0:])
	s.Checksum = le.Uint32(b[4:])
	s.FeatureCompat = le.Uint32(b[8:])
	s.BlkSzBits = b[12]
	s.ExtSlots = b[13]
	s.RootNid = le.Uint16(b[14:])
	s.Inos = le.Uint64(b[16:])
	s.BuildTime = le.Uint64(b[24:])
	s.BuildTimeNsec = le.Uint32(b[32:])
	s.Blocks = le.Uint32(b[36:])
	s.MetaBlkAddr = le.Uint32(b[40:])
	s.XattrBlkAddr = le.Uint32(b[44:])
	copy(s.UUID[:], b[48:64])
	copy(s.VolumeName[:], b[64:80])
	s.FeatureIncompat = le.Uint32(b[80:])
	s.U1 = le.Uint16(b[84:])
	s.ExtraDevices = le.Uint16(b[86:])
	s.DevtSlotOff = le.Uint16(b[88:])
	s.DirBlkBits = b[90]
	s.XattrPrefixCnt = b[91]
	s.XattrPrefixOff = le.Uint32(b[92:])
	s.PackedNid = le.Uint64(b[96:])
	s.XattrFilterRes = b[104]
	copy(s.Reserved[:], b[105:SuperBlockSize])
	return nil
}

// SuperBlockChecksum computes the checksum the kernel verifies when
// FeatureCompatSbChksum is set: crc32c (seed ~0, no final inversion) of
// block 0 from the superblock to the end of the block, with the checksum
// field taken as zero. block0 must hold the whole first block.
func SuperBlockChecksum(block0 []byte) uint32 {
	buf := make([]byte, len(block0)-SuperBlockOffset)
	copy(buf, block0[SuperBlockOffset:])
	clear(buf[4:8])
	return ^crc32.Checksum(buf, crc32.MakeTable(crc32.Castagnoli))
}

// Device is a device table slot (struct erofs_deviceslot): an extra device
// (for RAFS v6, a data blob) that chunk indexes address by DeviceID-1.
type Device struct {
	// Tag names the device (RAFS v6: the blob id); at most 64 bytes.
	Tag string
	// Blocks is the device's size in blocks.
	Blocks uint32
	// MappedBlkAddr is where the device appears in a flat address space
	// (used when no per-device path is given).
	MappedBlkAddr uint32
}

// MarshalBinary encodes a 128-byte device slot.
func (d *Device) MarshalBinary() ([]byte, error) {
	if len(d.Tag) > 64 {
		return nil, fmt.Errorf("erofs: device tag %q longer than 64 bytes", d.Tag)
	}
	b := make([]byte, DeviceSlotSize)
	copy(b, d.Tag)
	binary.LittleEndian.PutUint32(b[64:], d.Blocks)
	binary.LittleEndian.PutUint32(b[68:], d.MappedBlkAddr)
	return b, nil
}

func (d *Device) unmarshal(b []byte) {
	tag := b[:64]
	for i, c := range tag {
		if c == 0 {
			tag = tag[:i]
			break
		}
	}
	d.Tag = string(tag)
	d.Blocks = binary.LittleEndian.Uint32(b[64:])
	d.MappedBlkAddr = binary.LittleEndian.Uint32(b[68:])
}

// ChunkIndex is a chunk index entry (struct erofs_inode_chunk_index).
// RAFS v6 packs its chunk-info index into Advise and the high byte of
// DeviceID; the kernel masks DeviceID with the device count.
type ChunkIndex struct {
	Advise   uint16
	DeviceID uint16
	BlkAddr  uint32
}

func (c ChunkIndex) put(b []byte) {
	binary.LittleEndian.PutUint16(b[0:], c.Advise)
	binary.LittleEndian.PutUint16(b[2:], c.DeviceID)
	binary.LittleEndian.PutUint32(b[4:], c.BlkAddr)
}

func getChunkIndex(b []byte) ChunkIndex {
	return ChunkIndex{
		Advise:   binary.LittleEndian.Uint16(b[0:]),
		DeviceID: binary.LittleEndian.Uint16(b[2:]),
		BlkAddr:  binary.LittleEndian.Uint32(b[4:]),
	}
}

// Xattr is an extended attribute with its full name ("user.foo").
type Xattr struct {
	Name  string
	Value []byte
}

// xattr name prefixes by on-disk index (EROFS_XATTR_INDEX_*). Indexes 2
// and 3 are whole names whose on-disk suffix is empty.
var xattrPrefixes = [...]string{
	1: "user.",
	2: "system.posix_acl_access",
	3: "system.posix_acl_default",
	4: "trusted.",
	5: "lustre.",
	6: "security.",
}

// splitXattrName maps a full name to (index, suffix).
func splitXattrName(name string) (uint8, string, error) {
	// The ACL names first: they are whole names, not prefixes of others.
	for _, i := range []uint8{2, 3, 1, 4, 6, 5} {
		p := xattrPrefixes[i]
		if len(name) >= len(p) && name[:len(p)] == p {
			if (i == 1 || i == 4 || i == 5 || i == 6) && len(name) == len(p) {
				return 0, "", fmt.Errorf("erofs: xattr name %q has an empty suffix", name)
			}
			return i, name[len(p):], nil
		}
	}
	return 0, "", fmt.Errorf("erofs: xattr name %q has no EROFS prefix (user., trusted., security., system.posix_acl_*)", name)
}

// EncodeRdev packs a Linux st_rdev (glibc encoding, as unix.Mkdev) into
// the kernel's 32-bit new_encode_dev form stored in i_u.
func EncodeRdev(rdev uint64) uint32 {
	major := uint32((rdev>>8)&0xfff) | uint32((rdev>>32)&^0xfff)
	minor := uint32(rdev&0xff) | uint32((rdev>>12)&^0xff)
	return (minor & 0xff) | (major&0xfff)<<8 | (minor&^0xff)<<12
}

// DecodeRdev is the inverse of EncodeRdev.
func DecodeRdev(v uint32) uint64 {
	major := uint64((v & 0xfff00) >> 8)
	minor := uint64(v&0xff) | uint64((v>>12)&0xfff00)
	return (minor & 0xff) | (major&0xfff)<<8 | (minor&^0xff)<<12 | (major&^0xfff)<<32
}

// fileType maps a stat mode to a dirent file type.
func fileType(mode uint32) uint8 {
	switch mode & 0o170000 {
	case 0o100000:
		return FTRegFile
	case 0o040000:
		return FTDir
	case 0o020000:
		return FTChrdev
	case 0o060000:
		return FTBlkdev
	case 0o010000:
		return FTFifo
	case 0o140000:
		return FTSock
	case 0o120000:
		return FTSymlink
	}
	return FTUnknown
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

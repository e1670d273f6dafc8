package erofs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"strings"
)

// Inode is a decoded on-disk inode.
type Inode struct {
	// Nid is the inode's slot number relative to the metadata start.
	Nid uint64
	// Extended is true for 64-byte inodes.
	Extended bool
	// Layout is the data layout (LayoutFlatPlain...).
	Layout uint8
	Mode   uint32
	Nlink  uint32
	Size   uint64
	UID    uint32
	GID    uint32
	// Mtime: compact inodes store an offset from the superblock's build
	// time and share its nanoseconds.
	Mtime     uint64
	MtimeNsec uint32
	// Ino is the 32-bit inode number stored for stat compatibility.
	Ino uint32
	// RawU is i_u: the start block (flat), encoded rdev or chunk format.
	RawU uint32
	// XattrCount is i_xattr_icount.
	XattrCount uint16

	inodeSize int
	xattrSize int
}

// IsDir, IsRegular, IsSymlink test the file type.
func (i *Inode) IsDir() bool     { return i.Mode&0o170000 == 0o040000 }
func (i *Inode) IsRegular() bool { return i.Mode&0o170000 == 0o100000 }
func (i *Inode) IsSymlink() bool { return i.Mode&0o170000 == 0o120000 }

// IsDevice reports whether the inode is a character or block device.
func (i *Inode) IsDevice() bool {
	t := i.Mode & 0o170000
	return t == 0o020000 || t == 0o060000
}

// Rdev is the device number (st_rdev encoding) of a device inode.
func (i *Inode) Rdev() uint64 {
	if !i.IsDevice() {
		return 0
	}
	return DecodeRdev(i.RawU)
}

// ChunkBits is log2 of the chunk size of a chunk-based inode.
func (i *Inode) ChunkBits() uint {
	return BlockBits + uint(i.RawU&chunkFormatBlkBitsMask)
}

// Dirent is a directory entry as stored, "." and ".." included.
type Dirent struct {
	Name     string
	Nid      uint64
	FileType uint8
}

// Reader reads an EROFS image. It validates every offset and size it
// follows, so a hostile image yields errors (wrapping ErrFormat), never a
// panic, a hang or reads outside the image. A Reader is safe for
// concurrent use.
type Reader struct {
	r       io.ReaderAt
	size    int64
	sb      SuperBlock
	devices []Device
	devs    []io.ReaderAt
	meta    uint64 // byte offset of the metadata area
}

// Open reads and checks the superblock and device table of the image r of
// size bytes.
func Open(r io.ReaderAt, size int64) (*Reader, error) {
	if size < SuperBlockOffset+SuperBlockSize {
		return nil, formatErr("image of %d bytes is smaller than a superblock", size)
	}
	rd := &Reader{r: r, size: size}
	blk0 := make([]byte, min(size, BlockSize))
	if err := rd.readAt(blk0, 0); err != nil {
		return nil, fmt.Errorf("erofs: read superblock: %w", err)
	}
	sb := &rd.sb
	if err := sb.UnmarshalBinary(blk0[SuperBlockOffset:]); err != nil {
		return nil, err
	}
	if sb.Magic != Magic {
		return nil, formatErr("bad magic %#x", sb.Magic)
	}
	if sb.BlkSzBits != BlockBits {
		return nil, fmt.Errorf("%w: block size 2^%d (only 4096 is supported)", ErrUnsupported, sb.BlkSzBits)
	}
	if sb.FeatureCompat&FeatureCompatSbChksum != 0 {
		if len(blk0) < BlockSize {
			return nil, formatErr("image shorter than one block")
		}
		if got := SuperBlockChecksum(blk0); got != sb.Checksum {
			return nil, formatErr("superblock checksum %#x, computed %#x", sb.Checksum, got)
		}
	}
	if bad := sb.FeatureIncompat &^ incompatSupported; bad != 0 {
		return nil, fmt.Errorf("%w: incompatible features %#x", ErrUnsupported, bad)
	}
	rd.meta = uint64(sb.MetaBlkAddr) << BlockBits
	if rd.meta >= uint64(size) {
		return nil, formatErr("metadata block %d past the end of the %d-byte image", sb.MetaBlkAddr, size)
	}
	if sb.ExtraDevices > 0 {
		if sb.FeatureIncompat&FeatureIncompatDevTable == 0 {
			return nil, formatErr("%d extra devices without the device table feature", sb.ExtraDevices)
		}
		off := int64(sb.DevtSlotOff) * DeviceSlotSize
		n := int64(sb.ExtraDevices) * DeviceSlotSize
		if off < SuperBlockOffset+SuperBlockSize || off+n > size {
			return nil, formatErr("device table [%d,+%d) outside the image", off, n)
		}
		buf := make([]byte, n)
		if err := rd.readAt(buf, off); err != nil {
			return nil, fmt.Errorf("erofs: read device table: %w", err)
		}
		rd.devices = make([]Device, sb.ExtraDevices)
		for i := range rd.devices {
			rd.devices[i].unmarshal(buf[i*DeviceSlotSize:])
		}
	}
	return rd, nil
}

// SuperBlock returns the decoded superblock.
func (rd *Reader) SuperBlock() SuperBlock { return rd.sb }

// Devices returns the device table.
func (rd *Reader) Devices() []Device { return append([]Device(nil), rd.devices...) }

// Size is the image size given to Open.
func (rd *Reader) Size() int64 { return rd.size }

// SetDevices gives the readers of the extra devices (in device table
// order) so ReadAt can follow chunk indexes into them.
func (rd *Reader) SetDevices(devs ...io.ReaderAt) { rd.devs = devs }

// RootNid is the root directory's nid.
func (rd *Reader) RootNid() uint64 { return uint64(rd.sb.RootNid) }

// ReadRaw reads len(p) image bytes at off, failing if any is outside the image.
func (rd *Reader) ReadRaw(p []byte, off int64) error { return rd.readAt(p, off) }

func (rd *Reader) readAt(p []byte, off int64) error {
	if off < 0 || int64(len(p)) > rd.size || off > rd.size-int64(len(p)) {
		return formatErr("read [%d,+%d) outside the %d-byte image", off, len(p), rd.size)
	}
	n, err := rd.r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("erofs: read at %d: %w", off, err)
}

// inodeOffset is the byte offset of nid, or an error if it cannot be in the image.
func (rd *Reader) inodeOffset(nid uint64) (int64, error) {
	if nid > uint64(rd.size)>>SlotBits {
		return 0, formatErr("nid %d out of range", nid)
	}
	off := rd.meta + nid<<SlotBits
	if off+CompactInodeSize > uint64(rd.size) {
		return 0, formatErr("nid %d at %d past the end of the image", nid, off)
	}
	return int64(off), nil
}

// Inode reads the inode nid.
func (rd *Reader) Inode(nid uint64) (*Inode, error) {
	off, err := rd.inodeOffset(nid)
	if err != nil {
		return nil, err
	}
	var b [ExtendedInodeSize]byte
	if err := rd.readAt(b[:CompactInodeSize], off); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	format := le.Uint16(b[0:])
	if format&^inodeFormatKnownBits != 0 {
		return nil, fmt.Errorf("%w: nid %d: inode format %#x", ErrUnsupported, nid, format)
	}
	in := &Inode{Nid: nid, Layout: uint8(format>>1) & 7, XattrCount: le.Uint16(b[2:]), Mode: uint32(le.Uint16(b[4:]))}
	if format&inodeFormatExtendedBit != 0 {
		if err := rd.readAt(b[CompactInodeSize:], off+CompactInodeSize); err != nil {
			return nil, err
		}
		in.Extended = true
		in.inodeSize = ExtendedInodeSize
		in.Size = le.Uint64(b[8:])
		in.RawU = le.Uint32(b[16:])
		in.Ino = le.Uint32(b[20:])
		in.UID = le.Uint32(b[24:])
		in.GID = le.Uint32(b[28:])
		in.Mtime = le.Uint64(b[32:])
		in.MtimeNsec = le.Uint32(b[40:])
		in.Nlink = le.Uint32(b[44:])
	} else {
		in.inodeSize = CompactInodeSize
		in.Nlink = uint32(le.Uint16(b[6:]))
		if format&inodeFormatNlink1Bit != 0 {
			in.Nlink = 1
		}
		in.Size = uint64(le.Uint32(b[8:]))
		in.Mtime = rd.sb.BuildTime + uint64(le.Uint32(b[12:]))
		in.MtimeNsec = rd.sb.BuildTimeNsec
		in.RawU = le.Uint32(b[16:])
		in.Ino = le.Uint32(b[20:])
		in.UID = uint32(le.Uint16(b[24:]))
		in.GID = uint32(le.Uint16(b[26:]))
	}
	if in.XattrCount > 0 {
		in.xattrSize = xattrIbodyHeaderSize + (int(in.XattrCount)-1)*xattrEntrySize
	}
	if uint64(off)+uint64(in.inodeSize+in.xattrSize) > uint64(rd.size) {
		return nil, formatErr("nid %d: inode and xattrs run past the end of the image", nid)
	}
	switch in.Layout {
	case LayoutFlatPlain, LayoutFlatInline, LayoutChunkBased, LayoutCompressedFull, LayoutCompressedCompact:
	default:
		return nil, fmt.Errorf("%w: nid %d: data layout %d", ErrUnsupported, nid, in.Layout)
	}
	if in.Layout == LayoutChunkBased {
		if in.RawU&^chunkFormatKnownBits != 0 {
			return nil, fmt.Errorf("%w: nid %d: chunk format %#x", ErrUnsupported, nid, in.RawU)
		}
		if in.ChunkBits() > 48 {
			return nil, formatErr("nid %d: chunk size 2^%d", nid, in.ChunkBits())
		}
	}
	// Size can never exceed what a 2^32-block device addresses; bounding it
	// keeps every later computation free of overflow.
	if in.Size > 1<<44 {
		return nil, formatErr("nid %d: size %d", nid, in.Size)
	}
	return in, nil
}

// tailOffset is where the inline tail of a FLAT_INLINE inode starts.
func (rd *Reader) tailOffset(in *Inode) uint64 {
	return rd.meta + in.Nid<<SlotBits + uint64(in.inodeSize+in.xattrSize)
}

// readFlat reads [off, off+len(p)) of a flat inode's data.
func (rd *Reader) readFlat(in *Inode, p []byte, off uint64) error {
	if off+uint64(len(p)) > in.Size {
		return formatErr("nid %d: read past size", in.Nid)
	}
	nblocks := in.Size >> BlockBits // full blocks at RawU
	tail := in.Size & (BlockSize - 1)
	if in.Layout == LayoutFlatPlain {
		nblocks, tail = (in.Size+BlockSize-1)>>BlockBits, 0
	}
	if tail > 0 {
		t := rd.tailOffset(in)
		if t&(BlockSize-1)+tail > BlockSize {
			return formatErr("nid %d: inline data crosses a block boundary", in.Nid)
		}
	}
	for len(p) > 0 {
		var src uint64
		n := uint64(len(p))
		if blk := off >> BlockBits; blk < nblocks {
			src = (uint64(in.RawU)+blk)<<BlockBits + off&(BlockSize-1)
			n = min(n, BlockSize-off&(BlockSize-1))
		} else {
			src = rd.tailOffset(in) + off&(BlockSize-1)
		}
		if err := rd.readAt(p[:n], int64(src)); err != nil {
			return fmt.Errorf("nid %d: %w", in.Nid, err)
		}
		p, off = p[n:], off+n
	}
	return nil
}

// ChunkIndexes returns the first n chunk index entries of a chunk-based
// inode (n < 0: as many as its chunk size implies). RAFS v6 stores one per
// image chunk, which may be more than the inode's chunk size implies.
func (rd *Reader) ChunkIndexes(in *Inode, n int) ([]ChunkIndex, error) {
	if in.Layout != LayoutChunkBased {
		return nil, fmt.Errorf("erofs: nid %d is not chunk-based", in.Nid)
	}
	if in.RawU&chunkFormatIndexes == 0 {
		return nil, fmt.Errorf("%w: nid %d: block-map chunk format", ErrUnsupported, in.Nid)
	}
	if n < 0 {
		cs := uint64(1) << in.ChunkBits()
		n = int((in.Size + cs - 1) / cs)
	}
	start := alignUp(rd.meta+in.Nid<<SlotBits+uint64(in.inodeSize+in.xattrSize), ChunkIndexSize)
	if uint64(n) > uint64(rd.size)/ChunkIndexSize || start+uint64(n)*ChunkIndexSize > uint64(rd.size) {
		return nil, formatErr("nid %d: %d chunk indexes past the end of the image", in.Nid, n)
	}
	buf := make([]byte, n*ChunkIndexSize)
	if err := rd.readAt(buf, int64(start)); err != nil {
		return nil, err
	}
	out := make([]ChunkIndex, n)
	for i := range out {
		out[i] = getChunkIndex(buf[i*ChunkIndexSize:])
	}
	return out, nil
}

// ReadAt reads a regular file's data. Chunks on extra devices need
// SetDevices; compressed layouts fail with ErrUnsupported.
func (rd *Reader) ReadAt(in *Inode, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("erofs: negative offset %d", off)
	}
	if uint64(off) >= in.Size {
		return 0, io.EOF
	}
	want := len(p)
	if uint64(off)+uint64(len(p)) > in.Size {
		p = p[:in.Size-uint64(off)]
	}
	switch in.Layout {
	case LayoutFlatPlain, LayoutFlatInline:
		if err := rd.readFlat(in, p, uint64(off)); err != nil {
			return 0, err
		}
	case LayoutChunkBased:
		if err := rd.readChunked(in, p, uint64(off)); err != nil {
			return 0, err
		}
	default:
		return 0, fmt.Errorf("%w: nid %d: compressed data", ErrUnsupported, in.Nid)
	}
	if len(p) < want {
		return len(p), io.EOF
	}
	return len(p), nil
}

func (rd *Reader) readChunked(in *Inode, p []byte, off uint64) error {
	idx, err := rd.ChunkIndexes(in, -1)
	if err != nil {
		return err
	}
	cb := in.ChunkBits()
	mask := uint64(len(rd.devices))
	if mask > 0 {
		mask = uint64(1)<<bits.Len64(mask) - 1
	}
	for len(p) > 0 {
		k := off >> cb
		inChunk := off & (1<<cb - 1)
		n := min(uint64(len(p)), 1<<cb-inChunk)
		ci := idx[k]
		if ci.BlkAddr == NullAddr {
			clear(p[:n])
		} else {
			dev := uint64(ci.DeviceID) & mask
			src := uint64(ci.BlkAddr)<<BlockBits + inChunk
			if dev == 0 {
				if err := rd.readAt(p[:n], int64(src)); err != nil {
					return err
				}
			} else {
				if dev > uint64(len(rd.devs)) || rd.devs[dev-1] == nil {
					return fmt.Errorf("erofs: nid %d: chunk on device %d, which was not given", in.Nid, dev)
				}
				// Past the end of a device reads zeros, as the kernel's
				// page cache does for a short backing file.
				m, err := rd.devs[dev-1].ReadAt(p[:n], int64(src))
				if uint64(m) < n {
					if err != io.EOF {
						return fmt.Errorf("erofs: nid %d: device %d at %d: %w", in.Nid, dev, src, err)
					}
					clear(p[m:n])
				}
			}
		}
		p, off = p[n:], off+n
	}
	return nil
}

// Readlink returns a symlink's target.
func (rd *Reader) Readlink(in *Inode) (string, error) {
	if !in.IsSymlink() {
		return "", fmt.Errorf("erofs: nid %d is not a symlink", in.Nid)
	}
	if in.Size == 0 || in.Size >= BlockSize {
		return "", formatErr("nid %d: symlink target of %d bytes", in.Nid, in.Size)
	}
	b := make([]byte, in.Size)
	if _, err := rd.ReadAt(in, b, 0); err != nil && err != io.EOF {
		return "", err
	}
	return string(b), nil
}

// ReadDir returns a directory's entries in on-disk order, "." and ".."
// included. Names are checked (1..255 bytes, no '/' or NUL) and must be
// strictly sorted, as the kernel's binary search needs.
func (rd *Reader) ReadDir(in *Inode) ([]Dirent, error) {
	if !in.IsDir() {
		return nil, fmt.Errorf("erofs: nid %d is not a directory", in.Nid)
	}
	if in.Layout != LayoutFlatPlain && in.Layout != LayoutFlatInline {
		return nil, fmt.Errorf("%w: nid %d: directory layout %d", ErrUnsupported, in.Nid, in.Layout)
	}
	if in.Size > uint64(rd.size) {
		return nil, formatErr("nid %d: directory size %d larger than the image", in.Nid, in.Size)
	}
	var out []Dirent
	blk := make([]byte, BlockSize)
	for pos := uint64(0); pos < in.Size; pos += BlockSize {
		b := blk[:min(BlockSize, in.Size-pos)]
		if err := rd.readFlat(in, b, pos); err != nil {
			return nil, err
		}
		ents, err := parseDirBlock(b)
		if err != nil {
			return nil, fmt.Errorf("nid %d block %d: %w", in.Nid, pos>>BlockBits, err)
		}
		for _, e := range ents {
			if len(out) > 0 && out[len(out)-1].Name >= e.Name {
				return nil, formatErr("nid %d: entries not sorted at %q", in.Nid, e.Name)
			}
			out = append(out, e)
		}
	}
	return out, nil
}

func parseDirBlock(b []byte) ([]Dirent, error) {
	if len(b) < DirentSize {
		return nil, formatErr("directory block of %d bytes", len(b))
	}
	le := binary.LittleEndian
	first := int(le.Uint16(b[8:]))
	if first < DirentSize || first%DirentSize != 0 || first > len(b) {
		return nil, formatErr("first name offset %d", first)
	}
	n := first / DirentSize
	out := make([]Dirent, n)
	for i := range n {
		e := b[i*DirentSize:]
		start := int(le.Uint16(e[8:]))
		end := len(b)
		if i+1 < n {
			end = int(le.Uint16(e[DirentSize+8:]))
		}
		if start < first || end > len(b) || start >= end {
			return nil, formatErr("entry %d: name at [%d,%d)", i, start, end)
		}
		name := b[start:end]
		if i+1 == n {
			// The last name runs to the end of the block or a NUL.
			if j := bytes.IndexByte(name, 0); j >= 0 {
				name = name[:j]
			}
		}
		if len(name) == 0 || len(name) > MaxNameLen || bytes.IndexByte(name, '/') >= 0 || bytes.IndexByte(name, 0) >= 0 {
			return nil, formatErr("entry %d: bad name %q", i, name)
		}
		out[i] = Dirent{Name: string(name), Nid: le.Uint64(e[0:]), FileType: e[10]}
	}
	return out, nil
}

// Xattrs returns an inode's extended attributes, shared ones first, then
// inline ones, each in on-disk order.
func (rd *Reader) Xattrs(in *Inode) ([]Xattr, error) {
	if in.XattrCount == 0 {
		return nil, nil
	}
	base := int64(rd.meta + in.Nid<<SlotBits + uint64(in.inodeSize))
	body := make([]byte, in.xattrSize)
	if err := rd.readAt(body, base); err != nil {
		return nil, err
	}
	shared := int(body[4])
	pos := xattrIbodyHeaderSize + shared*4
	if pos > len(body) {
		return nil, formatErr("nid %d: %d shared xattrs do not fit in %d bytes", in.Nid, shared, len(body))
	}
	var out []Xattr
	for i := range shared {
		id := binary.LittleEndian.Uint32(body[xattrIbodyHeaderSize+4*i:])
		x, err := rd.sharedXattr(id)
		if err != nil {
			return nil, fmt.Errorf("nid %d: %w", in.Nid, err)
		}
		out = append(out, x)
	}
	for pos < len(body) {
		x, n, err := parseXattr(body[pos:])
		if err != nil {
			return nil, fmt.Errorf("nid %d: %w", in.Nid, err)
		}
		out = append(out, x)
		pos += n
	}
	return out, nil
}

func (rd *Reader) sharedXattr(id uint32) (Xattr, error) {
	off := uint64(rd.sb.XattrBlkAddr)<<BlockBits + uint64(id)*4
	if off+xattrEntrySize > uint64(rd.size) {
		return Xattr{}, formatErr("shared xattr %d outside the image", id)
	}
	var hdr [xattrEntrySize]byte
	if err := rd.readAt(hdr[:], int64(off)); err != nil {
		return Xattr{}, err
	}
	n := xattrEntrySize + int(hdr[0]) + int(binary.LittleEndian.Uint16(hdr[2:]))
	if off+uint64(n) > uint64(rd.size) {
		return Xattr{}, formatErr("shared xattr %d runs past the image", id)
	}
	b := make([]byte, n)
	if err := rd.readAt(b, int64(off)); err != nil {
		return Xattr{}, err
	}
	x, _, err := parseXattr(b)
	return x, err
}

// parseXattr decodes one entry at the start of b and returns its aligned size.
func parseXattr(b []byte) (Xattr, int, error) {
	if len(b) < xattrEntrySize {
		return Xattr{}, 0, formatErr("truncated xattr entry")
	}
	nameLen, index, valLen := int(b[0]), b[1], int(binary.LittleEndian.Uint16(b[2:]))
	n := xattrEntrySize + nameLen + valLen
	if n > len(b) {
		return Xattr{}, 0, formatErr("xattr entry of %d bytes overruns its %d-byte area", n, len(b))
	}
	if index&xattrLongPrefixIndexFlag != 0 {
		return Xattr{}, 0, fmt.Errorf("%w: long xattr name prefixes", ErrUnsupported)
	}
	if index == 0 || int(index) >= len(xattrPrefixes) {
		return Xattr{}, 0, formatErr("xattr name index %d", index)
	}
	suffix := string(b[xattrEntrySize : xattrEntrySize+nameLen])
	if strings.IndexByte(suffix, 0) >= 0 {
		return Xattr{}, 0, formatErr("xattr name with NUL")
	}
	name := xattrPrefixes[index] + suffix
	val := bytes.Clone(b[xattrEntrySize+nameLen : n])
	return Xattr{Name: name, Value: val}, int(alignUp(uint64(n), xattrEntrySize)), nil
}

// ErrSkipDir can be returned by a Walk callback to not descend into a directory.
var ErrSkipDir = errors.New("skip directory")

// Walk visits every path of the image depth-first in name order, root
// ("/") first. A directory reached twice (a loop or a directory hardlink),
// or directories holding more bytes than the image, is an error.
func (rd *Reader) Walk(fn func(path string, in *Inode) error) error {
	seen := map[uint64]bool{}
	var dirBytes uint64
	var walk func(p string, nid uint64) error
	walk = func(p string, nid uint64) error {
		in, err := rd.Inode(nid)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if err := fn(p, in); err != nil {
			if err == ErrSkipDir {
				return nil
			}
			return err
		}
		if !in.IsDir() {
			return nil
		}
		if seen[nid] {
			return formatErr("%s: directory nid %d reached twice", p, nid)
		}
		seen[nid] = true
		// Directories never share blocks in a sane image; bounding their
		// total size by the image's keeps a hostile image of directories
		// aliasing one big block list from costing quadratic time.
		if dirBytes += in.Size; dirBytes > uint64(rd.size) {
			return formatErr("%s: directories hold more bytes than the image", p)
		}
		ents, err := rd.ReadDir(in)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		prefix := strings.TrimSuffix(p, "/") + "/"
		for _, e := range ents {
			if e.Name == "." || e.Name == ".." {
				continue
			}
			if err := walk(prefix+e.Name, e.Nid); err != nil {
				return err
			}
		}
		return nil
	}
	return walk("/", rd.RootNid())
}

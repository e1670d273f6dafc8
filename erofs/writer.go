package erofs

import (
	"encoding/binary"
	"fmt"
	"io"
	"sort"
)

// Node is an inode to write. A Node may appear under several names
// (a hardlink) unless it is a directory.
type Node struct {
	Mode      uint32 // file type and permissions, as in stat(2)
	UID, GID  uint32
	Mtime     uint64
	MtimeNsec uint32
	// Nlink is written as is; 0 means count it (2 + subdirectories for a
	// directory, the number of names otherwise).
	Nlink uint32
	// Ino is stored in i_ino (the 32-bit inode number for stat).
	Ino  uint32
	Rdev uint64 // device number of a character or block device (st_rdev encoding)
	// Xattrs are stored inline, in this order.
	Xattrs []Xattr
	// Entries are a directory's children; Build sorts them.
	Entries []Entry
	// Target is a symlink's target.
	Target string
	// Data is the content of a regular file stored in the image itself.
	Data []byte
	// Chunk-based regular file (ChunkBits != 0): Size bytes whose chunks of
	// 2^ChunkBits bytes are located by Chunks. Chunks may hold more entries
	// than the chunk size implies (RAFS v6 stores one per image chunk).
	Size      uint64
	ChunkBits uint8
	Chunks    []ChunkIndex

	// Nid is set by Build to the inode's slot number.
	Nid uint64

	// layout state
	off       uint64 // byte offset of the inode
	layout    uint8
	extended  bool
	xattrBody []byte
	dataSize  uint64 // bytes of flat data (dir blocks, symlink target, Data)
	blkAddr   uint32 // first block of flat data not inlined
	refs      uint32
	subdirs   uint32
	parent    *Node
}

// Entry is a name in a directory.
type Entry struct {
	Name string
	Node *Node
}

// Options tune Build.
type Options struct {
	BuildTime     uint64
	BuildTimeNsec uint32
	UUID          [16]byte
	VolumeName    string
	// FeatureCompat and FeatureIncompat are ORed into the flags Build sets
	// itself (chunk-based files, device table, checksum).
	FeatureCompat   uint32
	FeatureIncompat uint32
	// Checksum sets the superblock checksum feature and value.
	Checksum bool
	// Devices is the extra device table.
	Devices []Device
	// DevTableOffset is the byte offset of the device table in block 0 (a
	// multiple of 128, after the superblock); 0 puts it right after the
	// superblock. Bytes between the superblock and it are left zero for
	// format extensions (RAFS v6 keeps its extended superblock there).
	DevTableOffset uint32
	// MetaOffset is where the metadata area starts (a multiple of the
	// block size); 0 means the first block after the device table. Bytes
	// before it and after block 0 are left zero for the caller.
	MetaOffset uint64
	// Blocks overrides the superblock's block count (0: the image's).
	Blocks uint32
}

// Write builds an image (see Build) and writes it to w.
func Write(w io.Writer, root *Node, o Options) error {
	b, err := Build(root, o)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// Build lays out the tree rooted at root and returns the image bytes, a
// whole number of blocks. Inodes come first, breadth-first from the root,
// then the flat data blocks that are not tail-packed into their inode.
// It sets every Node's Nid.
func Build(root *Node, o Options) ([]byte, error) {
	if root == nil || root.Mode&0o170000 != 0o040000 {
		return nil, fmt.Errorf("erofs: root is not a directory")
	}
	devOff := uint64(o.DevTableOffset)
	if devOff == 0 {
		devOff = SuperBlockOffset + SuperBlockSize
	}
	if devOff%DeviceSlotSize != 0 || devOff < SuperBlockOffset+SuperBlockSize || devOff/DeviceSlotSize > 0xFFFF {
		return nil, fmt.Errorf("erofs: device table offset %d", devOff)
	}
	if len(o.Devices) > 0xFFFF {
		return nil, fmt.Errorf("erofs: %d devices", len(o.Devices))
	}
	devEnd := devOff + uint64(len(o.Devices))*DeviceSlotSize
	meta := o.MetaOffset
	if meta == 0 {
		meta = max(BlockSize, alignUp(devEnd, BlockSize))
	}
	if meta%BlockSize != 0 || meta < devEnd || meta < BlockSize || meta>>BlockBits > 0xFFFFFFFF {
		return nil, fmt.Errorf("erofs: metadata offset %d", meta)
	}

	nodes, err := collect(root)
	if err != nil {
		return nil, err
	}
	dirs := map[*Node][]Entry{}
	hasChunks := false
	for _, n := range nodes {
		if err := n.prepare(o, dirs); err != nil {
			return nil, err
		}
		if n.layout == LayoutChunkBased {
			hasChunks = true
		}
	}

	// Inodes: nid 0 is left unused (RAFS prefetch tables use 0 as padding).
	cur := uint64(SlotSize)
	for _, n := range nodes {
		head := uint64(n.isize() + len(n.xattrBody))
		total := head
		switch n.layout {
		case LayoutFlatInline:
			total += n.dataSize % BlockSize
		case LayoutChunkBased:
			total = alignUp(head, ChunkIndexSize) + uint64(len(n.Chunks))*ChunkIndexSize
		}
		// Keep an inode with its xattrs and inline tail inside one block
		// (the kernel requires it for the tail).
		if cur%BlockSize+total > BlockSize && total <= BlockSize {
			cur = alignUp(cur, BlockSize)
		}
		n.off = cur
		n.Nid = cur >> SlotBits
		cur = alignUp(cur+total, SlotSize)
	}
	if nodes[0].Nid > 0xFFFF {
		return nil, fmt.Errorf("erofs: root nid %d does not fit in 16 bits", nodes[0].Nid)
	}
	dataStart := meta + alignUp(cur, BlockSize)
	end := dataStart
	for _, n := range nodes {
		if n.layout != LayoutFlatPlain && n.layout != LayoutFlatInline {
			continue
		}
		nb := n.dataSize / BlockSize
		if n.layout == LayoutFlatPlain {
			nb = (n.dataSize + BlockSize - 1) / BlockSize
		}
		if nb > 0 {
			if end>>BlockBits > 0xFFFFFFFF {
				return nil, fmt.Errorf("erofs: image too large")
			}
			n.blkAddr = uint32(end >> BlockBits)
			end += nb * BlockSize
		}
	}
	if end>>BlockBits > 0xFFFFFFFF {
		return nil, fmt.Errorf("erofs: image too large")
	}

	img := make([]byte, end)
	for _, n := range nodes {
		var data []byte
		switch {
		case n.IsDirNode():
			data = dirBlocks(n, dirs[n])
		case n.Mode&0o170000 == 0o120000:
			data = []byte(n.Target)
		case n.layout != LayoutChunkBased:
			data = n.Data
		}
		n.encode(img[meta+n.off:], o)
		if len(data) == 0 {
			continue
		}
		full := uint64(len(data))
		if n.layout == LayoutFlatInline {
			full -= full % BlockSize
			copy(img[meta+n.off+uint64(n.isize()+len(n.xattrBody)):], data[full:])
		}
		copy(img[uint64(n.blkAddr)<<BlockBits:], data[:full])
	}

	sb := SuperBlock{
		Magic:           Magic,
		FeatureCompat:   o.FeatureCompat,
		BlkSzBits:       BlockBits,
		RootNid:         uint16(nodes[0].Nid),
		Inos:            uint64(len(nodes)),
		BuildTime:       o.BuildTime,
		BuildTimeNsec:   o.BuildTimeNsec,
		Blocks:          uint32(end >> BlockBits),
		MetaBlkAddr:     uint32(meta >> BlockBits),
		UUID:            o.UUID,
		FeatureIncompat: o.FeatureIncompat,
		ExtraDevices:    uint16(len(o.Devices)),
		DevtSlotOff:     uint16(devOff / DeviceSlotSize),
	}
	if o.Blocks != 0 {
		sb.Blocks = o.Blocks
	}
	copy(sb.VolumeName[:], o.VolumeName)
	if hasChunks {
		sb.FeatureIncompat |= FeatureIncompatChunked
	}
	if len(o.Devices) > 0 {
		sb.FeatureIncompat |= FeatureIncompatDevTable
	}
	if o.Checksum {
		sb.FeatureCompat |= FeatureCompatSbChksum
	}
	for i := range o.Devices {
		b, err := o.Devices[i].MarshalBinary()
		if err != nil {
			return nil, err
		}
		copy(img[devOff+uint64(i)*DeviceSlotSize:], b)
	}
	sbb, _ := sb.MarshalBinary()
	copy(img[SuperBlockOffset:], sbb)
	if o.Checksum {
		binary.LittleEndian.PutUint32(img[SuperBlockOffset+4:], SuperBlockChecksum(img[:BlockSize]))
	}
	return img, nil
}

// IsDirNode reports whether n is a directory.
func (n *Node) IsDirNode() bool { return n.Mode&0o170000 == 0o040000 }

// collect lists the nodes breadth-first from root, each once, counting
// names and subdirectories.
func collect(root *Node) ([]*Node, error) {
	seen := map[*Node]bool{root: true}
	nodes := []*Node{root}
	root.refs, root.subdirs, root.parent = 1, 0, root
	for i := 0; i < len(nodes); i++ {
		n := nodes[i]
		if !n.IsDirNode() {
			continue
		}
		for _, e := range n.Entries {
			c := e.Node
			if c == nil {
				return nil, fmt.Errorf("erofs: entry %q has no node", e.Name)
			}
			if c.IsDirNode() {
				n.subdirs++
			}
			if seen[c] {
				if c.IsDirNode() {
					return nil, fmt.Errorf("erofs: directory %q linked twice", e.Name)
				}
				c.refs++
				continue
			}
			seen[c] = true
			c.refs, c.subdirs, c.parent = 1, 0, n
			nodes = append(nodes, c)
		}
	}
	return nodes, nil
}

func (n *Node) isize() int {
	if n.extended {
		return ExtendedInodeSize
	}
	return CompactInodeSize
}

func (n *Node) nlink() uint32 {
	if n.Nlink != 0 {
		return n.Nlink
	}
	if n.IsDirNode() {
		return 2 + n.subdirs
	}
	return n.refs
}

// prepare checks a node and decides its inode size, layout and xattrs.
func (n *Node) prepare(o Options, dirs map[*Node][]Entry) error {
	n.layout = LayoutFlatPlain
	switch n.Mode & 0o170000 {
	case 0o040000:
		ents, size, err := sortedEntries(n)
		if err != nil {
			return err
		}
		dirs[n] = ents
		n.dataSize = size
	case 0o120000:
		if n.Target == "" || len(n.Target) >= BlockSize {
			return fmt.Errorf("erofs: symlink target of %d bytes", len(n.Target))
		}
		n.dataSize = uint64(len(n.Target))
	case 0o100000:
		if n.ChunkBits != 0 {
			if n.ChunkBits < BlockBits || n.ChunkBits > BlockBits+chunkFormatBlkBitsMask {
				return fmt.Errorf("erofs: chunk size 2^%d", n.ChunkBits)
			}
			cs := uint64(1) << n.ChunkBits
			if need := (n.Size + cs - 1) / cs; uint64(len(n.Chunks)) < need {
				return fmt.Errorf("erofs: %d chunk indexes for %d bytes of 2^%d-byte chunks", len(n.Chunks), n.Size, n.ChunkBits)
			}
			n.layout = LayoutChunkBased
		} else {
			n.Size = uint64(len(n.Data))
			n.dataSize = n.Size
		}
	case 0o020000, 0o060000, 0o010000, 0o140000:
	default:
		return fmt.Errorf("erofs: mode %#o has no file type", n.Mode)
	}
	if n.Mode > 0xFFFF {
		return fmt.Errorf("erofs: mode %#o", n.Mode)
	}
	size := n.dataSize
	if n.layout == LayoutChunkBased {
		size = n.Size
	}
	n.extended = n.UID > 0xFFFF || n.GID > 0xFFFF || n.nlink() > 0xFFFF || size > 0xFFFFFFFF ||
		n.Mtime != o.BuildTime || n.MtimeNsec != o.BuildTimeNsec
	body, err := xattrBody(n.Xattrs)
	if err != nil {
		return err
	}
	n.xattrBody = body
	if n.dataSize%BlockSize != 0 && n.isize()+len(body)+int(n.dataSize%BlockSize) <= BlockSize {
		n.layout = LayoutFlatInline
	}
	return nil
}

func xattrBody(xs []Xattr) ([]byte, error) {
	if len(xs) == 0 {
		return nil, nil
	}
	b := make([]byte, xattrIbodyHeaderSize)
	seen := map[string]bool{}
	for _, x := range xs {
		if seen[x.Name] {
			return nil, fmt.Errorf("erofs: duplicate xattr %q", x.Name)
		}
		seen[x.Name] = true
		idx, suffix, err := splitXattrName(x.Name)
		if err != nil {
			return nil, err
		}
		if len(suffix) > 255 || len(x.Value) > 0xFFFF {
			return nil, fmt.Errorf("erofs: xattr %q: name or value too long", x.Name)
		}
		e := make([]byte, alignUp(uint64(xattrEntrySize+len(suffix)+len(x.Value)), xattrEntrySize))
		e[0], e[1] = uint8(len(suffix)), idx
		binary.LittleEndian.PutUint16(e[2:], uint16(len(x.Value)))
		copy(e[xattrEntrySize:], suffix)
		copy(e[xattrEntrySize+len(suffix):], x.Value)
		b = append(b, e...)
	}
	if (len(b)-xattrIbodyHeaderSize)/xattrEntrySize+1 > 0xFFFF {
		return nil, fmt.Errorf("erofs: %d bytes of xattrs", len(b))
	}
	return b, nil
}

// sortedEntries returns a directory's entries with "." and "..", sorted,
// and the size of its dirent blocks.
func sortedEntries(n *Node) ([]Entry, uint64, error) {
	ents := make([]Entry, 0, len(n.Entries)+2)
	for _, e := range n.Entries {
		if err := checkName(e.Name); err != nil {
			return nil, 0, err
		}
		ents = append(ents, e)
	}
	ents = append(ents, Entry{Name: ".", Node: n}, Entry{Name: "..", Node: nil})
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
	for i := 1; i < len(ents); i++ {
		if ents[i-1].Name == ents[i].Name {
			return nil, 0, fmt.Errorf("erofs: duplicate name %q", ents[i].Name)
		}
	}
	var size uint64
	for _, e := range ents {
		l := uint64(DirentSize + len(e.Name))
		if size%BlockSize+l > BlockSize {
			size = alignUp(size, BlockSize)
		}
		size += l
	}
	return ents, size, nil
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || len(name) > MaxNameLen {
		return fmt.Errorf("erofs: bad name %q", name)
	}
	for i := 0; i < len(name); i++ {
		if name[i] == '/' || name[i] == 0 {
			return fmt.Errorf("erofs: name %q contains '/' or NUL", name)
		}
	}
	return nil
}

// dirBlocks encodes a directory's dirent blocks. ".." has a nil Node and
// points at parent, which is the directory itself for the root.
func dirBlocks(n *Node, ents []Entry) []byte {
	out := make([]byte, 0, n.dataSize)
	for len(ents) > 0 {
		k, used := 0, 0
		for k < len(ents) && used+DirentSize+len(ents[k].Name) <= BlockSize {
			used += DirentSize + len(ents[k].Name)
			k++
		}
		blk := make([]byte, used)
		nameOff := k * DirentSize
		for i, e := range ents[:k] {
			nid, ft := n.parent.Nid, uint8(FTDir)
			if e.Node != nil {
				nid, ft = e.Node.Nid, fileType(e.Node.Mode)
			}
			d := blk[i*DirentSize:]
			binary.LittleEndian.PutUint64(d[0:], nid)
			binary.LittleEndian.PutUint16(d[8:], uint16(nameOff))
			d[10] = ft
			copy(blk[nameOff:], e.Name)
			nameOff += len(e.Name)
		}
		ents = ents[k:]
		if len(ents) > 0 {
			blk = append(blk, make([]byte, BlockSize-used)...)
		}
		out = append(out, blk...)
	}
	return out
}

// encode writes the inode, its xattrs and (for chunk-based files) its
// chunk indexes at b.
func (n *Node) encode(b []byte, o Options) {
	le := binary.LittleEndian
	format := uint16(n.layout) << 1
	var u uint32
	switch {
	case n.layout == LayoutChunkBased:
		u = chunkFormatIndexes | uint32(n.ChunkBits-BlockBits)
	case n.Mode&0o170000 == 0o020000 || n.Mode&0o170000 == 0o060000:
		u = EncodeRdev(n.Rdev)
	case n.layout == LayoutFlatPlain || n.layout == LayoutFlatInline:
		u = n.blkAddr
	}
	size := n.dataSize
	if n.layout == LayoutChunkBased {
		size = n.Size
	}
	if n.extended {
		le.PutUint16(b[0:], format|inodeFormatExtendedBit)
		le.PutUint16(b[4:], uint16(n.Mode))
		le.PutUint64(b[8:], size)
		le.PutUint32(b[16:], u)
		le.PutUint32(b[20:], n.Ino)
		le.PutUint32(b[24:], n.UID)
		le.PutUint32(b[28:], n.GID)
		le.PutUint64(b[32:], n.Mtime)
		le.PutUint32(b[40:], n.MtimeNsec)
		le.PutUint32(b[44:], n.nlink())
	} else {
		le.PutUint16(b[0:], format)
		le.PutUint16(b[4:], uint16(n.Mode))
		le.PutUint16(b[6:], uint16(n.nlink()))
		le.PutUint32(b[8:], uint32(size))
		le.PutUint32(b[16:], u)
		le.PutUint32(b[20:], n.Ino)
		le.PutUint16(b[24:], uint16(n.UID))
		le.PutUint16(b[26:], uint16(n.GID))
	}
	if len(n.xattrBody) > 0 {
		le.PutUint16(b[2:], uint16((len(n.xattrBody)-xattrIbodyHeaderSize)/xattrEntrySize+1))
		copy(b[n.isize():], n.xattrBody)
	}
	if n.layout == LayoutChunkBased {
		p := alignUp(uint64(n.isize()+len(n.xattrBody)), ChunkIndexSize)
		for _, c := range n.Chunks {
			c.put(b[p:])
			p += ChunkIndexSize
		}
	}
}

package v5

import (
	"bufio"
	"fmt"
	"io"
	"math"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// Limits of the v5 record fields and of what nydus-image accepts.
const (
	maxSymlink    = math.MaxUint16
	maxXattrName  = 255
	maxXattrValue = 0x10000
)

// Write encodes img as a RAFS v5 bootstrap laid out the way nydus-image
// lays it out (builder/src/core/v5.rs): table indexes are assigned root
// first, then each directory's children in name order, then each child
// directory's subtree; records follow in table-index order;
// inode digests are computed as nydusd's digest validation recomputes
// them. An image numbered the way Read numbers inodes reads back equal.
//
// Besides img.Validate, v5 imposes: one compressor and digester for every
// blob; symlink targets of 1..65535 bytes; device numbers that fit 32 bits;
// xattr names of 1..255 bytes without NUL and values up to 64 KiB. Only
// regular files can be hardlinked in v5, so any other inode with several
// names is written as one inode per name (as nydus-image does). Sizes are
// written as given (see PseudoDirSize for nydus-image's directory sizes).
// Per-blob readahead hints, project ids and chunk CRCs are written as zero.
func Write(w io.Writer, img *rafs.Image) error {
	if err := img.Validate(); err != nil {
		return fmt.Errorf("rafs v5: write: %w", err)
	}
	e := encoder{img: img}
	if err := e.plan(); err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, int(min(e.end, 1<<20)))
	if err := e.write(bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("rafs v5: write: %w", err)
	}
	return nil
}

// node is one table index: one name of an inode.
type node struct {
	m          *rafs.Inode
	name       string
	parent     int32  // node of the parent directory, -1 for the root
	ino        uint32 // on-disk inode number
	childIndex uint32 // directories: table index of the first child
	nlink      uint32
	flags      uint64
	xsize      uint64 // xattr pairs' size (without the u64 header)
	offset     uint64 // record offset
	digest     codec.Digest
}

type encoder struct {
	img       *rafs.Image
	nodes     []node
	diskIno   []uint32 // model ino -> on-disk inode number of its first name
	inodes    uint64   // distinct on-disk inodes
	prefetch  []uint32
	blobTable []byte
	flags     uint64
	hdrEnd    uint64 // end of the tables, where records start
	end       uint64
}

func (e *encoder) plan() error {
	img := e.img
	cf, err := compressorFlag(img.Compressor)
	if err != nil {
		return err
	}
	df, err := digesterFlag(img.Digester)
	if err != nil {
		return err
	}
	e.flags = cf | df | FlagExplicitUIDGID
	for k, b := range img.Blobs {
		if b.Compressor != img.Compressor || b.Digester != img.Digester {
			return fmt.Errorf("rafs v5: write: blob %d uses %s/%s but the image %s/%s: v5 has one compressor and digester per image", k, b.Compressor, b.Digester, img.Compressor, img.Digester)
		}
		if b.ChunkSize != 0 && b.ChunkSize != img.ChunkSize {
			return fmt.Errorf("rafs v5: write: blob %d chunk size %d differs from the image's %d", k, b.ChunkSize, img.ChunkSize)
		}
	}
	if err := e.number(); err != nil {
		return err
	}
	for k := range e.nodes {
		if err := e.check(&e.nodes[k]); err != nil {
			return err
		}
	}
	e.digests()
	for _, ino := range img.Prefetch {
		d := e.diskIno[ino]
		if d == 0 {
			return fmt.Errorf("rafs v5: write: prefetch inode %d is not reachable from the root", ino)
		}
		e.prefetch = append(e.prefetch, d)
	}
	e.blobTable = e.encodeBlobTable()
	n := uint64(len(e.nodes))
	e.hdrEnd = SuperblockSize + alignUp(4*n) + alignUp(4*uint64(len(e.prefetch))) +
		uint64(len(e.blobTable)) + extBlobSize*uint64(len(img.Blobs))
	e.layout()
	if e.end > MaxMetadataSize {
		return fmt.Errorf("rafs v5: write: bootstrap of %d bytes exceeds the v5 limit of %d", e.end, int64(MaxMetadataSize))
	}
	return nil
}

// number assigns table indexes the way nydus-image does: a directory's
// children get consecutive indexes when the directory is processed, and
// child directories are processed depth first, in name order.
//
// Indexes are uint32: a model with 2^32 names would not fit in memory,
// and plan then rejects anything beyond v5's 2 GiB (2^24 records).
func (e *encoder) number() error {
	img := e.img
	e.diskIno = make([]uint32, len(img.Inodes)+1)
	e.nodes = append(make([]node, 0, len(img.Inodes)), node{m: img.Root(), name: "/", parent: -1, ino: 1})
	e.diskIno[rafs.RootIno] = 1
	e.inodes = 1
	links := map[uint32]uint32{} // on-disk ino of a hardlinked regular file -> names
	stack := []int32{0}
	for len(stack) > 0 {
		p := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		first := len(e.nodes)
		e.nodes[p].childIndex = uint32(first + 1)
		subdirs := uint32(0)
		for _, ent := range e.nodes[p].m.Entries {
			c := img.Inodes[ent.Ino-1]
			idx := uint32(len(e.nodes) + 1)
			ino := idx
			switch {
			case e.diskIno[c.Ino] == 0:
				e.diskIno[c.Ino] = idx
				e.inodes++
			case c.IsRegular():
				ino = e.diskIno[c.Ino]
				links[ino]++
			default:
				// Not representable as a hardlink in v5: a new inode.
				e.inodes++
			}
			if c.IsDir() {
				subdirs++
			}
			e.nodes = append(e.nodes, node{m: c, name: ent.Name, parent: p, ino: ino})
		}
		e.nodes[p].nlink = 2 + subdirs
		for j := len(e.nodes) - 1; j >= first; j-- {
			if e.nodes[j].m.IsDir() {
				stack = append(stack, int32(j))
			}
		}
	}
	for k := range e.nodes {
		n := &e.nodes[k]
		if !n.m.IsDir() {
			n.nlink = 1 + links[n.ino]
		}
	}
	return nil
}

// check validates what v5 cannot store and sets the record's flags.
func (e *encoder) check(n *node) error {
	m := n.m
	if !validType(m.Mode) {
		return fmt.Errorf("rafs v5: write: inode %d: mode %#o is no file type", m.Ino, m.Mode)
	}
	if m.IsSymlink() {
		if m.Target == "" || len(m.Target) > maxSymlink {
			return fmt.Errorf("rafs v5: write: inode %d: symlink target of %d bytes (want 1..%d)", m.Ino, len(m.Target), maxSymlink)
		}
		n.flags |= inodeFlagSymlink
	}
	if m.Rdev > math.MaxUint32 {
		return fmt.Errorf("rafs v5: write: inode %d: device number %#x does not fit v5's 32 bits", m.Ino, m.Rdev)
	}
	if len(m.Xattrs) > 0 {
		n.flags |= inodeFlagXattr
		e.flags |= FlagHasXattr
		for _, x := range m.Xattrs {
			if x.Name == "" || len(x.Name) > maxXattrName || containsNUL(x.Name) || len(x.Value) > maxXattrValue {
				return fmt.Errorf("rafs v5: write: inode %d: xattr %.40q with a %d-byte value: want a 1..%d byte name without NUL and at most %d bytes", m.Ino, x.Name, len(x.Value), maxXattrName, maxXattrValue)
			}
			n.xsize += 4 + uint64(len(x.Name)) + 1 + uint64(len(x.Value))
		}
	}
	if m.IsRegular() {
		if uint64(len(m.Chunks)) > math.MaxUint32 {
			return fmt.Errorf("rafs v5: write: inode %d: %d chunks", m.Ino, len(m.Chunks))
		}
		if !dense(m, uint64(e.img.ChunkSize)) {
			n.flags |= inodeFlagHasHole
		}
	}
	return nil
}

func containsNUL(s string) bool {
	for k := range len(s) {
		if s[k] == 0 {
			return true
		}
	}
	return false
}

// dense reports whether chunk k of m covers exactly [k*cs, (k+1)*cs) of
// the file, the layout nydus assumes unless an inode is flagged HAS_HOLE.
func dense(m *rafs.Inode, cs uint64) bool {
	if uint64(len(m.Chunks)) != (m.Size+cs-1)/cs {
		return false
	}
	for k, c := range m.Chunks {
		off := uint64(k) * cs
		if c.FileOffset != off || uint64(c.UncompressedSize) != min(cs, m.Size-off) {
			return false
		}
	}
	return true
}

// digests computes nydus's v5 inode digests: a regular file's over its
// chunk digests, a symlink's over its target, a directory's over its
// children's digests in name order, anything else over nothing. Children
// have larger indexes than their parent, so a reverse sweep sees them first.
func (e *encoder) digests() {
	d := e.img.Digester
	var buf []byte
	for k := len(e.nodes) - 1; k >= 0; k-- {
		n := &e.nodes[k]
		m := n.m
		buf = buf[:0]
		switch {
		case m.IsRegular():
			for _, c := range m.Chunks {
				buf = append(buf, c.Digest[:]...)
			}
		case m.IsSymlink():
			buf = append(buf, m.Target...)
		case m.IsDir():
			lo := int(n.childIndex) - 1
			for j := lo; j < lo+len(m.Entries); j++ {
				buf = append(buf, e.nodes[j].digest[:]...)
			}
		}
		n.digest = d.Sum(buf)
	}
}

func (e *encoder) encodeBlobTable() []byte {
	var t []byte
	for k, b := range e.img.Blobs {
		t = le.AppendUint32(t, 0) // readahead offset
		t = le.AppendUint32(t, 0) // readahead size
		t = append(t, b.ID...)
		if k != len(e.img.Blobs)-1 {
			t = append(t, 0)
		}
	}
	return append(t, make([]byte, alignUp(uint64(len(t)))-uint64(len(t)))...)
}

// recordSize is the size of n's record: inode, name, target, xattrs, chunks.
func (n *node) recordSize() uint64 {
	s := inodeSize + alignUp(uint64(len(n.name))) + alignUp(uint64(len(n.m.Target)))
	if n.flags&inodeFlagXattr != 0 {
		s += xattrHeaderSize + alignUp(n.xsize)
	}
	if n.m.IsRegular() {
		s += chunkInfoSize * uint64(len(n.m.Chunks))
	}
	return s
}

// layout places the records in table-index order, as the nydus-image that
// built the reference fixtures wrote them (current nydus-image writes them
// depth first; nydusd finds
// records through the inode table either way, and its cached mode only
// needs parents before children, which both orders give).
func (e *encoder) layout() {
	off := e.hdrEnd
	for k := range e.nodes {
		n := &e.nodes[k]
		n.offset = off
		off += n.recordSize()
	}
	e.end = off
}

func (e *encoder) write(w *bufio.Writer) error {
	img := e.img
	n := uint64(len(e.nodes))
	itOff := uint64(SuperblockSize)
	pfOff := itOff + alignUp(4*n)
	btOff := pfOff + alignUp(4*uint64(len(e.prefetch)))
	extOff := btOff + uint64(len(e.blobTable))
	sb := superblock{
		magic:                Magic,
		version:              Version,
		sbSize:               SuperblockSize,
		blockSize:            img.ChunkSize,
		flags:                e.flags,
		inodesCount:          e.inodes,
		inodeTableOffset:     itOff,
		prefetchTableOffset:  pfOff,
		blobTableOffset:      btOff,
		inodeTableEntries:    uint32(n),
		prefetchTableEntries: uint32(len(e.prefetch)),
		blobTableSize:        uint32(len(e.blobTable)),
		extBlobTableEntries:  uint32(len(img.Blobs)),
		extBlobTableOffset:   extOff,
	}
	buf := make([]byte, SuperblockSize, e.hdrEnd)
	sb.encode(buf)
	// Inode table, prefetch table: u32s padded to 8 bytes.
	for k := range e.nodes {
		buf = le.AppendUint32(buf, uint32(e.nodes[k].offset>>3))
	}
	buf = pad(buf)
	for _, ino := range e.prefetch {
		buf = le.AppendUint32(buf, ino)
	}
	buf = pad(buf)
	buf = append(buf, e.blobTable...)
	for _, b := range img.Blobs {
		var ext [extBlobSize]byte
		le.PutUint32(ext[0:], b.ChunkCount)
		le.PutUint32(ext[4:], b.Features&^blobFeatureNoExtTable)
		le.PutUint64(ext[8:], b.UncompressedSize)
		le.PutUint64(ext[16:], b.CompressedSize)
		buf = append(buf, ext[:]...)
	}
	if uint64(len(buf)) != e.hdrEnd {
		return fmt.Errorf("rafs v5: write: internal error: tables end at %d, planned %d", len(buf), e.hdrEnd)
	}
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("rafs v5: write: %w", err)
	}
	pos := e.hdrEnd
	for k := range e.nodes {
		n := &e.nodes[k]
		if n.offset != pos {
			return fmt.Errorf("rafs v5: write: internal error: record at %d, planned %d", pos, n.offset)
		}
		buf = e.record(buf[:0], n)
		pos += uint64(len(buf))
		if _, err := w.Write(buf); err != nil {
			return fmt.Errorf("rafs v5: write: %w", err)
		}
	}
	return nil
}

func pad(b []byte) []byte {
	for len(b)%align != 0 {
		b = append(b, 0)
	}
	return b
}

func (e *encoder) record(buf []byte, n *node) []byte {
	m := n.m
	in := inode{
		digest:      n.digest,
		ino:         uint64(n.ino),
		uid:         m.UID,
		gid:         m.GID,
		mode:        m.Mode,
		size:        m.Size,
		flags:       n.flags,
		nlink:       n.nlink,
		nameSize:    uint16(len(n.name)),
		symlinkSize: uint16(len(m.Target)),
		rdev:        uint32(m.Rdev),
		mtimeNsec:   m.MtimeNsec,
		mtime:       uint64(m.Mtime),
	}
	if n.parent >= 0 {
		in.parent = uint64(e.nodes[n.parent].ino)
	}
	switch {
	case m.IsDir():
		in.childIndex = n.childIndex
		in.childCount = uint32(len(m.Entries))
	case m.IsRegular():
		in.childCount = uint32(len(m.Chunks))
	}
	// nydus-image counts the xattrs into i_blocks, but nydusd's cached
	// mode rejects a regular file whose i_blocks is not ceil(size/512).
	if m.IsRegular() {
		in.blocks = (in.size + 511) / 512
	} else {
		in.blocks = (in.size + alignUp(n.xsize) + 511) / 512
	}
	start := len(buf)
	buf = append(buf, make([]byte, inodeSize)...)
	in.encode(buf[start:])
	buf = pad(append(buf, n.name...))
	buf = pad(append(buf, m.Target...))
	if n.flags&inodeFlagXattr != 0 {
		buf = le.AppendUint64(buf, n.xsize)
		for _, x := range m.Xattrs {
			buf = le.AppendUint32(buf, uint32(len(x.Name)+1+len(x.Value)))
			buf = append(buf, x.Name...)
			buf = append(buf, 0)
			buf = append(buf, x.Value...)
		}
		buf = pad(buf)
	}
	if m.IsRegular() {
		for _, c := range m.Chunks {
			ci := chunkInfo{
				digest:             c.Digest,
				blobIndex:          c.BlobIndex,
				compressedSize:     c.CompressedSize,
				uncompressedSize:   c.UncompressedSize,
				compressedOffset:   c.CompressedOffset,
				uncompressedOffset: c.UncompressedOffset,
				fileOffset:         c.FileOffset,
				index:              c.Index,
			}
			if c.Compressed {
				ci.flags = chunkFlagCompressed
			}
			k := len(buf)
			buf = append(buf, make([]byte, chunkInfoSize)...)
			ci.encode(buf[k:])
		}
	}
	return buf
}

// PseudoDirSize is the size nydus-image gives a v5 directory, which has no
// on-disk entries to measure: 8 plus the name length per entry, rounded up
// to 4 KiB, and 4 KiB when empty. Builders set it so that images are
// reproducible.
func PseudoDirSize(m *rafs.Inode) uint64 {
	var s uint64
	for _, e := range m.Entries {
		s += uint64(len(e.Name)) + 8
	}
	if s == 0 {
		return 4096
	}
	return (s + 4095) &^ 4095
}

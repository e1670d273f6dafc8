package v5

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"strings"
	"syscall"
	"unsafe"

	"github.com/rafsd/rafsd/rafs"
)

// Read decodes the RAFS v5 bootstrap of size bytes in r.
//
// Inodes are numbered densely in the order nydus-image assigns table
// indexes: the root is 1, then a directory's children in name order, each
// child directory's subtree after all of its siblings have been numbered;
// the names of a hardlinked file share the number of the first. Parent is
// the directory an inode was first found in, Nlink is recounted from the
// tree, and chunks are shared per (blob, chunk index).
//
// Every count, offset and size is checked against the input, so a hostile
// bootstrap yields an error wrapping rafs.ErrInvalid (or ErrNotV5), never a
// panic, a hang or an allocation much larger than size. Inode digests are
// not checked: nydusd checks them only with digest validation enabled, and
// chunk digests are what protect file data.
func Read(r io.ReaderAt, size int64) (*rafs.Image, error) {
	var hdr [8]byte
	if n, err := r.ReadAt(hdr[:], 0); n < len(hdr) {
		if err == nil || err == io.EOF {
			return nil, fmt.Errorf("rafs v5: %d-byte input: %w", n, ErrNotV5)
		}
		return nil, fmt.Errorf("rafs v5: read superblock: %w", err)
	}
	if !IsV5(hdr[:]) {
		return nil, fmt.Errorf("rafs v5: magic %#x version %#x: %w", le.Uint32(hdr[:]), le.Uint32(hdr[4:]), ErrNotV5)
	}
	if size <= SuperblockSize || size > MaxMetadataSize || size%align != 0 {
		return nil, errf("bootstrap size %d (want 8-byte aligned, in (%d, %d])", size, SuperblockSize, int64(MaxMetadataSize))
	}
	buf, err := readAll(r, size)
	if err != nil {
		return nil, err
	}
	d := decoder{buf: buf}
	img, err := d.decode()
	if err != nil {
		return nil, err
	}
	return img, nil
}

// readAll reads size bytes from r. Unless r can tell its own size (files,
// bytes.Reader, io.SectionReader), the buffer grows as bytes arrive, so
// that a size larger than the input costs no more than the input.
func readAll(r io.ReaderAt, size int64) ([]byte, error) {
	initial := min(size, 1<<20)
	if have, ok := sizeOf(r); ok && have >= size {
		initial = size
	}
	buf := make([]byte, 0, initial)
	for int64(len(buf)) < size {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, int(min(size, 2*int64(cap(buf))))-len(buf))
		}
		part := buf[len(buf):min(int64(cap(buf)), size)]
		n, err := r.ReadAt(part, int64(len(buf)))
		buf = buf[:len(buf)+n]
		if n < len(part) {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("rafs v5: read %d-byte bootstrap: got %d bytes: %w", size, len(buf), err)
		}
	}
	return buf, nil
}

func sizeOf(r io.ReaderAt) (int64, bool) {
	switch r := r.(type) {
	case interface{ Size() int64 }:
		return r.Size(), true
	case interface{ Stat() (fs.FileInfo, error) }:
		if fi, err := r.Stat(); err == nil && fi.Mode().IsRegular() {
			return fi.Size(), true
		}
	}
	return 0, false
}

type decoder struct {
	buf []byte
	sb  superblock
	img *rafs.Image

	visits []visit
	// Totals gathered in the first pass size the slabs of the second.
	nameBytes, chunkCount uint64
}

// visit is one inode-table index reached from the root.
type visit struct {
	index      uint32 // inode-table index
	parent     int32  // visit of the parent directory, -1 for the root
	start, end uint32 // extent of the record in the bootstrap
	// For directories: the first child's visit and the child count.
	firstChild, childCount uint32
	isDir                  bool
}

func (d *decoder) decode() (*rafs.Image, error) {
	if err := d.superblock(); err != nil {
		return nil, err
	}
	d.img = &rafs.Image{
		Version:    5,
		ChunkSize:  d.sb.blockSize,
		Compressor: compressorOf(d.sb.flags),
		Digester:   digesterOf(d.sb.flags),
	}
	if err := d.blobs(); err != nil {
		return nil, err
	}
	if err := d.walk(); err != nil {
		return nil, err
	}
	byIno, err := d.inodes()
	if err != nil {
		return nil, err
	}
	if err := d.prefetch(byIno); err != nil {
		return nil, err
	}
	if err := d.img.Validate(); err != nil {
		return nil, fmt.Errorf("rafs v5: %w", err)
	}
	return d.img, nil
}

// metaRange is nydus's MetaRange check: an 8-byte aligned [off, off+n)
// inside the bootstrap after the superblock.
func (d *decoder) metaRange(what string, off, n uint64) error {
	if off%align != 0 || off < SuperblockSize || off > uint64(len(d.buf)) || n > uint64(len(d.buf))-off {
		return errf("%s [%d,+%d) outside the %d-byte bootstrap or misaligned", what, off, n, len(d.buf))
	}
	return nil
}

func overlaps(a0, an, b0, bn uint64) bool { return an > 0 && bn > 0 && a0 < b0+bn && b0 < a0+an }

func (d *decoder) superblock() error {
	sb := &d.sb
	sb.decode(d.buf[:SuperblockSize])
	switch {
	case sb.sbSize != SuperblockSize:
		return errf("superblock size %d", sb.sbSize)
	case !rafs.ValidChunkSize(sb.blockSize):
		return errf("chunk size %#x", sb.blockSize)
	case sb.flags&^knownSuperFlags != 0:
		return errf("unknown superblock flags %#x", sb.flags&^knownSuperFlags)
	case sb.flags&flagEncryptAES128XTS != 0:
		return errf("encrypted images are not supported")
	case sb.inodeTableEntries == 0:
		return errf("empty inode table")
	case sb.inodesCount > uint64(sb.inodeTableEntries):
		return errf("%d inodes but %d inode table entries", sb.inodesCount, sb.inodeTableEntries)
	}
	itSize := uint64(sb.inodeTableEntries) * 4
	if err := d.metaRange("inode table", sb.inodeTableOffset, itSize); err != nil {
		return err
	}
	btSize := uint64(sb.blobTableSize)
	if err := d.metaRange("blob table", sb.blobTableOffset, btSize); err != nil {
		return err
	}
	if overlaps(sb.blobTableOffset, btSize, sb.inodeTableOffset, itSize) {
		return errf("blob table overlaps the inode table")
	}
	extSize := uint64(sb.extBlobTableEntries) * extBlobSize
	if extSize > 0 {
		if err := d.metaRange("extended blob table", sb.extBlobTableOffset, extSize); err != nil {
			return err
		}
		if overlaps(sb.extBlobTableOffset, extSize, sb.inodeTableOffset, itSize) || overlaps(sb.extBlobTableOffset, extSize, sb.blobTableOffset, btSize) {
			return errf("extended blob table overlaps another table")
		}
	}
	pfSize := uint64(sb.prefetchTableEntries) * 4
	if pfSize > 0 {
		if err := d.metaRange("prefetch table", sb.prefetchTableOffset, pfSize); err != nil {
			return err
		}
		if overlaps(sb.prefetchTableOffset, pfSize, sb.inodeTableOffset, itSize) || overlaps(sb.prefetchTableOffset, pfSize, sb.blobTableOffset, btSize) ||
			overlaps(sb.prefetchTableOffset, pfSize, sb.extBlobTableOffset, extSize) {
			return errf("prefetch table overlaps another table")
		}
	}
	return nil
}

// blobs decodes the blob table: per blob a u32 readahead offset and size
// and the blob id, blobs separated by one NUL, the table padded with NULs.
func (d *decoder) blobs() error {
	sb := &d.sb
	var ext []byte
	if sb.extBlobTableEntries > 0 {
		ext = d.buf[sb.extBlobTableOffset : sb.extBlobTableOffset+uint64(sb.extBlobTableEntries)*extBlobSize]
	}
	t := d.buf[sb.blobTableOffset : sb.blobTableOffset+uint64(sb.blobTableSize)]
	for len(t) > 8 {
		id, rest, found := bytes.Cut(t[8:], []byte{0})
		if !found {
			rest = nil
		}
		t = rest
		k := len(d.img.Blobs)
		b := &rafs.Blob{
			ID:         string(id),
			Compressor: d.img.Compressor,
			Digester:   d.img.Digester,
			ChunkSize:  sb.blockSize,
		}
		if len(ext) > 0 {
			// nydus reads the extended table whenever it has entries and
			// then requires one per blob.
			if (k+1)*extBlobSize > len(ext) {
				return errf("blob %d has no extended blob table entry (%d entries)", k, sb.extBlobTableEntries)
			}
			e := ext[k*extBlobSize:]
			b.ChunkCount = le.Uint32(e[0:])
			b.Features = le.Uint32(e[4:]) &^ blobFeatureNoExtTable
			b.UncompressedSize = le.Uint64(e[8:])
			b.CompressedSize = le.Uint64(e[16:])
		}
		if !isText(b.ID) {
			return errf("blob %d: id %q is not valid UTF-8 text", k, b.ID)
		}
		d.img.Blobs = append(d.img.Blobs, b)
	}
	return nil
}

func isText(s string) bool {
	return s != "" && strings.ToValidUTF8(s, "\ufffd") == s
}

// record reads the fixed part of the inode record of table index idx.
func (d *decoder) record(idx uint32) (off uint64, in inode, err error) {
	v := le.Uint32(d.buf[d.sb.inodeTableOffset+uint64(idx-1)*4:])
	if v <= SuperblockSize>>3 || v >= maxTableOffset {
		return 0, in, errf("inode table index %d: offset %#x", idx, uint64(v)<<3)
	}
	off = uint64(v) << 3
	if off+inodeSize > uint64(len(d.buf)) {
		return 0, in, errf("inode table index %d: record at %d past the end of the bootstrap", idx, off)
	}
	in.decode(d.buf[off : off+inodeSize])
	return off, in, nil
}

// layout returns the offsets of the parts of a record at off: the end of
// the name and target, the xattr table (xoff, xsize; xoff == 0 if none),
// the chunk array and the end of the record.
func (d *decoder) layout(off uint64, in *inode) (xoff, xsize, chunks, end uint64, err error) {
	p := off + inodeSize + alignUp(uint64(in.nameSize)) + alignUp(uint64(in.symlinkSize))
	n := uint64(len(d.buf))
	if p > n {
		return 0, 0, 0, 0, errf("inode %d at %d: name/target past the end", in.ino, off)
	}
	if in.flags&inodeFlagXattr != 0 {
		if p+xattrHeaderSize > n {
			return 0, 0, 0, 0, errf("inode %d at %d: xattr table past the end", in.ino, off)
		}
		xsize = le.Uint64(d.buf[p:])
		if xsize > n {
			return 0, 0, 0, 0, errf("inode %d at %d: xattr table of %d bytes", in.ino, off, xsize)
		}
		xoff = p + xattrHeaderSize
		p = xoff + alignUp(xsize)
	}
	chunks = p
	if isReg(in.mode) {
		p += uint64(in.childCount) * chunkInfoSize
	}
	if p > n {
		return 0, 0, 0, 0, errf("inode %d at %d: record of %d bytes past the end of the bootstrap", in.ino, off, p-off)
	}
	return xoff, xsize, chunks, p, nil
}

func isReg(mode uint32) bool { return mode&syscall.S_IFMT == syscall.S_IFREG }
func isDir(mode uint32) bool { return mode&syscall.S_IFMT == syscall.S_IFDIR }
func isLnk(mode uint32) bool { return mode&syscall.S_IFMT == syscall.S_IFLNK }

func validType(mode uint32) bool {
	switch mode & syscall.S_IFMT {
	case syscall.S_IFREG, syscall.S_IFDIR, syscall.S_IFLNK, syscall.S_IFCHR, syscall.S_IFBLK, syscall.S_IFIFO, syscall.S_IFSOCK:
		return true
	}
	return false
}

// walk visits every table index reachable from the root (index 1) through
// directories' child ranges, in nydus-image's numbering order, checking
// that each index is reached once and that records do not overlap. It
// touches only fixed-size headers, so its cost is bounded by the table.
func (d *decoder) walk() error {
	entries := d.sb.inodeTableEntries
	seen := make([]uint64, (uint64(entries)+64)/64)
	mark := func(idx uint32) bool {
		w, bit := idx/64, uint64(1)<<(idx%64)
		was := seen[w]&bit != 0
		seen[w] |= bit
		return was
	}
	add := func(idx uint32, parent int32) error {
		if mark(idx) {
			return errf("inode table index %d is a child of two directories (or a loop)", idx)
		}
		off, in, err := d.record(idx)
		if err != nil {
			return err
		}
		_, _, _, end, err := d.layout(off, &in)
		if err != nil {
			return err
		}
		v := visit{index: idx, parent: parent, start: uint32(off), end: uint32(end), isDir: isDir(in.mode)}
		if v.isDir {
			v.childCount = in.childCount
			if in.childCount > 0 {
				if in.childIndex <= idx || uint64(in.childIndex)+uint64(in.childCount)-1 > uint64(entries) {
					return errf("directory at index %d: children [%d,+%d) outside the %d-entry inode table or not after it", idx, in.childIndex, in.childCount, entries)
				}
				// Child indexes are marked when visited, so firstChild is
				// only known then; keep the table index for now.
				v.firstChild = in.childIndex
			}
		}
		if isReg(in.mode) {
			d.chunkCount += uint64(in.childCount)
		}
		d.nameBytes += uint64(in.nameSize) + uint64(in.symlinkSize)
		d.visits = append(d.visits, v)
		return nil
	}
	// Records are at least inodeSize bytes and disjoint (checked below),
	// so this bounds the visits of any image worth decoding.
	d.visits = make([]visit, 0, min(uint64(entries), uint64(len(d.buf))/inodeSize))
	if err := add(1, -1); err != nil {
		return err
	}
	if !d.visits[0].isDir {
		return errf("root inode is not a directory")
	}
	stack := []int32{0}
	for len(stack) > 0 {
		vi := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		dir := d.visits[vi]
		first := uint32(len(d.visits))
		for k := range dir.childCount {
			if err := add(dir.firstChild+k, vi); err != nil {
				return err
			}
		}
		d.visits[vi].firstChild = first
		for j := len(d.visits) - 1; j >= int(first); j-- {
			if d.visits[j].isDir && d.visits[j].childCount > 0 {
				stack = append(stack, int32(j))
			}
		}
	}
	// Records must be disjoint: otherwise a small hostile bootstrap could
	// make many indexes share one huge chunk array.
	ext := make([][2]uint32, len(d.visits))
	for k, v := range d.visits {
		ext[k] = [2]uint32{v.start, v.end}
	}
	slices.SortFunc(ext, func(a, b [2]uint32) int { return int(int64(a[0]) - int64(b[0])) })
	for k := 1; k < len(ext); k++ {
		if ext[k][0] < ext[k-1][1] {
			return errf("inode records at %d and %d overlap", ext[k-1][0], ext[k][0])
		}
	}
	return nil
}

// chunkIndex finds the one *rafs.Chunk of each (blob, chunk index): a
// dense table per blob when its chunk count is in proportion to the chunk
// infos of the bootstrap (the usual case), a map otherwise (a blob shared
// with other images, or a hostile count).
type chunkIndex struct {
	dense  [][]*rafs.Chunk
	sparse map[uint64]*rafs.Chunk
}

func newChunkIndex(blobs []*rafs.Blob, infos uint64) *chunkIndex {
	x := &chunkIndex{dense: make([][]*rafs.Chunk, len(blobs))}
	budget := 2*infos + 64
	for k, b := range blobs {
		if b.ChunkCount > 0 && uint64(b.ChunkCount) <= budget {
			x.dense[k] = make([]*rafs.Chunk, b.ChunkCount)
			budget -= uint64(b.ChunkCount)
		}
	}
	return x
}

// get returns the chunk (blob, index) if already decoded.
func (x *chunkIndex) get(blob, index uint32) *rafs.Chunk {
	if t := x.dense[blob]; t != nil {
		return t[index] // index < ChunkCount is checked by the caller
	}
	return x.sparse[uint64(blob)<<32|uint64(index)]
}

func (x *chunkIndex) store(blob, index uint32, c *rafs.Chunk) {
	if t := x.dense[blob]; t != nil {
		t[index] = c
		return
	}
	if x.sparse == nil {
		x.sparse = make(map[uint64]*rafs.Chunk)
	}
	x.sparse[uint64(blob)<<32|uint64(index)] = c
}

// inodes builds the model from the visits: one rafs.Inode per distinct
// i_ino, in visit order. It returns the table from on-disk inode number
// to model inode.
func (d *decoder) inodes() ([]*rafs.Inode, error) {
	img := d.img
	nv := len(d.visits)
	slab := make([]rafs.Inode, 0, nv)
	img.Inodes = make([]*rafs.Inode, 0, nv)
	dirents := make([]rafs.Dirent, nv-1)
	model := make([]*rafs.Inode, nv)
	// On-disk inode numbers are at most the table size, itself bounded by
	// the input size.
	byIno := make([]*rafs.Inode, d.sb.inodeTableEntries+1)
	// Names and targets are carved out of one arena: the arena is only
	// appended to within its capacity, so the strings viewing it stay
	// immutable.
	arena := make([]byte, 0, d.nameBytes)
	str := func(b []byte) string {
		if len(b) == 0 {
			return ""
		}
		start := len(arena)
		arena = append(arena, b...)
		return unsafe.String(&arena[start], len(b))
	}
	fileChunks := make([]rafs.FileChunk, 0, d.chunkCount)
	chunkSlab := make([]rafs.Chunk, 0, d.chunkCount)
	chunks := newChunkIndex(img.Blobs, d.chunkCount)

	for vi := range d.visits {
		v := &d.visits[vi]
		off := uint64(v.start)
		var in inode
		in.decode(d.buf[off : off+inodeSize])
		xoff, xsize, coff, _, err := d.layout(off, &in)
		if err != nil {
			return nil, err
		}
		if in.flags&^knownInodeFlags != 0 {
			return nil, errf("inode %d: unknown flags %#x", in.ino, in.flags)
		}
		if in.ino == 0 || in.ino > uint64(d.sb.inodeTableEntries) {
			return nil, errf("inode table index %d: inode number %d outside the %d-entry table", v.index, in.ino, d.sb.inodeTableEntries)
		}
		if in.nameSize == 0 || in.nameSize > maxName+1 {
			return nil, errf("inode %d: name of %d bytes", in.ino, in.nameSize)
		}
		p := off + inodeSize
		nameB := d.buf[p : p+uint64(in.nameSize)]
		p += alignUp(uint64(in.nameSize))
		targetB := d.buf[p : p+uint64(in.symlinkSize)]
		if !validType(in.mode) {
			return nil, errf("inode %d: mode %#o is no file type", in.ino, in.mode)
		}
		if isLnk(in.mode) != (in.symlinkSize > 0) {
			return nil, errf("inode %d: mode %#o with a %d-byte symlink target", in.ino, in.mode, in.symlinkSize)
		}

		var m *rafs.Inode
		if vi > 0 {
			// Dirents are laid out like visits, minus the root.
			dirents[vi-1] = rafs.Dirent{Name: str(nameB)}
			if m = byIno[in.ino]; m != nil {
				// v5 hardlinks are regular files only (nydus-image gives
				// every other inode its own number).
				if !m.IsRegular() || !isReg(in.mode) {
					return nil, errf("inode %d: %q shares the inode number of a %#o inode but v5 hardlinks only regular files", in.ino, nameB, m.Mode&syscall.S_IFMT)
				}
				dirents[vi-1].Ino = m.Ino
				model[vi] = m
				continue
			}
		} else if in.ino != rafs.RootIno {
			return nil, errf("root inode number is %d", in.ino)
		}

		slab = append(slab, rafs.Inode{
			Ino:       uint64(len(slab) + 1),
			Mode:      in.mode,
			UID:       in.uid,
			GID:       in.gid,
			Size:      in.size,
			Mtime:     int64(in.mtime),
			MtimeNsec: in.mtimeNsec,
			Rdev:      uint64(in.rdev),
		})
		m = &slab[len(slab)-1]
		img.Inodes = append(img.Inodes, m)
		byIno[in.ino] = m
		model[vi] = m
		if vi == 0 {
			m.Parent = m.Ino
		} else {
			m.Parent = model[v.parent].Ino
			dirents[vi-1].Ino = m.Ino
		}
		if len(targetB) > 0 {
			m.Target = str(targetB)
		}
		if xoff != 0 {
			if m.Xattrs, err = parseXattrs(d.buf[xoff:xoff+xsize], in.ino); err != nil {
				return nil, err
			}
		}
		if isReg(in.mode) {
			if err := d.fileChunks(m, &in, coff, &fileChunks, &chunkSlab, chunks); err != nil {
				return nil, err
			}
		}
	}
	// Every directory's children are one contiguous run of visits, hence
	// of dirents.
	for vi := range d.visits {
		v := &d.visits[vi]
		if !v.isDir || v.childCount == 0 {
			continue
		}
		m := model[vi]
		lo := v.firstChild - 1
		m.Entries = dirents[lo : lo+v.childCount : lo+v.childCount]
		if !slices.IsSortedFunc(m.Entries, cmpDirent) {
			slices.SortFunc(m.Entries, cmpDirent)
		}
	}
	countLinks(img)
	return byIno, nil
}

func cmpDirent(a, b rafs.Dirent) int { return strings.Compare(a.Name, b.Name) }

// countLinks sets Nlink from the tree: a directory has 2 plus its
// subdirectories, anything else one per name.
func countLinks(img *rafs.Image) {
	for _, i := range img.Inodes {
		if i.IsDir() {
			i.Nlink = 2
		}
	}
	for _, dir := range img.Inodes {
		for _, e := range dir.Entries {
			c := img.Inodes[e.Ino-1]
			if c.IsDir() {
				dir.Nlink++
			} else {
				c.Nlink++
			}
		}
	}
}

// fileChunks decodes the chunk array of regular file m.
func (d *decoder) fileChunks(m *rafs.Inode, in *inode, off uint64, fcs *[]rafs.FileChunk, slab *[]rafs.Chunk, shared *chunkIndex) error {
	n := in.childCount
	if in.flags&inodeFlagHasHole == 0 {
		if want := (in.size + uint64(d.sb.blockSize) - 1) / uint64(d.sb.blockSize); uint64(n) != want {
			return errf("inode %d: %d chunks for %d bytes without holes (want %d)", in.ino, n, in.size, want)
		}
	}
	if n == 0 {
		return nil
	}
	start := len(*fcs)
	var ci chunkInfo
	for k := range n {
		p := off + uint64(k)*chunkInfoSize
		ci.decode(d.buf[p : p+chunkInfoSize])
		if ci.flags&(chunkFlagEncrypted|chunkFlagBatch|chunkFlagHole) != 0 || ci.flags&^0x1f != 0 {
			return errf("inode %d chunk %d: unsupported chunk flags %#x", in.ino, k, ci.flags)
		}
		if int(ci.blobIndex) >= len(d.img.Blobs) {
			return errf("inode %d chunk %d: blob index %d of %d blobs", in.ino, k, ci.blobIndex, len(d.img.Blobs))
		}
		if b := d.img.Blobs[ci.blobIndex]; b.ChunkCount != 0 && ci.index >= b.ChunkCount {
			return errf("inode %d chunk %d: chunk index %d of blob %s's %d chunks", in.ino, k, ci.index, b.ID, b.ChunkCount)
		}
		want := rafs.Chunk{
			Digest:             ci.digest,
			BlobIndex:          ci.blobIndex,
			Index:              ci.index,
			CompressedOffset:   ci.compressedOffset,
			CompressedSize:     ci.compressedSize,
			UncompressedOffset: ci.uncompressedOffset,
			UncompressedSize:   ci.uncompressedSize,
			Compressed:         ci.flags&chunkFlagCompressed != 0,
		}
		c := shared.get(ci.blobIndex, ci.index)
		if c == nil {
			*slab = append(*slab, want)
			c = &(*slab)[len(*slab)-1]
			shared.store(ci.blobIndex, ci.index, c)
		} else if *c != want {
			return errf("inode %d chunk %d: blob %d chunk %d described two different ways", in.ino, k, ci.blobIndex, ci.index)
		}
		*fcs = append(*fcs, rafs.FileChunk{FileOffset: ci.fileOffset, Chunk: c})
	}
	m.Chunks = (*fcs)[start:len(*fcs):len(*fcs)]
	return nil
}

// parseXattrs decodes an xattr table: per pair a u32 pair size, then the
// name, a NUL and the value.
func parseXattrs(b []byte, ino uint64) ([]rafs.Xattr, error) {
	var out []rafs.Xattr
	for len(b) > 0 {
		if len(b) < 4 {
			return nil, errf("inode %d: truncated xattr pair", ino)
		}
		n := uint64(le.Uint32(b))
		b = b[4:]
		if n > uint64(len(b)) {
			return nil, errf("inode %d: xattr pair of %d bytes in %d", ino, n, len(b))
		}
		name, value, ok := bytes.Cut(b[:n], []byte{0})
		if !ok || len(name) == 0 || len(name) > maxXattrName || len(value) > maxXattrValue {
			return nil, errf("inode %d: malformed xattr pair (name of %d bytes, value of %d)", ino, len(name), len(value))
		}
		out = append(out, rafs.Xattr{Name: string(name), Value: bytes.Clone(value)})
		b = b[n:]
	}
	return out, nil
}

// prefetch decodes the prefetch table: on-disk inode numbers, ended by 0
// or the table's end.
func (d *decoder) prefetch(byIno []*rafs.Inode) error {
	off := d.sb.prefetchTableOffset
	for k := range uint64(d.sb.prefetchTableEntries) {
		ino := uint64(le.Uint32(d.buf[off+4*k:]))
		if ino == 0 {
			break
		}
		var m *rafs.Inode
		if ino < uint64(len(byIno)) {
			m = byIno[ino]
		}
		if m == nil {
			return errf("prefetch table entry %d: inode %d is not in the tree", k, ino)
		}
		d.img.Prefetch = append(d.img.Prefetch, m.Ino)
	}
	return nil
}

package v6

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"

	"github.com/rafsd/rafsd/erofs"
	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// ErrUnsupported is wrapped by errors about valid nydus features this
// package does not implement (tarfs mode, encryption, batch chunks, nydus 2.1 zran blobs).
var ErrUnsupported = errors.New("rafs v6: unsupported feature")

// maxInMemory bounds the bootstraps Read loads whole; larger ones are
// read piecewise through r.
const maxInMemory = 256 << 20

func invalid(f string, a ...any) error {
	return fmt.Errorf("rafs v6: %w: %s", rafs.ErrInvalid, fmt.Sprintf(f, a...))
}

// Read decodes the RAFS v6 bootstrap r of size bytes. Inodes are numbered
// by the on-disk i_ino when those are exactly 1..n with the root at 1 (as
// nydus-image and Write produce), otherwise depth-first in name order.
// Every offset, size and reference is checked; a hostile bootstrap yields
// an error wrapping rafs.ErrInvalid (or ErrUnsupported), never a panic.
func Read(r io.ReaderAt, size int64) (*rafs.Image, error) {
	if size < erofs.BlockSize {
		return nil, invalid("bootstrap of %d bytes", size)
	}
	if size <= maxInMemory {
		buf := make([]byte, size)
		if n, err := r.ReadAt(buf, 0); n < len(buf) {
			return nil, fmt.Errorf("rafs v6: read bootstrap: %w", errOr(err, io.ErrUnexpectedEOF))
		}
		r = bytes.NewReader(buf)
	}
	rd, err := erofs.Open(r, size)
	if err != nil {
		return nil, wrapErofs(err)
	}
	d := &decoder{rd: rd, size: uint64(size)}
	img, err := d.decode()
	if err != nil {
		return nil, wrapErofs(err)
	}
	if err := img.Validate(); err != nil {
		return nil, fmt.Errorf("rafs v6: %w", err)
	}
	return img, nil
}

func errOr(err, def error) error {
	if err == nil || err == io.EOF {
		return def
	}
	return err
}

// wrapErofs makes erofs format errors also match rafs.ErrInvalid.
func wrapErofs(err error) error {
	if errors.Is(err, erofs.ErrFormat) && !errors.Is(err, rafs.ErrInvalid) {
		return fmt.Errorf("rafs v6: %w: %w", rafs.ErrInvalid, err)
	}
	if errors.Is(err, erofs.ErrUnsupported) && !errors.Is(err, ErrUnsupported) {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	return err
}

type decoder struct {
	rd     *erofs.Reader
	size   uint64
	img    *rafs.Image
	chunks map[chunkKey]*rafs.Chunk
	// traversal state
	nodes    []*node
	byNid    map[uint64]*node
	dirBytes uint64
}

type node struct {
	in      *erofs.Inode
	parent  *node
	ents    []erofs.Dirent
	ino     uint64
	dfsRank int
}

func (d *decoder) decode() (*rafs.Image, error) {
	sb := d.rd.SuperBlock()
	if sb.FeatureCompat&erofs.FeatureCompatRafsV6 == 0 {
		return nil, invalid("EROFS image without the RAFS v6 feature")
	}
	extb := make([]byte, ExtSuperBlockSize)
	if err := d.rd.ReadRaw(extb, ExtSuperBlockOffset); err != nil {
		return nil, err
	}
	var ext extSuperBlock
	ext.unmarshal(extb)
	if ext.Flags&FlagTarfsMode != 0 {
		return nil, fmt.Errorf("%w: tarfs mode", ErrUnsupported)
	}
	if ext.Flags&FlagEncryptionAES != 0 {
		return nil, fmt.Errorf("%w: encrypted image", ErrUnsupported)
	}
	img := &rafs.Image{Version: 6, ChunkSize: ext.ChunkSize}
	d.img = img
	var err error
	if img.Compressor, err = oneFlag(ext.Flags, compressorFlags); err != nil {
		return nil, invalid("compression flags %#x: %v", ext.Flags, err)
	}
	if img.Digester, err = oneFlag(ext.Flags, digesterFlags); err != nil {
		return nil, invalid("digest flags %#x: %v", ext.Flags, err)
	}
	if !rafs.ValidChunkSize(ext.ChunkSize) {
		return nil, invalid("chunk size %#x", ext.ChunkSize)
	}
	if err := d.readBlobs(&ext); err != nil {
		return nil, err
	}
	if err := d.readChunks(&ext); err != nil {
		return nil, err
	}
	if err := d.walk(); err != nil {
		return nil, err
	}
	if err := d.buildInodes(); err != nil {
		return nil, err
	}
	if err := d.readPrefetch(&ext); err != nil {
		return nil, err
	}
	return img, nil
}

func oneFlag[T comparable](flags uint64, m map[T]uint64) (T, error) {
	var found T
	n := 0
	for v, f := range m {
		if flags&f != 0 {
			found = v
			n++
		}
	}
	if n != 1 {
		return found, fmt.Errorf("%d algorithms set", n)
	}
	return found, nil
}

// table checks that [off, off+size) is a table inside the bootstrap, past
// block 0.
func (d *decoder) table(what string, off, size, unit uint64) error {
	if size%unit != 0 || off < erofs.BlockSize || off > d.size || size > d.size-off {
		return invalid("%s at %#x size %#x", what, off, size)
	}
	return nil
}

func (d *decoder) readBlobs(ext *extSuperBlock) error {
	off, size := ext.BlobTableOffset, uint64(ext.BlobTableSize)
	if size == 0 {
		off = erofs.BlockSize // nydus leaves the offset of an empty table unset
	}
	if err := d.table("blob table", off, size, BlobEntrySize); err != nil {
		return err
	}
	n := size / BlobEntrySize
	if n > MaxBlobs {
		return invalid("%d blobs", n)
	}
	buf := make([]byte, size)
	if err := d.rd.ReadRaw(buf, int64(off)); err != nil {
		return err
	}
	devs := d.rd.Devices()
	if len(devs) != 0 && len(devs) != int(n) {
		return invalid("%d devices for %d blobs", len(devs), n)
	}
	for i := range int(n) {
		var e blobEntry
		e.unmarshal(buf[i*BlobEntrySize:])
		b := &rafs.Blob{
			ID: e.ID, Compressor: codec.Compressor(e.Compressor), Digester: codec.Digester(e.Digester),
			ChunkSize: e.ChunkSize, ChunkCount: e.ChunkCount,
			CompressedSize: e.CompressedSize, UncompressedSize: e.UncompressedSize, Features: e.Features,
			Meta: rafs.BlobMeta{
				Compressor: codec.Compressor(e.CICompressor), Offset: e.CIOffset,
				CompressedSize: e.CICompressedSize, UncompressedSize: e.CIUncompressedSize,
				TOCSize: e.TOCSize, TOCDigest: e.TOCDigest, Digest: e.MetaDigest, Size: e.MetaSize,
			},
		}
		switch {
		case e.Index != uint32(i):
			return invalid("blob %d has index %d", i, e.Index)
		case e.ID == "":
			return invalid("blob %d has no id", i)
		case !b.Compressor.Valid() || !b.Digester.Valid():
			return invalid("blob %s: compressor %d, digester %d", e.ID, e.Compressor, e.Digester)
		case e.CipherAlgo != 0 || e.Features&BlobFeatureEncrypted != 0:
			return fmt.Errorf("%w: blob %s is encrypted", ErrUnsupported, e.ID)
		case e.Features&BlobFeatureBatch != 0:
			return fmt.Errorf("%w: blob %s has features %#x (batch chunks)", ErrUnsupported, e.ID, e.Features)
		case e.Features&BlobFeatureZran != 0 && e.Features&BlobFeatureSeparate == 0:
			// nydus 2.1's zran blobs kept their blob meta in the bootstrap's
			// own blob (inlined fs meta), named by the bootstrap's file name.
			return fmt.Errorf("%w: zran blob %s has features %#x (blob meta not in a separate blob)", ErrUnsupported, e.ID, e.Features)
		case e.UncompressedSize > 1<<44 || e.CompressedSize > 1<<40:
			return invalid("blob %s: sizes %d/%d", e.ID, e.CompressedSize, e.UncompressedSize)
		}
		if len(devs) > 0 && devs[i].Tag != e.ID {
			return invalid("device %d is %q but blob %d is %q", i, devs[i].Tag, i, e.ID)
		}
		d.img.Blobs = append(d.img.Blobs, b)
	}
	return nil
}

func (d *decoder) readChunks(ext *extSuperBlock) error {
	d.chunks = map[chunkKey]*rafs.Chunk{}
	if ext.ChunkTableSize == 0 {
		return nil
	}
	if err := d.table("chunk table", ext.ChunkTableOffset, ext.ChunkTableSize, ChunkInfoSize); err != nil {
		return err
	}
	// Sized once (the table lies within the bootstrap, checked above):
	// a 100k-chunk map grown entry by entry rehashes ~17 times.
	d.chunks = make(map[chunkKey]*rafs.Chunk, ext.ChunkTableSize/ChunkInfoSize)
	buf := make([]byte, ext.ChunkTableSize)
	if err := d.rd.ReadRaw(buf, int64(ext.ChunkTableOffset)); err != nil {
		return err
	}
	for p := 0; p < len(buf); p += ChunkInfoSize {
		var ci chunkInfo
		ci.get(buf[p:])
		if int(ci.BlobIndex) >= len(d.img.Blobs) {
			return invalid("chunk record %d: blob index %d of %d", p/ChunkInfoSize, ci.BlobIndex, len(d.img.Blobs))
		}
		if ci.Flags&(ChunkFlagEncrypted|ChunkFlagBatch) != 0 {
			return fmt.Errorf("%w: chunk flags %#x", ErrUnsupported, ci.Flags)
		}
		if ci.UncompressedOffset/erofs.BlockSize > math.MaxUint32 {
			return invalid("chunk record %d: uncompressed offset %#x", p/ChunkInfoSize, ci.UncompressedOffset)
		}
		k := chunkKey{blob: ci.BlobIndex, ciIndex: ci.Index & 0xFFFFFF, blkAddr: uint32(ci.UncompressedOffset / erofs.BlockSize)}
		if _, dup := d.chunks[k]; dup {
			continue // nydusd's chunk map keeps one record per address too
		}
		d.chunks[k] = &rafs.Chunk{
			Digest: ci.Digest, BlobIndex: ci.BlobIndex, Index: ci.Index,
			CompressedOffset: ci.CompressedOffset, CompressedSize: ci.CompressedSize,
			UncompressedOffset: ci.UncompressedOffset, UncompressedSize: ci.UncompressedSize,
			Compressed: ci.Flags&ChunkFlagCompressed != 0,
		}
	}
	return nil
}

// walk discovers every inode reachable from the root, depth-first in name
// order, and reads each directory once.
func (d *decoder) walk() error {
	// The superblock's inode count is a hint only: a hostile one is
	// bounded by what the bootstrap can hold, and beyond a million the
	// map grows as inodes are found.
	hint := min(d.rd.SuperBlock().Inos, d.size/erofs.SlotSize, 1<<20)
	d.byNid = make(map[uint64]*node, hint)
	d.nodes = make([]*node, 0, hint)
	root, err := d.visit(d.rd.RootNid(), nil)
	if err != nil {
		return err
	}
	if !root.in.IsDir() {
		return invalid("root nid %d is not a directory", root.in.Nid)
	}
	root.parent = root
	// An explicit stack: hostile images may nest directories deeply.
	type frame struct {
		n *node
		i int
	}
	stack := []frame{{n: root}}
	for len(stack) > 0 {
		f := &stack[len(stack)-1]
		if f.i >= len(f.n.ents) {
			stack = stack[:len(stack)-1]
			continue
		}
		e := f.n.ents[f.i]
		f.i++
		if e.Name == "." || e.Name == ".." {
			continue
		}
		if c, ok := d.byNid[e.Nid]; ok {
			if c.in.IsDir() {
				return invalid("directory nid %d reached twice (loop or directory hardlink) via %q", e.Nid, e.Name)
			}
			continue
		}
		c, err := d.visit(e.Nid, f.n)
		if err != nil {
			return fmt.Errorf("entry %q: %w", e.Name, err)
		}
		if c.in.IsDir() {
			stack = append(stack, frame{n: c})
		}
	}
	return nil
}

func (d *decoder) visit(nid uint64, parent *node) (*node, error) {
	in, err := d.rd.Inode(nid)
	if err != nil {
		return nil, err
	}
	n := &node{in: in, parent: parent, dfsRank: len(d.nodes)}
	d.nodes = append(d.nodes, n)
	d.byNid[nid] = n
	if in.IsDir() {
		// Directories of a sane image never share blocks: bounding their
		// sum keeps aliasing directories from costing quadratic time.
		if d.dirBytes += in.Size; d.dirBytes > d.size {
			return nil, invalid("directories hold more bytes than the bootstrap")
		}
		if n.ents, err = d.rd.ReadDir(in); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// number assigns inode numbers: the on-disk ones if they are a dense
// permutation with the root first, else discovery order.
func (d *decoder) number() {
	n := uint64(len(d.nodes))
	used := make([]bool, n+1)
	ok := d.nodes[0].in.Ino == rafs.RootIno
	for _, nd := range d.nodes {
		i := uint64(nd.in.Ino)
		if !ok || i == 0 || i > n || used[i] {
			ok = false
			break
		}
		used[i] = true
	}
	for k, nd := range d.nodes {
		if ok {
			nd.ino = uint64(nd.in.Ino)
		} else {
			nd.ino = uint64(k + 1)
		}
	}
}

func (d *decoder) buildInodes() error {
	d.number()
	img := d.img
	img.Inodes = make([]*rafs.Inode, len(d.nodes))
	for _, nd := range d.nodes {
		in := nd.in
		if in.Mtime > math.MaxInt64 {
			return invalid("nid %d: mtime %d", in.Nid, in.Mtime)
		}
		ri := &rafs.Inode{
			Ino: nd.ino, Parent: nd.parent.ino, Mode: in.Mode, UID: in.UID, GID: in.GID, Size: in.Size,
			Mtime: int64(in.Mtime), MtimeNsec: in.MtimeNsec, Nlink: in.Nlink, Rdev: in.Rdev(),
		}
		xs, err := d.rd.Xattrs(in)
		if err != nil {
			return err
		}
		for _, x := range xs {
			ri.Xattrs = append(ri.Xattrs, rafs.Xattr{Name: x.Name, Value: x.Value})
		}
		switch {
		case in.IsDir():
			if len(nd.ents) > 2 {
				ri.Entries = make([]rafs.Dirent, 0, len(nd.ents)-2)
			}
			for _, e := range nd.ents {
				if e.Name == "." || e.Name == ".." {
					continue
				}
				ri.Entries = append(ri.Entries, rafs.Dirent{Name: e.Name, Ino: d.byNid[e.Nid].ino})
			}
		case in.IsSymlink():
			if ri.Target, err = d.rd.Readlink(in); err != nil {
				return err
			}
		case in.IsRegular():
			if ri.Chunks, err = d.fileChunks(in); err != nil {
				return err
			}
		}
		img.Inodes[nd.ino-1] = ri
	}
	return nil
}

func (d *decoder) fileChunks(in *erofs.Inode) ([]rafs.FileChunk, error) {
	if in.Size == 0 {
		return nil, nil
	}
	if in.Layout != erofs.LayoutChunkBased {
		return nil, fmt.Errorf("%w: nid %d: regular file with data layout %d", ErrUnsupported, in.Nid, in.Layout)
	}
	cs := uint64(d.img.ChunkSize)
	n := (in.Size + cs - 1) / cs
	// nydus-image writes one index per image chunk whatever the inode's
	// own chunk size says (it may claim the whole file is one chunk when
	// its chunks are contiguous, for the kernel's benefit).
	if in.ChunkBits() < uint(bits.TrailingZeros64(cs)) {
		return nil, invalid("nid %d: chunk size 2^%d smaller than the image's %d", in.Nid, in.ChunkBits(), cs)
	}
	if n > d.size/erofs.ChunkIndexSize {
		return nil, invalid("nid %d: %d chunks", in.Nid, n)
	}
	idx, err := d.rd.ChunkIndexes(in, int(n))
	if err != nil {
		return nil, err
	}
	out := make([]rafs.FileChunk, 0, len(idx))
	for k, ci := range idx {
		if ci.BlkAddr == erofs.NullAddr {
			continue // a hole
		}
		key, err := keyOfIndex(ci)
		if err != nil {
			return nil, invalid("nid %d chunk %d: %v", in.Nid, k, err)
		}
		c := d.chunks[key]
		if c == nil {
			return nil, invalid("nid %d chunk %d: no chunk record for blob %d index %d block %d", in.Nid, k, key.blob, key.ciIndex, key.blkAddr)
		}
		out = append(out, rafs.FileChunk{FileOffset: uint64(k) * cs, Chunk: c})
	}
	if len(out) == 0 {
		return nil, nil // all holes
	}
	return out, nil
}

func (d *decoder) readPrefetch(ext *extSuperBlock) error {
	if ext.PrefetchTableSize == 0 || ext.PrefetchTableOffset == 0 {
		return nil
	}
	off, size := ext.PrefetchTableOffset, uint64(ext.PrefetchTableSize)
	if err := d.table("prefetch table", off, size, 4); err != nil {
		return err
	}
	buf := make([]byte, size)
	if err := d.rd.ReadRaw(buf, int64(off)); err != nil {
		return err
	}
	for p := 0; p < len(buf); p += 4 {
		nid := uint64(buf[p]) | uint64(buf[p+1])<<8 | uint64(buf[p+2])<<16 | uint64(buf[p+3])<<24
		if nid == 0 {
			continue // unused slot: nydus sizes the table by rules, not matches
		}
		nd := d.byNid[nid]
		if nd == nil {
			return invalid("prefetch table names nid %d, which is not in the tree", nid)
		}
		d.img.Prefetch = append(d.img.Prefetch, nd.ino)
	}
	return nil
}

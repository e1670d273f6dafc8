package v6

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"
	"strings"

	"github.com/rafsd/rafsd/erofs"
	"github.com/rafsd/rafsd/rafs"
)

// Write encodes img as a RAFS v6 bootstrap. Files must follow the chunk
// layout RAFS v6 can express: chunks start at multiples of the image chunk
// size, each is a full chunk except a file's last, and chunks' uncompressed
// offsets are 4 KiB aligned (the blob is the EROFS device the kernel reads
// at those offsets). Missing chunks are holes (EROFS null addresses: the
// kernel reads zeros; nydusd rejects them, so builders store zero chunks).
// The blobs' Features and Meta are written as given: nydusd wants
// BlobFeatureAligned and a chunk-info table described by Meta.
func Write(w io.Writer, img *rafs.Image) error {
	b, err := encode(img)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("rafs v6: write bootstrap: %w", err)
	}
	return nil
}

func encode(img *rafs.Image) ([]byte, error) {
	if err := img.Validate(); err != nil {
		return nil, fmt.Errorf("rafs v6: %w", err)
	}
	if len(img.Blobs) > MaxBlobs {
		return nil, fmt.Errorf("rafs v6: %d blobs, at most %d", len(img.Blobs), MaxBlobs)
	}
	cf, ok1 := compressorFlags[img.Compressor]
	df, ok2 := digesterFlags[img.Digester]
	if !ok1 || !ok2 {
		return nil, fmt.Errorf("rafs v6: compressor %s / digester %s", img.Compressor, img.Digester)
	}
	ext := extSuperBlock{Flags: cf | df | FlagExplicitUIDGID | FlagEncryptionNone, ChunkSize: img.ChunkSize}
	if img.HasXattrs() {
		ext.Flags |= FlagHasXattr
	}
	inlined := len(img.Blobs) > 0
	devices := make([]erofs.Device, len(img.Blobs))
	for i, b := range img.Blobs {
		if len(b.ID) > BlobIDLen {
			return nil, fmt.Errorf("rafs v6: blob id %q longer than %d bytes", b.ID, BlobIDLen)
		}
		if b.Features&BlobFeatureInlinedChunkDigest == 0 {
			inlined = false
		}
		blocks := (b.UncompressedSize + erofs.BlockSize - 1) / erofs.BlockSize
		if blocks > 0xFFFFFFFF {
			return nil, fmt.Errorf("rafs v6: blob %s: %d bytes", b.ID, b.UncompressedSize)
		}
		devices[i] = erofs.Device{Tag: b.ID, Blocks: uint32(max(blocks, 1))}
	}
	if inlined {
		ext.Flags |= FlagInlinedChunkDigest
	}

	// Chunk table, one record per distinct chunk address, in first-use order.
	var table []chunkInfo
	keys := map[chunkKey]*rafs.Chunk{}
	nodes := make([]*erofs.Node, len(img.Inodes))
	for k, in := range img.Inodes {
		n, err := toNode(img, in, keys, &table)
		if err != nil {
			return nil, fmt.Errorf("rafs v6: inode %d: %w", in.Ino, err)
		}
		nodes[k] = n
	}
	for k, in := range img.Inodes {
		for _, e := range in.Entries {
			nodes[k].Entries = append(nodes[k].Entries, erofs.Entry{Name: e.Name, Node: nodes[e.Ino-1]})
		}
	}

	blobOff := alignUp(DevTableOffset+uint64(len(devices))*erofs.DeviceSlotSize, erofs.BlockSize)
	blobSize := uint64(len(img.Blobs)) * BlobEntrySize
	prefOff, prefSize := blobOff+blobSize, uint64(len(img.Prefetch))*4
	meta := alignUp(prefOff+prefSize, erofs.BlockSize)
	buf, err := erofs.Build(nodes[rafs.RootIno-1], erofs.Options{
		FeatureCompat:   erofs.FeatureCompatRafsV6,
		FeatureIncompat: erofs.FeatureIncompatChunked | erofs.FeatureIncompatDevTable,
		Devices:         devices,
		DevTableOffset:  DevTableOffset,
		MetaOffset:      meta,
	})
	if err != nil {
		return nil, fmt.Errorf("rafs v6: %w", err)
	}

	ext.BlobTableOffset, ext.BlobTableSize = blobOff, uint32(blobSize)
	for i, b := range img.Blobs {
		e := blobEntry{
			ID: b.ID, Index: uint32(i), ChunkSize: b.ChunkSize, ChunkCount: b.ChunkCount,
			Compressor: uint32(b.Compressor), Digester: uint32(b.Digester), Features: b.Features,
			CompressedSize: b.CompressedSize, UncompressedSize: b.UncompressedSize,
			TOCSize: b.Meta.TOCSize, CICompressor: uint32(b.Meta.Compressor), CIOffset: b.Meta.Offset,
			CICompressedSize: b.Meta.CompressedSize, CIUncompressedSize: b.Meta.UncompressedSize,
			TOCDigest: b.Meta.TOCDigest, MetaDigest: b.Meta.Digest, MetaSize: b.Meta.Size,
		}
		if e.ChunkSize == 0 {
			e.ChunkSize = img.ChunkSize
		}
		copy(buf[blobOff+uint64(i)*BlobEntrySize:], e.marshal())
	}
	if prefSize > 0 {
		ext.PrefetchTableOffset, ext.PrefetchTableSize = prefOff, uint32(prefSize)
		for i, ino := range img.Prefetch {
			nid := nodes[ino-1].Nid
			if nid > 0xFFFFFFFF {
				return nil, fmt.Errorf("rafs v6: prefetch inode %d at nid %d", ino, nid)
			}
			binary.LittleEndian.PutUint32(buf[prefOff+uint64(i)*4:], uint32(nid))
		}
	}

	// The chunk table follows the metadata (Build returns whole blocks).
	ext.ChunkTableOffset = uint64(len(buf))
	ext.ChunkTableSize = uint64(len(table)) * ChunkInfoSize
	ct := make([]byte, alignUp(ext.ChunkTableSize, erofs.BlockSize))
	for i := range table {
		table[i].put(ct[i*ChunkInfoSize:])
	}
	buf = append(buf, ct...)

	// Devices are mapped after the bootstrap, each at a 512 KiB boundary,
	// as nydus-image does for flat (fscache) address spaces.
	pos := uint64(len(buf))
	var total uint32
	for i := range devices {
		addr := alignUp(pos, mappedAlign) / erofs.BlockSize
		if addr+uint64(devices[i].Blocks) > 0xFFFFFFFF {
			return nil, fmt.Errorf("rafs v6: too many data blocks")
		}
		devices[i].MappedBlkAddr = uint32(addr)
		pos = (addr + uint64(devices[i].Blocks)) * erofs.BlockSize
		total += devices[i].Blocks
		db, err := devices[i].MarshalBinary()
		if err != nil {
			return nil, err
		}
		copy(buf[DevTableOffset+i*erofs.DeviceSlotSize:], db)
	}
	var sb erofs.SuperBlock
	if err := sb.UnmarshalBinary(buf[erofs.SuperBlockOffset:]); err != nil {
		return nil, err
	}
	sb.Blocks = total
	sbb, _ := sb.MarshalBinary()
	copy(buf[erofs.SuperBlockOffset:], sbb)
	copy(buf[ExtSuperBlockOffset:], ext.marshal())
	return buf, nil
}

// toNode converts one inode, adding its chunks to the chunk table.
func toNode(img *rafs.Image, in *rafs.Inode, keys map[chunkKey]*rafs.Chunk, table *[]chunkInfo) (*erofs.Node, error) {
	if in.Ino > 0xFFFFFFFF {
		return nil, fmt.Errorf("inode number does not fit in 32 bits")
	}
	n := &erofs.Node{
		Mode: in.Mode, UID: in.UID, GID: in.GID, Mtime: uint64(in.Mtime), MtimeNsec: in.MtimeNsec,
		Nlink: in.Nlink, Ino: uint32(in.Ino), Rdev: in.Rdev, Target: in.Target,
	}
	for _, x := range in.Xattrs {
		if strings.HasPrefix(x.Name, "lustre.") {
			return nil, fmt.Errorf("xattr %q: RAFS has no lustre namespace", x.Name)
		}
		n.Xattrs = append(n.Xattrs, erofs.Xattr{Name: x.Name, Value: x.Value})
	}
	if !in.IsRegular() {
		return n, nil
	}
	cs := uint64(img.ChunkSize)
	slots := (in.Size + cs - 1) / cs
	if slots > 1<<32 {
		return nil, fmt.Errorf("%d chunks", slots)
	}
	n.Size = in.Size
	n.ChunkBits = uint8(bits.TrailingZeros64(cs))
	n.Chunks = make([]erofs.ChunkIndex, slots)
	for k := range n.Chunks {
		n.Chunks[k].BlkAddr = erofs.NullAddr
	}
	contiguous := len(in.Chunks) == int(slots) && in.Size > cs
	for k, fc := range in.Chunks {
		c := fc.Chunk
		if fc.FileOffset%cs != 0 {
			return nil, fmt.Errorf("chunk at file offset %d, not a multiple of the chunk size %d", fc.FileOffset, cs)
		}
		if want := min(cs, in.Size-fc.FileOffset); uint64(c.UncompressedSize) != want {
			return nil, fmt.Errorf("chunk at %d holds %d bytes, want %d (RAFS v6 chunks are whole but for a file's last)", fc.FileOffset, c.UncompressedSize, want)
		}
		if c.UncompressedOffset%erofs.BlockSize != 0 || c.UncompressedOffset/erofs.BlockSize >= erofs.NullAddr {
			return nil, fmt.Errorf("chunk at %d: uncompressed offset %#x is not 4 KiB aligned or too large", fc.FileOffset, c.UncompressedOffset)
		}
		if c.Index > 0xFFFFFF {
			return nil, fmt.Errorf("chunk index %d does not fit in 24 bits", c.Index)
		}
		key := chunkKey{blob: c.BlobIndex, ciIndex: c.Index, blkAddr: uint32(c.UncompressedOffset / erofs.BlockSize)}
		if prev, ok := keys[key]; !ok {
			keys[key] = c
			ci := chunkInfo{
				Digest: c.Digest, BlobIndex: c.BlobIndex, CompressedSize: c.CompressedSize,
				UncompressedSize: c.UncompressedSize, CompressedOffset: c.CompressedOffset,
				UncompressedOffset: c.UncompressedOffset, FileOffset: fc.FileOffset, Index: c.Index,
			}
			if c.Compressed {
				ci.Flags |= ChunkFlagCompressed
			}
			*table = append(*table, ci)
		} else if prev != c && *prev != *c {
			return nil, fmt.Errorf("two different chunks at blob %d index %d offset %#x", c.BlobIndex, c.Index, c.UncompressedOffset)
		}
		n.Chunks[fc.FileOffset/cs] = chunkIndexEntry(key)
		if k > 0 {
			p := in.Chunks[k-1].Chunk
			if p.BlobIndex != c.BlobIndex || p.UncompressedOffset+cs != c.UncompressedOffset {
				contiguous = false
			}
		}
	}
	// Like nydus-image: when a file's chunks are contiguous in its blob,
	// tell the kernel it is one chunk so it maps the file in one extent.
	if contiguous {
		n.ChunkBits = uint8(bits.Len64(in.Size - 1))
		if n.ChunkBits > erofs.BlockBits+0x1F {
			n.ChunkBits = uint8(bits.TrailingZeros64(cs))
		}
	}
	return n, nil
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

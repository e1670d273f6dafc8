package zran

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"

	"golang.org/x/sync/errgroup"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/codec"
)

// nydus keeps a zran blob's contexts in its blob meta (the ci table),
// after the chunk entries (storage/src/meta/mod.rs, "blob compression
// context table": chunk info v2 entries | ZRan context table | ZRan
// dictionary table), located by the header's ci_zran_offset, ci_zran_size
// and ci_zran_count:
//
//	contexts count x 40 bytes, ZranInflateContext (storage/src/meta/zran.rs,
//	         repr(C, packed)): in_offset u64 @0, out_offset u64 @8,
//	         dict_offset u64 @16 (into the dictionary table), in_len u32 @24,
//	         out_len u32 @28, dict_size u32 @32, ctx_byte u8 @36,
//	         ctx_bits u8 @37, 2 reserved bytes
//	dicts    the dictionaries, back to back in context order
//	         (ZranContextGenerator::to_vec)
//
// Each zran chunk's v2 entry has flag 0x02 and its context index in the
// high and its offset in that context's output in the low 32 bits of the
// misc word (chunk_info_v2.rs).

// maxContextOut bounds a context's output: nydusd inflates a context
// whole into a buffer of at most RAFS_MAX_CHUNK_SIZE (cache/mod.rs
// decompress_zran).
const maxContextOut = rafs.MaxChunkSize

// EncodeContexts encodes cs as nydus's ZRan context and dictionary tables
// (ZranContextGenerator::to_vec). Head bytes are not part of the format.
func EncodeContexts(cs []rafs.ZranContext) []byte {
	n := len(cs) * blobmeta.ZranContextSize
	for _, c := range cs {
		n += len(c.Dict)
	}
	b := make([]byte, len(cs)*blobmeta.ZranContextSize, n)
	le := binary.LittleEndian
	var dictOff uint64
	for i, c := range cs {
		r := b[i*blobmeta.ZranContextSize:]
		le.PutUint64(r[0:], c.InOffset)
		le.PutUint64(r[8:], c.OutOffset)
		le.PutUint64(r[16:], dictOff)
		le.PutUint32(r[24:], c.InLen)
		le.PutUint32(r[28:], c.OutLen)
		le.PutUint32(r[32:], uint32(len(c.Dict)))
		r[36], r[37] = c.CtxByte, c.CtxBits
		dictOff += uint64(len(c.Dict))
	}
	for _, c := range cs {
		b = append(b, c.Dict...)
	}
	return b
}

// DecodeContexts decodes count contexts from region (the table bytes at
// ci_zran_offset, ci_zran_size long), checking every offset and size.
func DecodeContexts(region []byte, count uint32) ([]rafs.ZranContext, error) {
	ctxLen := uint64(count) * blobmeta.ZranContextSize
	if ctxLen > uint64(len(region)) {
		return nil, fmt.Errorf("%w: %d zran contexts in %d bytes", rafs.ErrInvalid, count, len(region))
	}
	dicts := region[ctxLen:]
	le := binary.LittleEndian
	out := make([]rafs.ZranContext, count)
	for i := range out {
		r := region[i*blobmeta.ZranContextSize:]
		c := rafs.ZranContext{
			InOffset: le.Uint64(r[0:]), OutOffset: le.Uint64(r[8:]),
			InLen: le.Uint32(r[24:]), OutLen: le.Uint32(r[28:]),
			CtxByte: r[36], CtxBits: r[37],
		}
		dictOff, dictSize := le.Uint64(r[16:]), uint64(le.Uint32(r[32:]))
		switch {
		case c.CtxBits > 7:
			return nil, fmt.Errorf("%w: zran context %d: %d context bits", rafs.ErrInvalid, i, c.CtxBits)
		case dictSize > rafs.MaxZranDict:
			return nil, fmt.Errorf("%w: zran context %d: %d-byte dictionary", rafs.ErrInvalid, i, dictSize)
		case dictOff > uint64(len(dicts)) || dictSize > uint64(len(dicts))-dictOff:
			return nil, fmt.Errorf("%w: zran context %d: dictionary [%d,+%d) outside %d bytes", rafs.ErrInvalid, i, dictOff, dictSize, len(dicts))
		case c.InOffset > 1<<40 || c.OutOffset > 1<<44 || c.OutLen > maxContextOut:
			return nil, fmt.Errorf("%w: zran context %d at %d/%d, %d bytes out", rafs.ErrInvalid, i, c.InOffset, c.OutOffset, c.OutLen)
		}
		if dictSize > 0 {
			c.Dict = dicts[dictOff : dictOff+dictSize : dictOff+dictSize]
		}
		out[i] = c
	}
	return out, nil
}

// FromMeta decodes the zran contexts of blob meta m and maps every chunk
// to its context.
func FromMeta(m *blobmeta.Meta) (*rafs.Zran, error) {
	h := &m.Header
	if h.Features&blobmeta.FeatureZran == 0 {
		return nil, fmt.Errorf("%w: blob meta without the zran feature (%#x)", rafs.ErrInvalid, h.Features)
	}
	if h.CIZranOffset > uint64(len(m.Table)) || h.CIZranSize > uint64(len(m.Table))-h.CIZranOffset {
		return nil, fmt.Errorf("%w: zran region [%d,+%d) outside the %d-byte table", rafs.ErrInvalid, h.CIZranOffset, h.CIZranSize, len(m.Table))
	}
	cs, err := DecodeContexts(m.Table[h.CIZranOffset:h.CIZranOffset+h.CIZranSize], h.CIZranCount)
	if err != nil {
		return nil, err
	}
	z := &rafs.Zran{Contexts: cs, Chunks: make([]rafs.ZranChunk, len(m.Chunks))}
	for i := range m.Chunks {
		ci := &m.Chunks[i]
		ok, idx, off := ci.ZranChunk()
		if !ok {
			return nil, fmt.Errorf("%w: chunk %d of a zran blob is not a zran chunk", rafs.ErrInvalid, i)
		}
		if idx >= uint32(len(cs)) {
			return nil, fmt.Errorf("%w: chunk %d: zran context %d of %d", rafs.ErrInvalid, i, idx, len(cs))
		}
		// nydusd slices the chunk out of its context's whole output.
		if uint64(off)+uint64(ci.UncompressedSize) > uint64(cs[idx].OutLen) {
			return nil, fmt.Errorf("%w: chunk %d at [%d,+%d) of zran context %d, which yields %d bytes", rafs.ErrInvalid, i, off, ci.UncompressedSize, idx, cs[idx].OutLen)
		}
		z.Chunks[i] = rafs.ZranChunk{Context: idx, Offset: off}
	}
	return z, nil
}

// readSlack is read past a chunk's recorded compressed end: nydus records
// where zlib's input stood after the chunk's output, so nothing more is
// needed; the slack only spares a decoder that looks ahead a failed read.
const readSlack = 8

// Attach loads z as blob bi of img and gives each of its chunks a stored
// extent it can be inflated from (see rafs.Zran). ends[i] is where chunk
// i's compressed data ends in the layer (nydus's compressed offset + size).
// A chunk starts at or before its context when it can, so the fetch
// needs no other bytes; otherwise (the first context of a layer sits
// right after the gzip header) after it, and its context's Head is read
// with readLayer.
func Attach(img *rafs.Image, bi uint32, z *rafs.Zran, ends []uint64, readLayer func(p []byte, off int64) error) error {
	if int(bi) >= len(img.Blobs) {
		return fmt.Errorf("%w: blob index %d of %d", rafs.ErrInvalid, bi, len(img.Blobs))
	}
	b := img.Blobs[bi]
	if len(z.Chunks) != int(b.ChunkCount) || len(ends) != len(z.Chunks) {
		return fmt.Errorf("%w: blob %s: %d zran chunks and %d ends for %d chunks", rafs.ErrInvalid, b.ID, len(z.Chunks), len(ends), b.ChunkCount)
	}
	byIndex := map[uint32][]*rafs.Chunk{}
	for _, in := range img.Inodes {
		for _, fc := range in.Chunks {
			if fc.BlobIndex != bi {
				continue
			}
			if fc.Index >= b.ChunkCount {
				return fmt.Errorf("%w: blob %s: chunk index %d of %d", rafs.ErrInvalid, b.ID, fc.Index, b.ChunkCount)
			}
			cs := byIndex[fc.Index]
			if len(cs) == 0 || cs[len(cs)-1] != fc.Chunk {
				byIndex[fc.Index] = append(cs, fc.Chunk)
			}
		}
	}
	idx := make([]uint32, 0, len(byIndex))
	for i := range byIndex {
		idx = append(idx, i)
	}
	// Contexts in stream order, a context's chunks in index order.
	sort.Slice(idx, func(x, y int) bool {
		a, c := z.Contexts[z.Chunks[idx[x]].Context].InOffset, z.Contexts[z.Chunks[idx[y]].Context].InOffset
		if a != c {
			return a < c
		}
		return idx[x] < idx[y]
	})
	// Each context's chunks take consecutive offsets ending at its
	// InOffset (the first ones before it), after every offset the
	// contexts before it took: offsets grow with chunk order, as nydus's
	// do, which keeps a file's chunks in order for read-ahead. Offsets
	// past InOffset (a context close behind the one before it, or right
	// after the gzip header) take their bytes from the context's Head.
	head := map[uint32]uint64{}
	next := uint64(0) // the lowest offset still free
	for k := 0; k < len(idx); {
		ci := z.Chunks[idx[k]].Context
		ctx := &z.Contexts[ci]
		n := 1
		for k+n < len(idx) && z.Chunks[idx[k+n]].Context == ci {
			n++
		}
		start := next
		if ctx.InOffset+1 >= uint64(n) {
			start = max(start, ctx.InOffset+1-uint64(n))
		}
		for j := range n {
			i, o := idx[k+j], start+uint64(j)
			if o > ctx.InOffset {
				head[ci] = max(head[ci], o-ctx.InOffset)
			}
			end := max(ends[i], ctx.InOffset+1, o+1) + readSlack
			if b.CompressedSize != 0 {
				end = min(end, b.CompressedSize)
			}
			if end <= o || end-o > 2*rafs.MaxChunkSize || (o > ctx.InOffset && o-ctx.InOffset > 2*rafs.MaxChunkSize) {
				return fmt.Errorf("%w: blob %s: chunk %d would need [%d,%d) of the layer", rafs.ErrInvalid, b.ID, i, o, end)
			}
			for _, c := range byIndex[i] {
				c.CompressedOffset, c.CompressedSize, c.Compressed = o, uint32(end-o), true
			}
		}
		next = start + uint64(n)
		k += n
	}
	for ci, n := range head {
		ctx := &z.Contexts[ci]
		ctx.Head = make([]byte, n)
		if err := readLayer(ctx.Head, int64(ctx.InOffset)); err != nil {
			return fmt.Errorf("blob %s: read %d bytes at %d of the layer: %w", b.ID, n, ctx.InOffset, err)
		}
	}
	b.Zran = z
	return nil
}

// ErrNoMeta is returned for a zran blob whose bootstrap entry does not
// name its meta blob (nydus's per-layer bootstraps with inlined fs meta
// name it by their own file name; merged bootstraps by digest).
var ErrNoMeta = errors.New("zran: blob meta not named")

// maxMetaBlob bounds a meta blob read whole: a ci table of at most
// blobmeta.MaxTableSize and 32 bytes of digest per chunk.
const maxMetaBlob = blobmeta.MaxTableSize + 32*blobmeta.MaxChunks + 1<<20

// Source reads blobs by id (a storage backend).
type Source interface {
	ReadAt(ctx context.Context, id string, p []byte, off int64) error
}

// MetaBlobID is the id of the blob holding b's zran contexts: nydus's
// "RAFS blob for ZRAN" (blob.meta, blob.digest, TOC), named by the
// sha256 in RafsV6Blob's blob_meta_digest. It is "" when b does not keep
// its blob meta apart (BlobFeatures::SEPARATE) or names no such blob.
func MetaBlobID(b *rafs.Blob) string {
	if b.Features&blobmeta.FeatureSeparate == 0 || b.Meta.Digest == (codec.Digest{}) {
		return ""
	}
	return hex.EncodeToString(b.Meta.Digest[:])
}

// Resolve loads the zran contexts of every blob of img that needs them and
// has none yet: it reads the blob's meta blob (MetaBlobID) from src, as
// nydusd does, checks it against the digest the bootstrap names it by
// (when the entry records its size) and its header against the entry,
// and attaches the contexts (Attach).
func Resolve(ctx context.Context, img *rafs.Image, src Source) error {
	type loaded struct {
		z    *rafs.Zran
		ends []uint64
	}
	// Every blob that needs its contexts must name its meta blob: checked
	// before any fetch starts, so a refusal leaves no fetch running.
	ids := make([]string, len(img.Blobs))
	for bi, b := range img.Blobs {
		if !b.IsZran() || b.Zran != nil {
			continue
		}
		if ids[bi] = MetaBlobID(b); ids[bi] == "" {
			return fmt.Errorf("%w: zran blob %s names no separate blob meta (features %#x)", ErrNoMeta, b.ID, b.Features)
		}
	}
	out := make([]loaded, len(img.Blobs))
	// The meta blobs are fetched in parallel (a mount waits for them);
	// attaching, which walks the image, is done one blob at a time.
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for bi, id := range ids {
		if id == "" {
			continue
		}
		b := img.Blobs[bi]
		g.Go(func() error {
			z, ends, err := loadMeta(gctx, b, id, src)
			if err != nil {
				return fmt.Errorf("zran blob %s: blob meta %s: %w", b.ID, id, err)
			}
			out[bi] = loaded{z, ends}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	for bi, l := range out {
		if l.z == nil {
			continue
		}
		id := img.Blobs[bi].ID
		if err := Attach(img, uint32(bi), l.z, l.ends, func(p []byte, off int64) error { return src.ReadAt(ctx, id, p, off) }); err != nil {
			return err
		}
	}
	return nil
}

// loadMeta reads and decodes blob b's meta blob id: its contexts and
// where each chunk's compressed data ends.
func loadMeta(ctx context.Context, b *rafs.Blob, id string, src Source) (*rafs.Zran, []uint64, error) {
	read := func(p []byte, off int64) error { return src.ReadAt(ctx, id, p, off) }
	if b.Meta.Size > 0 {
		// The bootstrap pins the meta blob by digest: read it whole and
		// check it (it is small next to the layer) before use.
		if b.Meta.Size > maxMetaBlob {
			return nil, nil, fmt.Errorf("%w: meta blob of %d bytes", rafs.ErrInvalid, b.Meta.Size)
		}
		whole := make([]byte, b.Meta.Size)
		if err := read(whole, 0); err != nil {
			return nil, nil, err
		}
		if codec.Digest(sha256.Sum256(whole)) != b.Meta.Digest {
			return nil, nil, fmt.Errorf("%w: the meta blob does not match its digest", rafs.ErrInvalid)
		}
		read = func(p []byte, off int64) error {
			if off < 0 || off > int64(len(whole)) || int64(len(p)) > int64(len(whole))-off {
				return fmt.Errorf("%w: [%d,+%d) past the %d-byte meta blob", rafs.ErrInvalid, off, len(p), len(whole))
			}
			copy(p, whole[off:])
			return nil
		}
	}
	m, err := ReadMeta(ctx, b, read)
	if err != nil {
		return nil, nil, err
	}
	z, err := FromMeta(m)
	if err != nil {
		return nil, nil, err
	}
	ends := make([]uint64, len(m.Chunks))
	for i, c := range m.Chunks {
		ends[i] = c.CompressedOffset + uint64(c.CompressedSize)
	}
	return z, ends, nil
}

// ReadMeta reads the blob meta of zran blob b with read (from the meta
// blob): the ci table at b.Meta.Offset and the header right after it,
// which must agree with the bootstrap's entry (nydus validate_header).
func ReadMeta(ctx context.Context, b *rafs.Blob, read func(p []byte, off int64) error) (*blobmeta.Meta, error) {
	bm := &b.Meta
	if bm.CompressedSize > blobmeta.MaxTableSize {
		return nil, fmt.Errorf("%w: ci table of %d bytes", rafs.ErrInvalid, bm.CompressedSize)
	}
	buf := make([]byte, bm.CompressedSize+blobmeta.HeaderSize)
	if err := read(buf, int64(bm.Offset)); err != nil {
		return nil, err
	}
	var h blobmeta.Header
	if err := h.UnmarshalBinary(buf[bm.CompressedSize:]); err != nil {
		return nil, fmt.Errorf("%w: %w", rafs.ErrInvalid, err)
	}
	if h.CIEntries != b.ChunkCount || h.CICompressor != bm.Compressor || h.CIOffset != bm.Offset ||
		h.CICompressedSize != bm.CompressedSize || h.CIUncompressedSize != bm.UncompressedSize {
		return nil, fmt.Errorf("%w: header (%d entries, compressor %v, table at %d+%d/%d) does not match the bootstrap (%d, %v, %d+%d/%d)",
			rafs.ErrInvalid, h.CIEntries, h.CICompressor, h.CIOffset, h.CICompressedSize, h.CIUncompressedSize,
			b.ChunkCount, bm.Compressor, bm.Offset, bm.CompressedSize, bm.UncompressedSize)
	}
	m, err := blobmeta.Decode(h, buf[:bm.CompressedSize])
	if err != nil {
		return nil, fmt.Errorf("%w: %w", rafs.ErrInvalid, err)
	}
	return m, nil
}

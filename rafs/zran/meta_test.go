package zran

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/codec"
)

// nydusMeta is a blob meta built by nydus-image for a zran blob, as
// nydusd caches it: dragonflyoss/nydus tests/texture/zran/233c72f2....blob.meta
// (Apache-2.0), gzipped. Its numbers are asserted by nydus's own tests
// (storage/src/meta/mod.rs test_load_meta_ci_zran_*): 0xa3 chunks, 0x15
// contexts, a dictionary table of 0xa0348 - 0x15*40 bytes.
func nydusMeta(t testing.TB) []byte {
	t.Helper()
	f, err := os.Open("testdata/nydus-233c72f2.blob.meta.gz")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestNydusBlobMetaGolden(t *testing.T) {
	raw := nydusMeta(t)
	if len(raw) != 0xa2000+blobmeta.HeaderSize {
		t.Fatalf("%d bytes", len(raw))
	}
	m, err := blobmeta.DecodeCacheFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	h := m.Header
	// BlobCompressionContextHeader: features ALIGNED|INLINED_FS_META|
	// CHUNK_INFO_V2|ZRAN, ci uncompressed (None), table of 0xa1290 bytes,
	// zran region right after the 0xa3 24-byte entries.
	want := blobmeta.Header{Features: 0xf, CICompressor: codec.None, CIEntries: 0xa3, CIOffset: 0,
		CICompressedSize: 0xa1290, CIUncompressedSize: 0xa1290, CIZranOffset: 0xa3 * 24, CIZranSize: 0xa0348, CIZranCount: 0x15}
	if h != want {
		t.Fatalf("header %+v, want %+v", h, want)
	}
	z, err := FromMeta(m)
	if err != nil {
		t.Fatal(err)
	}
	if len(z.Chunks) != 0xa3 || len(z.Contexts) != 0x15 {
		t.Fatalf("%d chunks, %d contexts", len(z.Chunks), len(z.Contexts))
	}
	dictTable := m.Table[h.CIZranOffset+0x15*40 : h.CIZranOffset+h.CIZranSize]
	if len(dictTable) != 0xa0348-0x15*40 {
		t.Fatalf("dictionary table of %d bytes", len(dictTable))
	}
	// ZranInflateContext fields (zran.rs), read independently here.
	for _, tc := range []struct {
		i                 int
		in, out           uint64
		inLen, outLen     uint32
		dictOff, dictSize int
		ctxByte, ctxBits  uint8
	}{
		{0, 10, 0, 200380, 1052790, 0, 0, 0, 0}, // the first block, after the 10-byte gzip header
		{1, 187761, 987149, 592813, 1801715, 0, 32768, 103, 5},
		{20, 9798811, 23556848, 40210, 126588, 622592, 32768, 139, 3},
	} {
		c := z.Contexts[tc.i]
		if c.InOffset != tc.in || c.OutOffset != tc.out || c.InLen != tc.inLen || c.OutLen != tc.outLen ||
			c.CtxByte != tc.ctxByte || c.CtxBits != tc.ctxBits || len(c.Dict) != tc.dictSize ||
			!bytes.Equal(c.Dict, dictTable[tc.dictOff:tc.dictOff+tc.dictSize]) {
			t.Errorf("context %d: %+v (dict %d bytes)", tc.i, c, len(c.Dict))
		}
	}
	// Chunk info v2 of zran chunks: compressed|zran flags, the zran index
	// and offset in the misc word.
	for _, tc := range []struct {
		i, ctx, off, usize uint32
		uoff, coff         uint64
		csize              uint32
	}{
		{0, 0, 1024, 1404, 0, 0xb8, 649},
		{1, 0, 4096, 287, 0x1000, 0x3a9, 122},
		{66, 0, 1045504, 7286, 0x112000, 0x30887, 1598},
		{67, 1, 66547, 1869, 0x114000, 0x30eea, 504},
		{162, 20, 126224, 364, 0x16c5000, 0x962146, 102},
	} {
		ci := m.Chunks[tc.i]
		if z.Chunks[tc.i] != (rafs.ZranChunk{Context: tc.ctx, Offset: tc.off}) || ci.UncompressedSize != tc.usize ||
			ci.UncompressedOffset != tc.uoff || ci.CompressedOffset != tc.coff || ci.CompressedSize != tc.csize || !ci.Compressed {
			t.Errorf("chunk %d: %+v %+v", tc.i, z.Chunks[tc.i], ci)
		}
	}
	// Re-encoding gives nydus's bytes back: the writer's format is this.
	if got := EncodeContexts(z.Contexts); !bytes.Equal(got, m.Table[h.CIZranOffset:h.CIZranOffset+h.CIZranSize]) {
		t.Fatal("EncodeContexts differs from nydus-image's context and dictionary tables")
	}
	table, err := blobmeta.EncodeTable(m.Chunks, true)
	if err != nil || !bytes.Equal(table, m.Table[:h.CIZranOffset]) {
		t.Fatalf("EncodeTable differs from nydus-image's chunk entries: %v", err)
	}

	// Attach: the first context sits right after the gzip header, so most
	// of its 67 chunks start after it and need head bytes; every chunk
	// gets a distinct offset.
	img := &rafs.Image{Blobs: []*rafs.Blob{{ID: "233c72f2", ChunkCount: 0xa3, CompressedSize: 9839040}}}
	in := &rafs.Inode{Ino: 1}
	ends := make([]uint64, len(m.Chunks))
	for i, ci := range m.Chunks {
		ends[i] = ci.CompressedOffset + uint64(ci.CompressedSize)
		in.Chunks = append(in.Chunks, rafs.FileChunk{Chunk: &rafs.Chunk{Index: uint32(i), CompressedOffset: ci.CompressedOffset,
			CompressedSize: ci.CompressedSize, UncompressedSize: ci.UncompressedSize, UncompressedOffset: ci.UncompressedOffset}})
	}
	img.Inodes = []*rafs.Inode{in}
	var headReads int
	if err := Attach(img, 0, z, ends, func(p []byte, off int64) error { headReads++; return nil }); err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for _, fc := range in.Chunks {
		ctx := z.Contexts[z.Chunks[fc.Index].Context]
		if seen[fc.CompressedOffset] {
			t.Fatalf("chunk %d: offset %d twice", fc.Index, fc.CompressedOffset)
		}
		seen[fc.CompressedOffset] = true
		end := fc.CompressedOffset + uint64(fc.CompressedSize)
		if end < ends[fc.Index] || (fc.CompressedOffset > ctx.InOffset && fc.CompressedOffset-ctx.InOffset > uint64(len(ctx.Head))) {
			t.Fatalf("chunk %d: extent [%d,%d) for context at %d (head %d), data to %d", fc.Index, fc.CompressedOffset, end, ctx.InOffset, len(ctx.Head), ends[fc.Index])
		}
	}
	if headReads != 1 || len(z.Contexts[0].Head) != 67-11 {
		t.Errorf("%d head reads, context 0 head of %d bytes", headReads, len(z.Contexts[0].Head))
	}
}

// nydusStyle builds, for gzip stream gz of data, the zran contexts and
// chunk infos nydus-image would: contexts at block boundaries wherever
// they fall (most not on a byte: ctx_bits/ctx_byte), chunks as ranges of
// a context's output, compressed offset and size spanning the input that
// yields them.
func nydusStyle(t *testing.T, data, gz []byte, spans []Span, every int64) (*rafs.Zran, []blobmeta.ChunkInfo) {
	t.Helper()
	ix, err := Scan(bytes.NewReader(gz), 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs []rafs.ZranContext
	var blocks []Block
	for _, bl := range ix.Blocks {
		if len(blocks) > 0 && bl.Out-blocks[len(blocks)-1].Out < every {
			continue
		}
		c := rafs.ZranContext{InOffset: uint64(bl.InBit / 8), OutOffset: uint64(bl.Out),
			Dict: append([]byte(nil), data[max(0, bl.Out-32<<10):bl.Out]...)}
		if r := bl.InBit % 8; r != 0 {
			c.InOffset++
			c.CtxBits, c.CtxByte = uint8(8-r), gz[bl.InBit/8]
		}
		cs = append(cs, c)
		blocks = append(blocks, bl)
	}
	z := &rafs.Zran{Contexts: cs}
	var infos []blobmeta.ChunkInfo
	var uoff uint64
	for _, s := range spans {
		k := len(blocks) - 1
		for blocks[k].Out > s.Off {
			k--
		}
		c := &cs[k]
		end := uint64(ix.endByte(s.Off + int64(s.Size) - 1))
		start := uint64(ix.endByte(s.Off)) - 1 // somewhere in the block holding the chunk's start
		start = max(start, c.InOffset)
		z.Chunks = append(z.Chunks, rafs.ZranChunk{Context: uint32(k), Offset: uint32(s.Off - blocks[k].Out)})
		c.OutLen = max(c.OutLen, uint32(s.Off+int64(s.Size)-blocks[k].Out))
		c.InLen = max(c.InLen, uint32(end-c.InOffset))
		infos = append(infos, blobmeta.ChunkInfo{CompressedOffset: start, CompressedSize: uint32(end - start),
			UncompressedOffset: uoff, UncompressedSize: s.Size, Compressed: true, Flags: blobmeta.ZranFlag,
			Data: uint64(k)<<32 | uint64(s.Off-blocks[k].Out)})
		uoff += (uint64(s.Size) + 0xfff) &^ 0xfff
	}
	return z, infos
}

// TestNydusLayoutRead reads every chunk of a gzip(1) stream through
// contexts laid out as nydus's (most not on a byte), after a round trip
// through the on-disk encoding: ci entries, context and dictionary tables.
func TestNydusLayoutRead(t *testing.T) {
	data := testData(11, 4<<20)
	gz := zlibGzip(t, data, "-6")
	r := rand.New(rand.NewPCG(5, 5))
	var spans []Span
	for off := int64(0); off < int64(len(data))-70000; off += int64(1 + r.IntN(60000)) {
		n := uint32(1 + r.IntN(65536))
		spans = append(spans, Span{Off: off, Size: n})
		off += int64(n)
	}
	z0, infos := nydusStyle(t, data, gz, spans, 512<<10)
	unaligned := 0
	for _, c := range z0.Contexts {
		if c.CtxBits != 0 {
			unaligned++
		}
	}
	if unaligned == 0 {
		t.Fatal("no context off a byte: the test proves nothing")
	}
	table, err := blobmeta.EncodeTable(infos, true)
	if err != nil {
		t.Fatal(err)
	}
	zt := EncodeContexts(z0.Contexts)
	h := blobmeta.Header{Features: blobmeta.FeatureZran | blobmeta.FeatureChunkInfoV2 | blobmeta.FeatureSeparate, CICompressor: codec.None,
		CIEntries: uint32(len(infos)), CICompressedSize: uint64(len(table) + len(zt)), CIUncompressedSize: uint64(len(table) + len(zt)),
		CIZranOffset: uint64(len(table)), CIZranSize: uint64(len(zt)), CIZranCount: uint32(len(z0.Contexts))}
	m, err := blobmeta.Decode(h, append(table, zt...))
	if err != nil {
		t.Fatal(err)
	}
	z, err := FromMeta(m)
	if err != nil {
		t.Fatal(err)
	}
	b := &rafs.Blob{ID: "layer", Compressor: codec.Gzip, Digester: codec.SHA256, ChunkCount: uint32(len(spans)), CompressedSize: uint64(len(gz)),
		Features: blobmeta.FeatureZran | blobmeta.FeatureSeparate}
	in := &rafs.Inode{Ino: 1}
	ends := make([]uint64, len(infos))
	for i, s := range spans {
		ends[i] = infos[i].CompressedOffset + uint64(infos[i].CompressedSize)
		in.Chunks = append(in.Chunks, rafs.FileChunk{Chunk: &rafs.Chunk{Index: uint32(i), CompressedOffset: infos[i].CompressedOffset,
			CompressedSize: infos[i].CompressedSize, UncompressedSize: s.Size, Compressed: true,
			Digest: codec.SHA256.Sum(data[s.Off : s.Off+int64(s.Size)])}})
	}
	img := &rafs.Image{Blobs: []*rafs.Blob{b}, Inodes: []*rafs.Inode{in}}
	// Before Attach the chunks cannot be read: an error, not bytes.
	c0 := in.Chunks[0].Chunk
	if _, err := rafs.DecodeChunkBytes(b, c0, gz[c0.CompressedOffset:c0.CompressedOffset+uint64(c0.CompressedSize)]); !errors.Is(err, rafs.ErrInvalid) {
		t.Fatalf("read before Attach: %v", err)
	}
	if err := Attach(img, 0, z, ends, func(p []byte, off int64) error { copy(p, gz[off:]); return nil }); err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for i, fc := range in.Chunks {
		c := fc.Chunk
		if seen[c.CompressedOffset] {
			t.Fatalf("chunk %d: offset %d twice", i, c.CompressedOffset)
		}
		seen[c.CompressedOffset] = true
		got, err := rafs.DecodeChunkBytes(b, c, gz[c.CompressedOffset:c.CompressedOffset+uint64(c.CompressedSize)])
		if err != nil {
			t.Fatalf("chunk %d (context %d, %d bits): %v", i, z.Chunks[i].Context, z.Contexts[z.Chunks[i].Context].CtxBits, err)
		}
		if !bytes.Equal(got, data[spans[i].Off:spans[i].Off+int64(spans[i].Size)]) {
			t.Fatalf("chunk %d: wrong bytes", i)
		}
	}
	// A corrupt layer byte inside a chunk's extent: an error, never bytes.
	c := in.Chunks[len(in.Chunks)/2].Chunk
	ctx := z.Contexts[z.Chunks[c.Index].Context]
	if c.CompressedOffset > ctx.InOffset {
		t.Fatalf("chunk %d starts after its context", c.Index)
	}
	raw := append([]byte(nil), gz[c.CompressedOffset:c.CompressedOffset+uint64(c.CompressedSize)]...)
	raw[ctx.InOffset-c.CompressedOffset+2] ^= 0x55 // the context's first bytes: always inflated
	if _, err := rafs.DecodeChunkBytes(b, c, raw); err == nil {
		t.Fatal("corrupt extent decoded")
	}
	t.Logf("%d chunks, %d contexts (%d off a byte)", len(spans), len(z.Contexts), unaligned)
}

// memSource serves blobs from memory, as a backend would.
type memSource map[string][]byte

func (m memSource) ReadAt(_ context.Context, id string, p []byte, off int64) error {
	b, ok := m[id]
	if !ok || off < 0 || off+int64(len(p)) > int64(len(b)) {
		return io.ErrUnexpectedEOF
	}
	copy(p, b[off:])
	return nil
}

func TestResolveRefusals(t *testing.T) {
	b := &rafs.Blob{ID: "l", ChunkCount: 1, Features: blobmeta.FeatureZran}
	img := &rafs.Image{Blobs: []*rafs.Blob{b}}
	if err := Resolve(context.Background(), img, memSource{}); !errors.Is(err, ErrNoMeta) {
		t.Fatalf("zran blob without SEPARATE: %v", err)
	}
	b.Features |= blobmeta.FeatureSeparate
	b.Meta.Digest[0] = 1
	b.Meta.CompressedSize = 100
	if err := Resolve(context.Background(), img, memSource{}); err == nil {
		t.Fatal("missing meta blob resolved")
	}
	// A meta blob whose header disagrees with the bootstrap.
	hb, _ := (&blobmeta.Header{CIEntries: 2, CICompressedSize: 100, CIUncompressedSize: 100, CICompressor: codec.None, Features: blobmeta.FeatureChunkInfoV2}).MarshalBinary()
	meta := append(make([]byte, 100), hb...)
	if err := Resolve(context.Background(), img, memSource{MetaBlobID(b): meta}); !errors.Is(err, rafs.ErrInvalid) {
		t.Fatalf("mismatched header: %v", err)
	}
	// A meta blob that is not the one the bootstrap pins by digest.
	b.Meta.Size = uint64(len(meta))
	if err := Resolve(context.Background(), img, memSource{MetaBlobID(b): meta}); !errors.Is(err, rafs.ErrInvalid) || !strings.Contains(err.Error(), "digest") {
		t.Fatalf("meta blob with another digest: %v", err)
	}
}

// FuzzDecodeContexts: arbitrary context tables decode or fail cleanly.
func FuzzDecodeContexts(f *testing.F) {
	raw := nydusMeta(f)
	m, err := blobmeta.DecodeCacheFile(raw)
	if err != nil {
		f.Fatal(err)
	}
	h := m.Header
	f.Add(m.Table[h.CIZranOffset:h.CIZranOffset+40*3+100], uint32(3))
	f.Add(EncodeContexts([]rafs.ZranContext{{InOffset: 10, OutLen: 5, Dict: []byte("abc"), CtxBits: 3}}), uint32(1))
	f.Add([]byte{}, uint32(0))
	bad := EncodeContexts([]rafs.ZranContext{{InOffset: 10}})
	binary.LittleEndian.PutUint64(bad[16:], 1<<63)
	f.Add(bad, uint32(1))
	f.Fuzz(func(t *testing.T, region []byte, count uint32) {
		cs, err := DecodeContexts(region, count)
		if err != nil {
			return
		}
		for _, c := range cs {
			if c.CtxBits > 7 || len(c.Dict) > rafs.MaxZranDict {
				t.Fatalf("accepted %+v", c)
			}
		}
	})
}

// FuzzResolve feeds arbitrary meta blobs to Resolve for a fixed zran blob
// entry: the meta is untrusted registry data; errors are fine, panics and
// chunks left without a readable extent are not.
func FuzzResolve(f *testing.F) {
	data := testData(21, 96<<10)
	gz := goGzip(f, data, 6)
	ix, err := Scan(bytes.NewReader(gz), 16<<10)
	if err != nil {
		f.Fatal(err)
	}
	spans := tile(int64(len(data)), 16<<10)
	z, ext, err := ix.Layout(spans)
	if err != nil {
		f.Fatal(err)
	}
	var infos []blobmeta.ChunkInfo
	for i, s := range spans {
		infos = append(infos, blobmeta.ChunkInfo{CompressedOffset: ext[i].Offset, CompressedSize: ext[i].Size, UncompressedOffset: uint64(i) << 15,
			UncompressedSize: s.Size, Compressed: true, Flags: blobmeta.ZranFlag, Data: uint64(z.Chunks[i].Context)<<32 | uint64(z.Chunks[i].Offset)})
	}
	var meta bytes.Buffer
	sep, err := blobmeta.WriteSeparate(&meta, 0, infos, EncodeContexts(z.Contexts), uint32(len(z.Contexts)), make([]codec.Digest, len(infos)))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(meta.Bytes())
	f.Add(meta.Bytes()[:len(meta.Bytes())/2])
	f.Fuzz(func(t *testing.T, mb []byte) {
		b := &rafs.Blob{ID: "layer", ChunkCount: uint32(len(spans)), CompressedSize: uint64(len(gz)), Features: sep.Header.Features,
			Meta: rafs.BlobMeta{Compressor: sep.Header.CICompressor, CompressedSize: sep.Header.CICompressedSize,
				UncompressedSize: sep.Header.CIUncompressedSize, Digest: sep.Digest}}
		in := &rafs.Inode{Ino: 1}
		for i := range spans {
			in.Chunks = append(in.Chunks, rafs.FileChunk{Chunk: &rafs.Chunk{Index: uint32(i), CompressedOffset: ext[i].Offset, CompressedSize: ext[i].Size, UncompressedSize: spans[i].Size}})
		}
		img := &rafs.Image{Blobs: []*rafs.Blob{b}, Inodes: []*rafs.Inode{in}}
		if err := Resolve(context.Background(), img, memSource{"layer": gz, MetaBlobID(b): mb}); err != nil {
			return
		}
		for _, fc := range in.Chunks[:3] {
			if end := fc.CompressedOffset + uint64(fc.CompressedSize); end <= fc.CompressedOffset || end > uint64(len(gz)) {
				t.Fatalf("chunk %d: extent [%d,%d) of a %d-byte layer", fc.Index, fc.CompressedOffset, end, len(gz))
			}
			// Decoding never panics; bad contexts give errors.
			rafs.DecodeChunkBytes(b, fc.Chunk, gz[fc.CompressedOffset:fc.CompressedOffset+uint64(fc.CompressedSize)])
		}
	})
}

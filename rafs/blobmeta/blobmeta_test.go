package blobmeta

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/rafsd/rafsd/internal/testutil"

	"github.com/rafsd/rafsd/rafs/codec"
)

func sampleInfos() []ChunkInfo {
	return []ChunkInfo{
		{CompressedOffset: 0, CompressedSize: 100, UncompressedOffset: 0, UncompressedSize: 4096, Compressed: true},
		{CompressedOffset: 100, CompressedSize: 1 << 20, UncompressedOffset: 4096, UncompressedSize: 1 << 20},
		{CompressedOffset: 1<<40 - 1<<24, CompressedSize: 1<<24 - 1, UncompressedOffset: 1<<43 - 4096, UncompressedSize: 1 << 24, Compressed: true},
		{CompressedOffset: 7, CompressedSize: 1, UncompressedOffset: 1 << 32, UncompressedSize: 1},
	}
}

func TestTableRoundTrip(t *testing.T) {
	for _, v2 := range []bool{false, true} {
		infos := sampleInfos()
		b, err := EncodeTable(infos, v2)
		if err != nil {
			t.Fatalf("v2=%v: %v", v2, err)
		}
		got, err := DecodeTable(b, uint32(len(infos)), v2)
		if err != nil {
			t.Fatalf("v2=%v: %v", v2, err)
		}
		if !reflect.DeepEqual(got, infos) {
			t.Errorf("v2=%v:\n got %+v\nwant %+v", v2, got, infos)
		}
	}
}

func TestEncodeRejects(t *testing.T) {
	bad := []ChunkInfo{
		{UncompressedOffset: 1, UncompressedSize: 1, CompressedSize: 1},
		{UncompressedSize: 0, CompressedSize: 1},
		{UncompressedSize: 1<<24 + 1, CompressedSize: 1},
		{UncompressedSize: 10, CompressedSize: 10, Compressed: true}, // v1 cannot say this
		{CompressedOffset: 1 << 40, UncompressedSize: 1, CompressedSize: 1},
	}
	for k, c := range bad {
		if _, err := EncodeTable([]ChunkInfo{c}, false); err == nil {
			t.Errorf("case %d: encoded %+v", k, c)
		}
	}
}

func TestWriteRead(t *testing.T) {
	for _, c := range []codec.Compressor{codec.None, codec.Zstd, codec.LZ4Block, codec.Gzip} {
		for _, feat := range []uint32{FeatureCapTarTOC, FeatureCapTarTOC | FeatureChunkInfoV2} {
			var infos []ChunkInfo
			for k := range 500 { // compressible, so the table is stored compressed
				infos = append(infos, ChunkInfo{CompressedOffset: uint64(k) * 4096, CompressedSize: 4096, UncompressedOffset: uint64(k) * 4096, UncompressedSize: 4096})
			}
			var buf bytes.Buffer
			buf.Write(make([]byte, 12345)) // chunk data
			h, n, err := Write(&buf, 12345, c, feat, infos)
			if err != nil {
				t.Fatal(err)
			}
			if n != int64(buf.Len()-12345) || h.CIOffset != 12345 || h.Features&FeatureAligned == 0 {
				t.Fatalf("%s: header %+v, wrote %d", c, h, n)
			}
			if c != codec.None && h.CICompressor == codec.None {
				t.Errorf("%s: table was not compressed", c)
			}
			r := bytes.NewReader(buf.Bytes())
			m, err := ReadTail(r, int64(buf.Len()))
			if err != nil {
				t.Fatalf("%s: %v", c, err)
			}
			if m.Header != h || !reflect.DeepEqual(m.Chunks, infos) {
				t.Errorf("%s: read back differs", c)
			}
			m2, err := Read(r, h.CIOffset, h.CICompressedSize)
			if err != nil || !reflect.DeepEqual(m2, m) {
				t.Errorf("%s: Read: %v", c, err)
			}
		}
	}
}

// The nydus-image-built v6 fixture's blob carries a v1 table with a TOC
// after it; its header must decode and describe chunks inside the blob.
func TestNydusFixture(t *testing.T) {
	blobs, _ := filepath.Glob(filepath.Join(testutil.NydusFixtures(), "v6-zstd-blake3/blobs/*"))
	if len(blobs) != 1 {
		t.Fatalf("fixture blob missing: %v", blobs)
	}
	data, err := os.ReadFile(blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	// Find the header by its magic, as an independent check of Read.
	at := bytes.Index(data, []byte{0x0b, 0xb1, 0x0b, 0xb1})
	if at < 0 {
		t.Fatal("no blob meta magic in fixture")
	}
	var h Header
	if err := h.UnmarshalBinary(data[at : at+HeaderSize]); err != nil {
		t.Fatal(err)
	}
	m, err := Read(bytes.NewReader(data), h.CIOffset, h.CICompressedSize)
	if err != nil {
		t.Fatal(err)
	}
	// The same through the blob's TOC.
	toc, err := ReadTOC(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, e := range toc {
		names[e.Name] = true
	}
	if !names[TOCBlobMeta] || !names[TOCMetaHeader] || !names[TOCDigests] {
		t.Errorf("TOC entries %+v", toc)
	}
	m2, err := ReadBlob(bytes.NewReader(data), int64(len(data)))
	if err != nil || !reflect.DeepEqual(m2, m) {
		t.Errorf("ReadBlob: %v", err)
	}
	if m.Header.Features&FeatureCapTarTOC == 0 || m.Header.Features&FeatureAligned == 0 || len(m.Chunks) != 2 {
		t.Fatalf("unexpected header %+v", m.Header)
	}
	var uoff uint64
	for k, c := range m.Chunks {
		if c.CompressedOffset+uint64(c.CompressedSize) > h.CIOffset || c.UncompressedOffset < uoff || c.UncompressedOffset%4096 != 0 {
			t.Errorf("chunk %d: %+v", k, c)
		}
		uoff = c.UncompressedOffset + uint64(c.UncompressedSize)
		// Every chunk is a zstd frame that decompresses to its size.
		dst := make([]byte, c.UncompressedSize)
		if err := codec.Decompress(codec.Zstd, dst, data[c.CompressedOffset:c.CompressedOffset+uint64(c.CompressedSize)]); err != nil {
			t.Errorf("chunk %d: %v", k, err)
		}
	}
}

func TestDecodeHostile(t *testing.T) {
	good := Header{CIEntries: 1, CICompressedSize: 16, CIUncompressedSize: 16}
	hb, _ := good.MarshalBinary()
	cases := map[string]func(b []byte){
		"magic":      func(b []byte) { b[0] = 0 },
		"magic2":     func(b []byte) { b[HeaderSize-1] = 0 },
		"entries":    func(b []byte) { b[12] = 0 },
		"size":       func(b []byte) { b[32] = 17 },
		"compressor": func(b []byte) { b[8] = 9 },
		"encrypted":  func(b []byte) { b[5] = 1 },
	}
	for name, mut := range cases {
		b := bytes.Clone(hb)
		mut(b)
		var h Header
		if err := h.UnmarshalBinary(b); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: err %v", name, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	var buf bytes.Buffer
	_, _, _ = Write(&buf, 0, codec.Zstd, FeatureCapTarTOC, sampleInfos()[:2])
	f.Add(buf.Bytes())
	buf.Reset()
	_, _, _ = Write(&buf, 0, codec.None, FeatureChunkInfoV2, sampleInfos())
	f.Add(buf.Bytes())
	f.Add(make([]byte, HeaderSize))
	buf.Reset()
	zi := sampleInfos()
	for i := range zi {
		zi[i].Flags, zi[i].Compressed = ZranFlag, true
	}
	if _, err := WriteSeparate(&buf, 0, zi, make([]byte, ZranContextSize+10), 1, make([]codec.Digest, len(zi))); err == nil {
		f.Add(buf.Bytes())
	}
	if fx, _ := filepath.Glob(filepath.Join(testutil.NydusFixtures(), "v6-zstd-blake3/blobs/*")); len(fx) == 1 {
		if b, err := os.ReadFile(fx[0]); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// nydusd's cache form (and nydus-snapshotter's packed .blob.meta).
		if m, err := DecodeCacheFile(data); err == nil && uint64(len(m.Table)) != m.Header.CIUncompressedSize {
			t.Fatalf("cache file table of %d bytes, header says %d", len(m.Table), m.Header.CIUncompressedSize)
		}
		m, err := ReadBlob(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		// Whatever decodes re-encodes (v1 entries always, v2 when flags allow).
		if !m.Header.V2() {
			if _, err := EncodeTable(m.Chunks, false); err != nil {
				t.Fatalf("decoded table does not re-encode: %v", err)
			}
		}
	})
}

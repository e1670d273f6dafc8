package blobmeta

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"testing"

	"github.com/rafsd/rafsd/rafs/codec"
)

// TestWriteSeparate checks the layout of a zran blob's separate meta
// against nydus's (see Separate) with independent readers: Go's tar
// reader for the headers, ReadTOC and ReadBlob for the rest.
func TestWriteSeparate(t *testing.T) {
	var infos []ChunkInfo
	var digests []codec.Digest
	for i := range 100 {
		infos = append(infos, ChunkInfo{CompressedOffset: uint64(10 + i*100), CompressedSize: 150, UncompressedOffset: uint64(i) << 12,
			UncompressedSize: 4000, Compressed: true, Flags: ZranFlag, Data: uint64(i/50)<<32 | uint64(i%50)*4096})
		digests = append(digests, codec.SHA256.Sum([]byte{byte(i)}))
	}
	zran := bytes.Repeat([]byte{7}, 2*ZranContextSize+1000)
	var buf bytes.Buffer
	s, err := WriteSeparate(&buf, 0, infos, zran, 2, digests)
	if err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	if s.Size != uint64(len(b)) || s.Digest != sha256.Sum256(b) {
		t.Fatalf("size %d digest %x for %d bytes", s.Size, s.Digest, len(b))
	}
	h := s.Header
	if h.Features != 0x7000_003d || h.CICompressor != codec.Zstd || h.CIOffset != 0 || h.CIEntries != 100 ||
		h.CIZranOffset != 100*24 || h.CIZranSize != uint64(len(zran)) || h.CIZranCount != 2 || h.CIUncompressedSize != uint64(100*24+len(zran)) {
		t.Fatalf("header %+v", h)
	}
	cs := h.CICompressedSize
	// The header right after the table, magic at both ends.
	if binary.LittleEndian.Uint32(b[cs:]) != Magic || binary.LittleEndian.Uint32(b[cs+HeaderSize-4:]) != Magic {
		t.Fatal("no header after the table")
	}
	// Tar headers after their content, readable by archive/tar.
	for _, tc := range []struct {
		at   uint64
		name string
		size int64
	}{
		{cs + HeaderSize, TOCBlobMeta, int64(cs + HeaderSize)},
		{cs + HeaderSize + 512 + 3200, TOCDigests, 3200},
		{uint64(len(b)) - 512, TOCName, 3 * TOCEntrySize},
	} {
		hdr, err := tar.NewReader(bytes.NewReader(b[tc.at : tc.at+512])).Next()
		if err != nil || hdr.Name != tc.name || hdr.Size != tc.size || hdr.Typeflag != tar.TypeReg {
			t.Fatalf("tar header at %d: %+v %v", tc.at, hdr, err)
		}
	}
	if s.TOCSize != 3*TOCEntrySize+512 || s.TOCDigest != sha256.Sum256(b[len(b)-int(s.TOCSize):]) {
		t.Fatalf("toc size %d", s.TOCSize)
	}
	toc, err := ReadTOC(bytes.NewReader(b), int64(len(b)))
	if err != nil || len(toc) != 3 {
		t.Fatalf("toc %+v %v", toc, err)
	}
	dig := b[cs+HeaderSize+512 : cs+HeaderSize+512+3200]
	if toc[0].Name != TOCBlobMeta || toc[0].Flags != tocCompressZstd || toc[0].CompressedSize != cs || toc[0].UncompressedSize != h.CIUncompressedSize ||
		toc[1].Name != TOCMetaHeader || toc[1].CompressedOffset != cs || toc[1].CompressedSize != HeaderSize ||
		toc[2].Name != TOCDigests || toc[2].CompressedOffset != cs+HeaderSize+512 || toc[2].UncompressedDigest != sha256.Sum256(dig) {
		t.Fatalf("toc %+v", toc)
	}
	if !bytes.Equal(dig[32*7:32*8], digests[7][:]) {
		t.Fatal("digest table out of order")
	}
	m, err := ReadBlob(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Chunks) != 100 || !bytes.Equal(m.Table[h.CIZranOffset:], zran) || m.Chunks[57] != infos[57] {
		t.Fatalf("read back %+v", m.Chunks[57])
	}
	if ok, idx, off := m.Chunks[57].ZranChunk(); !ok || idx != 1 || off != 7*4096 {
		t.Fatalf("chunk 57: %v %d %d", ok, idx, off)
	}
}

package v6

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// TestZranBlobEntry: a zran blob as nydus-image (targz-ref, blob-toc)
// describes it in RafsV6Blob (rafs/src/metadata/layout/v6.rs): its
// contexts live in a separate meta blob, located by the entry's ci_* and
// blob_meta_* fields at nydus's byte offsets; the bootstrap holds nothing
// else of it, and reading it back leaves the contexts to be loaded.
func TestZranBlobEntry(t *testing.T) {
	boot, img := zranBootstrap(t)
	bl := img.Blobs[0]
	var ext extSuperBlock
	ext.unmarshal(boot[ExtSuperBlockOffset:])
	e := boot[ext.BlobTableOffset : ext.BlobTableOffset+BlobEntrySize]
	le := binary.LittleEndian
	for _, tc := range []struct {
		field     string
		got, want uint64
	}{
		{"features @84", uint64(le.Uint32(e[84:])), 0x7000_003d},
		{"compression_algo @76 (gzip)", uint64(le.Uint32(e[76:])), uint64(codec.Gzip)},
		{"blob_toc_size @104", uint64(le.Uint32(e[104:])), 3*128 + 512},
		{"ci_compressor @108 (zstd)", uint64(le.Uint32(e[108:])), uint64(codec.Zstd)},
		{"ci_offset @112", le.Uint64(e[112:]), 0},
		{"ci_compressed_size @120", le.Uint64(e[120:]), 1234},
		{"ci_uncompressed_size @128", le.Uint64(e[128:]), 99999},
		{"blob_meta_digest[0] @168", uint64(e[168]), 0xa0},
		{"blob_toc_digest[31] @167", uint64(e[167]), 31},
		{"blob_meta_size @200", le.Uint64(e[200:]), 777777},
		{"reserved @220..256", uint64(len(bytes.Trim(e[220:], "\x00"))), 0},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.field, tc.got, tc.want)
		}
	}
	got, err := Read(bytes.NewReader(boot), int64(len(boot)))
	if err != nil {
		t.Fatal(err)
	}
	g := got.Blobs[0]
	if g.Meta != bl.Meta || g.Features != bl.Features || g.Zran != nil || !g.IsZran() {
		t.Fatalf("blob read back as %+v", g)
	}
	// nydus 2.1 zran blobs (no SEPARATE: the meta inlined in the
	// bootstrap's own blob) are refused up front.
	bad := append([]byte(nil), boot...)
	le.PutUint32(bad[ext.BlobTableOffset+84:], 0x0f)
	if _, err := Read(bytes.NewReader(bad), int64(len(bad))); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("zran blob without SEPARATE: %v", err)
	}
}

// zranBootstrap is the small test image with its blob described as a zran
// blob whose blob meta is a separate blob.
func zranBootstrap(t testing.TB) ([]byte, *rafs.Image) {
	t.Helper()
	b := newBuilder()
	b.file(1, "f", pattern(2*testChunkSize+10, 3), 0)
	img, _ := b.finish()
	bl := img.Blobs[0]
	// SEPARATE|ZRAN|CHUNK_INFO_V2|ALIGNED|INLINED_CHUNK_DIGEST|HAS_TAR_HEADER|HAS_TOC|CAP_TAR_TOC,
	// as a merged nydus bootstrap has them for an --oci-ref layer.
	bl.Features = 0x7000_003d
	bl.Compressor = codec.Gzip
	bl.Meta.Compressor, bl.Meta.Offset, bl.Meta.CompressedSize, bl.Meta.UncompressedSize = codec.Zstd, 0, 1234, 99999
	bl.Meta.TOCSize = 3*128 + 512
	for i := range 32 {
		bl.Meta.TOCDigest[i], bl.Meta.Digest[i] = byte(i), byte(0xa0+i)
	}
	bl.Meta.Size = 777777
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), img
}

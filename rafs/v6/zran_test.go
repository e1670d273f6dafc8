package v6

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"

	"github.com/rafsd/rafsd/rafs"
)

// zranBootstrap is the small test image with a zran table on its blob.
func zranBootstrap(t testing.TB) ([]byte, *rafs.Zran) {
	t.Helper()
	b := newBuilder()
	b.file(1, "f", pattern(2*testChunkSize+10, 3), 0)
	img, _ := b.finish()
	bl := img.Blobs[0]
	bl.Features |= BlobFeatureZran
	z := &rafs.Zran{Contexts: []rafs.ZranContext{
		{InOffset: 10, OutOffset: 0, InLen: 500, OutLen: 1 << 20, Head: []byte{1, 2, 3}},
		{InOffset: 510, OutOffset: 1 << 20, InLen: 400, OutLen: 1 << 19, Dict: bytes.Repeat([]byte("dict"), 8192)},
	}}
	for i := range bl.ChunkCount {
		z.Chunks = append(z.Chunks, rafs.ZranChunk{Context: i % 2, Offset: i * 100})
	}
	bl.Zran = z
	var buf bytes.Buffer
	if err := Write(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), z
}

func TestZranTableRoundTrip(t *testing.T) {
	boot, z := zranBootstrap(t)
	img, err := Read(bytes.NewReader(boot), int64(len(boot)))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(img.Blobs[0].Zran, z) {
		t.Fatalf("zran table changed:\n got %+v\nwant %+v", img.Blobs[0].Zran, z)
	}
	// The table's location lives in the blob entry's reserved bytes.
	var ext extSuperBlock
	ext.unmarshal(boot[ExtSuperBlockOffset:])
	for _, tc := range []struct {
		name    string
		off, sz uint64
	}{
		{"past the end", uint64(len(boot)) - 8, 64},
		{"huge", 4096, 1 << 40},
		{"missing", 0, 0},
	} {
		bad := append([]byte(nil), boot...)
		e := bad[ext.BlobTableOffset:]
		binary.LittleEndian.PutUint64(e[224:], tc.off)
		binary.LittleEndian.PutUint64(e[232:], tc.sz)
		_, err := Read(bytes.NewReader(bad), int64(len(bad)))
		if err == nil {
			t.Errorf("%s: accepted", tc.name)
		} else if tc.name == "missing" && !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: %v, want ErrUnsupported (a nydus zran blob with a separate meta)", tc.name, err)
		}
	}
	// A table for another chunk count is refused.
	b := newBuilder()
	b.file(1, "f", pattern(10, 3), 0)
	img2, _ := b.finish()
	img2.Blobs[0].Zran = z
	if err := Write(&bytes.Buffer{}, img2); err == nil {
		t.Error("zran table for a different chunk count written")
	}
}

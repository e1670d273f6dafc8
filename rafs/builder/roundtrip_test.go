package builder

import (
	"bytes"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	v5 "github.com/rafsd/rafsd/rafs/v5"
	v6 "github.com/rafsd/rafsd/rafs/v6"
)

type format struct {
	version int
	write   func(w *bytes.Buffer, img *rafs.Image) error
	read    func(b []byte) (*rafs.Image, error)
}

var formats = []format{
	{5, func(w *bytes.Buffer, img *rafs.Image) error { return v5.Write(w, img) },
		func(b []byte) (*rafs.Image, error) { return v5.Read(bytes.NewReader(b), int64(len(b))) }},
	{6, func(w *bytes.Buffer, img *rafs.Image) error { return v6.Write(w, img) },
		func(b []byte) (*rafs.Image, error) { return v6.Read(bytes.NewReader(b), int64(len(b))) }},
}

// roundTrips returns img and img written and read back through each
// on-disk format.
func roundTrips(t testing.TB, img *rafs.Image) []*rafs.Image {
	t.Helper()
	out := []*rafs.Image{img}
	for _, f := range formats {
		c := *img
		c.Version = f.version
		var buf bytes.Buffer
		if err := f.write(&buf, &c); err != nil {
			t.Fatalf("write v%d: %v", f.version, err)
		}
		got, err := f.read(buf.Bytes())
		if err != nil {
			t.Fatalf("read v%d: %v", f.version, err)
		}
		if len(got.Blobs) != len(c.Blobs) {
			t.Fatalf("v%d: %d blobs, wrote %d", f.version, len(got.Blobs), len(c.Blobs))
		}
		for k, b := range c.Blobs {
			g := got.Blobs[k]
			if g.ID != b.ID || g.Compressor != b.Compressor || g.Digester != b.Digester || g.ChunkCount != b.ChunkCount ||
				g.CompressedSize != b.CompressedSize || g.UncompressedSize != b.UncompressedSize {
				t.Errorf("v%d: blob %d read back as %+v, wrote %+v", f.version, k, g, b)
			}
			if f.version == 6 && (g.Meta != b.Meta || g.Features != b.Features) {
				t.Errorf("v6: blob %d meta %+v features %#x, wrote %+v %#x", k, g.Meta, g.Features, b.Meta, b.Features)
			}
		}
		out = append(out, got)
	}
	return out
}

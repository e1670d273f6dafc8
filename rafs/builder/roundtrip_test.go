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
		out = append(out, got)
	}
	return out
}

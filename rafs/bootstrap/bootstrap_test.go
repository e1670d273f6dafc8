package bootstrap

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsd/rafsd/internal/testutil"
)

var fixtures = testutil.NydusFixtures()

func TestVersion(t *testing.T) {
	v6 := make([]byte, 2048)
	copy(v6[1024:], []byte{0xe2, 0xe1, 0xf5, 0xe0})
	cases := []struct {
		hdr  []byte
		want int
	}{
		{[]byte("SFAR\x00\x05\x00\x00"), 5},
		{v6, 6},
		{make([]byte, 2048), 0},
		{nil, 0},
		{v6[:1026], 0},
	}
	for k, c := range cases {
		if got := Version(c.hdr); got != c.want {
			t.Errorf("case %d: %d, want %d", k, got, c.want)
		}
	}
}

func TestOpenFixtures(t *testing.T) {
	for _, c := range []struct {
		name    string
		version int
	}{{"v5-none-sha256", 5}, {"v6-zstd-blake3", 6}} {
		t.Run(c.name, func(t *testing.T) { testFixture(t, c.name, c.version) })
	}
}

func testFixture(t *testing.T, name string, version int) {
	img, err := Open(filepath.Join(fixtures, name, "bootstrap"))
	if err != nil {
		t.Fatal(err)
	}
	if img.Version != version || len(img.Blobs) != 1 {
		t.Fatalf("version %d, %d blobs", img.Version, len(img.Blobs))
	}
	// Write dispatches on Version; the result reads back the same.
	p := filepath.Join(t.TempDir(), "boot")
	if err := WriteFile(p, img); err != nil {
		t.Fatal(err)
	}
	again, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(again.Inodes) != len(img.Inodes) || again.Blobs[0].ID != img.Blobs[0].ID {
		t.Errorf("rewrite differs")
	}
}

func TestRejects(t *testing.T) {
	for name, data := range map[string][]byte{
		"empty":   nil,
		"zeros":   make([]byte, 8192),
		"short":   []byte("RAF"),
		"v5-junk": append([]byte("SFAR"), make([]byte, 100)...),
	} {
		_, err := Read(bytes.NewReader(data), int64(len(data)))
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := Read(bytes.NewReader(make([]byte, 4096)), 4096); !errors.Is(err, ErrUnknownFormat) {
		t.Errorf("zeros: %v", err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func FuzzRead(f *testing.F) {
	for _, p := range []string{"v5-none-sha256/bootstrap", "v6-zstd-blake3/bootstrap"} {
		if b, err := os.ReadFile(filepath.Join(fixtures, p)); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("SFAR"))
	f.Fuzz(func(t *testing.T, data []byte) {
		img, err := Read(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		if err := img.Validate(); err != nil {
			t.Fatalf("decoded an invalid image: %v", err)
		}
	})
}

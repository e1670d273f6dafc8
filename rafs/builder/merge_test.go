package builder

import (
	"archive/tar"
	"bytes"
	"context"
	"path"
	"sort"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/rafs"
)

// entry is one member of a test layer.
type entry struct {
	name    string
	typ     byte // tar.TypeReg, TypeDir, TypeSymlink, TypeLink
	content string
}

func layerTar(t *testing.T, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: 0o644, Format: tar.FormatPAX}
		switch e.typ {
		case tar.TypeReg:
			h.Size = int64(len(e.content))
		case tar.TypeDir:
			h.Mode = 0o755
		case tar.TypeSymlink, tar.TypeLink:
			h.Linkname = e.content
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write([]byte(e.content))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// refState is the overlay reference: path -> "type:content".
type refState map[string]string

func removeTree(s refState, p string) {
	for k := range s {
		if k == p || strings.HasPrefix(k, p+"/") {
			delete(s, k)
		}
	}
}

// applyRef applies a layer with the OCI image-spec rules, written
// independently of the builder: whiteouts of a layer act on the layers
// below it, then its entries are added (a non-directory replaces whatever
// was at its path, a directory over a directory merges).
func applyRef(s refState, entries []entry) {
	for _, e := range entries {
		dir, base := path.Split(strings.TrimSuffix(e.name, "/"))
		dir = strings.TrimSuffix(dir, "/")
		switch {
		case base == ".wh..wh..opq":
			for k := range s {
				if strings.HasPrefix(k, dir+"/") {
					delete(s, k)
				}
			}
		case strings.HasPrefix(base, ".wh."):
			removeTree(s, path.Join(dir, base[4:]))
		}
	}
	for _, e := range entries {
		name := strings.TrimSuffix(e.name, "/")
		if strings.HasPrefix(path.Base(name), ".wh.") {
			continue
		}
		// Parents become (or stay) directories.
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			if v, ok := s[d]; ok && v != "dir:" {
				removeTree(s, d)
			}
			if _, ok := s[d]; !ok {
				s[d] = "dir:"
			}
		}
		switch e.typ {
		case tar.TypeDir:
			if v, ok := s[name]; ok && v != "dir:" {
				removeTree(s, name)
			}
			s[name] = "dir:"
		case tar.TypeLink:
			removeTree(s, name)
			s[name] = s[e.content]
		case tar.TypeSymlink:
			removeTree(s, name)
			s[name] = "sym:" + e.content
		default:
			removeTree(s, name)
			s[name] = "reg:" + e.content
		}
	}
}

// imageState lists an image like refState, reading file contents.
func imageState(t *testing.T, img *rafs.Image, b built) refState {
	t.Helper()
	s := refState{}
	err := img.Walk(func(p string, i *rafs.Inode) error {
		if p == "/" {
			return nil
		}
		p = strings.TrimPrefix(p, "/")
		switch {
		case i.IsDir():
			s[p] = "dir:"
		case i.IsSymlink():
			s[p] = "sym:" + i.Target
		default:
			data := make([]byte, i.Size)
			if i.Size > 0 {
				if _, err := img.ReadAt(context.Background(), b.reader(), i, data, 0); err != nil {
					return err
				}
			}
			s[p] = "reg:" + string(data)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func diffStates(t *testing.T, what string, want, got refState) {
	t.Helper()
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if want[k] != got[k] {
			t.Errorf("%s: %s: want %.40q got %.40q", what, k, want[k], got[k])
		}
	}
}

var testLayers = [][]entry{
	{
		{"a/", tar.TypeDir, ""},
		{"a/x", tar.TypeReg, "x v1"},
		{"a/b/y", tar.TypeReg, "y v1"},
		{"a/b/deep/z", tar.TypeReg, "z v1"},
		{"c/", tar.TypeDir, ""},
		{"c/1", tar.TypeReg, "one"},
		{"c/sub/2", tar.TypeReg, "two"},
		{"e/file-becomes-dir", tar.TypeReg, "file"},
		{"e/dir-becomes-file/inner", tar.TypeReg, "inner"},
		{"h/orig", tar.TypeReg, "hardlinked"},
		{"h/link", tar.TypeLink, "h/orig"},
		{"s", tar.TypeSymlink, "a/x"},
		{".wh.nothing-below", tar.TypeReg, ""},
	},
	{
		{"a/.wh.x", tar.TypeReg, ""},
		{"a/b/y", tar.TypeReg, "y v2"},
		{"c/.wh..wh..opq", tar.TypeReg, ""},
		{"c/new", tar.TypeReg, "new in opaque dir"},
		{"d/.wh.ghost", tar.TypeReg, ""},
		{"d/f", tar.TypeReg, "d file"},
		{"e/file-becomes-dir/", tar.TypeDir, ""},
		{"e/file-becomes-dir/in", tar.TypeReg, "in"},
		{"e/dir-becomes-file", tar.TypeReg, "now a file"},
		{"h/.wh.orig", tar.TypeReg, ""},
	},
	{
		{"a/x", tar.TypeReg, "x v3"},
		{"a/b/.wh.deep", tar.TypeReg, ""},
		{".wh.c", tar.TypeReg, ""},
		{"c2/1", tar.TypeReg, "d file"}, // same data as layer 1's d/f: deduplicated
		{"s", tar.TypeReg, "symlink replaced by file"},
	},
}

func TestMerge(t *testing.T) {
	ref := refState{}
	blobDir := t.TempDir()
	var lone []*rafs.Image // each layer built alone
	var chained *rafs.Image
	var chain built
	for k, l := range testLayers {
		data := layerTar(t, l)
		applyRef(ref, l)
		b := build(t, Options{ChunkSize: 4096}, blobDir, func(b *Builder) error { return b.AddTar(context.Background(), bytes.NewReader(data)) })
		lone = append(lone, b.img)
		// Built on its parent (nydus-image --parent-bootstrap).
		chain = build(t, Options{ChunkSize: 4096, Parent: chained}, blobDir, func(b *Builder) error { return b.AddTar(context.Background(), bytes.NewReader(data)) })
		chained = chain.img
		got := imageState(t, chained, chain)
		if k == 0 {
			// A layer built alone keeps its whiteouts for a later merge.
			if got[".wh.nothing-below"] != "reg:" {
				t.Errorf("lone layer lost its whiteout: %v", got)
			}
			delete(got, ".wh.nothing-below")
		}
		diffStates(t, "parent chain layer "+string(rune('0'+k)), ref, got)

		merged, err := Merge(lone, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, img := range roundTrips(t, merged) {
			diffStates(t, "merge of layers 0.."+string(rune('0'+k)), ref, imageState(t, img, chain))
		}
		if len(merged.Blobs) != k+1 {
			t.Errorf("merge of %d layers: %d blobs", k+1, len(merged.Blobs))
		}
	}
	// Layer 2 of the chain stored no chunk for c2/1 (its data is in layer 1).
	if got := len(chained.Blobs); got != 3 {
		t.Errorf("chained image has %d blobs, want 3", got)
	}
	top := chained.Blobs[len(chained.Blobs)-1]
	// x v3 and "symlink replaced by file": two new chunks only.
	if top.ChunkCount != 2 {
		t.Errorf("top layer stored %d chunks, want 2", top.ChunkCount)
	}
}

// TestChunkDict checks that chunks found in a dictionary image are
// referenced, not stored, and that only used dictionary blobs are added.
func TestChunkDict(t *testing.T) {
	blobDir := t.TempDir()
	mk := func(content string, dicts ...*rafs.Image) built {
		data := layerTar(t, []entry{{"f", tar.TypeReg, content}, {"g", tar.TypeReg, content + "!"}})
		return build(t, Options{ChunkSize: 4096, ChunkDicts: dicts}, blobDir, func(b *Builder) error {
			return b.AddTar(context.Background(), bytes.NewReader(data))
		})
	}
	d1 := mk("dict one")
	d2 := mk("dict two")
	b := build(t, Options{ChunkSize: 4096, ChunkDicts: []*rafs.Image{d1.img, d2.img}}, blobDir, func(b *Builder) error {
		return b.AddTar(context.Background(), bytes.NewReader(layerTar(t, []entry{{"x", tar.TypeReg, "dict one"}, {"y", tar.TypeReg, "fresh"}})))
	})
	if len(b.img.Blobs) != 2 || b.img.Blobs[0].ID != d1.blob.ID || b.blob.ChunkCount != 1 {
		t.Fatalf("blobs %d (want dict one + new), new chunks %d", len(b.img.Blobs), b.blob.ChunkCount)
	}
	diffStates(t, "chunk dict", refState{"x": "reg:dict one", "y": "reg:fresh"}, imageState(t, b.img, b))
}

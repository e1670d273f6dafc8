package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

func startRegistry(t testing.TB) *registrytest.Registry {
	return registrytest.Start(t, registrytest.Options{})
}

// entry is one tar entry of a test layer.
type entry struct {
	name     string
	typ      byte
	mode     int64
	uid, gid int
	data     []byte
	link     string
	mtime    time.Time
}

func dir(name string, mode int64) entry { return entry{name: name, typ: tar.TypeDir, mode: mode} }
func file(name string, mode int64, data []byte) entry {
	return entry{name: name, typ: tar.TypeReg, mode: mode, data: data}
}
func owned(e entry, uid, gid int) entry { e.uid, e.gid = uid, gid; return e }
func symlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeSymlink, mode: 0o777, link: target}
}
func hardlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeLink, mode: 0o644, link: target}
}
func whiteout(name string) entry              { return file(name, 0o644, nil) }
func fileStr(name, s string) entry            { return file(name, 0o644, []byte(s)) }
func execFile(name string, data []byte) entry { return file(name, 0o755, data) }

var testEpoch = time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)

// layerTar writes entries as a tar, compressed with comp ("", "gzip", "zstd").
func layerTar(t testing.TB, comp string, es []entry) (blob []byte, mediaType string, diffID digest.Digest) {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, e := range es {
		mt := e.mtime
		if mt.IsZero() {
			mt = testEpoch
		}
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid, ModTime: mt, Linkname: e.link, Format: tar.FormatPAX}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			tw.Write(e.data)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	diffID = digest.FromBytes(raw.Bytes())
	switch comp {
	case "":
		return raw.Bytes(), ocispec.MediaTypeImageLayer, diffID
	case "gzip":
		var b bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&b, gzip.BestSpeed)
		zw.Write(raw.Bytes())
		zw.Close()
		return b.Bytes(), ocispec.MediaTypeImageLayerGzip, diffID
	case "zstd":
		var b bytes.Buffer
		zw, _ := zstd.NewWriter(&b)
		zw.Write(raw.Bytes())
		zw.Close()
		return b.Bytes(), ocispec.MediaTypeImageLayerZstd, diffID
	}
	t.Fatalf("compression %q", comp)
	return
}

// ociImage is a test image: its blobs by digest and its manifest.
type ociImage struct {
	blobs    map[digest.Digest][]byte
	manifest ocispec.Descriptor
	layers   [][]byte // uncompressed-or-not layer blobs, lowest first
}

func (im *ociImage) add(mediaType string, b []byte) ocispec.Descriptor {
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	im.blobs[d.Digest] = b
	return d
}

func newOCIImage(t testing.TB, layers ...[]entry) *ociImage {
	t.Helper()
	return newOCIImageComp(t, []string{"gzip", "", "zstd"}, layers...)
}

// newOCIImageComp is newOCIImage with layer i compressed by comps[i%len(comps)].
func newOCIImageComp(t testing.TB, comps []string, layers ...[]entry) *ociImage {
	t.Helper()
	im := &ociImage{blobs: map[digest.Digest][]byte{}}
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}}
	cfg.RootFS.Type = "layers"
	cfg.Config.Cmd = []string{"/bin/sh"}
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	man.SchemaVersion = 2
	for i, es := range layers {
		b, mt, diffID := layerTar(t, comps[i%len(comps)], es)
		man.Layers = append(man.Layers, im.add(mt, b))
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, diffID)
		cfg.History = append(cfg.History, ocispec.History{CreatedBy: fmt.Sprintf("layer %d", i)})
		im.layers = append(im.layers, b)
	}
	cb, _ := json.Marshal(cfg)
	man.Config = im.add(ocispec.MediaTypeImageConfig, cb)
	mb, _ := json.Marshal(man)
	im.manifest = im.add(ocispec.MediaTypeImageManifest, mb)
	im.manifest.Platform = &cfg.Platform
	return im
}

// push uploads the image with containerd's pusher (children first).
func (im *ociImage) push(t testing.TB, ref string) {
	t.Helper()
	im.pushWith(t, ref, RegistryOptions{PlainHTTP: true})
}

// pushWith is push with registry options (credentials).
func (im *ociImage) pushWith(t testing.TB, ref string, ro RegistryOptions) {
	t.Helper()
	ctx := context.Background()
	p, err := newPusher(ctx, ref, ro)
	if err != nil {
		t.Fatal(err)
	}
	var man ocispec.Manifest
	json.Unmarshal(im.blobs[im.manifest.Digest], &man)
	for _, d := range append(man.Layers, man.Config) {
		if _, err := p.pushBytes(ctx, d, im.blobs[d.Digest]); err != nil {
			t.Fatal(err)
		}
	}
	md := im.manifest
	md.Platform = nil
	if _, err := p.pushBytes(ctx, md, im.blobs[md.Digest]); err != nil {
		t.Fatal(err)
	}
}

// writeOCILayout writes the image as an OCI image layout directory.
func (im *ociImage) writeOCILayout(t testing.TB, dir string) {
	t.Helper()
	bd := filepath.Join(dir, "blobs", "sha256")
	os.MkdirAll(bd, 0o755)
	for d, b := range im.blobs {
		os.WriteFile(filepath.Join(bd, d.Encoded()), b, 0o644)
	}
	os.WriteFile(filepath.Join(dir, ocispec.ImageLayoutFile), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
	md := im.manifest
	md.Annotations = map[string]string{ocispec.AnnotationRefName: "v1"}
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{md}}
	idx.SchemaVersion = 2
	b, _ := json.Marshal(idx)
	os.WriteFile(filepath.Join(dir, "index.json"), b, 0o644)
}

// writeDockerArchive writes the image as `docker save` does (layer tars
// uncompressed is docker's choice; compressed ones are accepted too).
func (im *ociImage) writeDockerArchive(t testing.TB, name string) {
	t.Helper()
	var man ocispec.Manifest
	json.Unmarshal(im.blobs[im.manifest.Digest], &man)
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	put := func(n string, b []byte) {
		tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg, ModTime: testEpoch})
		tw.Write(b)
	}
	entry := dockerManifestEntry{Config: man.Config.Digest.Encoded() + ".json", RepoTags: []string{"test:v1"}}
	put(entry.Config, im.blobs[man.Config.Digest])
	for i, l := range man.Layers {
		n := fmt.Sprintf("layer%d/layer.tar", i)
		put(n, im.blobs[l.Digest])
		entry.Layers = append(entry.Layers, n)
	}
	b, _ := json.Marshal([]dockerManifestEntry{entry})
	put("manifest.json", b)
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}

// applyLayers unpacks layer blobs into dir with overlay semantics, the
// oracle the converted image is compared with: per layer, whiteouts and
// opaque markers first remove what lower layers put there, then entries are
// extracted (replacing, never writing through, what is there).
func applyLayers(t testing.TB, root string, layers [][]byte) {
	t.Helper()
	for li, blob := range layers {
		var r io.Reader = bytes.NewReader(blob)
		switch {
		case bytes.HasPrefix(blob, []byte{0x1f, 0x8b}):
			zr, err := gzip.NewReader(r)
			if err != nil {
				t.Fatal(err)
			}
			r = zr
		case bytes.HasPrefix(blob, []byte{0x28, 0xb5, 0x2f, 0xfd}):
			zr, err := zstd.NewReader(r)
			if err != nil {
				t.Fatal(err)
			}
			r = zr
		}
		tr := tar.NewReader(r)
		type ent struct {
			h    *tar.Header
			data []byte
		}
		var es []ent
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("layer %d: %v", li, err)
			}
			data, _ := io.ReadAll(tr)
			es = append(es, ent{h, data})
		}
		for _, e := range es {
			name := filepath.Clean("/" + e.h.Name)
			base, parent := filepath.Base(name), filepath.Dir(name)
			switch {
			case base == ".wh..wh..opq":
				kids, _ := os.ReadDir(filepath.Join(root, parent))
				for _, k := range kids {
					os.RemoveAll(filepath.Join(root, parent, k.Name()))
				}
			case strings.HasPrefix(base, ".wh."):
				os.RemoveAll(filepath.Join(root, parent, strings.TrimPrefix(base, ".wh.")))
			}
		}
		var dirs []*tar.Header
		for _, e := range es {
			h := e.h
			name := filepath.Clean("/" + h.Name)
			if strings.HasPrefix(filepath.Base(name), ".wh.") || name == "/" {
				continue
			}
			p := filepath.Join(root, name)
			os.MkdirAll(filepath.Dir(p), 0o755)
			if fi, err := os.Lstat(p); err == nil && !(fi.IsDir() && h.Typeflag == tar.TypeDir) {
				os.RemoveAll(p)
			}
			var err error
			switch h.Typeflag {
			case tar.TypeDir:
				if err = os.MkdirAll(p, 0o755); err == nil {
					dirs = append(dirs, h)
				}
			case tar.TypeReg:
				err = os.WriteFile(p, e.data, 0o600)
			case tar.TypeSymlink:
				err = os.Symlink(h.Linkname, p)
			case tar.TypeLink:
				err = os.Link(filepath.Join(root, filepath.Clean("/"+h.Linkname)), p)
			default:
				t.Fatalf("oracle: entry type %c", h.Typeflag)
			}
			if err != nil {
				t.Fatalf("oracle: %s: %v", name, err)
			}
			if h.Typeflag == tar.TypeLink {
				continue
			}
			if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
				t.Fatal(err)
			}
			if h.Typeflag != tar.TypeSymlink {
				os.Chmod(p, fs.FileMode(h.Mode&0o777)|modeBits(h.Mode))
				os.Chtimes(p, h.ModTime, h.ModTime)
			}
		}
		for _, h := range dirs {
			p := filepath.Join(root, filepath.Clean("/"+h.Name))
			os.Chtimes(p, h.ModTime, h.ModTime)
		}
	}
}

func modeBits(m int64) fs.FileMode {
	var out fs.FileMode
	if m&0o4000 != 0 {
		out |= fs.ModeSetuid
	}
	if m&0o2000 != 0 {
		out |= fs.ModeSetgid
	}
	if m&0o1000 != 0 {
		out |= fs.ModeSticky
	}
	return out
}

// snapshot describes a tree for comparison: per path its type, mode,
// owner, size, content hash or link target, and for files the mtime; plus
// the hardlink groups.
func snapshot(t testing.TB, root string) (map[string]string, []string) {
	t.Helper()
	out := map[string]string{}
	links := map[[2]uint64][]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		desc := fmt.Sprintf("%v uid=%d gid=%d", fi.Mode(), st.Uid, st.Gid)
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			desc += fmt.Sprintf(" size=%d sha256=%s mtime=%d nlink=%d", len(b), hex.EncodeToString(sum[:8]), fi.ModTime().Unix(), st.Nlink)
			links[[2]uint64{st.Dev, st.Ino}] = append(links[[2]uint64{st.Dev, st.Ino}], rel)
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			desc += " -> " + l
		}
		if rel != "." {
			out[rel] = desc
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var groups []string
	for _, g := range links {
		if len(g) > 1 {
			sort.Strings(g)
			groups = append(groups, strings.Join(g, "="))
		}
	}
	sort.Strings(groups)
	return out, groups
}

func compareTrees(t testing.TB, want, got string) {
	t.Helper()
	w, wl := snapshot(t, want)
	g, gl := snapshot(t, got)
	var keys []string
	for k := range w {
		keys = append(keys, k)
	}
	for k := range g {
		if _, ok := w[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	bad := 0
	for _, k := range keys {
		if w[k] != g[k] {
			t.Errorf("%s:\n  want %q\n  got  %q", k, w[k], g[k])
			if bad++; bad > 20 {
				t.Fatal("too many differences")
			}
		}
	}
	if strings.Join(wl, " ") != strings.Join(gl, " ") {
		t.Errorf("hardlink groups:\n  want %v\n  got  %v", wl, gl)
	}
	if len(w) < 5 {
		t.Fatalf("oracle tree has only %d entries", len(w))
	}
}

// pseudoRandom returns n incompressible bytes from seed.
func pseudoRandom(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

var _ = images.IsLayerType

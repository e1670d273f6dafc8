package clients

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// entry is one tar entry of a test layer.
type entry struct {
	name string
	typ  byte
	mode int64
	data []byte
	link string
}

var epoch = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// pseudoRandom returns n incompressible-ish deterministic bytes.
func pseudoRandom(seed uint64, n int) []byte {
	b := make([]byte, n)
	x := seed*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

// testImage is the OCI image the scenarios run: a static busybox for the
// shell and md5sum, and data files across two layers (one replaced, one
// whited out, several spanning 1 MiB chunk boundaries).
type testImage struct {
	layers [][]entry
	// files are the /data files and their final contents.
	files map[string][]byte
}

func newTestImage(t testing.TB) *testImage {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("static busybox (Debian package busybox-static; run .ci/deps): %v", err)
	}
	dir := func(n string) entry { return entry{name: n, typ: tar.TypeDir, mode: 0o755} }
	reg := func(n string, mode int64, b []byte) entry {
		return entry{name: n, typ: tar.TypeReg, mode: mode, data: b}
	}
	sym := func(n, target string) entry { return entry{name: n, typ: tar.TypeSymlink, mode: 0o777, link: target} }
	l1 := []entry{
		dir("bin/"), reg("bin/busybox", 0o755, bb),
		sym("bin/sh", "busybox"), sym("bin/md5sum", "busybox"), sym("bin/sleep", "busybox"),
		sym("bin/cat", "busybox"), sym("bin/ls", "busybox"), sym("bin/echo", "busybox"),
		dir("data/"),
		reg("data/a", 0o644, pseudoRandom(1, 1<<20+513)),
		reg("data/b", 0o644, pseudoRandom(2, 3<<20+7)),
		reg("data/gone", 0o644, []byte("whited out by layer 2\n")),
		reg("data/small", 0o644, []byte("layer 1\n")),
		dir("etc/"), reg("etc/hostname", 0o644, []byte("rafsd\n")),
		dir("tmp/"),
	}
	l2 := []entry{
		dir("data/"),
		reg("data/.wh.gone", 0o644, nil),
		reg("data/small", 0o644, []byte("layer 2 replaced it\n")),
		reg("data/c", 0o644, pseudoRandom(3, 2<<20+123)),
		reg("data/empty", 0o644, nil),
		reg("data/zeros", 0o644, make([]byte, 1<<20)),
	}
	files := map[string][]byte{}
	for _, l := range [][]entry{l1, l2} {
		for _, e := range l {
			if strings.HasPrefix(e.name, "data/") && e.typ == tar.TypeReg && !strings.Contains(e.name, ".wh.") {
				files[e.name] = e.data
			}
		}
	}
	delete(files, "data/gone")
	files["bin/busybox"] = bb
	return &testImage{layers: [][]entry{l1, l2}, files: files}
}

// expectedSums is what `md5sum` prints for the image's files, sorted.
func (im *testImage) expectedSums() []string {
	var out []string
	for n, b := range im.files {
		s := md5.Sum(b)
		out = append(out, hex.EncodeToString(s[:])+"  /"+n)
	}
	sort.Strings(out)
	return out
}

// names are the files' absolute paths, for the container's command line.
func (im *testImage) names() []string {
	var out []string
	for n := range im.files {
		out = append(out, "/"+n)
	}
	sort.Strings(out)
	return out
}

func layerBlob(t testing.TB, es []entry) (blob []byte, diffID digest.Digest) {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, ModTime: epoch, Linkname: e.link, Format: tar.FormatPAX}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	zw.Write(raw.Bytes())
	zw.Close()
	return gz.Bytes(), digest.FromBytes(raw.Bytes())
}

// push uploads the image as an OCI image to ref (plain HTTP) with
// containerd's pusher, children before the manifest.
func (im *testImage) push(t testing.TB, ref string) {
	t.Helper()
	ctx := context.Background()
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}}
	cfg.RootFS.Type = "layers"
	cfg.Config.Cmd = []string{"/bin/sh"}
	cfg.Config.Env = []string{"PATH=/bin"}
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	man.SchemaVersion = 2
	blobs := map[digest.Digest][]byte{}
	add := func(mt string, b []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
		blobs[d.Digest] = b
		return d
	}
	for _, l := range im.layers {
		b, diffID := layerBlob(t, l)
		man.Layers = append(man.Layers, add(ocispec.MediaTypeImageLayerGzip, b))
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, diffID)
	}
	cb, _ := json.Marshal(cfg)
	man.Config = add(ocispec.MediaTypeImageConfig, cb)
	mb, _ := json.Marshal(man)
	md := add(ocispec.MediaTypeImageManifest, mb)

	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts))})
	p, err := resolver.Pusher(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range append(append([]ocispec.Descriptor{}, man.Layers...), man.Config, md) {
		w, err := p.Push(ctx, d)
		if errdefs.IsAlreadyExists(err) {
			continue
		}
		if err != nil {
			t.Fatalf("push %s: %v", d.Digest, err)
		}
		if _, err := w.Write(blobs[d.Digest]); err != nil {
			t.Fatalf("push %s: %v", d.Digest, err)
		}
		if err := w.Commit(ctx, d.Size, d.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
			t.Fatalf("push %s: commit: %v", d.Digest, err)
		}
		w.Close()
	}
}

// parseSums turns md5sum output into sorted "sum  path" lines.
func parseSums(out string) []string {
	var got []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) == 2 && len(f[0]) == 32 {
			got = append(got, f[0]+"  "+f[1])
		}
	}
	sort.Strings(got)
	return got
}

func sameLines(a, b []string) error {
	if strings.Join(a, "\n") != strings.Join(b, "\n") {
		return fmt.Errorf("got\n%s\nwant\n%s", strings.Join(a, "\n"), strings.Join(b, "\n"))
	}
	return nil
}

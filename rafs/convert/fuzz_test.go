package convert

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// limitWriter fails writes past n bytes, so a fuzzed bootstrap layer that
// claims a huge entry cannot fill memory.
type limitWriter struct{ n int }

func (w *limitWriter) Write(p []byte) (int, error) {
	if w.n -= len(p); w.n < 0 {
		return 0, io.ErrShortWrite
	}
	return len(p), nil
}

// FuzzExtractBootstrap feeds hostile bootstrap layers (the bytes a registry
// returns for the layer annotated nydus-bootstrap) to ExtractBootstrap.
func FuzzExtractBootstrap(f *testing.F) {
	good, _, err := packBootstrap([]byte("not really a bootstrap, but bytes"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte{})
	f.Add([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff})
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		var out bytes.Buffer
		err := ExtractBootstrap(bytes.NewReader(data), io.MultiWriter(&out, &limitWriter{n: 64 << 20}))
		if err == nil && out.Len() == 0 && bytes.Equal(data, good) {
			t.Fatal("good layer extracted nothing")
		}
	})
}

// FuzzDockerArchive opens hostile docker-archive tars and reads every blob
// the synthesized manifest names, through the digest check.
func FuzzDockerArchive(f *testing.F) {
	im := newOCIImage(f, []entry{fileStr("a", "a")})
	name := filepath.Join(f.TempDir(), "seed.tar")
	im.writeDockerArchive(f, name)
	seed, err := os.ReadFile(name)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add(seed[:1024])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := newDockerArchive(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		defer a.close()
		ctx := context.Background()
		root, _ := a.root(ctx)
		var man ocispec.Manifest
		if _, err := readJSON(ctx, a, root, &man); err != nil {
			t.Fatalf("synthesized manifest unreadable: %v", err)
		}
		for _, d := range append(man.Layers, man.Config) {
			rc, err := a.fetch(ctx, d)
			if err != nil {
				t.Fatal(err)
			}
			vr, err := newVerifiedReader(rc, d)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, vr); err != nil {
				t.Fatalf("blob %s fails its own digest: %v", d.Digest, err)
			}
		}
	})
}

// TestHostileSources: a source whose blobs do not match their descriptors,
// or that is already a Nydus image, is refused with an error naming why.
func TestHostileSources(t *testing.T) {
	reg := startRegistry(t)
	ro := RegistryOptions{PlainHTTP: true}
	layers := [][]entry{{dir("d", 0o755), file("d/f", 0o644, pseudoRandom(5, 100_000))}}
	var man ocispec.Manifest

	for _, tc := range []struct {
		name   string
		mutate func(t *testing.T, layout string)
		want   string
	}{
		{"corrupt layer", func(t *testing.T, layout string) {
			p := filepath.Join(layout, "blobs", "sha256", man.Layers[0].Digest.Encoded())
			b, _ := os.ReadFile(p)
			b[len(b)-20] ^= 0xff
			os.WriteFile(p, b, 0o644)
		}, "layer sha256:"},
		{"substituted layer", func(t *testing.T, layout string) {
			// Same size, same shape, other bytes: only the digest tells.
			b, _, _ := layerTar(t, "gzip", []entry{dir("d", 0o755), file("d/f", 0o644, pseudoRandom(6, 100_000))})
			if int64(len(b)) != man.Layers[0].Size {
				t.Skipf("substitute is %d bytes, not %d", len(b), man.Layers[0].Size)
			}
			os.WriteFile(filepath.Join(layout, "blobs", "sha256", man.Layers[0].Digest.Encoded()), b, 0o644)
		}, "digest mismatch"},
		{"truncated layer", func(t *testing.T, layout string) {
			p := filepath.Join(layout, "blobs", "sha256", man.Layers[0].Digest.Encoded())
			b, _ := os.ReadFile(p)
			os.WriteFile(p, b[:len(b)-100], 0o644)
		}, ""},
		{"corrupt config", func(t *testing.T, layout string) {
			p := filepath.Join(layout, "blobs", "sha256", man.Config.Digest.Encoded())
			os.WriteFile(p, []byte(`{"architecture":"evil"}`), 0o644)
		}, "config"},
		{"no index", func(t *testing.T, layout string) { os.Remove(filepath.Join(layout, "index.json")) }, "index.json"},
		{"missing layer", func(t *testing.T, layout string) {
			os.Remove(filepath.Join(layout, "blobs", "sha256", man.Layers[0].Digest.Encoded()))
		}, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := newOCIImage(t, layers...)
			json.Unmarshal(im.blobs[im.manifest.Digest], &man)
			layout := t.TempDir()
			im.writeOCILayout(t, layout)
			tc.mutate(t, layout)
			_, err := Convert(context.Background(), "oci-layout:"+layout, reg.Addr+"/hostile/x:1", Options{Target: ro})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}

	t.Run("already nydus", func(t *testing.T) {
		im := newOCIImage(t, layers...)
		layout := t.TempDir()
		im.writeOCILayout(t, layout)
		target := reg.Addr + "/hostile/nydus:1"
		if _, err := Convert(context.Background(), "oci-layout:"+layout, target, Options{Target: ro}); err != nil {
			t.Fatal(err)
		}
		_, err := Convert(context.Background(), target, reg.Addr+"/hostile/nydus:2", Options{Source: ro, Target: ro})
		if err == nil || !strings.Contains(err.Error(), "already a Nydus image") {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("FetchBootstrap of an OCI image", func(t *testing.T) {
		im := newOCIImage(t, layers...)
		im.push(t, reg.Addr+"/hostile/oci:1")
		_, err := FetchBootstrap(context.Background(), reg.Addr+"/hostile/oci:1", filepath.Join(t.TempDir(), "b"), ro)
		if err == nil || !strings.Contains(err.Error(), "not a Nydus image") {
			t.Fatalf("err = %v", err)
		}
	})
}

package convert

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/rafsd/rafsd/internal/testutil"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/zran"
	"github.com/rafsd/rafsd/testbed"
)

// buildRafsd builds cmd/rafsd (once per test binary) and returns its path.
func buildRafsd(t *testing.T) string {
	t.Helper()
	bin, err := testbed.BuildStatic(context.Background(), "./cmd/rafsd")
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// startRafsdImage runs `rafsd fuse --image ref` on mnt with its own image
// directory (bootstrap, generated config, blob cache) and waits for the
// mount.
func startRafsdImage(t *testing.T, bin, ref, mnt string) {
	t.Helper()
	work := t.TempDir()
	testutil.StartRafsdFUSE(t, bin, mnt, []string{"RAFSD_IMAGE_DIR=" + filepath.Join(work, "images")},
		"--image", ref, "--apisock", filepath.Join(work, "api.sock"), "--log-level", "warn")
}

// TestOCIRef converts a multi-layer gzip image with OCIRef into the
// repository that holds it: nothing but the ref blobs (the layers' blob
// meta in nydus's layout), the bootstrap layer, config and manifest is
// uploaded, the data blobs are the OCI layers, and rafsd started
// from the reference serves the overlay unpack of the layers, reading
// ranges of the gzip layers from the registry. Flipped bytes in a stored
// layer give EIO, never wrong bytes.
func TestOCIRef(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root for the FUSE mount (CI runs tests as root)")
	}
	bin := buildRafsd(t)
	reg := startRegistry(t)
	ro := RegistryOptions{PlainHTTP: true}
	im := newOCIImageComp(t, []string{"gzip"}, testLayers()...)
	im.push(t, reg.Addr+"/ociref/app:oci")
	ref := reg.Addr + "/ociref/app:nydus-oci-ref"
	res, err := Convert(context.Background(), reg.Addr+"/ociref/app:oci", ref, Options{OCIRef: true, ChunkSize: 256 << 10, Source: ro, Target: ro, WorkDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Blobs) != len(im.layers) {
		t.Fatalf("%d blob layers for %d OCI layers", len(res.Blobs), len(im.layers))
	}
	layerDigests := map[string]bool{}
	for _, l := range im.layers {
		layerDigests[digestOf(l)] = true
	}
	// nydusify's --oci-ref manifest: per layer a ref blob (its separate
	// blob meta) annotated with the original layer's digest; only those
	// are uploaded, the layers are in the repository already.
	refBlobs := map[string]bool{}
	for i, b := range res.Blobs {
		ib := res.Image.Blobs[i]
		if !layerDigests[b.Annotations[LayerAnnotationNydusRefLayer]] || b.Annotations[LayerAnnotationNydusBlob] != "true" ||
			b.MediaType != MediaTypeNydusBlob || "sha256:"+ib.ID != b.Annotations[LayerAnnotationNydusRefLayer] ||
			b.Digest.Encoded() != zran.MetaBlobID(ib) || b.Size != int64(ib.Meta.Size) {
			t.Errorf("blob layer %+v is not the ref blob of an OCI layer (blob %s, meta %+v)", b, ib.ID, ib.Meta)
		}
		if !ib.IsZran() || ib.Features&blobmeta.FeatureSeparate == 0 {
			t.Errorf("blob %s: features %#x", ib.ID, ib.Features)
		}
		refBlobs[b.Digest.String()] = true
	}
	for _, d := range res.Uploaded {
		if !refBlobs[d.String()] {
			t.Errorf("uploaded %s: the layers are in the repository already", d)
		}
	}

	want := filepath.Join(t.TempDir(), "want")
	os.Mkdir(want, 0o755)
	applyLayers(t, want, im.layers)
	mnt := t.TempDir()
	startRafsdImage(t, bin, ref, mnt)
	compareTrees(t, want, mnt)
	if out, err := exec.Command("diff", "-r", "--no-dereference", want, mnt).CombinedOutput(); err != nil {
		t.Fatalf("diff -r: %v\n%s", err, out)
	}

	// Corrupt the first layer (bin/tool, data/big, ...) where the registry
	// keeps it: one byte in every 512 from a quarter of it on.
	first := digestOf(im.layers[0])
	matches, _ := filepath.Glob(filepath.Join(filepath.Dir(filepath.Dir(want)), "*", "data", "docker", "registry", "v2", "blobs", "sha256", first[7:9], first[7:], "data"))
	if len(matches) != 1 {
		t.Fatalf("layer %s in the registry storage: %v", first, matches)
	}
	data, err := os.ReadFile(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	for i := len(data) / 4; i < len(data)-64; i += 512 {
		data[i] ^= 0x5a
	}
	if err := os.WriteFile(matches[0], data, 0o644); err != nil {
		t.Fatal(err)
	}
	mnt2 := t.TempDir()
	startRafsdImage(t, bin, ref, mnt2) // a fresh cache
	eio, good := 0, 0
	filepath.WalkDir(want, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		exp, _ := os.ReadFile(p)
		got, err := os.ReadFile(filepath.Join(mnt2, rel))
		switch {
		case errors.Is(err, syscall.EIO):
			eio++
		case err != nil:
			t.Errorf("%s: %v, want EIO or the right bytes", rel, err)
		case !bytes.Equal(got, exp):
			t.Errorf("%s: wrong bytes from a corrupt layer", rel)
		default:
			good++
		}
		return nil
	})
	if eio == 0 {
		t.Errorf("no EIO from a corrupt layer (%d files read fine)", good)
	}
	t.Logf("corrupt layer: %d files EIO, %d intact", eio, good)
}

func digestOf(b []byte) string { return digest.FromBytes(b).String() }

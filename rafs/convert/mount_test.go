package convert

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsd/rafsd/internal/testutil"
)

// TestMountByReference is the end-to-end path a user takes: convert an
// image, push it, then start rafsd in FUSE mode from the image reference
// alone (FetchBootstrap + DaemonConfig: bootstrap from the registry, blobs
// fetched lazily by the registry backend) and compare the mounted tree with
// the overlay unpack of the OCI layers.
func TestMountByReference(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root for the FUSE mount (CI runs tests as root)")
	}
	bin := buildRafsd(t)
	reg := startRegistry(t)
	ro := RegistryOptions{PlainHTTP: true}
	im := newOCIImage(t, testLayers()...)
	im.push(t, reg.Addr+"/mount/app:oci")
	ref := reg.Addr + "/mount/app:nydus"
	if _, err := Convert(context.Background(), reg.Addr+"/mount/app:oci", ref, Options{ChunkSize: 256 << 10, MergePlatform: true, Source: ro, Target: ro}); err != nil {
		t.Fatal(err)
	}

	work := t.TempDir()
	r, err := FetchBootstrap(context.Background(), ref, filepath.Join(work, "image.boot"), ro)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(work, "config.json")
	if err := os.WriteFile(cfgPath, r.DaemonConfig(filepath.Join(work, "cache"), true), 0o600); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(work, "mnt")
	os.Mkdir(mnt, 0o755)
	testutil.StartRafsdFUSE(t, bin, mnt, nil, "--bootstrap", r.BootstrapPath, "--config", cfgPath, "--apisock", filepath.Join(work, "api.sock"), "--log-level", "warn")
	want := filepath.Join(t.TempDir(), "want")
	os.Mkdir(want, 0o755)
	applyLayers(t, want, im.layers)
	compareTrees(t, want, mnt)
}

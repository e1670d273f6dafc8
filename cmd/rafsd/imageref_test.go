package main

import (
	"archive/tar"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/internal/testutil"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

// writeOCILayout writes src as a one-layer (tar+gzip) OCI image layout.
func writeOCILayout(t *testing.T, src, dir string) {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == src {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		h, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		h.Name, _ = filepath.Rel(src, p)
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			_, err = tw.Write(b)
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tw.Close()
	testutil.WriteOCILayout(t, dir, raw.Bytes())
}

// pushNydus converts img's tree (as a one-layer OCI image) and pushes it
// to reg as ref with `rafs-image convert` plus extra flags, logging in with
// the docker config.json in $DOCKER_CONFIG.
func pushNydus(t *testing.T, img *image, ref string, extra ...string) (layout string) {
	t.Helper()
	layout = filepath.Join(t.TempDir(), "layout")
	writeOCILayout(t, img.src, layout)
	args := append([]string{"convert", "--source", "oci-layout:" + layout, "--target", ref, "--quiet", "--chunk-size", "0x40000"}, extra...)
	if out, err := exec.Command(filepath.Join(binDir, "rafs-image"), args...).CombinedOutput(); err != nil {
		t.Fatalf("rafs-image convert: %v\n%s", err, out)
	}
	return layout
}

// loginDockerConfig points $DOCKER_CONFIG (inherited by the binaries the
// test starts) at a config.json with user:password for reg.
func loginDockerConfig(t *testing.T, reg *registrytest.Registry, user, password string) {
	dir := t.TempDir()
	conf := `{"auths": {"` + reg.Addr + `": {"auth": "` + base64.StdEncoding.EncodeToString([]byte(user+":"+password)) + `"}}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DOCKER_CONFIG", dir)
}

func diffTree(t *testing.T, want, got string) {
	t.Helper()
	if out, err := exec.Command("diff", "-r", "--no-dereference", want, got).CombinedOutput(); err != nil {
		t.Fatalf("diff -r %s %s: %v\n%s", want, got, err, out)
	}
}

// TestMountImageRef starts rafsd from an image reference alone against a
// registry with htpasswd auth: the bootstrap comes from the registry, the
// generated config reads the blobs from it, both logging in with docker's
// config.json. Then the same for an --oci-ref (zran) image.
func TestMountImageRef(t *testing.T) {
	requireRoot(t)
	reg := registrytest.Start(t, registrytest.Options{User: "u", Password: "p"})
	loginDockerConfig(t, reg, "u", "p")
	t.Setenv(imageDirEnv, t.TempDir())
	img := makeImage(t, "imageref")
	ref := reg.Addr + "/rafsd/app:nydus"
	pushNydus(t, img, ref)

	mnt := t.TempDir()
	runningDaemon(t, mnt, "--image", ref)
	diffTree(t, img.src, mnt)

	// The same tree as an --oci-ref image: its blob is the OCI layer
	// itself, read in ranges through the bootstrap's zran checkpoints.
	zref := reg.Addr + "/rafsd/app:nydus-oci-ref"
	layout := pushNydus(t, img, zref, "--oci-ref")
	zmnt := t.TempDir()
	runningDaemon(t, zmnt, "--image", zref)
	diffTree(t, img.src, zmnt)

	// With --config, that config reads the blobs: here a localfs backend
	// on a directory holding the OCI layout's blobs (the data blob is the
	// gzip layer, named by its digest) and the manifest's layers (the ref
	// blob, the layer's separate blob meta, is only in the registry), with
	// the registry gone once the bootstrap is fetched.
	blobDir := t.TempDir()
	if err := os.CopyFS(blobDir, os.DirFS(filepath.Join(layout, "blobs", "sha256"))); err != nil {
		t.Fatal(err)
	}
	pullLayers(t, reg, "rafsd/app", "nydus-oci-ref", "u", "p", blobDir)
	cfg := filepath.Join(t.TempDir(), "localfs.json")
	if err := os.WriteFile(cfg, []byte(localfsConfig(blobDir)), 0o600); err != nil {
		t.Fatal(err)
	}
	lmnt := t.TempDir()
	runningDaemon(t, lmnt, "--image", zref, "--config", cfg)
	reg.Stop()
	diffTree(t, img.src, lmnt)
}

// pullLayers downloads the layers of repo:tag's manifest from reg into dir,
// each named by its hex digest as a localfs backend wants.
func pullLayers(t *testing.T, reg *registrytest.Registry, repo, tag, user, password, dir string) {
	t.Helper()
	get := func(path, accept string) []byte {
		req, err := http.NewRequest(http.MethodGet, reg.URL+"/v2/"+repo+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.SetBasicAuth(user, password)
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: HTTP %d, %v: %s", path, resp.StatusCode, err, b)
		}
		return b
	}
	var man struct {
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(get("/manifests/"+tag, "application/vnd.oci.image.manifest.v1+json"), &man); err != nil || len(man.Layers) == 0 {
		t.Fatalf("manifest of %s:%s: %v (%d layers)", repo, tag, err, len(man.Layers))
	}
	for _, l := range man.Layers {
		hex, ok := strings.CutPrefix(l.Digest, "sha256:")
		if !ok {
			t.Fatalf("layer digest %q", l.Digest)
		}
		if err := os.WriteFile(filepath.Join(dir, hex), get("/blobs/"+l.Digest, ""), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMountImageRefErrors(t *testing.T) {
	requireRoot(t)
	reg := registrytest.Start(t, registrytest.Options{User: "u", Password: "p"})
	t.Setenv(imageDirEnv, t.TempDir())
	loginDockerConfig(t, reg, "u", "p")
	img := makeImage(t, "errors")
	ref := reg.Addr + "/rafsd/app:nydus"
	pushNydus(t, img, ref)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"with --bootstrap", []string{"--image", ref, "--bootstrap", img.bootstrap}, "exclusive"},
		{"unknown tag", []string{"--image", reg.Addr + "/rafsd/app:nope"}, "not found"},
		{"not a reference", []string{"--image", "no spaces/in refs"}, "reference"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			cmd := exec.Command(filepath.Join(binDir, "rafsd"), append([]string{"--mountpoint", t.TempDir()}, tc.args...)...)
			cmd.Stdout, cmd.Stderr = &out, &out
			err := cmd.Run()
			if err == nil || !bytes.Contains(out.Bytes(), []byte(tc.want)) {
				t.Fatalf("rafsd %v: %v, output %q; want an error about %q", tc.args, err, out.String(), tc.want)
			}
		})
	}
	// Wrong login in config.json: refused, not mounted anonymously.
	loginDockerConfig(t, reg, "u", "wrong")
	var out bytes.Buffer
	cmd := exec.Command(filepath.Join(binDir, "rafsd"), "--mountpoint", t.TempDir(), "--image", ref)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err == nil || !bytes.Contains(bytes.ToLower(out.Bytes()), []byte("authoriz")) {
		t.Fatalf("wrong password: %v, output %q", err, out.String())
	}
}

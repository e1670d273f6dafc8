package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/rafsd/rafsd/internal/testutil"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/convert"
	"github.com/rafsd/rafsd/rafs/storage"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

// writeLayout writes a one-layer OCI image layout holding files.
func writeLayout(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for n, c := range files {
		tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(c)), Typeflag: tar.TypeReg})
		tw.Write([]byte(c))
	}
	tw.Close()
	testutil.WriteOCILayout(t, dir, raw.Bytes())
}

func TestConvertCLI(t *testing.T) {
	reg := registrytest.Start(t, registrytest.Options{})
	layout := t.TempDir()
	writeLayout(t, layout, map[string]string{"hello.txt": "hello, nydus\n", "etc/os-release": "ID=test\n"})
	target := reg.Addr + "/cli/hello:nydus"

	out := mustCLI(t, "/hello.txt\n/not/there\n", "convert", "--source", "oci-layout:"+layout, "--target", target,
		"--plain-http", "--merge-platform", "--prefetch-patterns", "--compressor", "lz4_block", "--chunk-size", "0x10000", "--quiet")
	var res convertResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("stdout is not the JSON summary: %v\n%s", err, out)
	}
	if res.Index == "" || len(res.Blobs) != 1 || len(res.Uploaded) != 1 || res.Files != 2 {
		t.Fatalf("summary %+v", res)
	}

	// The image is usable by reference: bootstrap from the registry, file
	// data through the registry backend.
	ctx := context.Background()
	r, err := convert.FetchBootstrap(ctx, target, filepath.Join(t.TempDir(), "image.boot"), convert.RegistryOptions{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.Image.Compressor.String() != "lz4_block" || r.Image.ChunkSize != 0x10000 {
		t.Errorf("image compressor %v chunk size %#x", r.Image.Compressor, r.Image.ChunkSize)
	}
	if len(r.Image.Prefetch) != 1 || r.Image.Inodes[r.Image.Prefetch[0]-1].Size != 13 {
		t.Errorf("prefetch table %v, want hello.txt's inode", r.Image.Prefetch)
	}
	cfg, err := config.Parse(r.DaemonConfig("", false))
	if err != nil {
		t.Fatal(err)
	}
	f, err := storage.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ino, err := r.Image.Lookup(r.Image.Root(), "hello.txt")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := r.Image.ReadAt(ctx, f, ino, buf, 0)
	if err != nil && n == 0 {
		t.Fatal(err)
	}
	if string(buf[:n]) != "hello, nydus\n" {
		t.Errorf("hello.txt = %q", buf[:n])
	}

	// A second conversion reusing the first as chunk dict (fetched from
	// the registry) uploads no new blob.
	out = mustCLI(t, "", "convert", "--source", "oci-layout:"+layout, "--target", reg.Addr+"/cli/hello:again",
		"--plain-http", "--quiet", "--compressor", "lz4_block", "--chunk-size", "0x10000", "--chunk-dict", "bootstrap:registry:"+target)
	res = convertResult{}
	json.Unmarshal([]byte(out), &res)
	if len(res.Uploaded) != 0 || res.Dedup == 0 {
		t.Errorf("with the chunk dict: %+v", res)
	}
}

func TestConvertCLIErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"convert", "--target", "x/y:z"}, "usage"},
		{[]string{"convert", "--source", "oci-layout:/nonexistent", "--target", "127.0.0.1:1/a:b"}, "oci layout"},
		{[]string{"convert", "--source", "docker-archive:/nonexistent.tar", "--target", "127.0.0.1:1/a:b"}, "docker archive"},
		{[]string{"convert", "--source", "a", "--target", "b", "--compressor", "brotli"}, "--compressor"},
		{[]string{"convert", "--source", "a", "--target", "b", "--chunk-size", "3"}, "--chunk-size"},
		{[]string{"convert", "--source", "a", "--target", "b", "--fs-version", "4"}, "fs version"},
	} {
		code, _, errs := cli(t, "", tc.args...)
		if code == 0 || !strings.Contains(errs, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want an error about %q", tc.args, code, errs, tc.want)
		}
	}
}

// TestConvertCLIOCIRef: with --oci-ref the only blob is the source's gzip
// layer (uploaded here because the target repository lacks it), and files
// read back through the registry backend from its zran checkpoints.
func TestConvertCLIOCIRef(t *testing.T) {
	reg := registrytest.Start(t, registrytest.Options{})
	layout := t.TempDir()
	writeLayout(t, layout, map[string]string{"hello.txt": "hello, zran\n", "etc/os-release": strings.Repeat("ID=test\n", 5000)})
	idx, _ := os.ReadFile(filepath.Join(layout, "index.json"))
	var ix ocispec.Index
	json.Unmarshal(idx, &ix)
	mb, _ := os.ReadFile(filepath.Join(layout, "blobs", "sha256", ix.Manifests[0].Digest.Encoded()))
	var man ocispec.Manifest
	json.Unmarshal(mb, &man)
	layerDigest := man.Layers[0].Digest.String()

	target := reg.Addr + "/cli/zran:nydus"
	out := mustCLI(t, "", "convert", "--source", "oci-layout:"+layout, "--target", target, "--plain-http", "--oci-ref", "--quiet")
	var res convertResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("stdout is not the JSON summary: %v\n%s", err, out)
	}
	// The one blob layer is the layer's ref blob (its blob meta); the
	// layer itself goes to the repository beside it.
	if len(res.Blobs) != 1 || res.Blobs[0] == layerDigest || len(res.Uploaded) != 2 {
		t.Fatalf("summary %+v, want the ref blob of layer %s as the one blob", res, layerDigest)
	}
	ctx := context.Background()
	r, err := convert.FetchBootstrap(ctx, target, filepath.Join(t.TempDir(), "image.boot"), convert.RegistryOptions{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Image.Blobs[0].IsZran() || r.Blobs[0].Annotations[convert.LayerAnnotationNydusRefLayer] != layerDigest {
		t.Fatalf("blob %+v / layer %+v: not a zran reference to the OCI layer", r.Image.Blobs[0], r.Blobs[0])
	}
	cfg, err := config.Parse(r.DaemonConfig("", false))
	if err != nil {
		t.Fatal(err)
	}
	f, err := storage.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// As the daemons do: AddImage loads the zran contexts from the ref blob.
	if err := f.AddImage(r.Image); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"hello.txt": "hello, zran\n", "etc/os-release": strings.Repeat("ID=test\n", 5000)} {
		ino := r.Image.Root()
		for _, p := range strings.Split(name, "/") {
			if ino, err = r.Image.Lookup(ino, p); err != nil {
				t.Fatal(err)
			}
		}
		buf := make([]byte, len(want))
		if n, err := r.Image.ReadAt(ctx, f, ino, buf, 0); n != len(want) {
			t.Fatalf("%s: %d bytes, %v", name, n, err)
		}
		if string(buf) != want {
			t.Errorf("%s: wrong bytes", name)
		}
	}
	// check verifies every chunk from the layer file and the ref blob in a
	// blob directory (files named by digest, as --blob-dir wants); a
	// flipped byte in the layer fails it.
	metaID := r.Blobs[0].Digest.Encoded()
	n, err := f.Backend().Size(ctx, metaID)
	if err != nil {
		t.Fatal(err)
	}
	meta := make([]byte, n)
	if err := f.Backend().ReadAt(ctx, metaID, meta, 0); err != nil {
		t.Fatal(err)
	}
	lb, _ := os.ReadFile(filepath.Join(layout, "blobs", "sha256", man.Layers[0].Digest.Encoded()))
	blobs, bad := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(blobs, man.Layers[0].Digest.Encoded()), lb, 0o644)
	os.WriteFile(filepath.Join(blobs, metaID), meta, 0o644)
	os.WriteFile(filepath.Join(bad, metaID), meta, 0o644)
	mustCLI(t, "", "check", "--bootstrap", r.BootstrapPath, "--blob-dir", blobs)
	for i := 30; i < len(lb)-40; i += 64 {
		lb[i] ^= 0xff
	}
	os.WriteFile(filepath.Join(bad, man.Layers[0].Digest.Encoded()), lb, 0o644)
	if code, _, _ := cli(t, "", "check", "--bootstrap", r.BootstrapPath, "--blob-dir", bad); code == 0 {
		t.Error("check passed a corrupt layer")
	}
	// zran needs RAFS v6.
	if code, _, errs := cli(t, "", "convert", "--source", "oci-layout:"+layout, "--target", target, "--plain-http", "--oci-ref", "--fs-version", "5", "--quiet"); code == 0 || !strings.Contains(errs, "v6") {
		t.Errorf("--oci-ref --fs-version 5: exit %d, %q", code, errs)
	}
}

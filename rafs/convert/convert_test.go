package convert

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder/unpack"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/storage"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

// testLayers is a three-layer image exercising what overlay semantics and
// the builder must get right: whiteouts of files and whole directories, an
// opaque directory, hardlinks (within a layer, and one whose target a later
// layer replaces), symlinks, owners, modes and a file larger than a chunk.
func testLayers() [][]entry {
	big := append(pseudoRandom(1, 5<<20), bytes.Repeat([]byte("compressible "), 300_000)...)
	return [][]entry{
		{
			dir("etc", 0o755), fileStr("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
			dir("bin", 0o755), execFile("bin/tool", pseudoRandom(2, 300_000)),
			hardlink("bin/tool-link", "bin/tool"), symlink("bin/sh", "tool"),
			dir("usr/lib", 0o755), fileStr("usr/lib/libx.so", "libx"), fileStr("usr/lib/liby.so", "liby"),
			dir("opt/dir", 0o750), fileStr("opt/dir/a", "a"), fileStr("opt/dir/b", "b"),
			dir("var", 0o755), fileStr("var/gone", "to be deleted"),
			owned(dir("home/user", 0o700), 1000, 1000), owned(file("home/user/secret", 0o600, []byte("s3")), 1000, 1000),
			file("data/big", 0o644, big),
			file("data/empty", 0o644, nil),
			entry{name: "tmp", typ: '5', mode: 0o1777},
			file("bin/suid", 0o4755, []byte("suid")),
		},
		{
			// Layer diffs name the parents of what changed, with their
			// attributes, as docker and buildkit write them.
			dir("var", 0o755), whiteout("var/.wh.gone"),
			dir("opt/dir", 0o750), whiteout("opt/dir/.wh..wh..opq"), fileStr("opt/dir/c", "c"),
			fileStr("etc/passwd", "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
			file("data/new", 0o640, pseudoRandom(3, 3<<20)),
			dir("etc", 0o755), dir("data", 0o755), dir("l2", 0o755), fileStr("l2/x", "shared"), hardlink("l2/y", "l2/x"), hardlink("l2/z", "l2/x"),
		},
		{
			dir("usr", 0o755), whiteout("usr/.wh.lib"), dir("usr/lib2", 0o755), fileStr("usr/lib2/file", "moved"),
			dir("bin", 0o755), execFile("bin/tool", []byte("#!/bin/sh\necho new tool\n")), // bin/tool-link keeps the old bytes
			owned(dir("home/user", 0o700), 1000, 1000), owned(fileStr("home/user/.profile", "export A=1\n"), 1000, 100),
			dir("etc", 0o755), symlink("etc/alt", "/etc/passwd"),
			dir("l2", 0o755), whiteout("l2/.wh.z"),
		},
	}
}

func readBack(t *testing.T, ref, work string) (*Remote, string) {
	t.Helper()
	ctx := context.Background()
	r, err := FetchBootstrap(ctx, ref, filepath.Join(work, "image.boot"), RegistryOptions{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Parse(r.DaemonConfig(filepath.Join(work, "cache"), false))
	if err != nil {
		t.Fatal(err)
	}
	f, err := storage.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.AddImage(r.Image); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(work, "tree")
	os.Mkdir(out, 0o755)
	if err := unpack.ToDir(ctx, r.Image, f, out); err != nil {
		t.Fatal(err)
	}
	return r, out
}

// syncBuffer is a bytes.Buffer safe for the converter's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestConvertRegistry converts a multi-layer image from one repository of a
// real registry to another, then reads the result back through the registry
// (bootstrap from its layer, file data by the fetcher's registry backend)
// and compares it with a plain overlay unpack of the OCI layers.
func TestConvertRegistry(t *testing.T) {
	reg := startRegistry(t)
	im := newOCIImage(t, testLayers()...)
	src := reg.Addr + "/app/oci:v1"
	im.push(t, src)

	for _, v := range []int{6, 5} {
		t.Run("v"+string(rune('0'+v)), func(t *testing.T) {
			target := reg.Addr + "/app/nydus:v" + string(rune('0'+v))
			var progress syncBuffer
			progressInterval = time.Millisecond
			t.Cleanup(func() { progressInterval = 5 * time.Second })
			res, err := Convert(context.Background(), src, target, Options{
				FsVersion: v, ChunkSize: 256 << 10, Parallel: 2,
				Source: RegistryOptions{PlainHTTP: true}, Target: RegistryOptions{PlainHTTP: true},
				Progress: &progress,
			})
			if err != nil {
				t.Fatal(err)
			}
			if p := progress.String(); !strings.Contains(p, "layer 3/3") || !strings.Contains(p, "pushed blob") || !strings.Contains(p, " read (") {
				t.Errorf("progress output:\n%s", progress.String())
			}
			if len(res.Blobs) != 3 || len(res.Uploaded) != 3 {
				t.Fatalf("%d blobs, %d uploaded; want 3, 3", len(res.Blobs), len(res.Uploaded))
			}
			want := filepath.Join(t.TempDir(), "want")
			os.Mkdir(want, 0o755)
			applyLayers(t, want, im.layers)
			r, got := readBack(t, target, t.TempDir())
			if r.Image.Version != v {
				t.Errorf("bootstrap version %d, want %d", r.Image.Version, v)
			}
			if r.Bootstrap.Annotations[LayerAnnotationFSVersion] != string(rune('0'+v)) {
				t.Errorf("fs-version annotation %q", r.Bootstrap.Annotations[LayerAnnotationFSVersion])
			}
			compareTrees(t, want, got)
			// The hardlink whose target the top layer replaced keeps the
			// old bytes; spot-check so a silent oracle bug shows.
			if b, _ := os.ReadFile(filepath.Join(got, "bin/tool")); !bytes.Contains(b, []byte("new tool")) {
				t.Errorf("bin/tool = %.20q", b)
			}
			if b, _ := os.ReadFile(filepath.Join(got, "bin/tool-link")); len(b) != 300_000 {
				t.Errorf("bin/tool-link has %d bytes, want the lower layer's 300000", len(b))
			}
			for _, gone := range []string{"var/gone", "opt/dir/a", "usr/lib", "l2/z"} {
				if _, err := os.Lstat(filepath.Join(got, gone)); !os.IsNotExist(err) {
					t.Errorf("%s survived its whiteout: %v", gone, err)
				}
			}
		})
	}

	t.Run("converting again uploads nothing", func(t *testing.T) {
		res, err := Convert(context.Background(), src, reg.Addr+"/app/nydus:again", Options{
			ChunkSize: 256 << 10, Source: RegistryOptions{PlainHTTP: true}, Target: RegistryOptions{PlainHTTP: true},
		})
		if err != nil {
			t.Fatal(err)
		}
		// Blobs are per repository: a new repo gets them uploaded; the
		// same repo again does not.
		res2, err := Convert(context.Background(), src, reg.Addr+"/app/nydus:again2", Options{
			ChunkSize: 256 << 10, Source: RegistryOptions{PlainHTTP: true}, Target: RegistryOptions{PlainHTTP: true},
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(res2.Uploaded) != 0 {
			t.Errorf("second conversion to the same repository uploaded %d blobs", len(res2.Uploaded))
		}
		if res.Manifest.Digest != res2.Manifest.Digest {
			t.Errorf("conversion is not reproducible: %s vs %s", res.Manifest.Digest, res2.Manifest.Digest)
		}
	})
}

// TestConvertLocalSources converts the same image from an OCI image layout
// directory and from a docker-archive tar (no source registry).
func TestConvertLocalSources(t *testing.T) {
	reg := startRegistry(t)
	im := newOCIImage(t, testLayers()...)
	want := filepath.Join(t.TempDir(), "want")
	os.Mkdir(want, 0o755)
	applyLayers(t, want, im.layers)

	layout := t.TempDir()
	im.writeOCILayout(t, layout)
	archive := filepath.Join(t.TempDir(), "image.tar")
	im.writeDockerArchive(t, archive)

	for name, src := range map[string]string{"oci-layout": "oci-layout:" + layout + ":v1", "docker-archive": "docker-archive:" + archive} {
		t.Run(name, func(t *testing.T) {
			target := reg.Addr + "/local/" + name + ":latest"
			if _, err := Convert(context.Background(), src, target, Options{ChunkSize: 1 << 20, Target: RegistryOptions{PlainHTTP: true}}); err != nil {
				t.Fatal(err)
			}
			_, got := readBack(t, target, t.TempDir())
			compareTrees(t, want, got)
		})
	}
}

// TestManifestForContainerd pulls the pushed images with containerd's own
// fetch handlers into a containerd content store and checks them with
// core/images: platforms, the manifest nydus-snapshotter expects, and the
// merged-platform index.
func TestManifestForContainerd(t *testing.T) {
	reg := startRegistry(t)
	im := newOCIImage(t, testLayers()...)
	src := reg.Addr + "/c/oci:v1"
	im.push(t, src)
	ro := RegistryOptions{PlainHTTP: true}
	target := reg.Addr + "/c/nydus:v1"
	res, err := Convert(context.Background(), src, target, Options{MergePlatform: true, Source: ro, Target: ro})
	if err != nil {
		t.Fatal(err)
	}
	if res.Index == nil {
		t.Fatal("no index with --merge-platform")
	}

	ctx := context.Background()
	cs, err := local.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	resolver := ro.resolver()
	name, root, err := resolver.Resolve(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	if root.Digest != res.Index.Digest || !images.IsIndexType(root.MediaType) {
		t.Fatalf("tag resolves to %s %s, want index %s", root.MediaType, root.Digest, res.Index.Digest)
	}
	fetcher, err := resolver.Fetcher(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := images.Dispatch(ctx, images.Handlers(remotes.FetchHandler(cs, fetcher), images.ChildrenHandler(cs)), nil, root); err != nil {
		t.Fatalf("containerd fetch of the converted image: %v", err)
	}
	plats, err := images.Platforms(ctx, cs, root)
	if err != nil {
		t.Fatal(err)
	}
	nydusPlats := 0
	for _, p := range plats {
		if slices.Contains(p.OSFeatures, ManifestOSFeatureNydus) {
			nydusPlats++
		}
	}
	if len(plats) != 2 || nydusPlats != 1 {
		t.Fatalf("index platforms %+v: want the OCI one and one with os.features %s", plats, ManifestOSFeatureNydus)
	}
	// Without the feature asked for, containerd's default matcher must not
	// hand out the Nydus manifest... it picks the first match, the OCI one.
	ociMan, err := images.Manifest(ctx, cs, root, platforms.Only(ocispec.Platform{OS: "linux", Architecture: "amd64"}))
	if err != nil {
		t.Fatal(err)
	}
	if ociMan.Layers[0].MediaType == MediaTypeNydusBlob {
		t.Errorf("plain platform match returned the Nydus manifest")
	}
	available, _, _, missing, err := images.Check(ctx, cs, res.Manifest, platforms.All)
	if err != nil || !available || len(missing) != 0 {
		t.Fatalf("images.Check of the Nydus manifest: available=%v missing=%v err=%v", available, missing, err)
	}
	man, err := images.Manifest(ctx, cs, res.Manifest, platforms.All)
	if err != nil {
		t.Fatal(err)
	}
	n := len(man.Layers)
	if n != 4 {
		t.Fatalf("%d layers, want 3 blobs + bootstrap", n)
	}
	for _, l := range man.Layers[:n-1] {
		if l.MediaType != MediaTypeNydusBlob || l.Annotations[LayerAnnotationNydusBlob] != "true" {
			t.Errorf("blob layer %+v", l)
		}
		// The blob id in the bootstrap is the layer digest (what nydusd
		// asks the registry for).
		if !slices.ContainsFunc(res.Image.Blobs, func(b *rafs.Blob) bool { return b.ID == l.Digest.Encoded() && int64(b.CompressedSize) == l.Size }) {
			t.Errorf("layer %s is not a blob of the bootstrap", l.Digest)
		}
	}
	boot := man.Layers[n-1]
	if boot.MediaType != ocispec.MediaTypeImageLayerGzip || boot.Annotations[LayerAnnotationNydusBootstrap] != "true" ||
		boot.Annotations[LayerAnnotationFSVersion] != "6" || boot.Annotations[LayerAnnotationUncompressed] == "" {
		t.Errorf("bootstrap layer %+v", boot)
	}
	if man.Subject == nil || man.Subject.Digest != im.manifest.Digest {
		t.Errorf("subject %+v, want the OCI manifest %s", man.Subject, im.manifest.Digest)
	}
	diffIDs, err := images.RootFS(ctx, cs, man.Config)
	if err != nil {
		t.Fatal(err)
	}
	if len(diffIDs) != n {
		t.Fatalf("%d diff ids for %d layers", len(diffIDs), n)
	}
	for i, l := range man.Layers[:n-1] {
		if diffIDs[i] != l.Digest {
			t.Errorf("diff id %d = %s, want the blob digest %s", i, diffIDs[i], l.Digest)
		}
	}
	ra, err := cs.ReaderAt(ctx, boot)
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	zr, err := gzip.NewReader(io.NewSectionReader(ra, 0, ra.Size()))
	if err != nil {
		t.Fatal(err)
	}
	plain, _ := io.ReadAll(zr)
	if d := digest.FromBytes(plain); diffIDs[n-1] != d || boot.Annotations[LayerAnnotationUncompressed] != d.String() {
		t.Errorf("bootstrap diff id %s / annotation %s, want %s", diffIDs[n-1], boot.Annotations[LayerAnnotationUncompressed], d)
	}
	var bb bytes.Buffer
	if err := ExtractBootstrap(bytes.NewReader(plain), &bb); err != nil {
		t.Fatal(err)
	}
	if _, err := bootstrap.Read(bytes.NewReader(bb.Bytes()), int64(bb.Len())); err != nil {
		t.Fatalf("bootstrap in the layer: %v", err)
	}
	// FetchBootstrap picks the Nydus manifest out of the index.
	r, err := FetchBootstrap(ctx, target, filepath.Join(t.TempDir(), "b"), ro)
	if err != nil {
		t.Fatal(err)
	}
	if r.Manifest.Digest != res.Manifest.Digest {
		t.Errorf("FetchBootstrap chose %s, want %s", r.Manifest.Digest, res.Manifest.Digest)
	}
}

// TestChunkDict: converting a new version of an image with the previous
// version's bootstrap as chunk dict uploads only the blob of what changed.
func TestChunkDict(t *testing.T) {
	reg := startRegistry(t)
	ro := RegistryOptions{PlainHTTP: true}
	base := [][]entry{
		{dir("app", 0o755), file("app/lib.bin", 0o644, pseudoRandom(10, 2<<20)), file("app/data.bin", 0o644, pseudoRandom(11, 1<<20))},
	}
	v1 := newOCIImage(t, base...)
	v1.push(t, reg.Addr+"/dict/oci:v1")
	target := reg.Addr + "/dict/nydus"
	if _, err := Convert(context.Background(), reg.Addr+"/dict/oci:v1", target+":v1", Options{Source: ro, Target: ro}); err != nil {
		t.Fatal(err)
	}
	r1, err := FetchBootstrap(context.Background(), target+":v1", filepath.Join(t.TempDir(), "v1.boot"), ro)
	if err != nil {
		t.Fatal(err)
	}
	dict, err := bootstrap.Open(r1.BootstrapPath)
	if err != nil {
		t.Fatal(err)
	}

	// v2 rebuilds the same files from scratch (a new layer digest, same
	// content) and adds one layer with new data.
	v2layers := [][]entry{
		{dir("app", 0o755), file("app/data.bin", 0o644, pseudoRandom(11, 1<<20)), file("app/lib.bin", 0o644, pseudoRandom(10, 2<<20)), fileStr("app/VERSION", "")},
		{dir("app", 0o755), file("app/new.bin", 0o644, pseudoRandom(12, 1<<20))},
	}
	v2 := newOCIImage(t, v2layers...)
	v2.push(t, reg.Addr+"/dict/oci:v2")
	res, err := Convert(context.Background(), reg.Addr+"/dict/oci:v2", target+":v2", Options{Source: ro, Target: ro, ChunkDicts: []*rafs.Image{dict}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Uploaded) != 1 {
		t.Fatalf("uploaded %d blobs, want only the new layer's", len(res.Uploaded))
	}
	if res.Stats.DedupChunks < 3 {
		t.Errorf("only %d chunks deduplicated against the dict", res.Stats.DedupChunks)
	}
	if !slices.ContainsFunc(res.Blobs, func(d ocispec.Descriptor) bool { return d.Digest == r1.Blobs[0].Digest }) {
		t.Errorf("the dict's blob %s is not a layer of v2: %v", r1.Blobs[0].Digest, res.Blobs)
	}
	want := filepath.Join(t.TempDir(), "want")
	os.Mkdir(want, 0o755)
	applyLayers(t, want, v2.layers)
	_, got := readBack(t, target+":v2", t.TempDir())
	compareTrees(t, want, got)

	t.Run("dict blob missing in target", func(t *testing.T) {
		_, err := Convert(context.Background(), reg.Addr+"/dict/oci:v2", reg.Addr+"/elsewhere/nydus:v2", Options{Source: ro, Target: ro, ChunkDicts: []*rafs.Image{dict}})
		if err == nil || !strings.Contains(err.Error(), "chunk dict") {
			t.Fatalf("err = %v, want a chunk dict blob error", err)
		}
	})
}

// TestMultiPlatformSource: from an index of several platforms, Platform
// (default: this machine's) picks the manifest converted.
func TestMultiPlatformSource(t *testing.T) {
	reg := startRegistry(t)
	amd := newOCIImage(t, []entry{fileStr("arch", "amd64")})
	arm := newOCIImage(t, []entry{fileStr("arch", "arm64")})
	layout := t.TempDir()
	amd.writeOCILayout(t, layout)
	arm.writeOCILayout(t, t.TempDir()) // only to fill arm.blobs' files below
	bd := filepath.Join(layout, "blobs", "sha256")
	for d, b := range arm.blobs {
		os.WriteFile(filepath.Join(bd, d.Encoded()), b, 0o644)
	}
	armDesc := arm.manifest
	armDesc.Platform = &ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}
	noPlat := arm.manifest
	noPlat.Platform = nil
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{noPlat, armDesc, amd.manifest}}
	idx.SchemaVersion = 2
	b, _ := json.Marshal(idx)
	os.WriteFile(filepath.Join(layout, "index.json"), b, 0o644)

	ro := RegistryOptions{PlainHTTP: true}
	for _, tc := range []struct{ platform, want string }{{"linux/arm64", "arm64"}, {"linux/amd64", "amd64"}} {
		target := reg.Addr + "/multi/app:" + strings.ReplaceAll(tc.platform, "/", "-")
		if _, err := Convert(context.Background(), "oci-layout:"+layout, target, Options{Platform: tc.platform, Target: ro}); err != nil {
			t.Fatal(err)
		}
		_, got := readBack(t, target, t.TempDir())
		if b, _ := os.ReadFile(filepath.Join(got, "arch")); string(b) != tc.want {
			t.Errorf("--platform %s converted the %q image", tc.platform, b)
		}
	}
	// Without the platform-less entry nothing matches linux/s390x.
	idx.Manifests = idx.Manifests[1:]
	b, _ = json.Marshal(idx)
	os.WriteFile(filepath.Join(layout, "index.json"), b, 0o644)
	_, err := Convert(context.Background(), "oci-layout:"+layout, reg.Addr+"/multi/app:s390x", Options{Platform: "linux/s390x", Target: ro})
	if err == nil || !strings.Contains(err.Error(), "no manifest for the platform") {
		t.Fatalf("err = %v", err)
	}
}

// TestAuthRegistry: source and target behind htpasswd auth; the pushed
// image reads back through the registry backend with the credentials
// DaemonConfig carries, and wrong credentials fail clearly.
func TestAuthRegistry(t *testing.T) {
	reg := registrytest.Start(t, registrytest.Options{User: "alice", Password: "s3cret"})
	ro := RegistryOptions{PlainHTTP: true, Username: "alice", Password: "s3cret"}
	im := newOCIImage(t, []entry{dir("d", 0o755), file("d/f", 0o644, pseudoRandom(9, 300_000))})
	p, err := newPusher(context.Background(), reg.Addr+"/auth/oci:v1", ro)
	if err != nil {
		t.Fatal(err)
	}
	var man ocispec.Manifest
	json.Unmarshal(im.blobs[im.manifest.Digest], &man)
	for _, d := range append(man.Layers, man.Config, ocispec.Descriptor{MediaType: im.manifest.MediaType, Digest: im.manifest.Digest, Size: im.manifest.Size}) {
		if _, err := p.pushBytes(context.Background(), d, im.blobs[d.Digest]); err != nil {
			t.Fatal(err)
		}
	}
	target := reg.Addr + "/auth/nydus:v1"
	if _, err := Convert(context.Background(), reg.Addr+"/auth/oci:v1", target, Options{Source: ro, Target: ro}); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	r, err := FetchBootstrap(context.Background(), target, filepath.Join(work, "b"), ro)
	if err != nil {
		t.Fatal(err)
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
	out := filepath.Join(work, "tree")
	os.Mkdir(out, 0o755)
	if err := unpack.ToDir(context.Background(), r.Image, f, out); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(out, "d/f")); !bytes.Equal(b, pseudoRandom(9, 300_000)) {
		t.Error("d/f differs after the authenticated round trip")
	}

	bad := RegistryOptions{PlainHTTP: true, Username: "alice", Password: "wrong"}
	if _, err := Convert(context.Background(), reg.Addr+"/auth/oci:v1", reg.Addr+"/auth/nydus:v2", Options{Source: bad, Target: bad}); err == nil ||
		!strings.Contains(err.Error(), "401") && !strings.Contains(strings.ToLower(err.Error()), "unauthorized") {
		t.Fatalf("wrong password: err = %v", err)
	}
	if _, err := FetchBootstrap(context.Background(), target, filepath.Join(work, "b2"), RegistryOptions{PlainHTTP: true}); err == nil {
		t.Fatal("anonymous FetchBootstrap from an auth registry succeeded")
	}
}

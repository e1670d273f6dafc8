package convert

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/config"
)

// MaxBootstrapSize bounds the bootstrap extracted from a bootstrap layer
// (and the layer itself): large images have bootstraps of tens of MiB; a
// hostile layer must not fill the disk.
const MaxBootstrapSize = 1 << 30

// Remote is a Nydus image found in a registry by FetchBootstrap.
type Remote struct {
	Ref       string
	Manifest  ocispec.Descriptor
	Bootstrap ocispec.Descriptor // the bootstrap layer
	Blobs     []ocispec.Descriptor
	// Image is the decoded bootstrap; BootstrapPath the file it was
	// written to.
	Image         *rafs.Image
	BootstrapPath string
	// Registry is the backend config that reads the image's blobs
	// (nydusd's device.backend.config with type "registry").
	Registry config.Registry
}

// FetchBootstrap resolves ref (a Nydus image, or an index holding one with
// os.features nydus.remoteimage.v1), downloads its bootstrap layer, extracts
// image/image.boot to dest (atomically) and decodes it. The daemon starts from
// an image reference with:
//
//	r, err := convert.FetchBootstrap(ctx, ref, filepath.Join(workDir, "image.boot"), ro)
//	cfg := r.DaemonConfig(cacheDir, true)  // nydusd v1 JSON: registry backend, blobcache, fs_prefetch
//	// then mount r.BootstrapPath with cfg as if given --bootstrap and --config
func FetchBootstrap(ctx context.Context, ref, dest string, ro RegistryOptions) (*Remote, error) {
	src := newRegistrySource(ref, ro)
	root, err := src.root(ctx)
	if err != nil {
		return nil, err
	}
	r := &Remote{Ref: ref}
	desc := root
	if images.IsIndexType(root.MediaType) {
		var idx ocispec.Index
		if _, err := readJSON(ctx, src, root, &idx); err != nil {
			return nil, err
		}
		d, err := pickNydus(idx)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		desc = d
	}
	if !images.IsManifestType(desc.MediaType) {
		return nil, fmt.Errorf("%s: unsupported media type %q", ref, desc.MediaType)
	}
	var man ocispec.Manifest
	if _, err := readJSON(ctx, src, desc, &man); err != nil {
		return nil, err
	}
	r.Manifest = desc
	if len(man.Layers) == 0 || man.Layers[len(man.Layers)-1].Annotations[LayerAnnotationNydusBootstrap] == "" {
		return nil, fmt.Errorf("%s: not a Nydus image (last layer is not annotated %s)", ref, LayerAnnotationNydusBootstrap)
	}
	r.Bootstrap = man.Layers[len(man.Layers)-1]
	for _, l := range man.Layers[:len(man.Layers)-1] {
		if l.Annotations[LayerAnnotationNydusBlob] != "" {
			r.Blobs = append(r.Blobs, l)
		}
	}
	if r.Bootstrap.Size < 0 || r.Bootstrap.Size > MaxBootstrapSize {
		return nil, fmt.Errorf("%s: bootstrap layer of %d bytes", ref, r.Bootstrap.Size)
	}
	rc, err := src.fetch(ctx, r.Bootstrap)
	if err != nil {
		return nil, err
	}
	vr, err := newVerifiedReader(rc, r.Bootstrap)
	if err != nil {
		return nil, err
	}
	defer vr.Close()
	if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(dest), ".image.boot-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := ExtractBootstrap(vr, tmp); err != nil {
		return nil, fmt.Errorf("%s: bootstrap layer %s: %w", ref, r.Bootstrap.Digest, err)
	}
	if err := vr.drain(); err != nil {
		return nil, fmt.Errorf("%s: bootstrap layer: %w", ref, err)
	}
	if err := tmp.Sync(); err != nil {
		return nil, err
	}
	st, err := tmp.Stat()
	if err != nil {
		return nil, err
	}
	img, err := bootstrap.Read(tmp, st.Size())
	if err != nil {
		return nil, fmt.Errorf("%s: bootstrap: %w", ref, err)
	}
	if err := os.Rename(tmp.Name(), dest); err != nil {
		return nil, err
	}
	r.Image, r.BootstrapPath = img, dest
	if r.Registry, err = ro.backendConfig(ref); err != nil {
		return nil, err
	}
	return r, nil
}

// pickNydus chooses the Nydus manifest of an index: the one whose platform
// lists nydus.remoteimage.v1 and matches this machine, or the only manifest.
func pickNydus(idx ocispec.Index) (ocispec.Descriptor, error) {
	m := platforms.Default()
	for _, d := range idx.Manifests {
		if d.Platform != nil && slices.Contains(d.Platform.OSFeatures, ManifestOSFeatureNydus) {
			p := *d.Platform
			p.OSFeatures = nil
			if m.Match(p) {
				return d, nil
			}
		}
	}
	if len(idx.Manifests) == 1 {
		return idx.Manifests[0], nil
	}
	return ocispec.Descriptor{}, errors.New("index has no Nydus manifest (os.features nydus.remoteimage.v1) for this platform")
}

// ExtractBootstrap copies image/image.boot out of a bootstrap layer (a tar,
// gzip or zstd compressed or not) to w. It stops at MaxBootstrapSize.
func ExtractBootstrap(layer io.Reader, w io.Writer) error {
	rc, err := builder.Decompress(layer)
	if err != nil {
		return fmt.Errorf("decompress: %w", err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return fmt.Errorf("no %s in the layer", BootstrapFileNameInLayer)
		}
		if err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		if path.Clean("/"+h.Name) != "/"+BootstrapFileNameInLayer || h.Typeflag != tar.TypeReg {
			continue
		}
		if h.Size > MaxBootstrapSize {
			return fmt.Errorf("%s: %d bytes, more than %d", BootstrapFileNameInLayer, h.Size, MaxBootstrapSize)
		}
		n, err := io.Copy(w, tr)
		if err != nil {
			return fmt.Errorf("extract %s: %w", BootstrapFileNameInLayer, err)
		}
		if n != h.Size {
			return fmt.Errorf("extract %s: %d of %d bytes", BootstrapFileNameInLayer, n, h.Size)
		}
		return nil
	}
}

// DaemonConfig returns a nydusd v1 JSON config that reads the image's blobs
// from its registry, caching them under cacheDir (no cache if empty), with
// fs_prefetch of the bootstrap's prefetch table if prefetch (it needs the
// cache).
func (r *Remote) DaemonConfig(cacheDir string, prefetch bool) []byte {
	rc := r.Registry
	bc := map[string]any{
		"scheme": rc.Scheme, "host": rc.Host, "repo": rc.Repo, "skip_verify": rc.SkipVerify,
		"timeout": rc.Timeout, "connect_timeout": rc.ConnectTimeout, "retry_limit": rc.RetryLimit,
	}
	if rc.Auth != "" {
		bc["auth"] = rc.Auth
	}
	cache := map[string]any{"type": ""}
	if cacheDir != "" {
		cache = map[string]any{"type": "blobcache", "config": map[string]any{"work_dir": cacheDir}}
	}
	cfg := map[string]any{
		"device": map[string]any{"backend": map[string]any{"type": "registry", "config": bc}, "cache": cache},
		"mode":   "direct", "digest_validate": false,
	}
	if prefetch && cacheDir != "" {
		cfg["fs_prefetch"] = map[string]any{"enable": true, "threads_count": 4, "merging_size": 1 << 20}
	}
	b, _ := json.Marshal(cfg)
	return b
}

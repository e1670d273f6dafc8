// Package convert turns OCI images into RAFS (Nydus) images the way nydusify
// (and nydus-snapshotter's converter) does, and finds the bootstrap of a
// converted image in a registry so that rafsd can start from a reference.
//
// Convert pulls an image (from a registry with containerd's resolver, an OCI
// image layout directory or a docker-archive tar), builds one RAFS blob and
// layer bootstrap per layer with rafs/builder (layers in parallel), merges the
// layer bootstraps with overlay semantics and pushes:
//
//   - each blob as a layer of media type application/vnd.oci.image.layer.nydus.blob.v1
//     annotated containerd.io/snapshot/nydus-blob: "true";
//   - the merged bootstrap as a last tar.gz layer holding image/image.boot,
//     annotated containerd.io/snapshot/nydus-bootstrap: "true",
//     containerd.io/snapshot/nydus-fs-version and containerd.io/uncompressed;
//   - the config with rootfs.diff_ids rewritten (blob digests, then the
//     bootstrap tar's digest) and a history entry for the bootstrap layer;
//   - with MergePlatform, an index holding the OCI manifest beside the Nydus
//     one, whose platform carries os.features ["nydus.remoteimage.v1"].
//
// A blob is a layer of the manifest whether it was built now or comes from a
// chunk dictionary; only blobs the target does not hold yet are uploaded.
//
// With OCIRef (nydusify --oci-ref) no data blob is built: each gzip layer
// is its own blob, its chunks ranges of the layer's tar read by inflating
// from checkpoints (rafs/zran). As nydusify does, the manifest lists per
// layer a small "ref blob", the layer's separate blob meta (zran contexts,
// chunk infos, digests, TOC; rafs/blobmeta.WriteSeparate), annotated
// containerd.io/snapshot/nydus-blob and containerd.io/snapshot/nydus-ref
// with the original layer's digest, then the bootstrap layer. The
// original layers must stay in the target repository (nydus: "in the same
// namespace"); those it lacks are uploaded (or mounted) beside.
package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/zran"
)

// Media types and annotations of Nydus images (nydus-snapshotter
// pkg/converter/constant.go, nydusify pkg/utils/constant.go).
const (
	MediaTypeNydusBlob            = "application/vnd.oci.image.layer.nydus.blob.v1"
	ManifestOSFeatureNydus        = "nydus.remoteimage.v1"
	BootstrapFileNameInLayer      = "image/image.boot"
	LayerAnnotationNydusBlob      = "containerd.io/snapshot/nydus-blob"
	LayerAnnotationNydusBootstrap = "containerd.io/snapshot/nydus-bootstrap"
	LayerAnnotationFSVersion      = "containerd.io/snapshot/nydus-fs-version"
	LayerAnnotationUncompressed   = "containerd.io/uncompressed"
	// LayerAnnotationNydusRefLayer marks the ref blob of an --oci-ref
	// layer, naming the original layer's digest (nydus-snapshotter's
	// label.NydusRefLayer).
	LayerAnnotationNydusRefLayer = "containerd.io/snapshot/nydus-ref"
)

// isGzipLayer reports whether a layer media type is tar+gzip.
func isGzipLayer(mt string) bool {
	return mt == ocispec.MediaTypeImageLayerGzip || mt == ocispec.MediaTypeImageLayerNonDistributableGzip || //nolint:staticcheck // still found in registries
		mt == images.MediaTypeDockerSchema2LayerGzip || mt == images.MediaTypeDockerSchema2LayerForeignGzip
}

// Options configure a conversion. Zero values mean nydusify's defaults.
type Options struct {
	// FsVersion is the RAFS version, 5 or 6 (default 6).
	FsVersion int
	// Compressor of the blobs (default zstd); ChunkSize (default 1 MiB).
	Compressor *codec.Compressor
	ChunkSize  uint32
	// ChunkDicts are bootstraps of earlier images whose chunks are reused
	// instead of stored again (nydusify --chunk-dict bootstrap:PATH). Their
	// blobs must already be in the target repository.
	ChunkDicts []*rafs.Image
	// Prefetch lists absolute paths (files or directories) for the
	// bootstrap's prefetch table (nydusify --prefetch-patterns), e.g. the
	// files a trace of the container's start read. Paths not in the image
	// are skipped, as nydus-image does.
	Prefetch []string
	// MergePlatform pushes an index with the source's OCI manifest beside
	// the Nydus one.
	MergePlatform bool
	// OCIRef makes the blobs the source's own gzip layers (nydusify
	// --oci-ref, nydus "zran"): chunks are ranges of the layers' tar
	// streams, read through checkpoints the bootstrap carries, so only the
	// bootstrap layer is new (the layers are pushed only if the target
	// repository lacks them). RAFS v6 only.
	OCIRef bool
	// Platform selects the source manifest from an index (default: this
	// machine's platform).
	Platform string
	// Parallel bounds the layers converted at once (default GOMAXPROCS).
	Parallel int
	// WorkDir holds blobs while converting (default: a new temporary
	// directory, removed afterwards).
	WorkDir string
	// Source and Target reach the registries.
	Source, Target RegistryOptions
	// Progress, if set, receives one line per step (stderr in the CLI).
	Progress io.Writer
}

// Result describes the pushed image.
type Result struct {
	// Manifest is the Nydus manifest; Index the pushed index with
	// MergePlatform (else nil).
	Manifest ocispec.Descriptor
	Index    *ocispec.Descriptor
	// Bootstrap is the merged bootstrap's layer; Blobs the blob layers.
	Bootstrap ocispec.Descriptor
	Blobs     []ocispec.Descriptor
	// Uploaded lists the blobs sent to the target; the other blob layers
	// were there already (chunk dict, an earlier conversion).
	Uploaded []digest.Digest
	// Image is the merged image the bootstrap encodes.
	Image *rafs.Image
	Stats builder.Stats
}

// Convert converts the image at src (a registry reference,
// "oci-layout:DIR[:TAG]" or "docker-archive:TAR") and pushes it as target.
func Convert(ctx context.Context, src, target string, opts Options) (*Result, error) {
	if opts.FsVersion == 0 {
		opts.FsVersion = 6
	}
	if opts.FsVersion != 5 && opts.FsVersion != 6 {
		return nil, fmt.Errorf("convert: fs version %d, want 5 or 6", opts.FsVersion)
	}
	if opts.Parallel <= 0 {
		opts.Parallel = runtime.GOMAXPROCS(0)
	}
	work := opts.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "rafs-convert-")
		if err != nil {
			return nil, fmt.Errorf("convert: %w", err)
		}
		defer os.RemoveAll(d)
		work = d
	}
	s, err := openSource(ctx, src, opts.Source)
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	defer s.close()
	c := &conv{opts: opts, src: s, work: work}
	res, err := c.run(ctx, target)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", src, err)
	}
	return res, nil
}

type conv struct {
	opts Options
	src  source
	work string
	mu   sync.Mutex // serializes progress lines
}

func (c *conv) progress(format string, args ...any) {
	if c.opts.Progress == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	fmt.Fprintf(c.opts.Progress, format+"\n", args...)
}

// pickManifest resolves the root to one platform's manifest.
func (c *conv) pickManifest(ctx context.Context) (ocispec.Descriptor, ocispec.Manifest, error) {
	root, err := c.src.root(ctx)
	if err != nil {
		return ocispec.Descriptor{}, ocispec.Manifest{}, err
	}
	desc := root
	if images.IsIndexType(root.MediaType) {
		var idx ocispec.Index
		if _, err := readJSON(ctx, c.src, root, &idx); err != nil {
			return ocispec.Descriptor{}, ocispec.Manifest{}, err
		}
		m := platforms.Default()
		if c.opts.Platform != "" {
			p, err := platforms.Parse(c.opts.Platform)
			if err != nil {
				return ocispec.Descriptor{}, ocispec.Manifest{}, fmt.Errorf("platform: %w", err)
			}
			m = platforms.Only(p)
		}
		found := false
		for _, d := range idx.Manifests {
			if !images.IsManifestType(d.MediaType) {
				continue
			}
			if d.Platform == nil || m.Match(*d.Platform) {
				better := !found || (d.Platform != nil && (desc.Platform == nil || m.Less(*d.Platform, *desc.Platform)))
				if better {
					desc, found = d, true
				}
			}
		}
		if !found {
			return ocispec.Descriptor{}, ocispec.Manifest{}, fmt.Errorf("index %s has no manifest for the platform", root.Digest)
		}
	}
	if !images.IsManifestType(desc.MediaType) {
		return ocispec.Descriptor{}, ocispec.Manifest{}, fmt.Errorf("unsupported media type %q", desc.MediaType)
	}
	var man ocispec.Manifest
	if _, err := readJSON(ctx, c.src, desc, &man); err != nil {
		return ocispec.Descriptor{}, ocispec.Manifest{}, err
	}
	for _, l := range man.Layers {
		if l.Annotations[LayerAnnotationNydusBootstrap] != "" || l.MediaType == MediaTypeNydusBlob {
			return ocispec.Descriptor{}, ocispec.Manifest{}, errors.New("source is already a Nydus image")
		}
	}
	return desc, man, nil
}

// progressInterval is how often a layer still converting is reported.
var progressInterval = 5 * time.Second

type layerOut struct {
	res   *builder.Result
	stats builder.Stats
	path  string // the blob file, if a blob was written
	// layer is the kept gzip layer of an --oci-ref build (then path is
	// its separate blob meta).
	layer string
}

func (c *conv) buildLayer(ctx context.Context, i, n int, desc ocispec.Descriptor) (*layerOut, error) {
	start := time.Now()
	rc, err := c.src.fetch(ctx, desc)
	if err != nil {
		return nil, err
	}
	vr, err := newVerifiedReader(rc, desc)
	if err != nil {
		return nil, err
	}
	defer vr.Close()
	if c.opts.Progress != nil {
		// Large layers take minutes: say how far each one is.
		tick := time.NewTicker(progressInterval)
		stop := make(chan struct{})
		defer func() { tick.Stop(); close(stop) }()
		go func() {
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					r := vr.read.Load()
					c.progress("layer %d/%d %s: %s of %s read (%d%%)", i+1, n, desc.Digest.Encoded()[:12],
						size(r), size(desc.Size), 100*r/max(desc.Size, 1))
				}
			}
		}()
	}
	f, err := os.CreateTemp(c.work, "blob-")
	if err != nil {
		return nil, err
	}
	keep := false
	defer func() {
		f.Close()
		if !keep {
			os.Remove(f.Name())
		}
	}()
	bopts := builder.Options{
		Version:    c.opts.FsVersion,
		ChunkSize:  c.opts.ChunkSize,
		Compressor: c.opts.Compressor,
		ChunkDicts: c.opts.ChunkDicts,
	}
	var blobOut io.Writer = f
	var tarIn io.Reader = vr
	var layerFile *os.File
	if c.opts.OCIRef {
		// The layer itself is the blob: keep it (verified) and index it;
		// the build writes the layer's blob meta (nydus's ref blob) to f.
		if !isGzipLayer(desc.MediaType) {
			return nil, fmt.Errorf("layer %s: --oci-ref needs gzip layers, not %q", desc.Digest, desc.MediaType)
		}
		if layerFile, err = os.CreateTemp(c.work, "layer-"); err != nil {
			return nil, err
		}
		defer func() {
			layerFile.Close()
			if !keep {
				os.Remove(layerFile.Name())
			}
		}()
		if _, err := io.Copy(layerFile, vr); err != nil {
			return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
		}
		if err := vr.drain(); err != nil {
			return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
		}
		bopts.Zran = &builder.ZranLayer{ID: desc.Digest.Encoded(), R: layerFile, Size: desc.Size}
		tarIn = io.NewSectionReader(layerFile, 0, desc.Size)
	}
	b, err := builder.New(bopts, blobOut)
	if err != nil {
		return nil, err
	}
	if err := b.AddTar(ctx, tarIn); err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	if err := vr.drain(); err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	res, err := b.Finish()
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	st := b.Stats()
	out := &layerOut{res: res, stats: st}
	if res.Blob != nil {
		if err := f.Sync(); err != nil {
			return nil, err
		}
		out.path, keep = f.Name(), true
		if layerFile != nil {
			out.layer = layerFile.Name()
		}
		c.progress("layer %d/%d %s: %d files, %s -> blob %.12s (%s, %d chunks new, %d reused) in %s",
			i+1, n, desc.Digest.Encoded()[:12], st.Files, size(int64(st.Bytes)), res.Blob.ID,
			size(int64(res.Blob.CompressedSize)), st.StoredChunks, st.DedupChunks, time.Since(start).Round(time.Millisecond))
	} else {
		c.progress("layer %d/%d %s: %d files, %s -> no new data (%d chunks reused)",
			i+1, n, desc.Digest.Encoded()[:12], st.Files, size(int64(st.Bytes)), st.DedupChunks)
	}
	return out, nil
}

func size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func (c *conv) run(ctx context.Context, target string) (*Result, error) {
	srcDesc, man, err := c.pickManifest(ctx)
	if err != nil {
		return nil, err
	}
	var cfg ocispec.Image
	if _, err := readJSON(ctx, c.src, man.Config, &cfg); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if len(man.Layers) == 0 {
		return nil, errors.New("image has no layers")
	}
	c.progress("converting %d layers of %s", len(man.Layers), srcDesc.Digest)

	outs := make([]*layerOut, len(man.Layers))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.opts.Parallel)
	for i, l := range man.Layers {
		if !images.IsLayerType(l.MediaType) {
			return nil, fmt.Errorf("layer %d: unsupported media type %q", i, l.MediaType)
		}
		g.Go(func() error {
			o, err := c.buildLayer(gctx, i, len(man.Layers), l)
			outs[i] = o
			return err
		})
	}
	if err := g.Wait(); err != nil {
		for _, o := range outs {
			if o != nil && o.path != "" {
				os.Remove(o.path)
			}
			if o != nil && o.layer != "" {
				os.Remove(o.layer)
			}
		}
		return nil, err
	}

	layers := make([]*rafs.Image, len(outs))
	blobFiles := map[string]string{} // blob id -> file
	refLayers := map[string]string{} // --oci-ref: layer digest -> file
	var stats builder.Stats
	for i, o := range outs {
		layers[i] = o.res.Image
		if o.res.Blob == nil {
			continue
		}
		if o.layer != "" {
			blobFiles[zran.MetaBlobID(o.res.Blob)] = o.path
			refLayers[o.res.Blob.ID] = o.layer
			continue
		}
		blobFiles[o.res.Blob.ID] = o.path
	}
	merged, err := builder.Merge(layers, c.opts.FsVersion)
	if err != nil {
		return nil, fmt.Errorf("merge layers: %w", err)
	}
	for _, o := range outs {
		st := o.stats
		stats.Files += st.Files
		stats.Bytes += st.Bytes
		stats.Chunks += st.Chunks
		stats.StoredChunks += st.StoredChunks
		stats.StoredBytes += st.StoredBytes
		stats.DedupChunks += st.DedupChunks
	}
	if err := setPrefetch(merged, c.opts.Prefetch); err != nil {
		return nil, err
	}
	var boot bytes.Buffer
	if err := bootstrap.Write(&boot, merged); err != nil {
		return nil, fmt.Errorf("write bootstrap: %w", err)
	}
	bootLayer, diffID, err := packBootstrap(boot.Bytes())
	if err != nil {
		return nil, err
	}
	bootDesc := ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageLayerGzip,
		Digest:    digest.FromBytes(bootLayer),
		Size:      int64(len(bootLayer)),
		Annotations: map[string]string{
			LayerAnnotationUncompressed:   diffID.String(),
			LayerAnnotationFSVersion:      strconv.Itoa(c.opts.FsVersion),
			LayerAnnotationNydusBootstrap: "true",
		},
	}
	docker := srcDesc.MediaType == images.MediaTypeDockerSchema2Manifest
	if docker {
		bootDesc.MediaType = images.MediaTypeDockerSchema2LayerGzip
	}

	res := &Result{Image: merged, Bootstrap: bootDesc, Stats: stats}
	diffIDs := make([]digest.Digest, 0, len(merged.Blobs)+1)
	for _, b := range merged.Blobs {
		d := digest.NewDigestFromEncoded(digest.SHA256, b.ID)
		ann := map[string]string{LayerAnnotationNydusBlob: "true"}
		bsize := int64(b.CompressedSize)
		if id := zran.MetaBlobID(b); id != "" {
			// nydus's --oci-ref manifest: the layer's blob meta (ref blob)
			// stands for the original layer it names.
			ann[LayerAnnotationNydusRefLayer] = d.String()
			d, bsize = digest.NewDigestFromEncoded(digest.SHA256, id), int64(b.Meta.Size)
		}
		ann[LayerAnnotationUncompressed] = d.String()
		res.Blobs = append(res.Blobs, ocispec.Descriptor{
			MediaType:   MediaTypeNydusBlob,
			Digest:      d,
			Size:        bsize,
			Annotations: ann,
		})
		diffIDs = append(diffIDs, d)
	}
	cfg.RootFS.DiffIDs = append(diffIDs, diffID)
	cfg.History = append(cfg.History, ocispec.History{CreatedBy: "Nydus Converter", Comment: "Nydus Bootstrap Layer"})
	cfgBytes, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	cfgDesc := ocispec.Descriptor{MediaType: man.Config.MediaType, Digest: digest.FromBytes(cfgBytes), Size: int64(len(cfgBytes))}

	nman := ocispec.Manifest{
		MediaType: srcDesc.MediaType,
		Config:    cfgDesc,
		Layers:    append(append([]ocispec.Descriptor{}, res.Blobs...), bootDesc),
	}
	nman.SchemaVersion = 2
	if c.opts.MergePlatform && !docker {
		// The OCI manifest is pushed beside it, so the subject resolves.
		sd := srcDesc
		sd.Platform, sd.Annotations = nil, nil
		nman.Subject = &sd
	}
	manBytes, err := json.MarshalIndent(nman, "", "  ")
	if err != nil {
		return nil, err
	}
	manDesc := ocispec.Descriptor{MediaType: srcDesc.MediaType, Digest: digest.FromBytes(manBytes), Size: int64(len(manBytes))}
	res.Manifest = manDesc

	p, err := newPusher(ctx, target, c.opts.Target)
	if err != nil {
		return nil, err
	}
	// Blobs first (in parallel), then config, manifest and index, so that
	// the registry never holds a manifest whose blobs are missing.
	var umu sync.Mutex
	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(4)
	// The original layers of an --oci-ref image are read from the target
	// repository by digest: mount or upload those it lacks.
	for id, file := range refLayers {
		g.Go(func() error {
			st, err := os.Stat(file)
			if err != nil {
				return err
			}
			d := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.NewDigestFromEncoded(digest.SHA256, id), Size: st.Size()}
			up, err := p.pushFile(gctx, d, file)
			if err != nil {
				return fmt.Errorf("original layer %s: %w", d.Digest, err)
			}
			if up {
				umu.Lock()
				res.Uploaded = append(res.Uploaded, d.Digest)
				umu.Unlock()
			}
			return nil
		})
	}
	for _, d := range res.Blobs {
		g.Go(func() error {
			file, ok := blobFiles[d.Digest.Encoded()]
			if !ok {
				// From a chunk dict: it must be in the target already.
				if err := p.exists(gctx, d); err != nil {
					return fmt.Errorf("blob %s from the chunk dict: %w", d.Digest, err)
				}
				return nil
			}
			start := time.Now()
			up, err := p.pushFile(gctx, d, file)
			if err != nil {
				return err
			}
			if up {
				umu.Lock()
				res.Uploaded = append(res.Uploaded, d.Digest)
				umu.Unlock()
				c.progress("pushed blob %.12s (%s) in %s", d.Digest.Encoded(), size(d.Size), time.Since(start).Round(time.Millisecond))
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	for _, b := range []struct {
		d ocispec.Descriptor
		b []byte
	}{{bootDesc, bootLayer}, {cfgDesc, cfgBytes}} {
		if _, err := p.pushBytes(ctx, b.d, b.b); err != nil {
			return nil, err
		}
	}
	if c.opts.MergePlatform {
		if err := c.copyImage(ctx, p, srcDesc, man); err != nil {
			return nil, fmt.Errorf("copy OCI manifest: %w", err)
		}
	}
	if _, err := p.pushBytes(ctx, manDesc, manBytes); err != nil {
		return nil, err
	}
	if c.opts.MergePlatform {
		plat := platformOf(srcDesc, cfg)
		ociD := srcDesc
		ociD.Platform = &plat
		ny := manDesc
		nplat := plat
		nplat.OSFeatures = append(append([]string{}, plat.OSFeatures...), ManifestOSFeatureNydus)
		ny.Platform = &nplat
		idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{ociD, ny}}
		if docker {
			idx.MediaType = images.MediaTypeDockerSchema2ManifestList
		}
		idx.SchemaVersion = 2
		ib, err := json.MarshalIndent(idx, "", "  ")
		if err != nil {
			return nil, err
		}
		id := ocispec.Descriptor{MediaType: idx.MediaType, Digest: digest.FromBytes(ib), Size: int64(len(ib))}
		if _, err := p.pushBytes(ctx, id, ib); err != nil {
			return nil, err
		}
		res.Index = &id
	}
	c.progress("pushed %s: %d blobs (%d uploaded), bootstrap %s", target, len(res.Blobs), len(res.Uploaded), size(bootDesc.Size))
	return res, nil
}

// setPrefetch fills img's prefetch table from paths, resolved in the merged
// tree (layer builds cannot: a path may be in any layer).
func setPrefetch(img *rafs.Image, paths []string) error {
	img.Prefetch = nil
	for _, p := range paths {
		ino := img.Root()
		for _, name := range strings.Split(strings.Trim(path.Clean("/"+p), "/"), "/") {
			if name == "" || ino == nil {
				break
			}
			next, err := img.Lookup(ino, name)
			if err != nil {
				ino = nil
				break
			}
			ino = next
		}
		if ino != nil && !slices.Contains(img.Prefetch, ino.Ino) {
			img.Prefetch = append(img.Prefetch, ino.Ino)
		}
	}
	if err := img.Validate(); err != nil {
		return fmt.Errorf("prefetch table: %w", err)
	}
	return nil
}

// copyImage pushes the source manifest's config and layers to the target,
// streaming each from the source (verified on the way).
func (c *conv) copyImage(ctx context.Context, p *pusher, desc ocispec.Descriptor, man ocispec.Manifest) error {
	for _, d := range append([]ocispec.Descriptor{man.Config}, man.Layers...) {
		if err := p.pushFrom(ctx, d, func() (io.ReadCloser, error) {
			rc, err := c.src.fetch(ctx, d)
			if err != nil {
				return nil, err
			}
			return newVerifiedReader(rc, d)
		}); err != nil {
			return err
		}
	}
	return p.pushFrom(ctx, desc, func() (io.ReadCloser, error) {
		rc, err := c.src.fetch(ctx, desc)
		if err != nil {
			return nil, err
		}
		return newVerifiedReader(rc, desc)
	})
}

func platformOf(desc ocispec.Descriptor, cfg ocispec.Image) ocispec.Platform {
	if desc.Platform != nil {
		return *desc.Platform
	}
	p := ocispec.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant, OSVersion: cfg.OSVersion}
	if p.OS == "" {
		p.OS = "linux"
	}
	if p.Architecture == "" {
		p.Architecture = runtime.GOARCH
	}
	return p
}

// packBootstrap wraps a bootstrap in the bootstrap layer nydus-snapshotter
// writes: a gzip tar of the directory "image" and "image/image.boot" (0444).
// It returns the layer and its diff id (the digest of the plain tar).
func packBootstrap(boot []byte) ([]byte, digest.Digest, error) {
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	if err := tw.WriteHeader(&tar.Header{Name: filepath.Dir(BootstrapFileNameInLayer), Mode: 0o755, Typeflag: tar.TypeDir}); err != nil {
		return nil, "", err
	}
	if err := tw.WriteHeader(&tar.Header{Name: BootstrapFileNameInLayer, Mode: 0o444, Size: int64(len(boot)), Typeflag: tar.TypeReg}); err != nil {
		return nil, "", err
	}
	if _, err := tw.Write(boot); err != nil {
		return nil, "", err
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(tarBuf.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return gz.Bytes(), digest.FromBytes(tarBuf.Bytes()), nil
}

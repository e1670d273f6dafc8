package cachefiles

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/storage"
)

// BindRequest is the body of nydusd's `PUT /api/v2/blobs` as
// nydus-snapshotter sends it for the fscache mode.
type BindRequest struct {
	Type     string     `json:"type"` // "bootstrap"
	ID       string     `json:"id"`   // the fsid the image is mounted with
	DomainID string     `json:"domain_id,omitempty"`
	Config   BindConfig `json:"config"`
}

// BindConfig is the "config" member of a BindRequest.
type BindConfig struct {
	ID             string          `json:"id,omitempty"`
	BackendType    string          `json:"backend_type"`
	BackendConfig  json.RawMessage `json:"backend_config"`
	CacheType      string          `json:"cache_type,omitempty"`
	CacheConfig    json.RawMessage `json:"cache_config,omitempty"`
	PrefetchConfig json.RawMessage `json:"prefetch_config,omitempty"`
	MetadataPath   string          `json:"metadata_path"`
}

// Domain is the domain the request binds into: DomainID, or ID when it is
// empty (an image mounted without domain_id is its own domain).
func (r *BindRequest) Domain() string {
	if r.DomainID != "" {
		return r.DomainID
	}
	return r.ID
}

// ErrNotFound is wrapped when an unbind names nothing bound.
var ErrNotFound = errors.New("cachefiles: not bound")

// ErrExists is wrapped when a bind repeats a bound id.
var ErrExists = errors.New("cachefiles: already bound")

// image is one bound bootstrap.
type image struct {
	domain, id string
	path       string
	size       int64
	img        *rafs.Image
	fetcher    *storage.Fetcher
	unbound    bool // removed from the registry; closed with its last object
	prefetch   config.Prefetch
	req        BindRequest // as accepted, for Bindings
	seq        uint64      // bind order
}

// sharedBlob is one blob of a domain: the union of the chunks every bound
// image of the domain knows of it, and the images able to fetch it.
type sharedBlob struct {
	domain string
	blob   *rafs.Blob
	layout rafs.BlobLayout
	users  []*image
	size   uint64 // object size answered to OPEN
	// extents are the files' chunk runs, bounding read-ahead.
	extents []rafs.Extent
}

type key struct{ domain, name string }

// fetcherConfig turns the v2 API config into the fetcher's config. The
// kernel's cache files are the cache in this mode, so the fetcher keeps no
// blob cache of its own (the data would be stored twice).
func fetcherConfig(c *BindConfig) (*config.Config, error) {
	switch c.CacheType {
	case "", "fscache":
	default:
		return nil, fmt.Errorf("cachefiles: cache_type %q: only fscache is supported in this mode", c.CacheType)
	}
	if c.BackendType == "" {
		return nil, fmt.Errorf("cachefiles: config.backend_type is empty")
	}
	v1 := map[string]any{
		"device": map[string]any{
			"backend": map[string]any{"type": c.BackendType, "config": rawOrEmpty(c.BackendConfig)},
			"cache":   map[string]any{"type": "dummycache"},
		},
		"mode": "direct",
	}
	if len(c.PrefetchConfig) > 0 && string(c.PrefetchConfig) != "null" {
		v1["fs_prefetch"] = c.PrefetchConfig
	}
	data, err := json.Marshal(v1)
	if err != nil {
		return nil, fmt.Errorf("cachefiles: config: %w", err)
	}
	cfg, err := config.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("cachefiles: config: %w", err)
	}
	return cfg, nil
}

func rawOrEmpty(r json.RawMessage) json.RawMessage {
	if len(r) == 0 || string(r) == "null" {
		return json.RawMessage("{}")
	}
	return r
}

// BindBlob registers an image: it loads the RAFS v6 bootstrap at
// req.Config.MetadataPath, creates its fetcher, and from then on answers
// OPENs for the fsid req.ID and for each of its blobs in the domain.
func (d *Daemon) BindBlob(req *BindRequest) error {
	if req.Type != "" && req.Type != "bootstrap" {
		return fmt.Errorf("cachefiles: bind type %q: only \"bootstrap\" is supported", req.Type)
	}
	if req.ID == "" || strings.ContainsAny(req.ID, ",\x00") || strings.ContainsAny(req.DomainID, ",\x00") {
		return fmt.Errorf("cachefiles: bind: id %q / domain_id %q: empty or has a comma or NUL", req.ID, req.DomainID)
	}
	if req.Config.MetadataPath == "" {
		return fmt.Errorf("cachefiles: bind %s: config.metadata_path is empty", req.ID)
	}
	cfg, err := fetcherConfig(&req.Config)
	if err != nil {
		return err
	}
	fi, err := os.Stat(req.Config.MetadataPath)
	if err != nil {
		return fmt.Errorf("cachefiles: bind %s: %w", req.ID, err)
	}
	img, err := bootstrap.Open(req.Config.MetadataPath)
	if err != nil {
		return fmt.Errorf("cachefiles: bind %s: %w", req.ID, err)
	}
	bootstrap.ReleaseMemory()
	if img.Version != 6 {
		return fmt.Errorf("cachefiles: bind %s: RAFS v%d bootstrap; EROFS over fscache needs RAFS v6", req.ID, img.Version)
	}
	f, err := storage.New(cfg, storage.WithLogger(d.log))
	if err != nil {
		return fmt.Errorf("cachefiles: bind %s: %w", req.ID, err)
	}
	if err := f.AddImage(img); err != nil {
		f.Close()
		return fmt.Errorf("cachefiles: bind %s: %w", req.ID, err)
	}
	im := &image{domain: req.Domain(), id: req.ID, path: req.Config.MetadataPath, size: fi.Size(), img: img, fetcher: f,
		prefetch: cfg.Rafs.Prefetch, req: cloneBind(req)}

	d.mu.Lock()
	defer d.mu.Unlock()
	d.bindSeq++
	im.seq = d.bindSeq
	if _, ok := d.images[key{im.domain, im.id}]; ok {
		f.Close()
		return fmt.Errorf("%w: image %s in domain %s", ErrExists, im.id, im.domain)
	}
	d.images[key{im.domain, im.id}] = im
	for _, l := range img.BlobLayouts() {
		k := key{im.domain, l.Blob.ID}
		sb := d.blobs[k]
		if sb == nil {
			sb = &sharedBlob{domain: im.domain, blob: l.Blob, layout: rafs.BlobLayout{Blob: l.Blob}}
			d.blobs[k] = sb
		}
		sb.users = append(sb.users, im)
		sb.layout.Chunks = mergeChunks(sb.layout.Chunks, l.Chunks)
		ext := append(append([]rafs.Extent(nil), sb.extents...), img.FileExtents(l.Blob)...)
		rafs.SortExtents(ext)
		sb.extents = ext // replaced, never modified: READs use it unlocked
		sb.size = max(sb.size, objectSize(&sb.layout))
	}
	d.log.Info("cachefiles: bound image", "id", im.id, "domain", im.domain, "bootstrap", im.path, "blobs", len(img.Blobs))
	return nil
}

// Bindings returns the bind requests of the bound images in the order
// they were bound: what a successor daemon binds again after a handover
// (with Detach, or the device fd kept by a supervisor).
func (d *Daemon) Bindings() []BindRequest {
	d.mu.Lock()
	ims := make([]*image, 0, len(d.images))
	for _, im := range d.images {
		ims = append(ims, im)
	}
	d.mu.Unlock()
	sort.Slice(ims, func(a, b int) bool { return ims[a].seq < ims[b].seq })
	out := make([]BindRequest, len(ims))
	for i, im := range ims {
		out[i] = cloneBind(&im.req)
	}
	return out
}

// cloneBind copies r so that callers cannot change a kept request through
// its raw JSON slices.
func cloneBind(r *BindRequest) BindRequest {
	c := *r
	for _, p := range []*json.RawMessage{&c.Config.BackendConfig, &c.Config.CacheConfig, &c.Config.PrefetchConfig} {
		if *p != nil {
			*p = append(json.RawMessage(nil), *p...)
		}
	}
	return c
}

// mergeChunks returns the union of two offset-sorted chunk lists, one
// chunk per uncompressed offset.
func mergeChunks(a, b []*rafs.Chunk) []*rafs.Chunk {
	if len(a) == 0 {
		return b
	}
	out := make([]*rafs.Chunk, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || (i < len(a) && a[i].UncompressedOffset < b[j].UncompressedOffset):
			out = append(out, a[i])
			i++
		case i == len(a) || b[j].UncompressedOffset < a[i].UncompressedOffset:
			out = append(out, b[j])
			j++
		default:
			out = append(out, a[i])
			i++
			j++
		}
	}
	return out
}

// objectSize is the size of a blob's cache object: its uncompressed size,
// or the end of its last chunk if the bootstrap says less.
func objectSize(l *rafs.BlobLayout) uint64 {
	n := l.Blob.UncompressedSize
	if k := len(l.Chunks); k > 0 {
		c := l.Chunks[k-1]
		n = max(n, c.UncompressedOffset+uint64(c.UncompressedSize))
	}
	return n
}

// UnbindBlob removes bindings of domain: with blobID "" every image of
// the domain; else the image whose fsid is blobID, or if none, the data
// blob blobID of the domain. Objects the kernel has open keep being served
// until it closes them (a mounted image is not failed by an unbind).
func (d *Daemon) UnbindBlob(domain, blobID string) error {
	d.mu.Lock()
	var drop []*image
	for k, im := range d.images {
		if k.domain == domain && (blobID == "" || k.name == blobID) {
			drop = append(drop, im)
			delete(d.images, k)
		}
	}
	found := len(drop) > 0
	for k, sb := range d.blobs {
		if k.domain != domain {
			continue
		}
		if !found && blobID != "" && k.name == blobID {
			delete(d.blobs, k)
			found = true
			continue
		}
		users := make([]*image, 0, len(sb.users))
		for _, u := range sb.users {
			if !contains(drop, u) {
				users = append(users, u)
			}
		}
		sb.users = users
		if len(users) == 0 {
			delete(d.blobs, k)
		}
	}
	var closeNow []*image
	for _, im := range drop {
		im.unbound = true
		if !d.inUse(im) {
			closeNow = append(closeNow, im)
		}
	}
	d.mu.Unlock()
	if !found {
		return fmt.Errorf("%w: domain %q blob %q", ErrNotFound, domain, blobID)
	}
	for _, im := range closeNow {
		im.fetcher.Close()
	}
	d.log.Info("cachefiles: unbound", "domain", domain, "blob", blobID, "images", len(drop))
	return nil
}

func contains(l []*image, x *image) bool {
	for _, y := range l {
		if y == x {
			return true
		}
	}
	return false
}

// BlobInfo describes one binding for GET /api/v2/blobs.
type BlobInfo struct {
	Type     string `json:"type"` // "bootstrap" or "datablob"
	ID       string `json:"id"`
	DomainID string `json:"domain_id"`
	Path     string `json:"metadata_path,omitempty"`
	Size     uint64 `json:"size"`
	Images   int    `json:"images,omitempty"` // images sharing a data blob
}

// Blobs lists the bindings of domain ("" for all), sorted.
func (d *Daemon) Blobs(domain string) []BlobInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []BlobInfo
	for k, im := range d.images {
		if domain == "" || k.domain == domain {
			out = append(out, BlobInfo{Type: "bootstrap", ID: k.name, DomainID: k.domain, Path: im.path, Size: uint64(im.size)})
		}
	}
	for k, sb := range d.blobs {
		if domain == "" || k.domain == domain {
			out = append(out, BlobInfo{Type: "datablob", ID: k.name, DomainID: k.domain, Size: sb.size, Images: len(sb.users)})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.DomainID != b.DomainID {
			return a.DomainID < b.DomainID
		}
		if a.Type != b.Type {
			return a.Type < b.Type
		}
		return a.ID < b.ID
	})
	return out
}

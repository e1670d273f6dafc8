package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// maxJSON bounds manifests, indexes and configs read from a source: they are
// small, and an unbounded read of a hostile one would exhaust memory.
const maxJSON = 8 << 20

// source is where an image comes from: a registry, an OCI image layout
// directory or a docker-archive tar. Every read is checked against the
// descriptor's digest and size by the caller (verifiedReader).
type source interface {
	// root returns the descriptor of the image's index or manifest.
	root(ctx context.Context) (ocispec.Descriptor, error)
	fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error)
	close() error
}

// openSource parses a --source value: "oci-layout:DIR[:TAG]",
// "docker-archive:TAR" or a registry reference.
func openSource(ctx context.Context, ref string, ro RegistryOptions) (source, error) {
	switch {
	case strings.HasPrefix(ref, "oci-layout:"):
		return openOCILayout(strings.TrimPrefix(ref, "oci-layout:"))
	case strings.HasPrefix(ref, "docker-archive:"):
		return openDockerArchive(strings.TrimPrefix(ref, "docker-archive:"))
	default:
		return newRegistrySource(ref, ro), nil
	}
}

// registrySource reads an image from a registry with containerd's resolver.
type registrySource struct {
	ref      string
	resolver remotes.Resolver
	fetcher  remotes.Fetcher
}

func newRegistrySource(ref string, ro RegistryOptions) *registrySource {
	return &registrySource{ref: ref, resolver: ro.resolver()}
}

func (s *registrySource) root(ctx context.Context) (ocispec.Descriptor, error) {
	name, desc, err := s.resolver.Resolve(ctx, s.ref)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("resolve %s: %w", s.ref, err)
	}
	f, err := s.resolver.Fetcher(ctx, name)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("fetcher for %s: %w", name, err)
	}
	s.fetcher = f
	return desc, nil
}

func (s *registrySource) fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if s.fetcher == nil {
		return nil, errors.New("registry source: fetch before resolve")
	}
	rc, err := s.fetcher.Fetch(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("fetch %s from %s: %w", desc.Digest, s.ref, err)
	}
	return rc, nil
}

func (s *registrySource) close() error { return nil }

// ociLayout reads an OCI image layout directory (image-spec image-layout.md).
// DIR may be followed by ":TAG" to pick the index entry whose
// org.opencontainers.image.ref.name annotation is TAG.
type ociLayout struct {
	dir string
	tag string
}

func openOCILayout(arg string) (*ociLayout, error) {
	dir, tag := arg, ""
	if i := strings.LastIndexByte(arg, ':'); i >= 0 {
		if _, err := os.Stat(arg); err != nil {
			dir, tag = arg[:i], arg[i+1:]
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, ocispec.ImageLayoutFile))
	if err != nil {
		return nil, fmt.Errorf("oci layout %s: %w", dir, err)
	}
	var l ocispec.ImageLayout
	if err := json.Unmarshal(b, &l); err != nil || l.Version == "" {
		return nil, fmt.Errorf("oci layout %s: bad %s", dir, ocispec.ImageLayoutFile)
	}
	return &ociLayout{dir: dir, tag: tag}, nil
}

func (s *ociLayout) root(ctx context.Context) (ocispec.Descriptor, error) {
	b, err := readLimited(filepath.Join(s.dir, "index.json"))
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("oci layout %s: %w", s.dir, err)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("oci layout %s: index.json: %w", s.dir, err)
	}
	var found []ocispec.Descriptor
	for _, m := range idx.Manifests {
		if s.tag == "" || m.Annotations[ocispec.AnnotationRefName] == s.tag {
			found = append(found, m)
		}
	}
	switch {
	case len(found) == 1:
		return found[0], nil
	case len(found) == 0:
		return ocispec.Descriptor{}, fmt.Errorf("oci layout %s: no image tagged %q", s.dir, s.tag)
	}
	// Several untagged entries: treat index.json itself as the image index
	// and let platform matching choose.
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(b), Size: int64(len(b))}, nil
}

func (s *ociLayout) fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("oci layout: %w", err)
	}
	p := filepath.Join(s.dir, "blobs", desc.Digest.Algorithm().String(), desc.Digest.Encoded())
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) && desc.MediaType == ocispec.MediaTypeImageIndex {
		// The synthesized root index is index.json itself.
		return os.Open(filepath.Join(s.dir, "index.json"))
	}
	if err != nil {
		return nil, fmt.Errorf("oci layout: %w", err)
	}
	return f, nil
}

func (s *ociLayout) close() error { return nil }

// dockerArchive reads `docker save` output: a tar with manifest.json naming
// the config and layer tars of each image. Its entries are read in place.
type dockerArchive struct {
	ra      io.ReaderAt
	size    int64
	closer  io.Closer
	entries map[string]*io.SectionReader
	blobs   map[digest.Digest]func() io.Reader
	rootDsc ocispec.Descriptor
}

type dockerManifestEntry struct {
	Config   string
	RepoTags []string
	Layers   []string
}

func openDockerArchive(name string) (*dockerArchive, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("docker archive: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("docker archive: %w", err)
	}
	a, err := newDockerArchive(f, st.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("docker archive %s: %w", name, err)
	}
	a.closer = f
	return a, nil
}

// newDockerArchive indexes the archive of size bytes in ra.
func newDockerArchive(ra io.ReaderAt, size int64) (*dockerArchive, error) {
	a := &dockerArchive{ra: ra, size: size, entries: map[string]*io.SectionReader{}, blobs: map[digest.Digest]func() io.Reader{}}
	if err := a.index(); err != nil {
		return nil, err
	}
	return a, nil
}

// countingReader tracks the offset of the underlying file so that the
// data of each tar entry can be read later with a SectionReader (tar.Reader
// reads headers in whole 512-byte blocks and never reads ahead).
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (a *dockerArchive) index() error {
	cr := &countingReader{r: io.NewSectionReader(a.ra, 0, a.size)}
	tr := tar.NewReader(cr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		a.entries[path.Clean(h.Name)] = io.NewSectionReader(a.ra, cr.n, h.Size)
	}
	mf, ok := a.entries["manifest.json"]
	if !ok {
		return errors.New("no manifest.json")
	}
	if mf.Size() > maxJSON {
		return errors.New("manifest.json too large")
	}
	b, err := io.ReadAll(mf)
	if err != nil {
		return err
	}
	m, err := parseDockerManifest(b)
	if err != nil {
		return err
	}
	add := func(name, mediaType string) (ocispec.Descriptor, error) {
		sr, ok := a.entries[path.Clean(name)]
		if !ok {
			return ocispec.Descriptor{}, fmt.Errorf("manifest.json names %q, not in the archive", name)
		}
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(sr, 0, sr.Size())); err != nil {
			return ocispec.Descriptor{}, err
		}
		d := digest.NewDigest(digest.SHA256, h)
		a.blobs[d] = func() io.Reader { return io.NewSectionReader(sr, 0, sr.Size()) }
		return ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: sr.Size()}, nil
	}
	cfg, err := add(m.Config, images.MediaTypeDockerSchema2Config)
	if err != nil {
		return err
	}
	man := ocispec.Manifest{MediaType: images.MediaTypeDockerSchema2Manifest, Config: cfg}
	man.SchemaVersion = 2
	for _, l := range m.Layers {
		d, err := add(l, images.MediaTypeDockerSchema2Layer)
		if err != nil {
			return err
		}
		man.Layers = append(man.Layers, d)
	}
	mb, err := json.Marshal(man)
	if err != nil {
		return err
	}
	md := digest.FromBytes(mb)
	a.blobs[md] = func() io.Reader { return bytes.NewReader(mb) }
	a.rootDsc = ocispec.Descriptor{MediaType: man.MediaType, Digest: md, Size: int64(len(mb))}
	return nil
}

// parseDockerManifest decodes a docker-archive manifest.json and returns its
// one image (an archive of several images is ambiguous).
func parseDockerManifest(b []byte) (dockerManifestEntry, error) {
	var ms []dockerManifestEntry
	if err := json.Unmarshal(b, &ms); err != nil {
		return dockerManifestEntry{}, fmt.Errorf("manifest.json: %w", err)
	}
	if len(ms) != 1 {
		return dockerManifestEntry{}, fmt.Errorf("manifest.json: %d images, want exactly 1", len(ms))
	}
	if ms[0].Config == "" {
		return dockerManifestEntry{}, errors.New("manifest.json: no Config")
	}
	return ms[0], nil
}

func (a *dockerArchive) root(ctx context.Context) (ocispec.Descriptor, error) { return a.rootDsc, nil }

func (a *dockerArchive) fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	open, ok := a.blobs[desc.Digest]
	if !ok {
		return nil, fmt.Errorf("docker archive: no blob %s", desc.Digest)
	}
	return io.NopCloser(open()), nil
}

func (a *dockerArchive) close() error {
	if a.closer == nil {
		return nil
	}
	return a.closer.Close()
}

func readLimited(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxJSON+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxJSON {
		return nil, fmt.Errorf("%s: larger than %d bytes", name, maxJSON)
	}
	return b, nil
}

// verifiedReader passes a blob through while hashing it, and fails the read
// that reaches its end if the size or digest differ from the descriptor's,
// so that a corrupt or hostile source never yields an image.
type verifiedReader struct {
	rc   io.ReadCloser
	desc ocispec.Descriptor
	h    hash.Hash
	n    int64
	err  error
	// read mirrors n for progress reports from other goroutines.
	read atomic.Int64
}

func newVerifiedReader(rc io.ReadCloser, desc ocispec.Descriptor) (*verifiedReader, error) {
	if err := desc.Digest.Validate(); err != nil {
		rc.Close()
		return nil, fmt.Errorf("descriptor digest: %w", err)
	}
	if desc.Digest.Algorithm() != digest.SHA256 {
		rc.Close()
		return nil, fmt.Errorf("unsupported digest algorithm %s", desc.Digest.Algorithm())
	}
	return &verifiedReader{rc: rc, desc: desc, h: sha256.New()}, nil
}

func (v *verifiedReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	if rem := v.desc.Size - v.n + 1; int64(len(p)) > rem {
		p = p[:rem]
	}
	n, err := v.rc.Read(p)
	v.h.Write(p[:n])
	v.n += int64(n)
	v.read.Store(v.n)
	if v.n > v.desc.Size {
		v.err = fmt.Errorf("blob %s: more than its %d bytes", v.desc.Digest, v.desc.Size)
		return 0, v.err
	}
	if err == io.EOF {
		if v.n != v.desc.Size {
			v.err = fmt.Errorf("blob %s: %d bytes, want %d: %w", v.desc.Digest, v.n, v.desc.Size, io.ErrUnexpectedEOF)
			return n, v.err
		}
		if got := hex.EncodeToString(v.h.Sum(nil)); got != v.desc.Digest.Encoded() {
			v.err = fmt.Errorf("blob %s: digest mismatch (got sha256:%s)", v.desc.Digest, got)
			return n, v.err
		}
	}
	if err != nil {
		v.err = err
	}
	return n, err
}

// drain reads what the consumer left (tar padding, trailing bytes) so the
// digest is checked over the whole blob.
func (v *verifiedReader) drain() error {
	_, err := io.Copy(io.Discard, v)
	return err
}

func (v *verifiedReader) Close() error { return v.rc.Close() }

// readJSON fetches, verifies and decodes a small JSON blob.
func readJSON(ctx context.Context, src source, desc ocispec.Descriptor, v any) ([]byte, error) {
	if desc.Size > maxJSON || desc.Size < 0 {
		return nil, fmt.Errorf("%s %s: size %d out of range", desc.MediaType, desc.Digest, desc.Size)
	}
	rc, err := src.fetch(ctx, desc)
	if err != nil {
		return nil, err
	}
	vr, err := newVerifiedReader(rc, desc)
	if err != nil {
		return nil, err
	}
	defer vr.Close()
	b, err := io.ReadAll(vr)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", desc.Digest, err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return nil, fmt.Errorf("decode %s %s: %w", desc.MediaType, desc.Digest, err)
	}
	return b, nil
}

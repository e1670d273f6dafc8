// Package builder builds RAFS images: a rafs.Image (the bootstrap model,
// written to disk by rafs/v5 or rafs/v6 through rafs/bootstrap) plus one
// data blob, from a directory tree or an OCI layer tar, the way
// nydus-image create does. It also merges layer images (nydus-image merge).
//
// File data is cut into fixed-size chunks, each compressed and digested;
// identical chunks are stored once, within the layer and, given parent
// images or chunk dictionaries, across layers. The blob is streamed to an
// io.Writer chunk by chunk, so building a large tree keeps only its
// metadata in memory.
package builder

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// Options configure a build. The zero value of each field means the
// nydus-image default.
type Options struct {
	// Version is the RAFS version the image will be written as: 5 or 6
	// (default 6). v6 blobs carry a blob meta table; v5 blobs do not.
	Version int
	// ChunkSize is a power of two in [4 KiB, 16 MiB] (default 1 MiB).
	ChunkSize uint32
	// Compressor (default zstd) and Digester (default blake3) of the new blob.
	Compressor *codec.Compressor
	Digester   *codec.Digester
	// Parent is the image this layer is built on (nydus-image
	// --parent-bootstrap): the result is the parent with this layer laid
	// over it, its blob table the parent's plus the new blob, and chunks
	// already in the parent are not stored again.
	Parent *rafs.Image
	// ChunkDicts are images whose chunks may be referenced instead of
	// stored (nydus-image --chunk-dict). Only the blobs actually used join
	// the blob table.
	ChunkDicts []*rafs.Image
	// Whiteouts is how the layer marks deletions of the parent's files
	// (default OCI). Without a parent, a tar layer keeps its markers so
	// that Merge (which expects OCI ones) can apply them later, and a
	// directory layer drops them, as nydus-image does.
	Whiteouts WhiteoutSpec
	// Prefetch lists paths (files or directories) to put in the image's
	// prefetch table (nydus-image --prefetch-policy fs).
	Prefetch []string
	// Zran, if set, makes AddTar's chunks ranges of this gzip layer
	// instead of a new blob (RAFS v6 only); nothing is written to the blob
	// writer.
	Zran *ZranLayer
}

func (o *Options) norm() (Options, error) {
	out := *o
	if out.Version == 0 {
		out.Version = 6
	}
	if out.Version != 5 && out.Version != 6 {
		return out, fmt.Errorf("builder: RAFS version %d (want 5 or 6)", out.Version)
	}
	if out.ChunkSize == 0 {
		out.ChunkSize = rafs.DefaultChunkSize
	}
	if !rafs.ValidChunkSize(out.ChunkSize) {
		return out, fmt.Errorf("builder: chunk size %#x must be a power of two in [0x1000, 0x1000000]", out.ChunkSize)
	}
	if out.Compressor == nil {
		c := codec.Zstd
		out.Compressor = &c
	}
	if out.Digester == nil {
		d := codec.Blake3
		out.Digester = &d
	}
	if out.Zran != nil {
		if out.Version != 6 {
			return out, errors.New("builder: zran (--oci-ref) images need RAFS v6")
		}
		// The data is the layer's gzip stream, whatever was asked for, and
		// chunks are named by sha256, as nydus-image does for ref types.
		c, d := codec.Gzip, codec.SHA256
		out.Compressor, out.Digester = &c, &d
	}
	if !out.Compressor.Valid() || !out.Digester.Valid() {
		return out, fmt.Errorf("builder: bad compressor %s or digester %s", out.Compressor, out.Digester)
	}
	return out, nil
}

type dedupKey struct {
	digest codec.Digest
	size   uint32
}

// dictChunk is a chunk of a chunk dictionary, not yet in the blob table.
type dictChunk struct {
	blob  *rafs.Blob
	chunk *rafs.Chunk
}

// Builder accumulates one layer (AddDir or AddTar) and produces the
// image with Finish. It is not safe for concurrent use.
type Builder struct {
	opts   Options
	root   *node
	base   bool // root came from a parent: layers are applied over it
	added  bool
	blobs  []*rafs.Blob
	byID   map[string]uint32
	bw     *blobWriter
	dedup  map[dedupKey]*rafs.Chunk
	dict   map[dedupKey]dictChunk
	stats  Stats
	closed bool
	z      *zranState // with Options.Zran
}

// Stats count what a build stored and what it deduplicated.
type Stats struct {
	Files        uint64 // regular files
	Bytes        uint64 // bytes of regular file data read
	Chunks       uint64 // chunks referenced by files
	StoredChunks uint64 // chunks written to the new blob
	StoredBytes  uint64 // uncompressed bytes of the stored chunks
	DedupChunks  uint64 // chunks found in the layer, parent or dictionaries
}

// New starts a build that streams the new data blob to blob.
func New(opts Options, blob io.Writer) (*Builder, error) {
	o, err := opts.norm()
	if err != nil {
		return nil, err
	}
	b := &Builder{
		opts:  o,
		root:  newDir(0o755),
		byID:  map[string]uint32{},
		bw:    newBlobWriter(blob, *o.Compressor, *o.Digester),
		dedup: map[dedupKey]*rafs.Chunk{},
		dict:  map[dedupKey]dictChunk{},
	}
	if o.Zran != nil {
		b.z = &zranState{layer: o.Zran}
	}
	if o.Parent != nil {
		if o.Parent.ChunkSize != o.ChunkSize {
			return nil, fmt.Errorf("builder: parent image chunk size %#x differs from %#x", o.Parent.ChunkSize, o.ChunkSize)
		}
		root, err := b.importImage(o.Parent)
		if err != nil {
			return nil, fmt.Errorf("builder: parent image: %w", err)
		}
		b.root, b.base = root, true
		// Whiteouts left in a lone layer's image are markers for the
		// layers below it; there is nothing below the parent.
		stripWhiteouts(b.root, o.Whiteouts)
	}
	for _, d := range o.ChunkDicts {
		for _, i := range d.Inodes {
			for _, fc := range i.Chunks {
				if int(fc.BlobIndex) >= len(d.Blobs) {
					continue
				}
				bl := d.Blobs[fc.BlobIndex]
				if bl.Digester != *o.Digester {
					continue
				}
				b.dict[dedupKey{fc.Digest, fc.UncompressedSize}] = dictChunk{bl, fc.Chunk}
			}
		}
	}
	return b, nil
}

// importImage adds img's blobs to the table and returns its tree; its
// chunks become deduplication candidates.
func (b *Builder) importImage(img *rafs.Image) (*node, error) {
	idx := make([]uint32, len(img.Blobs))
	for k, bl := range img.Blobs {
		idx[k] = b.addBlob(bl)
	}
	root, err := fromImage(img, idx)
	if err != nil {
		return nil, err
	}
	var walk func(n *node)
	seen := map[*node]bool{}
	walk = func(n *node) {
		if seen[n] {
			return
		}
		seen[n] = true
		for _, fc := range n.chunks {
			if b.blobs[fc.BlobIndex].Digester == *b.opts.Digester {
				b.dedup[dedupKey{fc.Digest, fc.UncompressedSize}] = fc.Chunk
			}
		}
		for _, c := range n.children {
			walk(c)
		}
	}
	walk(root)
	return root, nil
}

func (b *Builder) addBlob(bl *rafs.Blob) uint32 {
	if k, ok := b.byID[bl.ID]; ok {
		return k
	}
	k := uint32(len(b.blobs))
	b.blobs = append(b.blobs, bl)
	b.byID[bl.ID] = k
	return k
}

// newBlobIndex is the blob index of chunks written by this build: it
// follows the parent's and dictionaries' blobs, so it is only known at
// Finish. Until then new chunks carry this placeholder.
const newBlobIndex = ^uint32(0)

// chunk returns the chunk for data, storing it unless an identical one is
// known.
func (b *Builder) chunk(data []byte) (*rafs.Chunk, error) {
	dg := b.opts.Digester.Sum(data)
	key := dedupKey{dg, uint32(len(data))}
	b.stats.Chunks++
	if c, ok := b.dedup[key]; ok {
		b.stats.DedupChunks++
		return c, nil
	}
	if d, ok := b.dict[key]; ok {
		cc := *d.chunk
		cc.BlobIndex = b.addBlob(d.blob)
		b.dedup[key] = &cc
		b.stats.DedupChunks++
		return &cc, nil
	}
	add := b.bw.add
	if b.z != nil {
		add = b.z.add
	}
	c, err := add(data, dg)
	if err != nil {
		return nil, err
	}
	c.BlobIndex = newBlobIndex
	b.dedup[key] = c
	b.stats.StoredChunks++
	b.stats.StoredBytes += uint64(len(data))
	return c, nil
}

// readChunks cuts r (size bytes) into chunks.
func (b *Builder) readChunks(ctx context.Context, r io.Reader, size int64, buf []byte) ([]rafs.FileChunk, error) {
	var out []rafs.FileChunk
	b.stats.Files++
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(int64(len(buf)), size-off)
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("read at %d of %d: %w", off, size, err)
		}
		c, err := b.chunk(buf[:n])
		if err != nil {
			return nil, err
		}
		out = append(out, rafs.FileChunk{FileOffset: uint64(off), Chunk: c})
		off += n
		b.stats.Bytes += uint64(n)
	}
	return out, nil
}

// abort stops the blob pipeline after a failed layer read: the build
// cannot be finished, and its goroutines must not outlive it.
func (b *Builder) abort(err error) error {
	b.closed = true
	_ = b.bw.wait()
	return err
}

// addLayer puts a freshly read layer tree in place.
func (b *Builder) addLayer(layer *node) error {
	if b.added {
		return errors.New("builder: a build takes one layer; merge several with Merge")
	}
	b.added = true
	if b.base {
		applyLayer(b.root, layer, b.opts.Whiteouts)
	} else {
		b.root = layer
	}
	return nil
}

// Stats reports what the build has done so far.
func (b *Builder) Stats() Stats { return b.stats }

// Result is a finished build.
type Result struct {
	Image *rafs.Image
	// Blob is the new data blob, nil if every chunk was deduplicated or
	// the layer has no file data (then nothing was written to the blob
	// writer and the caller should discard it).
	Blob *rafs.Blob
}

// Finish completes the blob (appending its blob meta for v6) and returns
// the validated image.
func (b *Builder) Finish() (*Result, error) {
	if b.closed {
		return nil, errors.New("builder: already finished or failed")
	}
	b.closed = true
	var newBlob *rafs.Blob
	if b.stats.StoredChunks > 0 {
		finish := b.bw.finish
		if b.z != nil {
			finish = func(int, uint32) (*rafs.Blob, error) { return b.z.finish(b.bw.w, *b.opts.Digester, b.opts.ChunkSize) }
		}
		bl, err := finish(b.opts.Version, b.opts.ChunkSize)
		if err != nil {
			return nil, err
		}
		if k, dup := b.byID[bl.ID]; dup {
			// Same bytes as a blob already referenced: cannot happen for a
			// blob with new chunks unless a parent holds the same blob.
			return nil, fmt.Errorf("builder: new blob %s is already blob %d of the image", bl.ID, k)
		}
		newBlob = bl
		idx := b.addBlob(bl)
		for _, c := range b.dedup {
			if c.BlobIndex == newBlobIndex {
				c.BlobIndex = idx
			}
		}
	}
	img, err := b.image()
	if err != nil {
		return nil, err
	}
	return &Result{Image: img, Blob: newBlob}, nil
}

func (b *Builder) image() (*rafs.Image, error) {
	inodes, ino := toInodes(b.root)
	img := &rafs.Image{
		Version:    b.opts.Version,
		ChunkSize:  b.opts.ChunkSize,
		Compressor: *b.opts.Compressor,
		Digester:   *b.opts.Digester,
		Blobs:      b.blobs,
		Inodes:     inodes,
	}
	for _, p := range b.opts.Prefetch {
		n := lookupPath(b.root, p)
		if n == nil {
			// nydus-image skips prefetch paths that are not in the image.
			continue
		}
		img.Prefetch = append(img.Prefetch, ino[n])
	}
	if err := img.Validate(); err != nil {
		return nil, fmt.Errorf("builder: built an invalid image: %w", err)
	}
	return img, nil
}

// Merge lays layer images (lowest first) over each other with overlay
// semantics (nydus-image merge): whiteouts and opaque directories of each
// layer hide what is below, the blob table is the union of the layers'
// (each blob once), and chunks keep pointing into their own layer's blob.
// The result takes its version, chunk size and algorithms from the top
// layer unless version is non-zero.
func Merge(layers []*rafs.Image, version int) (*rafs.Image, error) {
	if len(layers) == 0 {
		return nil, errors.New("merge: no layers")
	}
	top := layers[len(layers)-1]
	if version == 0 {
		version = top.Version
	}
	c, d := top.Compressor, top.Digester
	b, err := New(Options{Version: version, ChunkSize: top.ChunkSize, Compressor: &c, Digester: &d}, io.Discard)
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	for k, l := range layers {
		if l.ChunkSize != top.ChunkSize {
			return nil, fmt.Errorf("merge: layer %d chunk size %#x differs from %#x", k, l.ChunkSize, top.ChunkSize)
		}
		root, err := b.importImage(l)
		if err != nil {
			return nil, fmt.Errorf("merge: layer %d: %w", k, err)
		}
		if k == 0 {
			stripWhiteouts(root, WhiteoutOCI)
			b.root = root
			continue
		}
		applyLayer(b.root, root, WhiteoutOCI)
	}
	b.closed = true
	img, err := b.image()
	if err != nil {
		return nil, fmt.Errorf("merge: %w", err)
	}
	return img, nil
}

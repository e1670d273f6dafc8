package rafs

import (
	"context"
	"fmt"
	"io"
	"sort"

	"github.com/rafsd/rafsd/rafs/codec"
)

// ChunkReader supplies the uncompressed, digest-checked bytes of chunks.
// The shared chunk fetcher (rafs/storage) is the ChunkReader of every
// serving mode; BlobChunkReader is the plain one for tools and tests.
type ChunkReader interface {
	// ReadChunkAt fills p with the chunk's uncompressed bytes starting at
	// off (off+len(p) <= c.UncompressedSize). It never returns bytes that
	// failed their digest check.
	ReadChunkAt(ctx context.Context, b *Blob, c *Chunk, p []byte, off uint32) error
}

// Span is the part of a file read served by one chunk (Chunk != nil) or
// by a hole (Chunk == nil, zeros).
type Span struct {
	FileOffset  uint64
	Len         uint32
	Chunk       *Chunk
	ChunkOffset uint32 // offset within the chunk's uncompressed bytes
}

// Spans maps [off, off+n) of regular file i, clipped to its size, to the
// chunks and holes that cover it, in file order.
func (i *Inode) Spans(off, n uint64) []Span {
	if off >= i.Size || n == 0 {
		return nil
	}
	end := off + n
	if end > i.Size || end < off {
		end = i.Size
	}
	var out []Span
	// First chunk that ends after off.
	k := sort.Search(len(i.Chunks), func(k int) bool {
		c := i.Chunks[k]
		return c.FileOffset+uint64(c.UncompressedSize) > off
	})
	pos := off
	for ; pos < end; k++ {
		if k >= len(i.Chunks) || i.Chunks[k].FileOffset >= end {
			out = appendHole(out, pos, end)
			break
		}
		c := i.Chunks[k]
		if c.FileOffset > pos {
			out = appendHole(out, pos, c.FileOffset)
			pos = c.FileOffset
		}
		cend := min(c.FileOffset+uint64(c.UncompressedSize), end)
		out = append(out, Span{FileOffset: pos, Len: uint32(cend - pos), Chunk: c.Chunk, ChunkOffset: uint32(pos - c.FileOffset)})
		pos = cend
	}
	return out
}

// appendHole adds hole spans for [from, to), split so each Len fits in 32 bits.
func appendHole(out []Span, from, to uint64) []Span {
	for from < to {
		n := min(to-from, 1<<31)
		out = append(out, Span{FileOffset: from, Len: uint32(n)})
		from += n
	}
	return out
}

// ReadAt reads regular file i at off into p through cr, like io.ReaderAt:
// it returns io.EOF when the read reaches the end of the file.
func (img *Image) ReadAt(ctx context.Context, cr ChunkReader, i *Inode, p []byte, off int64) (int, error) {
	if !i.IsRegular() {
		return 0, ErrNotRegular
	}
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if uint64(off) >= i.Size {
		return 0, io.EOF
	}
	if len(i.Chunks) > 0 {
		ctx = withFileEnd(ctx, img, i)
	}
	var n int
	for _, s := range i.Spans(uint64(off), uint64(len(p))) {
		dst := p[n : n+int(s.Len)]
		if s.Chunk == nil {
			clear(dst)
		} else {
			b, err := img.Blob(s.Chunk)
			if err != nil {
				return n, err
			}
			if err := cr.ReadChunkAt(ctx, b, s.Chunk, dst, s.ChunkOffset); err != nil {
				return n, fmt.Errorf("read inode %d at %d: %w", i.Ino, s.FileOffset, err)
			}
		}
		n += int(s.Len)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// ReadEnd is where the file being read ends in a blob: the compressed end
// of its last chunk. Image.ReadAt puts it in the context it passes to its
// ChunkReader, so that a fetcher reading ahead stops at the file's end
// instead of pulling in the files stored after it.
type ReadEnd struct {
	BlobID string
	End    uint64
}

type readEndKey struct{}

func withFileEnd(ctx context.Context, img *Image, i *Inode) context.Context {
	last := i.Chunks[len(i.Chunks)-1]
	if int(last.BlobIndex) >= len(img.Blobs) {
		return ctx // Validate rejects this; reads of it fail on their own
	}
	return context.WithValue(ctx, readEndKey{}, ReadEnd{img.Blobs[last.BlobIndex].ID, last.CompressedOffset + uint64(last.CompressedSize)})
}

// ReadEndFrom returns the ReadEnd that Image.ReadAt put in ctx.
func ReadEndFrom(ctx context.Context) (ReadEnd, bool) {
	e, ok := ctx.Value(readEndKey{}).(ReadEnd)
	return e, ok
}

// BlobChunkReader reads chunks straight from blob files with no cache: it
// reads the compressed extent, decompresses and verifies it on every call.
// Tools (check, unpack) and tests use it; daemons use rafs/storage.
type BlobChunkReader struct {
	// Open returns the blob's bytes.
	Open func(b *Blob) (io.ReaderAt, error)
}

// ReadChunkAt implements ChunkReader.
func (r BlobChunkReader) ReadChunkAt(ctx context.Context, b *Blob, c *Chunk, p []byte, off uint32) error {
	data, err := r.ReadChunk(b, c)
	if err != nil {
		return err
	}
	if uint64(off)+uint64(len(p)) > uint64(len(data)) {
		return fmt.Errorf("chunk %d of blob %s: read [%d,+%d) past its %d bytes: %w", c.Index, b.ID, off, len(p), len(data), ErrInvalid)
	}
	copy(p, data[off:])
	return nil
}

// ReadChunk returns the whole verified chunk.
func (r BlobChunkReader) ReadChunk(b *Blob, c *Chunk) ([]byte, error) {
	ra, err := r.Open(b)
	if err != nil {
		return nil, fmt.Errorf("open blob %s: %w", b.ID, err)
	}
	return DecodeChunk(b, c, func(p []byte) error {
		_, err := ra.ReadAt(p, int64(c.CompressedOffset))
		if err == io.EOF && len(p) > 0 {
			return fmt.Errorf("chunk %d of blob %s: compressed extent past end of blob: %w", c.Index, b.ID, io.ErrUnexpectedEOF)
		}
		return err
	})
}

// DecodeChunk reads a chunk's stored bytes with read (given a buffer of
// c.CompressedSize bytes), decompresses and verifies them.
func DecodeChunk(b *Blob, c *Chunk, read func(p []byte) error) ([]byte, error) {
	raw := make([]byte, c.CompressedSize)
	if err := read(raw); err != nil {
		return nil, err
	}
	return DecodeChunkBytes(b, c, raw)
}

// DecodeChunkBytes decompresses (if c.Compressed, or inflates from its
// checkpoint if b.Zran is set) and verifies the stored bytes raw of chunk c.
func DecodeChunkBytes(b *Blob, c *Chunk, raw []byte) ([]byte, error) {
	return DecodeChunkInto(b, c, raw, nil)
}

// DecodeChunkInto is DecodeChunkBytes decompressing into dst when dst has
// the chunk's uncompressed size (a pooled buffer of the caller's); else it
// allocates. The result is dst, raw (a chunk stored as it is) or a new
// slice (zran chunks, or dst unusable).
func DecodeChunkInto(b *Blob, c *Chunk, raw, dst []byte) ([]byte, error) {
	data := raw
	if b.IsZran() {
		var err error
		if data, err = decodeZran(b, c, raw); err != nil {
			return nil, err
		}
	} else if c.Compressed {
		data = dst
		if len(data) != int(c.UncompressedSize) {
			data = make([]byte, c.UncompressedSize)
		}
		if err := codec.Decompress(b.Compressor, data, raw); err != nil {
			return nil, fmt.Errorf("chunk %d of blob %s: %w", c.Index, b.ID, err)
		}
	} else if len(raw) != int(c.UncompressedSize) {
		return nil, fmt.Errorf("chunk %d of blob %s: raw chunk of %d bytes, want %d: %w", c.Index, b.ID, len(raw), c.UncompressedSize, ErrInvalid)
	}
	if err := b.Digester.Verify(data, c.Digest); err != nil {
		return nil, fmt.Errorf("chunk %d of blob %s: %w", c.Index, b.ID, err)
	}
	return data, nil
}

// Walk calls fn for every path of the image in depth-first, name order,
// starting with "/" for the root. Hardlinked inodes are visited once per
// name. Returning an error stops the walk.
func (img *Image) Walk(fn func(path string, i *Inode) error) error {
	var walk func(p string, i *Inode) error
	walk = func(p string, i *Inode) error {
		if err := fn(p, i); err != nil {
			return err
		}
		if !i.IsDir() {
			return nil
		}
		prefix := p
		if prefix != "/" {
			prefix += "/"
		}
		for _, e := range i.Entries {
			c, err := img.Inode(e.Ino)
			if err != nil {
				return err
			}
			if err := walk(prefix+e.Name, c); err != nil {
				return err
			}
		}
		return nil
	}
	return walk("/", img.Root())
}

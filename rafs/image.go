// Package rafs is the Nydus image model: a bootstrap (a tree of inodes whose
// regular files are lists of chunks) plus the data blobs those chunks live
// in. The v5 and v6 on-disk formats (packages rafs/v5 and rafs/v6) decode
// into and encode from this model; the builder produces it; every serving
// mode reads files through it.
//
// An Image is immutable once built or decoded and safe for concurrent use.
package rafs

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/rafsd/rafsd/rafs/codec"
)

// RootIno is the inode number of the image's root directory.
const RootIno = 1

// Default and allowed chunk sizes (powers of two).
const (
	DefaultChunkSize = 1 << 20
	MinChunkSize     = 4 << 10
	MaxChunkSize     = 16 << 20
)

// ValidChunkSize reports whether n is a power of two in [MinChunkSize, MaxChunkSize].
func ValidChunkSize(n uint32) bool {
	return n >= MinChunkSize && n <= MaxChunkSize && n&(n-1) == 0
}

// Image is a decoded bootstrap.
type Image struct {
	// Version is the on-disk format the image came from or will be written
	// as: 5 or 6.
	Version int
	// ChunkSize is the image-wide chunk size.
	ChunkSize uint32
	// Compressor and Digester are the image defaults; each blob records its own.
	Compressor codec.Compressor
	Digester   codec.Digester
	// Blobs is the blob table; Chunk.BlobIndex indexes it.
	Blobs []*Blob
	// Inodes holds every inode; inode number i lives at Inodes[i-1], so
	// numbers are dense, start at RootIno and are stable for a given bootstrap.
	Inodes []*Inode
	// Prefetch lists inode numbers to fetch in the background after mount
	// (the bootstrap's prefetch table), in order.
	Prefetch []uint64
}

// Blob is one data blob: the compressed chunks of one layer (or several
// deduplicated layers), named by the sha256 of its bytes.
type Blob struct {
	// ID is the hex sha256 of the blob (its OCI digest without "sha256:").
	ID         string
	Compressor codec.Compressor
	Digester   codec.Digester
	ChunkSize  uint32
	ChunkCount uint32
	// CompressedSize is the size of the blob file; UncompressedSize the sum
	// of its chunks' uncompressed extents (the size of its cache file).
	CompressedSize   uint64
	UncompressedSize uint64
	// Features holds nydus's blob feature bits (BLOB_FEATURE_*) as found
	// on disk, so that rewriting an image keeps them.
	Features uint32
	// Meta locates the blob's chunk-information table (nydus "blob meta",
	// ci_*), when the blob carries one.
	Meta BlobMeta
	// Zran, if set, makes the blob an original gzip layer whose chunks are
	// inflated from checkpoints (see Zran). Such chunks are not codec
	// output: code that decompresses chunks itself must hand them to
	// DecodeChunkBytes.
	Zran *Zran
}

// BlobMeta is the location of a blob's compression-information table.
type BlobMeta struct {
	Compressor       codec.Compressor
	Offset           uint64
	CompressedSize   uint64
	UncompressedSize uint64
	// TOC (table of contents) fields of newer nydus blobs.
	TOCSize   uint32
	TOCDigest codec.Digest
	Digest    codec.Digest
	Size      uint64
}

// Chunk is one piece of file data as stored in a blob. Identical chunks
// are stored once and shared by every file (and image) that has them.
type Chunk struct {
	// Digest is of the uncompressed bytes, with the blob's digester.
	Digest    codec.Digest
	BlobIndex uint32
	// Index is the chunk's number within its blob.
	Index              uint32
	CompressedOffset   uint64
	CompressedSize     uint32
	UncompressedOffset uint64
	UncompressedSize   uint32
	// Compressed is false for chunks stored raw (incompressible data or a
	// None compressor).
	Compressed bool
}

// FileChunk places a chunk at an offset of a regular file. A file's chunks
// are sorted by FileOffset and do not overlap; gaps are holes (zeros).
type FileChunk struct {
	FileOffset uint64
	*Chunk
}

// Inode is a file, directory, symlink or special file of the image.
type Inode struct {
	Ino       uint64
	Parent    uint64 // inode number of the directory it was first found in; root's parent is itself
	Mode      uint32 // file type and permission bits as in stat(2)
	UID, GID  uint32
	Size      uint64
	Mtime     int64
	MtimeNsec uint32
	Rdev      uint64
	Nlink     uint32
	// Target is a symlink's target.
	Target string
	// Xattrs are the extended attributes, in on-disk order.
	Xattrs []Xattr
	// Entries are a directory's children sorted by name (byte order),
	// without "." and "..".
	Entries []Dirent
	// Chunks are a regular file's data.
	Chunks []FileChunk
}

// Dirent is a name in a directory.
type Dirent struct {
	Name string
	Ino  uint64
}

// Xattr is an extended attribute.
type Xattr struct {
	Name  string
	Value []byte
}

// File-type predicates on Mode.
func (i *Inode) IsDir() bool     { return i.Mode&syscall.S_IFMT == syscall.S_IFDIR }
func (i *Inode) IsRegular() bool { return i.Mode&syscall.S_IFMT == syscall.S_IFREG }
func (i *Inode) IsSymlink() bool { return i.Mode&syscall.S_IFMT == syscall.S_IFLNK }

// Errors of the read API. They map to errno values with Errno.
var (
	ErrNotExist   = errors.New("no such file or directory")
	ErrNotDir     = errors.New("not a directory")
	ErrNoXattr    = errors.New("no such attribute")
	ErrInvalid    = errors.New("invalid image")
	ErrNotRegular = errors.New("not a regular file")
)

// Errno maps an error of this package (or of a ChunkReader) to the errno
// a filesystem should answer with. Unknown errors are EIO.
func Errno(err error) syscall.Errno {
	var en syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrNotExist):
		return syscall.ENOENT
	case errors.Is(err, ErrNotDir):
		return syscall.ENOTDIR
	case errors.Is(err, ErrNoXattr):
		return syscall.ENODATA
	case errors.Is(err, ErrNotRegular):
		return syscall.EISDIR
	case errors.As(err, &en):
		return en
	}
	return syscall.EIO
}

// Inode returns inode number ino.
func (img *Image) Inode(ino uint64) (*Inode, error) {
	if ino == 0 || ino > uint64(len(img.Inodes)) {
		return nil, fmt.Errorf("inode %d: %w", ino, ErrNotExist)
	}
	return img.Inodes[ino-1], nil
}

// Root returns the root directory.
func (img *Image) Root() *Inode { return img.Inodes[RootIno-1] }

// Lookup finds name in directory dir.
func (img *Image) Lookup(dir *Inode, name string) (*Inode, error) {
	if !dir.IsDir() {
		return nil, ErrNotDir
	}
	lo, hi := 0, len(dir.Entries)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if dir.Entries[m].Name < name {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo < len(dir.Entries) && dir.Entries[lo].Name == name {
		return img.Inode(dir.Entries[lo].Ino)
	}
	return nil, fmt.Errorf("%q: %w", name, ErrNotExist)
}

// Getxattr returns the value of attribute name of i.
func (i *Inode) Getxattr(name string) ([]byte, error) {
	for _, x := range i.Xattrs {
		if x.Name == name {
			return x.Value, nil
		}
	}
	return nil, ErrNoXattr
}

// HasXattrs reports whether any inode of the image has an xattr; a
// filesystem can then answer "no xattrs" once instead of per file.
func (img *Image) HasXattrs() bool {
	for _, i := range img.Inodes {
		if len(i.Xattrs) > 0 {
			return true
		}
	}
	return false
}

// Blob returns the blob a chunk lives in.
func (img *Image) Blob(c *Chunk) (*Blob, error) {
	if int(c.BlobIndex) >= len(img.Blobs) {
		return nil, fmt.Errorf("chunk %d: blob index %d out of range: %w", c.Index, c.BlobIndex, ErrInvalid)
	}
	return img.Blobs[c.BlobIndex], nil
}

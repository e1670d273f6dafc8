package rafs

import (
	"fmt"
	"strings"
	"syscall"
)

// MaxFileSize bounds a file's declared size (nydus's uncompressed blob
// limit, 2^44): larger values only come from corrupt or hostile images.
const MaxFileSize = 1 << 44

// Validate checks the structural invariants every consumer relies on, so a
// decoder can hand a hostile bootstrap to it and get an error instead of a
// filesystem that loops, escapes or reads past a blob:
//   - inode numbers are dense (Inodes[i].Ino == i+1) and the root is a directory;
//   - every directory is reachable exactly once from the root (no loops, no
//     directory hardlinks) and non-directories only from directories;
//   - names are non-empty, at most 255 bytes, contain no '/' or NUL, are not
//     "." or "..", and are sorted and unique within a directory;
//   - chunks are sorted, non-overlapping, inside the file's size, sized at
//     most the chunk size, reference an existing blob and lie inside it.
func (img *Image) Validate() error {
	if img.Version != 5 && img.Version != 6 {
		return fmt.Errorf("%w: version %d", ErrInvalid, img.Version)
	}
	if !ValidChunkSize(img.ChunkSize) {
		return fmt.Errorf("%w: chunk size %#x", ErrInvalid, img.ChunkSize)
	}
	if len(img.Inodes) == 0 {
		return fmt.Errorf("%w: no root inode", ErrInvalid)
	}
	for k, i := range img.Inodes {
		if i == nil || i.Ino != uint64(k+1) {
			return fmt.Errorf("%w: inode slot %d does not hold inode %d", ErrInvalid, k, k+1)
		}
	}
	if !img.Root().IsDir() {
		return fmt.Errorf("%w: root is not a directory", ErrInvalid)
	}
	for _, b := range img.Blobs {
		if err := validateBlob(b); err != nil {
			return err
		}
	}
	seenDir := make([]bool, len(img.Inodes))
	seenDir[RootIno-1] = true
	stack := []*Inode{img.Root()}
	for len(stack) > 0 {
		d := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		for k, e := range d.Entries {
			if err := validName(e.Name); err != nil {
				return fmt.Errorf("%w: directory inode %d: %v", ErrInvalid, d.Ino, err)
			}
			if k > 0 && d.Entries[k-1].Name >= e.Name {
				return fmt.Errorf("%w: directory inode %d: entries not sorted or duplicated at %q", ErrInvalid, d.Ino, e.Name)
			}
			c, err := img.Inode(e.Ino)
			if err != nil {
				return fmt.Errorf("%w: directory inode %d entry %q: %v", ErrInvalid, d.Ino, e.Name, err)
			}
			if c.IsDir() {
				if seenDir[c.Ino-1] {
					return fmt.Errorf("%w: directory inode %d reached twice (loop or directory hardlink) via %q", ErrInvalid, c.Ino, e.Name)
				}
				seenDir[c.Ino-1] = true
				stack = append(stack, c)
			}
		}
	}
	for _, i := range img.Inodes {
		if err := img.validateInode(i); err != nil {
			return err
		}
	}
	for _, ino := range img.Prefetch {
		if _, err := img.Inode(ino); err != nil {
			return fmt.Errorf("%w: prefetch list: %v", ErrInvalid, err)
		}
	}
	return nil
}

func validateBlob(b *Blob) error {
	if b == nil {
		return fmt.Errorf("%w: nil blob", ErrInvalid)
	}
	if !b.Compressor.Valid() || !b.Digester.Valid() {
		return fmt.Errorf("%w: blob %s: %s/%s", ErrInvalid, b.ID, b.Compressor, b.Digester)
	}
	if b.ID == "" || strings.ContainsAny(b.ID, "/\x00") || b.ID == "." || b.ID == ".." {
		return fmt.Errorf("%w: blob id %q", ErrInvalid, b.ID)
	}
	return nil
}

func validName(n string) error {
	switch {
	case n == "" || n == "." || n == "..":
		return fmt.Errorf("bad name %q", n)
	case len(n) > 255:
		return fmt.Errorf("name longer than 255 bytes: %.40q...", n)
	case strings.ContainsAny(n, "/\x00"):
		return fmt.Errorf("name %q contains '/' or NUL", n)
	}
	return nil
}

func (img *Image) validateInode(i *Inode) error {
	if i.Size > MaxFileSize {
		return fmt.Errorf("%w: inode %d: size %d", ErrInvalid, i.Ino, i.Size)
	}
	switch i.Mode & syscall.S_IFMT {
	case syscall.S_IFREG, syscall.S_IFDIR, syscall.S_IFLNK, syscall.S_IFCHR, syscall.S_IFBLK, syscall.S_IFIFO, syscall.S_IFSOCK:
	default:
		return fmt.Errorf("%w: inode %d: mode %#o has no file type", ErrInvalid, i.Ino, i.Mode)
	}
	if i.Parent == 0 || i.Parent > uint64(len(img.Inodes)) {
		return fmt.Errorf("%w: inode %d: parent %d", ErrInvalid, i.Ino, i.Parent)
	}
	if !i.IsDir() && len(i.Entries) > 0 {
		return fmt.Errorf("%w: inode %d is not a directory but has entries", ErrInvalid, i.Ino)
	}
	if !i.IsRegular() && len(i.Chunks) > 0 {
		return fmt.Errorf("%w: inode %d is not a regular file but has chunks", ErrInvalid, i.Ino)
	}
	var end uint64
	for k, c := range i.Chunks {
		if c.Chunk == nil {
			return fmt.Errorf("%w: inode %d chunk %d missing", ErrInvalid, i.Ino, k)
		}
		if c.FileOffset < end {
			return fmt.Errorf("%w: inode %d: chunk %d overlaps or is out of order", ErrInvalid, i.Ino, k)
		}
		if c.UncompressedSize == 0 || c.UncompressedSize > img.ChunkSize || c.UncompressedSize > MaxChunkSize {
			return fmt.Errorf("%w: inode %d: chunk %d uncompressed size %d", ErrInvalid, i.Ino, k, c.UncompressedSize)
		}
		end = c.FileOffset + uint64(c.UncompressedSize)
		if end > i.Size {
			return fmt.Errorf("%w: inode %d: chunk %d ends at %d past file size %d", ErrInvalid, i.Ino, k, end, i.Size)
		}
		b, err := img.Blob(c.Chunk)
		if err != nil {
			return fmt.Errorf("inode %d: %w", i.Ino, err)
		}
		if c.CompressedSize > 2*MaxChunkSize {
			return fmt.Errorf("%w: inode %d: chunk %d compressed size %d", ErrInvalid, i.Ino, k, c.CompressedSize)
		}
		if b.CompressedSize != 0 && c.CompressedOffset+uint64(c.CompressedSize) > b.CompressedSize {
			return fmt.Errorf("%w: inode %d: chunk %d [%d,+%d) past end of blob %s (%d bytes)", ErrInvalid, i.Ino, k, c.CompressedOffset, c.CompressedSize, b.ID, b.CompressedSize)
		}
		if b.UncompressedSize != 0 && c.UncompressedOffset+uint64(c.UncompressedSize) > b.UncompressedSize {
			return fmt.Errorf("%w: inode %d: chunk %d uncompressed [%d,+%d) past blob %s's %d bytes", ErrInvalid, i.Ino, k, c.UncompressedOffset, c.UncompressedSize, b.ID, b.UncompressedSize)
		}
		if !c.Compressed && c.CompressedSize != c.UncompressedSize {
			return fmt.Errorf("%w: inode %d: raw chunk %d stored in %d bytes for %d", ErrInvalid, i.Ino, k, c.CompressedSize, c.UncompressedSize)
		}
	}
	return nil
}

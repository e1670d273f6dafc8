package rafs

import "sort"

// BlobLayout is one blob's chunks in uncompressed-offset order. The kernel
// modes (fscache, fanotify) address a blob's uncompressed bytes rather than
// files, and need the chunks covering a range of them.
type BlobLayout struct {
	Blob   *Blob
	Chunks []*Chunk // sorted by UncompressedOffset, one per distinct offset
}

// BlobLayouts returns the layout of every blob of the image, indexed like
// img.Blobs.
func (img *Image) BlobLayouts() []BlobLayout {
	out := make([]BlobLayout, len(img.Blobs))
	seen := make([]map[uint64]bool, len(img.Blobs))
	for k, b := range img.Blobs {
		out[k].Blob = b
		seen[k] = make(map[uint64]bool)
	}
	for _, i := range img.Inodes {
		for _, fc := range i.Chunks {
			k := fc.BlobIndex
			if int(k) >= len(out) || seen[k][fc.UncompressedOffset] {
				continue
			}
			seen[k][fc.UncompressedOffset] = true
			out[k].Chunks = append(out[k].Chunks, fc.Chunk)
		}
	}
	for k := range out {
		c := out[k].Chunks
		sort.Slice(c, func(a, b int) bool { return c[a].UncompressedOffset < c[b].UncompressedOffset })
	}
	return out
}

// Range returns the chunks that overlap [off, off+n) of the blob's
// uncompressed bytes.
func (l *BlobLayout) Range(off, n uint64) []*Chunk {
	end := off + n
	if end < off {
		end = ^uint64(0)
	}
	lo := sort.Search(len(l.Chunks), func(k int) bool {
		c := l.Chunks[k]
		return c.UncompressedOffset+uint64(c.UncompressedSize) > off
	})
	hi := lo
	for hi < len(l.Chunks) && l.Chunks[hi].UncompressedOffset < end {
		hi++
	}
	return l.Chunks[lo:hi]
}

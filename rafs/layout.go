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

// Extent is a run [Lo, Hi) of a blob's uncompressed bytes.
type Extent struct{ Lo, Hi uint64 }

// extentAlign is how far apart two chunks of one file may lie and still
// be one extent: RAFS v6 places chunks at 4 KiB boundaries, so a file's
// next chunk starts where the last ended or at the next boundary.
const extentAlign = 4096

// FileExtents returns the extents in which the regular files of img store
// their data in blob b, sorted by start (the longest first among equal
// starts). A file's chunks, in file order, form one extent while each
// starts where the last ended or at the next 4 KiB boundary; a chunk the
// file shares with one stored earlier (deduplicated) neither breaks nor
// extends it. The kernel modes' read-ahead stops at the end of the extent
// it reads in, so that reading part of an image fetches little more.
func (img *Image) FileExtents(b *Blob) []Extent {
	var out []Extent
	for _, ino := range img.Inodes {
		if ino == nil {
			continue
		}
		var cur Extent
		open := false
		for _, fc := range ino.Chunks {
			if fc.Chunk == nil {
				continue
			}
			if cb, err := img.Blob(fc.Chunk); err != nil || cb.ID != b.ID {
				continue
			}
			lo, hi := fc.UncompressedOffset, fc.UncompressedOffset+uint64(fc.UncompressedSize)
			switch {
			case open && lo >= cur.Hi && lo <= (cur.Hi+extentAlign-1)&^(extentAlign-1):
				cur.Hi = hi
				continue
			case open && lo < cur.Hi:
				continue // stored earlier: the file's own data goes on after it
			}
			if open {
				out = append(out, cur)
			}
			cur, open = Extent{lo, hi}, true
		}
		if open {
			out = append(out, cur)
		}
	}
	SortExtents(out)
	return out
}

// SortExtents sorts es as FileExtents returns them.
func SortExtents(es []Extent) {
	sort.Slice(es, func(a, b int) bool {
		if es[a].Lo != es[b].Lo {
			return es[a].Lo < es[b].Lo
		}
		return es[a].Hi > es[b].Hi
	})
}

// ExtentAt returns the extent of es (sorted as FileExtents returns them)
// that holds offset off and reaches furthest, if any. Extents of
// different files overlap only where chunks are deduplicated, so looking
// a few back from the last one starting at or before off is enough.
func ExtentAt(es []Extent, off uint64) (Extent, bool) {
	var best Extent
	found := false
	k := sort.Search(len(es), func(i int) bool { return es[i].Lo > off }) - 1
	for n := 0; k >= 0 && n < 8; k, n = k-1, n+1 {
		if off < es[k].Hi && (!found || es[k].Hi > best.Hi) {
			best, found = es[k], true
		}
	}
	return best, found
}

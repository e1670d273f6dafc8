package cachefiles

import (
	"context"
	"sort"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
)

// prefetchChunks returns the chunks of blob l to prefetch for im: every
// chunk with prefetch_all, else those of the bootstrap's prefetch list
// (files, and directories recursively), in blob order.
func prefetchChunks(im *image, l rafs.BlobLayout) []*rafs.Chunk {
	if !im.prefetch.Enable {
		return nil
	}
	if im.prefetch.PrefetchAll {
		return l.Chunks
	}
	seen := map[uint64]bool{}
	var out []*rafs.Chunk
	var visit func(ino uint64, depth int)
	visit = func(ino uint64, depth int) {
		i, err := im.img.Inode(ino)
		if err != nil || seen[ino] || depth > 4096 {
			return
		}
		seen[ino] = true
		for _, e := range i.Entries {
			visit(e.Ino, depth+1)
		}
		for _, fc := range i.Chunks {
			if b, err := im.img.Blob(fc.Chunk); err == nil && b.ID == l.Blob.ID {
				out = append(out, fc.Chunk)
			}
		}
	}
	for _, ino := range im.img.Prefetch {
		visit(ino, 0)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].UncompressedOffset < out[b].UncompressedOffset })
	// One chunk per offset (hardlinks and dedup repeat them).
	uniq := out[:0]
	for k, c := range out {
		if k == 0 || c.UncompressedOffset != out[k-1].UncompressedOffset {
			uniq = append(uniq, c)
		}
	}
	return uniq
}

// present reports whether [off, end) of the object's cache file already
// holds data, asking the cache file itself (the anon fd seeks it).
func present(fd int, off, end uint64) bool {
	d, err := unix.Seek(fd, int64(off), unix.SEEK_DATA)
	if err != nil || uint64(d) != off {
		return false
	}
	h, err := unix.Seek(fd, int64(off), unix.SEEK_HOLE)
	return err == nil && uint64(h) >= end
}

// prefetch fills chunks into o's cache file in the background with the
// image's prefetch thread count, skipping what is already there. It holds
// a reference on o (so CLOSE waits for it) and stops when o's context
// ends (CLOSE, Close, Detach).
func (d *Daemon) prefetch(ctx context.Context, o *object, chunks []*rafs.Chunk) {
	defer d.unref(o)
	threads := max(1, min(o.im.prefetch.ThreadsCount, 16))
	// Runs of chunks sharing pages are the unit of work, as for READs.
	runs := splitRuns(chunks)
	next := make(chan []*rafs.Chunk)
	var wg sync.WaitGroup
	for range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for run := range next {
				start := roundDown(run[0].UncompressedOffset)
				if present(o.fd, start, min(roundUp(chunkEnd(run[len(run)-1])), roundUp(o.size))) {
					continue
				}
				if err := d.writeRun(ctx, o, run); err != nil {
					if ctx.Err() == nil {
						d.log.Warn("cachefiles: prefetch failed", "blob", o.cookie, "off", start, "err", err)
					}
					continue
				}
				d.prefetched.Add(1)
			}
		}()
	}
	for _, r := range runs {
		select {
		case next <- r:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(next)
	wg.Wait()
}

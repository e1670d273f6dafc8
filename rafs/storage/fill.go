package storage

import (
	"context"
	"fmt"
	"syscall"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
)

// CachePath returns the path of blob b's uncompressed cache data file
// (uncompressed chunks at their uncompressed offsets), the file the kernel
// modes hand to EROFS as the blob's device. It opens the cache file if it
// is not open yet. It fails if the fetcher has no cache, caches compressed
// chunks, or the blob cannot be cached (no chunk geometry).
func (f *Fetcher) CachePath(b *rafs.Blob) (string, error) {
	cb, err := f.cacheOf(b)
	if err != nil {
		return "", err
	}
	return cb.DataPath(), nil
}

func (f *Fetcher) cacheOf(b *rafs.Blob) (*blobcache.Blob, error) {
	bs, err := f.state(b)
	if err != nil {
		return nil, err
	}
	switch {
	case f.store == nil:
		return nil, fmt.Errorf("storage: blob %s: no blob cache configured (cache type blobcache, filecache or fscache needed)", b.ID)
	case f.compressed:
		return nil, fmt.Errorf("storage: blob %s: the cache holds compressed chunks; the kernel modes need cache.compressed false", b.ID)
	case bs.cache == nil:
		return nil, fmt.Errorf("storage: blob %s cannot be cached (no chunk count or size in the bootstrap)", b.ID)
	}
	return bs.cache, nil
}

// Cached reports whether chunk c of blob b has its verified bytes in the
// cache data file. It is an in-memory bit test.
func (f *Fetcher) Cached(b *rafs.Blob, c *rafs.Chunk) bool {
	bs, err := f.state(b)
	if err != nil {
		return false
	}
	return bs.cached(c, f.compressed)
}

// EnsureChunks makes every chunk of chunks (all of blob b) present in the
// cache data file: missing ones are fetched, verified and written, each
// contiguous run of them with one streamed backend request. It returns nil
// only once each chunk's verified bytes are in the file and marked in the
// chunk map, so a caller may then let the kernel read the file. Failures
// wrap syscall.EIO.
//
// It reads nothing beyond the chunks asked for: the kernel modes have
// read-ahead of their own. ctx bounds only the wait for fetches that other
// callers started; the fetches it starts itself it waits out (they end
// with the backend's answer or timeout), so a caller that gave up on ctx
// can tell that its fill is still running.
func (f *Fetcher) EnsureChunks(ctx context.Context, b *rafs.Blob, chunks []*rafs.Chunk) error {
	if _, err := f.cacheOf(b); err != nil {
		return fmt.Errorf("%w: %w", syscall.EIO, err)
	}
	bs, _ := f.state(b)
	cs := make([]*rafs.Chunk, 0, len(chunks))
	for _, c := range chunks {
		if !bs.cacheable(c, f.compressed) {
			return fmt.Errorf("storage: chunk %d of blob %s lies outside the blob's cache geometry: %w", c.Index, b.ID, syscall.EIO)
		}
		if !bs.cache.Has(c.Index) {
			cs = append(cs, c)
		}
	}
	if len(cs) == 0 {
		return nil
	}
	f.demand.Add(1)
	defer f.demand.Add(-1)
	sortByCompressed(cs)
	type waiter struct {
		st   *stream
		cl   *call
		mine bool // in a stream this call started
	}
	var waits []waiter
	var launch []*stream
	bs.mu.Lock()
	for i := 0; i < len(cs); {
		c := cs[i]
		if i > 0 && c.CompressedOffset == cs[i-1].CompressedOffset {
			i++ // the same stored chunk twice
			continue
		}
		f.stats.total.Add(1)
		f.m.cacheMisses.Inc()
		if cl, ok := bs.flying(c.CompressedOffset); ok {
			st, split := f.join(cl)
			if split != nil {
				launch = append(launch, split)
			}
			waits = append(waits, waiter{st, cl, false})
			i++
			continue
		}
		if bs.cached(c, f.compressed) {
			i++
			continue
		}
		// The run of asked-for chunks stored contiguously from c (for
		// a zran blob, with overlapping extents: see zran.go).
		run := []*rafs.Chunk{c}
		end := chunkEnd(c)
		for i++; i < len(cs); i++ {
			n := cs[i]
			if n.CompressedOffset == run[len(run)-1].CompressedOffset {
				continue // duplicate of the last one
			}
			if !bs.follows(end, n) || bs.cached(n, f.compressed) {
				break
			}
			if _, busy := bs.inflight[n.CompressedOffset]; busy {
				break
			}
			f.stats.total.Add(1)
			f.m.cacheMisses.Inc()
			run = append(run, n)
			end = max(end, chunkEnd(n))
		}
		st := f.newStream(bs, run, false)
		for _, cl := range st.items {
			st.waiters.Add(1)
			cl.refs.Add(1)
			waits = append(waits, waiter{st, cl, true})
		}
		launch = append(launch, st)
	}
	bs.mu.Unlock()
	for _, st := range launch {
		f.launch(st)
	}
	var first error
	for _, w := range waits {
		wctx := ctx
		if w.mine {
			wctx = context.WithoutCancel(ctx)
		}
		err := wait(wctx, bs, w.st, w.cl, nil, 0)
		if err == nil {
			// The kernel reads the file: wait for the write too.
			select {
			case <-w.cl.written:
			case <-wctx.Done():
				err = fmt.Errorf("storage: chunk %d of blob %s: %w", w.cl.c.Index, b.ID, wctx.Err())
			}
		}
		if err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	for _, c := range cs {
		// A fetch hands out verified bytes even when caching them failed;
		// the kernel reads the file, so only a set bit will do.
		if !bs.cache.Has(c.Index) {
			return fmt.Errorf("storage: chunk %d of blob %s was fetched but could not be cached: %w", c.Index, b.ID, syscall.EIO)
		}
	}
	return nil
}

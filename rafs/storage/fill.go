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
// cache data file: missing ones are fetched, verified and written, merged
// into as few backend requests as the batch size allows. It returns nil
// only once each chunk's verified bytes are durable in the file and marked
// in the chunk map, so a caller may then let the kernel read the file.
// Failures wrap syscall.EIO.
func (f *Fetcher) EnsureChunks(ctx context.Context, b *rafs.Blob, chunks []*rafs.Chunk) error {
	if _, err := f.cacheOf(b); err != nil {
		return fmt.Errorf("%w: %w", syscall.EIO, err)
	}
	bs, _ := f.state(b)
	// The batch covers the whole range asked for, so a kernel request of
	// N chunks costs one backend request rather than N/batch.
	batch := f.readBatch
	var need uint64
	for _, c := range chunks {
		need += uint64(c.CompressedSize)
	}
	if need > uint64(batch) {
		batch = int(min(need, 1<<30))
	}
	f.demand.Add(1)
	defer f.demand.Add(-1)
	for _, c := range chunks {
		if !bs.cacheable(c, f.compressed) {
			return fmt.Errorf("storage: chunk %d of blob %s lies outside the blob's cache geometry: %w", c.Index, b.ID, syscall.EIO)
		}
		if bs.cache.Has(c.Index) {
			continue
		}
		f.stats.total.Add(1)
		f.m.cacheMisses.Inc()
		if _, err := f.fetch(ctx, bs, c, batch, false); err != nil {
			return err
		}
		// fetch hands out verified bytes even when caching them failed;
		// the kernel reads the file, so only a set bit will do.
		if !bs.cache.Has(c.Index) {
			return fmt.Errorf("storage: chunk %d of blob %s was fetched but could not be cached: %w", c.Index, b.ID, syscall.EIO)
		}
	}
	return nil
}

// Package storage is the shared chunk fetcher: the rafs.ChunkReader every
// serving mode (FUSE, virtio-fs, fscache, fanotify) reads file data
// through. It serves chunks from the on-disk blob cache (rafs/storage/
// blobcache) or fetches them from the backend (rafs/storage/backend),
// decompresses them and checks their digest before anyone sees a byte.
//
// Use by the daemon, per mount:
//
//	cfg, _ := config.Parse(configJSON)
//	f, err := storage.New(cfg, storage.WithRegisterer(reg))
//	f.AddImage(img)            // lets reads merge neighbouring chunks
//	f.Prefetch(ctx, img)       // background prefetch, if configured
//	img.ReadAt(ctx, f, inode, p, off)
//	f.Close()
//
// Fetchers whose configs name the same cache work_dir share one
// blobcache.Store, so a blob is cached once per process whatever number of
// images or mounts use it.
//
// Read path: a cache hit is a pread (plus a digest check with
// digest_validate / cache validate, or always in compressed-cache mode); a
// miss joins the in-flight fetch of that chunk if there is one
// (single-flight), or starts a stream: ONE backend range request for the
// chunk and the missing chunks stored after it, up to the batch size
// (rafs batch_size / amplify_io) or, for sequential reads, the read-ahead
// window (see stream.go). A stream is a pipeline (network read | decode,
// digest check, hand-out | cache write): it hands each chunk to its
// waiters as soon as its bytes are in, decompressed and verified, while
// the previous ones are written to the cache and the next ones read; one
// that fails its check is fetched again alone, and if it fails again its
// readers get an error wrapping syscall.EIO (counted in
// rafsd_chunk_digest_failures_total and logged). A stream that breaks is
// reopened where it stopped (twice); the chunks it then cannot deliver
// fail with EIO. A read-ahead stream whose reader has left is cancelled.
// Verified chunks are written to the cache (data durable before the chunk
// is marked present). Zran blobs (--oci-ref: chunks are ranges of an
// original gzip layer) stream the same way: their chunks' extents overlap
// (each starts at its context's checkpoint), so a stream's request is the
// union of its chunks' extents, and the chunks of one context are inflated
// together, once, then each is digest-checked and handed out (zran.go).
//
// Prefetch: the image's prefetch list (files, directories recursively),
// then with prefetch_all every chunk of its blobs, in streams of up to the
// read-ahead window, at most threads_count at once, limited to
// bandwidth_rate bytes/s, and paused while an on-demand read that does not
// wait for them is in progress, so they never get ahead of one; an
// on-demand read of a chunk ahead of a throttled prefetch stream splits
// it rather than wait for the prefetch to get there.
package storage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/storage/backend"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
	"github.com/rafsd/rafsd/rafs/zran"
)

// Option configures New.
type Option func(*options)

type options struct {
	reg        prometheus.Registerer
	log        *slog.Logger
	be         backend.Backend
	cacheLimit int64
	readahead  int
}

// WithRegisterer registers the fetcher's Prometheus metrics with reg.
func WithRegisterer(reg prometheus.Registerer) Option { return func(o *options) { o.reg = reg } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithBackend uses be instead of the backend the config describes; the
// fetcher closes it.
func WithBackend(be backend.Backend) Option { return func(o *options) { o.be = be } }

// WithCacheLimit bounds the cache directory's disk usage (bytes); blobs
// no mount uses are evicted beyond it. nydusd has no such setting.
func WithCacheLimit(n int64) Option { return func(o *options) { o.cacheLimit = n } }

// WithReadahead sets the largest read-ahead window in bytes (default
// DefaultReadahead): sequential reads grow their backend requests up to
// it. It is never below the batch size; 0 keeps the default.
func WithReadahead(n int) Option { return func(o *options) { o.readahead = n } }

// Fetcher is a rafs.ChunkReader backed by a backend and a blob cache.
// It is safe for concurrent use.
type Fetcher struct {
	log        *slog.Logger
	be         backend.Backend
	beType     string
	store      *blobcache.Store // nil: no cache
	compressed bool
	validate   bool
	readBatch  int
	readahead  int // largest read-ahead window
	prefetch   config.Prefetch

	m     *metrics
	stats stats

	mu     sync.RWMutex
	blobs  map[string]*blobState
	closed bool

	demand  atomic.Int64 // on-demand reads in progress
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup // prefetch
	streams sync.WaitGroup // running backend streams
}

var _ rafs.ChunkReader = (*Fetcher)(nil)

// blobState is the fetcher's view of one blob.
type blobState struct {
	blob  *rafs.Blob
	cache *blobcache.Blob // nil: uncached

	mu       sync.Mutex
	inflight map[uint64]*call // by compressed offset
	// chunks holds the blob's known chunks sorted by compressed offset,
	// one per offset, from the images added with AddImage.
	chunks []*rafs.Chunk
	// marks are read-ahead markers: compressed offset of the marked chunk
	// -> where the window it sits in ends (see touch).
	marks  map[uint64]readMark
	nmarks atomic.Int32
	// ra holds the running read-ahead streams (see stream.readahead).
	ra  []*stream
	nra atomic.Int32
}

// New returns a fetcher for cfg's backend and cache.
func New(cfg *config.Config, opts ...Option) (*Fetcher, error) {
	o := options{log: slog.Default()}
	for _, opt := range opts {
		opt(&o)
	}
	f := &Fetcher{
		log:       o.log,
		blobs:     map[string]*blobState{},
		validate:  cfg.Rafs.Validate || cfg.Cache.Validate,
		readBatch: cfg.Rafs.BatchSize,
		m:         newMetrics(o.reg),
	}
	f.readahead = max(o.readahead, f.readBatch)
	if o.readahead == 0 {
		f.readahead = max(DefaultReadahead, f.readBatch)
	}
	f.prefetch = cfg.Cache.Prefetch
	if !f.prefetch.Enable && cfg.Rafs.Prefetch.Enable {
		f.prefetch = cfg.Rafs.Prefetch
	}
	f.prefetch.PrefetchAll = f.prefetch.PrefetchAll || cfg.Rafs.Prefetch.PrefetchAll
	f.ctx, f.cancel = context.WithCancel(context.Background())
	f.be = o.be
	if f.be == nil {
		be, err := backend.New(cfg.Backend, backend.Hooks{
			Request: func(ep string, n int, d time.Duration, err error) { f.backendHook(ep, n, d, err) },
			Retry:   func() { f.m.retries.WithLabelValues(f.beType).Inc() },
			Failover: func(from, to string) {
				f.m.failovers.WithLabelValues(f.beType, from).Inc()
			},
		})
		if err != nil {
			return nil, fmt.Errorf("storage: %w", err)
		}
		f.be = be
	}
	f.beType = f.be.Type()
	if fc := cfg.Cache.FileCache; fc != nil && (fc.EnableEncryption || fc.EnableConvergentEncryption) {
		// Refuse rather than silently store plaintext.
		f.be.Close()
		return nil, errors.New("storage: cache encryption (enable_encryption) is not supported")
	}
	switch cfg.Cache.Type {
	case "blobcache", "filecache", "fscache":
		dir := cfg.Cache.WorkDir()
		s, err := blobcache.Open(dir, o.cacheLimit)
		if err != nil {
			f.be.Close()
			return nil, fmt.Errorf("storage: %w", err)
		}
		f.store = s
		// The kernel modes need uncompressed data at uncompressed offsets.
		f.compressed = cfg.Cache.Compressed && cfg.Cache.Type != "fscache"
	}
	return f, nil
}

// Backend returns the fetcher's backend.
func (f *Fetcher) Backend() backend.Backend { return f.be }

// Close stops prefetch and releases the backend and the cache.
func (f *Fetcher) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.mu.Unlock()
	f.cancel()
	f.wg.Wait()
	f.streams.Wait()
	f.mu.Lock()
	for id, bs := range f.blobs {
		if bs.cache != nil {
			bs.cache.Release()
		}
		delete(f.blobs, id)
	}
	f.mu.Unlock()
	err := f.be.Close()
	if f.store != nil {
		err = errors.Join(err, f.store.Close())
	}
	return err
}

// CacheBlob returns the cache of blob b (nil if uncached), for the kernel
// modes that serve the cache file directly.
func (f *Fetcher) CacheBlob(b *rafs.Blob) *blobcache.Blob {
	bs, err := f.state(b)
	if err != nil {
		return nil
	}
	return bs.cache
}

func (f *Fetcher) state(b *rafs.Blob) (*blobState, error) {
	f.mu.RLock()
	bs, ok := f.blobs[b.ID]
	closed := f.closed
	f.mu.RUnlock()
	if ok && !closed {
		return bs, nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, fmt.Errorf("storage: fetcher closed: %w", syscall.EIO)
	}
	if bs, ok := f.blobs[b.ID]; ok {
		return bs, nil
	}
	bs = &blobState{blob: b, inflight: map[uint64]*call{}}
	if f.store != nil {
		cb, err := f.store.Blob(b, f.compressed)
		switch {
		case err == nil:
			bs.cache = cb
		case errors.Is(err, blobcache.ErrNoGeometry):
			f.log.Debug("storage: blob read uncached", "blob", b.ID, "reason", err)
		default:
			f.log.Warn("storage: blob cache unavailable, reading uncached", "blob", b.ID, "err", err)
		}
	}
	f.blobs[b.ID] = bs
	return bs, nil
}

// AddImage indexes img's chunks so that a read can merge a chunk with the
// chunks following it in the blob into one backend request. Zran blobs
// (--oci-ref images) first get their contexts from their separate blob
// meta through the backend, as nydusd reads them (rafs/zran.Resolve).
func (f *Fetcher) AddImage(img *rafs.Image) error {
	if err := zran.Resolve(f.ctx, img, f.be); err != nil {
		return fmt.Errorf("storage: %w", err)
	}
	per := make(map[uint32]map[uint64]*rafs.Chunk)
	for _, in := range img.Inodes {
		for _, fc := range in.Chunks {
			m := per[fc.BlobIndex]
			if m == nil {
				m = map[uint64]*rafs.Chunk{}
				per[fc.BlobIndex] = m
			}
			m[fc.CompressedOffset] = fc.Chunk
		}
	}
	for bi, m := range per {
		b, err := img.Blob(&rafs.Chunk{BlobIndex: bi})
		if err != nil {
			return fmt.Errorf("storage: %w", err)
		}
		bs, err := f.state(b)
		if err != nil {
			return err
		}
		bs.mu.Lock()
		for _, c := range bs.chunks {
			if _, ok := m[c.CompressedOffset]; !ok {
				m[c.CompressedOffset] = c
			}
		}
		cs := make([]*rafs.Chunk, 0, len(m))
		for _, c := range m {
			cs = append(cs, c)
		}
		sort.Slice(cs, func(i, j int) bool { return cs[i].CompressedOffset < cs[j].CompressedOffset })
		bs.chunks = cs
		bs.mu.Unlock()
	}
	return nil
}

// cacheable reports whether c fits the blob's cache geometry.
func (bs *blobState) cacheable(c *rafs.Chunk, compressed bool) bool {
	if bs.cache == nil {
		return false
	}
	b := bs.blob
	if c.Index >= b.ChunkCount {
		return false
	}
	if compressed {
		return c.CompressedOffset+uint64(c.CompressedSize) <= b.CompressedSize
	}
	return c.UncompressedOffset+uint64(c.UncompressedSize) <= b.UncompressedSize
}

func (bs *blobState) cached(c *rafs.Chunk, compressed bool) bool {
	return bs.cacheable(c, compressed) && bs.cache.Has(c.Index)
}

// ReadChunkAt implements rafs.ChunkReader.
func (f *Fetcher) ReadChunkAt(ctx context.Context, b *rafs.Blob, c *rafs.Chunk, p []byte, off uint32) error {
	if uint64(off)+uint64(len(p)) > uint64(c.UncompressedSize) {
		return fmt.Errorf("storage: chunk %d of blob %s: read [%d,+%d) past its %d bytes: %w", c.Index, b.ID, off, len(p), c.UncompressedSize, syscall.EINVAL)
	}
	f.demand.Add(1)
	defer f.demand.Add(-1)
	f.stats.total.Add(1)
	bs, err := f.state(b)
	if err != nil {
		return err
	}
	bs.nearby(c)
	if bs.cached(c, f.compressed) {
		ok, err := f.readCached(bs, c, p, off)
		if err != nil {
			return err
		}
		if ok {
			f.m.cacheHits.Inc()
			f.stats.hits.Add(1)
			f.touch(bs, c)
			return nil
		}
	}
	f.m.cacheMisses.Inc()
	if err := f.fetch(ctx, bs, c, f.readBatch, p, off); err != nil {
		return err
	}
	f.touch(bs, c)
	return nil
}

// readCached serves a read from the cache. ok is false if the cached bytes
// failed their check (the chunk is then invalidated and must be fetched).
func (f *Fetcher) readCached(bs *blobState, c *rafs.Chunk, p []byte, off uint32) (ok bool, err error) {
	cb := bs.cache
	if !f.compressed && !f.validate {
		if err := cb.ReadAt(p, int64(c.UncompressedOffset)+int64(off)); err != nil {
			return false, fmt.Errorf("storage: %w: %w", syscall.EIO, err)
		}
		return true, nil
	}
	data, err := f.loadCached(bs, c)
	if err != nil {
		return false, err
	}
	if data == nil {
		return false, nil
	}
	copy(p, data[off:])
	return true, nil
}

// loadCached reads and verifies a whole cached chunk; nil data means it
// failed verification and was invalidated.
func (f *Fetcher) loadCached(bs *blobState, c *rafs.Chunk) ([]byte, error) {
	cb := bs.cache
	var data []byte
	var verr error
	if f.compressed {
		raw := make([]byte, c.CompressedSize)
		if err := cb.ReadAt(raw, int64(c.CompressedOffset)); err != nil {
			return nil, fmt.Errorf("storage: %w: %w", syscall.EIO, err)
		}
		data, verr = rafs.DecodeChunkBytes(bs.blob, c, raw)
	} else {
		data = make([]byte, c.UncompressedSize)
		if err := cb.ReadAt(data, int64(c.UncompressedOffset)); err != nil {
			return nil, fmt.Errorf("storage: %w: %w", syscall.EIO, err)
		}
		verr = bs.blob.Digester.Verify(data, c.Digest)
	}
	if verr == nil {
		return data, nil
	}
	f.m.digestFailures.WithLabelValues("cache").Inc()
	f.stats.digestFailures.Add(1)
	f.log.Error("storage: cached chunk failed its check, refetching", "blob", bs.blob.ID, "chunk", c.Index, "err", verr)
	if err := cb.Invalidate(c.Index); err != nil {
		f.log.Warn("storage: invalidate cached chunk", "blob", bs.blob.ID, "chunk", c.Index, "err", err)
	}
	return nil, nil
}

// fetch copies chunk c's verified bytes from off into p, joining an
// in-flight fetch of it or starting a stream that also takes the following
// missing chunks, up to batch bytes or, for sequential reads, the
// read-ahead window.
func (f *Fetcher) fetch(ctx context.Context, bs *blobState, c *rafs.Chunk, batch int, p []byte, off uint32) error {
	bs.mu.Lock()
	for {
		if cl, ok := bs.flying(c.CompressedOffset); ok {
			st, split := f.join(cl)
			bs.mu.Unlock()
			if split != nil {
				f.launch(split)
			}
			return wait(ctx, bs, st, cl, p, off)
		}
		// It may have been cached since the caller looked.
		if !bs.cached(c, f.compressed) {
			break
		}
		bs.mu.Unlock()
		data, err := f.loadWhole(bs, c)
		if err != nil {
			return err
		}
		if data != nil {
			copy(p, data[off:])
			return nil
		}
		// It failed its check and was invalidated: fetch it (unless
		// someone started to meanwhile).
		bs.mu.Lock()
	}
	n, seq := batch, false
	if k := bs.chunkIndex(c); k >= 0 {
		n, seq = f.window(bs, k, batch)
	}
	stop := readStop(ctx, bs, c)
	if seq && stop != math.MaxUint64 {
		n = max(batch, fitWindow(c.CompressedOffset, n, stop))
	}
	group := f.plan(bs, c, n, stop)
	mark := noMark
	switch {
	case seq:
		mark = markFirst
	case len(group) > 1:
		mark = markHalf
	}
	st := f.newStream(bs, group, false)
	if len(group) > 1 {
		bs.readAhead(st, c.CompressedOffset)
	}
	bs.placeMark(st, mark, stop)
	cl := st.items[0]
	st.waiters.Add(1)
	cl.refs.Add(1)
	bs.mu.Unlock()
	f.launch(st)
	return wait(ctx, bs, st, cl, p, off)
}

// loadWhole returns a cached chunk's whole verified bytes (nil if it
// failed its check). Without validation the cache is trusted.
func (f *Fetcher) loadWhole(bs *blobState, c *rafs.Chunk) ([]byte, error) {
	if !f.compressed && !f.validate {
		data := make([]byte, c.UncompressedSize)
		if err := bs.cache.ReadAt(data, int64(c.UncompressedOffset)); err != nil {
			return nil, fmt.Errorf("storage: %w: %w", syscall.EIO, err)
		}
		return data, nil
	}
	return f.loadCached(bs, c)
}

// plan returns c followed by the missing, not in-flight chunks stored
// right after it, up to batch compressed bytes (the range that fetches
// them all). In a zran blob, the chunks that share the last one's context
// and end by stop (the end of the file being read) are taken beyond
// batch: a later request would fetch and inflate the context's bytes up
// to them again. bs.mu is held.
func (f *Fetcher) plan(bs *blobState, c *rafs.Chunk, batch int, stop uint64) []*rafs.Chunk {
	group := []*rafs.Chunk{c}
	if bs.cache == nil {
		// Nowhere to keep the neighbours: fetching them would be waste.
		return group
	}
	cs := bs.chunks
	k := sort.Search(len(cs), func(i int) bool { return cs[i].CompressedOffset >= c.CompressedOffset })
	if k >= len(cs) || cs[k].CompressedOffset != c.CompressedOffset {
		return group
	}
	// The group's range is the union of its chunks' extents: they abut,
	// or in a zran blob overlap (see zran.go).
	end := chunkEnd(c)
	for k++; k < len(cs); k++ {
		n := cs[k]
		if !bs.follows(end, n) {
			break
		}
		if max(end, chunkEnd(n))-c.CompressedOffset > uint64(batch) && (chunkEnd(n) > stop || !bs.sameContext(group[len(group)-1], n, end-c.CompressedOffset)) {
			break
		}
		if _, busy := bs.flying(n.CompressedOffset); busy || bs.cached(n, f.compressed) {
			break
		}
		group = append(group, n)
		end = max(end, chunkEnd(n))
	}
	return group
}

// refetch reads one chunk again on its own, for a chunk whose fetched
// bytes failed their check with cause (the first read may have been a
// transient corruption). Both failures are counted.
func (f *Fetcher) refetch(ctx context.Context, b *rafs.Blob, c *rafs.Chunk, cause error) (data, raw []byte, err error) {
	f.m.digestFailures.WithLabelValues("backend").Inc()
	f.stats.digestFailures.Add(1)
	f.log.Warn("storage: fetched chunk failed its check, fetching it again", "blob", b.ID, "chunk", c.Index, "err", cause)
	raw = make([]byte, c.CompressedSize)
	if err := f.be.ReadAt(ctx, b.ID, raw, int64(c.CompressedOffset)); err != nil {
		return nil, nil, err
	}
	data, err = rafs.DecodeChunkBytes(b, c, raw)
	if err != nil {
		f.m.digestFailures.WithLabelValues("backend").Inc()
		f.stats.digestFailures.Add(1)
		return nil, nil, err
	}
	return data, raw, nil
}

// chunkFailed counts and logs a chunk that could not be read (err) and
// returns the EIO its readers get.
func (f *Fetcher) chunkFailed(b *rafs.Blob, c *rafs.Chunk, err error) error {
	f.m.readErrors.Inc()
	f.log.Error("storage: chunk read failed", "blob", b.ID, "chunk", c.Index, "err", err)
	return fmt.Errorf("storage: chunk %d of blob %s: %w: %w", c.Index, b.ID, syscall.EIO, err)
}

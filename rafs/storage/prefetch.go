package storage

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/rafsd/rafsd/rafs"
)

type prefetchItem struct {
	bs *blobState
	c  *rafs.Chunk
	// all: from prefetch_all, which goes through blobs in order, so its
	// streams may reach as far as the read-ahead window.
	all bool
}

// Prefetch starts fetching img's prefetch list (and with prefetch_all
// every chunk of its blobs) into the cache in the background, and
// returns. It does nothing unless prefetch is enabled and there is a
// cache. The work stops when ctx is done or the fetcher is closed;
// WaitPrefetch waits for it.
func (f *Fetcher) Prefetch(ctx context.Context, img *rafs.Image) error {
	if err := f.AddImage(img); err != nil {
		return err
	}
	if !f.prefetch.Enable || f.store == nil {
		return nil
	}
	var items []prefetchItem
	seen := map[*blobState]map[uint64]bool{}
	add := func(c *rafs.Chunk, all bool) {
		b, err := img.Blob(c)
		if err != nil {
			return
		}
		bs, err := f.state(b)
		if err != nil || !bs.cacheable(c, f.compressed) {
			return
		}
		if seen[bs] == nil {
			seen[bs] = map[uint64]bool{}
		}
		if seen[bs][c.CompressedOffset] {
			return
		}
		seen[bs][c.CompressedOffset] = true
		items = append(items, prefetchItem{bs, c, all})
	}
	var addInode func(ino uint64, depth int)
	addInode = func(ino uint64, depth int) {
		in, err := img.Inode(ino)
		if err != nil || depth > 4096 {
			return
		}
		for _, fc := range in.Chunks {
			add(fc.Chunk, false)
		}
		for _, e := range in.Entries {
			addInode(e.Ino, depth+1)
		}
	}
	for _, ino := range img.Prefetch {
		addInode(ino, 0)
	}
	if f.prefetch.PrefetchAll {
		for _, l := range img.BlobLayouts() {
			cs := append([]*rafs.Chunk(nil), l.Chunks...)
			sortByCompressed(cs)
			for _, c := range cs {
				add(c, true)
			}
		}
	}
	if len(items) == 0 {
		return nil
	}
	f.m.prefetchQueued.Add(float64(len(items)))
	f.stats.prefetchBegin.CompareAndSwap(0, time.Now().UnixMilli())
	queue := make(chan prefetchItem, len(items))
	for _, it := range items {
		queue <- it
	}
	close(queue)
	threads := max(f.prefetch.ThreadsCount, 1)
	lim := newLimiter(uint64(f.prefetch.BandwidthLimit), img.ChunkSize)
	batch := f.prefetch.BatchSize
	if batch <= 0 {
		batch = int(img.ChunkSize)
	}
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(f.ctx, cancel)
	var wg sync.WaitGroup
	wg.Add(threads)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		defer stop()
		defer cancel()
		wg.Wait()
		f.stats.prefetchEnd.Store(time.Now().UnixMilli())
	}()
	// At most threads streams run at once; a worker that finds its chunk
	// in flight moves on and collects the result at the end.
	slots := make(chan struct{}, threads)
	for range threads {
		f.stats.prefetchWorkers.Add(1)
		go func() {
			defer wg.Done()
			defer f.stats.prefetchWorkers.Add(-1)
			var pending []*call
			for it := range queue {
				if ctx.Err() != nil {
					break
				}
				if cl := f.prefetchOne(ctx, it, batch, lim, slots); cl != nil {
					pending = append(pending, cl)
				}
			}
			for _, cl := range pending {
				select {
				case <-cl.written:
				case <-ctx.Done():
					return
				}
				if cl.err != nil {
					f.log.Warn("storage: prefetch failed", "chunk", cl.c.Index, "err", cl.err)
					continue
				}
				f.m.prefetchDone.Inc()
			}
		}()
	}
	return nil
}

// WaitPrefetch waits for every prefetch started so far to finish.
func (f *Fetcher) WaitPrefetch() {
	f.wg.Wait()
}

// prefetchOne starts fetching it.c unless it is cached, and returns its
// in-flight call (nil if it is cached or prefetch was stopped).
func (f *Fetcher) prefetchOne(ctx context.Context, it prefetchItem, batch int, lim *limiter, slots chan struct{}) *call {
	bs, c := it.bs, it.c
	if bs.cached(c, f.compressed) {
		f.m.prefetchDone.Inc()
		return nil
	}
	// Never ahead of on-demand reads: wait while any is in progress.
	for f.demand.Load() > 0 {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Millisecond):
		}
	}
	held := false
	for {
		bs.mu.Lock()
		if cl, ok := bs.flying(c.CompressedOffset); ok {
			// Prefetch counts on it now: it must not be cancelled as a
			// read-ahead whose reader left.
			cl.st.pinned = true
			bs.mu.Unlock()
			if held {
				<-slots
			}
			return cl
		}
		if bs.cached(c, f.compressed) {
			bs.mu.Unlock()
			if held {
				<-slots
			}
			f.m.prefetchDone.Inc()
			return nil
		}
		if held {
			break
		}
		bs.mu.Unlock()
		select {
		case slots <- struct{}{}:
			held = true
		case <-ctx.Done():
			return nil
		}
	}
	n, start := batch, c
	if it.all {
		n = max(batch, f.readahead)
		start = f.runStart(bs, c, n/2)
	}
	st := f.newStream(bs, f.plan(bs, start, n, 0), true)
	st.lim = lim
	st.release = func() { <-slots }
	cl := bs.inflight[c.CompressedOffset]
	bs.mu.Unlock()
	f.launch(st)
	return cl
}

// runStart returns the first chunk of the run of missing, not in-flight
// chunks stored right before c, up to limit bytes back (c if there is none).
// Workers take the queue's items concurrently: the one that got a later
// item may get the lock first, and must not leave the chunks before it to
// a second request. bs.mu is held.
func (f *Fetcher) runStart(bs *blobState, c *rafs.Chunk, limit int) *rafs.Chunk {
	k := bs.chunkIndex(c)
	if k < 0 {
		return c
	}
	for first := k; k > 0; k-- {
		p := bs.chunks[k-1]
		back := int(bs.chunks[first].CompressedOffset - p.CompressedOffset)
		if back > limit || !bs.follows(chunkEnd(p), bs.chunks[k]) {
			break
		}
		if _, busy := bs.inflight[p.CompressedOffset]; busy || bs.cached(p, f.compressed) || !bs.cacheable(p, f.compressed) {
			break
		}
	}
	return bs.chunks[k]
}

func sortByCompressed(cs []*rafs.Chunk) {
	sort.Slice(cs, func(i, j int) bool { return cs[i].CompressedOffset < cs[j].CompressedOffset })
}

// limiter is a token bucket of bytes per second (0: unlimited). Its burst
// is at least one chunk, as nydusd raises a smaller limit to the chunk size.
type limiter struct {
	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func newLimiter(rate uint64, chunkSize uint32) *limiter {
	if rate == 0 {
		return nil
	}
	burst := float64(max(rate, uint64(chunkSize)))
	return &limiter{rate: float64(rate), burst: burst, tokens: burst, last: time.Now()}
}

func (l *limiter) wait(ctx context.Context, n uint64) error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	now := time.Now()
	l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	l.last = now
	l.tokens -= float64(n)
	var d time.Duration
	if l.tokens < 0 {
		d = time.Duration(-l.tokens / l.rate * float64(time.Second))
	}
	l.mu.Unlock()
	if d == 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

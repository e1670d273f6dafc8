package storage

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/bits"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/storage/backend"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
)

// Streams. A fetch covers a window of contiguous missing chunks with ONE
// backend range request whose body is consumed as it arrives: each chunk
// is decoded, verified, written to the cache and handed to its waiters as
// soon as its bytes are in, so a reader of the window's first chunk does
// not wait for its last. Every chunk of the window is registered in
// blobState.inflight when the stream starts (single-flight for the whole
// window); a reader that wants a chunk far beyond the stream's position
// splits the stream there and fetches the tail itself rather than wait.
//
// Window size is kernel-style read-ahead without per-reader state (like
// Linux's context read-ahead): a miss right behind chunks that are cached
// or in flight is sequential, and its window is four times that history,
// from the batch size up to the read-ahead limit. A sequential window's
// first chunk carries a marker (a batch window's, its middle one): the
// reader that gets it starts the next window, so the next request is
// under way while the current one is consumed. Read-ahead is for a
// reader: once nobody waits on a window's chunks and no read came near it
// for raIdle (or its last waiter's context ended), the stream stops where
// it is (see stream.orphaned).

// raIdle is how long a read-ahead stream nobody waits on runs on without
// a read coming near it before it is cancelled.
var raIdle = time.Second

// splitDistance is how far (compressed bytes) a wanted chunk must lie
// beyond a stream's position for its reader to fetch it on its own: about
// what a stream delivers in the time a new request takes to answer.
var splitDistance uint64 = 16 << 20

// DefaultReadahead is the largest read-ahead window (see WithReadahead).
// The next window is requested when its reader enters the current one, so
// a window must last longer than a request takes to answer: 64 MiB last
// ~60 ms at 1 GB/s, which a docker-registry under load takes (20-150 ms
// measured) to answer; 128 MiB also makes fewer requests, each of which
// costs the registry CPU.
const DefaultReadahead = 128 << 20

// call is one chunk's in-flight fetch.
type call struct {
	c *rafs.Chunk
	// done is closed when data or err is set: waiters get the verified
	// bytes while they are still being written to the cache.
	done chan struct{}
	// written is closed when the chunk left flight: written to the cache
	// (if it could be) or failed.
	written chan struct{}
	data    []byte // verified uncompressed bytes
	err     error
	// data comes from the buffer pool; refs counts who may still read it
	// (the stream, and each waiter until it copied it out), and the last
	// to let go returns it.
	pooled bool
	refs   atomic.Int32

	// st is the stream that delivers the chunk and idx its place there;
	// both change when the stream is split (under blobState.mu).
	st  *stream
	idx int
}

// stream is one range request's worth of contiguous chunks of a blob.
type stream struct {
	bs       *blobState
	items    []*call
	prefetch bool
	lim      *limiter // prefetch bandwidth
	release  func()   // frees a prefetch thread slot
	// waiters counts on-demand readers waiting on its chunks: a prefetch
	// stream with none pauses while any on-demand read is in progress,
	// and a read-ahead stream with none may be cancelled.
	waiters atomic.Int32

	// Read-ahead streams (readahead set) are cancelled where they are once
	// their reader has left: nobody waits on their chunks and either no
	// read came near them (at or after near, before their end) for
	// raIdle, or a waiter's context ended (left). pinned streams (a
	// prefetch worker counts on their chunks) run to their end.
	readahead bool
	near      uint64
	touched   atomic.Int64 // UnixNano of the last read near it
	left      atomic.Bool
	pinned    bool // under blobState.mu

	// hi is where the union of its chunks' extents ends (their last
	// chunk's end, or for a zran blob, whose extents overlap, the
	// furthest one's).
	hi uint64

	mu    sync.Mutex
	next  int // index of the chunk being read
	limit int // items[limit:] were split off to another stream
}

// Where newStream puts a read-ahead marker.
const (
	noMark    = iota
	markFirst // sequential window: the next one starts as soon as this is entered
	markHalf  // batch window: the next one starts if a reader gets half way
)

// newStream registers group (contiguous chunks, none cached or in flight)
// as in flight and returns the stream that will fetch them. bs.mu is held.
func (f *Fetcher) newStream(bs *blobState, group []*rafs.Chunk, prefetch bool) *stream {
	st := &stream{bs: bs, prefetch: prefetch, items: make([]*call, len(group)), limit: len(group)}
	for i, c := range group {
		cl := &call{c: c, done: make(chan struct{}), written: make(chan struct{}), st: st, idx: i}
		cl.refs.Store(1)
		st.items[i] = cl
		bs.inflight[c.CompressedOffset] = cl
		st.hi = max(st.hi, chunkEnd(c))
	}
	return st
}

// readAhead makes st a read-ahead stream for a reader now at offset near
// (cancelled once that reader has left, see stream). bs.mu is held.
func (bs *blobState) readAhead(st *stream, near uint64) {
	st.readahead, st.near = true, near
	st.touched.Store(time.Now().UnixNano())
	bs.ra = append(bs.ra, st)
	bs.nra.Store(int32(len(bs.ra)))
}

// dropReadAhead forgets a read-ahead stream that ended.
func (bs *blobState) dropReadAhead(st *stream) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	for i, s := range bs.ra {
		if s == st {
			bs.ra = append(bs.ra[:i], bs.ra[i+1:]...)
			break
		}
	}
	bs.nra.Store(int32(len(bs.ra)))
}

// nearby notes a read of c on the read-ahead streams it is near: their
// reader is still there.
func (bs *blobState) nearby(c *rafs.Chunk) {
	if bs.nra.Load() == 0 {
		return
	}
	now := time.Now().UnixNano()
	off := c.CompressedOffset
	bs.mu.Lock()
	for _, st := range bs.ra {
		if off >= st.near && off < st.hi {
			st.touched.Store(now)
			st.left.Store(false)
		}
	}
	bs.mu.Unlock()
}

// orphaned reports whether st is a read-ahead stream whose reader has left.
func (st *stream) orphaned() bool {
	if !st.readahead || st.waiters.Load() > 0 {
		return false
	}
	return st.left.Load() || time.Since(time.Unix(0, st.touched.Load())) > raIdle
}

// abandon stops st before chunk j if it is still orphaned: chunks j and
// after leave flight unfetched (a later read fetches them anew). It
// reports whether it did.
func (f *Fetcher) abandon(st *stream, j int) bool {
	bs := st.bs
	bs.mu.Lock()
	// Waiters join under bs.mu: none can appear once we hold it.
	if st.pinned || !st.orphaned() {
		bs.mu.Unlock()
		return false
	}
	st.mu.Lock()
	end := st.limit
	st.limit = min(j, end)
	st.mu.Unlock()
	var n uint64
	for _, cl := range st.items[j:end] {
		if bs.inflight[cl.c.CompressedOffset] == cl {
			delete(bs.inflight, cl.c.CompressedOffset)
		}
		n += uint64(cl.c.CompressedSize)
	}
	bs.mu.Unlock()
	for _, cl := range st.items[j:end] {
		cl.err = fmt.Errorf("storage: chunk %d of blob %s: read-ahead cancelled: %w", cl.c.Index, bs.blob.ID, syscall.EIO)
		close(cl.done)
		close(cl.written)
		cl.release()
	}
	f.m.cancelled.Inc()
	f.log.Debug("storage: read-ahead cancelled, its reader left", "blob", bs.blob.ID, "chunk", st.items[j].c.Index, "chunks", end-j, "bytes", n)
	return true
}

// readMark is a read-ahead marker: the reader that gets the marked chunk
// starts a window at the chunk stored at next, which must stay below stop.
type readMark struct{ next, stop uint64 }

// placeMark puts a read-ahead marker on st's chunks as mark says, unless
// the next window would start at or past stop (the end of the file being
// read: what lies beyond belongs to other files). bs.mu is held.
func (bs *blobState) placeMark(st *stream, mark int, stop uint64) {
	if mark == noMark || len(st.items) == 0 || bs.cache == nil {
		return
	}
	last := st.items[len(st.items)-1].c
	end := st.hi
	if end >= stop {
		return
	}
	// The next window starts at the chunk stored after st's last one if
	// it follows it (zran extents overlap: it starts before end).
	next := end
	if k := bs.chunkIndex(last); k >= 0 && k+1 < len(bs.chunks) && bs.follows(end, bs.chunks[k+1]) {
		next = bs.chunks[k+1].CompressedOffset
	}
	m := st.items[0].c
	if mark == markHalf {
		m = st.items[len(st.items)/2].c
	}
	if bs.marks == nil {
		bs.marks = map[uint64]readMark{}
	}
	if _, ok := bs.marks[m.CompressedOffset]; !ok {
		bs.nmarks.Add(1)
	}
	bs.marks[m.CompressedOffset] = readMark{next, stop}
}

// readStop is where read-ahead for the read in ctx ends: the end of the
// file's extent in bs's blob (rafs.ReadEnd), right after c if the file
// ends before c there (deduplicated chunks out of order), or nowhere for
// a read that says nothing (prefetch, tools).
func readStop(ctx context.Context, bs *blobState, c *rafs.Chunk) uint64 {
	e, ok := rafs.ReadEndFrom(ctx)
	switch {
	case !ok:
		return math.MaxUint64
	case e.BlobID != bs.blob.ID || e.End <= c.CompressedOffset:
		return c.CompressedOffset + uint64(c.CompressedSize)
	}
	return e.End
}

// launch runs st in the background (or fails its chunks if the fetcher
// is closed).
func (f *Fetcher) launch(st *stream) {
	f.mu.RLock()
	if f.closed {
		f.mu.RUnlock()
		f.failFrom(st, 0, fmt.Errorf("storage: fetcher closed: %w", syscall.EIO))
		if st.release != nil {
			st.release()
		}
		return
	}
	f.streams.Add(1)
	f.mu.RUnlock()
	go f.run(st)
}

// join registers an on-demand waiter on cl, splitting its stream if cl
// lies far ahead of it; the split-off stream, if any, must be launched
// once bs.mu is released. bs.mu is held.
func (f *Fetcher) join(cl *call) (st, split *stream) {
	st = cl.st
	st.mu.Lock()
	k := cl.idx
	// A throttled prefetch stream gets to a chunk at its bandwidth_rate,
	// not at the backend's pace: any chunk beyond the next one is far.
	far := k > st.next && cl.c.CompressedOffset-st.items[st.next].c.CompressedOffset >= splitDistance
	if st.prefetch && st.lim != nil && k > st.next+1 {
		far = true
	}
	if far && k < st.limit {
		// The tail keeps the stream's kind: a prefetch tail is throttled
		// again once its on-demand readers have theirs.
		split = &stream{bs: st.bs, items: st.items[k:st.limit], prefetch: st.prefetch, lim: st.lim, hi: st.hi}
		split.limit = len(split.items)
		if st.readahead {
			st.bs.readAhead(split, st.near)
			split.pinned = st.pinned
		}
		f.m.splits.Inc()
		st.limit = k
		for j, it := range split.items {
			it.st, it.idx = split, j
		}
		st.mu.Unlock()
		st = split
	} else {
		st.mu.Unlock()
	}
	st.waiters.Add(1)
	cl.refs.Add(1)
	return st, split
}

// wait waits for cl as an on-demand reader registered with join (or, for
// a stream's own chunk, with st.waiters and cl.refs taken), and copies
// its bytes from off into p.
func wait(ctx context.Context, bs *blobState, st *stream, cl *call, p []byte, off uint32) error {
	defer st.waiters.Add(-1)
	defer cl.release()
	select {
	case <-cl.done:
		if cl.err == nil {
			copy(p, cl.data[off:])
		}
		return cl.err
	case <-ctx.Done():
		// The reader gave up: if nobody else waits on the stream, its
		// read-ahead is for nobody (until a read comes near it again).
		if st.waiters.Load() == 1 {
			st.left.Store(true)
		}
		return fmt.Errorf("storage: chunk %d of blob %s: %w", cl.c.Index, bs.blob.ID, ctx.Err())
	}
}

// failed reports whether cl's failure was already handed to its waiters.
func (cl *call) failed() bool {
	select {
	case <-cl.done:
		return cl.err != nil
	default:
		return false
	}
}

// flying returns the call fetching the chunk stored at off, if one is in
// flight. A call whose failure was already handed out is on its way out
// of flight (finish wakes the waiters before it takes the call out) and
// is taken out here: a read that comes after a failure fetches anew
// rather than get an error from before it came. bs.mu is held.
func (bs *blobState) flying(off uint64) (*call, bool) {
	cl, ok := bs.inflight[off]
	if ok && cl.failed() {
		delete(bs.inflight, off)
		return nil, false
	}
	return cl, ok
}

// release drops a reference to cl's data.
func (cl *call) release() {
	if cl.refs.Add(-1) == 0 && cl.pooled {
		putBuf(cl.data)
	}
}

// bufPools hold chunk buffers by power-of-two capacity: streams go through
// hundreds of MiB, and fresh buffers cost zeroing and garbage collection.
var bufPools [40]sync.Pool

func getBuf(n int) []byte {
	k := bits.Len(uint(max(n, 1) - 1))
	if v, ok := bufPools[k].Get().(*[]byte); ok {
		return (*v)[:n]
	}
	return make([]byte, n, 1<<k)
}

func putBuf(b []byte) {
	c := cap(b)
	if c == 0 || c&(c-1) != 0 {
		return
	}
	b = b[:c]
	bufPools[bits.Len(uint(c-1))].Put(&b)
}

// window returns the compressed bytes a fetch of bs.chunks[k] should
// cover: batch, or for a sequential miss four times the cached or in-flight
// run right before it, up to the read-ahead limit. seq reports the latter.
// bs.mu is held.
func (f *Fetcher) window(bs *blobState, k int, batch int) (n int, seq bool) {
	if batch <= 0 || bs.cache == nil || f.readahead <= batch || k <= 0 || k >= len(bs.chunks) {
		return batch, false
	}
	cs := bs.chunks
	// The history is the span of blob its chunks' extents cover (for
	// abutting extents, the sum of their sizes; zran ones overlap).
	var hist int
	var end uint64
	for j := k - 1; j >= 0 && hist < f.readahead; j-- {
		p := cs[j]
		if !bs.follows(chunkEnd(p), cs[j+1]) {
			break
		}
		if _, busy := bs.inflight[p.CompressedOffset]; !busy && !bs.cached(p, f.compressed) {
			break
		}
		end = max(end, chunkEnd(p))
		hist = int(end - p.CompressedOffset)
	}
	if hist == 0 {
		return batch, false
	}
	return min(max(raGrowth*hist, batch), f.readahead), true
}

// fitWindow returns the size of a sequential window of n bytes at start
// that must not pass stop: cut at stop, or stretched to it when what would
// be left is under a quarter window, which one more request (a round trip,
// and registry work per request) would cost more than it is worth.
func fitWindow(start uint64, n int, stop uint64) int {
	if stop == math.MaxUint64 || stop <= start {
		return n
	}
	if rest := stop - start; rest <= uint64(n)+uint64(n)/4 {
		return int(rest)
	}
	return n
}

// chunkIndex returns the position of c in bs.chunks, or -1. bs.mu is held.
func (bs *blobState) chunkIndex(c *rafs.Chunk) int {
	cs := bs.chunks
	k := sort.Search(len(cs), func(i int) bool { return cs[i].CompressedOffset >= c.CompressedOffset })
	if k < len(cs) && cs[k].CompressedOffset == c.CompressedOffset {
		return k
	}
	return -1
}

// touch starts the next read-ahead window if c carries a marker: its
// reader is going through a window sequentially.
func (f *Fetcher) touch(bs *blobState, c *rafs.Chunk) {
	if bs.nmarks.Load() == 0 {
		return
	}
	bs.mu.Lock()
	rm, ok := bs.marks[c.CompressedOffset]
	end := rm.next
	if !ok {
		bs.mu.Unlock()
		return
	}
	delete(bs.marks, c.CompressedOffset)
	bs.nmarks.Add(-1)
	var st *stream
	k := sort.Search(len(bs.chunks), func(i int) bool { return bs.chunks[i].CompressedOffset >= end })
	if k < len(bs.chunks) && bs.chunks[k].CompressedOffset == end {
		next := bs.chunks[k]
		if _, busy := bs.inflight[end]; !busy && !bs.cached(next, f.compressed) {
			n, _ := f.window(bs, k, f.readBatch)
			n = fitWindow(end, n, rm.stop)
			st = f.newStream(bs, f.plan(bs, next, n, rm.stop), false)
			bs.readAhead(st, c.CompressedOffset)
			bs.placeMark(st, markFirst, rm.stop)
		}
	}
	bs.mu.Unlock()
	if st != nil {
		f.stats.readaheads.Add(1)
		f.m.readaheads.Inc()
		f.launch(st)
	}
}

// failFrom fails st's chunks from index i to its limit with err.
func (f *Fetcher) failFrom(st *stream, i int, err error) {
	st.mu.Lock()
	end := st.limit
	st.limit = min(i, end) // nothing left to split off
	st.mu.Unlock()
	for ; i < end; i++ {
		cl := st.items[i]
		cl.err = fmt.Errorf("storage: chunk %d of blob %s: %w: %w", cl.c.Index, st.bs.blob.ID, syscall.EIO, err)
		f.finish(st.bs, cl)
		cl.release()
	}
	if end > i {
		f.m.readErrors.Add(float64(end - i))
	}
}

// finish publishes cl's result (if not yet) and takes it out of flight.
func (f *Fetcher) finish(bs *blobState, cl *call) {
	select {
	case <-cl.done:
	default:
		close(cl.done)
	}
	bs.mu.Lock()
	if bs.inflight[cl.c.CompressedOffset] == cl {
		delete(bs.inflight, cl.c.CompressedOffset)
	}
	bs.mu.Unlock()
	close(cl.written)
}

// run fetches st's chunks with one range request, reopened where it broke
// up to twice (through the backend's mirror failover and retries); the
// chunks it could not fetch fail with EIO.
func (f *Fetcher) run(st *stream) {
	defer f.streams.Done()
	defer func() {
		if st.readahead {
			st.bs.dropReadAhead(st)
		}
	}()
	if st.release != nil {
		defer st.release()
	}
	if st.prefetch {
		start := time.Now()
		defer func() { f.stats.prefetchMillis.Add(uint64(time.Since(start).Milliseconds())) }()
	}
	b := st.bs.blob
	ctx := f.ctx
	reopens := 0
	for i := 0; ; {
		st.mu.Lock()
		end := st.limit
		st.mu.Unlock()
		if i >= end {
			return
		}
		first := st.items[i].c
		start := first.CompressedOffset
		n := spanEnd(st.items[i:end]) - start
		t0 := time.Now()
		rc, err := backend.OpenRange(ctx, f.be, b.ID, int64(start), int64(n))
		f.log.Debug("storage: stream", "blob", b.ID, "off", start, "len", n, "chunks", end-i, "prefetch", st.prefetch, "open", time.Since(t0), "err", err)
		if err != nil {
			f.log.Error("storage: chunk read failed", "blob", b.ID, "chunk", first.Index, "err", err)
			f.failFrom(st, i, err)
			return
		}
		if st.prefetch {
			f.stats.prefetchRequests.Add(1)
		}
		if b.IsZran() {
			i, err = f.pumpZran(ctx, st, rc, i)
		} else {
			i, err = f.pump(ctx, st, rc, i)
		}
		rc.Close()
		if err == nil {
			return
		}
		if reopens < 2 && ctx.Err() == nil {
			reopens++
			f.log.Warn("storage: backend stream broke, reopening it where it stopped", "blob", b.ID, "chunk", st.items[i].c.Index, "err", err)
			continue
		}
		f.log.Error("storage: chunk read failed", "blob", b.ID, "chunk", st.items[i].c.Index, "err", err)
		f.failFrom(st, i, err)
		return
	}
}

// piece is a run of a stream's chunks read from its body, items [i, i+n)
// with raw holding the blob's bytes [lo, lo+len(raw)) (a lone chunk's
// piece is just its stored bytes), or the error that ended the body at
// item i.
type piece struct {
	i, n int
	lo   uint64
	raw  []byte
	err  error
}

// pumpDepth is how many chunks each stage of a stream's pipeline may
// hold ahead of the next: enough that a slow hash or cache write does not
// stop the socket from being read, bounded so a stream holds a few MiB.
const pumpDepth = 4

// pump reads st's chunks from rc starting at index i in a three-stage
// pipeline, so that the socket is always being read: network (read each
// chunk's stored bytes into a pooled buffer) | verify (decode, digest
// check, hand out to waiters) | cache write (then the chunk leaves
// flight). It returns the index of the first chunk it did not deliver
// and, if it stopped short of the stream's limit, why. Every chunk it
// delivered has left flight when it returns.
func (f *Fetcher) pump(ctx context.Context, st *stream, rc io.Reader, i int) (int, error) {
	read := func(send func(piece) bool) {
		for j := i; ; j++ {
			st.mu.Lock()
			if j >= st.limit {
				st.mu.Unlock()
				return
			}
			st.next = j
			st.mu.Unlock()
			if st.orphaned() && f.abandon(st, j) {
				return
			}
			c := st.items[j].c
			err := f.pace(ctx, st, c)
			var raw []byte
			if err == nil {
				raw = getBuf(int(c.CompressedSize))
				_, err = io.ReadFull(rc, raw)
			}
			if !send(piece{i: j, n: 1, raw: raw, err: err}) || err != nil {
				return
			}
		}
	}
	return f.pipeline(st, i, read, func(p piece, writes chan<- verified) {
		if v, ok := f.verify(ctx, st, st.items[p.i], p.raw); ok {
			writes <- v
		}
	})
}

// pipeline runs a stream's pipeline from item i, shared by pump and
// pumpZran: read, the network stage, runs in a goroutine of its own and
// passes each piece to send, which reports false (having put its buffer
// back) once the pipeline stopped; read returns after a piece with an
// error. handle, the verify stage, hands out a piece's chunks and passes
// them on to the cache writer. pipeline returns the index of the first
// item not handled and the error that stopped read short, if any; every
// chunk handled has left flight when it returns.
func (f *Fetcher) pipeline(st *stream, i int, read func(send func(piece) bool), handle func(piece, chan<- verified)) (int, error) {
	pieces := make(chan piece, pumpDepth)
	stop := make(chan struct{})
	go func() {
		defer close(pieces)
		read(func(p piece) bool {
			select {
			case pieces <- p:
				return true
			case <-stop:
				if p.raw != nil {
					putBuf(p.raw)
				}
				return false
			}
		})
	}()
	w := f.startWriter(st.bs)
	defer func() {
		close(stop)
		w.close()
	}()
	next := i
	for p := range pieces {
		if p.err != nil {
			if p.raw != nil {
				putBuf(p.raw)
			}
			return p.i, p.err
		}
		handle(p, w.ch)
		next = p.i + p.n
	}
	return next, nil
}

// writer is a stream pipeline's last stage: it writes verified chunks to
// the cache in order (after which they leave flight), so that the stages
// before it never wait for the disk.
type writer struct {
	ch   chan verified
	done chan struct{}
}

func (f *Fetcher) startWriter(bs *blobState) *writer {
	w := &writer{ch: make(chan verified, pumpDepth), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for v := range w.ch {
			f.keep(bs, v)
		}
	}()
	return w
}

// close returns once every chunk sent has been written.
func (w *writer) close() {
	close(w.ch)
	<-w.done
}

// pace holds a prefetch stream back: to its bandwidth, and while on-demand
// reads are in progress that do not wait for it.
func (f *Fetcher) pace(ctx context.Context, st *stream, c *rafs.Chunk) error {
	return f.paceBytes(ctx, st, uint64(c.CompressedSize))
}

// paceBytes is pace for n bytes of the stream.
func (f *Fetcher) paceBytes(ctx context.Context, st *stream, n uint64) error {
	if !st.prefetch {
		return ctx.Err()
	}
	for f.demand.Load() > 0 && st.waiters.Load() == 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	if st.waiters.Load() > 0 {
		// An on-demand reader waits on this stream: bandwidth_rate is for
		// prefetch, not for it.
		return ctx.Err()
	}
	if err := st.lim.wait(ctx, n); err != nil {
		return err
	}
	return ctx.Err()
}

// verified is a chunk handed out to its readers and waiting to be
// written to the cache.
type verified struct {
	cl     *call
	stored []byte // as fetched (compressed cache)
	data   []byte
}

// verify verifies one chunk's stored bytes (refetching it alone once if
// they fail) and publishes the result. stored is a pooled buffer it
// takes over. ok reports that the chunk was handed out and must now be
// passed to keep; otherwise it failed and left flight.
func (f *Fetcher) verify(ctx context.Context, st *stream, cl *call, stored []byte) (v verified, ok bool) {
	bs, b, c := st.bs, st.bs.blob, cl.c
	if st.prefetch {
		f.m.prefetchBytes.Add(float64(len(stored)))
		f.stats.prefetchBytes.Add(uint64(len(stored)))
	}
	data, err := decode(b, c, stored)
	if err != nil {
		putBuf(stored)
		data, stored, err = f.refetch(ctx, b, c, err)
	} else {
		cl.pooled = true
	}
	if err != nil {
		cl.err = f.chunkFailed(b, c, err)
		f.finish(bs, cl)
		cl.release()
		return verified{}, false
	}
	cl.data = data
	// Waiters copy the bytes while they are written; the chunk stays in
	// flight until they are, so nobody fetches it again meanwhile.
	close(cl.done)
	return verified{cl, stored, data}, true
}

// keep writes a verified chunk to the cache (if it can be cached) and
// takes it out of flight.
func (f *Fetcher) keep(bs *blobState, v verified) {
	cl, c := v.cl, v.cl.c
	if bs.cacheable(c, f.compressed) {
		w := blobcache.Write{Index: c.Index, Off: int64(c.UncompressedOffset), Data: v.data}
		if f.compressed {
			w.Off, w.Data = int64(c.CompressedOffset), v.stored
		}
		if werr := bs.cache.WriteChunks([]blobcache.Write{w}); werr != nil {
			f.m.cacheWriteFails.Inc()
			f.log.Warn("storage: caching chunk failed", "blob", bs.blob.ID, "chunk", c.Index, "err", werr)
		}
	}
	if cl.pooled && c.Compressed {
		putBuf(v.stored) // data is a buffer of its own
	}
	f.finish(bs, cl)
	cl.release()
}

// decode is rafs.DecodeChunkBytes into a pooled buffer: the verified
// uncompressed bytes of a chunk from its stored bytes (which it returns
// as they are for a chunk stored uncompressed; zran chunks get a buffer
// of their own).
func decode(b *rafs.Blob, c *rafs.Chunk, stored []byte) ([]byte, error) {
	var buf []byte
	if c.Compressed && b.Zran == nil {
		buf = getBuf(int(c.UncompressedSize))
	}
	data, err := rafs.DecodeChunkInto(b, c, stored, buf)
	if err != nil && buf != nil {
		putBuf(buf)
	}
	return data, err
}

// raGrowth is how many times its history a sequential window is (the
// kernel's ramp-up factor for small windows).
const raGrowth = 4

package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/storage/backend"
)

// streamBackend is a real localfs backend whose streams the test steers:
// they can stall before a blob offset until released, or break there (and
// the backend then refuses everything until revived).
type streamBackend struct {
	*backend.LocalFS
	mu      sync.Mutex
	opens   [][2]int64 // ranges of opened streams
	reads   [][2]int64 // ranges of ReadAt calls
	stallAt int64      // -1: none
	release chan struct{}
	dieAt   int64 // -1: none
	dieOnce bool  // breaking there does not take the backend down
	dead    bool
	// pace, if set, makes streams slow: reads of at most 64 KiB, each
	// after this long.
	pace     time.Duration
	streamed int64 // bytes read from streams
}

func newStreamBackend(t *testing.T, dir string) *streamBackend {
	cfg := parseConfig(t, localConfig(dir, "", "", false, false, 0))
	return &streamBackend{LocalFS: backend.NewLocalFS(*cfg.Backend.LocalFS, backend.Hooks{}), stallAt: -1, dieAt: -1, release: make(chan struct{})}
}

var errBackendDown = errors.New("test backend down")

func (s *streamBackend) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	s.mu.Lock()
	s.reads = append(s.reads, [2]int64{off, int64(len(p))})
	dead := s.dead
	s.mu.Unlock()
	if dead {
		return &backend.ReadError{Backend: "test", BlobID: id, Off: off, Len: len(p), Err: errBackendDown}
	}
	return s.LocalFS.ReadAt(ctx, id, p, off)
}

func (s *streamBackend) OpenRange(ctx context.Context, id string, off, n int64) (io.ReadCloser, error) {
	s.mu.Lock()
	s.opens = append(s.opens, [2]int64{off, n})
	dead := s.dead
	s.mu.Unlock()
	if dead {
		return nil, &backend.ReadError{Backend: "test", BlobID: id, Off: off, Len: int(n), Err: errBackendDown}
	}
	rc, err := s.LocalFS.OpenRange(ctx, id, off, n)
	if err != nil {
		return nil, err
	}
	return &steeredReader{s: s, rc: rc, pos: off, ctx: ctx}, nil
}

func (s *streamBackend) counts() (opens, reads int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.opens), len(s.reads)
}

type steeredReader struct {
	s   *streamBackend
	rc  io.ReadCloser
	pos int64
	ctx context.Context
}

func (r *steeredReader) Read(p []byte) (int, error) {
	r.s.mu.Lock()
	stall, die := r.s.stallAt, r.s.dieAt
	r.s.mu.Unlock()
	if stall >= 0 && r.pos == stall {
		select {
		case <-r.s.release:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
	if die >= 0 && r.pos == die {
		r.s.mu.Lock()
		if r.s.dieOnce {
			r.s.dieAt = -1
		} else {
			r.s.dead = true
		}
		r.s.mu.Unlock()
		return 0, errBackendDown
	}
	// Never read across a point the test steers at.
	for _, at := range []int64{stall, die} {
		if at > r.pos && int64(len(p)) > at-r.pos {
			p = p[:at-r.pos]
		}
	}
	r.s.mu.Lock()
	pace := r.s.pace
	r.s.mu.Unlock()
	if pace > 0 {
		p = p[:min(len(p), 64<<10)]
		select {
		case <-time.After(pace):
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
	n, err := r.rc.Read(p)
	r.pos += int64(n)
	r.s.mu.Lock()
	r.s.streamed += int64(n)
	r.s.mu.Unlock()
	return n, err
}

func (r *steeredReader) Close() error { return r.rc.Close() }

// streamFixture is an 8-chunk image served through a streamBackend with a
// cache and a 4 MiB batch, so one read's window covers the whole blob.
func streamFixture(t *testing.T, comp codec.Compressor) (*testImage, *streamBackend, *Fetcher, string) {
	ti := buildImage(t, makeContent(40, 8*256<<10), 256<<10, comp)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	be := newStreamBackend(t, dir)
	f, _ := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 4<<20)), WithBackend(be))
	if err := f.AddImage(ti.img); err != nil {
		t.Fatal(err)
	}
	return ti, be, f, dir
}

// readChunk reads chunk i of the file whole and checks its bytes, with a
// deadline so that a reader stuck behind a stalled stream fails the test.
func readChunk(t *testing.T, ti *testImage, f *Fetcher, i int) error {
	t.Helper()
	fc := ti.file().Chunks[i]
	p := make([]byte, fc.UncompressedSize)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := f.ReadChunkAt(ctx, ti.img.Blobs[0], fc.Chunk, p, 0)
	if err == nil && !bytes.Equal(p, ti.content[fc.FileOffset:fc.FileOffset+uint64(len(p))]) {
		t.Fatalf("chunk %d: wrong bytes", i)
	}
	return err
}

// TestStreamHandsOutChunksAsTheyArrive: the readers of a window's first
// chunks get them while the rest of the one request is still stalled, and
// the chunks behind the stall are in flight (joined, not fetched again).
func TestStreamHandsOutChunksAsTheyArrive(t *testing.T) {
	ti, be, f, _ := streamFixture(t, codec.Zstd)
	be.stallAt = int64(ti.file().Chunks[3].CompressedOffset)
	for i := range 3 {
		if err := readChunk(t, ti, f, i); err != nil {
			t.Fatalf("chunk %d while the stream stalls at chunk 3: %v", i, err)
		}
	}
	bs, _ := f.state(ti.img.Blobs[0])
	bs.mu.Lock()
	_, inflight := bs.inflight[ti.file().Chunks[5].CompressedOffset]
	bs.mu.Unlock()
	if !inflight {
		t.Fatal("chunk 5 is not in flight in the window")
	}
	done := make(chan error, 1)
	go func() { done <- readChunk(t, ti, f, 5) }()
	select {
	case err := <-done:
		t.Fatalf("chunk 5 read returned %v before the stream passed the stall", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(be.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ti.readAll(t, f), ti.content) {
		t.Fatal("wrong bytes")
	}
	settle(f)
	if opens, reads := be.counts(); opens != 1 || reads != 0 {
		t.Fatalf("%d streams and %d reads for one window, want 1 and 0 (%v)", opens, reads, be.opens)
	}
	if r, n := f.CacheBlob(ti.img.Blobs[0]).Ready(); r != n {
		t.Fatalf("%d/%d chunks cached", r, n)
	}
}

// TestStreamCorruptChunk: a bad chunk in the middle of a stream fails
// alone, after one refetch; the stream delivers and caches the chunks
// after it.
func TestStreamCorruptChunk(t *testing.T) {
	for _, comp := range []codec.Compressor{codec.None, codec.Zstd} {
		t.Run(comp.String(), func(t *testing.T) {
			ti := buildImage(t, makeContent(41, 8*256<<10), 256<<10, comp)
			dir := t.TempDir()
			blobPath := ti.writeBlob(t, dir)
			bad := ti.file().Chunks[3]
			flipByte(t, blobPath, int64(bad.CompressedOffset)+int64(bad.CompressedSize)/3)
			be := newStreamBackend(t, dir)
			f, reg := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 4<<20)), WithBackend(be))
			addImage(t, f, ti.img)
			if err := readChunk(t, ti, f, 0); err != nil {
				t.Fatal(err)
			}
			settle(f)
			if err := readChunk(t, ti, f, 3); rafs.Errno(err) != syscall.EIO {
				t.Fatalf("corrupt chunk: %v, want EIO", err)
			}
			for _, i := range []int{1, 2, 4, 7} {
				if err := readChunk(t, ti, f, i); err != nil {
					t.Fatalf("chunk %d next to a corrupt one: %v", i, err)
				}
			}
			settle(f)
			cb := f.CacheBlob(ti.img.Blobs[0])
			if cb.Has(bad.Index) {
				t.Fatal("corrupt chunk cached")
			}
			if r, n := cb.Ready(); r != n-1 {
				t.Fatalf("%d/%d cached, want all but the bad one", r, n)
			}
			// One stream for the window + one refetch of the bad chunk;
			// the later read of chunk 3: one more stream + refetch.
			opens, reads := be.counts()
			if opens != 2 || reads != 2 {
				t.Fatalf("%d streams, %d reads (%v %v), want 2 and 2", opens, reads, be.opens, be.reads)
			}
			if n := metric(t, reg, "rafsd_chunk_digest_failures_total", map[string]string{"source": "backend"}); n != 4 {
				t.Fatalf("digest failures %v, want 4", n)
			}
		})
	}
}

// TestStreamBackendDies: the backend breaks in the middle of a stream:
// the chunks before the break are served and cached, the rest fail with
// EIO (one reopen is tried and fails), and once the backend is back the
// same chunks read fine.
func TestStreamBackendDies(t *testing.T) {
	ti, be, f, _ := streamFixture(t, codec.Zstd)
	be.dieAt = int64(ti.file().Chunks[4].CompressedOffset)
	if err := readChunk(t, ti, f, 0); err != nil {
		t.Fatal(err)
	}
	settle(f)
	for i := range 8 {
		err := readChunk(t, ti, f, i)
		if i < 4 && err != nil {
			t.Fatalf("chunk %d before the break: %v", i, err)
		}
		if i >= 4 && (rafs.Errno(err) != syscall.EIO || !errors.Is(err, errBackendDown)) {
			t.Fatalf("chunk %d after the break: %v, want EIO from the dead backend", i, err)
		}
	}
	if opens, _ := be.counts(); opens < 2 {
		t.Fatalf("%d streams: the broken one was not reopened", opens)
	}
	be.mu.Lock()
	be.dead, be.dieAt = false, -1
	be.mu.Unlock()
	if !bytes.Equal(ti.readAll(t, f), ti.content) {
		t.Fatal("wrong bytes after the backend came back")
	}
}

// TestReadAfterFailureFetchesAnew: a failed chunk stays in flight for a
// moment after its readers got the error (finish wakes them first, then
// takes the call out). A read that comes in that moment, after the
// failure, must fetch the chunk anew, not get the old error: that is how
// TestStreamBackendDies once failed under load, its read after the
// backend came back joining the last failed call.
func TestReadAfterFailureFetchesAnew(t *testing.T) {
	for _, tc := range []struct {
		name string
		read func(ti *testImage, f *Fetcher, c *rafs.Chunk) error
	}{
		{"ReadChunkAt", func(ti *testImage, f *Fetcher, c *rafs.Chunk) error { return readChunk(t, ti, f, int(c.Index)) }},
		{"EnsureChunks", func(ti *testImage, f *Fetcher, c *rafs.Chunk) error {
			return f.EnsureChunks(context.Background(), ti.img.Blobs[0], []*rafs.Chunk{c})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ti, be, f, _ := streamFixture(t, codec.Zstd)
			c := ti.file().Chunks[2].Chunk
			bs, err := f.state(ti.img.Blobs[0])
			if err != nil {
				t.Fatal(err)
			}
			// A fetch of c whose failure was handed out and which finish
			// has not yet taken out of flight.
			bs.mu.Lock()
			stale := f.newStream(bs, []*rafs.Chunk{c}, false).items[0]
			bs.mu.Unlock()
			stale.err = fmt.Errorf("an earlier failure: %w", syscall.EIO)
			close(stale.done)
			if err := tc.read(ti, f, c); err != nil {
				t.Fatalf("read after the failure: %v", err)
			}
			f.finish(bs, stale) // late: must leave the new fetch alone
			settle(f)
			if !f.CacheBlob(ti.img.Blobs[0]).Has(c.Index) {
				t.Fatal("chunk not cached by the new fetch")
			}
			if opens, _ := be.counts(); opens != 1 {
				t.Fatalf("%d streams, want 1 (the new fetch)", opens)
			}
		})
	}
}

// TestStreamReopened: a stream that breaks once after some progress is
// reopened where it stopped and every reader gets its bytes.
func TestStreamReopened(t *testing.T) {
	ti, be, f, _ := streamFixture(t, codec.LZ4Block)
	be.dieAt, be.dieOnce = int64(ti.file().Chunks[5].CompressedOffset), true
	if !bytes.Equal(ti.readAll(t, f), ti.content) {
		t.Fatal("wrong bytes")
	}
	settle(f)
	if len(be.opens) != 2 || be.opens[1][0] != int64(ti.file().Chunks[5].CompressedOffset) {
		t.Fatalf("streams %v, want the window and its reopening at chunk 5", be.opens)
	}
}

// TestEnsureChunksOneRequestPerRun: EnsureChunks (the kernel modes' fill)
// fetches each contiguous run of missing chunks with one request, even
// for chunks the fetcher has no index of.
func TestEnsureChunksOneRequestPerRun(t *testing.T) {
	ti := buildImage(t, makeContent(42, 16*64<<10), 64<<10, codec.Zstd)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	be := newStreamBackend(t, dir)
	// amplify_io 64 KiB (one chunk): the runs are merged by EnsureChunks
	// itself, not by amplification.
	f, _ := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 64<<10)), WithBackend(be))
	fcs := ti.file().Chunks
	var chunks []*rafs.Chunk
	for _, i := range []int{2, 3, 4, 5, 6, 9, 10, 13} {
		chunks = append(chunks, fcs[i].Chunk)
	}
	// Chunk 4 is cached already: runs 2-3, 5-6, 9-10, 13.
	if err := f.EnsureChunks(context.Background(), ti.img.Blobs[0], []*rafs.Chunk{fcs[4].Chunk}); err != nil {
		t.Fatal(err)
	}
	settle(f)
	be.mu.Lock()
	be.opens = nil
	be.mu.Unlock()
	if err := f.EnsureChunks(context.Background(), ti.img.Blobs[0], chunks); err != nil {
		t.Fatal(err)
	}
	cb := f.CacheBlob(ti.img.Blobs[0])
	for _, c := range chunks {
		if !cb.Has(c.Index) {
			t.Fatalf("chunk %d not cached after EnsureChunks", c.Index)
		}
		p := make([]byte, c.UncompressedSize)
		cb.ReadAt(p, int64(c.UncompressedOffset))
		if !bytes.Equal(p, ti.content[c.UncompressedOffset:c.UncompressedOffset+uint64(len(p))]) {
			t.Fatalf("chunk %d: wrong bytes in the cache file", c.Index)
		}
	}
	settle(f)
	if opens, _ := be.counts(); opens != 4 {
		t.Fatalf("%d requests (%v) for 4 runs", opens, be.opens)
	}
}

// TestReadahead: a sequential reader's requests grow (read-ahead) up to
// the limit; random readers' stay at the batch size.
func TestReadahead(t *testing.T) {
	const chunk = 64 << 10
	ti := buildImage(t, makeContent(43, 96*chunk), chunk, codec.None)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	t.Run("sequential", func(t *testing.T) {
		be := newStreamBackend(t, dir)
		f, reg := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(t.TempDir(), "cache"), false, false, chunk)), WithBackend(be), WithReadahead(1<<20))
		addImage(t, f, ti.img)
		p := make([]byte, 16<<10)
		for off := 0; off < len(ti.content); off += len(p) {
			if _, err := ti.img.ReadAt(context.Background(), f, ti.file(), p, int64(off)); err != nil || !bytes.Equal(p, ti.content[off:off+len(p)]) {
				t.Fatalf("read at %d: %v", off, err)
			}
		}
		settle(f)
		var biggest int64
		for _, o := range be.opens {
			biggest = max(biggest, o[1])
			if o[1] > 1<<20 {
				t.Fatalf("request of %d bytes beyond the 1 MiB read-ahead limit", o[1])
			}
		}
		if len(be.opens) > 12 || biggest != 1<<20 {
			t.Fatalf("%d requests for 96 chunks read in order, biggest %d: %v", len(be.opens), biggest, be.opens)
		}
		if metric(t, reg, "rafsd_fetch_readahead_windows_total", nil) == 0 {
			t.Fatal("no read-ahead window counted")
		}
	})
	t.Run("stops at the file's end", func(t *testing.T) {
		// The first 40 chunks as a file of their own: the blob's other
		// 56 chunks belong to files nobody reads.
		file := *ti.file()
		file.Chunks, file.Size = file.Chunks[:40], 40*chunk
		be := newStreamBackend(t, dir)
		f, _ := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(t.TempDir(), "cache"), false, false, chunk)), WithBackend(be), WithReadahead(1<<20))
		addImage(t, f, ti.img)
		p := make([]byte, 16<<10)
		for off := 0; off < int(file.Size); off += len(p) {
			if _, err := ti.img.ReadAt(context.Background(), f, &file, p, int64(off)); err != nil || !bytes.Equal(p, ti.content[off:off+len(p)]) {
				t.Fatalf("read at %d: %v", off, err)
			}
		}
		settle(f)
		end := int64(file.Chunks[39].CompressedOffset) + int64(file.Chunks[39].CompressedSize)
		for _, o := range be.opens {
			if o[0]+o[1] > end {
				t.Fatalf("request [%d,+%d) reads past the file's end %d: %v", o[0], o[1], end, be.opens)
			}
		}
		if len(be.opens) > 8 {
			t.Fatalf("%d requests for 40 chunks read in order: %v", len(be.opens), be.opens)
		}
	})
	t.Run("random", func(t *testing.T) {
		be := newStreamBackend(t, dir)
		f, _ := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(t.TempDir(), "cache"), false, false, chunk)), WithBackend(be), WithReadahead(1<<20))
		addImage(t, f, ti.img)
		for _, i := range []int{50, 10, 70, 30, 90} {
			if err := readChunk(t, ti, f, i); err != nil {
				t.Fatal(err)
			}
		}
		settle(f)
		for _, o := range be.opens {
			if o[1] != chunk {
				t.Fatalf("random reads made a request of %d bytes: %v", o[1], be.opens)
			}
		}
	})
}

// TestStreamSplit: a reader of a chunk far beyond a stalled stream's
// position does not wait behind it: it takes the tail of the window with
// a request of its own.
func TestStreamSplit(t *testing.T) {
	defer func(d uint64) { splitDistance = d }(splitDistance)
	splitDistance = 1 << 20
	ti := buildImage(t, makeContent(44, 16*256<<10), 256<<10, codec.None)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	be := newStreamBackend(t, dir)
	be.stallAt = int64(ti.file().Chunks[1].CompressedOffset)
	f, reg := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 4<<20)), WithBackend(be))
	addImage(t, f, ti.img)
	if err := readChunk(t, ti, f, 0); err != nil {
		t.Fatal(err)
	}
	// Chunk 2 is near the stall: its reader waits.
	near := make(chan error, 1)
	go func() { near <- readChunk(t, ti, f, 2) }()
	// Chunk 12 is 3 MiB beyond it: its reader splits the stream.
	if err := readChunk(t, ti, f, 12); err != nil {
		t.Fatalf("far chunk behind a stalled stream: %v", err)
	}
	select {
	case err := <-near:
		t.Fatalf("near chunk returned %v during the stall", err)
	default:
	}
	close(be.release)
	if err := <-near; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ti.readAll(t, f), ti.content) {
		t.Fatal("wrong bytes")
	}
	settle(f)
	if len(be.opens) != 2 || be.opens[1][0] != int64(ti.file().Chunks[12].CompressedOffset) {
		t.Fatalf("streams %v, want the window and its tail from chunk 12", be.opens)
	}
	if n := metric(t, reg, "rafsd_fetch_stream_splits_total", nil); n != 1 {
		t.Fatalf("%v splits counted", n)
	}
	if r, n := f.CacheBlob(ti.img.Blobs[0]).Ready(); r != n {
		t.Fatalf("%d/%d cached", r, n)
	}
}

// TestPrefetchBandwidth: prefetch streams keep to bandwidth_rate (the
// first second's worth is the burst).
func TestPrefetchBandwidth(t *testing.T) {
	ti := buildImage(t, makeContent(45, 3<<20), 128<<10, codec.None)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	js := fmt.Sprintf(`{"device":{"backend":{"type":"localfs","config":{"dir":%q}},
		"cache":{"type":"blobcache","config":{"work_dir":%q}}},
		"mode":"direct","fs_prefetch":{"enable":true,"threads_count":2,"merging_size":1048576,"bandwidth_rate":2097152,"prefetch_all":true}}`,
		dir, filepath.Join(dir, "cache"))
	be := newStreamBackend(t, dir)
	f, _ := newFetcher(t, parseConfig(t, js), WithBackend(be))
	start := time.Now()
	if err := f.Prefetch(context.Background(), ti.img); err != nil {
		t.Fatal(err)
	}
	f.WaitPrefetch()
	// 3 MiB at 2 MiB/s with a 2 MiB burst: at least half a second.
	if took := time.Since(start); took < 400*time.Millisecond {
		t.Fatalf("3 MiB prefetched in %s at 2 MiB/s", took)
	}
	if r, n := f.CacheBlob(ti.img.Blobs[0]).Ready(); r != n {
		t.Fatalf("%d/%d cached", r, n)
	}
	if opens, reads := be.counts(); opens != 1 || reads != 0 {
		t.Fatalf("prefetch_all of a 3 MiB blob: %d streams, %d reads; want one stream", opens, reads)
	}
}

// TestReadaheadCancelled: a read-ahead stream whose reader has left is
// stopped where it is instead of running to its window's end: after the
// reader went quiet (and, second case, after its context ended while it
// waited), the backend delivers only part of the window, and the chunks
// left out are fetched normally by a later read.
func TestReadaheadCancelled(t *testing.T) {
	// Set before each case's fetcher exists (its streams read it).
	defer func(d time.Duration) { raIdle = d }(raIdle)
	const chunk = 64 << 10
	ti := buildImage(t, makeContent(46, 128*chunk), chunk, codec.None)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	setup := func(t *testing.T) (*streamBackend, *Fetcher, *prometheus.Registry) {
		be := newStreamBackend(t, dir)
		f, reg := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(t.TempDir(), "cache"), false, false, chunk)), WithBackend(be), WithReadahead(8<<20))
		addImage(t, f, ti.img)
		return be, f, reg
	}
	// check waits for the fetcher's streams to end, then checks that the
	// backend stopped at least short bytes before the end of the windows
	// it was asked for, that a cancellation was counted, and that
	// everything still reads right.
	check := func(t *testing.T, be *streamBackend, f *Fetcher, reg *prometheus.Registry, short int64) {
		t.Helper()
		settle(f)
		be.mu.Lock()
		var asked int64
		for _, o := range be.opens {
			asked += o[1]
		}
		streamed := be.streamed
		be.pace = 0
		be.mu.Unlock()
		t.Logf("backend streamed %d of the %d bytes asked for (%v)", streamed, asked, be.opens)
		if streamed > asked-short {
			t.Fatalf("backend delivered %d of the %d bytes its streams asked for: read-ahead ran on without its reader (%v)", streamed, asked, be.opens)
		}
		if n := metric(t, reg, "rafsd_fetch_readahead_cancelled_total", nil); n == 0 {
			t.Fatal("no cancelled read-ahead counted")
		}
		if !bytes.Equal(ti.readAll(t, f), ti.content) {
			t.Fatal("wrong bytes after a cancelled read-ahead")
		}
	}
	t.Run("reader went quiet", func(t *testing.T) {
		raIdle = 200 * time.Millisecond
		be, f, reg := setup(t)
		be.pace = 10 * time.Millisecond // ~6 MiB/s: a 6 MiB window takes ~1 s
		// Read the first 8 chunks in order: the windows grow, the last one
		// started runs far beyond what is read.
		for i := range 8 {
			if err := readChunk(t, ti, f, i); err != nil {
				t.Fatal(err)
			}
		}
		// The last window is 6 MiB, about a second of the paced backend.
		check(t, be, f, reg, 2<<20)
	})
	t.Run("reader's context ended", func(t *testing.T) {
		// Only the reader's leaving can stop a stream.
		raIdle = time.Hour
		be, f, reg := setup(t)
		be.pace = 10 * time.Millisecond
		for i := range 3 {
			if err := readChunk(t, ti, f, i); err != nil {
				t.Fatal(err)
			}
		}
		// The next window's reader gives up while it waits for a chunk
		// deep inside the read-ahead.
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		fc := ti.file().Chunks[12]
		err := f.ReadChunkAt(ctx, ti.img.Blobs[0], fc.Chunk, make([]byte, chunk), 0)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("read with an ending context: %v", err)
		}
		// Its window runs to chunk 25: 12 chunks behind the one waited for.
		check(t, be, f, reg, 8*chunk)
	})
}

// TestPrefetchYieldsToFarRead: an on-demand read of a chunk far ahead of a
// running, throttled prefetch_all stream completes while the prefetch is
// still running (it does not wait for the prefetch to reach its chunk),
// and the prefetch still completes afterwards.
func TestPrefetchYieldsToFarRead(t *testing.T) {
	const chunk = 128 << 10
	ti := buildImage(t, makeContent(47, 32*chunk), chunk, codec.None)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	// 4 MiB at 1 MiB/s with a 1 MiB burst: about 3 s of prefetch.
	js := fmt.Sprintf(`{"device":{"backend":{"type":"localfs","config":{"dir":%q}},
		"cache":{"type":"blobcache","config":{"work_dir":%q}}},
		"mode":"direct","fs_prefetch":{"enable":true,"threads_count":1,"merging_size":131072,"bandwidth_rate":1048576,"prefetch_all":true}}`,
		dir, filepath.Join(dir, "cache"))
	be := newStreamBackend(t, dir)
	f, _ := newFetcher(t, parseConfig(t, js), WithBackend(be))
	if err := f.Prefetch(context.Background(), ti.img); err != nil {
		t.Fatal(err)
	}
	cb := f.CacheBlob(ti.img.Blobs[0])
	deadline := time.Now().Add(20 * time.Second)
	for r, _ := cb.Ready(); r == 0; r, _ = cb.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("prefetch did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The last chunk: 4 MiB ahead, ~3 s away at the prefetch's rate.
	start := time.Now()
	if err := readChunk(t, ti, f, 31); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	ready, total := cb.Ready()
	if ready >= total-1 || f.stats.prefetchEnd.Load() != 0 {
		t.Fatalf("the far read took %s and returned after the prefetch (%d/%d cached): it waited for the prefetch", took, ready, total)
	}
	t.Logf("far read took %s with %d/%d chunks prefetched", took, ready, total)
	f.WaitPrefetch()
	if r, n := cb.Ready(); r != n {
		t.Fatalf("prefetch did not complete after the far read: %d/%d cached", r, n)
	}
	if !bytes.Equal(ti.readAll(t, f), ti.content) {
		t.Fatal("wrong bytes")
	}
}

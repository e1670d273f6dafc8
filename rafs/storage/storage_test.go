package storage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/storage/backend"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
	"golang.org/x/sys/unix"
)

func localConfig(blobDir, cacheType, workDir string, compressed, validate bool, batch int) string {
	cache := map[string]any{"type": cacheType, "compressed": compressed}
	if cacheType != "" {
		cache["config"] = map[string]any{"work_dir": workDir}
	}
	cfg := map[string]any{
		"device": map[string]any{
			"backend": map[string]any{"type": "localfs", "config": map[string]any{"dir": blobDir}},
			"cache":   cache,
		},
		"mode": "direct", "digest_validate": validate, "amplify_io": batch,
	}
	b, _ := json.Marshal(cfg)
	return string(b)
}

func TestReadRandomRanges(t *testing.T) {
	content := makeContent(1, 5<<20+12345)
	for _, comp := range []codec.Compressor{codec.None, codec.LZ4Block, codec.Gzip, codec.Zstd} {
		ti := buildImage(t, content, 256<<10, comp)
		for _, mode := range []struct {
			name                 string
			cache                string
			compressed, validate bool
		}{
			{"nocache", "", false, false},
			{"blobcache", "blobcache", false, false},
			{"blobcache-validate", "blobcache", false, true},
			{"blobcache-compressed", "blobcache", true, false},
		} {
			t.Run(fmt.Sprintf("%s/%s", comp, mode.name), func(t *testing.T) {
				dir := t.TempDir()
				ti.writeBlob(t, dir)
				f, reg := newFetcher(t, parseConfig(t, localConfig(dir, mode.cache, filepath.Join(dir, "cache"), mode.compressed, mode.validate, 1<<20)))
				if err := f.AddImage(ti.img); err != nil {
					t.Fatal(err)
				}
				r := rand.New(rand.NewSource(2))
				for pass := 0; pass < 2; pass++ {
					for range 60 {
						off := r.Intn(len(content))
						n := r.Intn(700 << 10)
						buf := make([]byte, n)
						got, err := ti.img.ReadAt(context.Background(), f, ti.file(), buf, int64(off))
						if err != nil && err != io.EOF {
							t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
						}
						if want := content[off:min(off+n, len(content))]; !bytes.Equal(buf[:got], want) {
							t.Fatalf("ReadAt(%d, %d): wrong bytes", off, n)
						}
					}
				}
				if !bytes.Equal(ti.readAll(t, f), content) {
					t.Fatal("whole-file read differs")
				}
				hits := metric(t, reg, "rafsd_blobcache_hits_total", nil)
				if mode.cache != "" && hits == 0 {
					t.Error("no cache hits on the second pass")
				}
				if mode.cache == "" && hits != 0 {
					t.Errorf("%v cache hits without a cache", hits)
				}
				if mode.cache != "" {
					settle(f) // the last chunks may still be being written
					bm := f.BlobcacheMetrics()
					if !bm.DataAllReady || bm.EntriesCount != uint64(ti.img.Blobs[0].ChunkCount) {
						t.Errorf("blobcache metrics %+v", bm)
					}
				}
				if bm := f.BackendMetrics(); bm.BackendType != "localfs" || bm.ReadCount == 0 || bm.ReadAmountTotal == 0 {
					t.Errorf("backend metrics %+v", bm)
				}
			})
		}
	}
}

// countingBackend counts the requests that reach a real backend.
type countingBackend struct {
	backend.Backend
	mu     sync.Mutex
	ranges [][2]int64
	gate   chan struct{} // if set, reads wait for it
}

func (c *countingBackend) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	c.mu.Lock()
	c.ranges = append(c.ranges, [2]int64{off, int64(len(p))})
	c.mu.Unlock()
	if c.gate != nil {
		<-c.gate
	}
	return c.Backend.ReadAt(ctx, id, p, off)
}

func (c *countingBackend) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.ranges)
}

func TestMergeAdjacentChunks(t *testing.T) {
	ti := buildImage(t, makeContent(3, 16*64<<10), 64<<10, codec.Zstd)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	cfg := parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 256<<10))
	be := &countingBackend{Backend: backend.NewLocalFS(*cfg.Backend.LocalFS, backend.Hooks{})}
	f, reg := newFetcher(t, cfg, WithBackend(be))
	if err := f.AddImage(ti.img); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ti.readAll(t, f), ti.content) {
		t.Fatal("wrong bytes")
	}
	var maxLen int64
	for _, r := range be.ranges {
		maxLen = max(maxLen, r[1])
		if r[1] > 256<<10 {
			t.Errorf("request of %d bytes exceeds the 256 KiB batch", r[1])
		}
	}
	if be.count() >= 16 || maxLen <= 64<<10 {
		t.Errorf("%d requests (max %d bytes) for 16 chunks: not merged", be.count(), maxLen)
	}
	if hits := metric(t, reg, "rafsd_blobcache_hits_total", nil); hits == 0 {
		t.Error("merged chunks were not served from the cache")
	}
}

func TestSingleFlight(t *testing.T) {
	ti := buildImage(t, makeContent(4, 4<<20), 1<<20, codec.LZ4Block)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	for _, cache := range []string{"", "blobcache"} {
		t.Run("cache="+cache, func(t *testing.T) {
			cfg := parseConfig(t, localConfig(dir, cache, filepath.Join(t.TempDir(), "cache"), false, true, 0))
			be := &countingBackend{Backend: backend.NewLocalFS(*cfg.Backend.LocalFS, backend.Hooks{}), gate: make(chan struct{})}
			f, _ := newFetcher(t, cfg, WithBackend(be))
			c := ti.file().Chunks[2]
			var wg sync.WaitGroup
			errs := make([]error, 64)
			bufs := make([][]byte, 64)
			for i := range 64 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					bufs[i] = make([]byte, 4096)
					errs[i] = f.ReadChunkAt(context.Background(), ti.img.Blobs[0], c.Chunk, bufs[i], uint32(i*1000))
				}()
			}
			// Let every reader reach the fetch before the one request returns.
			for f.demand.Load() < 64 {
				runtimeGosched()
			}
			close(be.gate)
			wg.Wait()
			for i := range 64 {
				if errs[i] != nil {
					t.Fatal(errs[i])
				}
				off := int(c.FileOffset) + i*1000
				if !bytes.Equal(bufs[i], ti.content[off:off+4096]) {
					t.Fatalf("reader %d: wrong bytes", i)
				}
			}
			if n := be.count(); n != 1 {
				t.Fatalf("64 readers of a cold chunk made %d backend requests, want 1", n)
			}
		})
	}
}

func TestCorruptCacheRefetched(t *testing.T) {
	ti := buildImage(t, makeContent(5, 2<<20), 256<<10, codec.Zstd)
	for _, compressed := range []bool{false, true} {
		t.Run(fmt.Sprint("compressed=", compressed), func(t *testing.T) {
			dir := t.TempDir()
			ti.writeBlob(t, dir)
			work := filepath.Join(dir, "cache")
			f, reg := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", work, compressed, true, 0)))
			ti.readAll(t, f)
			settle(f) // corrupt the cache only once everything is in it
			name := ti.id + blobcache.DataSuffix
			off := int64(ti.file().Chunks[3].UncompressedOffset + 100)
			if compressed {
				name = ti.id + blobcache.RawSuffix
				off = int64(ti.file().Chunks[3].CompressedOffset + 10)
			}
			flipByte(t, filepath.Join(work, name), off)
			if !bytes.Equal(ti.readAll(t, f), ti.content) {
				t.Fatal("wrong bytes after cache corruption")
			}
			if n := metric(t, reg, "rafsd_chunk_digest_failures_total", map[string]string{"source": "cache"}); n != 1 {
				t.Fatalf("cache digest failures = %v, want 1", n)
			}
			// The refetch repaired the cache.
			if !bytes.Equal(ti.readAll(t, f), ti.content) {
				t.Fatal("wrong bytes")
			}
			if n := metric(t, reg, "rafsd_chunk_digest_failures_total", map[string]string{"source": "cache"}); n != 1 {
				t.Fatalf("cache digest failures = %v after repair, want 1", n)
			}
		})
	}
}

func flipByte(t testing.TB, path string, off int64) {
	t.Helper()
	fh, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	b := make([]byte, 1)
	if _, err := fh.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := fh.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptBackendEIO(t *testing.T) {
	for _, comp := range []codec.Compressor{codec.None, codec.Zstd} {
		t.Run(comp.String(), func(t *testing.T) {
			ti := buildImage(t, makeContent(6, 2<<20), 256<<10, comp)
			dir := t.TempDir()
			blobPath := ti.writeBlob(t, dir)
			bad := ti.file().Chunks[2]
			flipByte(t, blobPath, int64(bad.CompressedOffset)+int64(bad.CompressedSize)/2)
			work := filepath.Join(dir, "cache")
			f, reg := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", work, false, false, 1<<20)))
			addImage(t, f, ti.img)
			buf := make([]byte, len(ti.content))
			n, err := ti.img.ReadAt(context.Background(), f, ti.file(), buf, 0)
			if err == nil || rafs.Errno(err) != syscall.EIO || !errors.Is(err, codec.ErrDigestMismatch) && !errors.Is(err, codec.ErrCorrupt) {
				t.Fatalf("read over a corrupt chunk: %v (errno %v), want EIO", err, rafs.Errno(err))
			}
			if n != int(bad.FileOffset) || !bytes.Equal(buf[:n], ti.content[:n]) {
				t.Fatalf("read %d bytes before the bad chunk at %d", n, bad.FileOffset)
			}
			// The streamed fetch of chunks 0-3 (for the read of chunk 0)
			// finds chunk 2 bad, refetches it once and fails it: two failed
			// checks. The reader of chunk 2 either joined that fetch or,
			// if it had already failed, tries once more: two more.
			settle(f)
			if got := metric(t, reg, "rafsd_chunk_digest_failures_total", map[string]string{"source": "backend"}); got != 2 && got != 4 {
				t.Errorf("backend digest failures = %v, want 2 (joined) or 4 (fetched again)", got)
			}
			// The bad chunk never reaches the cache; its neighbours do.
			cb := f.CacheBlob(ti.img.Blobs[0])
			if cb.Has(bad.Index) || !cb.Has(bad.Index+1) {
				t.Errorf("cache bits: bad chunk %v, next %v", cb.Has(bad.Index), cb.Has(bad.Index+1))
			}
			next := ti.file().Chunks[3]
			p := make([]byte, 1000)
			if _, err := ti.img.ReadAt(context.Background(), f, ti.file(), p, int64(next.FileOffset)); err != nil || !bytes.Equal(p, ti.content[next.FileOffset:next.FileOffset+1000]) {
				t.Fatalf("good chunk after a bad one: %v", err)
			}
		})
	}
}

func TestPrefetchAll(t *testing.T) {
	ti := buildImage(t, makeContent(7, 3<<20), 128<<10, codec.Zstd)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	js := fmt.Sprintf(`{"device":{"backend":{"type":"localfs","config":{"dir":%q}},
		"cache":{"type":"blobcache","config":{"work_dir":%q}}},
		"mode":"direct","fs_prefetch":{"enable":true,"threads_count":3,"merging_size":262144,"bandwidth_rate":0,"prefetch_all":true}}`,
		dir, filepath.Join(dir, "cache"))
	f, reg := newFetcher(t, parseConfig(t, js))
	ti.img.Prefetch = []uint64{2}
	if err := f.Prefetch(context.Background(), ti.img); err != nil {
		t.Fatal(err)
	}
	f.WaitPrefetch()
	ready, total := f.CacheBlob(ti.img.Blobs[0]).Ready()
	if ready != total {
		t.Fatalf("after prefetch %d/%d chunks cached", ready, total)
	}
	if q, d := metric(t, reg, "rafsd_prefetch_chunks_queued_total", nil), metric(t, reg, "rafsd_prefetch_chunks_done_total", nil); q != float64(total) || d != q {
		t.Errorf("prefetch queued %v done %v, want %d", q, d, total)
	}
	bm := f.BlobcacheMetrics()
	if bm.PrefetchDataAmount != uint64(len(ti.blob)) || bm.PrefetchEndTimeSecs == 0 {
		t.Errorf("blobcache metrics %+v", bm)
	}
	misses := metric(t, reg, "rafsd_blobcache_misses_total", nil)
	if !bytes.Equal(ti.readAll(t, f), ti.content) || metric(t, reg, "rafsd_blobcache_misses_total", nil) != misses {
		t.Fatal("reads after prefetch missed the cache")
	}
}

func TestLimiter(t *testing.T) {
	// A 1 MiB/s limiter with a 1 MiB burst owes 1s after 2 MiB.
	l := newLimiter(1<<20, 4096)
	l.wait(context.Background(), 1<<20)
	l.mu.Lock()
	owed := -l.tokens / l.rate
	l.mu.Unlock()
	if owed > 0.01 {
		t.Fatalf("burst not honoured: owes %vs", owed)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.wait(ctx, 1<<20); err == nil {
		t.Fatal("wait past the burst returned at once under a cancelled context")
	}
	if newLimiter(0, 4096) != nil {
		t.Fatal("rate 0 must be unlimited")
	}
}

func TestSharedStore(t *testing.T) {
	ti := buildImage(t, makeContent(8, 1<<20), 128<<10, codec.Zstd)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	cfg := parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 0))
	f1, _ := newFetcher(t, cfg)
	f2, reg2 := newFetcher(t, cfg)
	ti.readAll(t, f1)
	settle(f1)
	if f1.CacheBlob(ti.img.Blobs[0]) != f2.CacheBlob(ti.img.Blobs[0]) {
		t.Fatal("two fetchers of one work_dir hold different cache objects for one blob")
	}
	ti.readAll(t, f2)
	if m := metric(t, reg2, "rafsd_blobcache_misses_total", nil); m != 0 {
		t.Fatalf("second mount missed %v times on a blob the first cached", m)
	}
}

func TestBadReads(t *testing.T) {
	ti := buildImage(t, makeContent(9, 1<<20), 128<<10, codec.Zstd)
	dir := t.TempDir()
	f, _ := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 0)))
	c := ti.file().Chunks[0].Chunk
	// Past the chunk.
	if err := f.ReadChunkAt(context.Background(), ti.img.Blobs[0], c, make([]byte, 10), c.UncompressedSize-5); rafs.Errno(err) != syscall.EINVAL {
		t.Fatalf("read past chunk: %v", err)
	}
	// Blob missing from the backend.
	err := f.ReadChunkAt(context.Background(), ti.img.Blobs[0], c, make([]byte, 10), 0)
	if rafs.Errno(err) != syscall.EIO || !errors.Is(err, backend.ErrNotFound) {
		t.Fatalf("missing blob: %v", err)
	}
	// Truncated blob.
	os.WriteFile(filepath.Join(dir, ti.id), ti.blob[:len(ti.blob)/2], 0o644)
	f2, _ := newFetcher(t, parseConfig(t, localConfig(dir, "", "", false, false, 0)))
	last := ti.file().Chunks[len(ti.file().Chunks)-1].Chunk
	if err := f2.ReadChunkAt(context.Background(), ti.img.Blobs[0], last, make([]byte, 10), 0); rafs.Errno(err) != syscall.EIO {
		t.Fatalf("truncated blob: %v", err)
	}
}

// TestPrefetchYieldsToReads: while an on-demand read is in progress,
// prefetch sends nothing to the backend.
func TestPrefetchYieldsToReads(t *testing.T) {
	ti := buildImage(t, makeContent(15, 2<<20), 128<<10, codec.Zstd)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	js := fmt.Sprintf(`{"device":{"backend":{"type":"localfs","config":{"dir":%q}},
		"cache":{"type":"blobcache","config":{"work_dir":%q}}},
		"mode":"direct","amplify_io":0,"fs_prefetch":{"enable":true,"threads_count":4,"merging_size":131072,"prefetch_all":true}}`,
		dir, filepath.Join(dir, "cache"))
	cfg := parseConfig(t, js)
	gate := make(chan struct{})
	be := &countingBackend{Backend: backend.NewLocalFS(*cfg.Backend.LocalFS, backend.Hooks{}), gate: gate}
	f, _ := newFetcher(t, cfg, WithBackend(be))
	last := ti.file().Chunks[len(ti.file().Chunks)-1]
	done := make(chan error)
	go func() {
		done <- f.ReadChunkAt(context.Background(), ti.img.Blobs[0], last.Chunk, make([]byte, 10), 0)
	}()
	for be.count() == 0 {
		runtimeGosched()
	}
	if err := f.Prefetch(context.Background(), ti.img); err != nil {
		t.Fatal(err)
	}
	// Give prefetch every chance to jump ahead.
	for range 50 {
		runtimeGosched()
	}
	if n := be.count(); n != 1 {
		t.Fatalf("%d backend requests while an on-demand read was in progress, want only its own", n)
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	f.WaitPrefetch()
	if ready, total := f.CacheBlob(ti.img.Blobs[0]).Ready(); ready != total {
		t.Fatalf("prefetch resumed but cached %d/%d", ready, total)
	}
}

func TestNewRejects(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ js, want string }{
		{fmt.Sprintf(`{"version":2,"backend":{"type":"localfs","localfs":{"dir":%q}},"cache":{"type":"blobcache","filecache":{"work_dir":%q,"enable_encryption":true}}}`, dir, dir), "encryption"},
		{`{"device":{"backend":{"type":"oss","config":{"endpoint":"e","bucket_name":"b"}}}}`, `"oss" is not supported`},
		{`{"version":2}`, "no backend"},
	} {
		if _, err := New(parseConfig(t, tc.js)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%s) = %v, want %q", tc.js, err, tc.want)
		}
	}
}

// TestCacheDiskFull: with the cache on a filesystem that fills up (a
// 1 MiB tmpfs for a 4 MiB blob), every read still returns the right
// bytes (fetched, verified, handed out from memory when the cache write
// fails with ENOSPC), only the chunks that fit count as cached, and a
// kernel-mode fill, which needs the bytes in the cache file, fails with
// EIO rather than letting the kernel read a hole.
func TestCacheDiskFull(t *testing.T) {
	fstest.RequireRoot(t)
	ti := buildImage(t, makeContent(41, 4<<20), 256<<10, codec.None)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	work := filepath.Join(dir, "cache")
	if err := os.Mkdir(work, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", work, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(work, 0); err != nil {
			t.Errorf("unmount %s: %v", work, err)
		}
	})
	f, reg := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", work, false, false, 1<<20)))
	addImage(t, f, ti.img)
	for round := range 2 {
		if got := ti.readAll(t, f); !bytes.Equal(got, ti.content) {
			t.Fatalf("round %d: wrong bytes with the cache disk full", round)
		}
	}
	cb := f.CacheBlob(ti.img.Blobs[0])
	ready, total := cb.Ready()
	if ready == 0 || ready >= total {
		t.Fatalf("cached %d/%d chunks on a 1 MiB cache for a 4 MiB blob: want some, not all", ready, total)
	}
	// Every chunk that did not fit failed at least once per round (a
	// read-ahead and a read may each fetch one that is not cached).
	settle(f)
	if got, least := metric(t, reg, "rafsd_blobcache_write_errors_total", nil), float64(2*(total-ready)); got < least {
		t.Errorf("cache write errors = %v, want at least %v", got, least)
	}
	var missing []*rafs.Chunk
	for _, fc := range ti.file().Chunks {
		if !cb.Has(fc.Chunk.Index) {
			missing = append(missing, fc.Chunk)
		}
	}
	err := f.EnsureChunks(context.Background(), ti.img.Blobs[0], missing)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("EnsureChunks of %d chunks that cannot be cached: %v, want EIO", len(missing), err)
	}
}

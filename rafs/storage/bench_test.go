package storage

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

const benchSize = 256 << 20

// BenchmarkColdFetch reads a 256 MiB blob (1 MiB raw chunks) cold through
// the fetcher from a real registry (fetch, digest check, cache write) and,
// in the same iteration, two baselines with a plain HTTP client: one GET
// of the whole blob, and ranged GETs of the fetcher's request size by the
// same number of readers. It reports the time ratios fetcher/http (whole
// GET) and fetcher/ranged (same request pattern: the fetcher's own
// overhead). docker-registry answers each ranged GET in tens of ms, so the
// request size dominates fetcher/http.
func BenchmarkColdFetch(b *testing.B) {
	reg := registrytest.Start(b, registrytest.Options{})
	ti := buildImage(b, makeContent(31, benchSize), 1<<20, codec.None)
	reg.PushBlob(b, testRepo, ti.blob)
	url := reg.URL + "/v2/" + testRepo + "/blobs/sha256:" + ti.id
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	get := func(off, n int) error {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		if n > 0 {
			req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, err = io.Copy(io.Discard, resp.Body)
		return err
	}
	// parallel runs fn over readers disjoint parts of the blob in steps.
	parallel := func(readers, step int, fn func(off, n int) error) error {
		errs := make(chan error, readers)
		part := benchSize / readers
		for r := range readers {
			go func() {
				for off := r * part; off < (r+1)*part; off += step {
					if err := fn(off, min(step, (r+1)*part-off)); err != nil {
						errs <- err
						return
					}
				}
				errs <- nil
			}()
		}
		var first error
		for range readers {
			if err := <-errs; err != nil && first == nil {
				first = err
			}
		}
		return first
	}
	for _, tc := range []struct {
		cache          string
		readers, batch int
		shm            bool // cache on tmpfs: the fetcher without the disk
		// prefetch fetches the blob with prefetch_all (readers threads,
		// batch-sized requests) instead of reads.
		prefetch bool
	}{
		{"blobcache", 1, 32 << 20, false, false}, {"blobcache", 4, 8 << 20, false, false},
		{"blobcache", 1, 32 << 20, true, false}, {"blobcache", 4, 8 << 20, true, false},
		{"", 4, 1 << 20, false, false},
		{"blobcache", 4, 16 << 20, false, true}, {"blobcache", 4, 16 << 20, true, true},
	} {
		name := fmt.Sprintf("cache=%s/readers=%d/batch=%dM", tc.cache, tc.readers, tc.batch>>20)
		if tc.shm {
			name += "/tmpfs"
		}
		if tc.prefetch {
			name += "/prefetch"
		}
		b.Run(name, func(b *testing.B) {
			var httpTime, rangedTime, fetchTime time.Duration
			b.SetBytes(benchSize)
			for range b.N {
				start := time.Now()
				if err := get(0, 0); err != nil {
					b.Fatal(err)
				}
				httpTime += time.Since(start)

				start = time.Now()
				if err := parallel(tc.readers, tc.batch, get); err != nil {
					b.Fatal(err)
				}
				rangedTime += time.Since(start)

				work := b.TempDir()
				if tc.shm {
					d, err := os.MkdirTemp("/dev/shm", "rafsd-bench-")
					if err != nil {
						b.Skipf("no tmpfs: %v", err)
					}
					defer os.RemoveAll(d)
					work = d
				}
				cfg := parseConfig(b, registryConfig(reg.Addr, "", "", tc.cache, work, nil))
				cfg.Rafs.BatchSize = tc.batch
				cfg.Rafs.Validate = false
				if tc.prefetch {
					cfg.Cache.Prefetch = config.Prefetch{Enable: true, ThreadsCount: tc.readers, BatchSize: tc.batch, PrefetchAll: true}
				}
				f, _ := newFetcher(b, cfg)
				f.AddImage(ti.img)
				start = time.Now()
				var err error
				if tc.prefetch {
					err = f.Prefetch(context.Background(), ti.img)
					f.WaitPrefetch()
					if r, n := f.CacheBlob(ti.img.Blobs[0]).Ready(); err == nil && r != n {
						err = fmt.Errorf("prefetch cached %d/%d chunks", r, n)
					}
				} else {
					err = parallel(tc.readers, 1<<20, func(off, n int) error {
						buf := make([]byte, n)
						_, err := ti.img.ReadAt(context.Background(), f, ti.file(), buf, int64(off))
						return err
					})
				}
				if err != nil {
					b.Fatal(err)
				}
				fetchTime += time.Since(start)
				f.Close()
			}
			mib := float64(benchSize) * float64(b.N) / (1 << 20)
			b.ReportMetric(fetchTime.Seconds()/httpTime.Seconds(), "fetcher/http")
			b.ReportMetric(fetchTime.Seconds()/rangedTime.Seconds(), "fetcher/ranged")
			b.ReportMetric(mib/fetchTime.Seconds(), "fetcher-MiB/s")
			b.ReportMetric(mib/httpTime.Seconds(), "http-MiB/s")
		})
	}
}

// BenchmarkWarmRead reads a fully cached 256 MiB file through the fetcher
// and, in the same iteration, the cache data file directly with pread;
// it reports the time ratio fetcher/pread.
func BenchmarkWarmRead(b *testing.B) {
	ti := buildImage(b, makeContent(32, benchSize), 1<<20, codec.Zstd)
	dir := b.TempDir()
	ti.writeBlob(b, dir)
	work := filepath.Join(dir, "cache")
	f, _ := newFetcher(b, parseConfig(b, localConfig(dir, "blobcache", work, false, false, 8<<20)))
	f.AddImage(ti.img)
	ti.readAll(b, f) // warm
	data, err := os.Open(filepath.Join(work, ti.id+blobcache.DataSuffix))
	if err != nil {
		b.Fatal(err)
	}
	defer data.Close()
	buf := make([]byte, 128<<10)
	var direct, fetch time.Duration
	b.SetBytes(benchSize)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		for off := int64(0); off < benchSize; off += int64(len(buf)) {
			if _, err := data.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		direct += time.Since(start)
		start = time.Now()
		for off := int64(0); off < benchSize; off += int64(len(buf)) {
			if _, err := ti.img.ReadAt(context.Background(), f, ti.file(), buf, off); err != nil {
				b.Fatal(err)
			}
		}
		fetch += time.Since(start)
	}
	b.ReportMetric(fetch.Seconds()/direct.Seconds(), "fetcher/pread")
}

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
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
	"github.com/rafsd/rafsd/rafs/storage/internal/registrytest"
)

const benchSize = 256 << 20

// BenchmarkColdFetch reads a 256 MiB blob (1 MiB raw chunks) cold through
// the fetcher from a real registry (fetch, digest check, cache write with
// fdatasync) and, in the same iteration, with one plain HTTP GET of the
// same blob; it reports the time ratio fetcher/http.
func BenchmarkColdFetch(b *testing.B) {
	reg := registrytest.Start(b, registrytest.Options{})
	ti := buildImage(b, makeContent(31, benchSize), 1<<20, codec.None)
	reg.PushBlob(b, testRepo, ti.blob)
	url := reg.URL + "/v2/" + testRepo + "/blobs/sha256:" + ti.id
	for _, readers := range []int{1, 4} {
		b.Run(fmt.Sprintf("readers=%d", readers), func(b *testing.B) {
			var httpTime, fetchTime time.Duration
			b.SetBytes(benchSize)
			for range b.N {
				start := time.Now()
				resp, err := http.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || n != int64(len(ti.blob)) {
					b.Fatalf("GET: %d bytes, %v", n, err)
				}
				httpTime += time.Since(start)

				cfg := parseConfig(b, registryConfig(reg.Addr, "", "", "blobcache", b.TempDir(),
					map[string]any{}))
				cfg.Rafs.BatchSize = 8 << 20
				f, _ := newFetcher(b, cfg)
				f.AddImage(ti.img)
				start = time.Now()
				errs := make(chan error, readers)
				part := benchSize / readers
				for r := range readers {
					go func() {
						buf := make([]byte, 1<<20)
						for off := r * part; off < (r+1)*part; off += len(buf) {
							if _, err := ti.img.ReadAt(context.Background(), f, ti.file(), buf, int64(off)); err != nil {
								errs <- err
								return
							}
						}
						errs <- nil
					}()
				}
				for range readers {
					if err := <-errs; err != nil {
						b.Fatal(err)
					}
				}
				fetchTime += time.Since(start)
				f.Close()
			}
			b.ReportMetric(fetchTime.Seconds()/httpTime.Seconds(), "fetcher/http")
			b.ReportMetric(float64(benchSize)*float64(b.N)/fetchTime.Seconds()/(1<<20), "fetcher-MiB/s")
			b.ReportMetric(float64(benchSize)*float64(b.N)/httpTime.Seconds()/(1<<20), "http-MiB/s")
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

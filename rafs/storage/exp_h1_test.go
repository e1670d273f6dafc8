package storage

import (
	"context"
	"io"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

func cpuNow() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestExpH1(t *testing.T) {
	if os.Getenv("EXPH1") == "" {
		t.Skip()
	}
	reg := registrytest.Start(t, registrytest.Options{})
	ti := buildImage(t, makeContent(31, benchSize), 1<<20, codec.None)
	reg.PushBlob(t, testRepo, ti.blob)
	url := reg.URL + "/v2/" + testRepo + "/blobs/sha256:" + ti.id
	mode := os.Getenv("EXPH1")
	for range 3 {
		c0, w0 := cpuNow(), time.Now()
		resp, _ := http.Get(url)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		t.Logf("GET wall %v cpu %v", time.Since(w0), cpuNow()-c0)
		work := t.TempDir()
		cfg := parseConfig(t, registryConfig(reg.Addr, "", "", "blobcache", work, nil))
		cfg.Rafs.Validate = false
		th, _ := strconv.Atoi(os.Getenv("TH"))
		cfg.Cache.Prefetch = config.Prefetch{Enable: true, ThreadsCount: max(th, 1), BatchSize: 1 << 20, PrefetchAll: true}
		var opts []Option
		if ra, _ := strconv.Atoi(os.Getenv("RA")); ra > 0 {
			opts = append(opts, WithReadahead(ra<<20))
		}
		f, _ := newFetcher(t, cfg, opts...)
		f.AddImage(ti.img)
		c0, w0 = cpuNow(), time.Now()
		if mode == "prefetch" {
			f.Prefetch(context.Background(), ti.img)
			f.WaitPrefetch()
		} else {
			buf := make([]byte, 1<<20)
			for off := 0; off < benchSize; off += len(buf) {
				ti.img.ReadAt(context.Background(), f, ti.file(), buf, int64(off))
			}
		}
		t.Logf("%s wall %v cpu %v  %+v", mode, time.Since(w0), cpuNow()-c0, f.BackendMetrics())
		f.Close()
	}
}

package fanotifyfs

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
	rfs "github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// dropCache evicts the clean pages of the files at paths, so the next read
// goes to the filesystem (and, for a fanotify mount, raises events again).
func dropCache(b *testing.B, paths ...string) {
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		unix.Fdatasync(int(f.Fd()))
		unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		f.Close()
	}
}

func timedRead(b *testing.B, p string) time.Duration {
	b.Helper()
	f, err := os.Open(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	start := time.Now()
	n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, buf)
	took := time.Since(start)
	if err != nil || n != benchSize {
		b.Fatalf("read %s: %d bytes, %v", p, n, err)
	}
	return took
}

const benchSize = 64 << 20

// traceEvents logs every event of the benchmark (latency per fill).
var traceEvents = os.Getenv("FANOTIFYFS_TRACE") != ""

// BenchmarkFanotifySeqRead reads a 64 MiB file sequentially, page cache
// dropped, from: a kernel EROFS mount of the complete image (the bootstrap
// with the full uncompressed blob as device: the baseline), this mode with
// an empty cache (cold: every chunk fetched from a local backend,
// verified, written) and with a full one (warm: every event a fast ALLOW),
// and rafsd's FUSE mode (rafs/fs) over the same kind of fetcher, cold and
// warm. It reports MiB/s, ratios to the baseline and events per MiB.
func BenchmarkFanotifySeqRead(b *testing.B) {
	fstest.RequireRoot(b)
	src := b.TempDir()
	if err := os.WriteFile(src+"/data", fstest.Bytes(7, benchSize), 0o644); err != nil {
		b.Fatal(err)
	}
	im := buildImage(b, src, 1<<20)
	var kernel, cold, warm, fuseCold, fuseWarm time.Duration
	var events, coldEvents uint64
	for range b.N {
		// This mode, cold then warm, on one fresh cache.
		g, err := fanotify.New()
		if err != nil {
			b.Fatal(err)
		}
		s := NewServer(g, nil)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- s.Serve(ctx, fanotify.Options{Observe: func(ev fanotify.Event, err error, took time.Duration) {
				if traceEvents {
					b.Logf("event pid %d [%d,+%d) %v %s", ev.Pid, ev.Offset, ev.Count, err, took)
				}
			}})
		}()
		f := newFetcher(b, im.blobDir, b.TempDir())
		m, err := s.Mount(Options{Bootstrap: im.boot, Mountpoint: b.TempDir(), Fetcher: f})
		if err != nil {
			b.Fatal(err)
		}
		p := m.Mountpoint() + "/data"
		cacheFile := m.CacheFiles()[0]
		cold += timedRead(b, p)
		coldEvents += s.Stats().Events
		dropCache(b, p, cacheFile)
		before := s.Stats().Events
		warm += timedRead(b, p)
		events += s.Stats().Events - before

		// The baseline: the same bootstrap over a complete copy of the blob.
		full := filepath.Join(b.TempDir(), "blob.full")
		data, err := os.ReadFile(cacheFile)
		if err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(full, data, 0o600); err != nil {
			b.Fatal(err)
		}
		if err := m.Unmount(); err != nil {
			b.Fatal(err)
		}
		cancel()
		<-done
		g.Close()
		kmnt := b.TempDir()
		if err := kernelMount(im.boot, kmnt, []string{"device=" + full}, 0, testLogger(b)); err != nil {
			b.Fatal(err)
		}
		dropCache(b, full)
		kernel += timedRead(b, kmnt+"/data")
		unix.Unmount(kmnt, unix.MNT_DETACH)

		// The FUSE mode over a fetcher with its own fresh cache.
		ff := newFetcher(b, im.blobDir, b.TempDir())
		if err := ff.AddImage(im.img); err != nil {
			b.Fatal(err)
		}
		fmnt := fstest.Mount(b, rfs.New(im.img, ff, rfs.Options{EntryTimeout: time.Hour, AttrTimeout: time.Hour}), &fuse.MountOptions{MaxReadAhead: 1 << 20})
		fstest.SetReadAhead(b, fmnt, 1024)
		fuseCold += timedRead(b, fmnt+"/data")
		fcache, err := ff.CachePath(im.img.Blobs[0])
		if err != nil {
			b.Fatal(err)
		}
		dropCache(b, fmnt+"/data", fcache)
		fuseWarm += timedRead(b, fmnt+"/data")
	}
	mibps := func(d time.Duration) float64 { return float64(b.N) * benchSize / (1 << 20) / d.Seconds() }
	b.ReportMetric(mibps(kernel), "kernel-MiB/s")
	b.ReportMetric(mibps(cold), "cold-MiB/s")
	b.ReportMetric(mibps(warm), "warm-MiB/s")
	b.ReportMetric(mibps(fuseCold), "fuse-cold-MiB/s")
	b.ReportMetric(mibps(fuseWarm), "fuse-warm-MiB/s")
	b.ReportMetric(kernel.Seconds()/cold.Seconds(), "cold/kernel")
	b.ReportMetric(kernel.Seconds()/warm.Seconds(), "warm/kernel")
	b.ReportMetric(fuseCold.Seconds()/cold.Seconds(), "cold/fuse-cold")
	b.ReportMetric(fuseWarm.Seconds()/warm.Seconds(), "warm/fuse-warm")
	b.ReportMetric(float64(coldEvents)/float64(b.N)/(benchSize>>20), "cold-events/MiB")
	b.ReportMetric(float64(events)/float64(b.N)/(benchSize>>20), "warm-events/MiB")
}

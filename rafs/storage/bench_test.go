package storage

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sort"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/internal/capproxy"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

const benchSize = 256 << 20

// BenchmarkColdFetch fetches a 256 MiB blob (1 MiB raw chunks) cold from a
// real docker-registry through the fetcher (fetch, digest check of every
// chunk, cache write) and compares it with ONE plain HTTP GET of the whole
// blob from the same registry, read in 1 MiB reads (the fetcher's read
// size; io.Copy's 32 KiB reads cost the client twice the CPU and would
// flatter the fetcher) and discarded:
//
//   - seq: one reader reads the file sequentially, 1 MiB per read, with
//     the default config (1 MiB amplify_io; read-ahead grows the
//     requests);
//   - readers4: four readers each read a quarter sequentially;
//   - prefetch_all: Prefetch with prefetch_all (default threads_count and
//     merging_size) until every chunk is cached.
//
// Each measurement of a mode comes right after a GET, so both see the
// same load on a shared machine. Reported per mode, over benchRounds
// rounds: X/whole-GET, the median time ratio fetcher/GET (1.10 = 10%
// slower) with its min and max (X/whole-GET-min, -max); X/cpu-GET, the
// median ratio of CPU time used (this process + the registry), which
// shows the work added whatever the machine's load; X/GET-to-file, the
// median time ratio against the GET written to a file next to the cache
// (1 MiB writes): the least any fetcher that keeps what it fetched must
// do; X/floor-GET, the median of the mode's CPU floor (the CPU time it
// and the registry used, spread perfectly over all cores) over the GET's
// time: where the CPU alone puts the mode, however well it overlaps its
// stages (GET/floor-GET is the same for the GET itself, below 1 when it
// left cores idle). X/whole-GET close to X/floor-GET means the fetcher
// loses little to waiting; a floor above 1.1 means the work per byte
// (digest, cache write, the registry serving a reader that does more
// than discard) cannot fit in the GET's time on this machine. Other
// processes' load shows in the wall times, not in the floor. On a VM with
// virtio-balloon free page reporting, fresh page-cache pages fault on the
// host: the cache write of 256 MiB measured 35 ms of CPU into recycled
// pages and up to 850 ms into reported ones (GET-to-file pays it too).
// ideal (see below) is the least any verifying, caching fetcher could do.
//
// Sub-benchmarks: the registry on loopback, sharing this machine's cores,
// with the cache on disk and on tmpfs; and the registry behind a 1 Gbit/s
// link (cache=disk,link=1Gbit; internal/capproxy caps what flows back),
// as a registry across a network is reached. On loopback the GET alone
// keeps ~1.5 of 2 cores busy and neither the fetcher nor ideal comes
// within 10% of it; over the link the fetcher's work overlaps the
// transfer and its overhead is what the target is about.
func BenchmarkColdFetch(b *testing.B) {
	reg := registrytest.Start(b, registrytest.Options{})
	ti := buildImage(b, makeContent(31, benchSize), 1<<20, codec.None)
	reg.PushBlob(b, testRepo, ti.blob)
	// addr is where the registry is reached: directly, or through a
	// bandwidth-capped proxy standing for a network link.
	addr := reg.Addr
	blobURL := func() string { return "http://" + addr + "/v2/" + testRepo + "/blobs/sha256:" + ti.id }
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	defer client.CloseIdleConnections()
	// get GETs the whole blob into w in 1 MiB reads.
	get := func(w io.Writer) error {
		resp, err := client.Get(blobURL())
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		n, err := io.CopyBuffer(onlyWriter{w}, resp.Body, make([]byte, 1<<20))
		if err == nil && n != int64(len(ti.blob)) {
			err = fmt.Errorf("GET: %d bytes, want %d", n, len(ti.blob))
		}
		return err
	}
	// getToFile GETs the whole blob into a file in dir.
	getToFile := func(dir string) error {
		out, err := os.Create(filepath.Join(dir, "get"))
		if err != nil {
			return err
		}
		defer os.Remove(out.Name())
		defer out.Close()
		return get(out)
	}
	// measure runs fn and returns its wall time and the CPU time this
	// process and the registry used meanwhile. Its CPU profile samples
	// carry the label phase (GET, GET-to-file or the mode's name): go test
	// -cpuprofile, then pprof -tagfocus phase=seq.
	measure := func(phase string, fn func() error) (wall, cpu time.Duration) {
		cpu0, reg0 := selfCPU(), reg.CPUTime()
		start := time.Now()
		var err error
		pprof.Do(context.Background(), pprof.Labels("phase", phase), func(context.Context) { err = fn() })
		if err != nil {
			b.Fatal(err)
		}
		wall = time.Since(start)
		return wall, selfCPU() - cpu0 + reg.CPUTime() - reg0
	}
	// readers reads the whole file with n readers, each a contiguous part
	// in 1 MiB reads (the bytes are checked after the clock stopped).
	readers := func(f *Fetcher, n int) error {
		errs := make(chan error, n)
		part := benchSize / n
		for r := range n {
			go func() {
				buf := make([]byte, 1<<20)
				for off := r * part; off < (r+1)*part; off += len(buf) {
					p := buf[:min(len(buf), (r+1)*part-off)]
					if _, err := ti.img.ReadAt(context.Background(), f, ti.file(), p, int64(off)); err != nil {
						errs <- err
						return
					}
				}
				errs <- nil
			}()
		}
		var first error
		for range n {
			if err := <-errs; err != nil && first == nil {
				first = err
			}
		}
		return first
	}
	// ideal does the least any fetcher that verifies and keeps what it
	// fetches must do, with no fetcher around it: ONE GET of the whole
	// blob, read in 1 MiB reads by one goroutine while another checks
	// each chunk's digest and writes it to a file in dir. Its ratios to
	// the GET bound what any fetcher could reach on this machine.
	ideal := func(dir string) error {
		out, err := os.Create(filepath.Join(dir, "ideal"))
		if err != nil {
			return err
		}
		defer out.Close()
		resp, err := client.Get(blobURL())
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		chunks := ti.file().Chunks
		// Six buffers go round: four queued, one being read, one being
		// checked and written (fresh ones would cost page faults).
		bufs, free := make(chan []byte, 4), make(chan []byte, 6)
		for range cap(free) {
			free <- make([]byte, 1<<20)
		}
		errc := make(chan error, 1)
		go func() {
			defer close(bufs)
			for _, fc := range chunks {
				p := (<-free)[:fc.Chunk.CompressedSize]
				if _, err := io.ReadFull(resp.Body, p); err != nil {
					errc <- err
					return
				}
				bufs <- p
			}
			errc <- nil
		}()
		k := 0
		for p := range bufs {
			c := chunks[k].Chunk
			k++
			if err := ti.img.Blobs[0].Digester.Verify(p, c.Digest); err != nil {
				return err
			}
			if _, err := out.WriteAt(p, int64(c.UncompressedOffset)); err != nil {
				return err
			}
			free <- p[:cap(p)]
		}
		return <-errc
	}
	modes := []struct {
		name string
		run  func(f *Fetcher) error
	}{
		{"seq", func(f *Fetcher) error { return readers(f, 1) }},
		{"readers4", func(f *Fetcher) error { return readers(f, 4) }},
		{"prefetch_all", func(f *Fetcher) error {
			if err := f.Prefetch(context.Background(), ti.img); err != nil {
				return err
			}
			f.WaitPrefetch()
			if r, n := f.CacheBlob(ti.img.Blobs[0]).Ready(); r != n {
				return fmt.Errorf("prefetch cached %d/%d chunks", r, n)
			}
			return nil
		}},
	}
	// Sub-benchmarks: the registry on loopback, sharing this machine's
	// cores (cache on disk and on tmpfs), and behind a 1 Gbit/s link
	// (internal/capproxy; cache on disk, fewer rounds: each fetch takes
	// ~2 s), where fetching a chunk takes longer than checking and
	// caching it, as from a registry across a network.
	runs := []struct {
		name   string
		shm    bool
		rate   float64 // bytes/s; 0: loopback
		rounds int
	}{
		{"cache=disk", false, 0, benchRounds},
		{"cache=tmpfs", true, 0, benchRounds},
		{"cache=disk,link=1Gbit", false, 1e9 / 8, 3},
	}
	for _, run := range runs {
		shm := run.shm
		addr = reg.Addr
		if run.rate > 0 {
			addr = capproxy.Start(b, reg.Addr, run.rate).Addr
		}
		b.Run(run.name, func(b *testing.B) {
			b.SetBytes(benchSize)
			ratios := make([][]float64, len(modes))
			cpuRatios := make([][]float64, len(modes))
			fileRatios := make([][]float64, len(modes))
			floors := make([][]float64, len(modes))
			var getFloors []float64
			var idealRatios, idealFloors, idealCPU []float64
			var getTime time.Duration
			var gets int
			newWork := func() string {
				if !shm {
					return b.TempDir()
				}
				d, err := os.MkdirTemp("/dev/shm", "rafsd-bench-")
				if err != nil {
					b.Skipf("no tmpfs: %v", err)
				}
				b.Cleanup(func() { os.RemoveAll(d) })
				return d
			}
			for range b.N {
				for range run.rounds {
					unix.Sync() // earlier rounds' writes do not land on this one
					work := newWork()
					gf, _ := measure("GET-to-file", func() error { return getToFile(work) })
					os.RemoveAll(work)
					work = newWork()
					unix.Sync()
					g, gcpu := measure("GET", func() error { return get(io.Discard) })
					d, dcpu := measure("ideal", func() error { return ideal(work) })
					idealRatios = append(idealRatios, d.Seconds()/g.Seconds())
					idealFloors = append(idealFloors, cpuFloor(dcpu).Seconds()/g.Seconds())
					idealCPU = append(idealCPU, dcpu.Seconds()/gcpu.Seconds())
					os.RemoveAll(work)
					for mi, m := range modes {
						work := newWork()
						cfg := parseConfig(b, registryConfig(addr, "", "", "blobcache", work, nil))
						cfg.Rafs.Validate = false // digests are checked on fetch; cache reads trusted
						if m.name == "prefetch_all" {
							cfg.Cache.Prefetch = config.Prefetch{Enable: true, ThreadsCount: config.DefaultPrefetchThreads,
								BatchSize: config.DefaultBatchSize, PrefetchAll: true}
						}
						f, _ := newFetcher(b, cfg, WithLogger(slog.New(slog.NewTextHandler(testWriter{b}, nil))))
						addImage(b, f, ti.img)
						unix.Sync()
						g, gcpu := measure("GET", func() error { return get(io.Discard) })
						getTime += g
						gets++
						d, dcpu := measure(m.name, func() error { return m.run(f) })
						if !bytes.Equal(ti.readAll(b, f), ti.content) {
							b.Fatalf("%s: wrong bytes", m.name)
						}
						f.Close()
						ratios[mi] = append(ratios[mi], d.Seconds()/g.Seconds())
						cpuRatios[mi] = append(cpuRatios[mi], dcpu.Seconds()/gcpu.Seconds())
						fileRatios[mi] = append(fileRatios[mi], d.Seconds()/gf.Seconds())
						floors[mi] = append(floors[mi], cpuFloor(dcpu).Seconds()/g.Seconds())
						getFloors = append(getFloors, cpuFloor(gcpu).Seconds()/g.Seconds())
						os.RemoveAll(work)
					}
				}
			}
			for mi, m := range modes {
				b.ReportMetric(median(ratios[mi]), m.name+"/whole-GET")
				b.ReportMetric(slices.Min(ratios[mi]), m.name+"/whole-GET-min")
				b.ReportMetric(slices.Max(ratios[mi]), m.name+"/whole-GET-max")
				b.ReportMetric(median(cpuRatios[mi]), m.name+"/cpu-GET")
				b.ReportMetric(median(fileRatios[mi]), m.name+"/GET-to-file")
				b.ReportMetric(median(floors[mi]), m.name+"/floor-GET")
			}
			b.ReportMetric(median(idealRatios), "ideal/whole-GET")
			b.ReportMetric(slices.Min(idealRatios), "ideal/whole-GET-min")
			b.ReportMetric(median(idealCPU), "ideal/cpu-GET")
			b.ReportMetric(median(idealFloors), "ideal/floor-GET")
			b.ReportMetric(median(getFloors), "GET/floor-GET")
			b.ReportMetric(float64(gets)*benchSize/(1<<20)/getTime.Seconds(), "GET-MiB/s")
		})
	}
}

// cpuFloor is the least wall time cpu (CPU time of this process and the
// registry) takes on this machine: spread perfectly over all its cores.
func cpuFloor(cpu time.Duration) time.Duration {
	return cpu / time.Duration(runtime.NumCPU())
}

// selfCPU is the CPU time (user + system) this process has used.
func selfCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// onlyWriter hides os.File's ReadFrom so io.CopyBuffer uses the buffer
// (1 MiB writes, as the fetcher's) rather than splicing.
type onlyWriter struct{ io.Writer }

// benchRounds is how many times each cold-fetch mode is measured per run.
const benchRounds = 5

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// BenchmarkWarmRead reads a fully cached 256 MiB file through the fetcher
// and, in the same iteration, the cache data file directly with pread;
// it reports the time ratio fetcher/pread.
func BenchmarkWarmRead(b *testing.B) {
	ti := buildImage(b, makeContent(32, benchSize), 1<<20, codec.Zstd)
	dir := b.TempDir()
	ti.writeBlob(b, dir)
	work := filepath.Join(dir, "cache")
	f, _ := newFetcher(b, parseConfig(b, localConfig(dir, "blobcache", work, false, false, 8<<20)), WithLogger(slog.New(slog.NewTextHandler(testWriter{b}, nil))))
	addImage(b, f, ti.img)
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

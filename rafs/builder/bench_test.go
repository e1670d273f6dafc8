package builder

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs/codec"
)

// benchTmpfs mounts a tmpfs of size bytes for a benchmark, so that disk
// speed does not decide the numbers.
func benchTmpfs(b *testing.B, size string) string {
	b.Helper()
	d := b.TempDir()
	if err := unix.Mount("tmpfs", d, "tmpfs", 0, "size="+size); err != nil {
		b.Fatalf("mount tmpfs: %v", err)
	}
	b.Cleanup(func() {
		if err := unix.Unmount(d, 0); err != nil {
			unix.Unmount(d, unix.MNT_DETACH)
		}
	})
	return d
}

// genBig writes total bytes as 4 MiB files, half incompressible and half
// text-like, the mix of a typical image layer.
func genBig(b *testing.B, root string, total int64) {
	b.Helper()
	const fileSize = 4 << 20
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog 0123456789\n"), fileSize/55+1)[:fileSize]
	for k := int64(0); k*fileSize < total; k++ {
		data := text
		if k%2 == 0 {
			data = pseudoRandom(fileSize, byte(k))
		} else {
			data = bytes.Clone(text)
			copy(data, fmt.Sprintf("file %d", k)) // distinct first chunk
		}
		p := filepath.Join(root, fmt.Sprintf("d%02d/f%05d", k%50, k))
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			b.Fatal(err)
		}
	}
}

func buildToFile(b *testing.B, src, out string, c codec.Compressor) {
	b.Helper()
	f, err := os.Create(out)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	w := bufio.NewWriterSize(f, 4<<20)
	bl, err := New(Options{Compressor: &c}, w)
	if err != nil {
		b.Fatal(err)
	}
	if err := bl.AddDir(context.Background(), src); err != nil {
		b.Fatal(err)
	}
	if _, err := bl.Finish(); err != nil {
		b.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
}

func mkfsErofs(b *testing.B, src, out string, args ...string) *syscall.Rusage {
	b.Helper()
	cmd := exec.Command("mkfs.erofs", append(append([]string{"--quiet"}, args...), out, src)...)
	if msg, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("mkfs.erofs: %v\n%s", err, msg)
	}
	return cmd.ProcessState.SysUsage().(*syscall.Rusage)
}

// BenchmarkBuild1GiB builds a 1 GiB tree with our builder and with
// mkfs.erofs, same tree, same run, and reports throughputs and ratios:
// uncompressed vs uncompressed and lz4 vs lz4.
func BenchmarkBuild1GiB(b *testing.B) {
	const total = 1 << 30
	root := benchTmpfs(b, "3g")
	src := filepath.Join(root, "src")
	genBig(b, src, total)
	out := filepath.Join(root, "out")
	timeIt := func(f func()) float64 {
		t0 := time.Now()
		f()
		d := time.Since(t0).Seconds()
		os.Remove(out)
		return float64(total) / (1 << 20) / d
	}
	// Warm up: the first pass over a fresh tmpfs pays for page allocation.
	timeIt(func() { buildToFile(b, src, out, codec.None) })
	b.ResetTimer()
	var ours, oursLZ4, oursZstd, erofs, erofsLZ4 float64
	var peak uint64
	for range b.N {
		ours = timeIt(func() { buildToFile(b, src, out, codec.None) })
		erofs = timeIt(func() { mkfsErofs(b, src, out) })
		oursLZ4 = timeIt(func() { buildToFile(b, src, out, codec.LZ4Block) })
		erofsLZ4 = timeIt(func() { mkfsErofs(b, src, out, "-zlz4") })
		oursZstd = timeIt(func() { peak = peakHeap(func() { buildToFile(b, src, out, codec.Zstd) }) })
	}
	// Streaming: the heap stays a few chunks deep, not blob-sized.
	b.ReportMetric(float64(peak)/(1<<20), "zstd_peak_heap_MiB")
	b.ReportMetric(ours, "none_MB/s")
	b.ReportMetric(erofs, "mkfs.erofs_MB/s")
	b.ReportMetric(ours/erofs, "none_vs_mkfs.erofs")
	b.ReportMetric(oursLZ4, "lz4_MB/s")
	b.ReportMetric(erofsLZ4, "mkfs.erofs_lz4_MB/s")
	b.ReportMetric(oursLZ4/erofsLZ4, "lz4_vs_mkfs.erofs")
	b.ReportMetric(oursZstd, "zstd_MB/s")
}

// peakHeap samples the Go heap while f runs.
func peakHeap(f func()) uint64 {
	var peak atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	f()
	close(stop)
	wg.Wait()
	return peak.Load()
}

// BenchmarkBuild100kFiles reports the peak Go heap of building a
// 100k-file tree (blob discarded), per file, next to mkfs.erofs's peak RSS
// for the same tree.
func BenchmarkBuild100kFiles(b *testing.B) {
	root := benchTmpfs(b, "2g")
	src := filepath.Join(root, "src")
	for k := range 100_000 {
		p := filepath.Join(src, fmt.Sprintf("d%03d/file-%06d", k%500, k))
		if k < 500 {
			os.MkdirAll(filepath.Dir(p), 0o755)
		}
		if err := os.WriteFile(p, []byte(fmt.Sprintf("file %d\n", k)), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	b.ResetTimer()
	var peak uint64
	var erofsRSS int64
	for range b.N {
		peak = peakHeap(func() {
			bl, err := New(Options{}, io.Discard)
			if err != nil {
				b.Fatal(err)
			}
			if err := bl.AddDir(context.Background(), src); err != nil {
				b.Fatal(err)
			}
			if _, err := bl.Finish(); err != nil {
				b.Fatal(err)
			}
		})
		ru := mkfsErofs(b, src, filepath.Join(root, "out.erofs"))
		erofsRSS = ru.Maxrss * 1024
		os.Remove(filepath.Join(root, "out.erofs"))
	}
	b.ReportMetric(float64(peak)/(1<<20), "peak_heap_MiB")
	b.ReportMetric(float64(peak)/100_000, "heap_B/file")
	b.ReportMetric(float64(erofsRSS)/(1<<20), "mkfs.erofs_maxrss_MiB")
	b.ReportMetric(float64(peak)/float64(erofsRSS), "heap_vs_mkfs.erofs_rss")
}

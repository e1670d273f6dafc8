package v5

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

var (
	bigOnce sync.Once
	bigImg  *rafs.Image
	bigBoot []byte
)

// bigImage is a 100k-file image: 1000 directories of 100 one-chunk files,
// every tenth file with a second name, like a large container layer.
func bigImage(b *testing.B) (*rafs.Image, []byte) {
	bigOnce.Do(func() {
		ib := newImageBuilder(b, codec.None, codec.Blake3, rafs.DefaultChunkSize)
		for d := range 1000 {
			dir := ib.dir(rafs.RootIno, fmt.Sprintf("dir-%04d", d))
			for f := range 100 {
				ino := ib.dense(dir, fmt.Sprintf("file-%03d.so", f), fmt.Appendf(nil, "%d/%d", d, f))
				if f%10 == 0 {
					ib.link(dir, fmt.Sprintf("link-%03d", f), ino)
				}
			}
		}
		bigImg, _ = ib.finish()
		var w bytes.Buffer
		if err := Write(&w, bigImg); err != nil {
			b.Fatal(err)
		}
		bigBoot = w.Bytes()
	})
	return bigImg, bigBoot
}

// copyNs is the baseline: nanoseconds to copy boot once (best of 20, so
// that it is measured warm like the decodes are). testing.Benchmark cannot
// nest inside a benchmark.
func copyNs(boot []byte) float64 {
	best := time.Duration(math.MaxInt64)
	for range 20 {
		start := time.Now()
		sink = bytes.Clone(boot)
		best = min(best, time.Since(start))
	}
	return float64(best.Nanoseconds())
}

var sink []byte

// BenchmarkRead100k decodes a 100k-file bootstrap. Besides time and
// allocations per decode it reports ns per name and the ratio to merely
// copying the bootstrap's bytes (measured in the same run).
func BenchmarkRead100k(b *testing.B) {
	_, boot := bigImage(b)
	base := copyNs(boot)
	b.SetBytes(int64(len(boot)))
	b.ReportAllocs()
	b.ResetTimer()
	var names int
	for b.Loop() {
		img, err := Read(bytes.NewReader(boot), int64(len(boot)))
		if err != nil {
			b.Fatal(err)
		}
		names = len(img.Inodes)
	}
	ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(ns/float64(names), "ns/inode")
	b.ReportMetric(ns/base, "x-copy")
	b.ReportMetric(float64(len(boot))/1e6, "MB-bootstrap")
}

// BenchmarkWrite100k encodes the same image (digests included).
func BenchmarkWrite100k(b *testing.B) {
	img, boot := bigImage(b)
	base := copyNs(boot)
	b.SetBytes(int64(len(boot)))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := Write(io.Discard, img); err != nil {
			b.Fatal(err)
		}
	}
	ns := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(ns/float64(len(img.Inodes)), "ns/inode")
	b.ReportMetric(ns/base, "x-copy")
}

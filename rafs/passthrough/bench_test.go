package passthrough

import (
	"io"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// BenchmarkSequentialRead reads a 64 MiB host file cold (page cache
// dropped) through the passthrough mount, with and without kernel
// passthrough, and directly; it reports throughput ratios to direct
// reads in the same run (1 = native).
func BenchmarkSequentialRead(b *testing.B) {
	const size = 64 << 20
	src := b.TempDir()
	if err := os.WriteFile(src+"/f", fstest.Bytes(1, size), 0o644); err != nil {
		b.Fatal(err)
	}
	for _, kp := range []bool{false, true} {
		name := "daemon"
		if kp {
			name = "kernel-passthrough"
		}
		b.Run(name, func(b *testing.B) {
			fstest.RequireRoot(b)
			pt, err := New(src, Options{KernelPassthrough: kp, AttrTimeout: time.Hour, EntryTimeout: time.Hour})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { pt.Close() })
			mnt := fstest.Mount(b, pt, nil)
			fstest.SetReadAhead(b, mnt, 1024)
			read := func(p string) time.Duration {
				f, err := os.Open(p)
				if err != nil {
					b.Fatal(err)
				}
				defer f.Close()
				unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
				start := time.Now()
				n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, make([]byte, 1<<20))
				if err != nil || n != size {
					b.Fatalf("read %s: %d, %v", p, n, err)
				}
				return time.Since(start)
			}
			var tf, td time.Duration
			b.ResetTimer()
			for range b.N {
				for range 2 {
					tf += read(mnt + "/f")
					td += read(src + "/f")
				}
			}
			mb := float64(2*b.N*size) / (1 << 20)
			b.ReportMetric(mb/tf.Seconds(), "fuse-MiB/s")
			b.ReportMetric(mb/td.Seconds(), "disk-MiB/s")
			b.ReportMetric(td.Seconds()/tf.Seconds(), "fuse/disk-throughput")
		})
	}
}

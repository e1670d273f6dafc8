package fs_test

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/rafs/codec"
	rfs "github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// Benchmarks compare the FUSE mount with the same bytes on local disk in
// the same run and report the ratio (fuse/disk): throughput ratios for
// reads (higher is better, 1 = native), a time ratio for the walk (lower
// is better). Every iteration does a fixed amount of work, so they are
// meaningful with -benchtime 1x (make bench).

const benchFileSize = 64 << 20

func benchOpts() rfs.Options {
	// The image is immutable: let the kernel cache everything for long.
	return rfs.Options{EntryTimeout: time.Hour, AttrTimeout: time.Hour, NegativeTimeout: time.Hour}
}

// mountBenchFile serves one 64 MiB file from an image and writes the same
// bytes to local disk; both are read once so the runs are warm.
func mountBenchFile(b *testing.B) (fusePath, diskPath string) {
	b.Helper()
	data := fstest.Bytes(42, benchFileSize)
	ib := fstest.NewBuilder(1<<20, codec.LZ4Block, codec.Blake3)
	ib.File("/data", 0o644, data)
	img, blob, err := ib.Image()
	if err != nil {
		b.Fatal(err)
	}
	cr := fstest.MemReader(map[string][]byte{img.Blobs[0].ID: blob})
	mnt := fstest.Mount(b, rfs.New(img, cr, benchOpts()), &fuse.MountOptions{MaxReadAhead: 1 << 20})
	fstest.SetReadAhead(b, mnt, 1024)
	diskPath = filepath.Join(b.TempDir(), "data")
	if err := os.WriteFile(diskPath, data, 0o644); err != nil {
		b.Fatal(err)
	}
	fusePath = mnt + "/data"
	for _, p := range []string{fusePath, diskPath} {
		readAll(b, p)
	}
	return fusePath, diskPath
}

func readAll(b *testing.B, p string) time.Duration {
	f, err := os.Open(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	start := time.Now()
	n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, buf)
	if err != nil || n != benchFileSize {
		b.Fatalf("read %s: %d, %v", p, n, err)
	}
	return time.Since(start)
}

func randomReads(b *testing.B, p string, n int) time.Duration {
	f, err := os.Open(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	seed := uint64(7)
	start := time.Now()
	for range n {
		seed = seed*6364136223846793005 + 1442695040888963407
		off := int64(seed>>33) % (benchFileSize / 4096) * 4096
		if _, err := f.ReadAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start)
}

func BenchmarkSequentialReadWarm(b *testing.B) {
	fp, dp := mountBenchFile(b)
	var tf, td time.Duration
	b.ResetTimer()
	for range b.N {
		for range 4 {
			tf += readAll(b, fp)
			td += readAll(b, dp)
		}
	}
	mb := float64(4*b.N*benchFileSize) / (1 << 20)
	b.ReportMetric(mb/tf.Seconds(), "fuse-MiB/s")
	b.ReportMetric(mb/td.Seconds(), "disk-MiB/s")
	b.ReportMetric(td.Seconds()/tf.Seconds(), "fuse/disk-throughput")
}

func BenchmarkRandomRead4KWarm(b *testing.B) {
	fp, dp := mountBenchFile(b)
	const n = 20000
	var tf, td time.Duration
	b.ResetTimer()
	for range b.N {
		tf += randomReads(b, fp, n)
		td += randomReads(b, dp, n)
	}
	b.ReportMetric(float64(tf.Microseconds())/float64(n*b.N), "fuse-us/read")
	b.ReportMetric(float64(td.Microseconds())/float64(n*b.N), "disk-us/read")
	b.ReportMetric(td.Seconds()/tf.Seconds(), "fuse/disk-throughput")
}

// walk is `ls -lR`: readdir, lstat and the ACL xattr probe ls -l makes
// for every entry.
func walk(b *testing.B, root string) (time.Duration, int) {
	n := 0
	start := time.Now()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		unix.Lgetxattr(p, "system.posix_acl_access", nil)
		n++
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return time.Since(start), n
}

func BenchmarkWalk100k(b *testing.B) {
	const dirs, per = 100, 1000
	ib := fstest.NewBuilder(1<<20, codec.Zstd, codec.Blake3)
	disk := b.TempDir()
	for d := range dirs {
		dn := fmt.Sprintf("/d%03d", d)
		ib.Dir(dn, 0o755)
		if err := os.Mkdir(disk+dn, 0o755); err != nil {
			b.Fatal(err)
		}
		for f := range per {
			fn := fmt.Sprintf("%s/file-%04d", dn, f)
			ib.File(fn, 0o644, nil)
			fd, err := unix.Open(disk+fn, unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
	}
	img, blob, err := ib.Image()
	if err != nil {
		b.Fatal(err)
	}
	cr := fstest.MemReader(map[string][]byte{img.Blobs[0].ID: blob})
	rf := rfs.New(img, cr, benchOpts())
	mnt := fstest.Mount(b, rf, nil)
	// Warm both: dentries, inodes and (FUSE) cached directory pages.
	_, nf := walk(b, mnt)
	_, nd := walk(b, disk)
	if nf != nd || nf != dirs*per+dirs+1 {
		b.Fatalf("walked %d entries on fuse, %d on disk", nf, nd)
	}
	var tf, td time.Duration
	st := rf.Stats()
	requests := func() uint64 { return st.Lookups.Load() + st.GetAttrs.Load() + st.ReadDirs.Load() + st.Xattrs.Load() }
	before := requests()
	b.ResetTimer()
	for range b.N {
		t, _ := walk(b, mnt)
		tf += t
		t, _ = walk(b, disk)
		td += t
	}
	b.ReportMetric(tf.Seconds()/float64(b.N), "fuse-s/walk")
	b.ReportMetric(td.Seconds()/float64(b.N), "disk-s/walk")
	b.ReportMetric(tf.Seconds()/td.Seconds(), "fuse/disk-time")
	b.ReportMetric(float64(requests()-before)/float64(b.N), "fuse-requests/walk")
}

// dropCache evicts p's pages so the next read reaches the filesystem
// (the FUSE daemon, or the disk).
func dropCache(b *testing.B, p string) {
	f, err := os.Open(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}

// The cold variants drop the page cache before each pass: FUSE reads then
// reach the daemon (chunks already decoded in the test reader's cache, so
// this measures the FUSE path, not decompression), disk reads the device.
func BenchmarkSequentialReadCold(b *testing.B) {
	fp, dp := mountBenchFile(b)
	var tf, td time.Duration
	b.ResetTimer()
	for range b.N {
		for range 2 {
			dropCache(b, fp)
			tf += readAll(b, fp)
			dropCache(b, dp)
			td += readAll(b, dp)
		}
	}
	mb := float64(2*b.N*benchFileSize) / (1 << 20)
	b.ReportMetric(mb/tf.Seconds(), "fuse-MiB/s")
	b.ReportMetric(mb/td.Seconds(), "disk-MiB/s")
	b.ReportMetric(td.Seconds()/tf.Seconds(), "fuse/disk-throughput")
}

func BenchmarkRandomRead4KCold(b *testing.B) {
	fp, dp := mountBenchFile(b)
	const n = 5000
	var tf, td time.Duration
	b.ResetTimer()
	for range b.N {
		dropCache(b, fp)
		tf += randomReads(b, fp, n)
		dropCache(b, dp)
		td += randomReads(b, dp, n)
	}
	b.ReportMetric(float64(tf.Microseconds())/float64(n*b.N), "fuse-us/read")
	b.ReportMetric(float64(td.Microseconds())/float64(n*b.N), "disk-us/read")
	b.ReportMetric(td.Seconds()/tf.Seconds(), "fuse/disk-throughput")
}

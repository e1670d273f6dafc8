package fs_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/internal/testutil"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/codec"
	rfs "github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/testbed"
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
	b.StopTimer()
	daemonLsR(b, disk, dirs*per+dirs+1)
}

// daemonLsR is the measure as a user sees it: the same tree built
// into a real bootstrap and blob dir, served by the rafsd binary (its
// shipped 5 s entry/attr timeouts, its fetcher, its VFS root), `ls -lR`
// run on that mount and on the disk tree (warm, after one pass each), and
// the daemon's resident memory once it has served the walk.
func daemonLsR(b *testing.B, disk string, entries int) {
	bin, err := testbed.BuildStatic(context.Background(), "./cmd/rafsd")
	if err != nil {
		b.Fatal(err)
	}
	work := b.TempDir()
	blobs, boot, mnt := filepath.Join(work, "blobs"), filepath.Join(work, "bootstrap"), filepath.Join(work, "mnt")
	for _, d := range []string{blobs, mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			b.Fatal(err)
		}
	}
	opts := builder.Options{Version: 6} // defaults: 1 MiB chunks, zstd, blake3
	if _, err := builder.BuildDirFiles(context.Background(), opts, disk, blobs, boot); err != nil {
		b.Fatal(err)
	}
	bootSize := fileSize(b, boot)
	d := testutil.StartRafsdFUSE(b, bin, mnt, nil, "--apisock", filepath.Join(work, "api.sock"), "--bootstrap", boot, "--localfs-dir", blobs, "--log-level", "warn")
	// The daemon returns what decoding the bootstrap left behind in the
	// background (bootstrap.ReleaseMemory): let it.
	time.Sleep(time.Second)
	idle := rssMiB(b, d.Process.Pid)
	lsR := func(dir string) time.Duration {
		start := time.Now()
		cmd := exec.Command("ls", "-lR", dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		lines, _ := countLines(out)
		if err := cmd.Wait(); err != nil {
			b.Fatalf("ls -lR %s: %v", dir, err)
		}
		// One line per entry plus, per directory, a header, a total and
		// a blank line: the mount must list as much as the disk.
		if lines < entries {
			b.Fatalf("ls -lR %s: %d lines for %d entries", dir, lines, entries)
		}
		return time.Since(start)
	}
	lsR(mnt) // warm: dentries, inodes, the fetcher's metadata
	lsR(disk)
	var tm, td time.Duration
	const rounds = 2
	for range rounds {
		tm += lsR(mnt)
		td += lsR(disk)
	}
	b.ReportMetric(tm.Seconds()/rounds, "daemon-lsR-s")
	b.ReportMetric(td.Seconds()/rounds, "disk-lsR-s")
	b.ReportMetric(tm.Seconds()/td.Seconds(), "daemon/disk-lsR-time")
	b.ReportMetric(idle, "daemon-RSS-MiB-mounted")
	b.ReportMetric(rssMiB(b, d.Process.Pid), "daemon-RSS-MiB-after-lsR")
	b.ReportMetric(float64(bootSize)/(1<<20), "bootstrap-MiB")
}

// rssMiB is VmRSS of process pid.
func rssMiB(b *testing.B, pid int) float64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				b.Fatalf("VmRSS %q: %v", v, err)
			}
			return kb / 1024
		}
	}
	b.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

func fileSize(b *testing.B, p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		b.Fatal(err)
	}
	return fi.Size()
}

func countLines(r io.Reader) (int, error) {
	n := 0
	buf := make([]byte, 1<<16)
	for {
		m, err := r.Read(buf)
		n += bytes.Count(buf[:m], []byte("\n"))
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
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

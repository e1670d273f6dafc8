package main

// Issue 4's first "Must show": images built by rafs-image (RAFS v5 and v6,
// compressed) served by the real daemon over localfs and over a real
// registry look exactly like the tree they were built from: diff -r,
// stat (mode, owner, size, mtime, nlink, rdev), readlink, xattrs and reads
// of random ranges.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/internal/testutil"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

// writeRichTree fills dir with every kind of entry an image holds: chunked,
// compressible, sparse and empty files, odd modes and owners, hard links,
// absolute, relative, dangling and root symlinks, devices, a fifo, xattrs
// (also on a directory and a big one), nanosecond mtimes and a directory
// big enough for several READDIR batches.
func writeRichTree(t *testing.T, dir string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"bin", "etc", "home/user", "dev", "many", "deep/a/b/c/d"} {
		must(os.MkdirAll(filepath.Join(dir, d), 0o755))
	}
	rnd := rand.New(rand.NewPCG(4, 4))
	random := func(n int) []byte {
		p := make([]byte, n)
		for k := range p {
			p[k] = byte(rnd.Uint32())
		}
		return p
	}
	files := map[string][]byte{
		"bin/big":          random(3<<20 + 4321), // many 64 KiB chunks, odd tail
		"bin/exact":        random(64 << 10),     // exactly one chunk
		"bin/empty":        nil,
		"etc/text":         bytes.Repeat([]byte("compressible line of text\n"), 40000),
		"home/user/secret": []byte("owned by someone else\n"),
		"deep/a/b/c/d/f":   []byte("deep"),
	}
	for p, b := range files {
		must(os.WriteFile(filepath.Join(dir, p), b, 0o644))
	}
	for k := range 300 {
		must(os.WriteFile(filepath.Join(dir, "many", fmt.Sprintf("entry-with-a-long-name-%03d", k)), nil, 0o644))
	}
	// Sparse: data, a 2 MiB hole, data.
	sp := filepath.Join(dir, "bin/sparse")
	f, err := os.Create(sp)
	must(err)
	_, err = f.Write(random(100))
	must(err)
	_, err = f.WriteAt(random(77), 2<<20+100)
	must(err)
	must(f.Close())
	must(os.Chmod(filepath.Join(dir, "bin/big"), 0o4755)) // setuid kept
	must(os.Chmod(filepath.Join(dir, "home/user/secret"), 0o600))
	must(os.Chown(filepath.Join(dir, "home/user"), 1000, 1000))
	must(os.Chown(filepath.Join(dir, "home/user/secret"), 1000, 100))
	must(os.Link(filepath.Join(dir, "bin/big"), filepath.Join(dir, "bin/big-link")))
	for name, target := range map[string]string{
		"etc/abs": "/etc/passwd", "etc/rel": "../bin/big", "etc/dangling": "../nowhere/at/all",
		"etc/root": "/", "etc/dotdot": "../../../../..",
	} {
		must(os.Symlink(target, filepath.Join(dir, name)))
	}
	must(unix.Mknod(filepath.Join(dir, "dev/null"), syscall.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mknod(filepath.Join(dir, "dev/sda"), syscall.S_IFBLK|0o660, int(unix.Mkdev(8, 0))))
	must(unix.Mkfifo(filepath.Join(dir, "dev/fifo"), 0o644))
	must(unix.Lsetxattr(filepath.Join(dir, "etc/text"), "user.a", []byte("1"), 0))
	must(unix.Lsetxattr(filepath.Join(dir, "etc/text"), "trusted.b", []byte("two"), 0))
	must(unix.Lsetxattr(filepath.Join(dir, "home/user"), "user.big", bytes.Repeat([]byte("v"), 3000), 0))
	// Nanosecond mtimes on everything, children before parents.
	var paths []string
	filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		paths = append(paths, p)
		return err
	})
	for k := len(paths) - 1; k >= 0; k-- {
		ts := []unix.Timespec{{Sec: 1700000000 + int64(k), Nsec: int64(k) * 1001}, {Sec: 1700000000 + int64(k), Nsec: int64(k) * 1001}}
		must(unix.UtimesNanoAt(unix.AT_FDCWD, paths[k], ts, unix.AT_SYMLINK_NOFOLLOW))
	}
}

// compareSource checks the tree mounted at got against src: diff -r,
// fstest.CompareTrees (stat, readlink, xattrs, contents) and reads of
// random ranges of every regular file. It returns the inode number of
// every path, so callers can check they are stable.
func compareSource(t *testing.T, src, got string, seed uint64) map[string]uint64 {
	t.Helper()
	// GNU diff calls two fifos (or devices) a difference it cannot show
	// and exits 1, so dev/ is left to CompareTrees (type, mode, rdev).
	if out, err := exec.Command("diff", "-r", "--no-dereference", "--exclude=dev", src, got).CombinedOutput(); err != nil {
		t.Fatalf("diff -r %s %s: %v\n%s", src, got, err, out)
	}
	fstest.CompareTrees(t, src, got)
	rnd := rand.New(rand.NewPCG(seed, 0))
	inos := map[string]uint64{}
	ranges := 0
	err := filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(got, rel), &st); err != nil {
			return err
		}
		inos[rel] = st.Ino
		if !fi.Mode().IsRegular() || fi.Size() == 0 {
			return nil
		}
		want, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		f, err := os.Open(filepath.Join(got, rel))
		if err != nil {
			return err
		}
		defer f.Close()
		for range 16 {
			off := rnd.IntN(len(want) + 100)
			buf := make([]byte, rnd.IntN(256<<10)+1)
			n, err := f.ReadAt(buf, int64(off))
			lo, hi := min(off, len(want)), min(off+len(buf), len(want))
			if n != hi-lo || !bytes.Equal(buf[:n], want[lo:hi]) {
				return fmt.Errorf("%s: pread [%d,+%d): %d bytes (%v), want %d equal to the source", rel, off, len(buf), n, err, hi-lo)
			}
			ranges++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if ranges < 16*6 { // big, big-link, exact, sparse, text, secret, f
		t.Fatalf("only %d random ranges compared", ranges)
	}
	return inos
}

// TestMountMatchesSource: for RAFS v5 and v6 with different compressors,
// the daemon serves the image over localfs and over a real registry (with
// a blob cache), and both mounts match the source tree. The registry
// daemon is then stopped with SIGTERM and restarted with the registry
// gone: everything reads from the blob cache it left behind, with the
// same inode numbers.
func TestMountMatchesSource(t *testing.T) {
	requireRoot(t)
	src := filepath.Join(t.TempDir(), "src")
	writeRichTree(t, src)
	reg := registrytest.Start(t, registrytest.Options{})
	for k, tc := range []struct {
		name, version, compressor, digester string
	}{
		{"v5-lz4-blake3", "5", "lz4_block", "blake3"},
		{"v6-zstd-blake3", "6", "zstd", "blake3"},
		{"v5-gzip-sha256", "5", "gzip", "sha256"},
		{"v6-lz4-sha256", "6", "lz4_block", "sha256"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := &image{src: src, bootstrap: filepath.Join(dir, "bootstrap"), blobs: filepath.Join(dir, "blobs")}
			if err := os.Mkdir(img.blobs, 0o755); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(filepath.Join(binDir, "rafs-image"), "create", "--fs-version", tc.version,
				"--compressor", tc.compressor, "--digester", tc.digester, "--chunk-size", "0x10000",
				"--bootstrap", img.bootstrap, "--blob-dir", img.blobs, src).CombinedOutput()
			if err != nil {
				t.Fatalf("rafs-image create: %v\n%s", err, out)
			}
			want := fmt.Sprintf("RAFS v%s, chunk size 0x10000, %s/%s", tc.version, tc.compressor, tc.digester)
			if got := bootstrapInfo(t, img.bootstrap); got != want {
				t.Fatalf("rafs-image inspect: %q, want %q", got, want)
			}

			t.Run("localfs", func(t *testing.T) {
				mnt := t.TempDir()
				runningDaemon(t, mnt, "--bootstrap", img.bootstrap, "--localfs-dir", img.blobs)
				compareSource(t, src, mnt, uint64(k))
			})

			t.Run("registry", func(t *testing.T) {
				repo := "test/source-" + tc.name
				pushBlobs(t, reg, repo, img)
				cfg := registryConfig(t, reg.Addr, repo)
				mnt := t.TempDir()
				apisock := filepath.Join(t.TempDir(), "api.sock")
				d := startDaemonAt(t, mnt, apisock, "--bootstrap", img.bootstrap, "--config", cfg)
				d.waitState("RUNNING")
				inos := compareSource(t, src, mnt, uint64(k)+100)

				if err := d.stop(syscall.SIGTERM, 10*time.Second); err != nil {
					t.Fatalf("SIGTERM: %v", err)
				}
				if testutil.MountedOn(mnt) {
					t.Fatal("mount left behind after SIGTERM")
				}
				reg.Stop()
				defer reg.Restart(t)
				d = startDaemonAt(t, mnt, apisock, "--bootstrap", img.bootstrap, "--config", cfg)
				d.waitState("RUNNING")
				again := compareSource(t, src, mnt, uint64(k)+200)
				for p, ino := range inos {
					if again[p] != ino {
						t.Errorf("%s: inode %d after the restart, was %d", p, again[p], ino)
					}
				}
				var be struct {
					ReadCount  uint64 `json:"read_count"`
					ReadErrors uint64 `json:"read_errors"`
				}
				if err := jsonCall(d, "/api/v1/metrics/backend", &be); err != nil || be.ReadCount != 0 || be.ReadErrors != 0 {
					t.Fatalf("backend metrics with a full blob cache: %+v, %v; want no backend reads", be, err)
				}
			})
		})
	}
}

// bootstrapInfo is the first line of rafs-image inspect: "RAFS vN, chunk
// size 0x..., compressor/digester".
func bootstrapInfo(t *testing.T, boot string) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(binDir, "rafs-image"), "inspect", "--bootstrap", boot).CombinedOutput()
	if err != nil {
		t.Fatalf("rafs-image inspect: %v\n%s", err, out)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return first
}

// jsonCall GETs path from d's API and decodes the JSON answer into v.
func jsonCall(d *proc, path string, v any) error {
	return json.Unmarshal(d.mustCall("GET", path, ""), v)
}

// TestNydusFixturesThroughDaemon serves the images built by nydus-image
// itself (v5 sha256 with hardlinks, holes and odd symlinks; v6 zstd) with
// the daemon and its chunk fetcher over localfs: every md5 of the v5 list
// and every source file of the v6 image match.
func TestNydusFixturesThroughDaemon(t *testing.T) {
	requireRoot(t)
	fixtures := testutil.NydusFixtures()
	t.Run("v5-none-sha256", func(t *testing.T) {
		dir := filepath.Join(fixtures, "v5-none-sha256")
		mnt := t.TempDir()
		runningDaemon(t, mnt, "--bootstrap", filepath.Join(dir, "bootstrap"), "--localfs-dir", filepath.Join(dir, "blobs"))
		_, md5s := testutil.ExpectedTree(t, dir)
		testutil.CheckMD5s(t, mnt, md5s, 10)
	})
	t.Run("v6-zstd-blake3", func(t *testing.T) {
		dir := filepath.Join(fixtures, "v6-zstd-blake3")
		mnt := t.TempDir()
		runningDaemon(t, mnt, "--bootstrap", filepath.Join(dir, "bootstrap"), "--localfs-dir", filepath.Join(dir, "blobs"))
		testutil.CheckSourceFiles(t, dir, mnt)
	})
}

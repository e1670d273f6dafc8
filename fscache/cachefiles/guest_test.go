package cachefiles

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/testbed"
	"github.com/rafsd/rafsd/testbed/initramfs"
)

// guestStats is what cachefilesd writes to its -stats file.
type guestStats struct {
	Stats
	BackendBytes uint64
	Pid          int
	Adopted      bool
	Seq          uint64
}

// scenarioTree writes a tree with the shapes an image carries, plus
// data/part-NN files of 512 KiB each (10 MiB in all).
func scenarioTree(t *testing.T, seed int64, extra map[string]int) string {
	dir := t.TempDir()
	files := map[string]int{"bin/tool": 1<<20 + 12345, "etc/conf": 100, "etc/empty": 0, "usr/share/doc/readme": 5000}
	for k, v := range extra {
		files[k] = v
	}
	writeTree(t, dir, seed, files)
	// Incompressible, distinct parts: the blob is mostly these, so one
	// part is 5% of it.
	rng := rand.New(rand.NewSource(seed))
	os.MkdirAll(filepath.Join(dir, "data"), 0o755)
	for i := range 20 {
		b := make([]byte, 512<<10)
		rng.Read(b)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("data/part-%02d", i)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range [][2]string{{"../bin/tool", "usr/tool-link"}, {"nowhere", "dangling"}} {
		if err := os.Symlink(l[0], filepath.Join(dir, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(dir, "empty-dir"), 0o711)
	os.Chmod(filepath.Join(dir, "etc/conf"), 0o600)
	os.Chmod(dir, 0o755)
	return dir
}

func ext4Disk(t testing.TB, dir string, mb int) string {
	img := filepath.Join(t.TempDir(), "disk.img")
	args := []string{"-q", "-F"}
	if dir != "" {
		args = append(args, "-d", dir)
	}
	out, err := exec.Command("mkfs.ext4", append(args, img, fmt.Sprintf("%dM", mb))...).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4 (e2fsprogs): %v\n%s", err, out)
	}
	return img
}

// TestGuestFscache runs the daemon against the real cachefiles on-demand
// device in a QEMU guest (our kernel has CACHEFILES_ONDEMAND and
// EROFS_FS_ONDEMAND; the host's has not): images on a virtio-blk disk
// (localfs backend), the kernel's cache on another, `mount -t erofs none
// -o fsid=...`. It checks: reading 5% of an image moves at most ~10% of
// its blob through the backend; a corrupt blob fails reads with EIO and
// the daemon keeps serving; a restart (device fd handed to a new process)
// leaves the mounted filesystems working; tree hashes equal the host's
// for two images sharing a blob in one domain.
func TestGuestFscache(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the guest scenarios run as root (QEMU, kernel cache in /var/cache)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// Host side: three images. 2 reuses 1's chunks (same blob, one domain);
	// 3 is alone in its domain and its blob is corrupted on the backend.
	root := t.TempDir()
	blobs := filepath.Join(root, "blobs")
	badBlobs := filepath.Join(root, "badblobs")
	os.MkdirAll(blobs, 0o755)
	os.MkdirAll(badBlobs, 0o755)
	src1 := scenarioTree(t, 1, nil)
	im1 := buildImage(t, src1, blobs)
	src2 := scenarioTree(t, 1, map[string]int{"new/file": 700 << 10})
	im2 := buildImage(t, src2, blobs, im1.img)
	src3 := scenarioTree(t, 3, nil)
	im3 := buildImage(t, src3, badBlobs)
	bad := filepath.Join(badBlobs, im3.img.Blobs[0].ID)
	data, _ := os.ReadFile(bad)
	for i := range data {
		data[i] ^= 0xa5
	}
	os.WriteFile(bad, data, 0o644)
	for i, x := range []struct {
		im       *testImage
		id, dom  string
		blobsDir string
	}{{im1, "fsid1", "dom", "/img/blobs"}, {im2, "fsid2", "dom", "/img/blobs"}, {im3, "fsid3", "", "/img/badblobs"}} {
		n := fmt.Sprint(i + 1)
		os.MkdirAll(filepath.Join(root, n), 0o755)
		b, _ := os.ReadFile(x.im.boot)
		os.WriteFile(filepath.Join(root, n, "bootstrap"), b, 0o644)
		req := bindReq(x.id, x.dom, x.im)
		req.Config.MetadataPath = "/img/" + n + "/bootstrap"
		req.Config.BackendConfig, _ = json.Marshal(map[string]string{"dir": x.blobsDir})
		j, _ := json.Marshal(req)
		os.WriteFile(filepath.Join(root, "bind"+n+".json"), j, 0o644)
	}
	imgDisk := ext4Disk(t, root, 64)
	cacheDisk := ext4Disk(t, "", 64)

	bin, err := testbed.BuildStatic(ctx, "./fscache/cachefiles/internal/cachefilesd")
	if err != nil {
		t.Fatal(err)
	}
	phase0 := time.Now()
	vm := testbed.StartTB(t, testbed.Options{Console: consoleLog(t), Disks: []string{imgDisk, cacheDisk}, Files: []initramfs.File{{Path: "/bin/cachefilesd", Source: bin}}})
	t.Logf("VM up in %s", time.Since(phase0).Round(time.Millisecond))
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1 /* MS_RDONLY */, Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vdb", Target: "/var/cache/fscache", FSType: "ext4", Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	p, err := a.Start(ctx, guest.StartRequest{Name: "cachefilesd", Argv: []string{"/bin/cachefilesd",
		"-dir", "/var/cache/fscache", "-stats", "/stats.json", "-restart-file", "/restart",
		"-bind", "/img/bind1.json", "-bind", "/img/bind2.json", "-bind", "/img/bind3.json"}})
	if err != nil {
		t.Fatal(err)
	}
	var mounts []string
	stopped := false
	t.Cleanup(func() {
		for _, m := range mounts {
			a.Unmount(context.Background(), m, 2 /* MNT_DETACH */)
		}
		if !stopped {
			a.StopProcess(context.Background(), guest.StopRequest{Handle: p.Handle, Signal: "KILL"})
		}
	})
	stats := func(want func(guestStats) bool) guestStats {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			var s guestStats
			b, err := a.ReadFile(ctx, "/stats.json", 0)
			if err == nil && json.Unmarshal(b, &s) == nil && want(s) {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("daemon stats never became ready: %s %v", b, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	// fresh returns counts written after the call: everything the guest
	// finished before it is in them.
	fresh := func() guestStats {
		t.Helper()
		first := stats(func(guestStats) bool { return true })
		return stats(func(s guestStats) bool {
			return s.Pid != first.Pid || s.Adopted != first.Adopted || s.Seq >= first.Seq+2
		})
	}
	stats(func(guestStats) bool { return true })
	mount := func(dir, data string) {
		t.Helper()
		if err := a.Mount(ctx, guest.MountRequest{Source: "none", Target: dir, FSType: "erofs", Data: data, Mkdir: true}); err != nil {
			t.Fatalf("mount -t erofs -o %s: %v", data, err)
		}
		mounts = append(mounts, dir)
	}
	mount("/mnt/1", "domain_id=dom,fsid=fsid1")

	start := time.Now()
	phase := func(name string) {
		t.Logf("%s: %s", name, time.Since(start).Round(time.Millisecond))
		start = time.Now()
	}
	phase("daemon up, image 1 mounted")
	// 5% of the image: one 512 KiB part of ~10 MiB.
	part, err := a.ReadFile(ctx, "/mnt/1/data/part-07", 0)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := os.ReadFile(filepath.Join(src1, "data/part-07")); string(part) != string(want) {
		t.Fatalf("data/part-07 differs in the guest (%d bytes, want %d)", len(part), len(want))
	}
	s := fresh()
	blob := im1.img.Blobs[0]
	t.Logf("reading %d of %d bytes (%.1f%%) moved %d of %d blob bytes (%.1f%%); stats %+v", len(part), blob.UncompressedSize,
		100*float64(len(part))/float64(blob.UncompressedSize), s.BackendBytes, blob.CompressedSize,
		100*float64(s.BackendBytes)/float64(blob.CompressedSize), s.Stats)
	if s.BackendBytes == 0 || s.BackendBytes > blob.CompressedSize/10 {
		t.Errorf("reading 5%% of the image moved %d of %d blob bytes (want <= 10%%)", s.BackendBytes, blob.CompressedSize)
	}

	// A corrupt blob: EIO in the guest, the daemon lives on.
	mount("/mnt/3", "fsid=fsid3")
	if _, err := a.ReadFile(ctx, "/mnt/3/data/part-01", 0); err == nil || !strings.Contains(err.Error(), "input/output error") {
		t.Errorf("reading a file of the corrupt blob: %v, want EIO", err)
	}
	phase("corrupt image read")
	if s := fresh(); s.ReadFailures == 0 {
		t.Errorf("no failed READ counted: %+v", s)
	}

	// Restart: the device goes to a new process; the mounts keep working
	// (the kernel re-opens the objects through the successor).
	old := fresh().Pid
	if err := a.WriteFile(ctx, "/restart", nil, 0o644); err != nil {
		t.Fatal(err)
	}
	s = stats(func(s guestStats) bool { return s.Adopted })
	t.Logf("daemon handed over: pid %d -> %d (same pid: exec)", old, s.Pid)
	phase("restart")

	got, err := a.TreeHash(ctx, "/mnt/1", true)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := treehash.Walk(src1)
	if got.Hash != treehash.Sum(want) {
		t.Errorf("image 1: guest tree hash differs from the host's:\n%s", strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
	}
	phase("image 1 tree hash")
	mount("/mnt/2", "domain_id=dom,fsid=fsid2")
	got, err = a.TreeHash(ctx, "/mnt/2", true)
	if err != nil {
		t.Fatal(err)
	}
	want, _ = treehash.Walk(src2)
	if got.Hash != treehash.Sum(want) {
		t.Errorf("image 2: guest tree hash differs from the host's:\n%s", strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
	}
	phase("image 2 mount and tree hash")
	s = fresh()
	t.Logf("after restart: %+v", s)
	if s.OpenFailures != 0 {
		t.Errorf("OPENs refused: %+v", s)
	}
	// Image 2's own blob moved whole; the shared blob only its rest.
	if _, err := a.ReadFile(ctx, "/mnt/3/data/part-02", 0); err == nil {
		t.Errorf("corrupt image read succeeded after restart")
	}

	for _, m := range mounts {
		if err := a.Unmount(ctx, m, 0); err != nil {
			t.Errorf("umount %s: %v", m, err)
		}
	}
	mounts = nil
	stopped = true
	r, err := a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
	if err != nil {
		t.Fatal(err)
	}
	if r.ExitCode != 0 || r.Killed {
		t.Errorf("cachefilesd did not exit cleanly on SIGTERM: %+v\n%s", r, r.Output)
	}
}

// consoleLog keeps the guest console in the test's temp dir and logs its
// daemon lines when the test fails.
func consoleLog(t *testing.T) *os.File {
	f, err := os.Create(filepath.Join(t.TempDir(), "console.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || testing.Verbose() {
			b, _ := os.ReadFile(f.Name())
			var lines []string
			for _, l := range strings.Split(string(b), "\n") {
				if strings.Contains(l, "cachefiles") || strings.Contains(l, "erofs") || strings.Contains(l, "CacheFiles") {
					lines = append(lines, l)
				}
			}
			if len(lines) > 60 {
				lines = append(lines[:30], append([]string{"..."}, lines[len(lines)-30:]...)...)
			}
			t.Logf("guest console (daemon and kernel lines):\n%s", strings.Join(lines, "\n"))
		}
		f.Close()
	})
	return f
}

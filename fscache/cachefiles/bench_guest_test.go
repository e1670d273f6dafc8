package cachefiles

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/testbed"
	"github.com/rafsd/rafsd/testbed/initramfs"
)

// BenchmarkGuestFscacheVsFUSE reads one image's whole tree in a QEMU guest
// twice, cold (nothing cached anywhere) and warm (the page cache dropped,
// the daemon's cache full: cachefiles' cache files, rafsd's blobcache),
// through EROFS over fscache (this package) and through rafsd's FUSE mode,
// and reports each time and the fscache/FUSE ratios. Under TCG the
// absolute numbers are slow; the ratios are the point.
func BenchmarkGuestFscacheVsFUSE(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Fatal("the guest scenarios run as root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir := b.TempDir()
	blobs := filepath.Join(dir, "blobs")
	os.MkdirAll(blobs, 0o755)
	src := b.TempDir()
	files := map[string]int{}
	for i := range 40 {
		files[fmt.Sprintf("d%d/f%02d", i%5, i)] = 256<<10 + i*1000
	}
	writeTree(b, src, 21, files)
	os.Chmod(src, 0o755)
	im := buildImage(b, src, blobs)
	bt, _ := os.ReadFile(im.boot)
	os.WriteFile(filepath.Join(dir, "bootstrap"), bt, 0o644)
	req := bindReq("bench", "", im)
	req.Config.MetadataPath = "/img/bootstrap"
	req.Config.BackendConfig = json.RawMessage(`{"dir":"/img/blobs"}`)
	j, _ := json.Marshal(req)
	os.WriteFile(filepath.Join(dir, "bind.json"), j, 0o644)
	want, _ := treehash.Walk(src)

	imgDisk := ext4Disk(b, dir, 64)
	cacheDisk := ext4Disk(b, "", 128)
	daemon, err := testbed.BuildStatic(ctx, "./fscache/cachefiles/internal/cachefilesd")
	if err != nil {
		b.Fatal(err)
	}
	rafsd, err := testbed.BuildStatic(ctx, "./cmd/rafsd")
	if err != nil {
		b.Fatal(err)
	}
	vm := testbed.StartTB(b, testbed.Options{Disks: []string{imgDisk, cacheDisk},
		Files: []initramfs.File{{Path: "/bin/cachefilesd", Source: daemon}, {Path: "/bin/rafsd", Source: rafsd}}})
	a := vm.Agent()
	must := func(err error) {
		b.Helper()
		if err != nil {
			b.Fatal(err)
		}
	}
	must(a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1, Mkdir: true}))
	must(a.Mount(ctx, guest.MountRequest{Source: "/dev/vdb", Target: "/var/cache", FSType: "ext4", Mkdir: true}))
	read := func(mnt string) time.Duration {
		b.Helper()
		r, err := a.Exec(ctx, guest.ExecRequest{Argv: []string{"/bin/cachefilesd", "-drop-caches"}, TimeoutMS: 60000})
		must(err)
		if r.ExitCode != 0 {
			b.Fatalf("drop caches: %s", r.Stderr)
		}
		start := time.Now()
		got, err := a.TreeHash(ctx, mnt, false)
		must(err)
		if got.Hash != treehash.Sum(want) {
			b.Fatalf("%s: tree hash differs from the host's", mnt)
		}
		return time.Since(start)
	}
	var cold, warm [2]time.Duration
	b.ResetTimer()
	for round := range b.N {
		// Fresh cache directories each round, so "cold" is cold.
		cacheDir := fmt.Sprintf("/var/cache/fscache-%d", round)
		stats := fmt.Sprintf("/var/cache/stats-%d.json", round)
		p, err := a.Start(ctx, guest.StartRequest{Name: "cachefilesd", Argv: []string{"/bin/cachefilesd",
			"-dir", cacheDir, "-bind", "/img/bind.json", "-stats", stats}})
		must(err)
		wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
		must(waitFile(wctx, a, stats))
		wcancel()
		must(a.Mount(ctx, guest.MountRequest{Source: "none", Target: "/mnt/fscache", FSType: "erofs", Data: "fsid=bench", Mkdir: true}))
		cold[0] += read("/mnt/fscache")
		warm[0] += read("/mnt/fscache")
		must(a.Unmount(ctx, "/mnt/fscache", 0))
		_, err = a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
		must(err)

		cfg := fmt.Sprintf(`{"device":{"backend":{"type":"localfs","config":{"dir":"/img/blobs"}},`+
			`"cache":{"type":"blobcache","config":{"work_dir":"/var/cache/blobcache-%d"}}},"mode":"direct"}`, round)
		must(a.WriteFile(ctx, "/fuse.json", []byte(cfg), 0o644))
		must(a.Mkdir(ctx, "/mnt/fuse", 0o755))
		p, err = a.Start(ctx, guest.StartRequest{Name: "rafsd", Argv: []string{"/bin/rafsd", "--mountpoint", "/mnt/fuse",
			"--bootstrap", "/img/bootstrap", "--config", "/fuse.json", "--log-level", "warn"}})
		must(err)
		wctx, wcancel = context.WithTimeout(ctx, 60*time.Second)
		must(waitFuse(wctx, a, "/mnt/fuse"))
		wcancel()
		cold[1] += read("/mnt/fuse")
		warm[1] += read("/mnt/fuse")
		_, err = a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
		must(err)
		a.Unmount(ctx, "/mnt/fuse", 2)
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(cold[0].Milliseconds())/n, "fscache-cold-ms")
	b.ReportMetric(float64(warm[0].Milliseconds())/n, "fscache-warm-ms")
	b.ReportMetric(float64(cold[1].Milliseconds())/n, "fuse-cold-ms")
	b.ReportMetric(float64(warm[1].Milliseconds())/n, "fuse-warm-ms")
	b.ReportMetric(float64(cold[0])/float64(cold[1]), "cold-fscache/fuse")
	b.ReportMetric(float64(warm[0])/float64(warm[1]), "warm-fscache/fuse")
}

// waitFile polls the guest until path exists.
func waitFile(ctx context.Context, a *guest.Client, path string) error {
	for {
		if _, err := a.ReadFile(ctx, path, 1); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s never appeared: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitFuse polls the guest's mountinfo until target is a FUSE mount.
func waitFuse(ctx context.Context, a *guest.Client, target string) error {
	for {
		b, err := a.ReadFile(ctx, "/proc/self/mountinfo", 0)
		if err != nil {
			return err
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 4 && f[4] == target && strings.Contains(l, " - fuse") {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not mounted: %w", target, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

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
// and reports each time and the fscache/FUSE ratios; fscache runs twice,
// with and without the daemon's read-ahead, and logs where its READs
// spent their time. Under TCG the absolute numbers are slow; the ratios
// are the point.
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
	// 0: fscache (this package, with read-ahead), 1: rafsd FUSE,
	// 2: fscache without read-ahead (what the kernel asks for only).
	var cold, warm [3]time.Duration
	fscacheRound := func(round, v int, extra ...string) {
		b.Helper()
		// Fresh cache directories each round, so "cold" is cold.
		cacheDir := fmt.Sprintf("/var/cache/fscache-%d-%d", round, v)
		stats := fmt.Sprintf("/var/cache/stats-%d-%d.json", round, v)
		p, err := a.Start(ctx, guest.StartRequest{Name: "cachefilesd", Argv: append([]string{"/bin/cachefilesd",
			"-dir", cacheDir, "-bind", "/img/bind.json", "-stats", stats}, extra...)})
		must(err)
		wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
		must(waitFile(wctx, a, stats))
		wcancel()
		must(a.Mount(ctx, guest.MountRequest{Source: "none", Target: "/mnt/fscache", FSType: "erofs", Data: "fsid=bench", Mkdir: true}))
		cold[v] += read("/mnt/fscache")
		time.Sleep(300 * time.Millisecond) // a fresh stats file
		if raw, err := a.ReadFile(ctx, stats, 0); err == nil {
			var s guestStats
			if json.Unmarshal(raw, &s) == nil && s.Reads > 0 {
				ms := func(ns uint64) float64 { return float64(ns) / 1e6 }
				b.Logf("round %d fscache%v cold: %d READs, %.0f KiB asked per READ, %.1f ms per READ (fetch %.0f ms, pwrite %.0f ms, "+
					"READ_COMPLETE %.0f ms in all); read-ahead %d fills, %d KiB, %.0f ms; backend %d KiB; %d KiB written",
					round, extra, s.Reads, float64(s.ReadBytes)/float64(s.Reads)/1024, ms(s.ReadNanos)/float64(s.Reads),
					ms(s.FetchNanos), ms(s.WriteNanos), ms(s.CompleteNanos), s.ReadAheads, s.ReadAheadBytes>>10, ms(s.ReadAheadNanos),
					s.BackendBytes>>10, s.BytesWritten>>10)
			}
		}
		warm[v] += read("/mnt/fscache")
		must(a.Unmount(ctx, "/mnt/fscache", 0))
		_, err = a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
		must(err)
	}
	fuseRound := func(round int) {
		b.Helper()
		cfg := fmt.Sprintf(`{"device":{"backend":{"type":"localfs","config":{"dir":"/img/blobs"}},`+
			`"cache":{"type":"blobcache","config":{"work_dir":"/var/cache/blobcache-%d"}}},"mode":"direct"}`, round)
		must(a.WriteFile(ctx, "/fuse.json", []byte(cfg), 0o644))
		must(a.Mkdir(ctx, "/mnt/fuse", 0o755))
		p, err := a.Start(ctx, guest.StartRequest{Name: "rafsd", Argv: []string{"/bin/rafsd", "--mountpoint", "/mnt/fuse",
			"--bootstrap", "/img/bootstrap", "--config", "/fuse.json", "--log-level", "warn"}})
		must(err)
		wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
		must(waitFuse(wctx, a, "/mnt/fuse"))
		wcancel()
		cold[1] += read("/mnt/fuse")
		warm[1] += read("/mnt/fuse")
		_, err = a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
		must(err)
		a.Unmount(ctx, "/mnt/fuse", 2)
	}
	// One untimed round of each mode first: whichever mode ran first
	// looked slower (the same fscache variant measured 1.0-1.45x slower
	// run first than run third, 6 paired runs), most likely TCG
	// translating the guest kernel's and the daemon's code paths on
	// their first pass.
	fscacheRound(-1, 0)
	fuseRound(-1)
	cold, warm = [3]time.Duration{}, [3]time.Duration{}
	b.ResetTimer()
	for round := range b.N {
		fscacheRound(round, 0)
		fscacheRound(round, 2, "-no-readahead")
		fuseRound(round)
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(cold[0].Milliseconds())/n, "fscache-cold-ms")
	b.ReportMetric(float64(warm[0].Milliseconds())/n, "fscache-warm-ms")
	b.ReportMetric(float64(cold[2].Milliseconds())/n, "fscache-nora-cold-ms")
	b.ReportMetric(float64(cold[1].Milliseconds())/n, "fuse-cold-ms")
	b.ReportMetric(float64(warm[1].Milliseconds())/n, "fuse-warm-ms")
	b.ReportMetric(float64(cold[0])/float64(cold[1]), "cold-fscache/fuse")
	b.ReportMetric(float64(cold[2])/float64(cold[1]), "cold-fscache-nora/fuse")
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

package cachefiles

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/testbed"
	"github.com/rafsd/rafsd/testbed/initramfs"
)

// TestGuestRafsdSingleton drives `rafsd singleton --fscache` in the guest
// the way nydus-snapshotter does: PUT /api/v2/blobs for two images sharing
// a blob in one domain and a third in its own whose blob is corrupt on the
// backend (a localfs dir on a virtio-blk disk), `mount -t erofs -o
// domain_id=,fsid=`. Reading 5% of image 1 moves at most 10% of its blob
// through the backend, as GET /api/v1/metrics/backend counts it; reading
// image 3 fails with EIO and the daemon keeps serving images 1 and 2,
// whose tree hashes equal the host's; GET/DELETE /api/v2/blobs, SIGTERM.
// The cache is bound under a tag (--fscache-tag).
func TestGuestRafsdSingleton(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the guest scenarios run as root (QEMU, kernel cache in /var/cache)")
	}
	root, err := testbed.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("git", "-C", root, "ls-files", "--error-unmatch", "cmd/rafsd/singleton.go").CombinedOutput(); err != nil {
		t.Fatalf("cmd/rafsd has no committed singleton mode: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	dir := t.TempDir()
	blobs := filepath.Join(dir, "blobs")
	os.MkdirAll(blobs, 0o755)
	src1 := scenarioTree(t, 11, nil)
	im1 := buildImage(t, src1, blobs)
	src2 := scenarioTree(t, 11, map[string]int{"new/file": 300 << 10})
	im2 := buildImage(t, src2, blobs, im1.img)
	badBlobs := filepath.Join(dir, "badblobs")
	os.MkdirAll(badBlobs, 0o755)
	im3 := buildImage(t, scenarioTree(t, 12, nil), badBlobs)
	bad := filepath.Join(badBlobs, im3.img.Blobs[0].ID)
	data, err := os.ReadFile(bad)
	if err != nil {
		t.Fatal(err)
	}
	for i := range data {
		data[i] ^= 0xa5
	}
	os.WriteFile(bad, data, 0o644)
	for i, im := range []*testImage{im1, im2, im3} {
		n := fmt.Sprint(i + 1)
		os.MkdirAll(filepath.Join(dir, n), 0o755)
		b, _ := os.ReadFile(im.boot)
		os.WriteFile(filepath.Join(dir, n, "bootstrap"), b, 0o644)
		domain, blobDir := "dom", "/img/blobs"
		if im == im3 {
			domain, blobDir = "", "/img/badblobs"
		}
		req := bindReq("fsid"+n, domain, im)
		req.Config.MetadataPath = "/img/" + n + "/bootstrap"
		req.Config.BackendConfig, _ = json.Marshal(map[string]string{"dir": blobDir})
		j, _ := json.Marshal(req)
		os.WriteFile(filepath.Join(dir, "bind"+n+".json"), j, 0o644)
	}
	g := startSingleton(ctx, t, false, ext4Disk(t, dir, 64), "--fscache-tag", "rafsdtag", "--fscache-threads", "4", "--id", "single")
	a, expect, mount := g.a, g.expect, g.mount
	// The kernel registered the cache under --fscache-tag.
	if caches, err := a.ReadFile(ctx, "/proc/fs/fscache/caches", 0); err != nil || !strings.Contains(string(caches), "rafsdtag") {
		t.Errorf("/proc/fs/fscache/caches does not list the tag rafsdtag: %v\n%s", err, caches)
	}
	expect("PUT", "/api/v2/blobs", "/img/bind1.json", 204)
	expect("PUT", "/api/v2/blobs", "/img/bind2.json", 204)
	expect("PUT", "/api/v2/blobs", "/img/bind3.json", 204)
	expect("PUT", "/api/v2/blobs", "/img/bind1.json", 409)
	var list []BlobInfo
	if err := json.Unmarshal([]byte(expect("GET", "/api/v2/blobs?domain_id=dom", "", 200)), &list); err != nil || len(list) != 4 {
		t.Fatalf("GET /api/v2/blobs: %v %+v (want 2 bootstraps and 2 data blobs)", err, list)
	}
	mount("/mnt/1", "domain_id=dom,fsid=fsid1")
	checkPartialRead(ctx, t, a, "/api.sock", "/mnt/1", "fsid1", src1, im1, "localfs")
	// The corrupt image fails with EIO; the others keep serving below.
	mount("/mnt/3", "fsid=fsid3")
	if _, err := a.ReadFile(ctx, "/mnt/3/data/part-01", 0); err == nil || !strings.Contains(err.Error(), "input/output error") {
		t.Errorf("reading a file of the corrupt blob: %v, want EIO", err)
	}
	if _, err := a.ReadFile(ctx, "/mnt/3/bin/tool", 0); err == nil || !strings.Contains(err.Error(), "input/output error") {
		t.Errorf("reading a second file of the corrupt blob: %v, want EIO", err)
	}
	for n, src := range []string{src1, src2} {
		mnt := fmt.Sprintf("/mnt/%d", n+1)
		if n > 0 {
			mount(mnt, fmt.Sprintf("domain_id=dom,fsid=fsid%d", n+1))
		}
		got, err := a.TreeHash(ctx, mnt, true)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := treehash.Walk(src)
		if got.Hash != treehash.Sum(want) {
			t.Errorf("image %d: guest tree hash differs:\n%s", n+1, strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
		}
	}
	var info struct {
		State   string `json:"state"`
		Fscache Stats  `json:"fscache"`
	}
	json.Unmarshal([]byte(expect("GET", "/api/v2/daemon", "", 200)), &info)
	t.Logf("daemon: %+v", info)
	if info.State != "RUNNING" || info.Fscache.OpenFailures != 0 || info.Fscache.ReadFailures == 0 {
		t.Errorf("daemon info %+v (want RUNNING, no OPEN refused, the corrupt blob's READs failed)", info)
	}
	// Three bootstraps, image 2's own blob, the shared blob opened once
	// for both images, image 3's blob.
	if info.Fscache.Opens != 6 {
		t.Errorf("%d OPENs, want 6 (the shared blob once)", info.Fscache.Opens)
	}
	g.unmountAll()
	expect("DELETE", "/api/v2/blobs?domain_id=dom&blob_id=fsid1", "", 204)
	expect("DELETE", "/api/v2/blobs?domain_id=dom&blob_id=fsid1", "", 404)
	expect("DELETE", "/api/v2/blobs?domain_id=dom", "", 204)
	expect("DELETE", "/api/v2/blobs?domain_id=fsid3", "", 204)
	if out := expect("GET", "/api/v2/blobs", "", 200); strings.TrimSpace(out) != "[]" {
		t.Errorf("after unbinding all: %s", out)
	}
	g.stop()
}

// guestSingleton is `rafsd singleton --fscache` in a QEMU guest, the
// host directory given as an ext4 disk on /img, an empty cache disk on
// /var/cache/fscache, its API on /api.sock.
type guestSingleton struct {
	t       *testing.T
	ctx     context.Context
	a       *guest.Client
	handle  int
	mounts  []string // erofs mounts to undo
	stopped bool
}

// startSingleton boots a guest (with networking if net) with imgDisk, a
// static rafsd and unixhttp, starts `rafsd singleton` with args added and
// waits for its API. Cleanup unmounts what is left and kills the daemon.
func startSingleton(ctx context.Context, t *testing.T, net bool, imgDisk string, args ...string) *guestSingleton {
	t.Helper()
	var files []initramfs.File
	for _, p := range []string{"./cmd/rafsd", "./fscache/cachefiles/internal/unixhttp"} {
		bin, err := testbed.BuildStatic(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, initramfs.File{Path: "/bin/" + filepath.Base(p), Source: bin})
	}
	vm := testbed.StartTB(t, testbed.Options{Net: net, Disks: []string{imgDisk, ext4Disk(t, "", 64)}, Console: consoleLog(t), Files: files})
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1, Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vdb", Target: "/var/cache/fscache", FSType: "ext4", Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	argv := append([]string{"/bin/rafsd", "singleton", "--fscache", "/var/cache/fscache", "--apisock", "/api.sock", "--log-level", "info"}, args...)
	p, err := a.Start(ctx, guest.StartRequest{Name: "rafsd", Argv: argv})
	if err != nil {
		t.Fatal(err)
	}
	g := &guestSingleton{t: t, ctx: ctx, a: a, handle: p.Handle}
	t.Cleanup(func() {
		for _, m := range g.mounts {
			a.Unmount(context.Background(), m, 2)
		}
		if !g.stopped {
			a.StopProcess(context.Background(), guest.StopRequest{Handle: g.handle, Signal: "KILL"})
		}
	})
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if st, _ := guestAPI(ctx, t, a, "/api.sock", "GET", "/api/v1/daemon", ""); st == 200 {
			return g
		}
		if time.Now().After(deadline) {
			t.Fatal("rafsd singleton API never answered")
		}
	}
}

// expect calls the daemon's API and fails the test unless it answers
// with status want; it returns the body.
func (g *guestSingleton) expect(method, path, body string, want int) string {
	g.t.Helper()
	st, out := guestAPI(g.ctx, g.t, g.a, "/api.sock", method, path, body)
	if st != want {
		g.t.Fatalf("%s %s: %d %s, want %d", method, path, st, out, want)
	}
	return out
}

// mount mounts an image served by the daemon on mnt (`mount -t erofs -o data`).
func (g *guestSingleton) mount(mnt, data string) {
	g.t.Helper()
	if err := g.a.Mount(g.ctx, guest.MountRequest{Source: "none", Target: mnt, FSType: "erofs", Data: data, Mkdir: true}); err != nil {
		g.t.Fatalf("mount -t erofs -o %s: %v", data, err)
	}
	g.mounts = append(g.mounts, mnt)
}

// unmountAll unmounts every image mounted so far.
func (g *guestSingleton) unmountAll() {
	g.t.Helper()
	for _, m := range g.mounts {
		if err := g.a.Unmount(g.ctx, m, 0); err != nil {
			g.t.Errorf("umount %s: %v", m, err)
		}
	}
	g.mounts = nil
}

// stop sends the daemon SIGTERM and checks that it exits cleanly.
func (g *guestSingleton) stop() {
	g.t.Helper()
	g.stopped = true
	r, err := g.a.StopProcess(g.ctx, guest.StopRequest{Handle: g.handle, GraceMS: 10000})
	if err != nil {
		g.t.Fatal(err)
	}
	if r.ExitCode != 0 || r.Killed {
		g.t.Errorf("rafsd singleton did not exit cleanly on SIGTERM: %+v\n%s", r, r.Output)
	}
}

// checkPartialRead reads data/part-07 of scenario image im (one 512 KiB
// part: 5% of it), mounted on mnt from src, and checks its bytes; then,
// through the daemon's GET /api/v1/metrics/backend?id= on sock, that the
// read moved at most 10% of the image's blob through a backend of type
// backendType, and that the chunks the kernel asked for together were
// fetched together (merged up to the merging size), not one request per
// chunk.
func checkPartialRead(ctx context.Context, t *testing.T, a *guest.Client, sock, mnt, id, src string, im *testImage, backendType string) {
	t.Helper()
	part, err := a.ReadFile(ctx, mnt+"/data/part-07", 0)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := os.ReadFile(filepath.Join(src, "data/part-07")); string(part) != string(want) {
		t.Fatalf("%s/data/part-07 differs in the guest (%d bytes, want %d)", mnt, len(part), len(want))
	}
	path := "/api/v1/metrics/backend?id=" + id
	st, out := guestAPI(ctx, t, a, sock, "GET", path, "")
	var m struct {
		BackendType     string `json:"backend_type"`
		ReadCount       uint64 `json:"read_count"`
		ReadAmountTotal uint64 `json:"read_amount_total"`
	}
	if err := json.Unmarshal([]byte(out), &m); st != 200 || err != nil {
		t.Fatalf("GET %s: %d %s (%v)", path, st, out, err)
	}
	blob := im.img.Blobs[0]
	t.Logf("reading %d of %d bytes (%.1f%%) moved %d of %d blob bytes (%.1f%%) in %d %s requests", len(part), blob.UncompressedSize,
		100*float64(len(part))/float64(blob.UncompressedSize), m.ReadAmountTotal, blob.CompressedSize,
		100*float64(m.ReadAmountTotal)/float64(blob.CompressedSize), m.ReadCount, m.BackendType)
	if m.BackendType != backendType || m.ReadAmountTotal == 0 || m.ReadAmountTotal > blob.CompressedSize/10 {
		t.Errorf("reading 5%% of the image moved %d of %d blob bytes through %q (want <= 10%% through %s)", m.ReadAmountTotal, blob.CompressedSize, m.BackendType, backendType)
	}
	if chunks := uint64(len(part)) / uint64(im.img.ChunkSize); m.ReadCount >= chunks {
		t.Errorf("%d backend requests for the %d chunks read: not merged", m.ReadCount, chunks)
	}
}

// guestAPI calls a unix-socket HTTP API in the guest through unixhttp and
// returns the status (0 if the call failed) and the body (or stderr).
func guestAPI(ctx context.Context, t *testing.T, a *guest.Client, sock, method, path, body string) (int, string) {
	t.Helper()
	argv := []string{"/bin/unixhttp", sock, method, path}
	if body != "" {
		argv = append(argv, body)
	}
	r, err := a.Exec(ctx, guest.ExecRequest{Argv: argv, TimeoutMS: 60000})
	if err != nil {
		t.Fatal(err)
	}
	code, rest, _ := strings.Cut(string(r.Stdout), "\n")
	var status int
	fmt.Sscan(code, &status)
	if status == 0 {
		return 0, string(r.Stderr)
	}
	return status, rest
}

// TestGuestRafsdTakeover replaces `rafsd singleton --fscache` twice under
// a mounted image while a reader loops over it, as nydus-snapshotter does
// through its supervisor (fsup here): daemon A hands the /dev/cachefiles fd
// and its bindings over (sendfd); B is started with --upgrade, takes over
// (READY) and A is SIGTERMed; then B is SIGKILLed and C, started with B's
// command line without --upgrade, finds the device held and B's API
// socket dead, and takes over from the supervisor. Each time a read of
// data nobody fetched yet is started in the gap: it must wait, not fail,
// and complete with the right bytes once the successor serves. Every byte
// the reader reads is compared with the host's, and the tree hash at the
// end equals the host's.
func TestGuestRafsdTakeover(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the guest scenarios run as root (QEMU, kernel cache in /var/cache)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	dir := t.TempDir()
	blobs := filepath.Join(dir, "blobs")
	os.MkdirAll(blobs, 0o755)
	src := scenarioTree(t, 31, nil)
	im := buildImage(t, src, blobs)
	b, _ := os.ReadFile(im.boot)
	os.WriteFile(filepath.Join(dir, "bootstrap"), b, 0o644)
	req := bindReq("tk", "", im)
	req.Config.MetadataPath = "/img/bootstrap"
	req.Config.BackendConfig = json.RawMessage(`{"dir":"/img/blobs"}`)
	j, _ := json.Marshal(req)
	os.WriteFile(filepath.Join(dir, "bind.json"), j, 0o644)
	imgDisk := ext4Disk(t, dir, 64)
	cacheDisk := ext4Disk(t, "", 64)
	var files []initramfs.File
	for _, p := range []string{"./cmd/rafsd", "./fscache/cachefiles/internal/unixhttp", "./fscache/cachefiles/internal/fsup"} {
		bin, err := testbed.BuildStatic(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, initramfs.File{Path: "/bin/" + filepath.Base(p), Source: bin})
	}
	vm := testbed.StartTB(t, testbed.Options{Disks: []string{imgDisk, cacheDisk}, Console: consoleLog(t), Files: files})
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1, Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vdb", Target: "/var/cache/fscache", FSType: "ext4", Mkdir: true}); err != nil {
		t.Fatal(err)
	}

	var (
		procs   = map[string]int{} // live guest processes by name
		mounted bool
	)
	t.Cleanup(func() {
		if mounted {
			a.Unmount(context.Background(), "/mnt/tk", 2)
		}
		for _, h := range procs {
			a.StopProcess(context.Background(), guest.StopRequest{Handle: h, Signal: "KILL"})
		}
	})
	start := func(name string, argv ...string) {
		t.Helper()
		p, err := a.Start(ctx, guest.StartRequest{Name: name, Argv: argv})
		if err != nil {
			t.Fatal(err)
		}
		procs[name] = p.Handle
	}
	stop := func(name, sig string) *guest.ProcessResult {
		t.Helper()
		r, err := a.StopProcess(ctx, guest.StopRequest{Handle: procs[name], Signal: sig, GraceMS: 10000})
		if err != nil {
			t.Fatal(err)
		}
		delete(procs, name)
		return r
	}
	expect := func(sock, method, path, body string, want int) string {
		t.Helper()
		st, out := guestAPI(ctx, t, a, sock, method, path, body)
		if st != want {
			t.Fatalf("%s %s on %s: %d %s, want %d", method, path, sock, st, out, want)
		}
		return out
	}
	waitState := func(sock, want string) {
		t.Helper()
		var last string
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			st, out := guestAPI(ctx, t, a, sock, "GET", "/api/v1/daemon", "")
			var info struct{ State string }
			if st == 200 && json.Unmarshal([]byte(out), &info) == nil {
				if info.State == want {
					return
				}
				last = info.State
			}
		}
		t.Fatalf("daemon on %s never reached %s (last %q)", sock, want, last)
	}
	// What nydus-snapshotter does after a daemon runs and after each bind.
	fetchStates := func(sock string) {
		t.Helper()
		expect("/supctl.sock", "PUT", "/recv", "", 204)
		expect(sock, "PUT", "/api/v1/daemon/fuse/sendfd", "", 204)
		expect("/supctl.sock", "GET", "/wait", "", 200)
	}
	takeover := func(sock string) {
		t.Helper()
		waitState(sock, "INIT")
		expect("/supctl.sock", "PUT", "/send", "", 204)
		expect(sock, "PUT", "/api/v1/daemon/fuse/takeover", "", 204)
		expect("/supctl.sock", "GET", "/wait", "", 200)
		waitState(sock, "READY")
	}
	// gapRead reads a file nobody read yet; it must not finish before the
	// successor serves, and must then return the host's bytes.
	gapRead := func(rel string) <-chan error {
		ch := make(chan error, 1)
		go func() {
			got, err := a.ReadFile(ctx, "/mnt/tk/"+rel, 0)
			if err == nil {
				if want, _ := os.ReadFile(filepath.Join(src, rel)); string(got) != string(want) {
					err = fmt.Errorf("%s: %d bytes differ from the host's %d", rel, len(got), len(want))
				}
			}
			ch <- err
		}()
		select {
		case err := <-ch:
			t.Fatalf("read of %s started in the gap ended before a successor served: %v", rel, err)
		case <-time.After(2 * time.Second):
		}
		return ch
	}
	gapDone := func(rel string, ch <-chan error) {
		t.Helper()
		select {
		case err := <-ch:
			if err != nil {
				t.Fatalf("read started in the gap: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Fatalf("read of %s started in the gap never completed", rel)
		}
	}

	start("fsup", "/bin/fsup", "-sock", "/sup.sock", "-ctl", "/supctl.sock")
	base := []string{"/bin/rafsd", "singleton", "--fscache", "/var/cache/fscache", "--fscache-threads", "4",
		"--supervisor", "/sup.sock", "--id", "single", "--log-level", "info"}
	start("rafsd-a", append(base, "--apisock", "/api-a.sock")...)
	waitState("/api-a.sock", "RUNNING")
	expect("/api-a.sock", "PUT", "/api/v2/blobs", "/img/bind.json", 204)
	fetchStates("/api-a.sock")
	if err := a.Mount(ctx, guest.MountRequest{Source: "none", Target: "/mnt/tk", FSType: "erofs", Data: "fsid=tk", Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	mounted = true

	// The reader loops over part of the tree; parts 15 and 16 are left for
	// the reads in the gaps.
	loop := []string{"bin/tool", "etc/conf", "usr/share/doc/readme"}
	for i := range 10 {
		loop = append(loop, fmt.Sprintf("data/part-%02d", i))
	}
	var (
		reads, bad atomic.Int64
		firstBad   atomic.Value
		done       = make(chan struct{})
		readerDone = make(chan struct{})
	)
	go func() {
		defer close(readerDone)
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			rel := loop[i%len(loop)]
			got, err := a.ReadFile(ctx, "/mnt/tk/"+rel, 0)
			if err == nil {
				if want, _ := os.ReadFile(filepath.Join(src, rel)); string(got) != string(want) {
					err = fmt.Errorf("%s: %d bytes differ from the host's", rel, len(got))
				}
			}
			if err != nil {
				if bad.Add(1) == 1 {
					firstBad.Store(err.Error())
				}
			}
			reads.Add(1)
		}
	}()
	waitReads := func(n int64) {
		t.Helper()
		for deadline := time.Now().Add(120 * time.Second); reads.Load() < n; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("reader stuck at %d reads (want %d)", reads.Load(), n)
			}
		}
	}
	waitReads(int64(len(loop)) / 2)

	// Live upgrade: B takes over while A serves, then A gets SIGTERM.
	start("rafsd-b", append(base, "--apisock", "/api-b.sock", "--upgrade")...)
	takeover("/api-b.sock")
	atUpgrade := reads.Load()
	if r := stop("rafsd-a", "TERM"); r.ExitCode != 0 || r.Killed {
		t.Fatalf("daemon A did not exit cleanly on SIGTERM: %+v\n%s", r, r.Output)
	}
	g := gapRead("data/part-15")
	expect("/api-b.sock", "PUT", "/api/v1/daemon/start", "", 204)
	waitState("/api-b.sock", "RUNNING")
	gapDone("data/part-15", g)
	fetchStates("/api-b.sock")
	waitReads(reads.Load() + int64(len(loop)))
	t.Logf("upgrade A -> B: %d reads before, %d so far", atUpgrade, reads.Load())

	// Failover: B is SIGKILLed; C starts with B's command line minus
	// --upgrade, sees the device busy and B's socket dead, and waits.
	if r := stop("rafsd-b", "KILL"); r.Signal == "" && !r.Killed {
		t.Fatalf("daemon B survived SIGKILL: %+v", r)
	}
	atKill := reads.Load()
	g = gapRead("data/part-16")
	start("rafsd-c", append(base, "--apisock", "/api-b.sock")...)
	takeover("/api-b.sock")
	expect("/api-b.sock", "PUT", "/api/v1/daemon/start", "", 204)
	waitState("/api-b.sock", "RUNNING")
	gapDone("data/part-16", g)
	waitReads(reads.Load() + int64(len(loop)))
	close(done)
	<-readerDone
	t.Logf("failover B -> C: %d reads before the kill, %d in all, %d bad", atKill, reads.Load(), bad.Load())
	if n := bad.Load(); n != 0 {
		t.Fatalf("the reader saw %d bad reads across the takeovers, first: %v", n, firstBad.Load())
	}
	got, err := a.TreeHash(ctx, "/mnt/tk", true)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := treehash.Walk(src)
	if got.Hash != treehash.Sum(want) {
		t.Errorf("guest tree hash after the takeovers differs:\n%s", strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
	}
	var info struct {
		State   string `json:"state"`
		Fscache Stats  `json:"fscache"`
	}
	json.Unmarshal([]byte(expect("/api-b.sock", "GET", "/api/v2/daemon", "", 200)), &info)
	t.Logf("daemon C: %+v", info)
	if info.Fscache.ReadFailures != 0 || info.Fscache.OpenFailures != 0 || info.Fscache.Opens == 0 {
		t.Errorf("daemon C counters: %+v (want OPENs of the re-opened objects, no failures)", info.Fscache)
	}
	if err := a.Unmount(ctx, "/mnt/tk", 0); err != nil {
		t.Errorf("umount: %v", err)
	}
	mounted = false
	if r := stop("rafsd-c", "TERM"); r.ExitCode != 0 || r.Killed {
		t.Errorf("daemon C did not exit cleanly on SIGTERM: %+v\n%s", r, r.Output)
	}
	stop("fsup", "TERM")
}

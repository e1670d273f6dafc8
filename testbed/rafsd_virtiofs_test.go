package testbed

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/internal/testutil"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/testbed/initramfs"
)

// hostRafsd is `rafsd virtiofs` running on the host, driven through its
// API socket.
type hostRafsd struct {
	cmd    *exec.Cmd
	out    *testutil.SyncBuffer
	exited chan struct{}
	err    error
	hc     *http.Client
}

func startHostRafsd(t testing.TB, ctx context.Context, sock, apisock string) *hostRafsd {
	t.Helper()
	bin, err := BuildStatic(ctx, "./cmd/rafsd")
	if err != nil {
		t.Fatal(err)
	}
	d := &hostRafsd{out: &testutil.SyncBuffer{}, exited: make(chan struct{})}
	d.cmd = exec.Command(bin, "virtiofs", "--sock", sock, "--apisock", apisock, "--log-level", "info", "--thread-num", "4")
	d.cmd.Stdout, d.cmd.Stderr = d.out, d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.exited:
			case <-time.After(5 * time.Second):
				d.cmd.Process.Kill()
				<-d.exited
			}
		}
		if t.Failed() {
			t.Logf("rafsd output:\n%s", d.out)
		}
	})
	d.hc = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", apisock)
		},
	}}
	for deadline := time.Now().Add(30 * time.Second); ; {
		_, err1 := os.Stat(apisock)
		_, err2 := os.Stat(sock)
		if err1 == nil && err2 == nil {
			break
		}
		select {
		case <-d.exited:
			t.Fatalf("rafsd exited at start: %v\n%s", d.err, d.out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("rafsd sockets did not appear\n%s", d.out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return d
}

// call sends an API request and fails the test unless it gets 204.
func (d *hostRafsd) call(t testing.TB, method, mountpoint string, body any) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://unix/api/v1/mount?mountpoint="+mountpoint, rd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := d.hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, mountpoint, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("%s %s: %s %s", method, mountpoint, resp.Status, msg)
	}
}

func (d *hostRafsd) state(t *testing.T) string {
	t.Helper()
	resp, err := d.hc.Get("http://unix/api/v1/daemon")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var info struct {
		State string `json:"state"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
		t.Fatal(err)
	}
	return info.State
}

func localfsConfig(dir string) string {
	b, _ := json.Marshal(map[string]any{
		"device": map[string]any{"backend": map[string]any{"type": "localfs", "config": map[string]any{"dir": dir}}},
		"mode":   "direct", "digest_validate": true,
	})
	return string(b)
}

// TestRafsdVirtioFSKata is Kata's virtio-fs-nydus mode with a real guest:
// `rafsd virtiofs` on the host serves the vhost-user-fs device QEMU
// connects to; the guest mounts the tag where the kata-agent does. While
// the guest runs, the sandbox's shared dir and two RAFS images (v6 and v5)
// are mounted through the API; the guest sees the host's trees, writes
// into the shared dir, and loses one image when it is unmounted while the
// other keeps serving. The guest then powers off (QEMU must exit on its
// own: the device stop completes), a second QEMU reconnects to the same
// daemon and sees the same mounts, and rafsd exits 0 on SIGTERM within
// Kata's 5 s grace while that QEMU is still connected.
func TestRafsdVirtioFSKata(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()

	srcA := sourceTree(t)
	srcB := sourceTree(t)
	if err := os.WriteFile(filepath.Join(srcB, "only-in-b"), []byte("image b\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(srcB, "many")); err != nil {
		t.Fatal(err)
	}
	imgA := buildImages(t, ctx, srcA, 6)
	imgB := buildImages(t, ctx, srcB, 5)
	shared := t.TempDir()
	if err := os.MkdirAll(filepath.Join(shared, "ctr1", "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(shared, "ctr1", "config.json"), []byte(`{"ociVersion":"1.1.0"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	hashOf := func(dir string) string {
		h, err := treehash.Hash(dir)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	wantA, wantB := hashOf(srcA), hashOf(srcB)

	run := t.TempDir()
	sock, apisock := filepath.Join(run, "vhost-fs.sock"), filepath.Join(run, "nydusd-api.sock")
	d := startHostRafsd(t, ctx, sock, apisock)
	if st := d.state(t); st != "RUNNING" {
		t.Fatalf("daemon state %s before the VM, want RUNNING", st)
	}
	// Kata mounts the shared dir before it starts QEMU.
	d.call(t, http.MethodPost, "/containers", map[string]string{"fs_type": "passthrough_fs", "source": shared, "config": ""})

	vm := StartTB(t, Options{VirtioFS: []VirtioFS{{Socket: sock, Tag: "kataShared"}}})
	a := vm.Agent()
	const root = "/run/kata-containers/shared"
	if err := a.Mount(ctx, guest.MountRequest{Source: "kataShared", Target: root, FSType: "virtiofs", Mkdir: true}); err != nil {
		t.Fatalf("guest mount -t virtiofs: %v", err)
	}

	// Containers start: their images are mounted while the guest runs.
	lowerA, lowerB := "/rafs/ctr-a/lowerdir", "/rafs/ctr-b/lowerdir"
	d.call(t, http.MethodPost, lowerA, map[string]string{"fs_type": "rafs", "source": filepath.Join(imgA, "v6", "bootstrap"), "config": localfsConfig(filepath.Join(imgA, "blobs"))})
	d.call(t, http.MethodPost, lowerB, map[string]string{"fs_type": "rafs", "source": filepath.Join(imgB, "v5", "bootstrap"), "config": localfsConfig(filepath.Join(imgB, "blobs"))})

	guestHash := func(p, want string) {
		t.Helper()
		start := time.Now()
		got, err := a.TreeHash(ctx, root+p, false)
		if err != nil {
			t.Fatalf("guest tree hash of %s: %v", p, err)
		}
		if got.Hash != want {
			t.Fatalf("guest tree hash of %s = %s, host %s", p, got.Hash, want)
		}
		t.Logf("guest tree hash of %s matches the host (%s)", p, time.Since(start).Round(time.Millisecond))
	}
	guestHash(lowerA, wantA)
	guestHash(lowerB, wantB)
	guestHash("/containers", hashOf(shared))
	tool, err := a.ReadFile(ctx, root+lowerA+"/bin/tool", 0)
	if err != nil {
		t.Fatal(err)
	}
	if orig, _ := os.ReadFile(filepath.Join(srcA, "bin/tool")); !bytes.Equal(tool, orig) {
		t.Fatalf("guest read %d bytes of bin/tool, content differs from the host's %d", len(tool), len(orig))
	}

	// The guest writes into the shared dir (a container's output); the
	// host sees the bytes.
	payload := bytes.Repeat([]byte("written by the guest\n"), 5000)
	if err := a.WriteFile(ctx, root+"/containers/ctr1/from-guest.log", payload, 0o640); err != nil {
		t.Fatalf("guest write into the shared dir: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(shared, "ctr1", "from-guest.log")); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("host sees the guest's file: %d bytes, err %v; want %d bytes", len(got), err, len(payload))
	}
	if err := a.WriteFile(ctx, root+lowerB+"/new", []byte("x"), 0o644); err == nil {
		t.Fatalf("guest created a file in a read-only RAFS image")
	}

	// Container a stops: its image is unmounted through the API. The guest
	// drops it when its cached entries expire (virtio-fs has no
	// invalidation channel), while b keeps serving.
	d.call(t, http.MethodDelete, lowerA, nil)
	gone := false
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if _, err := a.ReadFile(ctx, root+lowerA+"/etc/conf", 0); err != nil {
			gone = true
			t.Logf("unmounted image gone in the guest: %v", err)
			break
		}
	}
	if !gone {
		t.Fatalf("%s still readable in the guest 60 s after the API unmounted it", lowerA)
	}
	// The pseudo directory /rafs/ctr-a went with it.
	rafsDir, err := a.TreeHash(ctx, root+"/rafs", true)
	if err != nil {
		t.Fatalf("guest walk of %s/rafs: %v", root, err)
	}
	for _, e := range rafsDir.Entries {
		if e.Path != "." && !strings.HasPrefix(e.Path, "ctr-b") {
			t.Fatalf("guest still lists %s/rafs/%s after the unmount", root, e.Path)
		}
	}
	guestHash(lowerB, wantB)

	// The VM shuts down: QEMU resets the device and must exit by itself.
	start := time.Now()
	if err := vm.Stop(); err != nil {
		t.Fatalf("QEMU did not exit on its own after guest power-off: %v", err)
	}
	t.Logf("guest power-off to QEMU exit: %s", time.Since(start).Round(time.Millisecond))
	if st := d.state(t); st != "RUNNING" {
		t.Fatalf("daemon state %s after the VM went away, want RUNNING", st)
	}
	// The VMM restarts (a new QEMU on the same socket): the daemon takes
	// the new front end without a restart, with its mounts as they were.
	// Not StartTB: this VM loses its back end below, so its stop is
	// expected to need signals.
	vm2, err := Start(context.Background(), Options{VirtioFS: []VirtioFS{{Socket: sock, Tag: "kataShared"}}, Logf: t.Logf})
	if err != nil {
		t.Fatalf("second VM: %v", err)
	}
	t.Cleanup(func() { vm2.Stop() })
	a = vm2.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "kataShared", Target: root, FSType: "virtiofs", Mkdir: true}); err != nil {
		t.Fatalf("second guest: mount -t virtiofs: %v", err)
	}
	guestHash(lowerB, wantB)
	guestHash("/containers", hashOf(shared))
	// Kata's Stop(): SIGTERM, 5 s grace, here while the second guest still
	// has the tag mounted and QEMU's rings are running: the daemon must
	// not wait for the VMM.
	stopAt := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
		if d.err != nil {
			t.Fatalf("rafsd exit after SIGTERM: %v", d.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("rafsd still running 5 s after SIGTERM with QEMU connected")
	}
	t.Logf("SIGTERM to exit with QEMU connected: %s", time.Since(stopAt).Round(time.Millisecond))
	// The guest lost its device; the harness ends QEMU however it must.
	vm2.Stop()
	if out := d.out.String(); strings.Contains(out, "level=ERROR") || strings.Contains(out, "panic") {
		t.Errorf("rafsd logged errors:\n%s", out)
	}
}

// benchTree writes the benchmark's tree: one 64 MiB file (half random,
// half zeros per MiB) and a directory of 10,000 small files.
func benchTree(tb testing.TB) string {
	tb.Helper()
	dir := tb.TempDir()
	rng := rand.New(rand.NewSource(7))
	big := make([]byte, 64<<20)
	for off := 0; off < len(big); off += 1 << 20 {
		rng.Read(big[off : off+1<<19])
	}
	if err := os.WriteFile(filepath.Join(dir, "big.bin"), big, 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "many"), 0o755); err != nil {
		tb.Fatal(err)
	}
	for i := 0; i < 10000; i++ {
		if err := os.WriteFile(filepath.Join(dir, "many", fmt.Sprintf("f%05d", i)), []byte(fmt.Sprintf("file %d\n", i)), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

// vfsbenchResult is one line of testdata/vfsbench's output.
type vfsbenchResult struct {
	Root      string  `json:"root"`
	SeqMiBps  float64 `json:"seq_mib_per_s"`
	RandOpsps float64 `json:"rand_4k_reads_per_s"`
	StatOpsps float64 `json:"stats_per_s"`
	Files     int     `json:"files"`
}

// startVirtiofsd runs QEMU's reference virtiofsd on src (cache=auto, as a
// guest of Kata's default) and returns its socket.
func startVirtiofsd(tb testing.TB, src string) string {
	tb.Helper()
	if _, err := os.Stat(qemuVirtiofsd); err != nil {
		tb.Fatalf("%s missing (apt-get install qemu-system-x86): %v", qemuVirtiofsd, err)
	}
	sock := filepath.Join(tb.TempDir(), "virtiofsd.sock")
	out := &testutil.SyncBuffer{}
	cmd := exec.Command(qemuVirtiofsd, "--socket-path="+sock, "-o", "source="+src, "-o", "cache=auto", "-o", "sandbox=chroot")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	tb.Cleanup(func() {
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			tb.Fatalf("virtiofsd socket did not appear:\n%s", out)
		}
	}
}

// BenchmarkRafsdVirtioFS measures inside one TCG guest, with the guest's
// caches dropped before each pass: sequential reads of a 64 MiB file,
// random 4 KiB reads, and lstat of 10,000 files, on
//   - a RAFS image served by `rafsd virtiofs` (blob cache warm),
//   - the source tree through rafsd's passthrough_fs (same device),
//   - the source tree through QEMU's reference virtiofsd (cache=auto),
//   - the tree on an ext4 virtio-blk disk.
//
// Ratios are against virtio-blk and against virtiofsd.
func BenchmarkRafsdVirtioFS(b *testing.B) {
	requireRoot(b)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	src := benchTree(b)
	tool, err := BuildStatic(ctx, "./cmd/rafs-image")
	if err != nil {
		b.Fatal(err)
	}
	img := b.TempDir()
	boot, blobs := filepath.Join(img, "bootstrap"), filepath.Join(img, "blobs")
	if out, err := exec.CommandContext(ctx, tool, "create", "--bootstrap", boot, "--blob-dir", blobs, src).CombinedOutput(); err != nil {
		b.Fatalf("rafs-image create: %v\n%s", err, out)
	}
	disk := filepath.Join(b.TempDir(), "disk.img")
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-N", "20000", "-d", src, disk, "160M").CombinedOutput(); err != nil {
		b.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	bench, err := BuildStatic(ctx, "./testbed/testdata/vfsbench")
	if err != nil {
		b.Fatal(err)
	}
	run := b.TempDir()
	sock, apisock := filepath.Join(run, "vhost-fs.sock"), filepath.Join(run, "api.sock")
	d := startHostRafsd(b, ctx, sock, apisock)
	// A blob cache, as nydus-snapshotter configures for Kata: after the
	// warm-up pass chunks are read uncompressed from the cache file.
	cfg, _ := json.Marshal(map[string]any{
		"device": map[string]any{
			"backend": map[string]any{"type": "localfs", "config": map[string]any{"dir": blobs}},
			"cache":   map[string]any{"type": "blobcache", "config": map[string]any{"work_dir": b.TempDir()}},
		},
		"mode": "cached",
	})
	d.call(b, http.MethodPost, "/rafs/bench/lowerdir", map[string]string{"fs_type": "rafs", "source": boot, "config": string(cfg)})
	d.call(b, http.MethodPost, "/pt", map[string]string{"fs_type": "passthrough_fs", "source": src, "config": ""})
	ref := startVirtiofsd(b, src)

	vm := StartTB(b, Options{
		MemoryMiB: 768,
		VirtioFS:  []VirtioFS{{Socket: sock, Tag: "rafsfs"}, {Socket: ref, Tag: "ref"}},
		Disks:     []string{disk},
		Files:     []initramfs.File{{Path: "/bin/vfsbench", Source: bench}},
		Timeout:   20 * time.Minute,
	})
	a := vm.Agent()
	for _, m := range []guest.MountRequest{
		{Source: "rafsfs", Target: "/vfs", FSType: "virtiofs", Mkdir: true},
		{Source: "ref", Target: "/ref", FSType: "virtiofs", Mkdir: true},
		{Source: "/dev/vda", Target: "/blk", FSType: "ext4", Flags: 1 /* MS_RDONLY */, Mkdir: true},
	} {
		if err := a.Mount(ctx, m); err != nil {
			b.Fatalf("guest mount %s: %v", m.Target, err)
		}
	}
	names := []string{"rafs", "passthrough", "virtiofsd", "blk"}
	roots := []string{"/vfs/rafs/bench/lowerdir", "/vfs/pt", "/ref", "/blk"}
	sum := make([]vfsbenchResult, len(roots))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		res, err := a.Exec(ctx, guest.ExecRequest{Argv: append([]string{"/bin/vfsbench"}, roots...), TimeoutMS: 10 * 60 * 1000})
		if err != nil {
			b.Fatal(err)
		}
		if res.ExitCode != 0 {
			b.Fatalf("vfsbench: exit %d\n%s%s", res.ExitCode, res.Stdout, res.Stderr)
		}
		lines := strings.Split(strings.TrimSpace(string(res.Stdout)), "\n")
		if len(lines) != len(roots) {
			b.Fatalf("vfsbench output: %q", res.Stdout)
		}
		for j, line := range lines {
			var r vfsbenchResult
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				b.Fatalf("vfsbench output %q: %v", line, err)
			}
			if r.Files != 10000 {
				b.Fatalf("vfsbench stat'ed %d files under %s, want 10000", r.Files, roots[j])
			}
			sum[j].SeqMiBps += r.SeqMiBps
			sum[j].RandOpsps += r.RandOpsps
			sum[j].StatOpsps += r.StatOpsps
		}
	}
	b.StopTimer()
	n := float64(b.N)
	for j, name := range names {
		b.ReportMetric(sum[j].SeqMiBps/n, name+"-seq-MiB/s")
		b.ReportMetric(sum[j].RandOpsps/n, name+"-rand4k/s")
		b.ReportMetric(sum[j].StatOpsps/n, name+"-stat/s")
	}
	blk, vfsd := sum[3], sum[2]
	for j, name := range names[:2] {
		b.ReportMetric(sum[j].SeqMiBps/blk.SeqMiBps, name+"/blk-seq")
		b.ReportMetric(sum[j].RandOpsps/blk.RandOpsps, name+"/blk-rand")
		b.ReportMetric(sum[j].StatOpsps/blk.StatOpsps, name+"/blk-stat")
		b.ReportMetric(sum[j].SeqMiBps/vfsd.SeqMiBps, name+"/virtiofsd-seq")
		b.ReportMetric(sum[j].RandOpsps/vfsd.RandOpsps, name+"/virtiofsd-rand")
		b.ReportMetric(sum[j].StatOpsps/vfsd.StatOpsps, name+"/virtiofsd-stat")
	}
}

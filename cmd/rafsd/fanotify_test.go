package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/internal/testutil"
)

// startFanotify runs `rafsd fanotify --apisock S` and waits for its API.
// Cleanup: SIGTERM, SIGKILL after 5 s, then lazy unmounts of mnts.
func startFanotify(t *testing.T, mnts ...string) *proc {
	t.Helper()
	return startFanotifyArgs(t, nil, mnts...)
}

// startFanotifyArgs is startFanotify with more arguments.
func startFanotifyArgs(t *testing.T, args []string, mnts ...string) *proc {
	t.Helper()
	apisock := filepath.Join(t.TempDir(), "api.sock")
	d := &proc{t: t, apisock: apisock, out: &testutil.SyncBuffer{}, exited: make(chan struct{})}
	full := append([]string{"fanotify", "--apisock", apisock, "--log-level", "debug"}, args...)
	d.cmd = exec.Command(filepath.Join(binDir, "rafsd"), full...)
	// A file, not a pipe: the guard child inherits it, and Wait would
	// wait for a pipe's last writer.
	logf, err := os.CreateTemp(t.TempDir(), "rafsd.log")
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	output := func() string { b, _ := os.ReadFile(logf.Name()); return string(b) }
	go func() { d.exitErr = d.cmd.Wait(); close(d.exited) }()
	d.client = &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", apisock)
		},
	}}
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.exited:
			case <-time.After(5 * time.Second):
				_ = d.cmd.Process.Kill()
				<-d.exited
			}
		}
		for _, m := range mnts {
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
		if t.Failed() {
			t.Logf("rafsd %v output:\n%s", full, output())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", apisock); err == nil {
			c.Close()
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("API socket not created\n%s", output())
		}
		select {
		case <-d.exited:
			t.Fatalf("rafsd exited before its API socket appeared: %v\n%s", d.exitErr, output())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// blobcacheConfig is a localfs config with the uncompressed blob cache
// the fanotify mode reads through.
func blobcacheConfig(blobs, work string) string {
	b, _ := json.Marshal(map[string]any{
		"device": map[string]any{
			"backend": map[string]any{"type": "localfs", "config": map[string]any{"dir": blobs}},
			"cache":   map[string]any{"type": "blobcache", "config": map[string]any{"work_dir": work}},
		},
		"mode": "direct", "digest_validate": true,
	})
	return string(b)
}

func diffR(t *testing.T, want, got string) {
	t.Helper()
	if out, err := exec.Command("diff", "-r", "--no-dereference", want, got).CombinedOutput(); err != nil {
		t.Fatalf("diff -r %s %s: %v\n%s", want, got, err, out)
	}
}

// Two images mounted through the v1 API of `rafsd fanotify`, one unmounted
// while the other is read; bad requests get 4xx JSON errors and the daemon
// keeps serving; SIGTERM unmounts what is left.
func TestFanotifyAPIMountUmount(t *testing.T) {
	requireRoot(t)
	a, b := makeImage(t, "first"), makeImage(t, "second")
	root := t.TempDir()
	mpA, mpB := filepath.Join(root, "a"), filepath.Join(root, "b")
	d := startFanotify(t, mpA, mpB)
	mount := func(mp string, img *image) {
		t.Helper()
		body, _ := json.Marshal(map[string]any{"source": img.bootstrap, "fs_type": "fanotify", "config": blobcacheConfig(img.blobs, t.TempDir())})
		if st, out := d.call("POST", "/api/v1/mount?mountpoint="+mp, string(body)); st != http.StatusNoContent {
			t.Fatalf("mount %s: %d %s", mp, st, out)
		}
	}
	mount(mpA, a)
	mount(mpB, b)
	diffR(t, a.src, mpA)
	diffR(t, b.src, mpB)

	var info struct {
		State      string                     `json:"state"`
		Collection map[string]json.RawMessage `json:"backend_collection"`
	}
	json.Unmarshal(d.mustCall("GET", "/api/v1/daemon", ""), &info)
	if info.State != "RUNNING" || len(info.Collection) != 2 {
		t.Fatalf("daemon info: %+v", info)
	}

	// Bad input: 4xx with a JSON error, and nothing changes.
	good, _ := json.Marshal(map[string]any{"source": a.bootstrap, "fs_type": "fanotify", "config": blobcacheConfig(a.blobs, t.TempDir())})
	for _, c := range []struct {
		name, method, query, body string
		want                      int
	}{
		{"bad JSON", "POST", "mountpoint=" + root + "/c", "{", 400},
		{"unknown field", "POST", "mountpoint=" + root + "/c", `{"source":"` + a.bootstrap + `","fs_type":"fanotify","bogus":1}`, 400},
		{"wrong fs_type", "POST", "mountpoint=" + root + "/c", `{"source":"` + a.bootstrap + `","fs_type":"passthrough_fs","config":"{}"}`, 400},
		{"missing source", "POST", "mountpoint=" + root + "/c", `{"source":"/nonexistent/bootstrap","fs_type":"fanotify"}`, 400},
		{"not a bootstrap", "POST", "mountpoint=" + root + "/c", `{"source":"/etc/hostname","fs_type":"fanotify","config":` + fmt.Sprintf("%q", blobcacheConfig(a.blobs, t.TempDir())) + `}`, 400},
		{"bad config", "POST", "mountpoint=" + root + "/c", `{"source":"` + a.bootstrap + `","fs_type":"fanotify","config":"{\"device\":{\"backend\":{\"type\":\"nope\"}}}"}`, 400},
		{"relative mountpoint", "POST", "mountpoint=rel", string(good), 400},
		{"no mountpoint", "DELETE", "", "", 400},
		{"already mounted", "POST", "mountpoint=" + mpA, string(good), 409},
		{"unknown mount", "DELETE", "mountpoint=" + root + "/none", "", 404},
		{"bad method", "PATCH", "mountpoint=" + mpA, "", 405},
	} {
		st, out := d.call(c.method, "/api/v1/mount?"+c.query, c.body)
		var e struct{ Code, Message string }
		if st != c.want || json.Unmarshal(out, &e) != nil || e.Message == "" {
			t.Errorf("%s: status %d body %s, want %d with a JSON error", c.name, st, out, c.want)
		}
	}
	if testutil.MountedOn(root + "/c") {
		t.Fatal("a bad request left a mount")
	}

	// Unmount A while B is read, and B's reads all succeed.
	want := b.files["dir/big.bin"]
	var reads, errs atomic.Int64
	var firstErr atomic.Value
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		p := filepath.Join(mpB, "dir/big.bin")
		for {
			select {
			case <-stop:
				return
			default:
			}
			got, err := os.ReadFile(p)
			if err == nil && !bytes.Equal(got, want) {
				err = fmt.Errorf("wrong bytes")
			}
			if err != nil {
				errs.Add(1)
				firstErr.CompareAndSwap(nil, err)
				return
			}
			reads.Add(1)
			if fh, err := os.Open(p); err == nil {
				unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
				fh.Close()
			}
		}
	}()
	waitReads := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for reads.Load() < n && errs.Load() == 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if errs.Load() != 0 || reads.Load() < n {
			t.Fatalf("reader of %s: %d reads, %v", mpB, reads.Load(), firstErr.Load())
		}
	}
	waitReads(3)
	d.mustCall("DELETE", "/api/v1/mount?mountpoint="+mpA, "")
	if testutil.MountedOn(mpA) {
		t.Fatal("unmounted image still mounted")
	}
	waitReads(reads.Load() + 3)
	close(stop)
	<-done
	if errs.Load() != 0 {
		t.Fatalf("reads of the other mount failed: %v", firstErr.Load())
	}
	diffR(t, b.src, mpB)
	var ms []map[string]any
	json.Unmarshal(d.mustCall("GET", "/api/v1/mount", ""), &ms)
	if len(ms) != 1 || ms[0]["mountpoint"] != mpB {
		t.Fatalf("mounts after umount: %v", ms)
	}
	// Mount again at the freed path, with the config as an object and
	// this mode's tuning in it.
	var cfg map[string]any
	json.Unmarshal([]byte(blobcacheConfig(a.blobs, t.TempDir())), &cfg)
	cfg["fanotify"] = map[string]any{"read_ahead_kb": 2048}
	body, _ := json.Marshal(map[string]any{"source": a.bootstrap, "fs_type": "rafs", "config": cfg})
	if st, out := d.call("POST", "/api/v1/mount?mountpoint="+mpA, string(body)); st != http.StatusNoContent {
		t.Fatalf("mount again: %d %s", st, out)
	}
	diffR(t, a.src, mpA)
	// The mount's EROFS bdi got the config's read_ahead_kb (the bdi is
	// named by a counter, so look for the value among the EROFS ones).
	bdis, _ := filepath.Glob("/sys/class/bdi/erofs*/read_ahead_kb")
	found := false
	for _, p := range bdis {
		if v, _ := os.ReadFile(p); string(bytes.TrimSpace(v)) == "2048" {
			found = true
		}
	}
	if !found {
		t.Errorf("no EROFS bdi has read_ahead_kb 2048 (%v)", bdis)
	}

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.waitExit(10 * time.Second); err != nil {
		t.Fatalf("rafsd after SIGTERM: %v", err)
	}
	if testutil.MountedOn(mpA) || testutil.MountedOn(mpB) {
		t.Fatal("mounts left after SIGTERM")
	}
}

func waitPidGone(t *testing.T, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !testutil.Exited(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d) still running after 10s", what, pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Without a supervisor, a SIGKILLed `rafsd fanotify` leaves its guard,
// which learned the API's mounts as they were made: it detaches them, and
// a reader holding a file open gets EIO, never zeros. A new `rafsd
// fanotify` mounting the same image with the same cache directory (what a
// restart by systemd and a re-mount by the client do) takes the group over
// from the old guard, which exits: the new mount diffs equal, and the old
// reader reads the right bytes again. When the new daemon stops after the
// reader closed, its guard exits too.
func TestFanotifyAPIGuardOnCrash(t *testing.T) {
	requireRoot(t)
	a := makeImage(t, "guarded")
	mp := filepath.Join(t.TempDir(), "a")
	d := startFanotify(t, mp)
	work := t.TempDir()
	body, _ := json.Marshal(map[string]any{"source": a.bootstrap, "fs_type": "fanotify", "config": blobcacheConfig(a.blobs, work)})
	d.mustCall("POST", "/api/v1/mount?mountpoint="+mp, string(body))
	var info struct {
		Guard int `json:"guard_pid"`
	}
	json.Unmarshal(d.mustCall("GET", "/api/v1/daemon", ""), &info)
	if info.Guard <= 0 {
		t.Fatal("no guard process reported")
	}
	t.Cleanup(func() { syscall.Kill(info.Guard, syscall.SIGKILL) })
	fh, err := os.Open(filepath.Join(mp, "dir/big.bin"))
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	want := a.files["dir/big.bin"]
	p := make([]byte, 4096)
	if _, err := fh.ReadAt(p, 0); err != nil || !bytes.Equal(p, want[:4096]) {
		t.Fatalf("read while served: %v", err)
	}
	d.cmd.Process.Kill()
	<-d.exited
	deadline := time.Now().Add(10 * time.Second)
	for testutil.MountedOn(mp) {
		if time.Now().After(deadline) {
			t.Fatal("guard did not detach the API mount")
		}
		time.Sleep(20 * time.Millisecond)
	}
	res := make(chan error, 1)
	go func() { _, err := fh.ReadAt(p, 2<<20+777); res <- err }()
	select {
	case err = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("read after the daemon died still blocked after 10s")
	}
	if err == nil {
		t.Fatalf("read after the daemon died succeeded (right bytes: %v)", bytes.Equal(p, want[2<<20+777:2<<20+777+4096]))
	}
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read after the daemon died: %v, want EIO", err)
	}

	// The new daemon's --config names the same cache directory: it takes
	// the groups over at start, before any mount (the old guard would
	// fail every I/O on the cache files until then).
	cfgPath := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfgPath, []byte(blobcacheConfig(a.blobs, work)), 0o644); err != nil {
		t.Fatal(err)
	}
	d2 := startFanotifyArgs(t, []string{"--config", cfgPath}, mp)
	waitPidGone(t, info.Guard, "the dead daemon's guard after the new daemon started")
	// No mount of that image yet: the daemon fails the old reader's
	// reads as the guard did (it has nothing to fill them from).
	unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
	go func() { _, err := fh.ReadAt(p, 1<<20+333); res <- err }()
	select {
	case err = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("old reader's read before the new mount still blocked after 10s")
	}
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("old reader's read before the new mount: %v, want EIO", err)
	}
	d2.mustCall("POST", "/api/v1/mount?mountpoint="+mp, string(body))
	diffR(t, a.src, mp)
	unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
	got := make([]byte, len(want))
	if _, err := fh.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("old reader after the take-over: %v (right bytes: %v)", err, bytes.Equal(got, want))
	}
	guardOf := func() int {
		var info struct {
			Guard int `json:"guard_pid"`
		}
		json.Unmarshal(d2.mustCall("GET", "/api/v1/daemon", ""), &info)
		return info.Guard
	}
	g2 := guardOf()
	if g2 <= 0 {
		t.Fatal("the new daemon reports no guard")
	}
	fh.Close()
	// The old mount is gone: the daemon drops the old group and replaces
	// its guard with one that holds its own group only.
	deadline = time.Now().Add(10 * time.Second)
	g3 := guardOf()
	for ; g3 == g2; g3 = guardOf() {
		if time.Now().After(deadline) {
			t.Fatal("the new daemon kept the old group 10s after the old reader closed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() { syscall.Kill(g3, syscall.SIGKILL) })
	waitPidGone(t, g2, "the guard replaced when the old group was dropped")
	if err := d2.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d2.waitExit(10 * time.Second); err != nil {
		t.Fatalf("new rafsd after SIGTERM: %v", err)
	}
	waitPidGone(t, g3, "the new daemon's guard after a clean stop")
	if testutil.MountedOn(mp) {
		t.Fatal("mount left after SIGTERM")
	}
}

package cachefiles

import (
	"context"
	"encoding/json"
	"fmt"
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

// TestGuestRafsdSingleton drives `rafsd singleton --fscache` in the guest
// the way nydus-snapshotter does: PUT /api/v2/blobs for two images sharing
// a blob in one domain, `mount -t erofs -o domain_id=,fsid=`, tree hashes
// equal to the host's, GET/DELETE /api/v2/blobs, SIGTERM.
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
	for i, im := range []*testImage{im1, im2} {
		n := fmt.Sprint(i + 1)
		os.MkdirAll(filepath.Join(dir, n), 0o755)
		b, _ := os.ReadFile(im.boot)
		os.WriteFile(filepath.Join(dir, n, "bootstrap"), b, 0o644)
		req := bindReq("fsid"+n, "dom", im)
		req.Config.MetadataPath = "/img/" + n + "/bootstrap"
		req.Config.BackendConfig = json.RawMessage(`{"dir":"/img/blobs"}`)
		j, _ := json.Marshal(req)
		os.WriteFile(filepath.Join(dir, "bind"+n+".json"), j, 0o644)
	}
	imgDisk := ext4Disk(t, dir, 64)
	cacheDisk := ext4Disk(t, "", 64)
	rafsd, err := testbed.BuildStatic(ctx, "./cmd/rafsd")
	if err != nil {
		t.Fatal(err)
	}
	client, err := testbed.BuildStatic(ctx, "./fscache/cachefiles/internal/unixhttp")
	if err != nil {
		t.Fatal(err)
	}
	vm := testbed.StartTB(t, testbed.Options{Disks: []string{imgDisk, cacheDisk}, Console: consoleLog(t),
		Files: []initramfs.File{{Path: "/bin/rafsd", Source: rafsd}, {Path: "/bin/unixhttp", Source: client}}})
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1, Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vdb", Target: "/var/cache/fscache", FSType: "ext4", Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	p, err := a.Start(ctx, guest.StartRequest{Name: "rafsd", Argv: []string{"/bin/rafsd", "singleton",
		"--fscache", "/var/cache/fscache", "--fscache-threads", "4", "--apisock", "/api.sock", "--id", "single", "--log-level", "info"}})
	if err != nil {
		t.Fatal(err)
	}
	var mounts []string
	stopped := false
	t.Cleanup(func() {
		for _, m := range mounts {
			a.Unmount(context.Background(), m, 2)
		}
		if !stopped {
			a.StopProcess(context.Background(), guest.StopRequest{Handle: p.Handle, Signal: "KILL"})
		}
	})
	call := func(method, path, body string) (int, string) {
		t.Helper()
		argv := []string{"/bin/unixhttp", "/api.sock", method, path}
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
	for deadline := time.Now().Add(60 * time.Second); ; {
		if st, _ := call("GET", "/api/v1/daemon", ""); st == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("rafsd singleton API never answered")
		}
		time.Sleep(200 * time.Millisecond)
	}
	expect := func(method, path, body string, want int) string {
		t.Helper()
		st, out := call(method, path, body)
		if st != want {
			t.Fatalf("%s %s: %d %s, want %d", method, path, st, out, want)
		}
		return out
	}
	expect("PUT", "/api/v2/blobs", "/img/bind1.json", 204)
	expect("PUT", "/api/v2/blobs", "/img/bind2.json", 204)
	expect("PUT", "/api/v2/blobs", "/img/bind1.json", 409)
	var list []BlobInfo
	if err := json.Unmarshal([]byte(expect("GET", "/api/v2/blobs?domain_id=dom", "", 200)), &list); err != nil || len(list) != 4 {
		t.Fatalf("GET /api/v2/blobs: %v %+v (want 2 bootstraps and 2 data blobs)", err, list)
	}
	for n, src := range []string{src1, src2} {
		mnt := fmt.Sprintf("/mnt/%d", n+1)
		if err := a.Mount(ctx, guest.MountRequest{Source: "none", Target: mnt, FSType: "erofs", Data: fmt.Sprintf("domain_id=dom,fsid=fsid%d", n+1), Mkdir: true}); err != nil {
			t.Fatal(err)
		}
		mounts = append(mounts, mnt)
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
	if info.State != "RUNNING" || info.Fscache.OpenFailures != 0 || info.Fscache.ReadFailures != 0 {
		t.Errorf("daemon info %+v", info)
	}
	// Two bootstraps, image 2's own blob and the shared blob opened once
	// for both images.
	if info.Fscache.Opens != 4 {
		t.Errorf("%d OPENs, want 4 (the shared blob once)", info.Fscache.Opens)
	}
	for _, m := range mounts {
		if err := a.Unmount(ctx, m, 0); err != nil {
			t.Errorf("umount %s: %v", m, err)
		}
	}
	mounts = nil
	expect("DELETE", "/api/v2/blobs?domain_id=dom&blob_id=fsid1", "", 204)
	expect("DELETE", "/api/v2/blobs?domain_id=dom&blob_id=fsid1", "", 404)
	expect("DELETE", "/api/v2/blobs?domain_id=dom", "", 204)
	if out := expect("GET", "/api/v2/blobs", "", 200); strings.TrimSpace(out) != "[]" {
		t.Errorf("after unbinding all: %s", out)
	}
	stopped = true
	r, err := a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
	if err != nil {
		t.Fatal(err)
	}
	if r.ExitCode != 0 || r.Killed {
		t.Errorf("rafsd singleton did not exit cleanly on SIGTERM: %+v\n%s", r, r.Output)
	}
}

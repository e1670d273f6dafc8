package cachefiles

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
	"github.com/rafsd/rafsd/testbed"
	"github.com/rafsd/rafsd/testbed/initramfs"
)

// pushBlob uploads data to a registry as blob sha256:id of repo
// (monolithic upload of the OCI distribution API).
func pushBlob(t *testing.T, addr, repo, id string, data []byte) {
	t.Helper()
	resp, err := http.Post(fmt.Sprintf("http://%s/v2/%s/blobs/uploads/", addr, repo), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload: %s", resp.Status)
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	if !loc.IsAbs() {
		loc.Scheme, loc.Host = "http", addr
	}
	q := loc.Query()
	q.Set("digest", "sha256:"+id)
	loc.RawQuery = q.Encode()
	req, _ := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(data))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload blob: %s", resp.Status)
	}
}

// TestGuestFscacheRegistry: the blob lives in a real registry on the
// host, reached from the guest over QEMU user networking (10.0.2.2 is the
// host's loopback); the guest mounts the image over fscache and its tree
// hash equals the host's.
func TestGuestFscacheRegistry(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the guest scenarios run as root (QEMU, kernel cache in /var/cache)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	reg := registrytest.Start(t, registrytest.Options{})
	_, port, _ := strings.Cut(reg.Addr, ":")

	dir := t.TempDir()
	blobs := t.TempDir()
	src := scenarioTree(t, 31, nil)
	im := buildImage(t, src, blobs)
	id := im.img.Blobs[0].ID
	data, err := os.ReadFile(filepath.Join(blobs, id))
	if err != nil {
		t.Fatal(err)
	}
	pushBlob(t, reg.Addr, "test/fscache", id, data)
	b, _ := os.ReadFile(im.boot)
	os.WriteFile(filepath.Join(dir, "bootstrap"), b, 0o644)
	req := bindReq("regimg", "", im)
	req.Config.BackendType = "registry"
	req.Config.BackendConfig, _ = json.Marshal(map[string]any{"scheme": "http", "host": "10.0.2.2:" + port, "repo": "test/fscache", "timeout": 30})
	req.Config.MetadataPath = "/img/bootstrap"
	j, _ := json.Marshal(req)
	os.WriteFile(filepath.Join(dir, "bind.json"), j, 0o644)

	daemon, err := testbed.BuildStatic(ctx, "./fscache/cachefiles/internal/cachefilesd")
	if err != nil {
		t.Fatal(err)
	}
	vm := testbed.StartTB(t, testbed.Options{Net: true, Disks: []string{ext4Disk(t, dir, 32), ext4Disk(t, "", 64)}, Console: consoleLog(t),
		Files: []initramfs.File{{Path: "/bin/cachefilesd", Source: daemon}}})
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1, Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vdb", Target: "/var/cache/fscache", FSType: "ext4", Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	p, err := a.Start(ctx, guest.StartRequest{Name: "cachefilesd", Argv: []string{"/bin/cachefilesd",
		"-dir", "/var/cache/fscache", "-stats", "/stats.json", "-bind", "/img/bind.json"}})
	if err != nil {
		t.Fatal(err)
	}
	mounted, stopped := false, false
	t.Cleanup(func() {
		if mounted {
			a.Unmount(context.Background(), "/mnt/reg", 2)
		}
		if !stopped {
			a.StopProcess(context.Background(), guest.StopRequest{Handle: p.Handle, Signal: "KILL"})
		}
	})
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	if err := waitFile(wctx, a, "/stats.json"); err != nil {
		t.Fatal(err)
	}
	if err := a.Mount(ctx, guest.MountRequest{Source: "none", Target: "/mnt/reg", FSType: "erofs", Data: "fsid=regimg", Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	mounted = true
	got, err := a.TreeHash(ctx, "/mnt/reg", true)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := treehash.Walk(src)
	if got.Hash != treehash.Sum(want) {
		t.Errorf("guest tree hash differs from the host's:\n%s", strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
	}
	var s guestStats
	if b, err := a.ReadFile(ctx, "/stats.json", 0); err == nil {
		json.Unmarshal(b, &s)
	}
	t.Logf("stats %+v", s)
	if err := a.Unmount(ctx, "/mnt/reg", 0); err != nil {
		t.Errorf("umount: %v", err)
	}
	mounted = false
	stopped = true
	r, err := a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
	if err != nil {
		t.Fatal(err)
	}
	if r.ExitCode != 0 || r.Killed {
		t.Errorf("cachefilesd did not exit cleanly: %+v\n%s", r, r.Output)
	}
}

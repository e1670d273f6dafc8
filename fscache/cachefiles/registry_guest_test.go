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

	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
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

// TestGuestFscacheRegistry: `rafsd singleton --fscache` in the guest with
// the registry backend: the blobs live in a real registry on the host,
// reached over QEMU user networking (10.0.2.2 is the host's loopback).
// Two images sharing chunks are bound in one domain through PUT
// /api/v2/blobs; reading 5% of the first moves at most 10% of its blob
// from the registry (GET /api/v1/metrics/backend); both mounts' tree
// hashes equal the host's.
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
	src1 := scenarioTree(t, 31, nil)
	im1 := buildImage(t, src1, blobs)
	src2 := scenarioTree(t, 31, map[string]int{"new/file": 300 << 10})
	im2 := buildImage(t, src2, blobs, im1.img)
	pushed := map[string]bool{}
	for i, im := range []*testImage{im1, im2} {
		for _, b := range im.img.Blobs {
			if pushed[b.ID] {
				continue
			}
			data, err := os.ReadFile(filepath.Join(blobs, b.ID))
			if err != nil {
				t.Fatal(err)
			}
			pushBlob(t, reg.Addr, "test/fscache", b.ID, data)
			pushed[b.ID] = true
		}
		n := fmt.Sprint(i + 1)
		os.MkdirAll(filepath.Join(dir, n), 0o755)
		bt, _ := os.ReadFile(im.boot)
		os.WriteFile(filepath.Join(dir, n, "bootstrap"), bt, 0o644)
		req := bindReq("reg"+n, "regdom", im)
		req.Config.BackendType = "registry"
		req.Config.BackendConfig, _ = json.Marshal(map[string]any{"scheme": "http", "host": "10.0.2.2:" + port, "repo": "test/fscache", "timeout": 30})
		req.Config.MetadataPath = "/img/" + n + "/bootstrap"
		j, _ := json.Marshal(req)
		os.WriteFile(filepath.Join(dir, "bind"+n+".json"), j, 0o644)
	}
	if len(pushed) != 2 {
		t.Fatalf("%d blobs pushed, want 2 (image 2 shares image 1's and has its own)", len(pushed))
	}

	g := startSingleton(ctx, t, true, ext4Disk(t, dir, 32), "--id", "reg")
	a, expect, mount := g.a, g.expect, g.mount
	expect("PUT", "/api/v2/blobs", "/img/bind1.json", 204)
	expect("PUT", "/api/v2/blobs", "/img/bind2.json", 204)
	mount("/mnt/reg1", "domain_id=regdom,fsid=reg1")
	checkPartialRead(ctx, t, a, "/api.sock", "/mnt/reg1", "reg1", src1, im1, "registry")
	mount("/mnt/reg2", "domain_id=regdom,fsid=reg2")
	for i, src := range []string{src1, src2} {
		mnt := fmt.Sprintf("/mnt/reg%d", i+1)
		got, err := a.TreeHash(ctx, mnt, true)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := treehash.Walk(src)
		if got.Hash != treehash.Sum(want) {
			t.Errorf("%s: guest tree hash differs from the host's:\n%s", mnt, strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
		}
	}
	var info struct {
		Fscache Stats `json:"fscache"`
	}
	json.Unmarshal([]byte(expect("GET", "/api/v2/daemon", "", 200)), &info)
	t.Logf("daemon: %+v", info.Fscache)
	// Two bootstraps, the shared blob once, image 2's own blob.
	if s := info.Fscache; s.Opens != 4 || s.OpenFailures != 0 || s.ReadFailures != 0 {
		t.Errorf("daemon counters %+v: want 4 OPENs (the shared blob once), no failures", s)
	}
	g.unmountAll()
	g.stop()
}

package main

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAPIDaemonInfoRemountBlobcache covers the FUSE daemon's API calls the
// other tests do not: GET /api/v1/daemon's id and backend_collection (what
// nydus-snapshotter reads to find a daemon's mounts), PUT /api/v1/mount
// (nydusd's remount: another bootstrap at the same path, served at once),
// GET /api/v1/metrics/blobcache and Prometheus on --metrics-addr.
func TestAPIDaemonInfoRemountBlobcache(t *testing.T) {
	requireRoot(t)
	a, b := makeImage(t, "before"), makeImage(t, "after")
	shared := t.TempDir()
	mnt := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0") // a free port for --metrics-addr
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := l.Addr().String()
	l.Close()
	d := runningDaemon(t, mnt, "--id", "daemon-7", "--metrics-addr", metricsAddr)

	work := t.TempDir()
	cacheConfig := func(img *image) string {
		cfg := map[string]any{}
		json.Unmarshal([]byte(localfsConfig(img.blobs)), &cfg)
		cfg["device"].(map[string]any)["cache"] = map[string]any{"type": "blobcache", "config": map[string]any{"work_dir": work}}
		raw, _ := json.Marshal(cfg)
		return string(raw)
	}
	body := func(source, fsType, config string) string {
		raw, _ := json.Marshal(map[string]any{"source": source, "fs_type": fsType, "config": config})
		return string(raw)
	}
	d.mustCall("POST", "/api/v1/mount?mountpoint=/img", body(a.bootstrap, "rafs", cacheConfig(a)))
	d.mustCall("POST", "/api/v1/mount?mountpoint=/shared", body(shared, "passthrough_fs", ""))
	checkTree(t, a, filepath.Join(mnt, "img"))

	type info struct {
		ID         string `json:"id"`
		State      string `json:"state"`
		Collection map[string]struct {
			Mountpoint string `json:"mountpoint"`
			FsType     string `json:"fs_type"`
			Source     string `json:"source"`
		} `json:"backend_collection"`
	}
	var di info
	if err := jsonCall(d, "/api/v1/daemon", &di); err != nil {
		t.Fatal(err)
	}
	if di.ID != "daemon-7" || di.State != "RUNNING" || len(di.Collection) != 2 ||
		di.Collection["/img"].FsType != "rafs" || di.Collection["/img"].Source != a.bootstrap ||
		di.Collection["/shared"].FsType != "passthrough_fs" || di.Collection["/shared"].Source != shared {
		t.Fatalf("GET /api/v1/daemon: %+v", di)
	}

	var bc struct {
		StorePath       string   `json:"store_path"`
		UnderlyingFiles []string `json:"underlying_files"`
		Total           uint64   `json:"total"`
	}
	if err := jsonCall(d, "/api/v1/metrics/blobcache?id=/img", &bc); err != nil {
		t.Fatal(err)
	}
	if bc.StorePath != work || len(bc.UnderlyingFiles) == 0 || bc.Total == 0 {
		t.Fatalf("GET /api/v1/metrics/blobcache after reading the image: %+v", bc)
	}
	for _, f := range bc.UnderlyingFiles {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("blob cache file %s: %v", f, err)
		}
	}

	// Prometheus on TCP as well (--metrics-addr), with the fetcher's
	// counters of the mount just read.
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	prom, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(prom), `rafsd_backend_requests_total{backend="localfs"`) {
		t.Fatalf("--metrics-addr /metrics: %d\n%.2000s", resp.StatusCode, prom)
	}

	// Remount: the same path serves the other image, with no stale names
	// or pages of the first one left in the kernel.
	d.mustCall("PUT", "/api/v1/mount?mountpoint=/img", body(b.bootstrap, "rafs", cacheConfig(b)))
	checkTree(t, b, filepath.Join(mnt, "img"))
	if err := jsonCall(d, "/api/v1/daemon", &di); err != nil || di.Collection["/img"].Source != b.bootstrap {
		t.Fatalf("backend_collection after the remount: %+v, %v", di, err)
	}
	if st, out := d.call("PUT", "/api/v1/mount?mountpoint=/nope", body(b.bootstrap, "rafs", cacheConfig(b))); st != http.StatusNotFound {
		t.Fatalf("remount of an unknown mountpoint: %d %s", st, out)
	}
	if st, out := d.call("PUT", "/api/v1/mount?mountpoint=/img", body("/nonexistent", "rafs", cacheConfig(b))); st != http.StatusBadRequest {
		t.Fatalf("remount with a missing bootstrap: %d %s", st, out)
	}
	checkTree(t, b, filepath.Join(mnt, "img")) // a failed remount leaves the mount as it was
}

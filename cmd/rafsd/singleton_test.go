package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/cachefiles"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/codec"
)

func validHandover() handoverState {
	return handoverState{Version: handoverVersion, Mode: handoverMode, Fscache: "/var/cache/fscache", Threads: 4,
		Blobs: []cachefiles.BindRequest{
			{Type: "bootstrap", ID: "a", Config: cachefiles.BindConfig{BackendType: "localfs", MetadataPath: "/a/boot"}},
			{Type: "bootstrap", ID: "b", DomainID: "d", Config: cachefiles.BindConfig{BackendType: "localfs", MetadataPath: "/b/boot"}},
		}}
}

func TestParseHandover(t *testing.T) {
	for _, tc := range []struct {
		name    string
		change  func(*handoverState)
		raw     string
		wantErr string
	}{
		{name: "valid", change: func(*handoverState) {}},
		{name: "no bindings", change: func(s *handoverState) { s.Blobs = nil }},
		{name: "FUSE daemon's state", raw: `{"version":1,"id":"x","mountpoint":"/m","fuse_init":"AAAA","mounts":[]}`, wantErr: "daemon"},
		{name: "not JSON", raw: "\x00\x01", wantErr: "bad state"},
		{name: "future version", change: func(s *handoverState) { s.Version = 2 }, wantErr: "version"},
		{name: "empty id", change: func(s *handoverState) { s.Blobs[0].ID = "" }, wantErr: "empty id"},
		{name: "no bootstrap", change: func(s *handoverState) { s.Blobs[1].Config.MetadataPath = "" }, wantErr: "metadata_path"},
		{name: "same image twice", change: func(s *handoverState) { s.Blobs[1] = s.Blobs[0] }, wantErr: "twice"},
		{name: "same id, other domain", change: func(s *handoverState) { s.Blobs[1].ID = "a" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := []byte(tc.raw)
			if tc.change != nil {
				st := validHandover()
				tc.change(&st)
				raw, _ = json.Marshal(st)
			}
			_, err := parseHandover(raw)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// FuzzParseHandover: a supervisor's bytes never panic the parser, and a
// state it accepts names every image once, with a bootstrap.
func FuzzParseHandover(f *testing.F) {
	good, _ := json.Marshal(validHandover())
	f.Add(good)
	f.Add([]byte(`{"version":1,"mode":"fscache","blobs":[{"id":"x","config":{"metadata_path":"/b"}},{"id":"x","domain_id":"x","config":{"metadata_path":"/b"}}]}`))
	f.Add([]byte(`{"version":1,"mode":"fscache","blobs":null}`))
	f.Add([]byte(`{"version":1,"fuse_init":"AAAA"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := parseHandover(data)
		if err != nil {
			return
		}
		seen := map[[2]string]bool{}
		for _, b := range st.Blobs {
			k := [2]string{b.Domain(), b.ID}
			if b.ID == "" || b.Config.MetadataPath == "" || seen[k] {
				t.Fatalf("accepted a bad binding %+v", b)
			}
			seen[k] = true
		}
	})
}

// TestSingletonTakeoverAPI drives the takeover calls of the fscache mode
// on the host, whose kernel has no on-demand cachefiles: /dev/null stands
// in for the device fd (it is only passed around, never served). The
// guest scenario TestGuestRafsdTakeover (fscache/cachefiles) does it with
// the real device under a mounted image.
func TestSingletonTakeoverAPI(t *testing.T) {
	dir := t.TempDir()
	src, blobs := filepath.Join(dir, "src"), filepath.Join(dir, "blobs")
	os.MkdirAll(filepath.Join(src, "d"), 0o755)
	os.MkdirAll(blobs, 0o755)
	os.WriteFile(filepath.Join(src, "d/f"), []byte(strings.Repeat("rafsd ", 50000)), 0o644)
	c := codec.Zstd
	boot := filepath.Join(dir, "bootstrap")
	if _, err := builder.BuildDirFiles(context.Background(), builder.Options{Version: 6, ChunkSize: 64 << 10, Compressor: &c}, src, blobs, boot); err != nil {
		t.Fatal(err)
	}
	be, _ := json.Marshal(map[string]string{"dir": blobs})
	st := handoverState{Version: handoverVersion, Mode: handoverMode, Fscache: "/var/cache/fscache", Threads: 2,
		Blobs: []cachefiles.BindRequest{{Type: "bootstrap", ID: "img1", DomainID: "dom", Config: cachefiles.BindConfig{
			ID: "img1", BackendType: "localfs", BackendConfig: be, CacheType: "fscache", MetadataPath: boot}}}}
	state, _ := json.Marshal(st)

	sup := filepath.Join(dir, "sup.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := newSingleton(ctx, cancel, singletonOpts{ID: "s1", Dir: "/var/cache/fscache", Threads: 2, Supervisor: sup}, log)
	t.Cleanup(func() { s.close() })
	srv := httptest.NewServer(s.handler())
	defer srv.Close()
	call := func(method, path string, want int) string {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != want {
			t.Fatalf("%s %s: %d %s, want %d", method, path, resp.StatusCode, b, want)
		}
		return string(b)
	}
	stateIs := func(want string) {
		t.Helper()
		var info struct{ State string }
		json.Unmarshal([]byte(call("GET", "/api/v1/daemon", 200)), &info)
		if info.State != want {
			t.Fatalf("state %q, want %q", info.State, want)
		}
	}

	stateIs("INIT")
	call("GET", "/api/v2/blobs", 503)
	call("GET", "/api/v1/metrics/backend", 503)
	call("PUT", "/api/v1/daemon/start", 409)
	call("PUT", "/api/v1/daemon/fuse/sendfd", 503)
	call("GET", "/api/v1/daemon/fuse/takeover", 405)

	// A state that is not ours is refused, and the daemon stays INIT.
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	fuseState := []byte(`{"version":1,"id":"x","mountpoint":"/m","fuse_init":"AAAA","mounts":[]}`)
	sv := &supervisor{path: sup, state: fuseState, fd: int(null.Fd())}
	sent := sv.send(t)
	call("PUT", "/api/v1/daemon/fuse/takeover", 500)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	stateIs("INIT")

	sv.state = state
	sent = sv.send(t)
	call("PUT", "/api/v1/daemon/fuse/takeover", 204)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	stateIs("READY")
	call("PUT", "/api/v1/daemon/fuse/takeover", 409)
	var list []cachefiles.BlobInfo
	if err := json.Unmarshal([]byte(call("GET", "/api/v2/blobs?domain_id=dom", 200)), &list); err != nil || len(list) != 2 {
		t.Fatalf("bindings after takeover: %v %+v (want the bootstrap and its blob)", err, list)
	}

	// Backend metrics: nothing read yet; an unknown image is a 404.
	var m struct {
		BackendType string  `json:"backend_type"`
		ReadCount   *uint64 `json:"read_count"`
	}
	if err := json.Unmarshal([]byte(call("GET", "/api/v1/metrics/backend?id=img1", 200)), &m); err != nil || m.BackendType != "localfs" || m.ReadCount == nil || *m.ReadCount != 0 {
		t.Fatalf("metrics/backend of img1: %v %+v", err, m)
	}
	call("GET", "/api/v1/metrics/backend", 200)
	call("GET", "/api/v1/metrics/backend?id=nosuch", 404)
	call("PUT", "/api/v1/metrics/backend", 405)

	// sendfd gives the supervisor the same bindings and one fd.
	sv.fd = -1 // null's own fd stays with null
	recv := sv.receive(t)
	call("PUT", "/api/v1/daemon/fuse/sendfd", 204)
	if err := <-recv; err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sv.fd)
	got, err := parseHandover(sv.state)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Blobs) != 1 || got.Blobs[0].ID != "img1" || got.Blobs[0].DomainID != "dom" ||
		got.Blobs[0].Config.MetadataPath != boot || string(got.Blobs[0].Config.BackendConfig) != string(be) || got.ID != "s1" {
		t.Fatalf("state handed on: %+v", got)
	}
	var a, b unix.Stat_t
	unix.Fstat(sv.fd, &a)
	unix.Fstat(int(null.Fd()), &b)
	if a.Rdev != b.Rdev || a.Ino != b.Ino {
		t.Fatalf("the fd handed on is not the device received (rdev %x vs %x)", a.Rdev, b.Rdev)
	}

	// The exit API ends the daemon's context, as SIGTERM does.
	call("PUT", "/api/v1/daemon/exit", 204)
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("exit did not end the daemon")
	}
}

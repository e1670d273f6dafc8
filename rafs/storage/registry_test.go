package storage

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/storage/backend"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

const testRepo = "rafsd/test"

func registryConfig(host, user, pass, cacheType, workDir string, extra map[string]any) string {
	rc := map[string]any{"host": host, "repo": testRepo, "scheme": "http", "timeout": 10, "retry_limit": 2}
	if user != "" {
		rc["auth"] = base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	}
	for k, v := range extra {
		rc[k] = v
	}
	cache := map[string]any{"type": cacheType}
	if cacheType != "" {
		cache["config"] = map[string]any{"work_dir": workDir}
	}
	b, _ := json.Marshal(map[string]any{
		"device": map[string]any{"backend": map[string]any{"type": "registry", "config": rc}, "cache": cache},
		"mode":   "direct", "digest_validate": true,
	})
	return string(b)
}

// TestRegistry runs against a real registry with htpasswd (basic) auth and
// with bearer-token auth through a token service.
func TestRegistry(t *testing.T) {
	for _, token := range []bool{false, true} {
		name := "basic"
		if token {
			name = "token"
		}
		t.Run(name, func(t *testing.T) { testRegistry(t, token) })
	}
}

func testRegistry(t *testing.T, token bool) {
	reg := registrytest.Start(t, registrytest.Options{User: "alice", Password: "s3cret", Token: token})
	ti := buildImage(t, makeContent(11, 6<<20+777), 512<<10, codec.Zstd)
	if id := reg.PushBlob(t, testRepo, ti.blob); id != ti.id {
		t.Fatalf("pushed %s, want %s", id, ti.id)
	}

	t.Run("random ranges", func(t *testing.T) {
		f, _ := newFetcher(t, parseConfig(t, registryConfig(reg.Addr, "alice", "s3cret", "blobcache", t.TempDir(), nil)))
		addImage(t, f, ti.img)
		if n, err := f.Backend().Size(context.Background(), ti.id); err != nil || n != int64(len(ti.blob)) {
			t.Fatalf("Size = %d, %v; want %d", n, err, len(ti.blob))
		}
		r := rand.New(rand.NewSource(12))
		for range 100 {
			off := r.Intn(len(ti.content))
			buf := make([]byte, r.Intn(1<<20))
			n, err := ti.img.ReadAt(context.Background(), f, ti.file(), buf, int64(off))
			if err != nil && err != io.EOF {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:n], ti.content[off:off+n]) {
				t.Fatalf("ReadAt(%d, %d): wrong bytes", off, len(buf))
			}
		}
	})

	t.Run("wrong credentials", func(t *testing.T) {
		f, _ := newFetcher(t, parseConfig(t, registryConfig(reg.Addr, "alice", "wrong", "", "", nil)))
		err := f.ReadChunkAt(context.Background(), ti.img.Blobs[0], ti.file().Chunks[0].Chunk, make([]byte, 10), 0)
		if err == nil || !errors.Is(err, backend.ErrUnauthorized) || rafs.Errno(err) != syscall.EIO {
			t.Fatalf("read with a wrong password: %v", err)
		}
		for _, want := range []string{"registry backend", ti.id, "unauthorized", "401"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not mention %q", err, want)
			}
		}
		t.Log(err)
	})

	t.Run("anonymous", func(t *testing.T) {
		t.Setenv("DOCKER_CONFIG", t.TempDir())
		f, _ := newFetcher(t, parseConfig(t, registryConfig(reg.Addr, "", "", "", "", nil)))
		err := f.ReadChunkAt(context.Background(), ti.img.Blobs[0], ti.file().Chunks[0].Chunk, make([]byte, 10), 0)
		if !errors.Is(err, backend.ErrUnauthorized) {
			t.Fatalf("anonymous read: %v", err)
		}
	})

	t.Run("docker config.json", func(t *testing.T) {
		dc := t.TempDir()
		auth := base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
		os.WriteFile(filepath.Join(dc, "config.json"), []byte(`{"auths":{"`+reg.Addr+`":{"auth":"`+auth+`"}}}`), 0o600)
		t.Setenv("DOCKER_CONFIG", dc)
		f, _ := newFetcher(t, parseConfig(t, registryConfig(reg.Addr, "", "", "", "", nil)))
		p := make([]byte, 100)
		if err := f.ReadChunkAt(context.Background(), ti.img.Blobs[0], ti.file().Chunks[0].Chunk, p, 0); err != nil || !bytes.Equal(p, ti.content[:100]) {
			t.Fatalf("read with docker config.json credentials: %v", err)
		}
	})

	t.Run("64 readers one request", func(t *testing.T) {
		f, preg := newFetcher(t, parseConfig(t, registryConfig(reg.Addr, "alice", "s3cret", "blobcache", t.TempDir(), nil)))
		// Warm up authentication so the auth round trip does not count.
		f.ReadChunkAt(context.Background(), ti.img.Blobs[0], ti.file().Chunks[0].Chunk, make([]byte, 1), 0)
		settle(f) // its stream is counted when it ends
		before := metric(t, preg, "rafsd_backend_requests_total", nil)
		c := ti.file().Chunks[5]
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				p := make([]byte, 1024)
				if err := f.ReadChunkAt(context.Background(), ti.img.Blobs[0], c.Chunk, p, uint32(i*512)); err != nil {
					t.Error(err)
					return
				}
				off := int(c.FileOffset) + i*512
				if !bytes.Equal(p, ti.content[off:off+1024]) {
					t.Errorf("reader %d: wrong bytes", i)
				}
			}()
		}
		close(start)
		wg.Wait()
		settle(f)
		if n := metric(t, preg, "rafsd_backend_requests_total", nil) - before; n != 1 {
			t.Fatalf("64 readers of a cold chunk made %v registry requests, want 1", n)
		}
	})

	t.Run("corrupt blob in registry", func(t *testing.T) {
		bad := append([]byte(nil), ti.blob...)
		c := ti.file().Chunks[1]
		bad[c.CompressedOffset+10] ^= 1
		id := reg.PushBlob(t, testRepo, bad)
		img2 := *ti.img
		b2 := *ti.img.Blobs[0]
		b2.ID = id
		img2.Blobs = []*rafs.Blob{&b2}
		f, preg := newFetcher(t, parseConfig(t, registryConfig(reg.Addr, "alice", "s3cret", "blobcache", t.TempDir(), nil)))
		p := make([]byte, 4096)
		err := f.ReadChunkAt(context.Background(), &b2, c.Chunk, p, 0)
		if rafs.Errno(err) != syscall.EIO {
			t.Fatalf("corrupt chunk from the registry: %v", err)
		}
		if !bytes.Equal(p, make([]byte, 4096)) {
			t.Fatal("bytes of a corrupt chunk reached the caller")
		}
		if n := metric(t, preg, "rafsd_chunk_digest_failures_total", map[string]string{"source": "backend"}); n != 2 {
			t.Fatalf("digest failures %v, want 2 (fetch + refetch)", n)
		}
	})
}

// TestMirrorFailover: the mirror is a second registry acting as the
// origin's pull-through cache. (Anonymous: distribution's proxy mode can
// only log in to token-auth origins, not htpasswd ones.) Killing the mirror moves
// reads to the origin; restarting it brings them back.
func TestMirrorFailover(t *testing.T) {
	origin := registrytest.Start(t, registrytest.Options{})
	mirror := registrytest.Start(t, registrytest.Options{Remote: origin.URL})
	ti := buildImage(t, makeContent(13, 2<<20), 128<<10, codec.Zstd)
	origin.PushBlob(t, testRepo, ti.blob)

	cfg := parseConfig(t, registryConfig(origin.Addr, "", "", "", "", map[string]any{
		"mirrors": []any{map[string]any{
			"host": mirror.URL, "failure_limit": 1, "health_check_interval": 1,
			"headers": map[string]string{"X-Dragonfly-Registry": origin.URL},
		}},
	}))
	f, preg := newFetcher(t, cfg)
	mirrorHost := mirror.Addr
	count := func(ep string) float64 {
		return metric(t, preg, "rafsd_backend_requests_total", map[string]string{"endpoint": ep, "result": "ok"})
	}
	readAll := func() {
		t.Helper()
		if !bytes.Equal(ti.readAll(t, f), ti.content) {
			t.Fatal("wrong bytes")
		}
	}
	readAll()
	if count(mirrorHost) == 0 || count("origin") != 0 {
		t.Fatalf("with a healthy mirror: mirror %v origin %v requests", count(mirrorHost), count("origin"))
	}

	// Kill the mirror in the middle of a run of reads.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(20 * time.Millisecond)
		mirror.Kill()
	}()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		readAll()
	}
	wg.Wait()
	readAll()
	if count("origin") == 0 {
		t.Fatal("no reads went to the origin after the mirror died")
	}
	if n := metric(t, preg, "rafsd_backend_mirror_failovers_total", nil); n == 0 {
		t.Fatal("no failover counted")
	}

	mirror.Restart(t)
	before := count(mirrorHost)
	deadline = time.Now().Add(15 * time.Second)
	for count(mirrorHost) == before {
		if time.Now().After(deadline) {
			t.Fatal("mirror not used again within 15s of coming back")
		}
		readAll()
		time.Sleep(100 * time.Millisecond)
	}
	originBefore := count("origin")
	readAll()
	if count("origin") != originBefore {
		t.Fatal("origin still used with the mirror back")
	}
}

// TestRegistryProxyFallback: an HTTP proxy that is down falls back to the
// origin (proxy.fallback, the default); without fallback the read fails.
func TestRegistryProxyFallback(t *testing.T) {
	origin := registrytest.Start(t, registrytest.Options{})
	ti := buildImage(t, makeContent(14, 512<<10), 128<<10, codec.LZ4Block)
	origin.PushBlob(t, testRepo, ti.blob)
	dead := "http://127.0.0.1:1"
	for _, fallback := range []bool{true, false} {
		cfg := parseConfig(t, registryConfig(origin.Addr, "", "", "", "", map[string]any{
			"proxy": map[string]any{"url": dead, "fallback": fallback},
		}))
		f, _ := newFetcher(t, cfg)
		p := make([]byte, 100)
		err := f.ReadChunkAt(context.Background(), ti.img.Blobs[0], ti.file().Chunks[1].Chunk, p, 0)
		if fallback && (err != nil || !bytes.Equal(p, ti.content[128<<10:128<<10+100])) {
			t.Fatalf("fallback read: %v", err)
		}
		if !fallback && rafs.Errno(err) != syscall.EIO {
			t.Fatalf("no-fallback read through a dead proxy: %v", err)
		}
	}
}

package backend

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs/config"
)

func TestRegistryOpenRange(t *testing.T) {
	data := []byte(strings.Repeat("0123456789abcdef", 4096))
	srv, n := blobServer(t, data, 1, nil)
	cfg := registryCfg(srv.URL)
	cfg.RetryLimit = 1
	var bytesSeen atomic.Int64
	r, err := NewRegistry(cfg, Hooks{Request: func(_ string, n int, _ time.Duration, _ error) { bytesSeen.Add(int64(n)) }})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The first answer is a 503: opening retries like ReadAt.
	rc, err := r.OpenRange(context.Background(), "abc", 1000, 30000)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data[1000:31000]) {
		t.Fatalf("stream: %d bytes, %v", len(got), err)
	}
	if n.Load() != 2 || bytesSeen.Load() != 30000 {
		t.Fatalf("%d requests, %d bytes reported", n.Load(), bytesSeen.Load())
	}
	// Closed half way: the request is released, the bytes read reported.
	rc, err = r.OpenRange(context.Background(), "abc", 0, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 100)
	if _, err := io.ReadFull(rc, p); err != nil || !bytes.Equal(p, data[:100]) {
		t.Fatalf("first bytes: %v", err)
	}
	rc.Close()
	if got := bytesSeen.Load(); got != 30000+100 {
		t.Fatalf("closed after 100 bytes: %d bytes reported in all, want %d", got, 30000+100)
	}
	if _, err := r.OpenRange(context.Background(), "abc", 0, 0); err == nil {
		t.Fatal("empty range opened")
	}
}

// TestRegistryStreamCut: a body that ends early or stalls is an error
// naming the blob and where it broke, never a short success or a hang.
func TestRegistryStreamCut(t *testing.T) {
	data := bytes.Repeat([]byte{7}, 1<<20)
	stall := make(chan struct{})
	defer close(stall)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Range", "bytes 0-1048575/1048576")
		w.Header().Set("Content-Length", "1048576")
		w.WriteHeader(http.StatusPartialContent)
		w.Write(data[:4096])
		w.(http.Flusher).Flush()
		if strings.Contains(r.URL.Path, "stall") {
			select {
			case <-stall:
			case <-r.Context().Done():
			}
			return
		}
		// Cut: hijack and close without the rest.
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.Close()
	}))
	defer srv.Close()
	cfg := registryCfg(srv.URL)
	cfg.Timeout = 1
	r, err := NewRegistry(cfg, Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, id := range []string{"cut", "stall"} {
		rc, err := r.OpenRange(context.Background(), id, 0, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, err = io.ReadAll(rc)
		rc.Close()
		var re *ReadError
		if !errors.As(err, &re) || re.BlobID != id || re.Off != 4096 || !strings.Contains(err.Error(), "stream cut after 4096") {
			t.Fatalf("%s: %v, want a ReadError at 4096", id, err)
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Fatalf("%s: error after %s (timeout 1s)", id, took)
		}
	}
}

func TestLocalFSOpenRange(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "b"), []byte("0123456789"), 0o644)
	l := NewLocalFS(config.LocalFS{Dir: dir}, Hooks{})
	defer l.Close()
	rc, err := l.OpenRange(context.Background(), "b", 2, 5)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || string(got) != "23456" {
		t.Fatalf("%q %v", got, err)
	}
	rc, _ = l.OpenRange(context.Background(), "b", 8, 5)
	_, err = io.ReadAll(rc)
	rc.Close()
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("range past the end: %v", err)
	}
	if _, err := l.OpenRange(context.Background(), "nope", 0, 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing blob: %v", err)
	}
	// A backend without streams is read whole through OpenRange.
	rc, err = OpenRange(context.Background(), readAtOnly{l}, "b", 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(rc)
	if string(got) != "123" {
		t.Fatalf("ReadAt fallback: %q", got)
	}
}

type readAtOnly struct{ Backend }

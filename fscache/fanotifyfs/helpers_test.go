package fanotifyfs

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/storage"
)

// image is a RAFS v6 image on disk: bootstrap plus a localfs blob dir.
type image struct {
	boot, blobDir string
	img           *rafs.Image
}

// buildImage builds src into a zstd RAFS v6 image with rafs/builder.
func buildImage(t testing.TB, src string, chunkSize uint32) *image {
	t.Helper()
	blobDir := t.TempDir()
	c := codec.Zstd
	opts := builder.Options{Version: 6, ChunkSize: chunkSize, Compressor: &c}
	boot := filepath.Join(t.TempDir(), "bootstrap")
	if _, err := builder.BuildDirFiles(context.Background(), opts, src, blobDir, boot); err != nil {
		t.Fatal(err)
	}
	img, err := bootstrap.Open(boot)
	if err != nil {
		t.Fatal(err)
	}
	return &image{boot: boot, blobDir: blobDir, img: img}
}

func (im *image) blobPath() string { return filepath.Join(im.blobDir, im.img.Blobs[0].ID) }

// configJSON is a v1 daemon config: localfs backend, blobcache in workDir.
func configJSON(blobDir, workDir string) []byte {
	cfg := map[string]any{
		"device": map[string]any{
			"backend": map[string]any{"type": "localfs", "config": map[string]any{"dir": blobDir}},
			"cache":   map[string]any{"type": "blobcache", "config": map[string]any{"work_dir": workDir}},
		},
		"mode": "direct",
	}
	b, _ := json.Marshal(cfg)
	return b
}

func newFetcher(t testing.TB, blobDir, workDir string, opts ...storage.Option) *storage.Fetcher {
	t.Helper()
	cfg, err := config.Parse(configJSON(blobDir, workDir))
	if err != nil {
		t.Fatal(err)
	}
	f, err := storage.New(cfg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// startServer serves a fresh group until the test ends.
func startServer(t testing.TB, timeout time.Duration) *Server {
	t.Helper()
	fstest.RequireRoot(t)
	g, err := fanotify.New()
	if err != nil {
		t.Fatalf("this kernel must support pre-content events: %v", err)
	}
	s := NewServer(g, testLogger(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, fanotify.Options{Timeout: timeout}) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		g.Close()
	})
	return s
}

// mount mounts im through s and f at a fresh directory, unmounted when
// the test ends (before the server stops).
func mount(t testing.TB, s *Server, im *image, f *storage.Fetcher, opts Options) *Mount {
	t.Helper()
	opts.Bootstrap, opts.Fetcher = im.boot, f
	if opts.Mountpoint == "" {
		opts.Mountpoint = t.TempDir()
	}
	m, err := s.Mount(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
		unix.Unmount(opts.Mountpoint, unix.MNT_DETACH)
	})
	return m
}

func mustParse(t testing.TB, blobDir string) *config.Config {
	t.Helper()
	cfg, err := config.Parse(configJSON(blobDir, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

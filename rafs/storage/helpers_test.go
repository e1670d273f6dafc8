package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/config"
)

// testImage is an image with one regular file "/f" whose chunks live in
// one blob, built directly with the model and rafs/codec.
type testImage struct {
	img     *rafs.Image
	blob    []byte // the blob file
	content []byte // the file's bytes
	id      string
}

// content makes size bytes that are partly compressible, partly random,
// so some chunks are stored compressed and some raw.
func makeContent(seed int64, size int) []byte {
	r := rand.New(rand.NewSource(seed))
	out := make([]byte, size)
	for off := 0; off < size; off += 8192 {
		end := min(off+8192, size)
		if r.Intn(3) == 0 {
			r.Read(out[off:end])
		} else {
			b := byte(r.Intn(4))
			for i := off; i < end; i++ {
				out[i] = b + byte(i%7)
			}
		}
	}
	return out
}

func buildImage(t testing.TB, content []byte, chunkSize uint32, comp codec.Compressor) *testImage {
	t.Helper()
	dig := codec.Blake3
	var blob []byte
	file := &rafs.Inode{Ino: 2, Parent: 1, Mode: syscall.S_IFREG | 0o644, Size: uint64(len(content)), Nlink: 1}
	var n uint32
	for off := 0; off < len(content); off += int(chunkSize) {
		data := content[off:min(off+int(chunkSize), len(content))]
		stored, compressed, err := codec.Compress(comp, nil, data)
		if err != nil {
			t.Fatal(err)
		}
		c := &rafs.Chunk{
			Digest: dig.Sum(data), Index: n, CompressedOffset: uint64(len(blob)), CompressedSize: uint32(len(stored)),
			UncompressedOffset: uint64(off), UncompressedSize: uint32(len(data)), Compressed: compressed,
		}
		blob = append(blob, stored...)
		file.Chunks = append(file.Chunks, rafs.FileChunk{FileOffset: uint64(off), Chunk: c})
		n++
	}
	sum := sha256.Sum256(blob)
	id := hex.EncodeToString(sum[:])
	b := &rafs.Blob{
		ID: id, Compressor: comp, Digester: dig, ChunkSize: chunkSize, ChunkCount: n,
		CompressedSize: uint64(len(blob)), UncompressedSize: uint64(len(content)),
	}
	img := &rafs.Image{
		Version: 6, ChunkSize: chunkSize, Compressor: comp, Digester: dig, Blobs: []*rafs.Blob{b},
		Inodes: []*rafs.Inode{
			{Ino: 1, Parent: 1, Mode: syscall.S_IFDIR | 0o755, Nlink: 2, Entries: []rafs.Dirent{{Name: "f", Ino: 2}}},
			file,
		},
	}
	if err := img.Validate(); err != nil {
		t.Fatal(err)
	}
	return &testImage{img: img, blob: blob, content: content, id: id}
}

// writeBlob stores the blob in dir under its id and returns the path.
func (ti *testImage) writeBlob(t testing.TB, dir string) string {
	t.Helper()
	p := filepath.Join(dir, ti.id)
	if err := os.WriteFile(p, ti.blob, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func (ti *testImage) file() *rafs.Inode { return ti.img.Inodes[1] }

// parseConfig parses a v1 JSON config, failing the test on error.
func parseConfig(t testing.TB, js string) *config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func newFetcher(t testing.TB, cfg *config.Config, opts ...Option) (*Fetcher, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	f, err := New(cfg, append([]Option{WithRegisterer(reg), WithLogger(log)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, reg
}

// metric sums the samples of a metric whose labels include want.
func metric(t testing.TB, reg *prometheus.Registry, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for k, v := range want {
				if !hasLabel(m, k, v) {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			case m.Histogram != nil:
				sum += float64(m.Histogram.GetSampleCount())
			}
		}
	}
	return sum
}

func hasLabel(m *dto.Metric, k, v string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == k {
			return l.GetValue() == v || (strings.HasSuffix(v, "*") && strings.HasPrefix(l.GetValue(), strings.TrimSuffix(v, "*")))
		}
	}
	return false
}

// readAll reads the whole file through cr.
func (ti *testImage) readAll(t testing.TB, cr rafs.ChunkReader) []byte {
	t.Helper()
	out := make([]byte, len(ti.content))
	n, err := ti.img.ReadAt(context.Background(), cr, ti.file(), out, 0)
	if err != nil && n != len(out) {
		t.Fatalf("read all: %d bytes, %v", n, err)
	}
	return out
}

func runtimeGosched() { time.Sleep(100 * time.Microsecond) }

// testWriter sends logs to the test's log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// settle waits for the fetcher's background streams (read-ahead, the rest
// of a window whose first chunk was handed out) to end.
func settle(f *Fetcher) { f.streams.Wait() }

// addImage adds img to f and fails the test if it cannot.
func addImage(t testing.TB, f *Fetcher, img *rafs.Image) {
	t.Helper()
	if err := f.AddImage(img); err != nil {
		t.Fatal(err)
	}
}

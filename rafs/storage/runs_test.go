package storage

import (
	"bytes"
	"context"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/storage/backend"
)

// TestReadChunksMerged: without a blob cache (the fscache mode), the
// chunks a caller asks for at once are fetched back to back in requests
// of up to the merging size, every chunk checked; a chunk whose stored
// bytes are corrupt is fetched once more alone and fails with EIO.
func TestReadChunksMerged(t *testing.T) {
	ti := buildImage(t, makeContent(41, 16*64<<10), 64<<10, codec.Zstd)
	dir := t.TempDir()
	blobPath := ti.writeBlob(t, dir)
	cfg := parseConfig(t, localConfig(dir, "", "", false, false, 256<<10))
	be := &countingBackend{Backend: backend.NewLocalFS(*cfg.Backend.LocalFS, backend.Hooks{})}
	f, reg := newFetcher(t, cfg, WithBackend(be))
	addImage(t, f, ti.img)
	b := ti.img.Blobs[0]
	read := func(chunks []*rafs.Chunk) ([][]byte, error) {
		bufs := make([][]byte, len(chunks))
		for i, c := range chunks {
			bufs[i] = make([]byte, c.UncompressedSize)
		}
		return bufs, f.ReadChunks(context.Background(), b, chunks, bufs)
	}
	check := func(chunks []*rafs.Chunk, bufs [][]byte) {
		t.Helper()
		for i, c := range chunks {
			want := ti.content[c.UncompressedOffset : c.UncompressedOffset+uint64(c.UncompressedSize)]
			if !bytes.Equal(bufs[i], want) {
				t.Fatalf("chunk %d: wrong bytes", c.Index)
			}
		}
	}
	var all []*rafs.Chunk
	for _, fc := range ti.file().Chunks {
		all = append(all, fc.Chunk)
	}
	// Out of order and one chunk twice: still sorted into runs.
	chunks := append([]*rafs.Chunk{all[5], all[4]}, all[6:]...)
	chunks = append(chunks, all[7])
	bufs, err := read(chunks)
	if err != nil {
		t.Fatal(err)
	}
	check(chunks, bufs)
	for _, r := range be.ranges {
		if r[1] > 256<<10 {
			t.Errorf("request of %d bytes exceeds the 256 KiB merging size", r[1])
		}
	}
	// Chunks 4-15 stored back to back (zstd: 12 chunks, <= 768 KiB raw):
	// at least 3, far fewer than 12 requests.
	if n := be.count(); n >= len(all[4:]) || n < 1 {
		t.Fatalf("%d requests for %d chunks: not merged (%v)", n, len(all[4:]), be.ranges)
	}
	if got := metric(t, reg, "rafsd_chunk_digest_failures_total", map[string]string{"source": "backend"}); got != 0 {
		t.Fatalf("digest failures %v on a good blob", got)
	}

	// A corrupt chunk: checked twice (the run, then alone), then EIO.
	bad := all[2]
	flipByte(t, blobPath, int64(bad.CompressedOffset)+int64(bad.CompressedSize)/2)
	before := be.count()
	if _, err := read(all[:4]); rafs.Errno(err) != syscall.EIO {
		t.Fatalf("run over a corrupt chunk: %v, want EIO", err)
	}
	if got := metric(t, reg, "rafsd_chunk_digest_failures_total", map[string]string{"source": "backend"}); got != 2 {
		t.Errorf("digest failures %v, want 2 (in the run, then alone)", got)
	}
	if n := be.count() - before; n != 2 {
		t.Errorf("%d requests for a run with a corrupt chunk, want 2 (the run, the refetch)", n)
	}
	// Its neighbours still read.
	good := []*rafs.Chunk{all[0], all[1], all[3]}
	if bufs, err := read(good); err != nil {
		t.Fatal(err)
	} else {
		check(good, bufs)
	}
	// Bad arguments are refused, not read.
	if err := f.ReadChunks(context.Background(), b, all[:2], make([][]byte, 1)); rafs.Errno(err) != syscall.EINVAL {
		t.Errorf("2 chunks, 1 buffer: %v, want EINVAL", err)
	}
	if err := f.ReadChunks(context.Background(), b, all[:1], [][]byte{make([]byte, 3)}); rafs.Errno(err) != syscall.EINVAL {
		t.Errorf("short buffer: %v, want EINVAL", err)
	}
}

// TestReadChunksCachedGoesThroughCache: with a blob cache, ReadChunks is
// ReadChunkAt per chunk (its streams merge and keep the chunks).
func TestReadChunksCachedGoesThroughCache(t *testing.T) {
	ti := buildImage(t, makeContent(42, 8*64<<10), 64<<10, codec.None)
	dir := t.TempDir()
	ti.writeBlob(t, dir)
	f, _ := newFetcher(t, parseConfig(t, localConfig(dir, "blobcache", filepath.Join(dir, "cache"), false, false, 1<<20)))
	addImage(t, f, ti.img)
	var chunks []*rafs.Chunk
	var bufs [][]byte
	for _, fc := range ti.file().Chunks {
		chunks = append(chunks, fc.Chunk)
		bufs = append(bufs, make([]byte, fc.Chunk.UncompressedSize))
	}
	if err := f.ReadChunks(context.Background(), ti.img.Blobs[0], chunks, bufs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(bytes.Join(bufs, nil), ti.content) {
		t.Fatal("wrong bytes")
	}
	settle(f)
	if r, n := f.CacheBlob(ti.img.Blobs[0]).Ready(); r != n {
		t.Fatalf("%d/%d chunks cached", r, n)
	}
}

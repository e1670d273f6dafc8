package storage

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsd/rafsd/internal/testutil"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
)

var fixtures = testutil.NydusFixtures()

// TestNydusFixtures serves images built by nydus-image (v6 zstd/blake3,
// v5 uncompressed/sha256) through the fetcher in every cache mode and
// compares every file with the uncached reference reader (and, for v6,
// with the source files).
func TestNydusFixtures(t *testing.T) {
	for _, name := range []string{"v6-zstd-blake3", "v5-none-sha256"} {
		dir := filepath.Join(fixtures, name)
		img, err := bootstrap.Open(filepath.Join(dir, "bootstrap"))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		blobs := filepath.Join(dir, "blobs")
		ref := rafs.BlobChunkReader{Open: func(b *rafs.Blob) (io.ReaderAt, error) { return os.Open(filepath.Join(blobs, b.ID)) }}
		for _, mode := range []struct {
			cache      string
			compressed bool
		}{{"", false}, {"blobcache", false}, {"blobcache", true}} {
			t.Run(fmt.Sprintf("%s/%s/compressed=%v", name, mode.cache, mode.compressed), func(t *testing.T) {
				work := filepath.Join(t.TempDir(), "cache")
				js := localConfig(blobs, mode.cache, work, mode.compressed, true, 1<<20)
				f, reg := newFetcher(t, parseConfig(t, js))
				img.Prefetch = nil
				if err := f.AddImage(img); err != nil {
					t.Fatal(err)
				}
				files := 0
				for pass := 0; pass < 2; pass++ {
					// The first pass's streams write their last chunks to
					// the cache after handing them out: let them finish.
					settle(f)
					err := img.Walk(func(path string, in *rafs.Inode) error {
						if !in.IsRegular() {
							return nil
						}
						files++
						got := make([]byte, in.Size)
						want := make([]byte, in.Size)
						if _, err := img.ReadAt(context.Background(), f, in, got, 0); err != nil && err != io.EOF {
							return fmt.Errorf("%s: %w", path, err)
						}
						if _, err := img.ReadAt(context.Background(), ref, in, want, 0); err != nil && err != io.EOF {
							return fmt.Errorf("%s (reference): %w", path, err)
						}
						if !bytes.Equal(got, want) {
							return fmt.Errorf("%s: fetcher bytes differ from the reference reader", path)
						}
						if src := filepath.Join(dir, "source", path); name == "v6-zstd-blake3" {
							if orig, err := os.ReadFile(src); err != nil || !bytes.Equal(orig, got) {
								return fmt.Errorf("%s: differs from the source file (%v)", path, err)
							}
						}
						return nil
					})
					if err != nil {
						t.Fatal(err)
					}
				}
				if files == 0 {
					t.Fatal("no regular files in the fixture")
				}
				if n := metric(t, reg, "rafsd_chunk_digest_failures_total", nil); n != 0 {
					t.Fatalf("%v digest failures on a good image", n)
				}
				if mode.cache != "" && metric(t, reg, "rafsd_blobcache_hits_total", nil) == 0 {
					t.Fatal("second pass did not hit the cache")
				}
			})
		}
	}
}

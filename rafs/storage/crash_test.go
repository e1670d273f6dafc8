package storage

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/storage/backend"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
)

const crashEnv = "RAFSD_STORAGE_CRASH_CHILD"

func crashImage(t testing.TB) *testImage {
	return buildImage(t, makeContent(21, 6<<20), 64<<10, codec.Zstd)
}

// TestCrashSafety kills a process that is filling the cache (SIGKILL at
// many random points) and checks after each kill that every chunk the map
// marks present has its exact bytes in the data file.
func TestCrashSafety(t *testing.T) {
	if spec := os.Getenv(crashEnv); spec != "" {
		crashChild(t, spec)
		return
	}
	ti := crashImage(t)
	blobDir := t.TempDir()
	ti.writeBlob(t, blobDir)
	b := ti.img.Blobs[0]
	r := rand.New(rand.NewSource(time.Now().UnixNano()))
	var work string
	totalReady := 0
	const kills = 12
	for i := range kills {
		if i%2 == 0 {
			work = filepath.Join(t.TempDir(), "cache")
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashSafety$", "-test.count=1")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|%d", crashEnv, blobDir, work, r.Int63()))
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill() })
		sc := bufio.NewScanner(out)
		ready := false
		for sc.Scan() {
			if strings.Contains(sc.Text(), "CHILD READY") {
				ready = true
				break
			}
		}
		if !ready {
			cmd.Wait()
			t.Fatalf("child did not start: %s", stderr.String())
		}
		go func() {
			for sc.Scan() {
			}
		}()
		time.Sleep(time.Duration(1+r.Intn(400)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()

		n := verifyCache(t, work, ti)
		totalReady += n
		t.Logf("kill %d: %d/%d chunks marked present, all verified", i, n, b.ChunkCount)
	}
	if totalReady == 0 {
		t.Fatal("the children never cached anything before being killed: the test proved nothing")
	}
	// A fresh fetcher on the last cache reads everything right.
	f, reg := newFetcher(t, parseConfig(t, localConfig(blobDir, "blobcache", work, false, true, 256<<10)))
	if !bytes.Equal(ti.readAll(t, f), ti.content) {
		t.Fatal("wrong bytes from a cache that survived kills")
	}
	if n := metric(t, reg, "rafsd_chunk_digest_failures_total", nil); n != 0 {
		t.Fatalf("%v digest failures reading a cache that survived kills", n)
	}
}

// verifyCache checks that every chunk marked present is intact and
// returns how many are.
func verifyCache(t *testing.T, work string, ti *testImage) int {
	t.Helper()
	st, err := blobcache.Open(work, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	cb, err := st.Blob(ti.img.Blobs[0], false)
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Release()
	n := 0
	for _, fc := range ti.file().Chunks {
		if !cb.Has(fc.Index) {
			continue
		}
		n++
		p := make([]byte, fc.UncompressedSize)
		if err := cb.ReadAt(p, int64(fc.UncompressedOffset)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, ti.content[fc.FileOffset:fc.FileOffset+uint64(fc.UncompressedSize)]) {
			t.Fatalf("chunk %d is marked present but its cached bytes are wrong", fc.Index)
		}
	}
	return n
}

// crashChild reads random ranges with 8 goroutines until killed.
func crashChild(t *testing.T, spec string) {
	parts := strings.Split(spec, "|")
	if len(parts) != 3 {
		t.Fatalf("bad %s %q", crashEnv, spec)
	}
	var seed int64
	fmt.Sscan(parts[2], &seed)
	ti := crashImage(t)
	// Slow the backend and flush often so that kills land in every phase:
	// fetching, writing data, fdatasync, marking the map.
	blobcache.FlushInterval = 5 * time.Millisecond
	cfg := parseConfig(t, localConfig(parts[0], "blobcache", parts[1], false, false, 64<<10))
	be := &slowBackend{Backend: backend.NewLocalFS(*cfg.Backend.LocalFS, backend.Hooks{})}
	f, err := New(cfg, WithBackend(be))
	if err != nil {
		t.Fatal(err)
	}
	addImage(t, f, ti.img)
	fmt.Println("CHILD READY")
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed + int64(g)))
			buf := make([]byte, 128<<10)
			for {
				off := r.Intn(len(ti.content) - len(buf))
				if _, err := ti.img.ReadAt(context.Background(), f, ti.file(), buf, int64(off)); err != nil {
					fmt.Fprintln(os.Stderr, "child read:", err)
					os.Exit(3)
				}
			}
		}()
	}
	wg.Wait()
}

type slowBackend struct{ backend.Backend }

func (s *slowBackend) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	time.Sleep(40 * time.Millisecond)
	return s.Backend.ReadAt(ctx, id, p, off)
}

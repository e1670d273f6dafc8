package fanotifyfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/internal/testutil"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/storage"
	"github.com/rafsd/rafsd/rafs/storage/backend"
)

// makeTree writes a small tree with what an image must carry: nested
// dirs, large and small files, hardlinks, symlinks, xattrs, owners, an
// empty and a sparse file.
func makeTree(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(src+"/usr/bin", 0o755))
	must(os.Mkdir(src+"/private", 0o700))
	must(os.WriteFile(src+"/usr/bin/tool", fstest.Bytes(1, 3<<20+17), 0o755))
	must(os.WriteFile(src+"/usr/bin/small", []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(src+"/empty", nil, 0o644))
	must(os.WriteFile(src+"/text", bytes.Repeat([]byte("compressible "), 100000), 0o644))
	must(os.WriteFile(src+"/private/key", []byte("k"), 0o600))
	must(os.Chown(src+"/private/key", 1000, 1000))
	must(os.Link(src+"/usr/bin/tool", src+"/usr/bin/tool-link"))
	must(os.Symlink("tool", src+"/usr/bin/rel"))
	must(unix.Lsetxattr(src+"/text", "user.origin", []byte("test"), 0))
	must(unix.Lsetxattr(src+"/usr", "trusted.overlay.opaque", []byte("y"), 0))
	f, err := os.Create(src + "/sparse")
	must(err)
	f.Write([]byte("head"))
	f.WriteAt([]byte("tail"), 2<<20+5)
	f.Close()
	for i := range 20 {
		must(os.WriteFile(fmt.Sprintf("%s/usr/f%02d", src, i), fstest.Bytes(int64(i+10), 10000*i+1), 0o644))
	}
	filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		ts := []unix.Timespec{unix.NsecToTimespec(1e18), unix.NsecToTimespec(1700000000e9)}
		unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
		return nil
	})
	return src
}

// diffTrees runs diff -r in another process, as a user of the mount would.
func diffTrees(t *testing.T, want, got string) {
	t.Helper()
	out, err := exec.Command("diff", "-r", "--no-dereference", want, got).CombinedOutput()
	if err != nil {
		t.Fatalf("diff -r %s %s: %v\n%s", want, got, err, out)
	}
}

func TestTreeMatchesSource(t *testing.T) {
	t.Run("rafs-builder-zstd", func(t *testing.T) {
		src := makeTree(t)
		im := buildImage(t, src, 256<<10)
		s := startServer(t, 10*time.Second)
		f := newFetcher(t, im.blobDir, t.TempDir())
		m := mount(t, s, im, f, Options{})
		diffTrees(t, src, m.Mountpoint())
		fstest.CompareTrees(t, src, m.Mountpoint())
		if st := s.Stats(); st.Fills == 0 || st.Failures != 0 {
			t.Fatalf("stats %+v: want fills, no failures", st)
		}
		// Everything is cached now: a second mount of the same cache
		// reads it all without the backend.
		before := f.BackendMetrics().ReadAmountTotal
		m2 := mount(t, s, im, f, Options{})
		diffTrees(t, src, m2.Mountpoint())
		if moved := f.BackendMetrics().ReadAmountTotal - before; moved != 0 {
			t.Fatalf("a fully cached image moved %d backend bytes", moved)
		}
	})
	t.Run("nydus-image-fixture", func(t *testing.T) {
		dir := filepath.Join(testutil.NydusFixtures(), "v6-zstd-blake3")
		if _, err := os.Stat(dir); err != nil {
			dir = "../../rafs/v6/testdata/v6-zstd-blake3"
		}
		im := &image{boot: filepath.Join(dir, "bootstrap"), blobDir: filepath.Join(dir, "blobs")}
		s := startServer(t, 10*time.Second)
		f := newFetcher(t, im.blobDir, t.TempDir())
		m := mount(t, s, im, f, Options{})
		diffTrees(t, filepath.Join(dir, "source"), m.Mountpoint())
		for name, size := range map[string]int64{"lib.rs": 16931, "sync_io.rs": 13400} {
			fi, err := os.Stat(filepath.Join(m.Mountpoint(), name))
			if err != nil || fi.Size() != size {
				t.Fatalf("%s: %v, size %v want %d", name, err, fi, size)
			}
		}
	})
}

// Reading 5% of a 256 MiB image moves at most 10% of the blob.
func TestOnlyReadIsFetched(t *testing.T) {
	src := t.TempDir()
	const files, fileSize = 64, 4 << 20 // 256 MiB
	for i := range files {
		if err := os.WriteFile(fmt.Sprintf("%s/f%02d", src, i), fstest.Bytes(int64(i), fileSize), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	im := buildImage(t, src, 1<<20)
	blobSize := im.img.Blobs[0].CompressedSize
	s := startServer(t, 10*time.Second)
	f := newFetcher(t, im.blobDir, t.TempDir())
	m := mount(t, s, im, f, Options{})
	// 3 whole files (12 MiB) and a 256 KiB piece of another: 4.8%.
	read := 0
	for _, i := range []int{3, 17, 40} {
		got, err := os.ReadFile(fmt.Sprintf("%s/f%02d", m.Mountpoint(), i))
		if err != nil || !bytes.Equal(got, fstest.Bytes(int64(i), fileSize)) {
			t.Fatalf("f%02d: %v, bytes equal %v", i, err, err == nil && bytes.Equal(got, fstest.Bytes(int64(i), fileSize)))
		}
		read += len(got)
	}
	fh, err := os.Open(m.Mountpoint() + "/f50")
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 256<<10)
	if _, err := fh.ReadAt(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	if want := fstest.Bytes(50, fileSize)[1<<20 : 1<<20+256<<10]; !bytes.Equal(p, want) {
		t.Fatal("f50: wrong bytes")
	}
	read += len(p)
	moved := f.BackendMetrics().ReadAmountTotal
	t.Logf("read %d of %d bytes (%.1f%%); backend moved %d (%.1f%% of the blob); %+v",
		read, blobSize, 100*float64(read)/float64(blobSize), moved, 100*float64(moved)/float64(blobSize), s.Stats())
	if moved < uint64(read)*9/10 {
		t.Fatalf("backend moved %d bytes for %d read: the metric does not count", moved, read)
	}
	if moved > blobSize/10 {
		t.Fatalf("backend moved %d bytes, more than 10%% of the %d-byte blob", moved, blobSize)
	}
}

// A flipped byte in the backend blob fails the read of its file with EIO;
// the other files read fine and nothing ever reads wrong or zero bytes.
func TestCorruptBlobIsEIO(t *testing.T) {
	src := t.TempDir()
	a, b := fstest.Bytes(1, 600<<10), fstest.Bytes(2, 600<<10)
	os.WriteFile(src+"/a", a, 0o644)
	os.WriteFile(src+"/b", b, 0o644)
	im := buildImage(t, src, 64<<10)
	// Flip a byte in the middle of a's third chunk.
	var target uint64
	for _, in := range im.img.Inodes {
		for _, e := range in.Entries {
			if e.Name == "a" {
				c := im.img.Inodes[e.Ino-1].Chunks[2]
				target = c.CompressedOffset + uint64(c.CompressedSize)/2
			}
		}
	}
	blob, err := os.ReadFile(im.blobPath())
	if err != nil {
		t.Fatal(err)
	}
	blob[target] ^= 0x40
	if err := os.WriteFile(im.blobPath(), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, 10*time.Second)
	f := newFetcher(t, im.blobDir, t.TempDir())
	m := mount(t, s, im, f, Options{ReadAheadKB: -1})
	got, err := os.ReadFile(m.Mountpoint() + "/b")
	if err != nil || !bytes.Equal(got, b) {
		t.Fatalf("b: %v", err)
	}
	for range 3 { // again: a denied range must not become readable
		fh, err := os.Open(m.Mountpoint() + "/a")
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 64<<10)
		_, err = fh.ReadAt(p, 2*64<<10)
		fh.Close()
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read of the corrupt chunk: %v, want EIO", err)
		}
	}
	// The chunks before it are good and read fine.
	fh, _ := os.Open(m.Mountpoint() + "/a")
	p := make([]byte, 64<<10)
	_, err = fh.ReadAt(p, 0)
	fh.Close()
	if err != nil || !bytes.Equal(p, a[:len(p)]) {
		t.Fatalf("good chunk of a: %v", err)
	}
	if st := s.Stats(); st.Failures == 0 {
		t.Fatalf("stats %+v: no denied event", st)
	}
}

// gateBackend blocks every read until released (a hung registry).
type gateBackend struct {
	backend.Backend
	gate chan struct{}
}

func (g *gateBackend) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	<-g.gate
	return g.Backend.ReadAt(ctx, id, p, off)
}

// A hung backend fails the read with EIO within the event deadline.
func TestHungBackendIsEIO(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(src+"/a", fstest.Bytes(1, 1<<20), 0o644)
	im := buildImage(t, src, 64<<10)
	inner, err := backend.New(mustParse(t, im.blobDir).Backend, backend.Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	gb := &gateBackend{Backend: inner, gate: make(chan struct{})}
	var once sync.Once
	release := func() { once.Do(func() { close(gb.gate) }) }
	f := newFetcher(t, im.blobDir, t.TempDir(), storage.WithBackend(gb))
	t.Cleanup(release) // runs before the fetcher closes
	const timeout = 700 * time.Millisecond
	s := startServer(t, timeout)
	m := mount(t, s, im, f, Options{})
	start := time.Now()
	_, err = os.ReadFile(m.Mountpoint() + "/a")
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read with a hung backend: %v, want EIO", err)
	}
	if took > timeout+5*time.Second {
		t.Fatalf("EIO after %s, deadline %s", took, timeout)
	}
	t.Logf("EIO after %s (deadline %s)", took, timeout)
	// Once the backend answers (and the stalled fill drains), the file
	// reads, and right.
	release()
	var got []byte
	for end := time.Now().Add(10 * time.Second); ; {
		got, err = os.ReadFile(m.Mountpoint() + "/a")
		if err == nil || time.Now().After(end) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil || !bytes.Equal(got, fstest.Bytes(1, 1<<20)) {
		t.Fatalf("after the backend recovered: %v", err)
	}
}

// Once every chunk of a cache file is present its mark is removed: reads
// that miss the page cache then raise no events, and still read right.
func TestCompleteFileIsUnmarked(t *testing.T) {
	src := t.TempDir()
	data := fstest.Bytes(3, 5<<20)
	if err := os.WriteFile(src+"/f", data, 0o644); err != nil {
		t.Fatal(err)
	}
	im := buildImage(t, src, 1<<20)
	s := startServer(t, 10*time.Second)
	f := newFetcher(t, im.blobDir, t.TempDir())
	m := mount(t, s, im, f, Options{})
	p := m.Mountpoint() + "/f"
	if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("first read: %v, equal %v", err, err == nil && bytes.Equal(got, data))
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().Unmarked != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("complete cache file still marked: %+v", s.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Events are counted once answered, after their reader moved on:
	// let the count settle.
	before := s.Stats().Events
	for {
		time.Sleep(50 * time.Millisecond)
		if n := s.Stats().Events; n != before {
			before = n
			continue
		}
		break
	}
	for _, q := range []string{p, m.CacheFiles()[0]} {
		fh, err := os.Open(q)
		if err != nil {
			t.Fatal(err)
		}
		unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
		fh.Close()
	}
	if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after unmark: %v, equal %v", err, err == nil && bytes.Equal(got, data))
	}
	if ev := s.Stats().Events - before; ev != 0 {
		t.Fatalf("%d events for a complete, unmarked file", ev)
	}
	// A new mount of the complete cache marks nothing.
	m2 := mount(t, s, im, f, Options{})
	if got, err := os.ReadFile(m2.Mountpoint() + "/f"); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("second mount: %v", err)
	}
}

// The fast path (Present) allocates nothing.
func TestPresentAllocatesNothing(t *testing.T) {
	src := t.TempDir()
	if err := os.WriteFile(src+"/f", fstest.Bytes(4, 3<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	im := buildImage(t, src, 1<<20)
	s := startServer(t, 10*time.Second)
	s.keepMarks = true
	f := newFetcher(t, im.blobDir, t.TempDir())
	m := mount(t, s, im, f, Options{})
	if _, err := os.ReadFile(m.Mountpoint() + "/f"); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(m.CacheFiles()[0], &st); err != nil {
		t.Fatal(err)
	}
	off := uint64(0)
	ev := fanotify.Event{Mask: unix.FAN_PRE_ACCESS, HasRange: true, Count: 1 << 20, Dev: st.Dev, Ino: st.Ino}
	allocs := testing.AllocsPerRun(100, func() {
		ev.Offset = off % (3 << 20)
		off += 1 << 20
		if !s.Present(ev) {
			t.Fatal("a filled range is not present")
		}
	})
	if allocs != 0 {
		t.Fatalf("Present allocates %.1f times per event", allocs)
	}
}

// Filling ahead makes a sequential reader's next chunks present, on a
// buffered and on a directio mount: the reader gets the source bytes, the
// chunks are in the fetcher's chunk map, and a new fetcher over the same
// cache serves the file from it without the backend. Chunks of every kind
// go through it: incompressible (stored as is), compressible and a file
// tail that ends off a block boundary.
func TestFillAheadCaches(t *testing.T) {
	for _, dio := range []bool{false, true} {
		t.Run(fmt.Sprintf("directio=%v", dio), func(t *testing.T) { testFillAheadCaches(t, dio) })
	}
}

func testFillAheadCaches(t *testing.T, dio bool) {
	src := t.TempDir()
	want := append(fstest.Bytes(3, 10<<20), bytes.Repeat([]byte("compressible "), 6<<20/13)...)
	want = append(want, fstest.Bytes(4, 5<<20+4321)...)
	if err := os.WriteFile(src+"/data", want, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src+"/after", []byte("next file"), 0o644); err != nil {
		t.Fatal(err)
	}
	im := buildImage(t, src, 1<<20)
	work := t.TempDir()
	s := startServer(t, 10*time.Second)
	f := newFetcher(t, im.blobDir, work)
	m := mount(t, s, im, f, Options{DirectIO: dio})
	got, err := os.ReadFile(m.Mountpoint() + "/data")
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read: %v, bytes equal %v", err, bytes.Equal(got, want))
	}
	st := s.Stats()
	t.Logf("%+v", st)
	if st.AheadBytes < 8<<20 {
		t.Fatalf("only %d bytes were filled ahead, want most of the %d read", st.AheadBytes, len(want))
	}
	// The cache file holds what the chunk map says: read it through a
	// fresh fetcher over the same directory, whose backend is gone.
	if err := m.Unmount(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	empty := t.TempDir()
	f2 := newFetcher(t, empty, work)
	if err := f2.AddImage(im.img); err != nil {
		t.Fatal(err)
	}
	l := im.img.BlobLayouts()[0]
	for _, c := range l.Chunks {
		if c.UncompressedOffset >= uint64(len(want)) {
			break
		}
		if !f2.Cached(l.Blob, c) {
			continue // not read
		}
		p := make([]byte, c.UncompressedSize)
		if err := f2.ReadChunkAt(context.Background(), l.Blob, c, p, 0); err != nil {
			t.Fatalf("chunk %d from the cache: %v", c.Index, err)
		}
	}
	s2 := startServer(t, 10*time.Second)
	m2 := mount(t, s2, im, f2, Options{DirectIO: dio})
	got, err = os.ReadFile(m2.Mountpoint() + "/data")
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read from the cache: %v, bytes equal %v", err, bytes.Equal(got, want))
	}
	if n := f2.BackendMetrics().ReadAmountTotal; n != 0 {
		t.Fatalf("a complete cache still read %d bytes from the backend", n)
	}
}

// A corrupt chunk inside the window a sequential reader's fill ahead
// covers: the fill refuses it (never writes it), the reader's event for it
// fetches it through the fetcher, which fails it: the reader gets every
// byte before it right and then EIO, never the hole's zeros, on a
// buffered and on a directio mount.
func TestCorruptChunkAheadIsEIO(t *testing.T) {
	src := t.TempDir()
	want := fstest.Bytes(5, 12<<20)
	if err := os.WriteFile(src+"/data", want, 0o644); err != nil {
		t.Fatal(err)
	}
	im := buildImage(t, src, 1<<20)
	c := im.img.BlobLayouts()[0].Chunks[6]
	blob, err := os.ReadFile(im.blobPath())
	if err != nil {
		t.Fatal(err)
	}
	blob[c.CompressedOffset+uint64(c.CompressedSize)/3] ^= 1
	if err := os.WriteFile(im.blobPath(), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, dio := range []bool{false, true} {
		t.Run(fmt.Sprintf("directio=%v", dio), func(t *testing.T) {
			s := startServer(t, 10*time.Second)
			f := newFetcher(t, im.blobDir, t.TempDir())
			m := mount(t, s, im, f, Options{DirectIO: dio})
			fh, err := os.Open(m.Mountpoint() + "/data")
			if err != nil {
				t.Fatal(err)
			}
			defer fh.Close()
			var got []byte
			p := make([]byte, 1<<20)
			for {
				n, err := fh.Read(p)
				got = append(got, p[:n]...)
				if err != nil {
					if !errors.Is(err, syscall.EIO) {
						t.Fatalf("read stopped at %d with %v, want EIO", len(got), err)
					}
					break
				}
				if n == 0 {
					t.Fatalf("read the whole file (%d bytes) past a corrupt chunk", len(got))
				}
			}
			if len(got) > int(c.UncompressedOffset) || !bytes.Equal(got, want[:len(got)]) {
				t.Fatalf("read %d bytes before EIO (corrupt chunk at %d), equal to the source: %v", len(got), c.UncompressedOffset, bytes.Equal(got, want[:min(len(got), len(want))]))
			}
			// The reader has its answer before the server counts it.
			st := s.Stats()
			for deadline := time.Now().Add(5 * time.Second); st.Failures == 0 && time.Now().Before(deadline); st = s.Stats() {
				time.Sleep(10 * time.Millisecond)
			}
			t.Logf("EIO after %d bytes; %+v", len(got), st)
			if st.AheadBytes == 0 || st.Failures == 0 {
				t.Fatalf("stats %+v: want chunks filled ahead and a denied event", st)
			}
		})
	}
}

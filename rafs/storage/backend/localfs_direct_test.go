package backend

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs/config"
)

// directBlob writes a blob of size random bytes into a fresh dir and
// returns the dir, the bytes, and a localfs backend over the dir. It
// fails the test if the blob's filesystem allows O_DIRECT and the
// backend does not use it.
func directBlob(t *testing.T, size int, direct bool) (string, []byte, *LocalFS) {
	t.Helper()
	old := directEnabled.Load()
	directEnabled.Store(direct)
	t.Cleanup(func() { directEnabled.Store(old) })
	dir := t.TempDir()
	data := make([]byte, size)
	r := rand.NewChaCha8([32]byte{7})
	r.Read(data)
	if err := os.WriteFile(filepath.Join(dir, "b"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	l := NewLocalFS(config.LocalFS{Dir: dir}, Hooks{})
	t.Cleanup(func() { l.Close() })
	bf, err := l.open("b")
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statx_t
	dio := unix.Statx(unix.AT_FDCWD, filepath.Join(dir, "b"), 0, unix.STATX_DIOALIGN, &st) == nil && st.Mask&unix.STATX_DIOALIGN != 0 && st.Dio_offset_align > 0
	if direct && dio != bf.direct.Load() {
		t.Fatalf("filesystem allows O_DIRECT: %v, backend uses it: %v", dio, bf.direct.Load())
	}
	if !direct && bf.direct.Load() {
		t.Fatal("direct I/O used while turned off")
	}
	return dir, data, l
}

// TestLocalFSDirectReads reads ranges of every alignment through ReadAt
// and streams of every read size through OpenRange, with O_DIRECT and
// without: the bytes must be the file's, and a range past the end must
// fail as it did before O_DIRECT (a ReadError, short stream).
func TestLocalFSDirectReads(t *testing.T) {
	const size = 3<<20 + 777
	for _, direct := range []bool{true, false} {
		dir, data, l := directBlob(t, size, direct)
		dropPages(t, filepath.Join(dir, "b"))
		ctx := context.Background()
		ranges := []struct{ off, n int }{
			{0, 4096}, {0, 1 << 20}, {1 << 20, 1 << 20}, {512, 512}, // aligned
			{1, 10}, {511, 2}, {4095, 4097}, {100, 1<<20 + 5}, // unaligned
			{0, 3 << 20}, {7, 2<<20 + 3}, // more than a bounce buffer
			{size - 777, 777}, {size - 1000, 1000}, {size - 1, 1}, // the tail
			{size - 4096, 4096}, {0, size},
		}
		for _, rg := range ranges {
			for _, shift := range []int{0, 1} {
				// shift misaligns the buffer's address.
				buf := make([]byte, rg.n+shift)[shift:]
				if err := l.ReadAt(ctx, "b", buf, int64(rg.off)); err != nil {
					t.Fatalf("direct=%v ReadAt [%d,+%d): %v", direct, rg.off, rg.n, err)
				}
				if !bytes.Equal(buf, data[rg.off:rg.off+rg.n]) {
					t.Fatalf("direct=%v ReadAt [%d,+%d) (buffer shift %d): wrong bytes", direct, rg.off, rg.n, shift)
				}
			}
			for _, step := range []int{1 << 20, 4096, 511, 100000} {
				if rg.n > 64<<10 && step < 4096 || rg.n > 1<<20 && step < 1<<16 {
					continue
				}
				rc, err := l.OpenRange(ctx, "b", int64(rg.off), int64(rg.n))
				if err != nil {
					t.Fatal(err)
				}
				var got []byte
				p := make([]byte, step)
				for {
					k, err := rc.Read(p)
					got = append(got, p[:k]...)
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Fatalf("direct=%v stream [%d,+%d) step %d: %v", direct, rg.off, rg.n, step, err)
					}
				}
				rc.Close()
				if !bytes.Equal(got, data[rg.off:rg.off+rg.n]) {
					t.Fatalf("direct=%v stream [%d,+%d) step %d: wrong bytes (%d read)", direct, rg.off, rg.n, step, len(got))
				}
			}
		}
		bf, _ := l.open("b")
		if direct && !bf.direct.Load() {
			t.Fatal("O_DIRECT was given up on")
		}
		// Direct reads leave the blob out of the page cache.
		if n := cachedPages(t, filepath.Join(dir, "b")); direct && n > 0 || !direct && n == 0 {
			t.Errorf("direct=%v: %d pages of the blob in the page cache", direct, n)
		}
		for _, rg := range []struct{ off, n int }{{size - 10, 11}, {size, 1}, {size + 4096, 4096}, {size - 4096, 8192}} {
			err := l.ReadAt(ctx, "b", make([]byte, rg.n), int64(rg.off))
			var re *ReadError
			if !errors.As(err, &re) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("direct=%v ReadAt [%d,+%d) past the end: %v, want a ReadError wrapping ErrUnexpectedEOF", direct, rg.off, rg.n, err)
			}
			rc, err := l.OpenRange(ctx, "b", int64(rg.off), int64(rg.n))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadAll(rc); !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("direct=%v stream [%d,+%d) past the end: %v, want ErrUnexpectedEOF", direct, rg.off, rg.n, err)
			}
			rc.Close()
		}
	}
}

// TestLocalFSDirectSeesUnsyncedWrites: a blob rewritten through the page
// cache and not synced (as tests that flip a byte do) reads back new with
// O_DIRECT, which writes dirty pages back before reading around them.
func TestLocalFSDirectSeesUnsyncedWrites(t *testing.T) {
	dir, data, l := directBlob(t, 1<<20, true)
	ctx := context.Background()
	p := make([]byte, 8192)
	if err := l.ReadAt(ctx, "b", p, 4096); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "b"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{^data[5000]}, 5000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := l.ReadAt(ctx, "b", p, 4096); err != nil {
		t.Fatal(err)
	}
	if p[5000-4096] != ^data[5000] {
		t.Fatal("O_DIRECT read missed a write still in the page cache")
	}
}

func dropPages(t *testing.T, path string) {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	if n := cachedPages(t, path); n > 0 {
		t.Fatalf("%d pages still cached after FADV_DONTNEED", n)
	}
}

// cachedPages counts the pages of the file at path in the page cache.
func cachedPages(t *testing.T, path string) int {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatalf("mincore: %v", e)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

package cachefiles

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/codec"
)

// testImage is a RAFS v6 image on disk: bootstrap plus a localfs blob dir.
type testImage struct {
	boot, blobDir, src string
	img                *rafs.Image
}

// writeTree writes files of mixed sizes (half random, half zeros) under dir.
func writeTree(t testing.TB, dir string, seed int64, files map[string]int) {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	for p, n := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		data := make([]byte, n)
		rng.Read(data[:n/2])
		if err := os.WriteFile(full, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// buildImage builds src into a zstd RAFS v6 image (64 KiB chunks) whose
// blob goes to blobDir, reusing the chunks of dicts.
func buildImage(t testing.TB, src, blobDir string, dicts ...*rafs.Image) *testImage {
	return buildImageOpts(t, src, blobDir, builder.Options{ChunkDicts: dicts})
}

func buildImageOpts(t testing.TB, src, blobDir string, opts builder.Options) *testImage {
	t.Helper()
	c := codec.Zstd
	opts.Version, opts.ChunkSize, opts.Compressor = 6, 64<<10, &c
	boot := filepath.Join(t.TempDir(), "bootstrap")
	if _, err := builder.BuildDirFiles(context.Background(), opts, src, blobDir, boot); err != nil {
		t.Fatal(err)
	}
	img, err := bootstrap.Open(boot)
	if err != nil {
		t.Fatal(err)
	}
	return &testImage{boot: boot, blobDir: blobDir, src: src, img: img}
}

func bindReq(id, domain string, im *testImage) *BindRequest {
	be, _ := json.Marshal(map[string]any{"dir": im.blobDir})
	return &BindRequest{Type: "bootstrap", ID: id, DomainID: domain, Config: BindConfig{
		ID: id, BackendType: "localfs", BackendConfig: be, CacheType: "fscache",
		CacheConfig: json.RawMessage(`{"work_dir":"/nonexistent"}`), MetadataPath: im.boot,
	}}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// testDaemon is a daemon whose replies are recorded instead of written to
// /dev/cachefiles (the host kernel has no on-demand cachefiles; the
// guest scenario drives the real device).
func testDaemon(t testing.TB) (*Daemon, *[]string) {
	d := newDaemon(Config{Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	var replies []string
	d.cmd = func(s string) error { replies = append(replies, s); return nil }
	t.Cleanup(func() { d.Close() })
	return d, &replies
}

// cacheFile stands in for the kernel's anon fd: a regular file the daemon
// pwrites into, as it does into the anon fd.
func cacheFile(t testing.TB) (int, string) {
	p := filepath.Join(t.TempDir(), "cache")
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	return fd, p
}

func open(d *Daemon, msgID, obj uint32, volume, cookie string, fd int) {
	d.handleOpen(Msg{ID: msgID, Opcode: OpOpen, ObjectID: obj, Open: &OpenMsg{VolumeKey: volume, CookieKey: cookie, FD: uint32(fd)}})
}

func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// checkFiles verifies that every chunk of every regular file of im that
// lives in blob b is present, with the source's bytes, in the cache file.
func checkFiles(t *testing.T, im *testImage, b *rafs.Blob, cache []byte, only func(*rafs.Chunk) bool) (checked int) {
	t.Helper()
	im.img.Walk(func(path string, ino *rafs.Inode) error {
		if !ino.IsRegular() {
			return nil
		}
		src, err := os.ReadFile(filepath.Join(im.src, path))
		if err != nil {
			t.Fatal(err)
		}
		for _, fc := range ino.Chunks {
			if im.img.Blobs[fc.BlobIndex] != b && im.img.Blobs[fc.BlobIndex].ID != b.ID {
				continue
			}
			if only != nil && !only(fc.Chunk) {
				continue
			}
			c := fc.Chunk
			end := c.UncompressedOffset + uint64(c.UncompressedSize)
			if end > uint64(len(cache)) {
				t.Fatalf("%s: chunk at %d+%d beyond cache file (%d bytes)", path, c.UncompressedOffset, c.UncompressedSize, len(cache))
			}
			want := src[fc.FileOffset : fc.FileOffset+uint64(c.UncompressedSize)]
			if !bytes.Equal(cache[c.UncompressedOffset:end], want) {
				t.Fatalf("%s: chunk at file offset %d differs in the cache file", path, fc.FileOffset)
			}
			checked++
		}
		return nil
	})
	return checked
}

func TestBindOpenRead(t *testing.T) {
	blobDir := t.TempDir()
	src1 := t.TempDir()
	writeTree(t, src1, 1, map[string]int{"bin/big": 3<<20 + 777, "etc/small": 100, "lib/a": 200 << 10, "lib/b": 65536})
	im1 := buildImage(t, src1, blobDir)
	// Image 2 shares image 1's chunks (chunk dict) and adds its own.
	src2 := t.TempDir()
	writeTree(t, src2, 1, map[string]int{"bin/big": 3<<20 + 777, "etc/small": 100, "lib/a": 200 << 10, "lib/b": 65536})
	writeTree(t, src2, 2, map[string]int{"new/file": 300 << 10})
	im2 := buildImage(t, src2, blobDir, im1.img)
	if len(im2.img.Blobs) != 2 || im2.img.Blobs[0].ID != im1.img.Blobs[0].ID && im2.img.Blobs[1].ID != im1.img.Blobs[0].ID {
		t.Fatalf("image 2 does not share image 1's blob: %d blobs", len(im2.img.Blobs))
	}

	d, replies := testDaemon(t)
	if err := d.BindBlob(bindReq("fsid1", "dom", im1)); err != nil {
		t.Fatal(err)
	}
	if err := d.BindBlob(bindReq("fsid2", "dom", im2)); err != nil {
		t.Fatal(err)
	}
	if err := d.BindBlob(bindReq("fsid1", "dom", im1)); !errors.Is(err, ErrExists) {
		t.Fatalf("second bind of fsid1 = %v, want ErrExists", err)
	}
	list := d.Blobs("dom")
	if len(list) != 4 { // two bootstraps, the shared blob, image 2's own
		t.Fatalf("Blobs = %+v", list)
	}
	shared := im1.img.Blobs[0]
	for _, bi := range list {
		if bi.ID == shared.ID && bi.Images != 2 {
			t.Errorf("shared blob has %d users, want 2", bi.Images)
		}
	}

	t.Run("bootstrap", func(t *testing.T) {
		*replies = nil
		fd, path := cacheFile(t)
		open(d, 10, 1, "erofs,dom", "fsid1", fd)
		fi, _ := os.Stat(im1.boot)
		if want := fmt.Sprintf("copen 10,%d", fi.Size()); len(*replies) != 1 || (*replies)[0] != want {
			t.Fatalf("replies %q, want %q", *replies, want)
		}
		o := d.objects[1]
		if err := d.fill(context.Background(), o, ReadMsg{Off: 0, Len: uint64(fi.Size())}); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(path)
		want, _ := os.ReadFile(im1.boot)
		if len(got)%pageSize != 0 || !bytes.Equal(got[:len(want)], want) || !allZero(got[len(want):]) {
			t.Fatalf("cache file (%d bytes) is not the bootstrap (%d bytes) padded to a page", len(got), len(want))
		}
		if err := d.fill(context.Background(), o, ReadMsg{Off: uint64(fi.Size()) + 4096, Len: 4096}); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("read past the end = %v, want EINVAL", err)
		}
		d.handleClose(Msg{Opcode: OpClose, ObjectID: 1})
		if fdOpen(fd) {
			t.Fatal("CLOSE left the anon fd open")
		}
	})

	t.Run("shared blob", func(t *testing.T) {
		*replies = nil
		fd, path := cacheFile(t)
		open(d, 11, 2, "erofs,dom", shared.ID, fd)
		o := d.objects[2]
		if want := fmt.Sprintf("copen 11,%d", o.size); (*replies)[0] != want || o.size < shared.UncompressedSize {
			t.Fatalf("replies %q, object size %d, blob %d", *replies, o.size, shared.UncompressedSize)
		}
		// Kernel-like requests: 128 KiB windows in random order.
		rng := rand.New(rand.NewSource(3))
		win := uint64(128 << 10)
		offs := rng.Perm(int((o.size + win - 1) / win))
		for _, k := range offs {
			if err := d.fill(context.Background(), o, ReadMsg{Off: uint64(k) * win, Len: win}); err != nil {
				t.Fatal(err)
			}
		}
		cache, _ := os.ReadFile(path)
		n1 := checkFiles(t, im1, shared, cache, nil)
		n2 := checkFiles(t, im2, shared, cache, nil)
		if n1 == 0 || n2 == 0 {
			t.Fatalf("checked %d and %d chunks", n1, n2)
		}
		d.handleClose(Msg{Opcode: OpClose, ObjectID: 2})
	})

	t.Run("partial read fetches little", func(t *testing.T) {
		own := im2.img.Blobs[1]
		if own.ID == shared.ID {
			own = im2.img.Blobs[0]
		}
		fd, path := cacheFile(t)
		open(d, 12, 3, "erofs,dom", own.ID, fd)
		o := d.objects[3]
		backendBytes := func() uint64 {
			m, err := d.BackendMetrics("")
			if err != nil {
				t.Fatal(err)
			}
			return m.ReadAmountTotal
		}
		before := backendBytes()
		// One 4 KiB page in the middle: one chunk is fetched.
		if err := d.fill(context.Background(), o, ReadMsg{Off: o.size / 2, Len: 4096}); err != nil {
			t.Fatal(err)
		}
		moved := backendBytes() - before
		if moved == 0 || moved > 64<<10+4096 {
			t.Fatalf("a 4 KiB read moved %d backend bytes (one 64 KiB chunk expected)", moved)
		}
		m2, err := d.BackendMetrics("fsid2")
		if err != nil || m2.ReadAmountTotal < moved || m2.ReadCount == 0 || m2.BackendType != "localfs" {
			t.Fatalf("BackendMetrics(fsid2) = %+v, %v; want at least the %d bytes moved", m2, err, moved)
		}
		m1, err := d.BackendMetrics("fsid1")
		if err != nil {
			t.Fatal(err)
		}
		if all, err := d.BackendMetrics(""); err != nil || all.ReadAmountTotal != m1.ReadAmountTotal+m2.ReadAmountTotal || all.ReadCount != m1.ReadCount+m2.ReadCount {
			t.Fatalf("BackendMetrics(\"\") = %+v, %v; want the sums of fsid1's %+v and fsid2's", all, err, m1)
		}
		if _, err := d.BackendMetrics("nosuch"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("BackendMetrics(nosuch) = %v, want ErrNotFound", err)
		}
		cache, _ := os.ReadFile(path)
		mid := o.size / 2
		if checkFiles(t, im2, own, cache, func(c *rafs.Chunk) bool {
			return c.UncompressedOffset <= mid && mid < c.UncompressedOffset+uint64(c.UncompressedSize)
		}) != 1 {
			t.Fatal("the chunk under the read is not in the cache file")
		}
		d.handleClose(Msg{Opcode: OpClose, ObjectID: 3})
	})

	t.Run("refused opens", func(t *testing.T) {
		for i, tc := range []struct{ volume, cookie, want string }{
			{"erofs,dom", "nosuchblob", "-2"},
			{"erofs,other", "fsid1", "-2"},
			{"nfs,dom", "fsid1", "-2"},
		} {
			*replies = nil
			fd, _ := cacheFile(t)
			open(d, uint32(20+i), uint32(30+i), tc.volume, tc.cookie, fd)
			if want := fmt.Sprintf("copen %d,%s", 20+i, tc.want); len(*replies) != 1 || (*replies)[0] != want {
				t.Errorf("%s/%s: replies %q, want %q", tc.volume, tc.cookie, *replies, want)
			}
			if fdOpen(fd) {
				t.Errorf("%s/%s: refused OPEN left its fd open", tc.volume, tc.cookie)
			}
		}
		fd1, _ := cacheFile(t)
		open(d, 40, 40, "erofs,dom", "fsid2", fd1)
		*replies = nil
		fd2, _ := cacheFile(t)
		open(d, 41, 40, "erofs,dom", "fsid2", fd2)
		if want := fmt.Sprintf("copen 41,%d", -int(syscall.EALREADY)); (*replies)[0] != want {
			t.Errorf("duplicate object id: %q, want %q", *replies, want)
		}
		d.handleClose(Msg{Opcode: OpClose, ObjectID: 40})
		d.handleClose(Msg{Opcode: OpClose, ObjectID: 999}) // unknown: logged, ignored
	})

	t.Run("unbind", func(t *testing.T) {
		if err := d.UnbindBlob("dom", "fsid1"); err != nil {
			t.Fatal(err)
		}
		for _, bi := range d.Blobs("dom") {
			if bi.ID == "fsid1" || bi.ID == shared.ID && bi.Images != 1 {
				t.Errorf("after unbinding fsid1: %+v", bi)
			}
		}
		if err := d.UnbindBlob("dom", "fsid1"); !errors.Is(err, ErrNotFound) {
			t.Errorf("second unbind = %v, want ErrNotFound", err)
		}
		if err := d.UnbindBlob("dom", ""); err != nil {
			t.Fatal(err)
		}
		if l := d.Blobs(""); len(l) != 0 {
			t.Errorf("after unbinding the domain: %+v", l)
		}
	})
}

// TestCorruptBlob: a blob whose bytes changed on the backend fails the
// fill with EIO (the kernel then fails the reader); other images serve.
func TestCorruptBlob(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, 4, map[string]int{"f": 512 << 10})
	bad := buildImage(t, src, t.TempDir())
	src2 := t.TempDir()
	writeTree(t, src2, 5, map[string]int{"g": 256 << 10})
	good := buildImage(t, src2, t.TempDir())
	blobPath := filepath.Join(bad.blobDir, bad.img.Blobs[0].ID)
	data, _ := os.ReadFile(blobPath)
	for i := range data {
		data[i] ^= 0x5a
	}
	os.WriteFile(blobPath, data, 0o644)

	d, _ := testDaemon(t)
	if err := d.BindBlob(bindReq("bad", "", bad)); err != nil {
		t.Fatal(err)
	}
	if err := d.BindBlob(bindReq("good", "", good)); err != nil {
		t.Fatal(err)
	}
	fd, _ := cacheFile(t)
	open(d, 1, 1, "erofs,bad", bad.img.Blobs[0].ID, fd)
	if err := d.fill(context.Background(), d.objects[1], ReadMsg{Off: 0, Len: 4096}); !errors.Is(err, syscall.EIO) {
		t.Fatalf("fill of a corrupt blob = %v, want EIO", err)
	}
	fd2, path := cacheFile(t)
	open(d, 2, 2, "erofs,good", good.img.Blobs[0].ID, fd2)
	o := d.objects[2]
	if err := d.fill(context.Background(), o, ReadMsg{Off: 0, Len: o.size}); err != nil {
		t.Fatal(err)
	}
	cache, _ := os.ReadFile(path)
	if checkFiles(t, good, good.img.Blobs[0], cache, nil) == 0 {
		t.Fatal("nothing checked")
	}
}

func TestBindRejects(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, 1, map[string]int{"f": 10})
	im := buildImage(t, src, t.TempDir())
	d, _ := testDaemon(t)
	for name, mod := range map[string]func(*BindRequest){
		"empty id":        func(r *BindRequest) { r.ID = "" },
		"comma in id":     func(r *BindRequest) { r.ID = "a,b" },
		"no metadata":     func(r *BindRequest) { r.Config.MetadataPath = "" },
		"missing file":    func(r *BindRequest) { r.Config.MetadataPath = "/nonexistent" },
		"not a bootstrap": func(r *BindRequest) { r.Config.MetadataPath = filepath.Join(im.blobDir, im.img.Blobs[0].ID) },
		"blob type":       func(r *BindRequest) { r.Type = "datablob" },
		"cache type":      func(r *BindRequest) { r.Config.CacheType = "blobcache" },
		"no backend":      func(r *BindRequest) { r.Config.BackendType = "" },
		"bad backend":     func(r *BindRequest) { r.Config.BackendConfig = json.RawMessage(`{"dri":"/x"}`) },
	} {
		r := bindReq("id", "", im)
		mod(r)
		if err := d.BindBlob(r); err == nil {
			t.Errorf("%s: bind succeeded", name)
		} else if strings.Contains(err.Error(), "panic") {
			t.Errorf("%s: %v", name, err)
		}
	}
	if l := d.Blobs(""); len(l) != 0 {
		t.Fatalf("failed binds left %+v", l)
	}
}

func allZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

// TestPrefetch: with prefetch enabled, opening a blob object fills the
// cache file in the background: everything with prefetch_all, else the
// bootstrap's prefetch list.
func TestPrefetch(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, 6, map[string]int{"lib/a": 300 << 10, "lib/sub/b": 100 << 10, "other/c": 400 << 10})
	im := buildImageOpts(t, src, t.TempDir(), builder.Options{Prefetch: []string{"/lib"}})
	for _, tc := range []struct {
		name, cfg string
		want      func(path string) bool
	}{
		{"all", `{"enable":true,"threads_count":3,"prefetch_all":true}`, func(string) bool { return true }},
		{"list", `{"enable":true,"threads_count":2,"prefetch_all":false}`, func(p string) bool { return strings.HasPrefix(p, "/lib/") }},
		{"off", `{"enable":false,"prefetch_all":true}`, func(string) bool { return false }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := testDaemon(t)
			req := bindReq("id", "", im)
			req.Config.PrefetchConfig = json.RawMessage(tc.cfg)
			if err := d.BindBlob(req); err != nil {
				t.Fatal(err)
			}
			fd, path := cacheFile(t)
			open(d, 1, 1, "erofs,id", im.img.Blobs[0].ID, fd)
			d.bg.Wait()
			cache, _ := os.ReadFile(path)
			// Chunks are shared between files (the zero halves): a chunk
			// is wanted if any wanted file has it.
			wanted := map[uint64]bool{}
			im.img.Walk(func(p string, ino *rafs.Inode) error {
				for _, fc := range ino.Chunks {
					if tc.want(p) {
						wanted[fc.UncompressedOffset] = true
					}
				}
				return nil
			})
			im.img.Walk(func(p string, ino *rafs.Inode) error {
				if !ino.IsRegular() || ino.Size == 0 {
					return nil
				}
				src, _ := os.ReadFile(filepath.Join(im.src, p))
				for _, fc := range ino.Chunks {
					c := fc.Chunk
					end := c.UncompressedOffset + uint64(c.UncompressedSize)
					ok := end <= uint64(len(cache)) && bytes.Equal(cache[c.UncompressedOffset:end], src[fc.FileOffset:fc.FileOffset+uint64(c.UncompressedSize)])
					if ok != wanted[c.UncompressedOffset] {
						t.Errorf("%s chunk at %d: prefetched %v, want %v", p, fc.FileOffset, ok, wanted[c.UncompressedOffset])
					}
				}
				return nil
			})
			d.handleClose(Msg{Opcode: OpClose, ObjectID: 1})
			if fdOpen(fd) {
				t.Error("CLOSE left the fd open")
			}
		})
	}
}

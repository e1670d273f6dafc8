package testbed

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/testbed/initramfs"
)

// sourceTree writes a tree with the shapes an image must carry: nested
// directories, empty and multi-chunk files, odd modes, symlinks.
func sourceTree(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	rng := rand.New(rand.NewSource(5))
	write := func(p string, size int, mode os.FileMode) {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		data := make([]byte, size)
		rng.Read(data[:size/2]) // half random, half zeros: compressible and not
		if err := os.WriteFile(full, data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(full, mode); err != nil {
			t.Fatal(err)
		}
	}
	write("bin/tool", 3<<20+12345, 0o755) // several 1 MiB chunks, ragged end
	write("etc/empty", 0, 0o644)
	write("etc/conf", 100, 0o600)
	write("usr/share/doc/readme", 5000, 0o444)
	write("usr/lib/setuid", 10, os.ModeSetuid|0o755)
	for i := 0; i < 40; i++ {
		write(fmt.Sprintf("many/file-%02d", i), i*997, 0o644)
	}
	for _, l := range [][2]string{{"bin/tool", "link-abs-ish"}, {"../bin/tool", "usr/tool-link"}, {"nowhere", "dangling"}} {
		if err := os.Symlink(l[0], filepath.Join(dir, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "empty-dir"), 0o711); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(dir, "empty-dir"), 0o711)
	os.Chmod(dir, 0o755)
	return dir
}

// buildImage builds a RAFS image of src with the builder and returns a
// directory holding "bootstrap" and "blobs/<id>".
func buildImage(t *testing.T, src string) string {
	t.Helper()
	out := t.TempDir()
	blobs := filepath.Join(out, "blobs")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		t.Fatal(err)
	}
	blobFile, err := os.Create(filepath.Join(blobs, "new"))
	if err != nil {
		t.Fatal(err)
	}
	// v5: the v6 bootstrap writer had not landed when this scenario was written.
	b, err := builder.New(builder.Options{Version: 5}, blobFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.AddDir(context.Background(), src); err != nil {
		t.Fatal(err)
	}
	res, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if err := blobFile.Close(); err != nil {
		t.Fatal(err)
	}
	if res.Blob == nil {
		t.Fatal("image has no blob")
	}
	if err := os.Rename(blobFile.Name(), filepath.Join(blobs, res.Blob.ID)); err != nil {
		t.Fatal(err)
	}
	if err := bootstrap.WriteFile(filepath.Join(out, "bootstrap"), res.Image); err != nil {
		t.Fatal(err)
	}
	return out
}

// ext4Disk makes a raw ext4 disk image holding the tree dir.
func ext4Disk(t *testing.T, dir string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.img")
	var size int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, _ error) error {
		if fi != nil {
			size += fi.Size()
		}
		return nil
	})
	mb := size>>20 + 32
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", dir, img, fmt.Sprintf("%dM", mb)).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4 (apt-get install e2fsprogs): %v\n%s", err, out)
	}
	return img
}

// waitMount polls the guest's mountinfo until target is a mount of fstype.
func waitMount(ctx context.Context, a *guest.Client, target, fstype string) error {
	for {
		b, err := a.ReadFile(ctx, "/proc/self/mountinfo", 0)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			// ... mount-point ... - fstype source options
			if len(f) > 6 && f[4] == target {
				for i, x := range f {
					if x == "-" && i+1 < len(f) && strings.HasPrefix(f[i+1], fstype) {
						return nil
					}
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not mounted: %w\n%s", target, ctx.Err(), b)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestGuestFUSE: an image built on the host, on a virtio-blk disk, served
// over FUSE inside the guest; the guest's tree hash equals the host's.
func TestGuestFUSE(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	src := sourceTree(t)
	want, err := treehash.Walk(src)
	if err != nil {
		t.Fatal(err)
	}
	disk := ext4Disk(t, buildImage(t, src))

	server, err := BuildStatic(ctx, "./testbed/testdata/rafsfuse")
	if err != nil {
		t.Fatal(err)
	}
	vm := StartTB(t, Options{
		Disks: []string{disk},
		Files: []initramfs.File{{Path: "/bin/rafsfuse", Source: server}},
	})
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1 /* MS_RDONLY */, Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.Mkdir(ctx, "/mnt/rafs", 0); err != nil {
		t.Fatal(err)
	}
	p, err := a.Start(ctx, guest.StartRequest{Name: "rafsfuse", Argv: []string{
		"/bin/rafsfuse", "-bootstrap", "/img/bootstrap", "-blob-dir", "/img/blobs", "-mountpoint", "/mnt/rafs"}})
	if err != nil {
		t.Fatal(err)
	}
	mctx, mcancel := context.WithTimeout(ctx, 60*time.Second)
	defer mcancel()
	if err := waitMount(mctx, a, "/mnt/rafs", "fuse"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got, err := a.TreeHash(ctx, "/mnt/rafs", true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest hashed the FUSE tree in %s", time.Since(start).Round(time.Millisecond))
	if got.Hash != treehash.Sum(want) {
		t.Errorf("guest tree hash %s != host %s; diff host->guest:\n%s", got.Hash, treehash.Sum(want),
			strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
	}
	// One file read back whole through the guest, byte for byte.
	data, err := a.ReadFile(ctx, "/mnt/rafs/bin/tool", 0)
	if err != nil {
		t.Fatal(err)
	}
	if orig, _ := os.ReadFile(filepath.Join(src, "bin/tool")); !bytes.Equal(data, orig) {
		t.Errorf("bin/tool read in the guest differs (%d bytes, want %d)", len(data), len(orig))
	}
	r, err := a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
	if err != nil {
		t.Fatal(err)
	}
	if r.ExitCode != 0 || r.Killed {
		t.Errorf("FUSE server did not exit cleanly on SIGTERM: %+v\n%s", r, r.Output)
	}
}

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

// buildImages runs `rafs-image create` for each RAFS version and returns a
// directory holding "v<N>/bootstrap" and "blobs/<id>" (a localfs blob dir).
func buildImages(t *testing.T, ctx context.Context, src string, versions ...int) string {
	t.Helper()
	tool, err := BuildStatic(ctx, "./cmd/rafs-image")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	for _, v := range versions {
		boot := filepath.Join(out, fmt.Sprintf("v%d", v), "bootstrap")
		if err := os.MkdirAll(filepath.Dir(boot), 0o755); err != nil {
			t.Fatal(err)
		}
		cmd := exec.CommandContext(ctx, tool, "create", "--fs-version", fmt.Sprint(v),
			"--bootstrap", boot, "--blob-dir", filepath.Join(out, "blobs"), src)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("rafs-image create v%d: %v\n%s", v, err, b)
		}
	}
	return out
}

// committed reports whether path is tracked by git: a command another
// engineer is still writing is not used until it is committed.
func committed(path string) bool {
	root, err := ModuleRoot()
	if err != nil {
		return false
	}
	out, err := exec.Command("git", "-C", root, "ls-files", "--error-unmatch", path).CombinedOutput()
	return err == nil && len(out) > 0
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

// fuseServer is a FUSE daemon run inside the guest.
type fuseServer struct {
	name string
	pkg  string
	argv func(bootstrap, blobDir, mnt string) []string
}

var fuseServers = []fuseServer{
	{"rafsd", "./cmd/rafsd", func(b, d, m string) []string {
		return []string{"/bin/rafsd", "--mountpoint", m, "--bootstrap", b, "--localfs-dir", d, "--log-level", "info"}
	}},
	// rafsfuse serves with package rafs/fs directly: the scenario's stand-in
	// for a checkout where cmd/rafsd is not committed (it was written in
	// parallel with this harness).
	{"rafsfuse", "./testbed/testdata/rafsfuse", func(b, d, m string) []string {
		return []string{"/bin/rafsfuse", "-bootstrap", b, "-blob-dir", d, "-mountpoint", m}
	}},
}

// TestGuestFUSE: images built by `rafs-image create` (RAFS v5 and v6) on a
// virtio-blk disk, served over FUSE inside the guest by a static daemon; the
// guest's tree hash equals the host's.
func TestGuestFUSE(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	src := sourceTree(t)
	want, err := treehash.Walk(src)
	if err != nil {
		t.Fatal(err)
	}
	versions := []int{5, 6}
	disk := ext4Disk(t, buildImages(t, ctx, src, versions...))

	var servers []fuseServer
	var files []initramfs.File
	haveRafsd := committed("cmd/rafsd/main.go")
	if !haveRafsd {
		t.Logf("cmd/rafsd is not committed: the scenario runs with the rafsfuse stand-in")
	}
	for _, s := range fuseServers {
		if (s.name == "rafsd") != haveRafsd {
			continue
		}
		bin, err := BuildStatic(ctx, s.pkg)
		if err != nil {
			t.Fatal(err)
		}
		servers = append(servers, s)
		files = append(files, initramfs.File{Path: "/bin/" + s.name, Source: bin})
	}
	vm := StartTB(t, Options{Disks: []string{disk}, Files: files})
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "/dev/vda", Target: "/img", FSType: "ext4", Flags: 1 /* MS_RDONLY */, Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	for _, s := range servers {
		for _, v := range versions {
			t.Run(fmt.Sprintf("%s/v%d", s.name, v), func(t *testing.T) {
				mnt := fmt.Sprintf("/mnt/%s-v%d", s.name, v)
				if err := a.Mkdir(ctx, mnt, 0); err != nil {
					t.Fatal(err)
				}
				p, err := a.Start(ctx, guest.StartRequest{Name: s.name, Argv: s.argv(fmt.Sprintf("/img/v%d/bootstrap", v), "/img/blobs", mnt)})
				if err != nil {
					t.Fatal(err)
				}
				stopped := false
				defer func() {
					if !stopped {
						a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, Signal: "KILL"})
						a.Unmount(ctx, mnt, 2 /* MNT_DETACH */)
					}
				}()
				mctx, mcancel := context.WithTimeout(ctx, 60*time.Second)
				defer mcancel()
				if err := waitMount(mctx, a, mnt, "fuse"); err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				got, err := a.TreeHash(ctx, mnt, true)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("guest hashed the FUSE tree in %s", time.Since(start).Round(time.Millisecond))
				if got.Hash != treehash.Sum(want) {
					t.Errorf("guest tree hash %s != host %s; diff host->guest:\n%s", got.Hash, treehash.Sum(want),
						strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
				}
				data, err := a.ReadFile(ctx, mnt+"/bin/tool", 0)
				if err != nil {
					t.Fatal(err)
				}
				if orig, _ := os.ReadFile(filepath.Join(src, "bin/tool")); !bytes.Equal(data, orig) {
					t.Errorf("bin/tool read in the guest differs (%d bytes, want %d)", len(data), len(orig))
				}
				stopped = true
				r, err := a.StopProcess(ctx, guest.StopRequest{Handle: p.Handle, GraceMS: 10000})
				if err != nil {
					t.Fatal(err)
				}
				if r.ExitCode != 0 || r.Killed {
					t.Errorf("%s did not exit cleanly on SIGTERM: %+v\n%s", s.name, r, r.Output)
				}
				// The daemon unmounts on SIGTERM; a leftover mount is a defect.
				if b, err := a.ReadFile(ctx, "/proc/self/mountinfo", 0); err == nil && strings.Contains(string(b), " "+mnt+" ") {
					t.Errorf("%s still mounted after %s exited", mnt, s.name)
					a.Unmount(ctx, mnt, 2)
				}
			})
		}
	}
}

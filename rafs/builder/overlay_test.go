package builder

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestOverlayfsWhiteouts builds an overlayfs upper directory (0/0
// character-device whiteouts, trusted.overlay.opaque directories) over
// the image of its lower directory, and compares the result with what
// the kernel's overlayfs shows for the same two directories.
func TestOverlayfsWhiteouts(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	lower, upper, work, merged := filepath.Join(base, "lower"), filepath.Join(base, "upper"), filepath.Join(base, "work"), filepath.Join(base, "merged")
	for _, d := range []string{work, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(lower, "a/x"), []byte("x lower"))
	writeFile(t, filepath.Join(lower, "a/y"), []byte("y lower"))
	writeFile(t, filepath.Join(lower, "c/1"), []byte("one"))
	writeFile(t, filepath.Join(lower, "c/sub/2"), []byte("two"))
	writeFile(t, filepath.Join(lower, "d/keep"), []byte("kept"))
	writeFile(t, filepath.Join(upper, "a/z"), []byte("z upper"))
	writeFile(t, filepath.Join(upper, "c/new"), []byte("new"))
	writeFile(t, filepath.Join(upper, "d/added"), []byte("added"))
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(unix.Mknod(filepath.Join(upper, "a/x"), syscall.S_IFCHR, 0))
	must(unix.Mknod(filepath.Join(upper, "gone"), syscall.S_IFCHR, 0)) // whiteout of nothing
	must(unix.Lsetxattr(filepath.Join(upper, "c"), "trusted.overlay.opaque", []byte("y"), 0))
	setTimes(t, lower)
	setTimes(t, upper)

	blobDir := t.TempDir()
	low := build(t, Options{}, blobDir, func(b *Builder) error { return b.AddDir(t.Context(), lower) })
	res := build(t, Options{Parent: low.img, Whiteouts: WhiteoutOverlayfs}, blobDir, func(b *Builder) error { return b.AddDir(t.Context(), upper) })

	if err := unix.Mount("overlay", merged, "overlay", unix.MS_RDONLY, "lowerdir="+lower+",upperdir="+upper+",workdir="+work); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, 0); err != nil {
			unix.Unmount(merged, unix.MNT_DETACH)
		}
	})
	for _, img := range roundTrips(t, res.img) {
		out := unpackDir(t, img, res.reader())
		// overlayfs reports its own root and merged directories' link
		// counts and times; compare the files, and directories' presence.
		want, got := snapshot(t, merged), snapshot(t, out)
		for p, in := range map[string]bool{"a/y": true, "a/z": true, "c/new": true, "d/keep": true, "a/x": false, "c/1": false, "c/sub": false, "gone": false} {
			if _, ok := want[p]; ok != in {
				t.Fatalf("overlayfs oracle: %s present=%v", p, ok)
			}
		}
		for p, w := range want {
			g, ok := got[p]
			if !ok {
				t.Errorf("%s: missing", p)
				continue
			}
			if w.mode&syscall.S_IFMT == syscall.S_IFDIR {
				if g.mode != w.mode || g.xattrs != w.xattrs {
					t.Errorf("%s: dir mode %o xattrs %q, want %o %q", p, g.mode, g.xattrs, w.mode, w.xattrs)
				}
				continue
			}
			w.linkID, g.linkID = 0, 0
			if w != g {
				t.Errorf("%s:\n want %+v\n  got %+v", p, w, g)
			}
		}
		for p := range got {
			if _, ok := want[p]; !ok {
				t.Errorf("%s: extra", p)
			}
		}
	}
}

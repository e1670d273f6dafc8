package fs_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/codec"
	rfs "github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// makeTree writes a directory with the kinds of files an image holds.
func makeTree(t *testing.T) string {
	t.Helper()
	fstest.RequireRoot(t)
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
	must(os.Chown(src+"/private", 1000, 1000))
	must(os.Link(src+"/usr/bin/tool", src+"/usr/bin/tool-link"))
	must(os.Symlink("tool", src+"/usr/bin/rel"))
	must(os.Symlink("/", src+"/rootlink"))
	must(unix.Mknod(src+"/null", unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mkfifo(src+"/fifo", 0o600))
	must(unix.Lsetxattr(src+"/text", "user.origin", []byte("test"), 0))
	must(unix.Lsetxattr(src+"/usr", "trusted.overlay.opaque", []byte("y"), 0))
	// Sparse: a hole of 2 MiB between data.
	f, err := os.Create(src + "/sparse")
	must(err)
	f.Write([]byte("head"))
	f.WriteAt([]byte("tail"), 2<<20+5)
	f.Close()
	// Fixed mtimes so the comparison does not race the clock.
	filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		ts := []unix.Timespec{unix.NsecToTimespec(1e18), unix.NsecToTimespec(1700000000123456789)}
		unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
		return nil
	})
	return src
}

// TestBuilderImage builds images from a directory with rafs/builder and
// checks the mount against the directory itself, after a round trip
// through the on-disk bootstrap encoding.
func TestBuilderImage(t *testing.T) {
	src := makeTree(t)
	for _, tc := range []struct {
		name    string
		version int
		c       codec.Compressor
		cs      uint32
	}{
		{"v6-zstd", 6, codec.Zstd, 1 << 20},
		{"v5-lz4-64k", 5, codec.LZ4Block, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blobDir := t.TempDir()
			c := tc.c
			opts := builder.Options{Version: tc.version, ChunkSize: tc.cs, Compressor: &c}
			// Through the on-disk encoding, as a daemon gets it.
			p := filepath.Join(t.TempDir(), "bootstrap")
			if _, err := builder.BuildDirFiles(context.Background(), opts, src, blobDir, p); err != nil {
				t.Fatal(err)
			}
			img, err := bootstrap.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			cr := fstest.DirReader(blobDir)
			mnt := fstest.Mount(t, rfs.New(img, cr, rfs.Options{EntryTimeout: time.Second, AttrTimeout: time.Second}), nil)
			fstest.CompareTrees(t, src, mnt)
			fstest.CheckMounted(t, img, cr, mnt, 21)
		})
	}
}

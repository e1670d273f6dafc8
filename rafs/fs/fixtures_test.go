package fs_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/internal/testutil"

	"github.com/rafsd/rafsd/rafs/bootstrap"
	rfs "github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
)

// Images built by the reference nydus-image (see the README there).
var fixtures = testutil.NydusFixtures()

type treeEntry struct {
	Type     string      `json:"type"`
	Name     string      `json:"name"`
	Target   string      `json:"target"`
	Contents []treeEntry `json:"contents"`
}

// TestNydusV5Fixture mounts the nydus-image-built v5 image and checks it
// against its `tree -J` listing and md5sums.
func TestNydusV5Fixture(t *testing.T) {
	dir := filepath.Join(fixtures, "v5-none-sha256")
	img, err := bootstrap.Open(filepath.Join(dir, "bootstrap"))
	if err != nil {
		t.Fatal(err)
	}
	cr := fstest.DirReader(filepath.Join(dir, "blobs"))
	mnt := fstest.Mount(t, rfs.New(img, cr, rfs.DefaultOptions()), nil)
	fstest.CheckMounted(t, img, cr, mnt, 11)

	listing, md5s := testutil.ExpectedTree(t, dir)
	var tree []treeEntry
	if err := json.Unmarshal(listing, &tree); err != nil {
		t.Fatal(err)
	}
	if len(tree) == 0 || tree[0].Type != "directory" {
		t.Fatal("expected-tree.json: no root directory")
	}
	var check func(p string, e treeEntry)
	check = func(p string, e treeEntry) {
		fi, err := os.Lstat(mnt + p)
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return
		}
		switch e.Type {
		case "directory":
			if !fi.IsDir() {
				t.Errorf("%s: %v, want a directory", p, fi.Mode())
				return
			}
			ents, err := os.ReadDir(mnt + p)
			if err != nil {
				t.Fatal(err)
			}
			var got, want []string
			for _, de := range ents {
				got = append(got, de.Name())
			}
			for _, c := range e.Contents {
				want = append(want, c.Name)
				check(strings.TrimSuffix(p, "/")+"/"+c.Name, c)
			}
			sort.Strings(want)
			if strings.Join(got, "\x00") != strings.Join(want, "\x00") {
				t.Errorf("%s lists %q, want %q", p, got, want)
			}
		case "link":
			if target, err := os.Readlink(mnt + p); err != nil || target != e.Target {
				t.Errorf("%s: readlink %q, %v; want %q", p, target, err, e.Target)
			}
		case "file":
			if !fi.Mode().IsRegular() {
				t.Errorf("%s: %v, want a regular file", p, fi.Mode())
			}
		default:
			t.Errorf("%s: unexpected type %q in the listing", p, e.Type)
		}
	}
	check("/", tree[0])

	testutil.CheckMD5s(t, mnt, md5s, 10)
}

// TestNydusV6Fixture mounts the nydus-image-built v6 image and compares it
// with the source files it was built from.
func TestNydusV6Fixture(t *testing.T) {
	dir := filepath.Join(fixtures, "v6-zstd-blake3")
	img, err := bootstrap.Open(filepath.Join(dir, "bootstrap"))
	if err != nil {
		t.Fatal(err)
	}
	cr := fstest.DirReader(filepath.Join(dir, "blobs"))
	mnt := fstest.Mount(t, rfs.New(img, cr, rfs.DefaultOptions()), nil)
	fstest.CheckMounted(t, img, cr, mnt, 12)
	testutil.CheckSourceFiles(t, dir, mnt)
}

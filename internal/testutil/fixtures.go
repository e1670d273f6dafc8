package testutil

import (
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// NydusFixtures returns the directory of the nydus-image-built fixtures:
// $RAFSD_FIXTURES if set, else shared/fixtures/nydus beside the module's
// checkout (where CI and developers have it), found from the working
// directory (a test's package directory) up to go.mod.
func NydusFixtures() string {
	if d := os.Getenv("RAFSD_FIXTURES"); d != "" {
		return d
	}
	dir, err := os.Getwd()
	if err != nil {
		return "shared/fixtures/nydus"
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(filepath.Dir(dir), "shared", "fixtures", "nydus")
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "shared/fixtures/nydus"
		}
		dir = parent
	}
}

// ExpectedTree reads a fixture's expected-tree.json (see the fixtures'
// README): a JSON listing of the tree, then "<md5>  <path>" lines. It
// returns the listing and the md5 lines as path -> hex md5.
func ExpectedTree(t testing.TB, dir string) (listing []byte, md5s map[string]string) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, "expected-tree.json"))
	if err != nil {
		t.Fatal(err)
	}
	end := bytes.Index(raw, []byte("\n]\n"))
	if end < 0 {
		t.Fatal("expected-tree.json: no end of the JSON listing")
	}
	md5s = map[string]string{}
	for _, line := range strings.Split(string(raw[end+3:]), "\n") {
		if sum, path, ok := strings.Cut(line, "  "); ok {
			md5s[path] = sum
		}
	}
	return raw[:end+2], md5s
}

// CheckMD5s reads every file of a fixture's md5 list under root (a
// mount of the fixture) and reports each that differs or does not read.
// It fails t if fewer than atLeast files were listed.
func CheckMD5s(t testing.TB, root string, md5s map[string]string, atLeast int) {
	t.Helper()
	if len(md5s) < atLeast {
		t.Fatalf("only %d md5 lines, want >= %d", len(md5s), atLeast)
	}
	for path, sum := range md5s {
		data, err := os.ReadFile(root + path)
		if err != nil {
			t.Errorf("%s: %v", path, err)
			continue
		}
		if got := md5.Sum(data); hex.EncodeToString(got[:]) != sum {
			t.Errorf("%s: md5 %x, want %s", path, got, sum)
		}
	}
}

// CheckSourceFiles checks a mount of the v6 fixture against the flat
// source/ directory it was built from: every regular file under root
// whose name is a source file's has its bytes, and each source file is
// found.
func CheckSourceFiles(t testing.TB, dir, root string) {
	t.Helper()
	src := filepath.Join(dir, "source")
	ents, err := os.ReadDir(src)
	if err != nil || len(ents) == 0 {
		t.Fatalf("%s: %d entries, %v", src, len(ents), err)
	}
	found := 0
	err = filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		for _, e := range ents {
			if e.Name() != fi.Name() {
				continue
			}
			want, _ := os.ReadFile(filepath.Join(src, e.Name()))
			got, err := os.ReadFile(p)
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s differs from source/%s (%d vs %d bytes, %v)", p, e.Name(), len(got), len(want), err)
			}
			found++
		}
		return nil
	})
	if err != nil || found != len(ents) {
		t.Fatalf("found %d of the %d source files (%v)", found, len(ents), err)
	}
}

package treehash

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func mkTree(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(d, "a/b"), 0o755))
	must(os.WriteFile(filepath.Join(d, "a/b/f"), []byte("hello"), 0o644))
	must(os.WriteFile(filepath.Join(d, "a.b"), nil, 0o600))
	must(os.Symlink("a/b/f", filepath.Join(d, "link")))
	must(os.WriteFile(filepath.Join(d, "x"), []byte(strings.Repeat("z", 100000)), 0o755))
	return d
}

func TestHashStableAndSensitive(t *testing.T) {
	base, err := Hash(mkTree(t))
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := Hash(mkTree(t)); again != base {
		t.Fatalf("same tree, different hash: %s vs %s", base, again)
	}
	tests := []struct {
		name   string
		change func(d string) error
	}{
		{"content", func(d string) error { return os.WriteFile(filepath.Join(d, "a/b/f"), []byte("hellO"), 0o644) }},
		{"mode", func(d string) error { return os.Chmod(filepath.Join(d, "x"), os.ModeSetuid|0o755) }},
		{"link target", func(d string) error {
			os.Remove(filepath.Join(d, "link"))
			return os.Symlink("a/b", filepath.Join(d, "link"))
		}},
		{"new empty dir", func(d string) error { return os.Mkdir(filepath.Join(d, "e"), 0o755) }},
		{"removed file", func(d string) error { return os.Remove(filepath.Join(d, "a.b")) }},
		{"renamed", func(d string) error { return os.Rename(filepath.Join(d, "x"), filepath.Join(d, "y")) }},
		{"truncated", func(d string) error { return os.Truncate(filepath.Join(d, "x"), 99999) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := mkTree(t)
			if err := tt.change(d); err != nil {
				t.Fatal(err)
			}
			h, err := Hash(d)
			if err != nil {
				t.Fatal(err)
			}
			if h == base {
				t.Errorf("hash did not change")
			}
		})
	}
}

func TestWalkOrderAndDiff(t *testing.T) {
	d := mkTree(t)
	a, err := Walk(d)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, e := range a {
		paths = append(paths, e.Path)
	}
	if got, want := strings.Join(paths, " "), ". a a.b a/b a/b/f link x"; got != want {
		t.Errorf("order %q, want %q", got, want)
	}
	os.WriteFile(filepath.Join(d, "a/b/f"), []byte("bye"), 0o644)
	os.Mkdir(filepath.Join(d, "new"), 0o700)
	b, err := Walk(d)
	if err != nil {
		t.Fatal(err)
	}
	diff := Diff(a, b, 0)
	if len(diff) != 3 || !strings.HasPrefix(diff[0], `- "a/b/f"`) || !strings.HasPrefix(diff[1], `+ "a/b/f"`) || !strings.HasPrefix(diff[2], `+ "new" d 0700`) {
		t.Errorf("diff = %q", diff)
	}
	if len(Diff(a, a, 0)) != 0 {
		t.Error("diff of equal trees not empty")
	}
	if got := Diff(nil, b, 2); len(got) != 3 || got[2] != "..." {
		t.Errorf("limited diff = %q", got)
	}
}

func TestWalkMissingRoot(t *testing.T) {
	if _, err := Walk(filepath.Join(t.TempDir(), "nope")); err == nil {
		t.Fatal("no error for a missing root")
	}
}

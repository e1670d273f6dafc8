package passthrough

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

func stateTree(t testing.TB) (dir, outside string) {
	t.Helper()
	base := t.TempDir()
	dir, outside = filepath.Join(base, "shared"), filepath.Join(base, "secret")
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub/f"), []byte("f"), 0o644)
	os.WriteFile(outside, []byte("secret"), 0o600)
	os.Symlink(outside, filepath.Join(dir, "abs"))
	os.Symlink("../secret", filepath.Join(dir, "rel"))
	return dir, outside
}

func statDevIno(t testing.TB, p string) (uint64, uint64) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Dev, st.Ino
}

// TestRestoreStateRejectsEscapes: the state comes from another process;
// nothing it names may open a file outside the shared directory, and a
// file replaced since is dropped, not served under the old id.
func TestRestoreStateRejectsEscapes(t *testing.T) {
	dir, outside := stateTree(t)
	src, err := New(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var out fuse.EntryOut
	if st := src.lookup(src.nodes[1], "sub", &out); !st.Ok() {
		t.Fatal(st)
	}
	saved, err := src.SaveState()
	if err != nil || len(saved.Nodes) != 1 || saved.Nodes[0].Path != "sub" {
		t.Fatalf("SaveState: %+v %v", saved, err)
	}
	od, oi := statDevIno(t, outside)
	for _, tc := range []struct {
		name  string
		nodes []StateNode
	}{
		{"dotdot", []StateNode{{ID: 5, Path: "../secret", Dev: od, Ino: oi, Refs: 1}}},
		{"absolute", []StateNode{{ID: 5, Path: outside, Dev: od, Ino: oi, Refs: 1}}},
		{"through absolute symlink", []StateNode{{ID: 5, Path: "abs/.", Dev: od, Ino: oi, Refs: 1}}},
		{"through relative symlink", []StateNode{{ID: 5, Path: "rel", Dev: od, Ino: oi, Refs: 1}}},
		{"replaced file", []StateNode{{ID: 5, Path: "sub/f", Dev: od, Ino: oi, Refs: 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst, err := New(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer dst.Close()
			if err := dst.RestoreState(&State{Nodes: tc.nodes}); err != nil {
				t.Fatal(err)
			}
			if n := dst.nodes[5]; n != nil && n.key == (devIno{od, oi}) {
				t.Fatalf("restored a node outside the shared dir: %+v", n)
			}
		})
	}
	for _, bad := range []*State{
		{Nodes: []StateNode{{ID: 1, Path: "sub", Refs: 1}}},                                  // the root id
		{Nodes: []StateNode{{ID: 7, Path: "sub", Refs: 1}, {ID: 7, Path: "sub/f", Refs: 1}}}, // duplicate
		{Handles: []StateHandle{{Fh: 0, Path: "sub/f"}}},
	} {
		dst, _ := New(dir, Options{})
		if err := dst.RestoreState(bad); err == nil {
			t.Errorf("accepted %+v", bad)
		}
		dst.Close()
	}
	// The honest state restores the node under its old id.
	dst, _ := New(dir, Options{})
	defer dst.Close()
	if err := dst.RestoreState(saved); err != nil || dst.nodes[saved.Nodes[0].ID] == nil {
		t.Fatalf("restore of a saved state: %v", err)
	}
}

// FuzzRestoreState feeds arbitrary state JSON (as a takeover receives it)
// to RestoreState: no panic, and no node or handle outside the directory.
func FuzzRestoreState(f *testing.F) {
	f.Add([]byte(`{"next_id":9,"next_fh":3,"nodes":[{"id":2,"path":"sub","dev":1,"ino":2,"refs":1}],"handles":[{"fh":1,"path":"sub/f","dev":1,"ino":3,"flags":2}]}`))
	f.Add([]byte(`{"nodes":[{"id":2,"path":"../secret","refs":1},{"id":3,"path":"abs/x","refs":1}]}`))
	f.Add([]byte(`{"handles":[{"fh":18446744073709551615,"path":"rel","flags":-1}]}`))
	dir, outside := stateTree(f)
	od, oi := statDevIno(f, outside)
	f.Fuzz(func(t *testing.T, data []byte) {
		var st State
		if json.Unmarshal(data, &st) != nil {
			return
		}
		if len(st.Nodes)+len(st.Handles) > 64 {
			return
		}
		fs, err := New(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer fs.Close()
		_ = fs.RestoreState(&st)
		for _, n := range fs.nodes {
			if n.key == (devIno{od, oi}) {
				t.Fatalf("node outside the shared dir: %+v", n)
			}
		}
		for _, h := range fs.handles {
			var s unix.Stat_t
			if unix.Fstat(h.fd, &s) == nil && s.Dev == od && s.Ino == oi {
				t.Fatal("handle outside the shared dir")
			}
		}
	})
}

package daemon

import (
	"encoding/json"
	"strings"
	"testing"
)

func validState() savedState {
	init := make([]byte, 104)
	init[4] = 26 // FUSE_INIT
	return savedState{
		Version: stateVersion, ID: "d1", Mountpoint: "/mnt", Init: init,
		Mounts: []savedMount{
			{Index: 1, Path: "/rafs/a/lowerdir", MountCmd: MountCmd{Source: "/boot", FsType: FsTypeRafs, Config: "{}"}},
			{Index: 2, Path: "/containers", MountCmd: MountCmd{Source: "/dir", FsType: FsTypePassthrough}},
		},
	}
}

func TestParseState(t *testing.T) {
	good, _ := json.Marshal(validState())
	if st, err := parseState(good); err != nil || len(st.Mounts) != 2 || st.Mounts[1].Index != 2 {
		t.Fatalf("valid state: %+v %v", st, err)
	}
	for _, tc := range []struct {
		name string
		edit func(*savedState)
		want string
	}{
		{"version", func(s *savedState) { s.Version = 9 }, "version"},
		{"no init", func(s *savedState) { s.Init = nil }, "FUSE_INIT"},
		{"index 0", func(s *savedState) { s.Mounts[0].Index = 0 }, "index"},
		{"index too big", func(s *savedState) { s.Mounts[0].Index = 300 }, "index"},
		{"duplicate index", func(s *savedState) { s.Mounts[1].Index = 1 }, "duplicate"},
		{"relative path", func(s *savedState) { s.Mounts[0].Path = "rafs" }, "absolute"},
		{"fs type", func(s *savedState) { s.Mounts[0].FsType = "ext4" }, "fs_type"},
	} {
		st := validState()
		tc.edit(&st)
		b, _ := json.Marshal(st)
		if _, err := parseState(b); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.want)
		}
	}
	if _, err := parseState([]byte("{garbage")); err == nil {
		t.Error("garbage accepted")
	}
}

// FuzzParseState: the supervisor's bytes never panic the parser, and what
// it accepts is self-consistent.
func FuzzParseState(f *testing.F) {
	good, _ := json.Marshal(validState())
	f.Add(good)
	f.Add([]byte(`{"version":1,"fuse_init":"AAAA","mounts":[{"index":1,"path":"/"}]}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := parseState(data)
		if err != nil {
			return
		}
		seen := map[uint32]bool{}
		for _, m := range st.Mounts {
			if m.Index == 0 || m.Index > 255 || seen[m.Index] || m.Path == "" || m.Path[0] != '/' {
				t.Fatalf("accepted bad mount %+v", m)
			}
			seen[m.Index] = true
		}
	})
}

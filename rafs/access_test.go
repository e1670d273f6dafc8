package rafs

import (
	"syscall"
	"testing"
)

func TestAllows(t *testing.T) {
	const (
		reg = syscall.S_IFREG
		dir = syscall.S_IFDIR
		r   = 4
		w   = 2
		x   = 1
	)
	for _, tc := range []struct {
		name               string
		mode, owner, group uint32
		uid, gid, mask     uint32
		want               bool
	}{
		{"no mask", reg | 0o000, 1, 1, 2, 2, 0, true},
		{"owner read", reg | 0o400, 1, 1, 1, 9, r, true},
		{"owner bits only for owner", reg | 0o044, 1, 1, 1, 1, r, false},
		{"group read", reg | 0o040, 1, 5, 2, 5, r, true},
		{"other read", reg | 0o004, 1, 5, 2, 6, r, true},
		{"other no write", reg | 0o664, 1, 5, 2, 6, w, false},
		{"read and exec need both", reg | 0o005, 1, 5, 2, 6, r | x, true},
		{"read and exec, exec missing", reg | 0o004, 1, 5, 2, 6, r | x, false},
		{"root reads anything", reg | 0o000, 1, 1, 0, 0, r | w, true},
		{"root execs with any x bit", reg | 0o001, 1, 1, 0, 0, x, true},
		{"root no exec without x", reg | 0o666, 1, 1, 0, 0, x, false},
		{"root searches any dir", dir | 0o000, 1, 1, 0, 0, x, true},
		{"high mask bits ignored", reg | 0o004, 1, 1, 2, 2, r | 0o70, true},
	} {
		if got := Allows(tc.mode, tc.owner, tc.group, tc.uid, tc.gid, tc.mask); got != tc.want {
			t.Errorf("%s: Allows(%o, %d, %d, %d, %d, %d) = %v, want %v", tc.name, tc.mode, tc.owner, tc.group, tc.uid, tc.gid, tc.mask, got, tc.want)
		}
	}
}

package rafs

import "syscall"

// Allows reports whether a caller with uid and gid may access a file of
// the given mode (type and permission bits), owner and group for mask
// (R_OK 4 | W_OK 2 | X_OK 1), as the kernel's generic_permission decides
// from the mode bits alone (no supplementary groups, no ACLs): root may
// do anything except execute a non-directory that has no x bit at all.
// Both filesystems rafsd serves (RAFS and passthrough) answer FUSE ACCESS
// with it.
func Allows(mode, owner, group, uid, gid, mask uint32) bool {
	mask &= 7
	if mask == 0 {
		return true
	}
	if uid == 0 {
		return mask&1 == 0 || mode&syscall.S_IFMT == syscall.S_IFDIR || mode&0o111 != 0
	}
	perm := mode & 7
	switch {
	case uid == owner:
		perm = (mode >> 6) & 7
	case gid == group:
		perm = (mode >> 3) & 7
	}
	return perm&mask == mask
}

package guard

import (
	"bytes"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Watches is the number of live watches of inotify fd ino: zero once
// every mount watched through it is gone (see the package doc). It reads
// fdinfo, which lists one "inotify wd:" line per watch, rather than
// the instance's events, which a process sharing the instance may have
// consumed.
func Watches(ino int) (int, error) {
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(ino))
	if err != nil {
		return 0, fmt.Errorf("guard: inotify fdinfo: %w", err)
	}
	return bytes.Count(b, []byte("inotify wd:")), nil
}

// WatchRoot adds a watch on the root of the EROFS mount at mp to inotify
// fd ino. Nothing else is watched: a mountpoint that is not (or no longer)
// an EROFS root would keep a guard alive for nothing. IN_DELETE_SELF never
// fires on a read-only EROFS; IN_UNMOUNT and IN_IGNORED come regardless
// of the mask.
func WatchRoot(ino int, mp string) error {
	var sf unix.Statfs_t
	if err := unix.Statfs(mp, &sf); err != nil {
		return fmt.Errorf("guard: statfs %s: %w", mp, err)
	}
	if uint32(sf.Type) != unix.EROFS_SUPER_MAGIC_V1 {
		return fmt.Errorf("guard: %s is not an EROFS mount (f_type %#x)", mp, sf.Type)
	}
	if _, err := unix.InotifyAddWatch(ino, mp, unix.IN_DELETE_SELF|unix.IN_ONLYDIR); err != nil {
		return fmt.Errorf("guard: inotify watch %s: %w", mp, err)
	}
	return nil
}

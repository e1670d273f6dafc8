package guard

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
)

const (
	// DaemonEnv holds, in a guard's environment, the pid of the daemon it
	// guards: MaybeRun looks for it, and it finds a daemon's guards in ps
	// or /proc/PID/environ.
	DaemonEnv = "RAFSD_FANOTIFY_GUARD"
	holdsEnv  = "RAFSD_FANOTIFY_GUARD_GROUPS" // number of (group, inotify) pairs
	msgFD     = 3                             // updates from the daemon; EOF: it is gone
	firstFD   = 4                             // group, inotify, group, inotify, ...
	// sockPrefix names a guard's socket in a cache directory.
	sockPrefix = "rafsd-fanotify-guard."
	// MaxHolds bounds the groups a guard holds, so that they go in one
	// hand-over message (SCM_MAX_FD is 253 fds).
	MaxHolds = 64
	// poll is how often a guard whose daemon is gone looks at its
	// inotify instances: the daemon's successor may read their events
	// too (a shared file description), so the guard does not rely on
	// waking for them.
	poll = 500 * time.Millisecond
	// MaxFD is the highest fd number an event of a daemon that did not
	// say (Update.MaxFD 0) may carry, and the highest a daemon may name:
	// answering orphans by number costs one write(2) per number (about
	// 1.5 us), so a daemon keeps its fd numbers below this (its
	// RLIMIT_NOFILE) for its orphans to be answered in about 0.1 s.
	MaxFD = 1<<16 - 1
)

// Operations a client sends on a guard's socket (see the package doc).
const (
	opQuery = '?'
	opTake  = 'T'
	opAck   = 'A'
)

// Holding is a fanotify group and the inotify instance watching the roots
// of the mounts that read through it: the group is guarded until the
// instance has no watch left.
type Holding struct {
	Group   *fanotify.Group
	Inotify int
}

// Update is what a daemon tells its guard whenever it changes.
type Update struct {
	// Mounts are the mountpoints to detach if the daemon dies.
	Mounts []string `json:"mounts"`
	// Dirs are the cache directories to listen in for a successor.
	Dirs []string `json:"dirs"`
	// Supervised: the daemon has a supervisor holding its own group, and
	// the guard holds only groups it took over from a crashed daemon's
	// guard. If it dies, its mounts stay (the supervisor's copy makes
	// their readers wait for an upgraded daemon), so the guard detaches
	// nothing, answers only the events it had read (EIO), and leaves every
	// later event waiting for the successor that takes the groups over,
	// as the supervisor does: denying them would fail the reads of the
	// daemon's own mounts, whose cache files these groups mark too.
	Supervised bool `json:"supervised,omitempty"`
	// MaxFD is the highest fd number the daemon can hold (its
	// RLIMIT_NOFILE less one): the numbers tried when answering the events
	// it read and never answered. 0: MaxFD; larger values are cut to it.
	MaxFD int `json:"max_fd,omitempty"`
}

// maxFD is the highest fd number to try when answering u's daemon's
// orphans.
func (u Update) maxFD() int { return OrphanBound(u.MaxFD) }

// OrphanBound is the highest fd number to try when answering the orphans
// of a daemon that named n as its highest fd: n, or MaxFD if it named
// none (n <= 0) or more. The guard and an upgraded daemon answer a dead
// daemon's orphans up to the same bound.
func OrphanBound(n int) int {
	if n <= 0 || n > MaxFD {
		return MaxFD
	}
	return n
}

// Reply is a guard's answer on its socket.
type Reply struct {
	Daemon int  `json:"daemon"` // pid of the daemon it guards
	Guard  int  `json:"guard"`  // its own pid; 0: no guard answered
	Alive  bool `json:"alive"`  // its daemon lives (nothing is handed over)
	Groups int  `json:"groups"` // groups it holds
}

// decodeReply decodes the reply b of a guard that came with nfds fds:
// none, or a group and an inotify instance per group held.
func decodeReply(b []byte, nfds int) (Reply, error) {
	var rep Reply
	if err := json.Unmarshal(b, &rep); err != nil {
		return rep, fmt.Errorf("reply: %w", err)
	}
	if nfds != 0 && nfds != 2*rep.Groups {
		return rep, fmt.Errorf("sent %d fds for %d groups", nfds, rep.Groups)
	}
	return rep, nil
}

// parseRights returns the fds passed in control message oob. The kernel
// writes oob, but a malformed message must not panic the daemon
// (unix.ParseUnixRights indexes past a data length that is not a multiple
// of 4). On error the fds parsed so far are returned too, for the caller
// to close.
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		if len(m.Data)%4 != 0 {
			return fds, fmt.Errorf("control message: SCM_RIGHTS of %d bytes", len(m.Data))
		}
		rights, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, fmt.Errorf("control message: %w", err)
		}
		fds = append(fds, rights...)
	}
	return fds, nil
}

// splitUpdates takes the complete lines out of buf: the updates among
// them that decode, in order (a line that does not is skipped), and what
// is left of buf, an incomplete line.
func splitUpdates(buf []byte) (us []Update, rest []byte) {
	for {
		k := bytes.IndexByte(buf, '\n')
		if k < 0 {
			return us, buf
		}
		var u Update
		if json.Unmarshal(buf[:k], &u) == nil {
			us = append(us, u)
		}
		buf = buf[k+1:]
	}
}

// sockPath is the socket path of guard pid in cache directory dir.
func sockPath(dir string, pid int) string {
	return filepath.Join(dir, sockPrefix+strconv.Itoa(pid)+".sock")
}

// isSock says whether name is a guard socket's.
func isSock(name string) bool {
	return strings.HasPrefix(name, sockPrefix) && strings.HasSuffix(name, ".sock")
}

// sockAddr returns an address for the unix socket at path: the path
// itself, or, if too long for sockaddr_un, the same name through
// /proc/self/fd of its directory (close is then to be called once bound
// or connected).
func sockAddr(path string) (addr string, close func(), err error) {
	if len(path) < len(unix.RawSockaddrUnix{}.Path)-1 {
		return path, func() {}, nil
	}
	dfd, err := unix.Open(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("guard: socket dir: %w", err)
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", dfd, filepath.Base(path)), func() { unix.Close(dfd) }, nil
}

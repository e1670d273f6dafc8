package passthrough

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// MaxStateNodes bounds the nodes and handles a restored state may name.
const MaxStateNodes = 1 << 20

// State is what a daemon hands to the one taking its FUSE connection over:
// the node ids and file handles the kernel holds, each with the path (below
// the shared directory) and host identity needed to open it again. Without
// it the new daemon would answer the kernel's cached node ids with ENOENT.
type State struct {
	NextID  uint64        `json:"next_id"`
	NextFh  uint64        `json:"next_fh"`
	Nodes   []StateNode   `json:"nodes"`
	Handles []StateHandle `json:"handles"`
}

// StateNode is one inode the kernel looked up.
type StateNode struct {
	ID   uint64 `json:"id"`
	Path string `json:"path"`
	Dev  uint64 `json:"dev"`
	Ino  uint64 `json:"ino"`
	Refs uint64 `json:"refs"`
}

// StateHandle is one open file or directory.
type StateHandle struct {
	Fh    uint64 `json:"fh"`
	Path  string `json:"path"`
	Dev   uint64 `json:"dev"`
	Ino   uint64 `json:"ino"`
	Flags int    `json:"flags"`
}

// fdPath returns the path of our own descriptor fd relative to root, or
// false for a file no longer reachable (deleted, or moved out).
func fdPath(fd int, root string) (string, bool) {
	p, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil || strings.HasSuffix(p, " (deleted)") {
		return "", false
	}
	rel, err := filepath.Rel(root, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", false
	}
	return rel, true
}

// SaveState snapshots the node and handle tables. Files deleted or moved
// out of the shared directory are left out: the next daemon answers them
// with ESTALE, as virtiofsd does for handles it cannot reopen.
func (f *FS) SaveState() (*State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, errors.New("passthrough: closed")
	}
	rootNode := f.nodes[1]
	if rootNode == nil {
		return nil, errors.New("passthrough: no root node")
	}
	root, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(rootNode.fd))
	if err != nil {
		return nil, fmt.Errorf("passthrough: root path: %w", err)
	}
	st := &State{NextID: f.nextID, NextFh: f.nextFh}
	for id, n := range f.nodes {
		if id == 1 {
			continue
		}
		if p, ok := fdPath(n.fd, root); ok {
			st.Nodes = append(st.Nodes, StateNode{ID: id, Path: p, Dev: n.key.dev, Ino: n.key.ino, Refs: n.refs})
		}
	}
	for fh, h := range f.handles {
		p, ok := fdPath(h.fd, root)
		if !ok {
			continue
		}
		fl, err := unix.FcntlInt(uintptr(h.fd), unix.F_GETFL, 0)
		if err != nil {
			continue
		}
		var s unix.Stat_t
		if fstat(h.fd, &s) != nil {
			continue
		}
		st.Handles = append(st.Handles, StateHandle{Fh: fh, Path: p, Dev: s.Dev, Ino: s.Ino, Flags: fl})
	}
	return st, nil
}

// RestoreState reopens what st names, below this FS's directory, before
// serving starts. st comes from another process: every path is resolved
// beneath the root without following symlinks, and an entry whose host
// identity changed since (a file replaced) is dropped rather than served.
func (f *FS) RestoreState(st *State) error {
	if len(st.Nodes) > MaxStateNodes || len(st.Handles) > MaxStateNodes {
		return fmt.Errorf("passthrough: state names %d nodes and %d handles", len(st.Nodes), len(st.Handles))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	rootNode := f.nodes[1]
	if f.closed || rootNode == nil {
		return errors.New("passthrough: closed")
	}
	open := func(p string, flags int, dev, ino uint64) (int, *unix.Stat_t, bool) {
		if p == "" || p == "." || filepath.IsAbs(p) {
			return -1, nil, false
		}
		fd, err := openBeneath(rootNode.fd, p, flags, 0)
		if err != nil {
			return -1, nil, false
		}
		var s unix.Stat_t
		if fstat(fd, &s) != nil || s.Dev != dev || s.Ino != ino {
			unix.Close(fd)
			return -1, nil, false
		}
		return fd, &s, true
	}
	// Check everything before opening anything: a bad state is refused
	// whole, not half restored.
	ids, fhs := map[uint64]bool{}, map[uint64]bool{}
	for _, sn := range st.Nodes {
		if sn.ID <= 1 || ids[sn.ID] || f.nodes[sn.ID] != nil || sn.Refs == 0 {
			return fmt.Errorf("passthrough: state node id %d duplicate or invalid", sn.ID)
		}
		ids[sn.ID] = true
	}
	for _, sh := range st.Handles {
		if sh.Fh == 0 || fhs[sh.Fh] || f.handles[sh.Fh] != nil {
			return fmt.Errorf("passthrough: state handle %d duplicate or invalid", sh.Fh)
		}
		fhs[sh.Fh] = true
	}
	dropped := 0
	for _, sn := range st.Nodes {
		key := devIno{sn.Dev, sn.Ino}
		if f.byKey[key] != nil {
			dropped++
			continue
		}
		fd, s, ok := open(sn.Path, unix.O_PATH, sn.Dev, sn.Ino)
		if !ok {
			dropped++
			continue
		}
		n := &node{id: sn.ID, fd: fd, key: key, mode: s.Mode & syscall.S_IFMT, refs: sn.Refs}
		f.nodes[n.id], f.byKey[key] = n, n
		f.nextID = max(f.nextID, n.id+1)
	}
	for _, sh := range st.Handles {
		// Only flags that reopen what exists: never create, truncate
		// or O_TMPFILE, whatever the state says.
		flags := sh.Flags & (unix.O_ACCMODE | unix.O_APPEND | unix.O_DIRECT | unix.O_DIRECTORY |
			unix.O_NOATIME | unix.O_SYNC | unix.O_DSYNC | unix.O_NONBLOCK | unix.O_LARGEFILE)
		if flags&unix.O_ACCMODE == unix.O_ACCMODE {
			dropped++
			continue
		}
		fd, _, ok := open(sh.Path, flags, sh.Dev, sh.Ino)
		if !ok {
			dropped++
			continue
		}
		f.handles[sh.Fh] = &handle{fd: fd}
		f.nextFh = max(f.nextFh, sh.Fh+1)
	}
	f.nextID = max(f.nextID, st.NextID)
	f.nextFh = max(f.nextFh, st.NextFh)
	if dropped > 0 {
		f.log.Warn("passthrough: entries not restored (gone or replaced)", "count", dropped)
	}
	return nil
}

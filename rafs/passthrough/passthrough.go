// Package passthrough serves a host directory read-write as a go-fuse
// RawFileSystem, the way virtiofsd does for a shared directory.
//
// Every inode the kernel knows is held as an O_PATH file descriptor, and
// every name the client sends is a single path component resolved relative
// to such a descriptor with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|
// RESOLVE_NO_MAGICLINKS) or a *at call with AT_SYMLINK_NOFOLLOW. So no "..",
// absolute symlink, symlink to / or rename race can make the server touch a
// file outside the shared directory: the server never follows a symlink and
// never walks a path string. (A symlink the client creates is followed by
// the client's kernel, inside the client's view of the mount.)
//
// The server must run as root (it sets owners and reads every file);
// files are created with the caller's uid and gid (or the directory's
// group under a set-group-ID directory). The server does not impersonate
// callers, so permission checks are the client kernel's: mount FUSE with
// the default_permissions option (a virtio-fs guest checks on its side).
package passthrough

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
)

// Options tune the cache timeouts handed to the kernel. The directory may
// change behind the server's back, so they should stay short.
type Options struct {
	EntryTimeout time.Duration
	AttrTimeout  time.Duration
	Logger       *slog.Logger
	// KernelPassthrough hands regular files' I/O to the kernel (FUSE
	// passthrough, FOPEN_PASSTHROUGH with a registered backing file), so
	// reads and writes run at native speed without reaching the server.
	// It needs a /dev/fuse server (see SetServer), root, and a kernel with
	// FUSE passthrough; without them files are served the normal way.
	KernelPassthrough bool
}

type devIno struct{ dev, ino uint64 }

type node struct {
	id   uint64
	fd   int // O_PATH|O_NOFOLLOW
	key  devIno
	mode uint32 // file type bits
	refs uint64 // kernel lookup count
	busy int    // requests using fd right now
	gone bool   // forgotten: close fd when busy drops to 0

	// One backing file per inode (a kernel rule), shared by its opens.
	backingID   int32
	backingFd   int
	backingRefs int
}

type handle struct {
	mu      sync.Mutex // serializes directory reads (seek + getdents)
	fd      int
	busy    int
	gone    bool
	backing *node // holds a reference on the node's backing file
}

// FS is a passthrough fuse.RawFileSystem over one host directory.
type FS struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	nodes   map[uint64]*node
	byKey   map[devIno]*node
	nextID  uint64
	handles map[uint64]*handle
	nextFh  uint64
	closed  bool

	server         *fuse.Server // for backing files; nil: no passthrough
	passthroughOff bool         // registration failed once: stop trying
}

var _ fuse.RawFileSystem = (*FS)(nil)

var resolveFlags = uint64(unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS)

// New serves dir. It fails unless dir is a directory.
func New(dir string, opts Options) (*FS, error) {
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("passthrough: open %s: %w", dir, err)
	}
	var st unix.Stat_t
	if err := fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("passthrough: stat %s: %w", dir, err)
	}
	root := &node{id: fuse.FUSE_ROOT_ID, fd: fd, key: devIno{st.Dev, st.Ino}, mode: st.Mode & syscall.S_IFMT, refs: 1}
	return &FS{opts: opts, log: l,
		nodes: map[uint64]*node{root.id: root}, byKey: map[devIno]*node{root.key: root},
		nextID: root.id + 1, handles: map[uint64]*handle{}, nextFh: 1}, nil
}

// Close closes every descriptor; later requests fail with EIO.
func (f *FS) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	for _, h := range f.handles {
		if n := h.backing; n != nil {
			h.backing = nil
			f.detachBacking(n)
			n.busy--
			if n.busy == 0 && n.gone {
				unix.Close(n.fd) // forgotten earlier, kept for the backing
			}
		}
	}
	for _, n := range f.nodes {
		n.gone = true
		if n.busy == 0 {
			unix.Close(n.fd)
		}
	}
	for _, h := range f.handles {
		h.gone = true
		if h.busy == 0 {
			unix.Close(h.fd)
		}
	}
	f.nodes, f.byKey, f.handles = map[uint64]*node{}, map[devIno]*node{}, map[uint64]*handle{}
	return nil
}

func fstat(fd int, st *unix.Stat_t) error {
	return unix.Fstatat(fd, "", st, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW)
}

func errno(err error) fuse.Status {
	if err == nil {
		return fuse.OK
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		return fuse.Status(en)
	}
	return fuse.EIO
}

// get pins node id so its fd stays open until put.
func (f *FS) get(id uint64) (*node, fuse.Status) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := f.nodes[id]
	if n == nil {
		if f.closed {
			return nil, fuse.EIO
		}
		return nil, fuse.ENOENT
	}
	n.busy++
	return n, fuse.OK
}

func (f *FS) put(n *node) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n.busy--
	if n.busy == 0 && n.gone {
		unix.Close(n.fd)
	}
}

func (f *FS) getHandle(fh uint64) (*handle, fuse.Status) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := f.handles[fh]
	if h == nil {
		return nil, fuse.EBADF
	}
	h.busy++
	return h, fuse.OK
}

func (f *FS) putHandle(h *handle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h.busy--
	if h.busy == 0 && h.gone {
		unix.Close(h.fd)
	}
}

func (f *FS) addHandle(fd int) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	fh := f.nextFh
	f.nextFh++
	f.handles[fh] = &handle{fd: fd}
	return fh
}

func (f *FS) dropHandle(fh uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := f.handles[fh]
	if h == nil {
		return
	}
	delete(f.handles, fh)
	h.gone = true
	if h.busy == 0 {
		unix.Close(h.fd)
	}
	if n := h.backing; n != nil {
		h.backing = nil
		f.detachBacking(n)
		n.busy--
		if n.busy == 0 && n.gone {
			unix.Close(n.fd)
		}
	}
}

// validName accepts only a single, real path component.
func validName(name string) fuse.Status {
	switch {
	case name == "" || name == "." || name == "..":
		return fuse.EPERM
	case len(name) > 255:
		return fuse.Status(syscall.ENAMETOOLONG)
	}
	for k := 0; k < len(name); k++ {
		if name[k] == '/' || name[k] == 0 {
			return fuse.EINVAL
		}
	}
	return fuse.OK
}

// openBeneath opens name in directory fd dirfd, never following a symlink
// and never leaving dirfd.
func openBeneath(dirfd int, name string, flags int, mode uint32) (int, error) {
	return unix.Openat2(dirfd, name, &unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC | unix.O_NOFOLLOW),
		Mode:    uint64(mode),
		Resolve: resolveFlags,
	})
}

// reopen opens the inode behind an O_PATH fd for I/O. /proc/self/fd is
// our own magic link to a descriptor we hold, not a client-chosen path.
func reopen(fd int, flags int) (int, error) {
	return unix.Open("/proc/self/fd/"+strconv.Itoa(fd), flags|unix.O_CLOEXEC, 0)
}

func (f *FS) fillAttr(st *unix.Stat_t, out *fuse.Attr) {
	*out = fuse.Attr{
		Ino: st.Ino, Size: uint64(st.Size), Blocks: uint64(st.Blocks),
		Atime: uint64(st.Atim.Sec), Atimensec: uint32(st.Atim.Nsec),
		Mtime: uint64(st.Mtim.Sec), Mtimensec: uint32(st.Mtim.Nsec),
		Ctime: uint64(st.Ctim.Sec), Ctimensec: uint32(st.Ctim.Nsec),
		Mode: st.Mode, Nlink: uint32(st.Nlink), Owner: fuse.Owner{Uid: st.Uid, Gid: st.Gid},
		Rdev: uint32(st.Rdev), Blksize: uint32(st.Blksize),
	}
}

func (f *FS) fillEntry(n *node, st *unix.Stat_t, out *fuse.EntryOut) {
	out.NodeId = n.id
	out.Generation = 0
	out.SetEntryTimeout(f.opts.EntryTimeout)
	out.SetAttrTimeout(f.opts.AttrTimeout)
	f.fillAttr(st, &out.Attr)
}

// lookup resolves name in p and takes one kernel reference on the result.
func (f *FS) lookup(p *node, name string, out *fuse.EntryOut) fuse.Status {
	if st := validName(name); !st.Ok() {
		return st
	}
	fd, err := openBeneath(p.fd, name, unix.O_PATH, 0)
	if err != nil {
		return errno(err)
	}
	var st unix.Stat_t
	if err := fstat(fd, &st); err != nil {
		unix.Close(fd)
		return errno(err)
	}
	key := devIno{st.Dev, st.Ino}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		unix.Close(fd)
		return fuse.EIO
	}
	n := f.byKey[key]
	if n != nil {
		n.refs++
		f.mu.Unlock()
		unix.Close(fd)
	} else {
		n = &node{id: f.nextID, fd: fd, key: key, mode: st.Mode & syscall.S_IFMT, refs: 1}
		f.nextID++
		f.nodes[n.id] = n
		f.byKey[key] = n
		f.mu.Unlock()
	}
	f.fillEntry(n, &st, out)
	return fuse.OK
}

// String implements fuse.RawFileSystem.
func (f *FS) String() string { return "passthrough" }

// SetDebug implements fuse.RawFileSystem.
func (f *FS) SetDebug(bool) {}

// Init implements fuse.RawFileSystem.
func (f *FS) Init(s *fuse.Server) { f.SetServer(s) }

// SetServer gives the filesystem the /dev/fuse server it is served by, for
// kernel passthrough; a VFS holding the filesystem calls it.
func (f *FS) SetServer(s *fuse.Server) {
	if s == nil || !f.opts.KernelPassthrough {
		return
	}
	f.mu.Lock()
	f.server = s
	f.mu.Unlock()
}

// attachBacking registers (once per inode) a backing file for regular file
// n with the kernel and returns its id, or ok=false to serve the file
// through the server.
func (f *FS) attachBacking(n *node) (int32, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.server == nil || f.passthroughOff || n.mode != syscall.S_IFREG {
		return 0, false
	}
	if n.backingRefs > 0 {
		n.backingRefs++
		return n.backingID, true
	}
	// Read-write when possible, so every open of the inode can share it.
	fd, err := reopen(n.fd, unix.O_RDWR)
	if err != nil {
		if fd, err = reopen(n.fd, unix.O_RDONLY); err != nil {
			return 0, false
		}
	}
	id, errno := f.server.RegisterBackingFd(&fuse.BackingMap{Fd: int32(fd)})
	if errno != 0 {
		unix.Close(fd)
		f.passthroughOff = true
		f.log.Warn("passthrough: kernel passthrough unavailable; serving file I/O through the daemon", "err", errno)
		return 0, false
	}
	n.backingID, n.backingFd, n.backingRefs = id, fd, 1
	return id, true
}

// detachBacking drops one open's reference on n's backing file. Called
// with f.mu held.
func (f *FS) detachBacking(n *node) {
	n.backingRefs--
	if n.backingRefs > 0 {
		return
	}
	if f.server != nil {
		f.server.UnregisterBackingFd(n.backingID)
	}
	unix.Close(n.backingFd)
	n.backingID, n.backingFd = 0, -1
}

// passthroughOpen switches an open of n to kernel passthrough when it can.
func (f *FS) passthroughOpen(n *node, fh uint64, out *fuse.OpenOut) {
	id, ok := f.attachBacking(n)
	if !ok {
		return
	}
	f.mu.Lock()
	h := f.handles[fh]
	if h == nil {
		f.detachBacking(n)
		f.mu.Unlock()
		return
	}
	h.backing = n
	n.busy++ // the node's fds stay open while the backing is in use
	f.mu.Unlock()
	out.OpenFlags |= fuse.FOPEN_PASSTHROUGH
	out.BackingID = id
}

// OnUnmount implements fuse.RawFileSystem.
func (f *FS) OnUnmount() {}

// Lookup implements fuse.RawFileSystem.
func (f *FS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	p, st := f.get(h.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	return f.lookup(p, name, out)
}

// Forget implements fuse.RawFileSystem. The root is never forgotten.
func (f *FS) Forget(nodeid, nlookup uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := f.nodes[nodeid]
	if n == nil || nodeid == fuse.FUSE_ROOT_ID {
		return
	}
	if nlookup < n.refs {
		n.refs -= nlookup
		return
	}
	delete(f.nodes, nodeid)
	delete(f.byKey, n.key)
	n.gone = true
	if n.busy == 0 {
		unix.Close(n.fd)
	}
}

// GetAttr implements fuse.RawFileSystem.
func (f *FS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	n, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(n)
	var s unix.Stat_t
	if err := fstat(n.fd, &s); err != nil {
		return errno(err)
	}
	f.fillAttr(&s, &out.Attr)
	out.SetTimeout(f.opts.AttrTimeout)
	return fuse.OK
}

// Statx implements fuse.RawFileSystem; the kernel falls back to GETATTR.
func (f *FS) Statx(cancel <-chan struct{}, in *fuse.StatxIn, out *fuse.StatxOut) fuse.Status {
	return fuse.ENOSYS
}

// SetAttr implements fuse.RawFileSystem.
func (f *FS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	n, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(n)
	if mode, ok := in.GetMode(); ok {
		if n.mode == syscall.S_IFLNK {
			return fuse.Status(syscall.EOPNOTSUPP)
		}
		if err := unix.Fchmodat(n.fd, "", mode, unix.AT_EMPTY_PATH); err != nil {
			return errno(err)
		}
	}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		u, g := -1, -1
		if uok {
			u = int(uid)
		}
		if gok {
			g = int(gid)
		}
		if err := unix.Fchownat(n.fd, "", u, g, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return errno(err)
		}
	}
	if size, ok := in.GetSize(); ok {
		if st := f.truncate(n, in, size); !st.Ok() {
			return st
		}
	}
	if in.Valid&(fuse.FATTR_ATIME|fuse.FATTR_MTIME) != 0 {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if in.Valid&fuse.FATTR_ATIME_NOW != 0 {
			ts[0] = unix.Timespec{Nsec: unix.UTIME_NOW}
		} else if in.Valid&fuse.FATTR_ATIME != 0 {
			ts[0] = unix.Timespec{Sec: int64(in.Atime), Nsec: int64(in.Atimensec)}
		}
		if in.Valid&fuse.FATTR_MTIME_NOW != 0 {
			ts[1] = unix.Timespec{Nsec: unix.UTIME_NOW}
		} else if in.Valid&fuse.FATTR_MTIME != 0 {
			ts[1] = unix.Timespec{Sec: int64(in.Mtime), Nsec: int64(in.Mtimensec)}
		}
		if err := unix.UtimesNanoAt(n.fd, "", ts, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return errno(err)
		}
	}
	var s unix.Stat_t
	if err := fstat(n.fd, &s); err != nil {
		return errno(err)
	}
	f.fillAttr(&s, &out.Attr)
	out.SetTimeout(f.opts.AttrTimeout)
	return fuse.OK
}

func (f *FS) truncate(n *node, in *fuse.SetAttrIn, size uint64) fuse.Status {
	if n.mode != syscall.S_IFREG {
		return fuse.EINVAL
	}
	if size > 1<<62 {
		return fuse.Status(syscall.EFBIG)
	}
	if fh, ok := in.GetFh(); ok {
		if h, st := f.getHandle(fh); st.Ok() {
			defer f.putHandle(h)
			return errno(unix.Ftruncate(h.fd, int64(size)))
		}
	}
	fd, err := reopen(n.fd, unix.O_WRONLY)
	if err != nil {
		return errno(err)
	}
	defer unix.Close(fd)
	return errno(unix.Ftruncate(fd, int64(size)))
}

// created finishes a create-type call: it gives name in p the caller's
// owner (or the directory's group under a set-group-ID directory) and the
// exact permission bits asked for (our umask must not apply twice), then
// looks it up.
func (f *FS) created(p *node, name string, caller fuse.Caller, mode uint32, setMode bool, out *fuse.EntryOut) fuse.Status {
	gid := int(caller.Gid)
	var ps unix.Stat_t
	if err := fstat(p.fd, &ps); err == nil && ps.Mode&syscall.S_ISGID != 0 {
		gid = int(ps.Gid)
	}
	if err := unix.Fchownat(p.fd, name, int(caller.Uid), gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		f.log.Warn("passthrough: set owner of new file", "name", name, "err", err)
	}
	if setMode {
		if err := unix.Fchmodat(p.fd, name, mode&0o7777, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			f.log.Warn("passthrough: set mode of new file", "name", name, "err", err)
		}
	}
	return f.lookup(p, name, out)
}

// Mknod implements fuse.RawFileSystem.
func (f *FS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	p, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	if st := validName(name); !st.Ok() {
		return st
	}
	if err := unix.Mknodat(p.fd, name, in.Mode, int(in.Rdev)); err != nil {
		return errno(err)
	}
	return f.created(p, name, in.Caller, in.Mode, true, out)
}

// Mkdir implements fuse.RawFileSystem.
func (f *FS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	p, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	if st := validName(name); !st.Ok() {
		return st
	}
	if err := unix.Mkdirat(p.fd, name, in.Mode); err != nil {
		return errno(err)
	}
	return f.created(p, name, in.Caller, in.Mode, true, out)
}

// Symlink implements fuse.RawFileSystem.
func (f *FS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	p, st := f.get(h.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	if st := validName(name); !st.Ok() {
		return st
	}
	if err := unix.Symlinkat(target, p.fd, name); err != nil {
		return errno(err)
	}
	return f.created(p, name, h.Caller, 0, false, out)
}

// Link implements fuse.RawFileSystem.
func (f *FS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	p, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	old, st := f.get(in.Oldnodeid)
	if !st.Ok() {
		return st
	}
	defer f.put(old)
	if st := validName(name); !st.Ok() {
		return st
	}
	if err := unix.Linkat(old.fd, "", p.fd, name, unix.AT_EMPTY_PATH); err != nil {
		return errno(err)
	}
	return f.lookup(p, name, out)
}

// Unlink implements fuse.RawFileSystem.
func (f *FS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	p, st := f.get(h.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	if st := validName(name); !st.Ok() {
		return st
	}
	return errno(unix.Unlinkat(p.fd, name, 0))
}

// Rmdir implements fuse.RawFileSystem.
func (f *FS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	p, st := f.get(h.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	if st := validName(name); !st.Ok() {
		return st
	}
	return errno(unix.Unlinkat(p.fd, name, unix.AT_REMOVEDIR))
}

// Rename implements fuse.RawFileSystem.
func (f *FS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	p, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	np, st := f.get(in.Newdir)
	if !st.Ok() {
		return st
	}
	defer f.put(np)
	if st := validName(oldName); !st.Ok() {
		return st
	}
	if st := validName(newName); !st.Ok() {
		return st
	}
	return errno(unix.Renameat2(p.fd, oldName, np.fd, newName, uint(in.Flags)))
}

// Readlink implements fuse.RawFileSystem.
func (f *FS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	n, st := f.get(h.NodeId)
	if !st.Ok() {
		return nil, st
	}
	defer f.put(n)
	if n.mode != syscall.S_IFLNK {
		return nil, fuse.EINVAL
	}
	buf := make([]byte, unix.PathMax)
	k, err := unix.Readlinkat(n.fd, "", buf)
	if err != nil {
		return nil, errno(err)
	}
	return buf[:k], fuse.OK
}

// Access implements fuse.RawFileSystem, checking the caller's credentials
// against the mode bits (the server itself is root).
func (f *FS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	n, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(n)
	var s unix.Stat_t
	if err := fstat(n.fd, &s); err != nil {
		return errno(err)
	}
	if !rafs.Allows(s.Mode, s.Uid, s.Gid, in.Uid, in.Gid, in.Mask) {
		return fuse.EACCES
	}
	return fuse.OK
}

// xattrFd opens n for an f*xattr call. O_PATH descriptors cannot carry
// xattr calls and opening other file types could block (fifos) or touch
// devices, so only regular files and directories have xattrs here.
func (f *FS) xattrFd(n *node) (int, fuse.Status) {
	switch n.mode {
	case syscall.S_IFREG:
		fd, err := reopen(n.fd, unix.O_RDONLY|unix.O_NONBLOCK)
		return fd, errno(err)
	case syscall.S_IFDIR:
		fd, err := openBeneath(n.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY, 0)
		return fd, errno(err)
	}
	return -1, fuse.Status(syscall.EOPNOTSUPP)
}

func (f *FS) withXattrFd(id uint64, do func(fd int) fuse.Status) fuse.Status {
	n, st := f.get(id)
	if !st.Ok() {
		return st
	}
	defer f.put(n)
	fd, st := f.xattrFd(n)
	if !st.Ok() {
		return st
	}
	defer unix.Close(fd)
	return do(fd)
}

// GetXAttr implements fuse.RawFileSystem.
func (f *FS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	var sz int
	st := f.withXattrFd(h.NodeId, func(fd int) fuse.Status {
		var err error
		sz, err = unix.Fgetxattr(fd, attr, dest)
		if errors.Is(err, unix.ERANGE) || len(dest) == 0 && err == nil {
			if sz, err = unix.Fgetxattr(fd, attr, nil); err == nil {
				return fuse.ERANGE
			}
		}
		return errno(err)
	})
	return uint32(max(sz, 0)), st
}

// ListXAttr implements fuse.RawFileSystem.
func (f *FS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	var sz int
	st := f.withXattrFd(h.NodeId, func(fd int) fuse.Status {
		var err error
		sz, err = unix.Flistxattr(fd, dest)
		if errors.Is(err, unix.ERANGE) || len(dest) == 0 && err == nil {
			if sz, err = unix.Flistxattr(fd, nil); err == nil {
				return fuse.ERANGE
			}
		}
		return errno(err)
	})
	if st == fuse.Status(syscall.EOPNOTSUPP) {
		return 0, fuse.OK // no xattrs on symlinks and special files
	}
	return uint32(max(sz, 0)), st
}

// SetXAttr implements fuse.RawFileSystem.
func (f *FS) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	return f.withXattrFd(in.NodeId, func(fd int) fuse.Status {
		return errno(unix.Fsetxattr(fd, attr, data, int(in.Flags)))
	})
}

// RemoveXAttr implements fuse.RawFileSystem.
func (f *FS) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	return f.withXattrFd(h.NodeId, func(fd int) fuse.Status {
		return errno(unix.Fremovexattr(fd, attr))
	})
}

// openFlags keeps the access mode and the flags that matter for I/O.
func openFlags(fl uint32) int {
	return int(fl) & (unix.O_ACCMODE | unix.O_APPEND | unix.O_TRUNC | unix.O_SYNC | unix.O_DSYNC | unix.O_DIRECT | unix.O_NOATIME)
}

// Create implements fuse.RawFileSystem.
func (f *FS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	p, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(p)
	if st := validName(name); !st.Ok() {
		return st
	}
	// Create exclusively; an existing name is opened only if it is a
	// regular file, so a client cannot make the server open a fifo (and
	// block) or a device node it planted.
	fd, err := openBeneath(p.fd, name, openFlags(in.Flags)|unix.O_CREAT|unix.O_EXCL, in.Mode&0o7777)
	switch {
	case err == nil:
		if st := f.created(p, name, in.Caller, in.Mode, true, &out.EntryOut); !st.Ok() {
			unix.Close(fd)
			return st
		}
	case errors.Is(err, unix.EEXIST) && in.Flags&unix.O_EXCL == 0:
		if st := f.lookup(p, name, &out.EntryOut); !st.Ok() {
			return st
		}
		n, st := f.get(out.NodeId)
		if !st.Ok() {
			return st
		}
		defer f.put(n)
		if n.mode != syscall.S_IFREG {
			f.Forget(n.id, 1)
			if n.mode == syscall.S_IFDIR {
				return fuse.EISDIR
			}
			return fuse.Status(syscall.EEXIST)
		}
		if fd, err = reopen(n.fd, openFlags(in.Flags)); err != nil {
			f.Forget(n.id, 1)
			return errno(err)
		}
	default:
		return errno(err)
	}
	out.OpenOut.Fh = f.addHandle(fd)
	out.OpenOut.OpenFlags = 0
	if n, st := f.get(out.EntryOut.NodeId); st.Ok() {
		f.passthroughOpen(n, out.OpenOut.Fh, &out.OpenOut)
		f.put(n)
	}
	return fuse.OK
}

// Tmpfile implements fuse.RawFileSystem; not supported.
func (f *FS) Tmpfile(cancel <-chan struct{}, in *fuse.CreateIn, out *fuse.CreateOut) fuse.Status {
	return fuse.ENOSYS
}

// Open implements fuse.RawFileSystem.
func (f *FS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(n)
	switch n.mode {
	case syscall.S_IFREG:
	case syscall.S_IFDIR:
		return fuse.EISDIR
	default:
		// Devices and fifos are opened by the client kernel, never here.
		return fuse.EPERM
	}
	fd, err := reopen(n.fd, openFlags(in.Flags))
	if err != nil {
		return errno(err)
	}
	out.Fh = f.addHandle(fd)
	out.OpenFlags = 0
	f.passthroughOpen(n, out.Fh, out)
	return fuse.OK
}

// Read implements fuse.RawFileSystem.
func (f *FS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	h, st := f.getHandle(in.Fh)
	if !st.Ok() {
		return nil, st
	}
	defer f.putHandle(h)
	if int(in.Size) < len(buf) {
		buf = buf[:in.Size]
	}
	if in.Offset > 1<<62 {
		return fuse.ReadResultData(nil), fuse.OK
	}
	n, err := unix.Pread(h.fd, buf, int64(in.Offset))
	if err != nil {
		return nil, errno(err)
	}
	return fuse.ReadResultData(buf[:n]), fuse.OK
}

// Write implements fuse.RawFileSystem.
func (f *FS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	h, st := f.getHandle(in.Fh)
	if !st.Ok() {
		return 0, st
	}
	defer f.putHandle(h)
	if in.Offset > 1<<62 {
		return 0, fuse.Status(syscall.EFBIG)
	}
	n, err := unix.Pwrite(h.fd, data, int64(in.Offset))
	if err != nil {
		return 0, errno(err)
	}
	return uint32(n), fuse.OK
}

// Writev implements fuse.RawFileSystem; go-fuse falls back to Write.
func (f *FS) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	return 0, fuse.ENOSYS
}

// Lseek implements fuse.RawFileSystem (SEEK_DATA and SEEK_HOLE).
func (f *FS) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	h, st := f.getHandle(in.Fh)
	if !st.Ok() {
		return st
	}
	defer f.putHandle(h)
	off, err := unix.Seek(h.fd, int64(in.Offset), int(in.Whence))
	if err != nil {
		return errno(err)
	}
	out.Offset = uint64(off)
	return fuse.OK
}

// Fallocate implements fuse.RawFileSystem.
func (f *FS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	h, st := f.getHandle(in.Fh)
	if !st.Ok() {
		return st
	}
	defer f.putHandle(h)
	if in.Offset > 1<<62 || in.Length > 1<<62 {
		return fuse.Status(syscall.EFBIG)
	}
	return errno(unix.Fallocate(h.fd, in.Mode, int64(in.Offset), int64(in.Length)))
}

// CopyFileRange implements fuse.RawFileSystem; the kernel copies itself.
func (f *FS) CopyFileRange(cancel <-chan struct{}, in *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	return 0, fuse.ENOSYS
}

// Ioctl implements fuse.RawFileSystem.
func (f *FS) Ioctl(cancel <-chan struct{}, in *fuse.IoctlIn, inbuf []byte, out *fuse.IoctlOut, outbuf []byte) fuse.Status {
	return fuse.ENOSYS
}

// GetLk implements fuse.RawFileSystem; the client kernel locks locally.
func (f *FS) GetLk(cancel <-chan struct{}, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	return fuse.ENOSYS
}

// SetLk implements fuse.RawFileSystem.
func (f *FS) SetLk(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status { return fuse.ENOSYS }

// SetLkw implements fuse.RawFileSystem.
func (f *FS) SetLkw(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status { return fuse.ENOSYS }

// Release implements fuse.RawFileSystem.
func (f *FS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) { f.dropHandle(in.Fh) }

// Flush implements fuse.RawFileSystem.
func (f *FS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status { return fuse.OK }

// Fsync implements fuse.RawFileSystem.
func (f *FS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	h, st := f.getHandle(in.Fh)
	if !st.Ok() {
		return st
	}
	defer f.putHandle(h)
	if in.FsyncFlags&1 != 0 {
		return errno(unix.Fdatasync(h.fd))
	}
	return errno(unix.Fsync(h.fd))
}

// FsyncDir implements fuse.RawFileSystem.
func (f *FS) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	h, st := f.getHandle(in.Fh)
	if !st.Ok() {
		return st
	}
	defer f.putHandle(h)
	return errno(unix.Fsync(h.fd))
}

// OpenDir implements fuse.RawFileSystem.
func (f *FS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n, st := f.get(in.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(n)
	if n.mode != syscall.S_IFDIR {
		return fuse.ENOTDIR
	}
	fd, err := openBeneath(n.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return errno(err)
	}
	out.Fh = f.addHandle(fd)
	out.OpenFlags = 0
	return fuse.OK
}

// ReleaseDir implements fuse.RawFileSystem.
func (f *FS) ReleaseDir(in *fuse.ReleaseIn) { f.dropHandle(in.Fh) }

// ReadDir implements fuse.RawFileSystem. Offsets are the host
// filesystem's directory offsets, so they stay valid across calls.
func (f *FS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return f.readDir(in, out, false)
}

// ReadDirPlus implements fuse.RawFileSystem.
func (f *FS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return f.readDir(in, out, true)
}

func (f *FS) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	h, st := f.getHandle(in.Fh)
	if !st.Ok() {
		return st
	}
	defer f.putHandle(h)
	var dir *node
	if plus {
		if dir, st = f.get(in.NodeId); !st.Ok() {
			return st
		}
		defer f.put(dir)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if in.Offset > 1<<63-1 {
		return fuse.EINVAL
	}
	if _, err := unix.Seek(h.fd, int64(in.Offset), 0); err != nil {
		return errno(err)
	}
	buf := make([]byte, 8192)
	le := binary.LittleEndian
	for {
		nb, err := unix.Getdents(h.fd, buf)
		if err != nil {
			return errno(err)
		}
		if nb == 0 {
			return fuse.OK
		}
		for p := 0; p+19 <= nb; {
			ino := le.Uint64(buf[p:])
			off := le.Uint64(buf[p+8:])
			reclen := int(le.Uint16(buf[p+16:]))
			typ := buf[p+18]
			if reclen < 19 || p+reclen > nb {
				return fuse.EIO
			}
			name := buf[p+19 : p+reclen]
			for k, c := range name {
				if c == 0 {
					name = name[:k]
					break
				}
			}
			p += reclen
			de := fuse.DirEntry{Name: string(name), Ino: ino, Mode: uint32(typ) << 12, Off: off}
			if !plus {
				if !out.AddDirEntry(de) {
					return fuse.OK
				}
				continue
			}
			e := out.AddDirLookupEntry(de)
			if e == nil {
				return fuse.OK
			}
			if de.Name != "." && de.Name != ".." {
				// A vanished entry keeps a zero node id: the kernel skips it.
				f.lookup(dir, de.Name, e)
			}
		}
	}
}

// StatFs implements fuse.RawFileSystem.
func (f *FS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	n, st := f.get(h.NodeId)
	if !st.Ok() {
		return st
	}
	defer f.put(n)
	var s unix.Statfs_t
	if err := unix.Fstatfs(n.fd, &s); err != nil {
		return errno(err)
	}
	*out = fuse.StatfsOut{Blocks: s.Blocks, Bfree: s.Bfree, Bavail: s.Bavail, Files: s.Files, Ffree: s.Ffree,
		Bsize: uint32(s.Bsize), NameLen: uint32(s.Namelen), Frsize: uint32(s.Frsize)}
	return fuse.OK
}

// Nodes reports how many inodes the server holds open (for tests and
// metrics: it drops as the kernel forgets).
func (f *FS) Nodes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.nodes)
}

// Package vfs is the pseudo filesystem at the root of a daemon's FUSE
// mount: it holds several filesystems (RAFS images, passthrough
// directories) at sub-paths such as /rafs/<id>/lowerdir, makes read-only
// pseudo directories for the path components above them, and lets
// filesystems be mounted and unmounted while the kernel is using it.
//
// Node ids are (mount index << 56) | inner node id, as in nydusd's vfs, with
// index 0 for the pseudo directories. They are deterministic: a daemon that
// takes over the FUSE connection and mounts the same filesystems at the
// same indexes (MountAt, with the indexes saved from Mounts) answers the
// node ids the kernel already holds.
//
// With a single filesystem mounted at "/", the VFS is that filesystem: its
// root is the FUSE root and nothing else can be mounted beside it.
package vfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

const (
	indexShift = 56
	innerMask  = 1<<indexShift - 1
	// MaxMounts is the number of filesystems a VFS can hold at once
	// (indexes 1..255; index 0 is the pseudo directories).
	MaxMounts = 255
)

// Errors of Mount and Umount.
var (
	ErrBusy     = errors.New("mount point busy")
	ErrNotFound = errors.New("not mounted")
	ErrFull     = errors.New("no free mount index")
	ErrBadPath  = errors.New("bad mount path")
)

// Options tune the pseudo directories' cache timeouts.
type Options struct {
	EntryTimeout time.Duration
	AttrTimeout  time.Duration
	Logger       *slog.Logger
}

// MountInfo is what a daemon saves to re-create its mounts after a takeover.
type MountInfo struct {
	Index uint32
	Path  string
}

type mount struct {
	index  uint32
	path   string
	fs     fuse.RawFileSystem
	parent *pseudo // nil for the mount at "/"
	name   string
}

type pseudo struct {
	ino      uint64
	parent   *pseudo
	name     string
	dirs     map[string]*pseudo
	mounts   map[string]*mount
	children []string // sorted names of dirs and mounts, rebuilt on change
}

// VFS is a fuse.RawFileSystem holding other RawFileSystems at sub-paths.
type VFS struct {
	opts  Options
	log   *slog.Logger
	start time.Time

	// mounts and rootMount are read on every request without a lock.
	mounts    [MaxMounts + 1]atomic.Pointer[mount]
	rootMount atomic.Pointer[mount]

	mu         sync.Mutex // guards the pseudo tree and index allocation
	root       *pseudo
	pseudos    map[uint64]*pseudo
	nextPseudo uint64
	nextIndex  uint32

	server     atomic.Pointer[notifierBox]
	fuseServer atomic.Pointer[fuse.Server] // set by Init; handed to ServerSetters
}

var _ fuse.RawFileSystem = (*VFS)(nil)

// New returns an empty VFS.
func New(opts Options) *VFS {
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	root := &pseudo{ino: fuse.FUSE_ROOT_ID, dirs: map[string]*pseudo{}, mounts: map[string]*mount{}}
	root.parent = root
	return &VFS{opts: opts, log: l, start: time.Now(), root: root,
		pseudos: map[uint64]*pseudo{root.ino: root}, nextPseudo: root.ino + 1, nextIndex: 1}
}

// cleanPath checks p is absolute and returns it cleaned with its components.
func cleanPath(p string) (string, []string, error) {
	if !strings.HasPrefix(p, "/") || strings.ContainsRune(p, 0) {
		return "", nil, fmt.Errorf("%w: %q is not absolute", ErrBadPath, p)
	}
	c := path.Clean(p)
	if c == "/" {
		return c, nil, nil
	}
	parts := strings.Split(c[1:], "/")
	for _, s := range parts {
		if len(s) > 255 {
			return "", nil, fmt.Errorf("%w: component of %q longer than 255 bytes", ErrBadPath, p)
		}
	}
	return c, parts, nil
}

// Mount attaches fs at p with the next free index and returns the index.
func (v *VFS) Mount(p string, fs fuse.RawFileSystem) (uint32, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for k := range uint32(MaxMounts) {
		idx := (v.nextIndex-1+k)%MaxMounts + 1
		if v.mounts[idx].Load() == nil {
			if err := v.mountLocked(idx, p, fs); err != nil {
				return 0, err
			}
			// Round-robin so an index freed by Umount is reused as late as
			// possible: the kernel may still hold node ids of the old fs.
			v.nextIndex = idx%MaxMounts + 1
			return idx, nil
		}
	}
	return 0, ErrFull
}

// MountAt attaches fs at p with the given index, which must be free. A
// daemon taking over uses it to give each filesystem its old index.
func (v *VFS) MountAt(index uint32, p string, fs fuse.RawFileSystem) error {
	if index == 0 || index > MaxMounts {
		return fmt.Errorf("mount index %d out of range 1..%d", index, MaxMounts)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.mounts[index].Load() != nil {
		return fmt.Errorf("mount index %d: %w", index, ErrBusy)
	}
	if err := v.mountLocked(index, p, fs); err != nil {
		return err
	}
	if index >= v.nextIndex {
		v.nextIndex = index%MaxMounts + 1
	}
	return nil
}

func (v *VFS) mountLocked(idx uint32, p string, fs fuse.RawFileSystem) error {
	if fs == nil {
		return errors.New("mount: nil filesystem")
	}
	c, parts, err := cleanPath(p)
	if err != nil {
		return err
	}
	if v.rootMount.Load() != nil {
		return fmt.Errorf("mount %s: a filesystem is mounted at /: %w", c, ErrBusy)
	}
	m := &mount{index: idx, path: c, fs: fs}
	setServer(fs, v.fuseServer.Load())
	if len(parts) == 0 {
		if len(v.root.children) > 0 {
			return fmt.Errorf("mount /: other filesystems are mounted: %w", ErrBusy)
		}
		v.mounts[idx].Store(m)
		v.rootMount.Store(m)
		return nil
	}
	// Check the whole path first so a failed mount leaves no pseudo dirs.
	d := v.root
	for k, s := range parts {
		if _, ok := d.mounts[s]; ok {
			return fmt.Errorf("mount %s: %s is a mount point: %w", c, "/"+strings.Join(parts[:k+1], "/"), ErrBusy)
		}
		next, ok := d.dirs[s]
		if !ok {
			break
		}
		if k == len(parts)-1 {
			return fmt.Errorf("mount %s: has filesystems mounted below it: %w", c, ErrBusy)
		}
		d = next
	}
	d = v.root
	for _, s := range parts[:len(parts)-1] {
		next, ok := d.dirs[s]
		if !ok {
			next = &pseudo{ino: v.nextPseudo, parent: d, name: s, dirs: map[string]*pseudo{}, mounts: map[string]*mount{}}
			v.nextPseudo++
			v.pseudos[next.ino] = next
			d.dirs[s] = next
			d.reindex()
		}
		d = next
	}
	name := parts[len(parts)-1]
	m.parent, m.name = d, name
	d.mounts[name] = m
	d.reindex()
	v.mounts[idx].Store(m)
	return nil
}

func (d *pseudo) reindex() {
	d.children = d.children[:0]
	for n := range d.dirs {
		d.children = append(d.children, n)
	}
	for n := range d.mounts {
		d.children = append(d.children, n)
	}
	sort.Strings(d.children)
}

// Umount detaches the filesystem at p. Requests for its nodes fail from
// then on (ENOENT, or EIO for reads of open files); the kernel's cached
// entry for p is invalidated when the VFS is served by a fuse.Server.
// The filesystem itself is not closed: that is the caller's business.
func (v *VFS) Umount(p string) error {
	c, parts, err := cleanPath(p)
	if err != nil {
		return err
	}
	v.mu.Lock()
	var invalParent uint64
	var invalName string
	if len(parts) == 0 {
		m := v.rootMount.Load()
		if m == nil {
			v.mu.Unlock()
			return fmt.Errorf("umount /: %w", ErrNotFound)
		}
		v.rootMount.Store(nil)
		v.mounts[m.index].Store(nil)
	} else {
		d := v.root
		for _, s := range parts[:len(parts)-1] {
			if d = d.dirs[s]; d == nil {
				v.mu.Unlock()
				return fmt.Errorf("umount %s: %w", c, ErrNotFound)
			}
		}
		name := parts[len(parts)-1]
		m, ok := d.mounts[name]
		if !ok {
			v.mu.Unlock()
			return fmt.Errorf("umount %s: %w", c, ErrNotFound)
		}
		delete(d.mounts, name)
		d.reindex()
		v.mounts[m.index].Store(nil)
		invalParent, invalName = d.ino, name
		// Drop pseudo directories left empty, up to the root.
		for d != v.root && len(d.children) == 0 {
			up := d.parent
			delete(up.dirs, d.name)
			up.reindex()
			delete(v.pseudos, d.ino)
			invalParent, invalName = up.ino, d.name
			d = up
		}
	}
	v.mu.Unlock()
	if srv := v.notifier(); srv != nil && invalName != "" {
		if st := srv.EntryNotify(invalParent, invalName); !st.Ok() && st != fuse.ENOENT {
			v.log.Debug("vfs: entry invalidation after umount", "path", c, "status", st)
		}
	}
	return nil
}

// Replace swaps the filesystem at p for fs in one step, keeping its index
// (nydusd's remount): there is no moment at which p is missing, and the
// kernel's node ids now name fs's inodes of the same numbers. It returns
// the old filesystem, which the caller closes.
func (v *VFS) Replace(p string, fs fuse.RawFileSystem) (fuse.RawFileSystem, error) {
	if fs == nil {
		return nil, errors.New("replace: nil filesystem")
	}
	c, parts, err := cleanPath(p)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	var old *mount
	if len(parts) == 0 {
		old = v.rootMount.Load()
	} else {
		d := v.root
		for _, s := range parts[:len(parts)-1] {
			if d = d.dirs[s]; d == nil {
				break
			}
		}
		if d != nil {
			old = d.mounts[parts[len(parts)-1]]
		}
	}
	if old == nil {
		v.mu.Unlock()
		return nil, fmt.Errorf("replace %s: %w", c, ErrNotFound)
	}
	m := &mount{index: old.index, path: old.path, fs: fs, parent: old.parent, name: old.name}
	setServer(fs, v.fuseServer.Load())
	if m.parent == nil {
		v.rootMount.Store(m)
	} else {
		m.parent.mounts[m.name] = m
	}
	v.mounts[m.index].Store(m)
	v.mu.Unlock()
	if srv := v.notifier(); srv != nil && m.parent != nil {
		// Drop the kernel's dentries below p so names resolve afresh.
		srv.EntryNotify(m.parent.ino, m.name)
	}
	return old.fs, nil
}

// Mounts lists the mounted filesystems by index.
func (v *VFS) Mounts() []MountInfo {
	var out []MountInfo
	for idx := range v.mounts {
		if m := v.mounts[idx].Load(); m != nil {
			out = append(out, MountInfo{Index: m.index, Path: m.path})
		}
	}
	return out
}

// Get returns the filesystem mounted at p and its index.
func (v *VFS) Get(p string) (fuse.RawFileSystem, uint32, bool) {
	c, _, err := cleanPath(p)
	if err != nil {
		return nil, 0, false
	}
	for idx := range v.mounts {
		if m := v.mounts[idx].Load(); m != nil && m.path == c {
			return m.fs, m.index, true
		}
	}
	return nil, 0, false
}

// resolve maps an outer node id to a mount and its inner id, or to a
// pseudo directory.
func (v *VFS) resolve(id uint64) (*mount, uint64, *pseudo, fuse.Status) {
	if id == fuse.FUSE_ROOT_ID {
		if m := v.rootMount.Load(); m != nil {
			return m, fuse.FUSE_ROOT_ID, nil, fuse.OK
		}
	}
	idx := id >> indexShift
	if idx == 0 {
		v.mu.Lock()
		p := v.pseudos[id]
		v.mu.Unlock()
		if p == nil {
			return nil, 0, nil, fuse.ENOENT
		}
		return nil, 0, p, fuse.OK
	}
	m := v.mounts[idx].Load()
	if m == nil {
		return nil, 0, nil, fuse.ENOENT
	}
	return m, id & innerMask, nil, fuse.OK
}

// outer maps an inner node id of m to the id the kernel sees.
func (v *VFS) outer(m *mount, ino uint64) (uint64, bool) {
	if ino == fuse.FUSE_ROOT_ID && v.rootMount.Load() == m {
		return fuse.FUSE_ROOT_ID, true
	}
	if ino == 0 || ino > innerMask {
		return 0, false
	}
	return uint64(m.index)<<indexShift | ino, true
}

// fixEntry translates an EntryOut from m's id space; a zero node id (a
// negative entry) stays zero.
func (v *VFS) fixEntry(m *mount, out *fuse.EntryOut) fuse.Status {
	if out.NodeId == 0 {
		return fuse.OK
	}
	id, ok := v.outer(m, out.NodeId)
	if !ok {
		v.log.Error("vfs: inner node id out of range", "mount", m.path, "ino", out.NodeId)
		return fuse.EIO
	}
	out.NodeId = id
	out.Attr.Ino = id
	return fuse.OK
}

func (v *VFS) pseudoAttr(p *pseudo, out *fuse.Attr) {
	t := uint64(v.start.Unix())
	*out = fuse.Attr{Ino: p.ino, Mode: syscall.S_IFDIR | 0o755, Nlink: 2, Size: 4096, Blksize: 4096,
		Atime: t, Mtime: t, Ctime: t}
	v.mu.Lock()
	out.Nlink += uint32(len(p.children))
	v.mu.Unlock()
}

func (v *VFS) pseudoEntry(p *pseudo, out *fuse.EntryOut) {
	out.NodeId = p.ino
	out.Generation = 0
	out.SetEntryTimeout(v.opts.EntryTimeout)
	out.SetAttrTimeout(v.opts.AttrTimeout)
	v.pseudoAttr(p, &out.Attr)
}

// mountRootEntry fills out for the root of m as seen from its pseudo parent.
func (v *VFS) mountRootEntry(cancel <-chan struct{}, h *fuse.InHeader, m *mount, out *fuse.EntryOut) fuse.Status {
	in := fuse.GetAttrIn{InHeader: *h}
	in.NodeId = fuse.FUSE_ROOT_ID
	var a fuse.AttrOut
	if st := m.fs.GetAttr(cancel, &in, &a); !st.Ok() {
		return st
	}
	out.NodeId = fuse.FUSE_ROOT_ID
	out.Generation = 0
	out.Attr = a.Attr
	out.SetEntryTimeout(v.opts.EntryTimeout)
	out.SetAttrTimeout(v.opts.AttrTimeout)
	return v.fixEntry(m, out)
}

// pseudoChild finds name in p.
func (v *VFS) pseudoChild(p *pseudo, name string) (*pseudo, *mount) {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch name {
	case ".":
		return p, nil
	case "..":
		return p.parent, nil
	}
	if d, ok := p.dirs[name]; ok {
		return d, nil
	}
	return nil, p.mounts[name]
}

// String implements fuse.RawFileSystem.
func (v *VFS) String() string { return "rafsd-vfs" }

// SetDebug implements fuse.RawFileSystem.
func (v *VFS) SetDebug(bool) {}

// Notifier is what the VFS needs of a FUSE server to drop the kernel's
// cached entries of an unmounted path: *fuse.Server has it, and so can a
// transport built on fuse.ProtocolServer (which has no notification path).
type Notifier interface {
	EntryNotify(parent uint64, name string) fuse.Status
}

type notifierBox struct{ n Notifier }

// SetNotifier sets the server used to invalidate kernel entries on Umount
// and Replace, for transports that do not call Init with a *fuse.Server.
func (v *VFS) SetNotifier(n Notifier) {
	if n != nil {
		v.server.Store(&notifierBox{n})
	}
}

func (v *VFS) notifier() Notifier {
	if b := v.server.Load(); b != nil {
		return b.n
	}
	return nil
}

// ServerSetter is implemented by filesystems that use the /dev/fuse
// server for something other than node ids (rafs/passthrough registers
// kernel passthrough backing files with it). The VFS hands them its server.
type ServerSetter interface {
	SetServer(*fuse.Server)
}

// Init implements fuse.RawFileSystem. The server is kept to invalidate
// kernel entries on Umount. Mounted filesystems do not get Init (the
// kernel does not know their own node ids), only SetServer if they have it.
func (v *VFS) Init(s *fuse.Server) {
	if s == nil {
		return
	}
	v.server.Store(&notifierBox{s})
	v.fuseServer.Store(s)
	for idx := range v.mounts {
		if m := v.mounts[idx].Load(); m != nil {
			setServer(m.fs, s)
		}
	}
}

func setServer(fs fuse.RawFileSystem, s *fuse.Server) {
	if ss, ok := fs.(ServerSetter); ok && s != nil {
		ss.SetServer(s)
	}
}

// OnUnmount implements fuse.RawFileSystem.
func (v *VFS) OnUnmount() {
	for idx := range v.mounts {
		if m := v.mounts[idx].Load(); m != nil {
			m.fs.OnUnmount()
		}
	}
}

// Lookup implements fuse.RawFileSystem.
func (v *VFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	m, ino, p, st := v.resolve(h.NodeId)
	if !st.Ok() {
		return st
	}
	if m != nil {
		hh := *h
		hh.NodeId = ino
		if st := m.fs.Lookup(cancel, &hh, name, out); !st.Ok() {
			return st
		}
		return v.fixEntry(m, out)
	}
	d, cm := v.pseudoChild(p, name)
	switch {
	case d != nil:
		v.pseudoEntry(d, out)
		return fuse.OK
	case cm != nil:
		return v.mountRootEntry(cancel, h, cm, out)
	}
	return fuse.ENOENT
}

// Forget implements fuse.RawFileSystem.
func (v *VFS) Forget(nodeid, nlookup uint64) {
	if m, ino, _, st := v.resolve(nodeid); st.Ok() && m != nil {
		m.fs.Forget(ino, nlookup)
	}
}

// GetAttr implements fuse.RawFileSystem.
func (v *VFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	m, ino, p, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	if m == nil {
		v.pseudoAttr(p, &out.Attr)
		out.SetTimeout(v.opts.AttrTimeout)
		return fuse.OK
	}
	c := *in
	c.NodeId = ino
	st = m.fs.GetAttr(cancel, &c, out)
	out.Attr.Ino = in.NodeId
	return st
}

// SetAttr implements fuse.RawFileSystem.
func (v *VFS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	if m == nil {
		return fuse.EROFS
	}
	c := *in
	c.NodeId = ino
	st = m.fs.SetAttr(cancel, &c, out)
	out.Attr.Ino = in.NodeId
	return st
}

// Statx implements fuse.RawFileSystem; GETATTR serves instead.
func (v *VFS) Statx(cancel <-chan struct{}, in *fuse.StatxIn, out *fuse.StatxOut) fuse.Status {
	return fuse.ENOSYS
}

// entryOp runs a node-creating operation on the filesystem owning parent.
func (v *VFS) entryOp(parent uint64, out *fuse.EntryOut, do func(m *mount, ino uint64) fuse.Status) fuse.Status {
	m, ino, _, st := v.resolve(parent)
	if !st.Ok() {
		return st
	}
	if m == nil {
		return fuse.EROFS
	}
	if st := do(m, ino); !st.Ok() {
		return st
	}
	return v.fixEntry(m, out)
}

// Mknod implements fuse.RawFileSystem.
func (v *VFS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return v.entryOp(in.NodeId, out, func(m *mount, ino uint64) fuse.Status {
		c := *in
		c.NodeId = ino
		return m.fs.Mknod(cancel, &c, name, out)
	})
}

// Mkdir implements fuse.RawFileSystem.
func (v *VFS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return v.entryOp(in.NodeId, out, func(m *mount, ino uint64) fuse.Status {
		c := *in
		c.NodeId = ino
		return m.fs.Mkdir(cancel, &c, name, out)
	})
}

// Symlink implements fuse.RawFileSystem.
func (v *VFS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return v.entryOp(h.NodeId, out, func(m *mount, ino uint64) fuse.Status {
		c := *h
		c.NodeId = ino
		return m.fs.Symlink(cancel, &c, target, name, out)
	})
}

// Link implements fuse.RawFileSystem.
func (v *VFS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	om, oino, _, st := v.resolve(in.Oldnodeid)
	if !st.Ok() {
		return st
	}
	return v.entryOp(in.NodeId, out, func(m *mount, ino uint64) fuse.Status {
		if om != m {
			return fuse.Status(syscall.EXDEV)
		}
		c := *in
		c.NodeId, c.Oldnodeid = ino, oino
		return m.fs.Link(cancel, &c, name, out)
	})
}

// Create implements fuse.RawFileSystem.
func (v *VFS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return v.entryOp(in.NodeId, &out.EntryOut, func(m *mount, ino uint64) fuse.Status {
		c := *in
		c.NodeId = ino
		return m.fs.Create(cancel, &c, name, out)
	})
}

// Tmpfile implements fuse.RawFileSystem.
func (v *VFS) Tmpfile(cancel <-chan struct{}, in *fuse.CreateIn, out *fuse.CreateOut) fuse.Status {
	return v.entryOp(in.NodeId, &out.EntryOut, func(m *mount, ino uint64) fuse.Status {
		c := *in
		c.NodeId = ino
		return m.fs.Tmpfile(cancel, &c, out)
	})
}

// headerOp runs an operation that only needs the node's filesystem.
func (v *VFS) headerOp(h *fuse.InHeader, pseudoSt fuse.Status, do func(m *mount, h *fuse.InHeader) fuse.Status) fuse.Status {
	m, ino, _, st := v.resolve(h.NodeId)
	if !st.Ok() {
		return st
	}
	if m == nil {
		return pseudoSt
	}
	c := *h
	c.NodeId = ino
	return do(m, &c)
}

// Unlink implements fuse.RawFileSystem.
func (v *VFS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return v.headerOp(h, fuse.EROFS, func(m *mount, h *fuse.InHeader) fuse.Status { return m.fs.Unlink(cancel, h, name) })
}

// Rmdir implements fuse.RawFileSystem.
func (v *VFS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return v.headerOp(h, fuse.EROFS, func(m *mount, h *fuse.InHeader) fuse.Status { return m.fs.Rmdir(cancel, h, name) })
}

// Rename implements fuse.RawFileSystem.
func (v *VFS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	nm, nino, _, st := v.resolve(in.Newdir)
	if !st.Ok() {
		return st
	}
	if m == nil || nm == nil {
		return fuse.EROFS
	}
	if m != nm {
		return fuse.Status(syscall.EXDEV)
	}
	c := *in
	c.NodeId, c.Newdir = ino, nino
	return m.fs.Rename(cancel, &c, oldName, newName)
}

// Readlink implements fuse.RawFileSystem.
func (v *VFS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	var out []byte
	st := v.headerOp(h, fuse.EINVAL, func(m *mount, h *fuse.InHeader) fuse.Status {
		var st fuse.Status
		out, st = m.fs.Readlink(cancel, h)
		return st
	})
	return out, st
}

// Access implements fuse.RawFileSystem.
func (v *VFS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	if m == nil {
		if in.Mask&2 != 0 {
			return fuse.EROFS
		}
		return fuse.OK
	}
	c := *in
	c.NodeId = ino
	return m.fs.Access(cancel, &c)
}

// single reports whether one filesystem is the whole VFS; only then may
// it switch xattrs off for the mount (ENOSYS is remembered per mount).
func (v *VFS) single(m *mount) bool { return v.rootMount.Load() == m }

// GetXAttr implements fuse.RawFileSystem.
func (v *VFS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	var n uint32
	st := v.headerOp(h, fuse.ENOATTR, func(m *mount, h *fuse.InHeader) fuse.Status {
		var st fuse.Status
		n, st = m.fs.GetXAttr(cancel, h, attr, dest)
		if st == fuse.ENOSYS && !v.single(m) {
			st = fuse.ENOATTR
		}
		return st
	})
	return n, st
}

// ListXAttr implements fuse.RawFileSystem.
func (v *VFS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	var n uint32
	st := v.headerOp(h, fuse.OK, func(m *mount, h *fuse.InHeader) fuse.Status {
		var st fuse.Status
		n, st = m.fs.ListXAttr(cancel, h, dest)
		if st == fuse.ENOSYS && !v.single(m) {
			n, st = 0, fuse.OK
		}
		return st
	})
	return n, st
}

// SetXAttr implements fuse.RawFileSystem.
func (v *VFS) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	if m == nil {
		return fuse.EROFS
	}
	c := *in
	c.NodeId = ino
	st = m.fs.SetXAttr(cancel, &c, attr, data)
	if st == fuse.ENOSYS && !v.single(m) {
		st = fuse.ENOTSUP
	}
	return st
}

// RemoveXAttr implements fuse.RawFileSystem.
func (v *VFS) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	return v.headerOp(h, fuse.EROFS, func(m *mount, h *fuse.InHeader) fuse.Status {
		st := m.fs.RemoveXAttr(cancel, h, attr)
		if st == fuse.ENOSYS && !v.single(m) {
			st = fuse.ENOTSUP
		}
		return st
	})
}

// Open implements fuse.RawFileSystem.
func (v *VFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	if m == nil {
		return fuse.EISDIR
	}
	c := *in
	c.NodeId = ino
	return m.fs.Open(cancel, &c, out)
}

// Read implements fuse.RawFileSystem. Reads of a file whose filesystem
// was unmounted fail with EIO.
func (v *VFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return nil, fuse.EIO
	}
	if m == nil {
		return nil, fuse.EISDIR
	}
	c := *in
	c.NodeId = ino
	return m.fs.Read(cancel, &c, buf)
}

// Lseek implements fuse.RawFileSystem.
func (v *VFS) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return fuse.EIO
	}
	if m == nil {
		return fuse.EINVAL // never ENOSYS: the kernel would stop asking any filesystem
	}
	c := *in
	c.NodeId = ino
	return m.fs.Lseek(cancel, &c, out)
}

// GetLk implements fuse.RawFileSystem.
func (v *VFS) GetLk(cancel <-chan struct{}, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() || m == nil {
		return fuse.ENOSYS
	}
	c := *in
	c.NodeId = ino
	return m.fs.GetLk(cancel, &c, out)
}

// SetLk implements fuse.RawFileSystem.
func (v *VFS) SetLk(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() || m == nil {
		return fuse.ENOSYS
	}
	c := *in
	c.NodeId = ino
	return m.fs.SetLk(cancel, &c)
}

// SetLkw implements fuse.RawFileSystem.
func (v *VFS) SetLkw(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() || m == nil {
		return fuse.ENOSYS
	}
	c := *in
	c.NodeId = ino
	return m.fs.SetLkw(cancel, &c)
}

// Release implements fuse.RawFileSystem.
func (v *VFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	if m, ino, _, st := v.resolve(in.NodeId); st.Ok() && m != nil {
		c := *in
		c.NodeId = ino
		m.fs.Release(cancel, &c)
	}
}

// Write implements fuse.RawFileSystem.
func (v *VFS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return 0, fuse.EIO
	}
	if m == nil {
		return 0, fuse.EISDIR
	}
	c := *in
	c.NodeId = ino
	return m.fs.Write(cancel, &c, data)
}

// Writev implements fuse.RawFileSystem.
func (v *VFS) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return 0, fuse.EIO
	}
	if m == nil {
		return 0, fuse.EISDIR
	}
	c := *in
	c.NodeId = ino
	return m.fs.Writev(cancel, &c, data)
}

// CopyFileRange implements fuse.RawFileSystem.
func (v *VFS) CopyFileRange(cancel <-chan struct{}, in *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return 0, fuse.EIO
	}
	om, oino, _, st := v.resolve(in.NodeIdOut)
	if !st.Ok() {
		return 0, fuse.EIO
	}
	if m == nil || om != m {
		return 0, fuse.Status(syscall.EXDEV)
	}
	c := *in
	c.NodeId, c.NodeIdOut = ino, oino
	return m.fs.CopyFileRange(cancel, &c)
}

// Ioctl implements fuse.RawFileSystem.
func (v *VFS) Ioctl(cancel <-chan struct{}, in *fuse.IoctlIn, inbuf []byte, out *fuse.IoctlOut, outbuf []byte) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() || m == nil {
		return fuse.Status(syscall.ENOTTY)
	}
	c := *in
	c.NodeId = ino
	return m.fs.Ioctl(cancel, &c, inbuf, out, outbuf)
}

// Flush implements fuse.RawFileSystem.
func (v *VFS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() || m == nil {
		return fuse.OK
	}
	c := *in
	c.NodeId = ino
	return m.fs.Flush(cancel, &c)
}

// Fsync implements fuse.RawFileSystem.
func (v *VFS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return fuse.EIO
	}
	if m == nil {
		return fuse.OK
	}
	c := *in
	c.NodeId = ino
	return m.fs.Fsync(cancel, &c)
}

// FsyncDir implements fuse.RawFileSystem.
func (v *VFS) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return fuse.EIO
	}
	if m == nil {
		return fuse.OK
	}
	c := *in
	c.NodeId = ino
	return m.fs.FsyncDir(cancel, &c)
}

// Fallocate implements fuse.RawFileSystem.
func (v *VFS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return fuse.EIO
	}
	if m == nil {
		return fuse.EISDIR
	}
	c := *in
	c.NodeId = ino
	return m.fs.Fallocate(cancel, &c)
}

// OpenDir implements fuse.RawFileSystem. Pseudo directories change as
// filesystems come and go, so the kernel does not cache them.
func (v *VFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	m, ino, _, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	if m == nil {
		out.Fh = 0
		out.OpenFlags = 0
		return fuse.OK
	}
	c := *in
	c.NodeId = ino
	return m.fs.OpenDir(cancel, &c, out)
}

// pseudoList returns entry k of p's stream (".", "..", children).
func (v *VFS) pseudoList(p *pseudo, k uint64) (string, *pseudo, *mount, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case k == 0:
		return ".", p, nil, true
	case k == 1:
		return "..", p.parent, nil, true
	case k-2 < uint64(len(p.children)):
		n := p.children[k-2]
		if d, ok := p.dirs[n]; ok {
			return n, d, nil, true
		}
		return n, nil, p.mounts[n], true
	}
	return "", nil, nil, false
}

// ReadDir implements fuse.RawFileSystem.
func (v *VFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return v.readDir(cancel, in, out, false)
}

// ReadDirPlus implements fuse.RawFileSystem.
func (v *VFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return v.readDir(cancel, in, out, true)
}

func (v *VFS) readDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	m, ino, p, st := v.resolve(in.NodeId)
	if !st.Ok() {
		return st
	}
	if m != nil {
		c := *in
		c.NodeId = ino
		start := len(out.Bytes())
		if plus {
			st = m.fs.ReadDirPlus(cancel, &c, out)
		} else {
			st = m.fs.ReadDir(cancel, &c, out)
		}
		if st.Ok() {
			st = v.fixDirents(m, out.Bytes()[start:], plus)
		}
		return st
	}
	for k := in.Offset; ; k++ {
		name, d, cm, ok := v.pseudoList(p, k)
		if !ok {
			return fuse.OK
		}
		de := fuse.DirEntry{Name: name, Mode: syscall.S_IFDIR, Off: k + 1}
		if d != nil {
			de.Ino = d.ino
		} else {
			de.Ino = uint64(cm.index)<<indexShift | fuse.FUSE_ROOT_ID
		}
		if !plus {
			if !out.AddDirEntry(de) {
				return fuse.OK
			}
			continue
		}
		var e fuse.EntryOut
		if k >= 2 { // "." and ".." carry no entry
			if d != nil {
				v.pseudoEntry(d, &e)
			} else if st := v.mountRootEntry(cancel, &in.InHeader, cm, &e); !st.Ok() {
				continue // unmounted or failing: leave it out rather than fail the listing
			}
			de.Mode = e.Attr.Mode
		}
		eo := out.AddDirLookupEntry(de)
		if eo == nil {
			// Full. Nothing to undo: a mount root's entry came from
			// GETATTR, which takes no lookup reference in the mounted fs.
			return fuse.OK
		}
		*eo = e
	}
}

var entryOutSize = int(unsafe.Sizeof(fuse.EntryOut{}))

const direntHeader = 24 // ino, off, namelen, type

// fixDirents rewrites the node ids and inode numbers of entries a mounted
// filesystem serialized into buf, in place.
func (v *VFS) fixDirents(m *mount, buf []byte, plus bool) fuse.Status {
	le := binary.LittleEndian
	for p := 0; p < len(buf); {
		if plus {
			if p+entryOutSize > len(buf) {
				return fuse.EIO
			}
			// EntryOut starts with NodeId; Attr.Ino sits at its offset.
			e := (*fuse.EntryOut)(unsafe.Pointer(&buf[p]))
			if st := v.fixEntry(m, e); !st.Ok() {
				return st
			}
			p += entryOutSize
		}
		if p+direntHeader > len(buf) {
			return fuse.EIO
		}
		d := buf[p:]
		if ino := le.Uint64(d); ino != 0 && ino != fuse.FUSE_UNKNOWN_INO {
			o, ok := v.outer(m, ino&innerMask)
			if !ok {
				o = uint64(m.index)<<indexShift | 1
			}
			le.PutUint64(d, o)
		}
		nameLen := int(le.Uint32(d[16:]))
		p += direntHeader + (nameLen+7)&^7
	}
	return fuse.OK
}

// ReleaseDir implements fuse.RawFileSystem.
func (v *VFS) ReleaseDir(in *fuse.ReleaseIn) {
	if m, ino, _, st := v.resolve(in.NodeId); st.Ok() && m != nil {
		c := *in
		c.NodeId = ino
		m.fs.ReleaseDir(&c)
	}
}

// StatFs implements fuse.RawFileSystem.
func (v *VFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	st := v.headerOp(h, fuse.OK, func(m *mount, h *fuse.InHeader) fuse.Status {
		return m.fs.StatFs(cancel, h, out)
	})
	if st.Ok() && out.Bsize == 0 {
		*out = fuse.StatfsOut{Bsize: 4096, Frsize: 4096, NameLen: 255}
	}
	return st
}

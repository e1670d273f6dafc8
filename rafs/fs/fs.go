// Package fs serves a RAFS image read-only as a go-fuse RawFileSystem.
//
// The filesystem is stateless: FUSE node ids are the image's inode numbers
// and file handles are zero, so a daemon that takes over a live FUSE
// connection and loads the same bootstrap answers the kernel's existing
// node ids and open files without any saved state. Because the image is
// immutable, every open asks the kernel to keep its page cache and to cache
// directory contents.
package fs

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sort"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/config"
)

// Options tune how the kernel caches what the filesystem answers.
type Options struct {
	// EntryTimeout is how long the kernel may cache a name lookup;
	// AttrTimeout how long it may cache attributes. The image never
	// changes, so long values are safe; zero means the kernel asks every
	// time. nydusd hard-codes them (RAFS_DEFAULT_ATTR_TIMEOUT and
	// _ENTRY_TIMEOUT, 2^32 s, in rafs/src/fs.rs); rafsd's daemon takes
	// them from its config's entry_timeout/attr_timeout (rafs/config).
	EntryTimeout time.Duration
	AttrTimeout  time.Duration
	// NegativeTimeout is how long the kernel may cache a failed lookup.
	NegativeTimeout time.Duration
	// Logger receives read errors; nil means slog.Default().
	Logger *slog.Logger
	// FilesAccount keeps per-file operation counters (nydusd
	// iostats_files, /metrics/files); AccessPattern records each file's
	// read count and first read time (nydusd access_pattern,
	// /metrics/pattern). Both cost a pointer per inode.
	FilesAccount  bool
	AccessPattern bool
	// LatestReadFiles marks each file read since the last
	// LatestReadFilesJSON (nydusd latest_read_files, /metrics/files?latest=true).
	LatestReadFiles bool
}

// DefaultOptions are what rafsd's daemon serves RAFS images with when the
// config sets no timeouts: entry and attribute timeouts of
// config.DefaultTimeout (5 s, the FUSE defaults of fuse-backend-rs that
// nydusd's passthrough_fs keeps; nydusd keeps RAFS entries 2^32 s, and
// 5 s bounds what a kernel holds across a remount at the same path).
func DefaultOptions() Options {
	t := config.DefaultTimeout * time.Second
	return Options{EntryTimeout: t, AttrTimeout: t}
}

// FS is a read-only fuse.RawFileSystem over a rafs.Image.
type FS struct {
	img       *rafs.Image
	cr        rafs.ChunkReader
	opts      Options
	log       *slog.Logger
	hasXattrs bool
	stats     Stats
	acct      *accounting // nil unless per-file accounting is on
}

// Stats are cumulative counters, safe to read while serving.
type Stats struct {
	Lookups    atomic.Uint64
	GetAttrs   atomic.Uint64
	ReadDirs   atomic.Uint64
	Xattrs     atomic.Uint64
	Opens      atomic.Uint64
	Reads      atomic.Uint64
	ReadBytes  atomic.Uint64
	ReadErrors atomic.Uint64
}

var _ fuse.RawFileSystem = (*FS)(nil)

// New returns a filesystem serving img, reading file data through cr. img
// must have passed Validate (every decoder guarantees it).
func New(img *rafs.Image, cr rafs.ChunkReader, opts Options) *FS {
	l := opts.Logger
	if l == nil {
		l = slog.Default()
	}
	f := &FS{img: img, cr: cr, opts: opts, log: l, hasXattrs: img.HasXattrs()}
	if opts.FilesAccount || opts.AccessPattern || opts.LatestReadFiles {
		f.acct = newAccounting(len(img.Inodes), opts.FilesAccount, opts.AccessPattern, opts.LatestReadFiles)
	}
	return f
}

// Image returns the image being served.
func (f *FS) Image() *rafs.Image { return f.img }

// Stats returns the filesystem's counters.
func (f *FS) Stats() *Stats { return &f.stats }

// Options returns the options the filesystem was made with.
func (f *FS) Options() Options { return f.opts }

// String implements fuse.RawFileSystem.
func (f *FS) String() string { return "rafs" }

// SetDebug implements fuse.RawFileSystem; debug output comes from go-fuse.
func (f *FS) SetDebug(bool) {}

// Init implements fuse.RawFileSystem. The filesystem never talks back to
// the kernel: nothing it serves ever changes.
func (f *FS) Init(*fuse.Server) {}

// OnUnmount implements fuse.RawFileSystem.
func (f *FS) OnUnmount() {}

// chanCtx turns go-fuse's per-request cancel channel (closed on
// FUSE_INTERRUPT or connection teardown) into a context without a
// goroutine per request.
type chanCtx struct {
	context.Context
	done <-chan struct{}
}

func (c chanCtx) Done() <-chan struct{} { return c.done }

func (c chanCtx) Err() error {
	select {
	case <-c.done:
		return context.Canceled
	default:
		return nil
	}
}

// Context returns a context cancelled when cancel is closed.
func Context(cancel <-chan struct{}) context.Context {
	if cancel == nil {
		return context.Background()
	}
	return chanCtx{Context: context.Background(), done: cancel}
}

func (f *FS) inode(ino uint64) (*rafs.Inode, fuse.Status) {
	i, err := f.img.Inode(ino)
	if err != nil {
		return nil, fuse.ENOENT
	}
	return i, fuse.OK
}

// FillAttr sets out from inode i the way nydusd reports it: atime and
// ctime equal mtime, 4 KiB preferred I/O size, blocks from the size.
func FillAttr(i *rafs.Inode, out *fuse.Attr) {
	*out = fuse.Attr{
		Ino:       i.Ino,
		Size:      i.Size,
		Blocks:    (i.Size + 511) / 512,
		Atime:     uint64(i.Mtime),
		Mtime:     uint64(i.Mtime),
		Ctime:     uint64(i.Mtime),
		Atimensec: i.MtimeNsec,
		Mtimensec: i.MtimeNsec,
		Ctimensec: i.MtimeNsec,
		Mode:      i.Mode,
		Nlink:     max(i.Nlink, 1),
		Owner:     fuse.Owner{Uid: i.UID, Gid: i.GID},
		Rdev:      uint32(i.Rdev),
		Blksize:   4096,
	}
	if i.IsSymlink() {
		out.Size = uint64(len(i.Target))
		out.Blocks = (out.Size + 511) / 512
	}
}

func (f *FS) fillEntry(i *rafs.Inode, out *fuse.EntryOut) {
	out.NodeId = i.Ino
	out.Generation = 0
	out.SetEntryTimeout(f.opts.EntryTimeout)
	out.SetAttrTimeout(f.opts.AttrTimeout)
	FillAttr(i, &out.Attr)
}

// Lookup implements fuse.RawFileSystem.
func (f *FS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	f.stats.Lookups.Add(1)
	dir, st := f.inode(h.NodeId)
	if !st.Ok() {
		return st
	}
	var c *rafs.Inode
	var err error
	switch name {
	case ".":
		c = dir
	case "..":
		c, err = f.img.Inode(dir.Parent)
	default:
		c, err = f.img.Lookup(dir, name)
	}
	if err != nil {
		st := fuse.Status(rafs.Errno(err))
		if st == fuse.ENOENT && f.opts.NegativeTimeout > 0 {
			// A zero node id with a timeout is a cacheable negative entry.
			*out = fuse.EntryOut{}
			out.SetEntryTimeout(f.opts.NegativeTimeout)
			return fuse.OK
		}
		return st
	}
	f.fillEntry(c, out)
	return fuse.OK
}

// Forget implements fuse.RawFileSystem; inodes live as long as the image.
func (f *FS) Forget(nodeid, nlookup uint64) {}

// GetAttr implements fuse.RawFileSystem.
func (f *FS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	f.stats.GetAttrs.Add(1)
	i, st := f.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	FillAttr(i, &out.Attr)
	out.SetTimeout(f.opts.AttrTimeout)
	f.acct.record(i.Ino, FopGetattr, 0, true)
	return fuse.OK
}

// Statx implements fuse.RawFileSystem; the kernel falls back to GETATTR.
func (f *FS) Statx(cancel <-chan struct{}, in *fuse.StatxIn, out *fuse.StatxOut) fuse.Status {
	return fuse.ENOSYS
}

// Open implements fuse.RawFileSystem.
func (f *FS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	i, st := f.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY || in.Flags&syscall.O_TRUNC != 0 {
		return fuse.EROFS
	}
	if i.IsDir() {
		return fuse.EISDIR
	}
	f.stats.Opens.Add(1)
	f.acct.record(i.Ino, FopOpen, 0, true)
	out.Fh = 0
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	return fuse.OK
}

// Read implements fuse.RawFileSystem.
func (f *FS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	i, st := f.inode(in.NodeId)
	if !st.Ok() {
		return nil, st
	}
	if !i.IsRegular() {
		return nil, fuse.EISDIR
	}
	if int(in.Size) < len(buf) {
		buf = buf[:in.Size]
	}
	if in.Offset > rafs.MaxFileSize {
		return fuse.ReadResultData(nil), fuse.OK
	}
	n, err := f.img.ReadAt(Context(cancel), f.cr, i, buf, int64(in.Offset))
	f.stats.Reads.Add(1)
	if err != nil && !errors.Is(err, io.EOF) {
		f.stats.ReadErrors.Add(1)
		f.acct.record(i.Ino, FopRead, 0, false)
		if errors.Is(err, context.Canceled) {
			return nil, fuse.EINTR
		}
		// Whatever failed underneath (a missing blob file, a bad digest,
		// a backend timeout), read(2) reports it as an I/O error.
		f.log.Warn("rafs read failed", "ino", i.Ino, "offset", in.Offset, "size", in.Size, "err", err)
		return nil, fuse.EIO
	}
	f.stats.ReadBytes.Add(uint64(n))
	f.acct.record(i.Ino, FopRead, n, true)
	return fuse.ReadResultData(buf[:n]), fuse.OK
}

// Lseek implements fuse.RawFileSystem for SEEK_DATA and SEEK_HOLE (the
// kernel handles the others): chunks are data, gaps between them holes,
// so sparse files copy sparse.
func (f *FS) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	i, st := f.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if !i.IsRegular() {
		return fuse.EINVAL
	}
	off, ok := seekData(i, in.Offset, in.Whence)
	if !ok {
		return fuse.Status(syscall.ENXIO)
	}
	out.Offset = off
	return fuse.OK
}

const (
	seekDataWhence = 3 // SEEK_DATA
	seekHoleWhence = 4 // SEEK_HOLE
)

// seekData answers SEEK_DATA or SEEK_HOLE from off in i.
func seekData(i *rafs.Inode, off uint64, whence uint32) (uint64, bool) {
	if off >= i.Size || (whence != seekDataWhence && whence != seekHoleWhence) {
		return 0, false
	}
	// First chunk ending after off.
	k := sort.Search(len(i.Chunks), func(k int) bool {
		c := i.Chunks[k]
		return c.FileOffset+uint64(c.UncompressedSize) > off
	})
	if whence == seekDataWhence {
		if k == len(i.Chunks) {
			return 0, false
		}
		return max(off, i.Chunks[k].FileOffset), true
	}
	pos := off
	for ; k < len(i.Chunks) && i.Chunks[k].FileOffset <= pos; k++ {
		pos = i.Chunks[k].FileOffset + uint64(i.Chunks[k].UncompressedSize)
	}
	return min(pos, i.Size), true
}

// Release implements fuse.RawFileSystem.
func (f *FS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	f.acct.record(in.NodeId, FopRelease, 0, true)
}

// Flush implements fuse.RawFileSystem.
func (f *FS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status { return fuse.OK }

// Fsync implements fuse.RawFileSystem: nothing is ever dirty.
func (f *FS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status { return fuse.OK }

// FsyncDir implements fuse.RawFileSystem.
func (f *FS) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status { return fuse.OK }

// OpenDir implements fuse.RawFileSystem.
func (f *FS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	i, st := f.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if !i.IsDir() {
		return fuse.ENOTDIR
	}
	out.Fh = 0
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE | fuse.FOPEN_CACHE_DIR
	return fuse.OK
}

// dirEntry returns entry k of directory d's stream: ".", "..", then
// d.Entries in order. Offsets are stable: the entry at index k has offset
// k+1, so a reader can resume anywhere.
func (f *FS) dirEntry(d *rafs.Inode, k uint64) (string, *rafs.Inode, bool) {
	switch {
	case k == 0:
		return ".", d, true
	case k == 1:
		p, err := f.img.Inode(d.Parent)
		if err != nil {
			p = d
		}
		return "..", p, true
	case k-2 < uint64(len(d.Entries)):
		e := d.Entries[k-2]
		c, err := f.img.Inode(e.Ino)
		if err != nil {
			return "", nil, false
		}
		return e.Name, c, true
	}
	return "", nil, false
}

// ReadDir implements fuse.RawFileSystem.
func (f *FS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	f.stats.ReadDirs.Add(1)
	d, st := f.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if !d.IsDir() {
		return fuse.ENOTDIR
	}
	for k := in.Offset; ; k++ {
		name, c, ok := f.dirEntry(d, k)
		if !ok {
			break
		}
		if !out.AddDirEntry(fuse.DirEntry{Name: name, Ino: c.Ino, Mode: c.Mode, Off: k + 1}) {
			break
		}
	}
	return fuse.OK
}

// ReadDirPlus implements fuse.RawFileSystem. Entries other than "." and
// ".." carry their attributes, which counts as a lookup for the kernel;
// "." and ".." carry none (the kernel ignores them).
func (f *FS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	f.stats.ReadDirs.Add(1)
	d, st := f.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if !d.IsDir() {
		return fuse.ENOTDIR
	}
	for k := in.Offset; ; k++ {
		name, c, ok := f.dirEntry(d, k)
		if !ok {
			break
		}
		e := out.AddDirLookupEntry(fuse.DirEntry{Name: name, Ino: c.Ino, Mode: c.Mode, Off: k + 1})
		if e == nil {
			break
		}
		if k >= 2 {
			f.fillEntry(c, e)
		}
	}
	return fuse.OK
}

// ReleaseDir implements fuse.RawFileSystem.
func (f *FS) ReleaseDir(in *fuse.ReleaseIn) {}

// Readlink implements fuse.RawFileSystem.
func (f *FS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	i, st := f.inode(h.NodeId)
	if !st.Ok() {
		return nil, st
	}
	if !i.IsSymlink() {
		return nil, fuse.EINVAL
	}
	if i.Target == "" {
		// No filesystem can hold an empty symlink (symlink(2) refuses
		// one) and kernels disagree on following it: call it corrupt.
		return nil, fuse.EIO
	}
	f.acct.record(i.Ino, FopReadlink, 0, true)
	return []byte(i.Target), fuse.OK
}

// Access implements fuse.RawFileSystem: write access is refused; read and
// execute are checked against the mode bits like generic_permission.
func (f *FS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	i, st := f.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	if in.Mask&2 != 0 { // W_OK
		return fuse.EROFS
	}
	if !rafs.Allows(i.Mode, i.UID, i.GID, in.Uid, in.Gid, in.Mask) {
		return fuse.EACCES
	}
	return fuse.OK
}

// GetXAttr implements fuse.RawFileSystem. An image without any xattr
// answers ENOSYS, so the kernel stops asking for the whole mount (ls -l
// would otherwise ask for security.* and ACLs of every file).
func (f *FS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	f.stats.Xattrs.Add(1)
	if !f.hasXattrs {
		return 0, fuse.ENOSYS
	}
	i, st := f.inode(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	v, err := i.Getxattr(attr)
	if err != nil {
		return 0, fuse.ENOATTR
	}
	if len(dest) < len(v) {
		return uint32(len(v)), fuse.ERANGE
	}
	return uint32(copy(dest, v)), fuse.OK
}

// ListXAttr implements fuse.RawFileSystem.
func (f *FS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	if !f.hasXattrs {
		return 0, fuse.ENOSYS
	}
	i, st := f.inode(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	n := 0
	for _, x := range i.Xattrs {
		n += len(x.Name) + 1
	}
	if len(dest) < n {
		return uint32(n), fuse.ERANGE
	}
	p := dest[:0]
	for _, x := range i.Xattrs {
		p = append(p, x.Name...)
		p = append(p, 0)
	}
	return uint32(n), fuse.OK
}

// StatFs implements fuse.RawFileSystem.
func (f *FS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	var size uint64
	for _, i := range f.img.Inodes {
		if i.IsRegular() {
			size += (i.Size + 4095) / 4096
		}
	}
	*out = fuse.StatfsOut{
		Blocks:  size,
		Files:   uint64(len(f.img.Inodes)),
		Bsize:   4096,
		Frsize:  4096,
		NameLen: 255,
	}
	return fuse.OK
}

// The image is read-only: every modifying operation fails with EROFS.

// SetAttr implements fuse.RawFileSystem.
func (f *FS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	return fuse.EROFS
}

// Mknod implements fuse.RawFileSystem.
func (f *FS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}

// Mkdir implements fuse.RawFileSystem.
func (f *FS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}

// Unlink implements fuse.RawFileSystem.
func (f *FS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fuse.EROFS
}

// Rmdir implements fuse.RawFileSystem.
func (f *FS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fuse.EROFS
}

// Rename implements fuse.RawFileSystem.
func (f *FS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return fuse.EROFS
}

// Link implements fuse.RawFileSystem.
func (f *FS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}

// Symlink implements fuse.RawFileSystem.
func (f *FS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}

// SetXAttr implements fuse.RawFileSystem.
func (f *FS) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	return fuse.EROFS
}

// RemoveXAttr implements fuse.RawFileSystem.
func (f *FS) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	return fuse.EROFS
}

// Create implements fuse.RawFileSystem.
func (f *FS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return fuse.EROFS
}

// Tmpfile implements fuse.RawFileSystem.
func (f *FS) Tmpfile(cancel <-chan struct{}, in *fuse.CreateIn, out *fuse.CreateOut) fuse.Status {
	return fuse.EROFS
}

// Write implements fuse.RawFileSystem.
func (f *FS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	return 0, fuse.EROFS
}

// Writev implements fuse.RawFileSystem.
func (f *FS) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	return 0, fuse.EROFS
}

// CopyFileRange implements fuse.RawFileSystem.
func (f *FS) CopyFileRange(cancel <-chan struct{}, in *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	return 0, fuse.EROFS
}

// Fallocate implements fuse.RawFileSystem.
func (f *FS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	return fuse.EROFS
}

// Ioctl implements fuse.RawFileSystem.
func (f *FS) Ioctl(cancel <-chan struct{}, in *fuse.IoctlIn, inbuf []byte, out *fuse.IoctlOut, outbuf []byte) fuse.Status {
	return fuse.ENOSYS
}

// GetLk implements fuse.RawFileSystem; the kernel does local locking.
func (f *FS) GetLk(cancel <-chan struct{}, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	return fuse.ENOSYS
}

// SetLk implements fuse.RawFileSystem.
func (f *FS) SetLk(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status { return fuse.ENOSYS }

// SetLkw implements fuse.RawFileSystem.
func (f *FS) SetLkw(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status { return fuse.ENOSYS }

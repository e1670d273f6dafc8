package builder

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
)

// AddDir reads the layer from directory dir (nydus-image --type
// dir-rafs): every file, with mode, owner, times (ns), xattrs, hardlinks
// (same device and inode), symlinks, devices, fifos and sockets. The
// directory's own attributes become the root's. Whiteouts in the tree act
// on the parent image, if any, and are left out otherwise.
func (b *Builder) AddDir(ctx context.Context, dir string) error {
	r := &dirReader{b: b, links: map[[2]uint64]*node{}, buf: make([]byte, b.opts.ChunkSize)}
	if b.closed {
		return errors.New("builder: already finished or failed")
	}
	// Like nydus-image, store the prefetched files' data first, so that
	// prefetching reads the head of the blob.
	for _, p := range b.opts.Prefetch {
		if !beneath(dir, p) {
			continue
		}
		if err := r.preload(ctx, filepath.Join(dir, filepath.Clean("/"+p))); err != nil {
			return b.abort(err)
		}
	}
	root, err := r.node(ctx, dir)
	if err != nil {
		return b.abort(err)
	}
	if !root.isDir() {
		return b.abort(fmt.Errorf("builder: %s is not a directory", dir))
	}
	if !b.base {
		// As nydus-image does for a directory layer without a parent
		// (a tar layer keeps them, for a later merge).
		dropMarkers(root, b.opts.Whiteouts)
	}
	return b.addLayer(root)
}

type dirReader struct {
	b *Builder
	// links maps (device, inode) to the node of files already read:
	// hardlinks, and files preloaded for prefetch.
	links      map[[2]uint64]*node
	preloading bool
	buf        []byte
}

func (r *dirReader) node(ctx context.Context, p string) (*node, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, fmt.Errorf("builder: %w", &os.PathError{Op: "lstat", Path: p, Err: err})
	}
	typ := st.Mode & syscall.S_IFMT
	key := [2]uint64{st.Dev, st.Ino}
	if typ != syscall.S_IFDIR {
		if n, ok := r.links[key]; ok {
			return n, nil
		}
	}
	n := &node{
		mode: st.Mode, uid: st.Uid, gid: st.Gid,
		mtime: st.Mtim.Sec, mtimeNsec: uint32(st.Mtim.Nsec),
	}
	xattrs, err := readXattrs(p)
	if err != nil {
		return nil, err
	}
	n.xattrs = xattrs
	switch typ {
	case syscall.S_IFDIR:
		n.children = map[string]*node{}
		names, err := readDirNames(p)
		if err != nil {
			return nil, err
		}
		for _, name := range names {
			c, err := r.node(ctx, filepath.Join(p, name))
			if err != nil {
				return nil, err
			}
			n.children[name] = c
		}
	case syscall.S_IFREG:
		f, err := os.Open(p)
		if err != nil {
			return nil, fmt.Errorf("builder: %w", err)
		}
		n.size = uint64(st.Size)
		n.chunks, err = r.b.readChunks(ctx, f, st.Size, r.buf)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("builder: %s: %w", p, err)
		}
	case syscall.S_IFLNK:
		t, err := os.Readlink(p)
		if err != nil {
			return nil, fmt.Errorf("builder: %w", err)
		}
		n.target = t
	case syscall.S_IFCHR, syscall.S_IFBLK:
		n.rdev = st.Rdev
	}
	if typ != syscall.S_IFDIR && (st.Nlink > 1 || r.preloading) {
		r.links[key] = n
	}
	return n, nil
}

// beneath reports whether p (slash-separated, relative to dir) resolves
// without following a symlink: a prefetch path through a symlink would
// preload files from outside the tree.
func beneath(dir, p string) bool {
	cur := dir
	parts := strings.Split(strings.Trim(filepath.Clean("/"+p), "/"), "/")
	for _, part := range parts[:len(parts)-1] {
		cur = filepath.Join(cur, part)
		var st unix.Stat_t
		if unix.Lstat(cur, &st) != nil || st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
			return false
		}
	}
	return true
}

// preload reads the regular files at or below p ahead of the tree walk,
// which then finds them in r.links. Missing paths are skipped, as
// nydus-image skips prefetch entries that are not in the image.
func (r *dirReader) preload(ctx context.Context, p string) error {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil
	}
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		r.preloading = true
		_, err := r.node(ctx, p)
		r.preloading = false
		return err
	case syscall.S_IFDIR:
		names, err := readDirNames(p)
		if err != nil {
			return err
		}
		for _, name := range names {
			if err := r.preload(ctx, filepath.Join(p, name)); err != nil {
				return err
			}
		}
	}
	return nil
}

func readDirNames(p string) ([]string, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("builder: %w", err)
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("builder: read directory %s: %w", p, err)
	}
	sort.Strings(names)
	return names, nil
}

// readXattrs returns a file's extended attributes (not following
// symlinks), sorted by name so that builds are reproducible.
func readXattrs(p string) ([]rafs.Xattr, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		return nil, fmt.Errorf("builder: llistxattr %s: %w", p, err)
	}
	if size == 0 {
		return nil, nil
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, fmt.Errorf("builder: llistxattr %s: %w", p, err)
	}
	var names []string
	for _, name := range strings.Split(string(buf[:size]), "\x00") {
		if name != "" {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	var out []rafs.Xattr
	for _, name := range names {
		vsize, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			if errors.Is(err, unix.ENODATA) {
				continue // removed meanwhile
			}
			return nil, fmt.Errorf("builder: lgetxattr %s %s: %w", p, name, err)
		}
		val := make([]byte, vsize)
		if vsize > 0 {
			vsize, err = unix.Lgetxattr(p, name, val)
			if err != nil {
				return nil, fmt.Errorf("builder: lgetxattr %s %s: %w", p, name, err)
			}
		}
		out = append(out, rafs.Xattr{Name: name, Value: val[:vsize]})
	}
	return out, nil
}

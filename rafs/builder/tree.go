package builder

import (
	"fmt"
	"sort"
	"strings"
	"syscall"

	"github.com/rafsd/rafsd/rafs"
)

// OCI whiteout markers (image-spec layer.md).
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// node is an inode of a tree being built. Hardlinks are one node under
// several names; a directory's children map names to nodes.
type node struct {
	mode      uint32
	uid, gid  uint32
	mtime     int64
	mtimeNsec uint32
	rdev      uint64
	size      uint64
	target    string
	xattrs    []rafs.Xattr
	chunks    []rafs.FileChunk
	children  map[string]*node
}

func newDir(mode uint32) *node {
	return &node{mode: syscall.S_IFDIR | mode&07777, children: map[string]*node{}}
}

func (n *node) isDir() bool { return n.mode&syscall.S_IFMT == syscall.S_IFDIR }

// setAttrs copies the attributes (not children or data) of src into n.
func (n *node) setAttrs(src *node) {
	n.mode, n.uid, n.gid = src.mode, src.uid, src.gid
	n.mtime, n.mtimeNsec, n.rdev = src.mtime, src.mtimeNsec, src.rdev
	n.xattrs = src.xattrs
}

func sortedNames(m map[string]*node) []string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// WhiteoutSpec says how a layer marks deletions (nydus-image
// --whiteout-spec).
type WhiteoutSpec int

const (
	// WhiteoutOCI: ".wh.NAME" files delete NAME, ".wh..wh..opq" makes its
	// directory opaque (OCI image-spec; the default).
	WhiteoutOCI WhiteoutSpec = iota
	// WhiteoutOverlayfs: a 0/0 character device deletes its name, and the
	// xattr trusted.overlay.opaque="y" makes a directory opaque (an
	// overlayfs upper directory).
	WhiteoutOverlayfs
	// WhiteoutNone: no entry is special.
	WhiteoutNone
)

// ParseWhiteoutSpec parses "oci", "overlayfs" or "none".
func ParseWhiteoutSpec(s string) (WhiteoutSpec, error) {
	switch s {
	case "oci", "":
		return WhiteoutOCI, nil
	case "overlayfs":
		return WhiteoutOverlayfs, nil
	case "none":
		return WhiteoutNone, nil
	}
	return 0, fmt.Errorf("whiteout spec %q: want oci, overlayfs or none", s)
}

const overlayOpaqueXattr = "trusted.overlay.opaque"

// whiteout reports whether entry name (node n) of a layer deletes
// something below, and which name.
func (ws WhiteoutSpec) whiteout(name string, n *node) (string, bool) {
	switch ws {
	case WhiteoutOCI:
		if name != opaqueMarker && strings.HasPrefix(name, whiteoutPrefix) {
			return name[len(whiteoutPrefix):], true
		}
	case WhiteoutOverlayfs:
		if n.mode&syscall.S_IFMT == syscall.S_IFCHR && n.rdev == 0 {
			return name, true
		}
	}
	return "", false
}

// marker reports whether an entry is a whiteout or opaque marker, which
// never appears in a merged tree.
func (ws WhiteoutSpec) marker(name string, n *node) bool {
	if ws == WhiteoutOCI && name == opaqueMarker {
		return true
	}
	_, ok := ws.whiteout(name, n)
	return ok
}

// opaque reports whether directory d hides everything below it, and
// removes the overlayfs xattr saying so.
func (ws WhiteoutSpec) opaque(d *node) bool {
	switch ws {
	case WhiteoutOCI:
		_, ok := d.children[opaqueMarker]
		return ok
	case WhiteoutOverlayfs:
		for k, x := range d.xattrs {
			if x.Name == overlayOpaqueXattr {
				d.xattrs = append(d.xattrs[:k:k], d.xattrs[k+1:]...)
				return string(x.Value) == "y"
			}
		}
	}
	return false
}

// applyLayer lays directory upper (one layer, whiteouts included) over
// lower with overlayfs semantics, modifying lower:
//   - an opaque directory hides everything below it in lower;
//   - a whiteout removes its name from lower;
//   - a directory over a directory merges (taking the upper's attributes);
//     anything else replaces.
//
// Whiteouts only act on lower layers, so they are applied before the
// layer's own entries, and never survive into the result.
func applyLayer(lower, upper *node, ws WhiteoutSpec) {
	if ws.opaque(upper) {
		clear(lower.children)
	}
	// After opaque, which drops the overlayfs opaque xattr.
	lower.setAttrs(upper)
	names := sortedNames(upper.children)
	for _, name := range names {
		if target, ok := ws.whiteout(name, upper.children[name]); ok {
			delete(lower.children, target)
		}
	}
	for _, name := range names {
		u := upper.children[name]
		if ws.marker(name, u) {
			continue
		}
		l := lower.children[name]
		if l != nil && l.isDir() && u.isDir() {
			applyLayer(l, u, ws)
			continue
		}
		if u.isDir() {
			stripWhiteouts(u, ws)
		}
		lower.children[name] = u
	}
}

// stripWhiteouts removes whiteout and opaque markers from a directory
// that has nothing below it to hide.
func stripWhiteouts(d *node, ws WhiteoutSpec) {
	ws.opaque(d)
	for name, c := range d.children {
		if ws.marker(name, c) {
			delete(d.children, name)
		} else if c.isDir() {
			stripWhiteouts(c, ws)
		}
	}
}

// dropMarkers removes whiteout and opaque marker entries (not the
// overlayfs opaque xattr) below d: nydus-image leaves them out of a
// directory layer built without a parent.
func dropMarkers(d *node, ws WhiteoutSpec) {
	for name, c := range d.children {
		if ws.marker(name, c) {
			delete(d.children, name)
		} else if c.isDir() {
			dropMarkers(c, ws)
		}
	}
}

// fromImage turns img into a tree whose chunks point into the blob table
// through blobIndex (img's blob index -> index in the caller's table).
func fromImage(img *rafs.Image, blobIndex []uint32) (*node, error) {
	nodes := make([]*node, len(img.Inodes))
	remapped := map[*rafs.Chunk]*rafs.Chunk{}
	for k, i := range img.Inodes {
		n := &node{
			mode: i.Mode, uid: i.UID, gid: i.GID, mtime: i.Mtime, mtimeNsec: i.MtimeNsec,
			rdev: i.Rdev, size: i.Size, target: i.Target, xattrs: i.Xattrs,
		}
		if i.IsDir() {
			n.children = make(map[string]*node, len(i.Entries))
			n.size = 0
		}
		for _, fc := range i.Chunks {
			c, ok := remapped[fc.Chunk]
			if !ok {
				if int(fc.BlobIndex) >= len(blobIndex) {
					return nil, fmt.Errorf("inode %d: blob index %d out of range", i.Ino, fc.BlobIndex)
				}
				cc := *fc.Chunk
				cc.BlobIndex = blobIndex[fc.BlobIndex]
				c = &cc
				remapped[fc.Chunk] = c
			}
			n.chunks = append(n.chunks, rafs.FileChunk{FileOffset: fc.FileOffset, Chunk: c})
		}
		nodes[k] = n
	}
	for k, i := range img.Inodes {
		for _, e := range i.Entries {
			if e.Ino == 0 || e.Ino > uint64(len(nodes)) {
				return nil, fmt.Errorf("inode %d: entry %q: bad inode %d", i.Ino, e.Name, e.Ino)
			}
			nodes[k].children[e.Name] = nodes[e.Ino-1]
		}
	}
	return nodes[rafs.RootIno-1], nil
}

// toInodes numbers the tree breadth-first from the root (directories'
// children in name order; a hardlinked node gets the number of its first
// name) and returns the dense inode table.
func toInodes(root *node) ([]*rafs.Inode, map[*node]uint64) {
	ino := map[*node]uint64{root: rafs.RootIno}
	names := map[*node]uint32{}
	out := []*rafs.Inode{{Ino: rafs.RootIno, Parent: rafs.RootIno}}
	order := []*node{root}
	for q := 0; q < len(order); q++ {
		d := order[q]
		di := out[q]
		if !d.isDir() {
			continue
		}
		for _, name := range sortedNames(d.children) {
			c := d.children[name]
			n, ok := ino[c]
			if !ok {
				n = uint64(len(out) + 1)
				ino[c] = n
				out = append(out, &rafs.Inode{Ino: n, Parent: di.Ino})
				order = append(order, c)
			}
			names[c]++
			di.Entries = append(di.Entries, rafs.Dirent{Name: name, Ino: n})
		}
	}
	for k, n := range order {
		i := out[k]
		i.Mode, i.UID, i.GID = n.mode, n.uid, n.gid
		i.Mtime, i.MtimeNsec, i.Rdev = n.mtime, n.mtimeNsec, n.rdev
		i.Target, i.Xattrs, i.Chunks = n.target, n.xattrs, n.chunks
		switch {
		case n.isDir():
			i.Nlink = 2
			for _, e := range i.Entries {
				if order[e.Ino-1].isDir() {
					i.Nlink++
				}
			}
		case n.mode&syscall.S_IFMT == syscall.S_IFLNK:
			i.Size = uint64(len(n.target))
			i.Nlink = names[n]
		default:
			i.Size = n.size
			i.Nlink = names[n]
		}
	}
	return out, ino
}

// lookupPath finds a slash-separated path in the tree.
func lookupPath(root *node, p string) *node {
	n := root
	for _, part := range strings.Split(strings.Trim(p, "/"), "/") {
		if part == "" {
			continue
		}
		if !n.isDir() {
			return nil
		}
		if n = n.children[part]; n == nil {
			return nil
		}
	}
	return n
}

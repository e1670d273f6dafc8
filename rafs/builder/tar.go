package builder

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"syscall"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
)

// ErrTar is wrapped by errors about malformed layer tars.
var ErrTar = errors.New("bad layer tar")

// Decompress returns r uncompressed, sniffing gzip and zstd by their magic
// bytes; anything else is passed through as a plain tar.
func Decompress(r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("%w: gzip: %v", ErrTar, err)
		}
		return zr, nil
	case bytes.Equal(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<27))
		if err != nil {
			return nil, fmt.Errorf("%w: zstd: %v", ErrTar, err)
		}
		return zr.IOReadCloser(), nil
	}
	return io.NopCloser(br), nil
}

// AddTar reads the layer from an OCI layer tar stream (nydus-image --type
// tar-rafs), plain, gzip or zstd compressed. It honours PAX records
// (SCHILY.xattr.* xattrs, ns mtimes, long names), GNU and PAX sparse files,
// hardlinks and every entry type a layer may hold; missing parent
// directories are created. Whiteouts (.wh.NAME, .wh..wh..opq) act on the
// parent image, if any, and are kept in the image otherwise, so that a
// later Merge can apply them.
func (b *Builder) AddTar(ctx context.Context, r io.Reader) error {
	if b.closed {
		return errors.New("builder: already finished or failed")
	}
	if err := b.addTar(ctx, r); err != nil {
		return b.abort(err)
	}
	return nil
}

func (b *Builder) addTar(ctx context.Context, r io.Reader) error {
	dr, err := Decompress(r)
	if err != nil {
		return err
	}
	defer dr.Close()
	root := newDir(0o755)
	var src io.Reader = dr
	if b.z != nil {
		b.z.pos = &countingReader{r: dr}
		src = b.z.pos
	}
	tr := tar.NewReader(src)
	buf := make([]byte, b.opts.ChunkSize)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrTar, err)
		}
		name, err := cleanTarPath(hdr.Name)
		if err != nil {
			return err
		}
		if name == "" {
			if hdr.Typeflag != tar.TypeDir {
				return fmt.Errorf("%w: root entry %q is not a directory", ErrTar, hdr.Name)
			}
			n, err := tarNode(hdr)
			if err != nil {
				return err
			}
			root.setAttrs(n)
			continue
		}
		dir, base := path.Split(name)
		parent, err := mkdirAll(root, dir)
		if err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeLink {
			target, err := cleanTarPath(hdr.Linkname)
			if err != nil {
				return err
			}
			t := lookupPath(root, target)
			if t == nil || target == "" {
				return fmt.Errorf("%w: hardlink %q to %q: target not found earlier in the layer", ErrTar, hdr.Name, hdr.Linkname)
			}
			if t.isDir() {
				return fmt.Errorf("%w: hardlink %q to directory %q", ErrTar, hdr.Name, hdr.Linkname)
			}
			parent.children[base] = t
			continue
		}
		n, err := tarNode(hdr)
		if err != nil {
			return err
		}
		if n.mode&syscall.S_IFMT == syscall.S_IFREG {
			if b.z != nil && sparse(hdr) {
				return fmt.Errorf("%w: %s: sparse files cannot reference the layer (zran)", ErrTar, hdr.Name)
			}
			n.size = uint64(hdr.Size)
			n.chunks, err = b.readChunks(ctx, tr, hdr.Size, buf)
			if err != nil {
				return fmt.Errorf("%w: %s: %v", ErrTar, hdr.Name, err)
			}
		}
		if old, ok := parent.children[base]; ok && old.isDir() && n.isDir() {
			// A directory listed after its contents (or twice): keep the
			// contents, take the attributes.
			old.setAttrs(n)
			continue
		}
		parent.children[base] = n
	}
	return b.addLayer(root)
}

// cleanTarPath turns a tar member name into a clean relative path ("" is
// the root). Names escaping the root are refused.
func cleanTarPath(p string) (string, error) {
	if len(p) > 4096 {
		// PATH_MAX: nothing longer can be created or looked up on Linux.
		return "", fmt.Errorf("%w: name of %d bytes is longer than PATH_MAX", ErrTar, len(p))
	}
	c := path.Clean("/" + p)
	if strings.Contains(p, "\x00") {
		return "", fmt.Errorf("%w: name %q contains NUL", ErrTar, p)
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return "", fmt.Errorf("%w: name %q escapes the root", ErrTar, p)
		}
	}
	c = strings.TrimPrefix(c, "/")
	for _, part := range strings.Split(c, "/") {
		if len(part) > 255 {
			return "", fmt.Errorf("%w: name %.40q... has a component longer than 255 bytes", ErrTar, p)
		}
	}
	return c, nil
}

// mkdirAll returns directory dir of the layer, creating missing ones (as
// 0755 root-owned, like tar extractors do). A non-directory in the way is
// replaced, as a later entry would replace it on extraction.
func mkdirAll(root *node, dir string) (*node, error) {
	n := root
	for _, part := range strings.Split(strings.Trim(dir, "/"), "/") {
		if part == "" {
			continue
		}
		c := n.children[part]
		if c == nil || !c.isDir() {
			c = newDir(0o755)
			n.children[part] = c
		}
		n = c
	}
	return n, nil
}

func tarNode(hdr *tar.Header) (*node, error) {
	n := &node{
		uid: uint32(hdr.Uid), gid: uint32(hdr.Gid),
		mtime: hdr.ModTime.Unix(), mtimeNsec: uint32(hdr.ModTime.Nanosecond()),
	}
	if hdr.Uid < 0 || hdr.Gid < 0 || int64(hdr.Uid) > 1<<32-1 || int64(hdr.Gid) > 1<<32-1 {
		return nil, fmt.Errorf("%w: %s: uid/gid %d/%d", ErrTar, hdr.Name, hdr.Uid, hdr.Gid)
	}
	perm := uint32(hdr.Mode) & 07777
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeRegA, tar.TypeGNUSparse:
		n.mode = syscall.S_IFREG | perm
		if hdr.Size < 0 || hdr.Size > rafs.MaxFileSize {
			return nil, fmt.Errorf("%w: %s: size %d", ErrTar, hdr.Name, hdr.Size)
		}
	case tar.TypeDir:
		n.mode = syscall.S_IFDIR | perm
		n.children = map[string]*node{}
	case tar.TypeSymlink:
		n.mode = syscall.S_IFLNK | 0o777
		if hdr.Linkname == "" || len(hdr.Linkname) > 4095 {
			return nil, fmt.Errorf("%w: %s: symlink target of %d bytes", ErrTar, hdr.Name, len(hdr.Linkname))
		}
		n.target = hdr.Linkname
	case tar.TypeChar, tar.TypeBlock:
		n.mode = syscall.S_IFCHR
		if hdr.Typeflag == tar.TypeBlock {
			n.mode = syscall.S_IFBLK
		}
		n.mode |= perm
		if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 1<<32-1 || hdr.Devminor > 1<<32-1 {
			return nil, fmt.Errorf("%w: %s: device %d:%d", ErrTar, hdr.Name, hdr.Devmajor, hdr.Devminor)
		}
		n.rdev = unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
	case tar.TypeFifo:
		n.mode = syscall.S_IFIFO | perm
	default:
		return nil, fmt.Errorf("%w: %s: unsupported entry type %q", ErrTar, hdr.Name, hdr.Typeflag)
	}
	var names []string
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			names = append(names, k)
		}
	}
	sort.Strings(names)
	for _, k := range names {
		name := strings.TrimPrefix(k, "SCHILY.xattr.")
		if name == "" || len(name) > 255 {
			return nil, fmt.Errorf("%w: %s: xattr name %.40q", ErrTar, hdr.Name, name)
		}
		n.xattrs = append(n.xattrs, rafs.Xattr{Name: name, Value: []byte(hdr.PAXRecords[k])})
	}
	return n, nil
}

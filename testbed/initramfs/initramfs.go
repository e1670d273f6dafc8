// Package initramfs writes Linux initramfs archives: the cpio "newc" format
// (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst),
// gzip compressed, as the testbed boots them.
package initramfs

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
)

// Writer writes a cpio newc archive. Parent directories of every entry are
// created on the way (mode 0755), so callers only name what they care about.
type Writer struct {
	w    io.Writer
	ino  uint32
	seen map[string]bool
	err  error
}

// NewWriter returns a Writer on w. Close writes the trailer.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: w, seen: map[string]bool{}}
}

const (
	modeDir  = 0o040000
	modeFile = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
)

// clean turns a path into the archive's form: relative, no "." or "..".
func clean(p string) (string, error) {
	c := strings.TrimPrefix(path.Clean("/"+p), "/")
	if c == "" {
		return "", fmt.Errorf("initramfs: bad path %q", p)
	}
	return c, nil
}

func (w *Writer) header(name string, mode uint32, size int64, rmaj, rmin uint32) error {
	if w.err != nil {
		return w.err
	}
	if size < 0 || size > 0xffffffff {
		return fmt.Errorf("initramfs: %s: size %d does not fit newc", name, size)
	}
	w.ino++
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		w.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name)+1, 0)
	if _, err := io.WriteString(w.w, hdr+name+"\x00"); err != nil {
		w.err = fmt.Errorf("initramfs: %w", err)
		return w.err
	}
	return w.pad(int64(len(hdr) + len(name) + 1))
}

func (w *Writer) pad(n int64) error {
	if r := n % 4; r != 0 {
		if _, err := w.w.Write(make([]byte, 4-r)); err != nil {
			w.err = fmt.Errorf("initramfs: %w", err)
			return w.err
		}
	}
	return nil
}

func (w *Writer) parents(name string) error {
	dir := path.Dir(name)
	if dir == "." || w.seen[dir] {
		return nil
	}
	if err := w.parents(dir); err != nil {
		return err
	}
	w.seen[dir] = true
	return w.header(dir, modeDir|0o755, 0, 0, 0)
}

func (w *Writer) begin(p string) (string, error) {
	name, err := clean(p)
	if err != nil {
		return "", err
	}
	if w.seen[name] {
		return "", fmt.Errorf("initramfs: duplicate entry %s", name)
	}
	if err := w.parents(name); err != nil {
		return "", err
	}
	w.seen[name] = true
	return name, nil
}

// Dir adds a directory.
func (w *Writer) Dir(p string, perm fs.FileMode) error {
	name, err := w.begin(p)
	if err != nil {
		return err
	}
	return w.header(name, modeDir|uint32(perm.Perm()), 0, 0, 0)
}

// File adds a regular file with the given content.
func (w *Writer) File(p string, perm fs.FileMode, data []byte) error {
	name, err := w.begin(p)
	if err != nil {
		return err
	}
	if err := w.header(name, modeFile|uint32(perm&0o7777), int64(len(data)), 0, 0); err != nil {
		return err
	}
	if _, err := w.w.Write(data); err != nil {
		w.err = fmt.Errorf("initramfs: %s: %w", name, err)
		return w.err
	}
	return w.pad(int64(len(data)))
}

// CopyFile adds a regular file with the content of the host file src.
func (w *Writer) CopyFile(p string, perm fs.FileMode, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("initramfs: %s is not a regular file", src)
	}
	name, err := w.begin(p)
	if err != nil {
		return err
	}
	if err := w.header(name, modeFile|uint32(perm&0o7777), fi.Size(), 0, 0); err != nil {
		return err
	}
	n, err := io.Copy(w.w, io.LimitReader(f, fi.Size()))
	if err == nil && n != fi.Size() {
		err = fmt.Errorf("%s shrank while copying", src)
	}
	if err != nil {
		w.err = fmt.Errorf("initramfs: %s: %w", name, err)
		return w.err
	}
	return w.pad(n)
}

// Symlink adds a symbolic link.
func (w *Writer) Symlink(p, target string) error {
	name, err := w.begin(p)
	if err != nil {
		return err
	}
	if err := w.header(name, modeLink|0o777, int64(len(target)), 0, 0); err != nil {
		return err
	}
	if _, err := io.WriteString(w.w, target); err != nil {
		w.err = fmt.Errorf("initramfs: %w", err)
		return w.err
	}
	return w.pad(int64(len(target)))
}

// CharDev adds a character device node.
func (w *Writer) CharDev(p string, perm fs.FileMode, major, minor uint32) error {
	name, err := w.begin(p)
	if err != nil {
		return err
	}
	return w.header(name, modeChr|uint32(perm.Perm()), 0, major, minor)
}

// Close writes the trailer. It does not close the underlying writer.
func (w *Writer) Close() error {
	if err := w.header("TRAILER!!!", 0, 0, 0, 0); err != nil {
		return err
	}
	return nil
}

// File is an extra file to put in an initramfs: either the content of the
// host file Source or Data.
type File struct {
	Path   string      // path in the guest, e.g. "/bin/rafsd"
	Source string      // host file to copy; empty: use Data
	Data   []byte      // content when Source is empty
	Mode   fs.FileMode // permission bits; 0: 0755 for Source, 0644 for Data
}

// Build writes a gzip-compressed initramfs whose /init is the host file
// init, with the directories a minimal system needs, /dev/console and
// /dev/null (the kernel opens /dev/console for init before any devtmpfs is
// mounted), and the extra files.
func Build(out io.Writer, init string, extra []File) error {
	zw, err := gzip.NewWriterLevel(out, gzip.BestSpeed)
	if err != nil {
		return err
	}
	w := NewWriter(zw)
	for _, d := range []string{"/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/mnt", "/var"} {
		if err := w.Dir(d, 0o755); err != nil {
			return err
		}
	}
	if err := w.CharDev("/dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	if err := w.CharDev("/dev/null", 0o666, 1, 3); err != nil {
		return err
	}
	if err := w.CopyFile("/init", 0o755, init); err != nil {
		return err
	}
	for _, f := range extra {
		mode := f.Mode
		switch {
		case f.Source != "":
			if mode == 0 {
				mode = 0o755
			}
			err = w.CopyFile(f.Path, mode, f.Source)
		default:
			if mode == 0 {
				mode = 0o644
			}
			err = w.File(f.Path, mode, f.Data)
		}
		if err != nil {
			return err
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return nil
}

// ErrNoInit is returned by BuildFile when init is empty.
var ErrNoInit = errors.New("initramfs: no init")

// BuildFile writes Build's output to the file dst.
func BuildFile(dst, init string, extra []File) error {
	if init == "" {
		return ErrNoInit
	}
	f, err := os.Create(dst)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if err := Build(f, init, extra); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return nil
}

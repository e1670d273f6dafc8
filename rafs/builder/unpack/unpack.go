// Package unpack writes a RAFS image's tree out as a directory or a tar
// stream (nydus-image unpack), reading file data through a
// rafs.ChunkReader so that every chunk is digest-checked.
package unpack

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
)

// copyBuf is the read size for file data: a few chunks at a time.
const copyBuf = 4 << 20

// ToDir recreates img under dir (which must exist and should be empty):
// contents, modes, owners, ns mtimes, xattrs, hardlinks, symlinks,
// devices and fifos. Holes stay holes. Must run as root to set owners and
// create devices. Files are written by one worker per CPU.
func ToDir(ctx context.Context, img *rafs.Image, cr rafs.ChunkReader, dir string) error {
	type dirAttrs struct {
		path string
		i    *rafs.Inode
	}
	type fileJob struct {
		path, rel string
		i         *rafs.Inode
	}
	var (
		dirs  []dirAttrs
		links [][2]string // (existing first name, new name)
		first = map[uint64]string{}
		jobs  = make(chan fileJob, 64)
		wg    sync.WaitGroup
		errMu sync.Mutex
		ferr  error
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fail := func(err error) {
		errMu.Lock()
		if ferr == nil {
			ferr = err
			cancel()
		}
		errMu.Unlock()
	}
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, copyBuf)
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				if err := create(ctx, img, cr, j.i, j.path, buf); err != nil {
					fail(fmt.Errorf("unpack %s: %w", j.rel, err))
					continue
				}
				if err := setAttrs(j.path, j.i); err != nil {
					fail(err)
				}
			}
		}()
	}
	err := img.Walk(func(p string, i *rafs.Inode) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		dst := filepath.Join(dir, filepath.FromSlash(p))
		if i.IsDir() {
			if p != "/" {
				if err := os.Mkdir(dst, 0o700); err != nil {
					return fmt.Errorf("unpack: %w", err)
				}
			}
			dirs = append(dirs, dirAttrs{dst, i})
			return nil
		}
		if f, ok := first[i.Ino]; ok {
			links = append(links, [2]string{f, dst})
			return nil
		}
		first[i.Ino] = dst
		jobs <- fileJob{dst, p, i}
		return nil
	})
	close(jobs)
	wg.Wait()
	if ferr != nil {
		return ferr
	}
	if err != nil {
		return err
	}
	// Hardlinks once their first names exist.
	for _, l := range links {
		if err := os.Link(l[0], l[1]); err != nil {
			return fmt.Errorf("unpack: hardlink: %w", err)
		}
	}
	// Directories last, deepest first, so that creating their entries
	// does not change their mtime and a read-only mode does not lock us out.
	for k := len(dirs) - 1; k >= 0; k-- {
		if err := setAttrs(dirs[k].path, dirs[k].i); err != nil {
			return err
		}
	}
	return nil
}

func create(ctx context.Context, img *rafs.Image, cr rafs.ChunkReader, i *rafs.Inode, dst string, buf []byte) error {
	switch i.Mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		if err := writeFile(ctx, img, cr, i, f, buf); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	case syscall.S_IFLNK:
		return os.Symlink(i.Target, dst)
	default:
		return unix.Mknod(dst, i.Mode, int(i.Rdev))
	}
}

// writeFile copies a file's data, skipping holes so that sparse files stay
// sparse.
func writeFile(ctx context.Context, img *rafs.Image, cr rafs.ChunkReader, i *rafs.Inode, f *os.File, buf []byte) error {
	for _, fc := range i.Chunks {
		n := int(fc.UncompressedSize)
		for done := 0; done < n; {
			m := min(len(buf), n-done)
			off := int64(fc.FileOffset) + int64(done)
			if _, err := img.ReadAt(ctx, cr, i, buf[:m], off); err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if _, err := f.WriteAt(buf[:m], off); err != nil {
				return err
			}
			done += m
		}
	}
	return f.Truncate(int64(i.Size))
}

func setAttrs(p string, i *rafs.Inode) error {
	if err := unix.Lchown(p, int(i.UID), int(i.GID)); err != nil {
		return fmt.Errorf("unpack: lchown %s: %w", p, err)
	}
	for _, x := range i.Xattrs {
		if err := unix.Lsetxattr(p, x.Name, x.Value, 0); err != nil {
			return fmt.Errorf("unpack: lsetxattr %s %s: %w", p, x.Name, err)
		}
	}
	if !i.IsSymlink() {
		// After chown, which clears setuid/setgid bits.
		if err := unix.Fchmodat(unix.AT_FDCWD, p, i.Mode&07777, 0); err != nil {
			return fmt.Errorf("unpack: chmod %s: %w", p, err)
		}
	}
	ts := []unix.Timespec{{Sec: i.Mtime, Nsec: int64(i.MtimeNsec)}, {Sec: i.Mtime, Nsec: int64(i.MtimeNsec)}}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("unpack: utimes %s: %w", p, err)
	}
	return nil
}

// ToTar writes img as a PAX tar stream (hardlinks as link entries to the
// first name, xattrs as SCHILY.xattr records, ns mtimes).
func ToTar(ctx context.Context, img *rafs.Image, cr rafs.ChunkReader, w io.Writer) error {
	tw := tar.NewWriter(w)
	first := map[uint64]string{}
	err := img.Walk(func(p string, i *rafs.Inode) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		name := strings.TrimPrefix(p, "/")
		if p == "/" {
			name = "."
		}
		hdr := &tar.Header{
			Name:    name,
			Mode:    int64(i.Mode & 07777),
			Uid:     int(i.UID),
			Gid:     int(i.GID),
			ModTime: time.Unix(i.Mtime, int64(i.MtimeNsec)),
			Format:  tar.FormatPAX,
		}
		if len(i.Xattrs) > 0 {
			hdr.PAXRecords = map[string]string{}
			for _, x := range i.Xattrs {
				hdr.PAXRecords["SCHILY.xattr."+x.Name] = string(x.Value)
			}
		}
		if f, ok := first[i.Ino]; ok && !i.IsDir() {
			hdr.Typeflag, hdr.Linkname = tar.TypeLink, f
			return tw.WriteHeader(hdr)
		}
		first[i.Ino] = name
		switch i.Mode & syscall.S_IFMT {
		case syscall.S_IFDIR:
			hdr.Typeflag = tar.TypeDir
			if name != "." {
				hdr.Name += "/"
			}
		case syscall.S_IFREG:
			hdr.Typeflag, hdr.Size = tar.TypeReg, int64(i.Size)
		case syscall.S_IFLNK:
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, i.Target
		case syscall.S_IFCHR, syscall.S_IFBLK:
			hdr.Typeflag = tar.TypeChar
			if i.Mode&syscall.S_IFMT == syscall.S_IFBLK {
				hdr.Typeflag = tar.TypeBlock
			}
			hdr.Devmajor, hdr.Devminor = int64(unix.Major(i.Rdev)), int64(unix.Minor(i.Rdev))
		case syscall.S_IFIFO:
			hdr.Typeflag = tar.TypeFifo
		default:
			return nil // sockets have no tar representation
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("unpack: tar header %s: %w", p, err)
		}
		if i.IsRegular() {
			r := io.NewSectionReader(readerAt{ctx, img, cr, i}, 0, int64(i.Size))
			if _, err := io.CopyBuffer(tw, r, make([]byte, copyBuf)); err != nil {
				return fmt.Errorf("unpack %s: %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

type readerAt struct {
	ctx context.Context
	img *rafs.Image
	cr  rafs.ChunkReader
	i   *rafs.Inode
}

func (r readerAt) ReadAt(p []byte, off int64) (int, error) {
	return r.img.ReadAt(r.ctx, r.cr, r.i, p, off)
}

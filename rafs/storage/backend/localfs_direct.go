package backend

import (
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Blob files are read with O_DIRECT where the filesystem allows it. The
// fetcher keeps what it reads in its own cache (or hands it to a kernel
// cache), so the blob's page cache is waste: filling it costs a page
// allocation and a copy per 4 KiB (measured: a 64 MiB cold read through
// rafsd's fanotify mode spent ~15% of its CPU in that copy), and it evicts
// pages somebody reads. nydusd reads localfs blobs buffered; the bytes
// are the same either way.
//
// O_DIRECT wants the file offset, the length and the buffer's address
// aligned (statx STATX_DIOALIGN: 512 bytes on ext4 here). A read that is
// aligned goes straight into the caller's buffer; any other goes through
// an aligned bounce buffer. A filesystem that refuses O_DIRECT (at open,
// in statx, or with EINVAL on a read) gets buffered reads.

// blobFile is an open blob.
type blobFile struct {
	f *os.File // buffered: Size, and reads when direct I/O is off
	// d is the same file opened with O_DIRECT (nil if refused), read
	// while direct is set; align is the offset and memory alignment it
	// needs.
	d      *os.File
	align  int64
	direct atomic.Bool
}

// directBounce is the most a bounce read covers at once: large enough
// that a stream of small chunks costs few requests, small enough to stay
// in cache while it is copied out.
const directBounce = 1 << 20

// directEnabled is whether new blob files try O_DIRECT (tests turn it off
// to compare).
var directEnabled atomic.Bool

func init() { directEnabled.Store(true) }

func openBlobFile(path string) (*blobFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	bf := &blobFile{f: f}
	if !directEnabled.Load() {
		return bf, nil
	}
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st); err != nil ||
		st.Mask&unix.STATX_DIOALIGN == 0 || st.Dio_offset_align == 0 || st.Dio_mem_align == 0 {
		return bf, nil
	}
	align := int64(max(st.Dio_offset_align, st.Dio_mem_align))
	if align > directBounce || align&(align-1) != 0 {
		return bf, nil
	}
	d, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return bf, nil
	}
	bf.d, bf.align = d, align
	bf.direct.Store(true)
	return bf, nil
}

func (bf *blobFile) Close() error {
	if bf.d != nil {
		bf.d.Close()
	}
	return bf.f.Close()
}

// ReadAt implements io.ReaderAt (as os.File does: io.EOF with a short
// count at the end of the file).
func (bf *blobFile) ReadAt(p []byte, off int64) (int, error) {
	if !bf.direct.Load() {
		return bf.f.ReadAt(p, off)
	}
	r := directReader{bf: bf, pos: off, end: off + int64(len(p))}
	defer r.Close()
	n, err := io.ReadFull(&r, p)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = io.EOF
	}
	return n, err
}

// section returns a reader of [off, off+n): the localfs stream.
func (bf *blobFile) section(off, n int64) io.ReadCloser {
	if !bf.direct.Load() {
		return io.NopCloser(io.NewSectionReader(bf.f, off, n))
	}
	return &directReader{bf: bf, pos: off, end: off + n}
}

// directReader reads [pos, end) of a blob file in order: with O_DIRECT
// into the caller's buffer when the read is aligned, else into an aligned
// bounce buffer (which then serves the reads after it too).
type directReader struct {
	bf       *blobFile
	pos, end int64
	// bounce holds the file's bytes [bpos, bpos+len(have)) not handed
	// out yet (have is a tail of buf).
	buf  *[]byte
	have []byte
}

func (r *directReader) Read(p []byte) (int, error) {
	if r.pos >= r.end {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.end-r.pos)]
	if len(r.have) > 0 {
		n := copy(p, r.have)
		r.have = r.have[n:]
		r.pos += int64(n)
		return n, nil
	}
	if !r.bf.direct.Load() {
		n, err := r.bf.f.ReadAt(p, r.pos)
		r.pos += int64(n)
		if err == io.EOF && n > 0 {
			err = nil
		}
		return n, err
	}
	a := r.bf.align
	if k := int64(len(p)) &^ (a - 1); k > 0 && r.pos&(a-1) == 0 && uintptr(unsafe.Pointer(&p[0]))&uintptr(a-1) == 0 {
		// Aligned: straight into p.
		n, err := r.pread(p[:k], r.pos)
		r.pos += int64(n)
		return n, err
	}
	lo := r.pos &^ (a - 1)
	hi := min((r.end+a-1)&^(a-1), lo+directBounce)
	if r.buf == nil {
		r.buf = getBounce(a)
	}
	b := (*r.buf)[:hi-lo]
	n, err := r.pread(b, lo)
	skip := int(r.pos - lo)
	if n <= skip {
		if err == nil {
			err = io.EOF
		}
		return 0, err
	}
	r.have = b[skip:n]
	k := copy(p, r.have)
	r.have = r.have[k:]
	r.pos += int64(k)
	return k, nil
}

// pread reads b at off with O_DIRECT until b is full or the file ends
// (io.EOF with what was read). EINVAL (the filesystem refuses O_DIRECT
// after all) switches the file to buffered reads and reads b that way.
func (r *directReader) pread(b []byte, off int64) (int, error) {
	var n int
	for n < len(b) {
		k, err := unix.Pread(int(r.bf.d.Fd()), b[n:], off+int64(n))
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EINVAL) && n == 0:
			r.bf.direct.Store(false)
			return r.bf.f.ReadAt(b, off)
		case err != nil:
			return n, &os.PathError{Op: "read", Path: r.bf.d.Name(), Err: err}
		case k == 0:
			return n, io.EOF
		}
		n += k
	}
	return n, nil
}

func (r *directReader) Close() error {
	if r.buf != nil {
		putBounce(r.buf)
		r.buf, r.have = nil, nil
	}
	return nil
}

// bouncePool holds aligned bounce buffers: a fresh one costs page faults,
// which dominate a read this size.
var bouncePool sync.Pool

// maxAlign is the alignment bounce buffers are cut to (any DIOALIGN up to
// a page is a divisor of it).
const maxAlign = 4096

func getBounce(align int64) *[]byte {
	if align <= maxAlign {
		if b, ok := bouncePool.Get().(*[]byte); ok {
			return b
		}
	}
	al := max(align, maxAlign)
	raw := make([]byte, directBounce+int(al))
	skip := int((al - int64(uintptr(unsafe.Pointer(&raw[0])))&(al-1)) & (al - 1))
	b := raw[skip : skip+directBounce : skip+directBounce]
	return &b
}

func putBounce(b *[]byte) {
	if uintptr(unsafe.Pointer(&(*b)[0]))&(maxAlign-1) == 0 {
		bouncePool.Put(b)
	}
}

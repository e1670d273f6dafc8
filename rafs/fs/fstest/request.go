package fstest

import "encoding/binary"

// FUSE opcodes (linux/fuse.h) for building raw requests in fuzz seeds.
const (
	OpLookup      = 1
	OpForget      = 2
	OpGetattr     = 3
	OpSetattr     = 4
	OpReadlink    = 5
	OpSymlink     = 6
	OpMknod       = 8
	OpMkdir       = 9
	OpUnlink      = 10
	OpRmdir       = 11
	OpRename      = 12
	OpLink        = 13
	OpOpen        = 14
	OpRead        = 15
	OpWrite       = 16
	OpStatfs      = 17
	OpRelease     = 18
	OpFsync       = 20
	OpSetxattr    = 21
	OpGetxattr    = 22
	OpListxattr   = 23
	OpRemovexattr = 24
	OpFlush       = 25
	OpInit        = 26
	OpOpendir     = 27
	OpReaddir     = 28
	OpReleasedir  = 29
	OpAccess      = 34
	OpCreate      = 35
	OpInterrupt   = 36
	OpBatchForget = 42
	OpFallocate   = 43
	OpReaddirplus = 44
	OpRename2     = 45
	OpLseek       = 46
)

// InHeaderSize is the size of struct fuse_in_header.
const InHeaderSize = 40

// Request builds one FUSE request: header (unique 1, caller root), then
// the body parts.
func Request(op uint32, node uint64, body ...[]byte) []byte {
	n := InHeaderSize
	for _, b := range body {
		n += len(b)
	}
	p := make([]byte, InHeaderSize, n)
	le := binary.LittleEndian
	le.PutUint32(p[0:], uint32(n))
	le.PutUint32(p[4:], op)
	le.PutUint64(p[8:], 1)
	le.PutUint64(p[16:], node)
	for _, b := range body {
		p = append(p, b...)
	}
	return p
}

// InitRequest is a FUSE_INIT offering protocol 7.41 and every flag.
func InitRequest() []byte {
	return Request(OpInit, 0, U32s(7, 41, 1<<17, 0xffffffff, 0xffffffff), make([]byte, 44))
}

// U32s encodes little-endian uint32s.
func U32s(v ...uint32) []byte {
	p := make([]byte, 4*len(v))
	for k, x := range v {
		binary.LittleEndian.PutUint32(p[4*k:], x)
	}
	return p
}

// U64s encodes little-endian uint64s.
func U64s(v ...uint64) []byte {
	p := make([]byte, 8*len(v))
	for k, x := range v {
		binary.LittleEndian.PutUint64(p[8*k:], x)
	}
	return p
}

// CString is s with a terminating NUL.
func CString(s string) []byte { return append([]byte(s), 0) }

// Concat joins requests into one fuzz input.
func Concat(parts ...[]byte) []byte {
	var out []byte
	for _, r := range parts {
		out = append(out, r...)
	}
	return out
}

// ReadIn is the body of fuse_read_in: fh, offset, size, read_flags,
// lock_owner, flags, padding.
func ReadIn(fh, off uint64, size uint32) []byte {
	return Concat(U64s(fh, off), U32s(size, 0), U64s(0), U32s(0, 0))
}

// SplitRequests cuts a fuzz input into requests, each as long as its
// header says (clipped to what is left), at most max of them.
func SplitRequests(data []byte, max int) [][]byte {
	var out [][]byte
	for len(data) > 0 && len(out) < max {
		l := len(data)
		if l >= 4 {
			if h := int(binary.LittleEndian.Uint32(data)); h > 0 && h < l {
				l = h
			}
		}
		out = append(out, data[:l])
		data = data[l:]
	}
	return out
}

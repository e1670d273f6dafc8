// Package cachefiles is the user-space daemon of the kernel's cachefiles
// on-demand mode (CONFIG_CACHEFILES_ONDEMAND), the backend of EROFS over
// fscache: `mount -t erofs none -o fsid=<id>[,domain_id=<d>] <dir>`.
//
// The daemon opens /dev/cachefiles, configures it ("dir", "tag", "bind
// ondemand") and answers the kernel's messages: OPEN (an object, named by a
// volume key "erofs,<domain or fsid>" and a cookie key, the fsid of an image
// for its bootstrap or a blob id for a data blob, comes with an anonymous fd
// onto its cache file), READ (make a byte range of the object present: the
// daemon writes it through the anon fd and completes the request with
// CACHEFILES_IOC_READ_COMPLETE) and CLOSE. The kernel keeps the bytes in
// its cache files under the cache directory, so a range is asked for once,
// even across daemon restarts.
//
// Images are registered with BindBlob, the body of nydusd's
// `PUT /api/v2/blobs` that nydus-snapshotter sends. Blob objects of one
// domain are shared by every image of the domain that names the blob.
//
// The data path keeps no blob cache of its own: a READ fetches the chunks
// covering the range (whole chunks, so the kernel does not ask again for
// the rest of a chunk) through the shared fetcher (rafs/storage), which
// checks every chunk's digest, and writes them at their uncompressed
// offsets, page-contiguous chunks with one write (the anon fd writes the
// cache file with direct I/O). When a READ continues the previous one of
// its object or starts a file, the file's next chunks (up to a window of
// 4x the READ, at most 2 MiB, never past the file's end) are filled in the
// background after the READ is answered, so a sequential reader's next
// READs find them present (readahead.go). With prefetch enabled in the
// bind config, opening a blob object also fills it in the background
// (prefetch_all, or the bootstrap's prefetch list).
//
// Restart: the kernel lets one process hold /dev/cachefiles, and closing
// it fails every mount on the cache, so a restart hands the still-bound fd
// to the successor (Detach, then New with Config.Device, which sends
// "restore"). The objects' anon fds are closed on the way; the kernel
// re-opens each object (a new OPEN) the next time it needs data from it,
// so mounted filesystems keep working, and reads in the gap wait rather
// than fail. The successor binds the same images again before serving:
// Bindings lists them (rafsd hands both to its supervisor). Serve of an
// adopted device sends "restore" first, so requests a crashed holder had
// read but not answered are delivered again.
//
// Everything the kernel sends is checked before use: a message for an
// unknown object, a truncated message or an out-of-range read gets an error
// reply (or a completed read that the kernel turns into EIO), never a crash.
package cachefiles

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Opcode is a cachefiles message type (enum cachefiles_opcode).
type Opcode uint32

// The message types of include/uapi/linux/cachefiles.h.
const (
	OpOpen  Opcode = 0
	OpClose Opcode = 1
	OpRead  Opcode = 2
)

func (o Opcode) String() string {
	switch o {
	case OpOpen:
		return "OPEN"
	case OpClose:
		return "CLOSE"
	case OpRead:
		return "READ"
	}
	return fmt.Sprintf("opcode(%d)", uint32(o))
}

// Wire sizes of the uapi structs.
const (
	// MsgMaxSize is CACHEFILES_MSG_MAX_SIZE: no message is longer, so a
	// read buffer of this size always fits one.
	MsgMaxSize = 1024
	headerSize = 16 // struct cachefiles_msg without data
	openSize   = 16 // struct cachefiles_open without data
	readSize   = 16 // struct cachefiles_read
)

// ErrBadMsg is wrapped by ParseMsg for every malformed message.
var ErrBadMsg = errors.New("cachefiles: malformed message")

// Msg is one decoded kernel request (struct cachefiles_msg and its payload).
type Msg struct {
	ID       uint32 // msg_id: named in the reply (copen, READ_COMPLETE)
	Opcode   Opcode
	ObjectID uint32 // the kernel's id of the cache file
	Open     *OpenMsg
	Read     *ReadMsg
}

// OpenMsg is the payload of OPEN (struct cachefiles_open).
type OpenMsg struct {
	// VolumeKey is the volume's key without its NUL, e.g. "erofs,<fsid>".
	VolumeKey string
	// CookieKey is the object's key: for EROFS the fsid or a blob id.
	CookieKey string
	// FD is the anonymous fd the kernel installed in the reader's fd table
	// for this object; the daemon owns it from now on.
	FD    uint32
	Flags uint32
}

// ReadMsg is the payload of READ (struct cachefiles_read).
type ReadMsg struct {
	Off, Len uint64
}

// ParseMsg decodes one message as returned by a read of /dev/cachefiles.
// It trusts nothing: the header's len must equal len(b), payloads must fit,
// key sizes must add up, and read ranges must not overflow.
func ParseMsg(b []byte) (Msg, error) {
	var m Msg
	if len(b) < headerSize {
		return m, fmt.Errorf("%w: %d bytes, header needs %d", ErrBadMsg, len(b), headerSize)
	}
	le := binary.LittleEndian
	m.ID = le.Uint32(b[0:])
	m.Opcode = Opcode(le.Uint32(b[4:]))
	n := le.Uint32(b[8:])
	m.ObjectID = le.Uint32(b[12:])
	if uint64(n) != uint64(len(b)) {
		return m, fmt.Errorf("%w: header len %d, read %d bytes", ErrBadMsg, n, len(b))
	}
	data := b[headerSize:]
	switch m.Opcode {
	case OpOpen:
		if len(data) < openSize {
			return m, fmt.Errorf("%w: OPEN payload %d bytes, need %d", ErrBadMsg, len(data), openSize)
		}
		vks := le.Uint32(data[0:])
		cks := le.Uint32(data[4:])
		o := &OpenMsg{FD: le.Uint32(data[8:]), Flags: le.Uint32(data[12:])}
		keys := data[openSize:]
		if uint64(vks)+uint64(cks) != uint64(len(keys)) {
			return m, fmt.Errorf("%w: OPEN keys %d+%d bytes, payload has %d", ErrBadMsg, vks, cks, len(keys))
		}
		vk := keys[:vks]
		// The volume key is a NUL-terminated string; its size counts the NUL.
		if len(vk) == 0 || vk[len(vk)-1] != 0 {
			return m, fmt.Errorf("%w: OPEN volume key not NUL-terminated", ErrBadMsg)
		}
		vk = vk[:len(vk)-1]
		for _, c := range vk {
			if c == 0 {
				return m, fmt.Errorf("%w: OPEN volume key has an inner NUL", ErrBadMsg)
			}
		}
		o.VolumeKey = string(vk)
		o.CookieKey = string(keys[vks:])
		m.Open = o
	case OpClose:
		if len(data) != 0 {
			return m, fmt.Errorf("%w: CLOSE with %d payload bytes", ErrBadMsg, len(data))
		}
	case OpRead:
		if len(data) != readSize {
			return m, fmt.Errorf("%w: READ payload %d bytes, want %d", ErrBadMsg, len(data), readSize)
		}
		r := &ReadMsg{Off: le.Uint64(data[0:]), Len: le.Uint64(data[8:])}
		if r.Off+r.Len < r.Off || r.Off > 1<<62 {
			return m, fmt.Errorf("%w: READ range %d+%d overflows", ErrBadMsg, r.Off, r.Len)
		}
		m.Read = r
	default:
		return m, fmt.Errorf("%w: unknown opcode %d", ErrBadMsg, uint32(m.Opcode))
	}
	return m, nil
}

// AppendMsg encodes m the way the kernel does (for tests and tools): an
// OPEN's volume key gets its NUL appended.
func AppendMsg(b []byte, m Msg) []byte {
	le := binary.LittleEndian
	var data []byte
	switch {
	case m.Open != nil:
		data = le.AppendUint32(data, uint32(len(m.Open.VolumeKey)+1))
		data = le.AppendUint32(data, uint32(len(m.Open.CookieKey)))
		data = le.AppendUint32(data, m.Open.FD)
		data = le.AppendUint32(data, m.Open.Flags)
		data = append(data, m.Open.VolumeKey...)
		data = append(data, 0)
		data = append(data, m.Open.CookieKey...)
	case m.Read != nil:
		data = le.AppendUint64(data, m.Read.Off)
		data = le.AppendUint64(data, m.Read.Len)
	}
	b = le.AppendUint32(b, m.ID)
	b = le.AppendUint32(b, uint32(m.Opcode))
	b = le.AppendUint32(b, uint32(headerSize+len(data)))
	b = le.AppendUint32(b, m.ObjectID)
	return append(b, data...)
}

// Package fanotify is the kernel front end of on-demand EROFS through
// fanotify pre-content events (Linux >= 6.14): a group that marks blob cache
// files for FAN_PRE_ACCESS, reads the kernel's events, hands each one to a
// Filler that makes the range present, and answers ALLOW, or DENY with an
// errno so the reader fails instead of seeing holes.
//
// It knows nothing of RAFS; the serving mode above it maps an event's file
// and range to blob chunks.
//
// # Events in flight at a crash
//
// A group outlives its daemon while another process (a supervisor) holds
// its fd. Events the dead daemon had read but not answered stay on the
// group's access list, their readers blocked. The kernel finds the event a
// response is for by the fd number it reported in the event
// (process_access_response in fs/notify/fanotify/fanotify_user.c compares
// the response's fd with the number stored in each event on the access
// list and takes the first match; it never resolves the number in anyone's
// fd table, so the numbers stay valid after the process that held them
// died). A successor that knows a number can therefore answer its event.
// Serve journals every event it reads (Journal: fd number, file, range; a
// shared mapping, so the records survive SIGKILL) until it answers it, and
// a successor passes the dead daemon's records as Options.Recover: it
// fills each range and allows the event, so the reader completes with the
// right bytes. Only an event read in the instant between read(2) and its
// journal record (the reading loop's fstat and a few stores) is unknown to
// the successor; DenyOrphans fails that one read with EIO rather than
// leave it blocked.
package fanotify

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// ErrMalformed is wrapped by ParseEvents for bytes that are not a well-formed
// event stream.
var ErrMalformed = errors.New("malformed fanotify event")

const (
	metadataLen = 24 // struct fanotify_event_metadata
	// infoRangeLen is struct fanotify_event_info_range: header {u8 type, u8
	// pad, u16 len}, u32 pad, u64 offset, u64 count.
	infoRangeLen = 24
	infoHdrLen   = 4
)

// Event is one fanotify event as the kernel reported it.
type Event struct {
	Mask uint64
	// Fd is an fd for the marked file, opened by the kernel so that I/O on it
	// raises no further events; the receiver owns it (-1 for overflow).
	Fd  int
	Pid int32
	// HasRange says Offset/Count came from a range record; pre-content
	// events without one cover the whole file.
	HasRange      bool
	Offset, Count uint64
	// Dev and Ino identify the marked file (st_dev, st_ino of Fd); Serve
	// sets them with one fstat before handing the event on, 0 if unknown.
	Dev, Ino uint64
}

// ParseEvents decodes a buffer returned by read(2) on a fanotify fd. It
// checks every length against the buffer, so it is safe on arbitrary
// bytes; on error it still returns the events decoded before the bad one,
// whose fds the caller must close.
func ParseEvents(buf []byte) ([]Event, error) { return AppendEvents(nil, buf) }

// AppendEvents is ParseEvents appending to evs, so that a reading loop
// reuses one slice.
func AppendEvents(evs []Event, buf []byte) ([]Event, error) {
	le := binary.LittleEndian
	for len(buf) > 0 {
		if len(buf) < metadataLen {
			return evs, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(buf))
		}
		evLen := le.Uint32(buf[0:])
		vers := buf[4]
		metaLen := le.Uint16(buf[6:])
		if vers != unix.FANOTIFY_METADATA_VERSION {
			return evs, fmt.Errorf("%w: version %d", ErrMalformed, vers)
		}
		if evLen < metadataLen || uint64(evLen) > uint64(len(buf)) || metaLen < metadataLen || uint32(metaLen) > evLen {
			return evs, fmt.Errorf("%w: event length %d, metadata length %d, %d bytes left", ErrMalformed, evLen, metaLen, len(buf))
		}
		ev := Event{Mask: le.Uint64(buf[8:]), Fd: int(int32(le.Uint32(buf[16:]))), Pid: int32(le.Uint32(buf[20:]))}
		info := buf[metaLen:evLen]
		for len(info) > 0 {
			if len(info) < infoHdrLen {
				return evs, fmt.Errorf("%w: %d-byte info record", ErrMalformed, len(info))
			}
			typ, l := info[0], int(le.Uint16(info[2:]))
			if l < infoHdrLen || l > len(info) {
				return evs, fmt.Errorf("%w: info record type %d length %d of %d", ErrMalformed, typ, l, len(info))
			}
			if typ == unix.FAN_EVENT_INFO_TYPE_RANGE {
				if l < infoRangeLen {
					return evs, fmt.Errorf("%w: range record of %d bytes", ErrMalformed, l)
				}
				ev.HasRange, ev.Offset, ev.Count = true, le.Uint64(info[8:]), le.Uint64(info[16:])
			}
			info = info[l:]
		}
		evs = append(evs, ev)
		buf = buf[evLen:]
	}
	return evs, nil
}

// encodeResponse is struct fanotify_response.
func encodeResponse(fd int, resp uint32) []byte {
	var b [8]byte
	putResponse(&b, fd, resp)
	return b[:]
}

func putResponse(b *[8]byte, fd int, resp uint32) {
	binary.LittleEndian.PutUint32(b[0:], uint32(int32(fd)))
	binary.LittleEndian.PutUint32(b[4:], resp)
}

// deny is FAN_DENY carrying errno, which pre-content groups may return
// (FAN_DENY_ERRNO in the uapi header).
func deny(errno unix.Errno) uint32 {
	return unix.FAN_DENY | uint32(errno&unix.FAN_ERRNO_MASK)<<unix.FAN_ERRNO_SHIFT
}

package fanotify

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A daemon killed while it holds events (read from the group, not yet
// answered) leaves them pending in the kernel: the group lives on in the
// supervisor, and the kernel's process_access_response
// (fs/notify/fanotify/fanotify_user.c) finds a pending permission event by
// the fd number it reported, comparing it with the number stored in the
// event; it never looks that number up in anyone's fd table. So a successor
// that knows the number can answer the event, and one that also knows the
// file and range can fill it first and answer ALLOW: the reader completes.
// The Journal is where a daemon keeps those facts: a small file mapped
// shared, so every store lands in the page cache at once and survives the
// process's death (SIGKILL included) without a write(2) per event.

// DefaultJournalSlots bounds the events a journal can track at once; an
// event read while every slot is taken is served but not journaled (a
// crash then fails its read with EIO, as DenyOrphans answers it).
const DefaultJournalSlots = 1024

const (
	journalMagic  = "RAFSFNJ1"
	journalHeader = 16
	slotLen       = 48
	slotLive      = 1
)

// Journal records the events a daemon holds. Its methods are safe for
// concurrent use.
type Journal struct {
	path  string
	f     *os.File
	mem   []byte
	slots int
	free  chan int
	// stale are the slots live at open: a dead daemon's records.
	stale []int
}

// OpenJournal opens or creates the journal file at path with room for
// slots events (0: DefaultJournalSlots). Records a dead daemon left are
// kept (their slots unused) until Forget: read them with Pending.
func OpenJournal(path string, slots int) (*Journal, error) {
	if slots <= 0 {
		slots = DefaultJournalSlots
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("fanotify journal: %w", err)
	}
	size := journalHeader + slots*slotLen
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("fanotify journal: %w", err)
	}
	fresh := fi.Size() == 0
	if !fresh {
		var hdr [journalHeader]byte
		if _, err := f.ReadAt(hdr[:], 0); err != nil || string(hdr[:8]) != journalMagic {
			f.Close()
			return nil, fmt.Errorf("fanotify journal %s: not a journal (bad header)", path)
		}
		if n := int(binary.LittleEndian.Uint32(hdr[8:])); n != slots || fi.Size() != int64(size) {
			// Another size: take the file's geometry so its records
			// still read back.
			if n <= 0 || n > 1<<20 || fi.Size() != int64(journalHeader+n*slotLen) {
				f.Close()
				return nil, fmt.Errorf("fanotify journal %s: %d slots in a %d-byte file", path, n, fi.Size())
			}
			slots, size = n, journalHeader+n*slotLen
		}
	} else {
		var hdr [journalHeader]byte
		copy(hdr[:], journalMagic)
		binary.LittleEndian.PutUint32(hdr[8:], uint32(slots))
		if err := f.Truncate(int64(size)); err != nil {
			f.Close()
			return nil, fmt.Errorf("fanotify journal: %w", err)
		}
		if _, err := f.WriteAt(hdr[:], 0); err != nil {
			f.Close()
			return nil, fmt.Errorf("fanotify journal: %w", err)
		}
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("fanotify journal: mmap: %w", err)
	}
	j := &Journal{path: path, f: f, mem: mem, slots: slots, free: make(chan int, slots)}
	for i := range slots {
		if j.live(i) {
			j.stale = append(j.stale, i)
		} else {
			j.free <- i
		}
	}
	return j, nil
}

// Path is the journal's file.
func (j *Journal) Path() string { return j.path }

func (j *Journal) slot(i int) []byte {
	off := journalHeader + i*slotLen
	return j.mem[off : off+slotLen]
}

func (j *Journal) state(i int) *uint32 {
	return (*uint32)(unsafe.Pointer(&j.mem[journalHeader+i*slotLen]))
}

func (j *Journal) live(i int) bool { return atomic.LoadUint32(j.state(i)) == slotLive }

// add records ev and returns its slot, or -1 when every slot is taken.
func (j *Journal) add(ev *Event) int {
	var i int
	select {
	case i = <-j.free:
	default:
		return -1
	}
	s := j.slot(i)
	le := binary.LittleEndian
	le.PutUint32(s[4:], uint32(int32(ev.Fd)))
	le.PutUint64(s[8:], ev.Dev)
	le.PutUint64(s[16:], ev.Ino)
	le.PutUint64(s[24:], ev.Offset)
	le.PutUint64(s[32:], ev.Count)
	var r uint32
	if ev.HasRange {
		r = 1
	}
	le.PutUint32(s[40:], r)
	// Live last: a record is whole once it reads as live.
	atomic.StoreUint32(j.state(i), slotLive)
	return i
}

// done frees slot i once its event is answered.
func (j *Journal) done(i int) {
	if i < 0 {
		return
	}
	atomic.StoreUint32(j.state(i), 0)
	j.free <- i
}

// Pending returns the events recorded when the journal was opened and not
// forgotten since: after a crash, those the dead daemon held. Fd is the
// number the dead daemon saw (not an fd of this process); Mask is
// FAN_PRE_ACCESS.
func (j *Journal) Pending() []Event {
	var out []Event
	le := binary.LittleEndian
	for _, i := range j.stale {
		if !j.live(i) {
			continue
		}
		s := j.slot(i)
		out = append(out, Event{
			Mask:     unix.FAN_PRE_ACCESS,
			Fd:       int(int32(le.Uint32(s[4:]))),
			Dev:      le.Uint64(s[8:]),
			Ino:      le.Uint64(s[16:]),
			Offset:   le.Uint64(s[24:]),
			Count:    le.Uint64(s[32:]),
			HasRange: le.Uint32(s[40:]) == 1,
		})
	}
	return out
}

// forget drops the held record of ev (before it is answered).
func (j *Journal) forget(ev Event) {
	le := binary.LittleEndian
	for _, i := range j.stale {
		s := j.slot(i)
		if j.live(i) && int(int32(le.Uint32(s[4:]))) == ev.Fd && le.Uint64(s[8:]) == ev.Dev &&
			le.Uint64(s[16:]) == ev.Ino && le.Uint64(s[24:]) == ev.Offset && le.Uint64(s[32:]) == ev.Count {
			atomic.StoreUint32(j.state(i), 0)
			return
		}
	}
}

// Forget drops the records Pending returns (once they are answered, or
// for a stale file a fresh daemon reuses), freeing their slots.
func (j *Journal) Forget() {
	for _, i := range j.stale {
		atomic.StoreUint32(j.state(i), 0)
		j.free <- i
	}
	j.stale = nil
}

// Close unmaps the journal; remove also deletes its file (a clean exit:
// nothing is left to recover).
func (j *Journal) Close(remove bool) error {
	err := unix.Munmap(j.mem)
	err = errors.Join(err, j.f.Close())
	if remove {
		if rerr := os.Remove(j.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

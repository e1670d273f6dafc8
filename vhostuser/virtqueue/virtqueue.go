// Package virtqueue implements the device side of a virtio split virtqueue
// living in guest memory: popping descriptor chains from the available ring
// (with indirect descriptors) and returning them through the used ring (with
// VIRTIO_RING_F_EVENT_IDX notification suppression).
//
// The rings and every descriptor are written by the guest and are untrusted.
// Problems confined to one chain are reported as a *ChainError, so the
// request fails but the queue keeps going; problems with the rings
// themselves are reported as ErrBroken, after which the queue must not be
// used until the front end reconfigures it.
package virtqueue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/rafsd/rafsd/vhostuser/memory"
)

// Descriptor flags (virtio 1.x, 2.7.5).
const (
	DescFNext     = 1
	DescFWrite    = 2
	DescFIndirect = 4
)

// Ring flags.
const (
	availFNoInterrupt = 1
)

// MaxSize is the largest split-queue size the spec allows.
const MaxSize = 32768

// MaxChainBytes bounds the total length of one chain's buffers (the guest
// can describe far more than it has; handlers use int lengths).
const MaxChainBytes = 1 << 31

// Feature bits that change ring behaviour.
const (
	FeatureIndirectDesc = 1 << 28
	FeatureEventIdx     = 1 << 29
)

// ErrBroken is wrapped by errors that make the whole queue unusable.
var ErrBroken = errors.New("virtqueue broken")

// ChainError is a malformed chain: it fails only its own request. Chain
// holds what could be decoded (its Head is valid and must be returned to the
// used ring).
type ChainError struct {
	Chain *Chain
	Err   error
}

func (e *ChainError) Error() string {
	return fmt.Sprintf("descriptor chain %d: %v", e.Chain.Head, e.Err)
}

func (e *ChainError) Unwrap() error { return e.Err }

// Chain is one request: the device-readable buffers (driver to device)
// followed by the device-writable ones (device to driver), as host slices
// into guest memory.
type Chain struct {
	Head     uint16
	Readable [][]byte
	Writable [][]byte
}

// Len returns the total readable and writable byte counts.
func (c *Chain) Len() (readable, writable int) {
	for _, b := range c.Readable {
		readable += len(b)
	}
	for _, b := range c.Writable {
		writable += len(b)
	}
	return
}

// Config is where a queue lives, as set by SET_VRING_NUM/ADDR. Ring
// addresses are in the front end's virtual address space (vhost-user);
// descriptor buffer addresses are guest-physical.
type Config struct {
	Size      uint16
	DescAddr  uint64
	AvailAddr uint64
	UsedAddr  uint64
	Features  uint64 // negotiated virtio features (ring bits are used)
}

// Queue is the device's view of one split virtqueue. It is not safe for
// concurrent use; callers serialize Pop/Push.
type Queue struct {
	cfg       Config
	mem       *memory.Table
	desc      []byte
	avail     []byte
	used      []byte
	lastAvail uint16
	usedIdx   uint16
	signalled uint16
	sigValid  bool
}

// fenceWord is touched by fence: an atomic read-modify-write is a full
// barrier for both the compiler and the CPU, which orders our accesses to
// the shared rings against the guest's.
var fenceWord atomic.Uint32

func fence() { fenceWord.Add(0) }

// New returns a queue at the ring position lastAvail (SET_VRING_BASE). The
// used index is read from the ring, so a reconnecting back end continues
// where the previous one stopped.
func New(mem *memory.Table, cfg Config, lastAvail uint16) (*Queue, error) {
	q := &Queue{cfg: cfg, lastAvail: lastAvail}
	if err := q.Remap(mem); err != nil {
		return nil, err
	}
	q.usedIdx = binary.LittleEndian.Uint16(q.used[2:])
	return q, nil
}

// Remap translates the ring addresses against mem (after the front end
// changed the memory table). On error the queue keeps its old mapping.
func (q *Queue) Remap(mem *memory.Table) error {
	n := uint64(q.cfg.Size)
	if n == 0 || n > MaxSize || n&(n-1) != 0 {
		return fmt.Errorf("queue size %d: %w", n, ErrBroken)
	}
	if q.cfg.DescAddr%16 != 0 || q.cfg.AvailAddr%2 != 0 || q.cfg.UsedAddr%4 != 0 {
		return fmt.Errorf("misaligned ring (desc %#x avail %#x used %#x): %w",
			q.cfg.DescAddr, q.cfg.AvailAddr, q.cfg.UsedAddr, ErrBroken)
	}
	desc, err := mem.SliceVA(q.cfg.DescAddr, 16*n)
	if err != nil {
		return fmt.Errorf("descriptor table: %w: %w", err, ErrBroken)
	}
	avail, err := mem.SliceVA(q.cfg.AvailAddr, 6+2*n)
	if err != nil {
		return fmt.Errorf("avail ring: %w: %w", err, ErrBroken)
	}
	used, err := mem.SliceVA(q.cfg.UsedAddr, 6+8*n)
	if err != nil {
		return fmt.Errorf("used ring: %w: %w", err, ErrBroken)
	}
	q.mem, q.desc, q.avail, q.used = mem, desc, avail, used
	return nil
}

// Memory returns the table the rings are currently mapped from.
func (q *Queue) Memory() *memory.Table { return q.mem }

// LastAvail is the next available-ring entry to consume (GET_VRING_BASE).
func (q *Queue) LastAvail() uint16 { return q.lastAvail }

func (q *Queue) has(f uint64) bool { return q.cfg.Features&f != 0 }

func (q *Queue) availIdx() uint16 { return binary.LittleEndian.Uint16(q.avail[2:]) }

// Pop takes the next available chain. It returns (nil, nil) when the ring
// is empty, a *ChainError for a malformed chain (the head is consumed and
// must be pushed back), or an error wrapping ErrBroken.
func (q *Queue) Pop() (*Chain, error) {
	idx := q.availIdx()
	fence() // read the ring entry only after the index that publishes it
	if idx == q.lastAvail {
		return nil, nil
	}
	if uint16(idx-q.lastAvail) > q.cfg.Size {
		return nil, fmt.Errorf("avail idx %d is %d ahead of %d (size %d): %w",
			idx, uint16(idx-q.lastAvail), q.lastAvail, q.cfg.Size, ErrBroken)
	}
	slot := uint64(q.lastAvail % q.cfg.Size)
	head := binary.LittleEndian.Uint16(q.avail[4+2*slot:])
	if head >= q.cfg.Size {
		return nil, fmt.Errorf("avail head %d >= size %d: %w", head, q.cfg.Size, ErrBroken)
	}
	q.lastAvail++
	c := &Chain{Head: head}
	if err := q.walk(c); err != nil {
		return nil, &ChainError{Chain: c, Err: err}
	}
	return c, nil
}

// walk decodes the chain starting at c.Head.
func (q *Queue) walk(c *Chain) error {
	table := q.desc
	limit := uint32(q.cfg.Size)
	idx := uint32(c.Head)
	indirect := false
	var total uint64
	for count := uint32(0); ; count++ {
		if idx >= limit {
			return fmt.Errorf("descriptor index %d out of table of %d", idx, limit)
		}
		if count >= limit {
			return fmt.Errorf("chain longer than %d descriptors (loop?)", limit)
		}
		d := table[16*idx : 16*idx+16]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&DescFIndirect != 0 {
			switch {
			case !q.has(FeatureIndirectDesc):
				return errors.New("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
			case indirect:
				return errors.New("indirect descriptor inside an indirect table")
			case flags&DescFNext != 0:
				return errors.New("indirect descriptor with NEXT flag")
			case length == 0 || length%16 != 0 || length/16 > uint32(q.cfg.Size):
				return fmt.Errorf("indirect table length %d invalid", length)
			}
			t, err := q.mem.Slice(addr, uint64(length))
			if err != nil {
				return fmt.Errorf("indirect table: %w", err)
			}
			table, limit, idx, indirect = t, length/16, 0, true
			count = ^uint32(0) // the loop increments it to 0
			continue
		}
		total += uint64(length)
		if total > MaxChainBytes {
			return fmt.Errorf("chain buffers exceed %d bytes", MaxChainBytes)
		}
		var err error
		if flags&DescFWrite != 0 {
			c.Writable, err = q.mem.AppendIovecs(c.Writable, addr, uint64(length))
		} else {
			if len(c.Writable) > 0 {
				return errors.New("device-readable descriptor after a device-writable one")
			}
			c.Readable, err = q.mem.AppendIovecs(c.Readable, addr, uint64(length))
		}
		if err != nil {
			return fmt.Errorf("descriptor %d: %w", idx, err)
		}
		if flags&DescFNext == 0 {
			return nil
		}
		idx = uint32(next)
	}
}

// Push returns a chain to the driver with the number of bytes the device
// wrote into its writable buffers.
func (q *Queue) Push(head uint16, written uint32) {
	slot := uint64(q.usedIdx % q.cfg.Size)
	e := q.used[4+8*slot : 4+8*slot+8]
	binary.LittleEndian.PutUint32(e[0:], uint32(head))
	binary.LittleEndian.PutUint32(e[4:], written)
	fence() // the element must be visible before the index that publishes it
	q.usedIdx++
	binary.LittleEndian.PutUint16(q.used[2:], q.usedIdx)
	fence()
}

// NeedsNotify reports whether the driver wants an interrupt for the used
// entries pushed since the last call (EVENT_IDX or the NO_INTERRUPT flag).
func (q *Queue) NeedsNotify() bool {
	fence()
	if !q.has(FeatureEventIdx) {
		return binary.LittleEndian.Uint16(q.avail[0:])&availFNoInterrupt == 0
	}
	old, valid := q.signalled, q.sigValid
	q.signalled, q.sigValid = q.usedIdx, true
	if !valid {
		return true
	}
	event := binary.LittleEndian.Uint16(q.avail[4+2*uint64(q.cfg.Size):])
	// vring_need_event: notify if event lies in [old, new).
	return uint16(q.usedIdx-event-1) < uint16(q.usedIdx-old)
}

// EnableNotify asks the driver to kick for the next available entry
// (EVENT_IDX: publish avail_event) and reports whether entries arrived in
// the meantime, in which case the caller must keep popping.
func (q *Queue) EnableNotify() bool {
	if q.has(FeatureEventIdx) {
		binary.LittleEndian.PutUint16(q.used[4+8*uint64(q.cfg.Size):], q.lastAvail)
	}
	fence()
	return q.availIdx() != q.lastAvail
}

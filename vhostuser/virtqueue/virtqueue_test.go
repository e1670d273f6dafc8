package virtqueue

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/rafsd/rafsd/vhostuser/memory"
)

const (
	base      = 0x10000
	qsize     = 16
	descOff   = 0x0
	availOff  = 0x100
	usedOff   = 0x200
	dataOff   = 0x1000
	memLength = 0x10000
)

// ring is a test driver: guest memory with a queue laid out in it.
type ring struct {
	mem   []byte
	tbl   *memory.Table
	avail uint16
}

func newRing(t testing.TB) *ring {
	mem := make([]byte, memLength)
	r, err := memory.NewRegion(memory.RegionDesc{GuestAddr: base, UserAddr: base}, mem)
	if err != nil {
		t.Fatal(err)
	}
	tbl, err := memory.NewTable([]*memory.Region{r})
	if err != nil {
		t.Fatal(err)
	}
	return &ring{mem: mem, tbl: tbl}
}

func (r *ring) queue(t testing.TB, features uint64) *Queue {
	q, err := New(r.tbl, Config{Size: qsize, DescAddr: base + descOff, AvailAddr: base + availOff, UsedAddr: base + usedOff, Features: features}, 0)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func putDesc(table []byte, i int, addr uint64, length uint32, flags, next uint16) {
	d := table[16*i:]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

func (r *ring) desc(i int, addr uint64, length uint32, flags, next uint16) {
	putDesc(r.mem[descOff:], i, addr, length, flags, next)
}

func (r *ring) publish(head uint16) {
	binary.LittleEndian.PutUint16(r.mem[availOff+4+2*uint64(r.avail%qsize):], head)
	r.avail++
	binary.LittleEndian.PutUint16(r.mem[availOff+2:], r.avail)
}

func TestChains(t *testing.T) {
	const all = FeatureIndirectDesc | FeatureEventIdx
	tests := []struct {
		name     string
		features uint64
		setup    func(r *ring)
		readable int // total bytes; -1 = chain error
		writable int
		broken   bool
	}{
		{"single readable", all, func(r *ring) { r.desc(0, base+dataOff, 40, 0, 0) }, 40, 0, false},
		{"read then write", all, func(r *ring) {
			r.desc(0, base+dataOff, 40, DescFNext, 1)
			r.desc(1, base+dataOff+64, 100, DescFNext|DescFWrite, 2)
			r.desc(2, base+dataOff+256, 28, DescFWrite, 0)
		}, 40, 128, false},
		{"indirect", all, func(r *ring) {
			tbl := r.mem[0x800:]
			putDesc(tbl, 0, base+dataOff, 10, DescFNext, 1)
			putDesc(tbl, 1, base+dataOff+16, 20, DescFNext|DescFWrite, 2)
			putDesc(tbl, 2, base+dataOff+64, 30, DescFWrite, 0)
			r.desc(0, base+0x800, 48, DescFIndirect, 0)
		}, 10, 50, false},
		{"indirect not negotiated", FeatureEventIdx, func(r *ring) { r.desc(0, base+0x800, 16, DescFIndirect, 0) }, -1, 0, false},
		{"indirect in indirect", all, func(r *ring) {
			putDesc(r.mem[0x800:], 0, base+0x900, 16, DescFIndirect, 0)
			r.desc(0, base+0x800, 16, DescFIndirect, 0)
		}, -1, 0, false},
		{"indirect with next", all, func(r *ring) { r.desc(0, base+0x800, 16, DescFIndirect|DescFNext, 1) }, -1, 0, false},
		{"indirect bad length", all, func(r *ring) { r.desc(0, base+0x800, 17, DescFIndirect, 0) }, -1, 0, false},
		{"indirect table outside memory", all, func(r *ring) { r.desc(0, 0x10, 16, DescFIndirect, 0) }, -1, 0, false},
		{"indirect loop", all, func(r *ring) {
			putDesc(r.mem[0x800:], 0, base+dataOff, 1, DescFNext, 1)
			putDesc(r.mem[0x800:], 1, base+dataOff, 1, DescFNext, 0)
			r.desc(0, base+0x800, 32, DescFIndirect, 0)
		}, -1, 0, false},
		{"loop", all, func(r *ring) { r.desc(0, base+dataOff, 1, DescFNext, 0) }, -1, 0, false},
		{"next out of table", all, func(r *ring) { r.desc(0, base+dataOff, 1, DescFNext, qsize) }, -1, 0, false},
		{"address outside memory", all, func(r *ring) { r.desc(0, 0x1000, 4, 0, 0) }, -1, 0, false},
		{"length past end", all, func(r *ring) { r.desc(0, base+memLength-4, 8, 0, 0) }, -1, 0, false},
		{"length wraps", all, func(r *ring) { r.desc(0, ^uint64(0)-2, 0xffffffff, 0, 0) }, -1, 0, false},
		{"readable after writable", all, func(r *ring) {
			r.desc(0, base+dataOff, 4, DescFWrite|DescFNext, 1)
			r.desc(1, base+dataOff, 4, 0, 0)
		}, -1, 0, false},
		{"head out of range", all, func(r *ring) {}, 0, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newRing(t)
			q := r.queue(t, tc.features)
			tc.setup(r)
			if tc.broken {
				r.publish(qsize + 3)
			} else {
				r.publish(0)
			}
			c, err := q.Pop()
			if tc.broken {
				if !errors.Is(err, ErrBroken) {
					t.Fatalf("err = %v, want ErrBroken", err)
				}
				return
			}
			if tc.readable < 0 {
				var ce *ChainError
				if !errors.As(err, &ce) || ce.Chain.Head != 0 {
					t.Fatalf("err = %v, want ChainError for head 0", err)
				}
				q.Push(0, 0) // the head must still be returnable
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			rd, wr := c.Len()
			if rd != tc.readable || wr != tc.writable {
				t.Fatalf("lens %d/%d, want %d/%d", rd, wr, tc.readable, tc.writable)
			}
			q.Push(c.Head, uint32(wr))
			if got := binary.LittleEndian.Uint16(r.mem[usedOff+2:]); got != 1 {
				t.Fatalf("used idx %d", got)
			}
			if id, n := binary.LittleEndian.Uint32(r.mem[usedOff+4:]), binary.LittleEndian.Uint32(r.mem[usedOff+8:]); id != 0 || int(n) != wr {
				t.Fatalf("used elem %d/%d", id, n)
			}
		})
	}
}

func TestAvailRunsAhead(t *testing.T) {
	r := newRing(t)
	q := r.queue(t, 0)
	binary.LittleEndian.PutUint16(r.mem[availOff+2:], qsize+1)
	if _, err := q.Pop(); !errors.Is(err, ErrBroken) {
		t.Fatalf("err = %v, want ErrBroken", err)
	}
}

func TestBadRingAddresses(t *testing.T) {
	r := newRing(t)
	for _, cfg := range []Config{
		{Size: 15, DescAddr: base, AvailAddr: base + availOff, UsedAddr: base + usedOff},
		{Size: qsize, DescAddr: base + 8, AvailAddr: base + availOff, UsedAddr: base + usedOff},
		{Size: qsize, DescAddr: base, AvailAddr: base + memLength - 4, UsedAddr: base + usedOff},
		{Size: qsize, DescAddr: base, AvailAddr: base + availOff, UsedAddr: 0x40},
		{Size: 0},
	} {
		if _, err := New(r.tbl, cfg, 0); !errors.Is(err, ErrBroken) {
			t.Errorf("%+v: err = %v", cfg, err)
		}
	}
}

func TestEventIdx(t *testing.T) {
	r := newRing(t)
	q := r.queue(t, FeatureEventIdx)
	r.desc(0, base+dataOff, 4, 0, 0)
	for i := 0; i < 3; i++ {
		r.publish(0)
	}
	for i := 0; i < 3; i++ {
		if _, err := q.Pop(); err != nil {
			t.Fatal(err)
		}
	}
	if q.EnableNotify() {
		t.Fatal("more entries reported on a drained ring")
	}
	if ev := binary.LittleEndian.Uint16(r.mem[usedOff+4+8*qsize:]); ev != 3 {
		t.Fatalf("avail_event = %d, want 3", ev)
	}
	// Driver asks for an interrupt once used idx passes 1 (used_event = 1).
	binary.LittleEndian.PutUint16(r.mem[availOff+4+2*qsize:], 1)
	q.Push(0, 0)
	if !q.NeedsNotify() { // first check is always true
		t.Fatal("first notify suppressed")
	}
	q.Push(0, 0) // used idx 1 -> 2 crosses event 1
	if !q.NeedsNotify() {
		t.Fatal("crossing used_event did not notify")
	}
	q.Push(0, 0) // 2 -> 3, event still 1
	if q.NeedsNotify() {
		t.Fatal("notified although used_event was not crossed")
	}
	// Without EVENT_IDX the NO_INTERRUPT flag decides.
	q2 := r.queue(t, 0)
	binary.LittleEndian.PutUint16(r.mem[availOff:], availFNoInterrupt)
	if q2.NeedsNotify() {
		t.Fatal("NO_INTERRUPT ignored")
	}
}

// FuzzVirtqueue feeds random descriptor tables and rings to the chain
// walker and writes replies into whatever writable buffers it returns.
func FuzzVirtqueue(f *testing.F) {
	seed := newRing(f)
	seed.desc(0, base+dataOff, 40, DescFNext, 1)
	seed.desc(1, base+0x800, 32, DescFIndirect, 0)
	putDesc(seed.mem[0x800:], 0, base+dataOff+64, 100, DescFWrite|DescFNext, 1)
	putDesc(seed.mem[0x800:], 1, base+dataOff+512, 100, DescFWrite, 0)
	seed.publish(0)
	seed.publish(1)
	f.Add(append([]byte(nil), seed.mem[:0x900]...), uint16(0), uint64(FeatureIndirectDesc|FeatureEventIdx))
	f.Add(make([]byte, 0x300), uint16(5), uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, lastAvail uint16, features uint64) {
		r := newRing(t)
		copy(r.mem, data)
		q, err := New(r.tbl, Config{Size: qsize, DescAddr: base + descOff, AvailAddr: base + availOff, UsedAddr: base + usedOff, Features: features}, lastAvail)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2*qsize; i++ {
			c, err := q.Pop()
			var ce *ChainError
			switch {
			case errors.As(err, &ce):
				q.Push(ce.Chain.Head, 0)
				continue
			case err != nil:
				if !errors.Is(err, ErrBroken) {
					t.Fatalf("unexpected error kind: %v", err)
				}
				return
			case c == nil:
				q.EnableNotify()
				q.NeedsNotify()
				return
			}
			if c.Head >= qsize {
				t.Fatalf("head %d", c.Head)
			}
			n := 0
			for _, b := range c.Writable {
				for j := range b {
					b[j] = 0xaa
				}
				n += len(b)
			}
			for _, b := range c.Readable {
				_ = append([]byte(nil), b...)
			}
			q.Push(c.Head, uint32(n))
			q.NeedsNotify()
		}
	})
}

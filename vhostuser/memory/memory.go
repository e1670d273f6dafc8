// Package memory maps a vhost-user front end's guest memory regions and
// translates guest-physical and front-end virtual addresses into host byte
// slices.
//
// Every address and length handed to this package comes from the guest or
// the front end and is untrusted: translations are bounds-checked without
// overflow and never return a slice that reaches outside a mapped region.
package memory

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// ErrBadAddress is wrapped by every translation failure.
var ErrBadAddress = errors.New("guest address out of bounds")

// RegionDesc is a vhost-user memory region description, as carried by
// SET_MEM_TABLE and ADD_MEM_REG.
type RegionDesc struct {
	GuestAddr  uint64 // guest-physical start
	Size       uint64
	UserAddr   uint64 // start in the front end's virtual address space
	MmapOffset uint64 // offset of the region in the passed file
}

// end returns the last address (inclusive) of [start, start+size) and
// whether the range is non-empty and does not wrap.
func end(start, size uint64) (uint64, bool) {
	if size == 0 || start > math.MaxUint64-(size-1) {
		return 0, false
	}
	return start + size - 1, true
}

// Check reports whether the description is usable: non-empty and without
// wrap-around in any of its address spaces.
func (d RegionDesc) Check() error {
	if _, ok := end(d.GuestAddr, d.Size); !ok {
		return fmt.Errorf("region gpa %#x size %#x: empty or wraps", d.GuestAddr, d.Size)
	}
	if _, ok := end(d.UserAddr, d.Size); !ok {
		return fmt.Errorf("region uva %#x size %#x: wraps", d.UserAddr, d.Size)
	}
	if d.MmapOffset > math.MaxUint64-d.Size {
		return fmt.Errorf("region mmap offset %#x size %#x: wraps", d.MmapOffset, d.Size)
	}
	return nil
}

// Region is one mapped guest memory region. Regions are reference counted:
// a Table holds a reference on each of its regions, and the mapping is
// released when the last Table using it is released.
type Region struct {
	RegionDesc
	data    []byte // len(data) == Size
	mapping []byte // what to munmap; nil when not owned
	refs    atomic.Int64
}

// MaxRegionSize bounds a single region (1 TiB): a larger request is a
// hostile or broken front end, not a guest.
const MaxRegionSize = 1 << 40

// MapRegion maps the region described by d from fd (shared, read-write).
// The caller keeps ownership of fd and may close it once MapRegion returns.
// The file must be at least MmapOffset+Size bytes long: mapping past its end
// would turn a guest access into SIGBUS.
func MapRegion(d RegionDesc, fd int) (*Region, error) {
	if err := d.Check(); err != nil {
		return nil, err
	}
	if d.Size > MaxRegionSize || d.MmapOffset > MaxRegionSize {
		return nil, fmt.Errorf("region size %#x offset %#x: too large", d.Size, d.MmapOffset)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("region fd: %w", err)
	}
	total := d.MmapOffset + d.Size
	if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < total {
		return nil, fmt.Errorf("region needs %#x bytes, file has %#x", total, st.Size)
	}
	m, err := unix.Mmap(fd, 0, int(total), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mmap region gpa %#x size %#x: %w", d.GuestAddr, d.Size, err)
	}
	r := &Region{RegionDesc: d, data: m[d.MmapOffset:total:total], mapping: m}
	return r, nil
}

// NewRegion wraps caller-owned memory as a region (tests, fuzzing). len(b)
// is the region size; d.Size is ignored.
func NewRegion(d RegionDesc, b []byte) (*Region, error) {
	d.Size = uint64(len(b))
	if err := d.Check(); err != nil {
		return nil, err
	}
	return &Region{RegionDesc: d, data: b[:len(b):len(b)]}, nil
}

// Bytes returns the region's memory.
func (r *Region) Bytes() []byte { return r.data }

func (r *Region) ref() { r.refs.Add(1) }

func (r *Region) unref() {
	if r.refs.Add(-1) == 0 && r.mapping != nil {
		_ = unix.Munmap(r.mapping)
		r.mapping, r.data = nil, nil
	}
}

// Close releases a region that was never put in a Table.
func (r *Region) Close() {
	if r.refs.Load() == 0 && r.mapping != nil {
		_ = unix.Munmap(r.mapping)
		r.mapping, r.data = nil, nil
	}
}

// Table is an immutable set of non-overlapping regions. It is reference
// counted: NewTable returns it with one reference, Acquire adds one, Release
// drops one; the regions are unmapped when nothing uses them any more. This
// lets the front end replace the memory table while requests that started
// with the old one finish writing their replies.
type Table struct {
	byGPA []*Region
	byUVA []*Region
	refs  atomic.Int64
}

// NewTable builds a table from regions; it fails if any two overlap in the
// guest-physical or in the user-virtual space.
func NewTable(regions []*Region) (*Table, error) {
	t := &Table{
		byGPA: append([]*Region(nil), regions...),
		byUVA: append([]*Region(nil), regions...),
	}
	sort.Slice(t.byGPA, func(i, j int) bool { return t.byGPA[i].GuestAddr < t.byGPA[j].GuestAddr })
	sort.Slice(t.byUVA, func(i, j int) bool { return t.byUVA[i].UserAddr < t.byUVA[j].UserAddr })
	for i := 1; i < len(regions); i++ {
		p, c := t.byGPA[i-1], t.byGPA[i]
		if e, _ := end(p.GuestAddr, p.Size); c.GuestAddr <= e {
			return nil, fmt.Errorf("regions overlap at gpa %#x", c.GuestAddr)
		}
		p, c = t.byUVA[i-1], t.byUVA[i]
		if e, _ := end(p.UserAddr, p.Size); c.UserAddr <= e {
			return nil, fmt.Errorf("regions overlap at uva %#x", c.UserAddr)
		}
	}
	for _, r := range regions {
		r.ref()
	}
	t.refs.Store(1)
	return t, nil
}

// Regions returns the table's regions ordered by guest address.
func (t *Table) Regions() []*Region {
	if t == nil {
		return nil
	}
	return append([]*Region(nil), t.byGPA...)
}

// Acquire adds a reference.
func (t *Table) Acquire() *Table {
	if t != nil {
		t.refs.Add(1)
	}
	return t
}

// Release drops a reference; the last one unmaps regions no other table uses.
func (t *Table) Release() {
	if t == nil {
		return
	}
	if t.refs.Add(-1) == 0 {
		for _, r := range t.byGPA {
			r.unref()
		}
	}
}

func find(rs []*Region, addr uint64, start func(*Region) uint64) (*Region, uint64, bool) {
	i := sort.Search(len(rs), func(i int) bool { return start(rs[i]) > addr }) - 1
	if i < 0 {
		return nil, 0, false
	}
	r := rs[i]
	off := addr - start(r)
	if off >= r.Size {
		return nil, 0, false
	}
	return r, off, true
}

func gpaOf(r *Region) uint64 { return r.GuestAddr }
func uvaOf(r *Region) uint64 { return r.UserAddr }

// Slice returns the n bytes at guest-physical address gpa; they must lie in
// one region. n == 0 yields an empty slice if gpa is mapped.
func (t *Table) Slice(gpa, n uint64) ([]byte, error) {
	return t.slice(t.byGPA, gpaOf, "gpa", gpa, n)
}

// SliceVA is Slice for an address in the front end's virtual address space
// (vring addresses are given that way).
func (t *Table) SliceVA(uva, n uint64) ([]byte, error) {
	return t.slice(t.byUVA, uvaOf, "uva", uva, n)
}

func (t *Table) slice(rs []*Region, start func(*Region) uint64, kind string, addr, n uint64) ([]byte, error) {
	if t == nil {
		return nil, fmt.Errorf("%s %#x: no memory table: %w", kind, addr, ErrBadAddress)
	}
	r, off, ok := find(rs, addr, start)
	if !ok || n > r.Size-off {
		return nil, fmt.Errorf("%s %#x len %#x: %w", kind, addr, n, ErrBadAddress)
	}
	return r.data[off : off+n : off+n], nil
}

// AppendIovecs appends the host slices covering [gpa, gpa+n) to dst. The
// range may cross from one region into an adjacent one (as guest RAM split
// at a hole boundary does); any unmapped byte fails the whole range.
func (t *Table) AppendIovecs(dst [][]byte, gpa, n uint64) ([][]byte, error) {
	if t == nil {
		return dst, fmt.Errorf("gpa %#x: no memory table: %w", gpa, ErrBadAddress)
	}
	if n > 0 {
		if _, ok := end(gpa, n); !ok {
			return dst, fmt.Errorf("gpa %#x len %#x: wraps: %w", gpa, n, ErrBadAddress)
		}
	}
	for n > 0 {
		r, off, ok := find(t.byGPA, gpa, gpaOf)
		if !ok {
			return dst, fmt.Errorf("gpa %#x: %w", gpa, ErrBadAddress)
		}
		m := min(n, r.Size-off)
		dst = append(dst, r.data[off:off+m:off+m])
		gpa += m
		n -= m
	}
	return dst, nil
}

// Holder owns the current table of a connection and hands out references.
// The zero value holds no table.
type Holder struct {
	mu  sync.Mutex
	cur *Table
	gen uint64
}

// Get returns the current table with a reference the caller must Release,
// and its generation (bumped on every Set). It returns nil if none is set.
func (h *Holder) Get() (*Table, uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.cur.Acquire(), h.gen
}

// Set replaces the current table (taking over the caller's reference) and
// drops the holder's reference on the old one.
func (h *Holder) Set(t *Table) {
	h.mu.Lock()
	old := h.cur
	h.cur = t
	h.gen++
	h.mu.Unlock()
	old.Release()
}

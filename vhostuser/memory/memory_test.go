package memory

import (
	"errors"
	"math"
	"testing"

	"golang.org/x/sys/unix"
)

func mustRegion(t *testing.T, gpa, uva uint64, size int) *Region {
	t.Helper()
	r, err := NewRegion(RegionDesc{GuestAddr: gpa, UserAddr: uva}, make([]byte, size))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestTranslate(t *testing.T) {
	a := mustRegion(t, 0x1000, 0x7000_0000, 0x1000)
	b := mustRegion(t, 0x2000, 0x9000_0000, 0x1000) // adjacent in GPA, not in UVA
	tbl, err := NewTable([]*Region{b, a})
	if err != nil {
		t.Fatal(err)
	}
	defer tbl.Release()
	tests := []struct {
		name    string
		va      bool
		addr, n uint64
		ok      bool
	}{
		{"start", false, 0x1000, 0x10, true},
		{"whole", false, 0x1000, 0x1000, true},
		{"below", false, 0xfff, 1, false},
		{"cross regions not contiguous for Slice", false, 0x1ff0, 0x20, false},
		{"past end", false, 0x2fff, 2, false},
		{"huge length", false, 0x1000, math.MaxUint64, false},
		{"wrap", false, math.MaxUint64, 2, false},
		{"va", true, 0x9000_0ff0, 0x10, true},
		{"va past", true, 0x9000_0ff0, 0x11, false},
		{"va gpa space", true, 0x1000, 1, false},
		{"empty mapped", false, 0x1000, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var b []byte
			var err error
			if tc.va {
				b, err = tbl.SliceVA(tc.addr, tc.n)
			} else {
				b, err = tbl.Slice(tc.addr, tc.n)
			}
			if tc.ok != (err == nil) {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if err == nil && uint64(len(b)) != tc.n {
				t.Fatalf("len %d, want %d", len(b), tc.n)
			}
			if err != nil && !errors.Is(err, ErrBadAddress) {
				t.Fatalf("error %v does not wrap ErrBadAddress", err)
			}
		})
	}
	iov, err := tbl.AppendIovecs(nil, 0x1ff0, 0x20)
	if err != nil || len(iov) != 2 || len(iov[0]) != 0x10 || len(iov[1]) != 0x10 {
		t.Fatalf("spanning iovecs = %v, %v", len(iov), err)
	}
	if _, err := tbl.AppendIovecs(nil, 0x2ff0, 0x20); err == nil {
		t.Fatal("iovecs past the end accepted")
	}
	if _, err := tbl.AppendIovecs(nil, math.MaxUint64-4, 10); err == nil {
		t.Fatal("wrapping iovecs accepted")
	}
}

func TestOverlapRejected(t *testing.T) {
	a := mustRegion(t, 0x1000, 0x10000, 0x1000)
	b := mustRegion(t, 0x1800, 0x20000, 0x1000)
	if _, err := NewTable([]*Region{a, b}); err == nil {
		t.Fatal("gpa overlap accepted")
	}
	c := mustRegion(t, 0x8000, 0x10800, 0x1000)
	if _, err := NewTable([]*Region{a, c}); err == nil {
		t.Fatal("uva overlap accepted")
	}
}

func TestCheck(t *testing.T) {
	bad := []RegionDesc{
		{Size: 0},
		{GuestAddr: math.MaxUint64, Size: 2},
		{UserAddr: math.MaxUint64 - 1, Size: 3},
		{MmapOffset: math.MaxUint64, Size: 1},
	}
	for _, d := range bad {
		if d.Check() == nil {
			t.Errorf("%+v accepted", d)
		}
	}
}

func TestMapRegionMemfd(t *testing.T) {
	fd, err := unix.MemfdCreate("guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 3*4096); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Pwrite(fd, []byte("guest!"), 4096+100); err != nil {
		t.Fatal(err)
	}
	// Offset not page aligned, as QEMU may send.
	r, err := MapRegion(RegionDesc{GuestAddr: 0x10000, Size: 8192 - 100, UserAddr: 0x5000_0000, MmapOffset: 4096 + 100}, fd)
	if err != nil {
		t.Fatal(err)
	}
	tbl, err := NewTable([]*Region{r})
	if err != nil {
		t.Fatal(err)
	}
	b, err := tbl.Slice(0x10000, 6)
	if err != nil || string(b) != "guest!" {
		t.Fatalf("got %q, %v", b, err)
	}
	held := tbl.Acquire()
	tbl.Release()
	if b, _ := held.Slice(0x10000, 6); string(b) != "guest!" {
		t.Fatal("mapping gone while a reference is held")
	}
	held.Release()
	// A region larger than the file would SIGBUS on access: refused.
	if _, err := MapRegion(RegionDesc{GuestAddr: 0, Size: 4 * 4096, UserAddr: 1 << 30}, fd); err == nil {
		t.Fatal("region past the end of the file accepted")
	}
}

func TestHolder(t *testing.T) {
	var h Holder
	if tb, _ := h.Get(); tb != nil {
		t.Fatal("empty holder returned a table")
	}
	tbl, _ := NewTable([]*Region{mustRegion(t, 0, 0, 16)})
	h.Set(tbl)
	got, gen := h.Get()
	if got != tbl || gen != 1 {
		t.Fatalf("got %p gen %d", got, gen)
	}
	got.Release()
	h.Set(nil)
	if tbl.refs.Load() != 0 {
		t.Fatalf("refs = %d after holder dropped it", tbl.refs.Load())
	}
}

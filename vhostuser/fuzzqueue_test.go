package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/vhostuser/memory"
	"github.com/rafsd/rafsd/vhostuser/virtqueue"
)

// memRoot is a small read-only in-memory tree: fuzzed requests cannot
// touch the host file system.
type memRoot struct{ fs.Inode }

func (r *memRoot) OnAdd(ctx context.Context) {
	f := r.NewPersistentInode(ctx, &fs.MemRegularFile{Data: []byte("hello, fuzz\n"), Attr: fuse.Attr{Mode: 0o444}}, fs.StableAttr{})
	r.AddChild("hello.txt", f, false)
	d := r.NewPersistentInode(ctx, &fs.Inode{}, fs.StableAttr{Mode: fuse.S_IFDIR})
	r.AddChild("dir", d, false)
}

const (
	fzBase  = 0x100000
	fzSize  = 8
	fzDesc  = 0x0
	fzAvail = 0x80
	fzUsed  = 0xa0
	fzData  = 0xf0
	fzMem   = 0x1000
)

// fuzzRing builds a seed: chains of (request, reply buffer) pairs.
func fuzzRing(reqs [][]byte, indirect bool) []byte {
	mem := make([]byte, fzMem)
	next := uint64(fzData)
	put := func(b []byte) uint64 {
		off := next
		copy(mem[off:], b)
		next += (uint64(len(b)) + 7) &^ 7
		return off
	}
	d := 0
	for i, r := range reqs {
		in := put(r)
		out := put(make([]byte, 160))
		table, idx, head := mem[fzDesc:], d, d
		if indirect {
			it := put(make([]byte, 32))
			putDescAt(mem[fzDesc:], d, desc{addr: fzBase + it, len: 32, flags: virtqueue.DescFIndirect}, true, 0)
			table, idx = mem[it:], 0
			d++
		} else {
			d += 2
		}
		putDescAt(table, idx, desc{addr: fzBase + in, len: uint32(len(r))}, false, uint16(idx+1))
		putDescAt(table, idx+1, desc{addr: fzBase + out, len: 160, write: true}, true, 0)
		binary.LittleEndian.PutUint16(mem[fzAvail+4+2*i:], uint16(head))
	}
	binary.LittleEndian.PutUint16(mem[fzAvail+2:], uint16(len(reqs)))
	return mem[:next]
}

// TestFuzzSeedsAreValid keeps the fuzz seeds meaningful: every chain of
// the seed rings decodes and gets a successful FUSE reply.
func TestFuzzSeedsAreValid(t *testing.T) {
	dev := NewFSDevice(fs.NewNodeFS(&memRoot{}, &fs.Options{}), FSOptions{Logger: discardLogger()})
	for _, indirect := range []bool{false, true} {
		reqs := fuzzSeedRequests()
		if !indirect {
			reqs = reqs[:4]
		}
		buf := make([]byte, fzMem)
		copy(buf, fuzzRing(reqs, indirect))
		r, _ := memory.NewRegion(memory.RegionDesc{GuestAddr: fzBase, UserAddr: fzBase}, buf)
		tbl, _ := memory.NewTable([]*memory.Region{r})
		q, err := virtqueue.New(tbl, virtqueue.Config{Size: fzSize, DescAddr: fzBase + fzDesc, AvailAddr: fzBase + fzAvail, UsedAddr: fzBase + fzUsed, Features: virtqueue.FeatureIndirectDesc}, 0)
		if err != nil {
			t.Fatal(err)
		}
		dev.Reset()
		for i := range reqs {
			c, err := q.Pop()
			if err != nil || c == nil {
				t.Fatalf("indirect=%v chain %d: %v", indirect, i, err)
			}
			n := dev.Handle(1, c)
			out := make([]byte, 16)
			copyFrom(out, c.Writable)
			if n < 16 || binary.LittleEndian.Uint32(out[4:]) != 0 {
				t.Fatalf("indirect=%v chain %d: reply len %d status %d", indirect, i, n, int32(binary.LittleEndian.Uint32(out[4:])))
			}
		}
	}
}

func fuzzSeedRequests() [][]byte {
	init := fuse.InitIn{Major: 7, Minor: 31, Flags: fuse.CAP_READDIRPLUS}
	rin := fuse.ReadIn{Size: 100}
	oin := fuse.OpenIn{}
	return [][]byte{
		fuseReq(opInit, 0, structBody(&init), nil),
		fuseReq(opLookup, 1, nil, cstr("hello.txt")),
		fuseReq(opOpen, 2, structBody(&oin), nil),
		fuseReq(opRead, 2, structBody(&rin), nil),
		fuseReq(opOpendir, 1, structBody(&oin), nil),
		fuseReq(opReaddirplus, 1, structBody(&rin), nil),
	}
}

// FuzzFSQueue: random descriptor tables, rings, addresses and FUSE
// requests in guest memory, popped and handled by the virtio-fs device
// exactly as the queue worker does. No panic, no out-of-bounds access, and
// the used length never exceeds the writable buffers.
func FuzzFSQueue(f *testing.F) {
	// go-fuse's node bridge log.Panic()s on unknown node ids (and recovers
	// into EIO); a fuzz worker's stderr is not drained, so silence it.
	log.SetOutput(io.Discard)
	dev := NewFSDevice(fs.NewNodeFS(&memRoot{}, &fs.Options{}), FSOptions{Logger: discardLogger()})
	reqs := fuzzSeedRequests()
	f.Add(fuzzRing(reqs[:4], false), uint64(virtqueue.FeatureIndirectDesc|virtqueue.FeatureEventIdx))
	f.Add(fuzzRing(reqs, true), uint64(virtqueue.FeatureIndirectDesc))
	f.Add(fuzzRing(reqs[1:2], false), uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, features uint64) {
		buf := make([]byte, fzMem)
		copy(buf, data)
		r, err := memory.NewRegion(memory.RegionDesc{GuestAddr: fzBase, UserAddr: fzBase}, buf)
		if err != nil {
			t.Fatal(err)
		}
		tbl, err := memory.NewTable([]*memory.Region{r})
		if err != nil {
			t.Fatal(err)
		}
		q, err := virtqueue.New(tbl, virtqueue.Config{Size: fzSize, DescAddr: fzBase + fzDesc, AvailAddr: fzBase + fzAvail, UsedAddr: fzBase + fzUsed, Features: features}, 0)
		if err != nil {
			t.Fatal(err)
		}
		dev.Reset()
		for i := 0; i < fzSize; i++ {
			c, err := q.Pop()
			var ce *virtqueue.ChainError
			var n uint32
			switch {
			case errors.As(err, &ce):
				c = ce.Chain
				n = dev.Fail(1, c, ce.Err)
			case err != nil:
				return
			case c == nil:
				return
			default:
				n = dev.Handle(1, c)
			}
			if _, w := c.Len(); int(n) > w {
				t.Fatalf("used len %d > writable %d", n, w)
			}
			q.Push(c.Head, n)
		}
	})
}

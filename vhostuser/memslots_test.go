package vhostuser

import (
	"encoding/binary"
	"testing"
)

func regionPayload(gpa, size, uva, off uint64) []byte {
	p := make([]byte, 8) // padding
	for _, v := range []uint64{gpa, size, uva, off} {
		p = binary.LittleEndian.AppendUint64(p, v)
	}
	return p
}

// TestMemorySlots: guest memory given as two regions with ADD_MEM_REG
// (CONFIGURE_MEM_SLOTS), requests whose buffers live in either; then the
// table is replaced while the rings run (QEMU does this on memory hotplug)
// and a removed region is no longer reachable.
func TestMemorySlots(t *testing.T) {
	dir, big := testTree(t)
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{})
	fe := dialFrontend(t, sock)
	fe.negotiate(^uint64(0))
	if fe.proto&protoConfigureMemSlot == 0 {
		t.Fatal("CONFIGURE_MEM_SLOTS not offered")
	}
	if n := fe.getU64(reqGetMaxMemSlots); n < 8 {
		t.Fatalf("GET_MAX_MEM_SLOTS = %d", n)
	}
	// Low half and high half of the memfd as two regions, with a hole
	// between them in guest-physical space.
	const half = feMemSize / 2
	const hole = 0x1000_0000
	fe.mustAck(reqAddMemReg, regionPayload(fe.gpa, half, fe.uva, 0), fe.memfd)
	fe.mustAck(reqAddMemReg, regionPayload(fe.gpa+half+hole, half, fe.uva+half, half), fe.memfd)
	if st := fe.ack(reqAddMemReg, regionPayload(fe.gpa+10, 4096, fe.uva+feMemSize, 0), fe.memfd); st == 0 {
		t.Fatal("overlapping region accepted")
	}
	fe.setupQueues(2)
	s := &session{t: t, fe: fe, q: 1}
	s.init()
	e := s.lookup(1, "big.bin")
	fh := s.open(opOpen, e.NodeId)

	// A READ whose reply buffer is in the upper region.
	q := fe.queues[1]
	readInto := func(outOff uint64, gpa uint64) (uint32, bool) {
		req := readReq(e.NodeId, fh, 4096, 1000)
		in := fe.alloc(len(req))
		copy(fe.mem[in:], req)
		fe.submit(q, []desc{{addr: fe.gpaOf(in), len: uint32(len(req))}, {addr: gpa, len: 1016, write: true}}, false)
		_, n, ok := fe.waitUsed(q, 5e9)
		return n, ok
	}
	hi := uint64(half + 4096)
	if n, ok := readInto(hi, fe.gpa+half+hole+4096); !ok || n != 1016 {
		t.Fatalf("read into upper region: ok=%v n=%d", ok, n)
	}
	if got := mustOK(t, fe.mem[hi:hi+1016]); string(got) != string(big[4096:5096]) {
		t.Fatal("wrong bytes in upper region")
	}

	// Remove the upper region while the rings run: the same request now
	// fails (no writable buffer could be mapped) and the queue lives on.
	fe.mustAck(reqRemMemReg, regionPayload(fe.gpa+half+hole, half, fe.uva+half, 0))
	if n, ok := readInto(hi, fe.gpa+half+hole+4096); !ok || n != 0 {
		t.Fatalf("read into removed region: ok=%v n=%d", ok, n)
	}
	s.lookup(1, "hello.txt")

	// SET_MEM_TABLE replacing everything while running (one region again).
	fe.setMemTable()
	s.lookup(1, "hello.txt")
	if n, ok := readInto(hi, fe.gpa+hi); !ok || n != 1016 {
		t.Fatalf("read after table replacement: ok=%v n=%d", ok, n)
	}
}

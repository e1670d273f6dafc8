package vhostuser

import (
	"encoding/binary"
	"fmt"
	"net"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/vhostuser/virtqueue"
)

// frontend is a vhost-user front end written for the tests: it plays the
// VMM (guest memory in a memfd, rings, eventfds) and the guest driver
// (descriptor chains carrying FUSE requests).
type frontend struct {
	t      testing.TB
	c      *net.UnixConn
	memfd  int
	mem    []byte
	gpa    uint64 // guest-physical base of mem
	uva    uint64 // "front-end virtual" base of mem (deliberately != gpa)
	next   uint64 // bump allocator for buffers
	queues []*fq
	proto  uint64
}

// fq is one virtqueue as the driver sees it.
type fq struct {
	idx                int
	size               uint16
	desc, avail, used  uint64 // offsets in mem
	kick, call, errFd  int
	nextDesc, availIdx uint16
	lastUsed           uint16
}

const (
	feMemSize = 8 << 20
	feGPA     = 0x4000_0000
	feUVA     = 0x7f00_0000_0000
	feQSize   = 64
	bufArea   = 1 << 20 // buffers are allocated above this offset
)

func dialFrontend(t testing.TB, sock string) *frontend {
	t.Helper()
	var c net.Conn
	var err error
	for i := 0; i < 100; i++ {
		if c, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	fe := newFrontend(t, c.(*net.UnixConn))
	return fe
}

func newFrontend(t testing.TB, c *net.UnixConn) *frontend {
	fd, err := unix.MemfdCreate("guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, feMemSize); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, feMemSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	fe := &frontend{t: t, c: c, memfd: fd, mem: mem, gpa: feGPA, uva: feUVA, next: bufArea}
	t.Cleanup(fe.close)
	return fe
}

func (fe *frontend) close() {
	if fe.c != nil {
		fe.c.Close()
		fe.c = nil
	}
	for _, q := range fe.queues {
		unix.Close(q.kick)
		unix.Close(q.call)
		unix.Close(q.errFd)
	}
	fe.queues = nil
	if fe.mem != nil {
		unix.Munmap(fe.mem)
		unix.Close(fe.memfd)
		fe.mem = nil
	}
}

// send writes one message; fds ride along via SCM_RIGHTS.
func (fe *frontend) send(req uint32, flags uint32, payload []byte, fds ...int) {
	fe.t.Helper()
	b := make([]byte, headerSize+len(payload))
	binary.LittleEndian.PutUint32(b, req)
	binary.LittleEndian.PutUint32(b[4:], flagVersion|flags)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[headerSize:], payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := fe.c.WriteMsgUnix(b, oob, nil); err != nil {
		fe.t.Fatalf("send %s: %v", reqName(req), err)
	}
}

// recv reads one reply to req.
func (fe *frontend) recv(req uint32) []byte {
	fe.t.Helper()
	fe.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer fe.c.SetReadDeadline(time.Time{})
	var h [headerSize]byte
	if _, err := readAll(fe.c, h[:]); err != nil {
		fe.t.Fatalf("reply to %s: %v", reqName(req), err)
	}
	if got := binary.LittleEndian.Uint32(h[:]); got != req {
		fe.t.Fatalf("reply for %s, want %s", reqName(got), reqName(req))
	}
	if f := binary.LittleEndian.Uint32(h[4:]); f != flagVersion|flagReply {
		fe.t.Fatalf("reply flags %#x", f)
	}
	p := make([]byte, binary.LittleEndian.Uint32(h[8:]))
	if _, err := readAll(fe.c, p); err != nil {
		fe.t.Fatalf("reply payload: %v", err)
	}
	return p
}

func readAll(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// call sends a request that wants REPLY_ACK and returns the ack status.
func (fe *frontend) ack(req uint32, payload []byte, fds ...int) uint64 {
	fe.t.Helper()
	fe.send(req, flagNeedReply, payload, fds...)
	p := fe.recv(req)
	if len(p) != 8 {
		fe.t.Fatalf("ack for %s: %d bytes", reqName(req), len(p))
	}
	return binary.LittleEndian.Uint64(p)
}

func (fe *frontend) mustAck(req uint32, payload []byte, fds ...int) {
	fe.t.Helper()
	if st := fe.ack(req, payload, fds...); st != 0 {
		fe.t.Fatalf("%s failed (status %d)", reqName(req), st)
	}
}

func (fe *frontend) getU64(req uint32) uint64 {
	fe.t.Helper()
	fe.send(req, 0, nil)
	p := fe.recv(req)
	if len(p) != 8 {
		fe.t.Fatalf("%s reply: %d bytes", reqName(req), len(p))
	}
	return binary.LittleEndian.Uint64(p)
}

func vstate(idx, num uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, idx)
	return binary.LittleEndian.AppendUint32(b, num)
}

// negotiate runs the feature handshake QEMU does.
func (fe *frontend) negotiate(features uint64) {
	fe.t.Helper()
	offered := fe.getU64(reqGetFeatures)
	if offered&FeatureProtocolFeatures == 0 || offered&FeatureVersion1 == 0 {
		fe.t.Fatalf("offered features %#x", offered)
	}
	fe.proto = fe.getU64(reqGetProtocolFeatures) & (protoReplyAck | protoMQ | protoConfig | protoConfigureMemSlot | protoResetDevice)
	fe.send(reqSetProtocolFeatures, 0, u64Bytes(fe.proto))
	fe.mustAck(reqSetOwner, nil)
	fe.mustAck(reqSetFeatures, u64Bytes(offered&features|FeatureProtocolFeatures))
}

func (fe *frontend) setMemTable() {
	fe.t.Helper()
	p := binary.LittleEndian.AppendUint32(nil, 1)
	p = binary.LittleEndian.AppendUint32(p, 0)
	for _, v := range []uint64{fe.gpa, feMemSize, fe.uva, 0} {
		p = binary.LittleEndian.AppendUint64(p, v)
	}
	fe.mustAck(reqSetMemTable, p, fe.memfd)
}

// setupQueues lays out n rings at the bottom of guest memory and starts
// them (NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE).
func (fe *frontend) setupQueues(n int) {
	fe.t.Helper()
	for i := 0; i < n; i++ {
		q := &fq{idx: i, size: feQSize}
		base := uint64(i) * 0x4000
		q.desc, q.avail, q.used = base, base+0x1000, base+0x2000
		for _, p := range []*int{&q.kick, &q.call, &q.errFd} {
			fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
			if err != nil {
				fe.t.Fatal(err)
			}
			*p = fd
		}
		fe.queues = append(fe.queues, q)
		fe.startQueue(q, 0)
	}
}

func (fe *frontend) startQueue(q *fq, base uint16) {
	fe.t.Helper()
	i := uint32(q.idx)
	fe.mustAck(reqSetVringNum, vstate(i, uint32(q.size)))
	fe.mustAck(reqSetVringBase, vstate(i, uint32(base)))
	addr := binary.LittleEndian.AppendUint32(nil, i)
	addr = binary.LittleEndian.AppendUint32(addr, 0)
	for _, v := range []uint64{fe.uva + q.desc, fe.uva + q.used, fe.uva + q.avail, 0} {
		addr = binary.LittleEndian.AppendUint64(addr, v)
	}
	fe.mustAck(reqSetVringAddr, addr)
	fe.mustAck(reqSetVringCall, u64Bytes(uint64(i)), q.call)
	fe.mustAck(reqSetVringErr, u64Bytes(uint64(i)), q.errFd)
	fe.mustAck(reqSetVringKick, u64Bytes(uint64(i)), q.kick)
	fe.mustAck(reqSetVringEnable, vstate(i, 1))
}

// getVringBase stops ring i and returns its next avail index.
func (fe *frontend) getVringBase(i int) uint16 {
	fe.t.Helper()
	fe.send(reqGetVringBase, 0, vstate(uint32(i), 0))
	p := fe.recv(reqGetVringBase)
	if len(p) != 8 || binary.LittleEndian.Uint32(p) != uint32(i) {
		fe.t.Fatalf("GET_VRING_BASE reply %x", p)
	}
	return uint16(binary.LittleEndian.Uint32(p[4:]))
}

// connect does the whole device start-up with nq queues.
func (fe *frontend) connect(nq int) {
	fe.negotiate(^uint64(0))
	fe.setMemTable()
	fe.setupQueues(nq)
}

// alloc returns the offset of n fresh bytes of guest memory (8-aligned).
func (fe *frontend) alloc(n int) uint64 {
	n = (n + 63) &^ 63
	if fe.next+uint64(n) > feMemSize {
		fe.next = bufArea
	}
	off := fe.next
	fe.next += uint64(n)
	return off
}

// desc is a descriptor to put in a chain: guest address and length (use
// gpaOf for memory offsets) plus whether the device may write it.
type desc struct {
	addr  uint64
	len   uint32
	write bool
	flags uint16 // extra flags
	loop  bool   // link to next instead of the following descriptor
	next  uint16
}

func (fe *frontend) gpaOf(off uint64) uint64 { return fe.gpa + off }

func putDescAt(b []byte, i int, d desc, last bool, next uint16) {
	e := b[16*i:]
	binary.LittleEndian.PutUint64(e, d.addr)
	binary.LittleEndian.PutUint32(e[8:], d.len)
	flags := d.flags
	if d.write {
		flags |= virtqueue.DescFWrite
	}
	if !last {
		flags |= virtqueue.DescFNext
	}
	if d.loop {
		next = d.next
		flags |= virtqueue.DescFNext
	}
	binary.LittleEndian.PutUint16(e[12:], flags)
	binary.LittleEndian.PutUint16(e[14:], next)
}

// submit puts a chain on q's avail ring and kicks. With indirect the
// descriptors go to an indirect table referenced by one ring descriptor.
func (fe *frontend) submit(q *fq, ds []desc, indirect bool) uint16 {
	head := q.nextDesc
	table := fe.mem[q.desc : q.desc+16*uint64(q.size)]
	if indirect {
		off := fe.alloc(16 * len(ds))
		it := fe.mem[off : off+16*uint64(len(ds))]
		for i, d := range ds {
			putDescAt(it, i, d, i == len(ds)-1, uint16(i+1))
		}
		putDescAt(table, int(head), desc{addr: fe.gpaOf(off), len: uint32(16 * len(ds)), flags: virtqueue.DescFIndirect}, true, 0)
		q.nextDesc = (q.nextDesc + 1) % q.size
	} else {
		for i, d := range ds {
			idx := (int(head) + i) % int(q.size)
			putDescAt(table, idx, d, i == len(ds)-1, uint16((idx+1)%int(q.size)))
		}
		q.nextDesc = uint16((int(q.nextDesc) + len(ds)) % int(q.size))
	}
	fe.publish(q, head)
	return head
}

func (fe *frontend) publish(q *fq, head uint16) {
	binary.LittleEndian.PutUint16(fe.mem[q.avail+4+2*uint64(q.availIdx%q.size):], head)
	q.availIdx++
	// used_event: we want an interrupt for every completion.
	binary.LittleEndian.PutUint16(fe.mem[q.avail+4+2*uint64(q.size):], q.lastUsed)
	binary.LittleEndian.PutUint16(fe.mem[q.avail+2:], q.availIdx)
	fe.kick(q)
}

func (fe *frontend) kick(q *fq) {
	if _, err := unix.Write(q.kick, u64Bytes(1)); err != nil {
		fe.t.Fatal(err)
	}
}

// waitUsed waits for the next used element of q and returns (id, len).
func (fe *frontend) waitUsed(q *fq, timeout time.Duration) (uint16, uint32, bool) {
	deadline := time.Now().Add(timeout)
	for {
		if idx := binary.LittleEndian.Uint16(fe.mem[q.used+2:]); idx != q.lastUsed {
			e := fe.mem[q.used+4+8*uint64(q.lastUsed%q.size):]
			q.lastUsed++
			binary.LittleEndian.PutUint16(fe.mem[q.avail+4+2*uint64(q.size):], q.lastUsed)
			return uint16(binary.LittleEndian.Uint32(e)), binary.LittleEndian.Uint32(e[4:]), true
		}
		if time.Now().After(deadline) {
			return 0, 0, false
		}
		fds := []unix.PollFd{{Fd: int32(q.call), Events: unix.POLLIN}}
		if n, _ := unix.Poll(fds, 10); n > 0 {
			var b [8]byte
			unix.Read(q.call, b[:])
		}
	}
}

// fuseCall sends one FUSE request on queue qi, with the reply spread over
// outSplit writable descriptors (sizes), and returns the reply bytes.
func (fe *frontend) fuseCall(qi int, req []byte, inSplit []int, outSplit []int, indirect bool) []byte {
	fe.t.Helper()
	q := fe.queues[qi]
	var ds []desc
	var outOffs []uint64
	rest := req
	for i, n := range inSplit {
		if i == len(inSplit)-1 {
			n = len(rest)
		}
		off := fe.alloc(n)
		copy(fe.mem[off:], rest[:n])
		rest = rest[n:]
		ds = append(ds, desc{addr: fe.gpaOf(off), len: uint32(n)})
	}
	for _, n := range outSplit {
		off := fe.alloc(n)
		clear(fe.mem[off : off+uint64(n)])
		outOffs = append(outOffs, off)
		ds = append(ds, desc{addr: fe.gpaOf(off), len: uint32(n), write: true})
	}
	head := fe.submit(q, ds, indirect)
	id, n, ok := fe.waitUsed(q, 10*time.Second)
	if !ok {
		fe.t.Fatalf("no completion on queue %d", qi)
	}
	if id != head {
		fe.t.Fatalf("completed head %d, want %d", id, head)
	}
	var out []byte
	for i, off := range outOffs {
		out = append(out, fe.mem[off:off+uint64(outSplit[i])]...)
	}
	if int(n) > len(out) {
		fe.t.Fatalf("used len %d > writable %d", n, len(out))
	}
	return out[:n]
}

// FUSE opcodes used by the tests.
const (
	opLookup      = 1
	opGetattr     = 3
	opOpen        = 14
	opRead        = 15
	opRelease     = 18
	opInit        = 26
	opOpendir     = 27
	opReaddirplus = 44
)

var unique uint64

// fuseReq builds a request: the in header followed by the op's struct body
// (bytes after the header of a go-fuse XxxIn struct) and extra bytes.
func fuseReq(op uint32, node uint64, body []byte, extra []byte) []byte {
	unique++
	n := 40 + len(body) + len(extra)
	b := make([]byte, 40, n)
	binary.LittleEndian.PutUint32(b, uint32(n))
	binary.LittleEndian.PutUint32(b[4:], op)
	binary.LittleEndian.PutUint64(b[8:], unique)
	binary.LittleEndian.PutUint64(b[16:], node)
	b = append(b, body...)
	return append(b, extra...)
}

// structBody returns the bytes of a go-fuse XxxIn struct after its embedded
// 40-byte InHeader.
func structBody[T any](v *T) []byte {
	b := unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
	return append([]byte(nil), b[40:]...)
}

func fromBytes[T any](b []byte) *T {
	var v T
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&v)), unsafe.Sizeof(v)), b)
	return &v
}

// replyStatus checks the out header and returns (errno, body).
func replyStatus(t testing.TB, r []byte) (int32, []byte) {
	t.Helper()
	if len(r) < 16 {
		t.Fatalf("reply of %d bytes", len(r))
	}
	if l := binary.LittleEndian.Uint32(r); int(l) != len(r) {
		t.Fatalf("out header length %d, used len %d", l, len(r))
	}
	return int32(binary.LittleEndian.Uint32(r[4:])), r[16:]
}

func mustOK(t testing.TB, r []byte) []byte {
	t.Helper()
	st, body := replyStatus(t, r)
	if st != 0 {
		t.Fatalf("fuse error %d", st)
	}
	return body
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func (fe *frontend) String() string { return fmt.Sprintf("frontend(%d queues)", len(fe.queues)) }

// Package vhostuser is the back-end side of the vhost-user protocol over a
// unix socket, serving virtio devices (virtio-fs, see FSDevice) to a front
// end such as QEMU or Cloud Hypervisor.
//
// One front end is served at a time; when it disconnects the server goes
// back to accepting, so a restarted VMM reconnects without restarting the
// daemon. Everything the front end and guest send is untrusted: malformed
// messages get an error reply (REPLY_ACK) or end the connection, malformed
// descriptor chains fail their request or mark only their queue broken.
package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/vhostuser/memory"
	"github.com/rafsd/rafsd/vhostuser/virtqueue"
)

// Device is a virtio device served over vhost-user.
type Device interface {
	// Features returns the virtio feature bits the device offers
	// (including ring features such as VIRTIO_RING_F_EVENT_IDX).
	Features() uint64
	// NumQueues is the largest number of virtqueues the device supports.
	NumQueues() int
	// Config returns the device configuration space.
	Config() []byte
	// Reset starts a fresh device session (new front end, RESET_DEVICE).
	Reset()
	// Handle processes one chain popped from queue q and returns the
	// number of bytes written to its writable buffers. It is called
	// concurrently.
	Handle(q int, c *virtqueue.Chain) uint32
	// Fail answers a malformed chain (err says why), writing an error reply
	// into c.Writable if the device protocol allows; it returns the bytes
	// written.
	Fail(q int, c *virtqueue.Chain, err error) uint32
}

// Options tune a back end.
type Options struct {
	// Workers bounds the requests handled concurrently per queue
	// (default 8).
	Workers int
	// Logger receives protocol errors (default slog.Default()).
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// Serve accepts front ends on l one at a time and serves dev to each until
// ctx ends; it then closes l and returns nil (or the accept error).
func Serve(ctx context.Context, l *net.UnixListener, dev Device, opts Options) error {
	opts = opts.withDefaults()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("vhost-user accept: %w", err)
		}
		opts.Logger.Info("vhost-user front end connected")
		err = ServeConn(ctx, c, dev, opts)
		opts.Logger.Info("vhost-user front end disconnected", "reason", err)
		if ctx.Err() != nil {
			return nil
		}
	}
}

// ServeConn serves dev to the front end on c until it disconnects, a
// protocol error makes the stream unusable, or ctx ends. It closes c and
// stops all rings before returning.
func ServeConn(ctx context.Context, c *net.UnixConn, dev Device, opts Options) error {
	opts = opts.withDefaults()
	b := &backend{dev: dev, log: opts.Logger, workers: opts.Workers, c: c}
	b.vrings = make([]*vring, dev.NumQueues())
	for i := range b.vrings {
		b.vrings[i] = &vring{b: b, index: i, call: -1, errFd: -1}
	}
	dev.Reset()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	defer b.shutdown()
	for {
		m, err := readMessage(c)
		if err != nil {
			if errors.Is(err, errClosed) || ctx.Err() != nil {
				return errClosed
			}
			b.log.Warn("vhost-user: bad message, dropping front end", "err", err)
			return err
		}
		if err := b.handle(m); err != nil {
			return err
		}
	}
}

type backend struct {
	dev      Device
	log      *slog.Logger
	workers  int
	c        *net.UnixConn
	features uint64
	protocol uint64
	mem      memory.Holder
	regions  []*memory.Region
	vrings   []*vring
}

// errNoReply marks a handled request whose own reply was already sent.
var errNoReply = errors.New("replied")

// handle dispatches one message. A non-nil return ends the connection.
func (b *backend) handle(m *message) error {
	defer m.closeFds()
	b.log.Debug("vhost-user request", "request", reqName(m.Request), "size", m.Size, "fds", len(m.Fds))
	err := b.dispatch(m)
	if err == errNoReply {
		return nil
	}
	if err != nil {
		b.log.Warn("vhost-user request failed", "request", reqName(m.Request), "err", err)
	}
	if m.Flags&flagNeedReply != 0 && b.protocol&protoReplyAck != 0 {
		var status uint64
		if err != nil {
			status = 1
		}
		if werr := writeReply(b.c, m.Request, u64Bytes(status)); werr != nil {
			return fmt.Errorf("reply %s: %w", reqName(m.Request), werr)
		}
	}
	return nil
}

func (b *backend) reply(m *message, p []byte) error {
	if err := writeReply(b.c, m.Request, p); err != nil {
		return fmt.Errorf("reply %s: %w", reqName(m.Request), err)
	}
	return errNoReply
}

func (b *backend) offered() uint64 { return b.dev.Features() | FeatureProtocolFeatures }

func (b *backend) vring(idx uint32) (*vring, error) {
	if idx >= uint32(len(b.vrings)) {
		return nil, fmt.Errorf("vring index %d out of %d", idx, len(b.vrings))
	}
	return b.vrings[idx], nil
}

func (b *backend) dispatch(m *message) error {
	switch m.Request {
	case reqGetFeatures:
		return b.replyErr(m, b.reply(m, u64Bytes(b.offered())))
	case reqSetFeatures:
		f, err := m.u64()
		if err != nil {
			return err
		}
		if f&^b.offered() != 0 {
			return fmt.Errorf("features %#x not offered (%#x)", f&^b.offered(), b.offered())
		}
		b.features = f
		return nil
	case reqGetProtocolFeatures:
		return b.replyErr(m, b.reply(m, u64Bytes(supportedProtocolFeatures)))
	case reqSetProtocolFeatures:
		f, err := m.u64()
		if err != nil {
			return err
		}
		if f&^supportedProtocolFeatures != 0 {
			return fmt.Errorf("protocol features %#x not offered", f&^supportedProtocolFeatures)
		}
		b.protocol = f
		return nil
	case reqGetQueueNum:
		return b.reply(m, u64Bytes(uint64(len(b.vrings))))
	case reqGetMaxMemSlots:
		return b.reply(m, u64Bytes(maxMemSlots))
	case reqSetOwner:
		return nil
	case reqResetOwner, reqResetDevice:
		b.reset()
		return nil
	case reqSetMemTable:
		return b.setMemTable(m)
	case reqAddMemReg:
		return b.addMemReg(m)
	case reqRemMemReg:
		return b.remMemReg(m)
	case reqSetLogBase:
		// Migration dirty logging is not offered (no LOG_SHMFD, no
		// VHOST_F_LOG_ALL); the reply reports failure.
		return b.reply(m, u64Bytes(1))
	case reqSetLogFd, reqSetBackendReqFd:
		return fmt.Errorf("%s not supported", reqName(m.Request))
	case reqSetVringNum, reqSetVringBase, reqSetVringEnable:
		s, err := m.vringState()
		if err != nil {
			return err
		}
		vr, err := b.vring(s.Index)
		if err != nil {
			return err
		}
		return vr.setState(m.Request, s.Num)
	case reqSetVringAddr:
		a, err := m.vringAddr()
		if err != nil {
			return err
		}
		vr, err := b.vring(a.Index)
		if err != nil {
			return err
		}
		if a.Flags&1 != 0 {
			return errors.New("vring logging requested but not offered")
		}
		return vr.restartWith(func() { vr.addr, vr.addrSet = a, true })
	case reqGetVringBase:
		s, err := m.vringState()
		if err != nil {
			b.reply(m, make([]byte, 8))
			return err
		}
		vr, err := b.vring(s.Index)
		if err != nil {
			b.reply(m, m.Payload)
			return err
		}
		base := vr.stopRing()
		p := u64Bytes(uint64(s.Index) | uint64(base)<<32)
		return b.reply(m, p)
	case reqSetVringKick, reqSetVringCall, reqSetVringErr:
		return b.setVringFd(m)
	case reqGetConfig:
		return b.getConfig(m)
	case reqSetConfig:
		return errors.New("device config space is read-only")
	default:
		return fmt.Errorf("unsupported request %s", reqName(m.Request))
	}
}

// replyErr passes through errNoReply or a write error.
func (b *backend) replyErr(_ *message, err error) error { return err }

func (b *backend) getConfig(m *message) error {
	c, err := m.config()
	if err != nil {
		b.reply(m, m.Payload[:min(len(m.Payload), 12)])
		return err
	}
	cfg := b.dev.Config()
	if uint64(c.Offset)+uint64(c.Size) > uint64(len(cfg)) {
		b.reply(m, m.Payload[:12])
		return fmt.Errorf("GET_CONFIG offset %d size %d beyond %d bytes", c.Offset, c.Size, len(cfg))
	}
	p := append([]byte(nil), m.Payload[:12]...)
	p = append(p, cfg[c.Offset:c.Offset+c.Size]...)
	return b.reply(m, p)
}

func (b *backend) setVringFd(m *message) error {
	v, err := m.u64()
	if err != nil {
		return err
	}
	vr, err := b.vring(uint32(v & vringIdxMask))
	if err != nil {
		return err
	}
	if v&^uint64(vringIdxMask|vringFdNoFd) != 0 {
		return fmt.Errorf("%s: unknown bits in %#x", reqName(m.Request), v)
	}
	fd := -1
	if v&vringFdNoFd == 0 {
		if fd, err = m.takeFd(); err != nil {
			return err
		}
	}
	switch m.Request {
	case reqSetVringKick:
		if fd < 0 {
			return errors.New("SET_VRING_KICK without fd: polling mode not supported")
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
			return fmt.Errorf("kick fd: %w", err)
		}
		f := os.NewFile(uintptr(fd), fmt.Sprintf("vring%d-kick", vr.index))
		if err := f.SetReadDeadline(time.Time{}); err != nil {
			f.Close() // not pollable: the worker could never be stopped
			return fmt.Errorf("kick fd: %w", err)
		}
		return vr.restartWith(func() {
			if vr.kick != nil {
				vr.kick.Close()
			}
			vr.kick = f
			if b.features&FeatureProtocolFeatures == 0 {
				vr.enabled = true // rings start enabled without protocol features
			}
		})
	case reqSetVringCall:
		vr.setNotifyFd(&vr.call, fd)
	case reqSetVringErr:
		vr.setNotifyFd(&vr.errFd, fd)
	}
	return nil
}

func (b *backend) setMemTable(m *message) error {
	descs, err := m.memTable()
	if err != nil {
		return err
	}
	if m.FdErr != nil {
		return m.FdErr
	}
	if len(m.Fds) != len(descs) {
		return fmt.Errorf("SET_MEM_TABLE: %d regions but %d fds", len(descs), len(m.Fds))
	}
	var regions []*memory.Region
	for i, d := range descs {
		r, err := memory.MapRegion(d, m.Fds[i])
		if err != nil {
			for _, r := range regions {
				r.Close()
			}
			return fmt.Errorf("SET_MEM_TABLE region %d: %w", i, err)
		}
		regions = append(regions, r)
	}
	return b.installRegions(regions)
}

func (b *backend) installRegions(regions []*memory.Region) error {
	t, err := memory.NewTable(regions)
	if err != nil {
		for _, r := range regions {
			r.Close()
		}
		return err
	}
	b.regions = regions
	b.mem.Set(t)
	b.startAll()
	return nil
}

func (b *backend) addMemReg(m *message) error {
	d, err := m.memRegion()
	if err != nil {
		return err
	}
	fd, err := m.takeFd()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if len(b.regions) >= maxMemSlots {
		return fmt.Errorf("ADD_MEM_REG: all %d slots used", maxMemSlots)
	}
	r, err := memory.MapRegion(d, fd)
	if err != nil {
		return fmt.Errorf("ADD_MEM_REG: %w", err)
	}
	t, err := memory.NewTable(append(append([]*memory.Region(nil), b.regions...), r))
	if err != nil {
		r.Close()
		return fmt.Errorf("ADD_MEM_REG: %w", err)
	}
	b.regions = t.Regions()
	b.mem.Set(t)
	b.startAll()
	return nil
}

func (b *backend) remMemReg(m *message) error {
	d, err := m.memRegion()
	if err != nil {
		return err
	}
	keep := b.regions[:0:0]
	found := false
	for _, r := range b.regions {
		if !found && r.GuestAddr == d.GuestAddr && r.Size == d.Size && r.UserAddr == d.UserAddr {
			found = true
			continue
		}
		keep = append(keep, r)
	}
	if !found {
		return fmt.Errorf("REM_MEM_REG: no region at gpa %#x size %#x", d.GuestAddr, d.Size)
	}
	var t *memory.Table
	if len(keep) > 0 {
		if t, err = memory.NewTable(keep); err != nil {
			return err
		}
	}
	b.regions = keep
	b.mem.Set(t)
	return nil
}

func (b *backend) startAll() {
	for _, vr := range b.vrings {
		vr.maybeStart()
	}
}

// reset stops every ring and forgets ring and feature state; the memory
// table stays (the front end replaces it when it restarts the device).
func (b *backend) reset() {
	for _, vr := range b.vrings {
		vr.stopRing()
		vr.clear()
	}
	b.features = 0
	b.dev.Reset()
}

func (b *backend) shutdown() {
	b.reset()
	b.c.Close()
	b.mem.Set(nil)
	b.regions = nil
}

// vring is one queue's configuration (owned by the message goroutine) and
// its worker.
type vring struct {
	b     *backend
	index int

	// Set by front-end messages; only the message goroutine touches these.
	num     uint16
	addr    vringAddr
	addrSet bool
	base    uint16
	enabled bool
	kick    *os.File

	fdMu  sync.Mutex // call and errFd are swapped while workers signal
	call  int
	errFd int

	// Worker state.
	running  bool
	stop     chan struct{}
	done     chan struct{}
	inflight sync.WaitGroup
	sem      chan struct{} // bounds concurrent requests

	qmu    sync.Mutex // guards q, qgen, broken, qtbl
	q      *virtqueue.Queue
	qtbl   *memory.Table
	qgen   uint64
	broken bool
}

func (vr *vring) setState(req uint32, v uint32) error {
	switch req {
	case reqSetVringNum:
		if v == 0 || v > virtqueue.MaxSize || v&(v-1) != 0 {
			return fmt.Errorf("vring %d: size %d not a power of two <= %d", vr.index, v, virtqueue.MaxSize)
		}
		return vr.restartWith(func() { vr.num = uint16(v) })
	case reqSetVringBase:
		if v > 0xffff {
			return fmt.Errorf("vring %d: base %d", vr.index, v)
		}
		return vr.restartWith(func() { vr.base = uint16(v) })
	case reqSetVringEnable:
		if v > 1 {
			return fmt.Errorf("vring %d: enable %d", vr.index, v)
		}
		return vr.restartWith(func() { vr.enabled = v == 1 })
	}
	return nil
}

// restartWith stops the worker (if any), applies the change and starts it
// again if the ring is complete.
func (vr *vring) restartWith(change func()) error {
	vr.pause()
	change()
	vr.maybeStart()
	return nil
}

func (vr *vring) setNotifyFd(p *int, fd int) {
	vr.fdMu.Lock()
	old := *p
	*p = fd
	vr.fdMu.Unlock()
	if old >= 0 {
		unix.Close(old)
	}
}

var one = []byte{1, 0, 0, 0, 0, 0, 0, 0}

func (vr *vring) signal(p *int) {
	vr.fdMu.Lock()
	if *p >= 0 {
		unix.Write(*p, one) // EAGAIN means the counter is already pending
	}
	vr.fdMu.Unlock()
}

// maybeStart starts the worker if the ring is fully configured, enabled and
// guest memory is known.
func (vr *vring) maybeStart() {
	if vr.running || vr.kick == nil || !vr.addrSet || vr.num == 0 || !vr.enabled {
		return
	}
	tbl, gen := vr.b.mem.Get()
	if tbl == nil {
		return
	}
	cfg := virtqueue.Config{Size: vr.num, DescAddr: vr.addr.Desc, AvailAddr: vr.addr.Avail, UsedAddr: vr.addr.Used, Features: vr.b.features}
	q, err := virtqueue.New(tbl, cfg, vr.base)
	if err != nil {
		tbl.Release()
		vr.b.log.Warn("vhost-user: cannot start vring", "vring", vr.index, "err", err)
		vr.signal(&vr.errFd)
		return
	}
	vr.qmu.Lock()
	vr.q, vr.qtbl, vr.qgen, vr.broken = q, tbl, gen, false
	vr.qmu.Unlock()
	vr.running = true
	vr.sem = make(chan struct{}, vr.b.workers)
	vr.stop = make(chan struct{})
	vr.done = make(chan struct{})
	go vr.run(vr.kick, vr.stop, vr.done)
}

// pause stops the worker and waits for in-flight requests; the ring
// position is kept in base so the ring can be started again.
func (vr *vring) pause() {
	if !vr.running {
		return
	}
	close(vr.stop)
	vr.kick.SetReadDeadline(time.Now())
	<-vr.done
	vr.inflight.Wait()
	vr.kick.SetReadDeadline(time.Time{})
	vr.running = false
	vr.qmu.Lock()
	vr.base = vr.q.LastAvail()
	vr.q = nil
	vr.qtbl.Release()
	vr.qtbl = nil
	vr.qmu.Unlock()
}

// stopRing implements GET_VRING_BASE: stop processing, wait for in-flight
// requests to be returned to the used ring, drop the kick fd, and return
// the next available index.
func (vr *vring) stopRing() uint16 {
	vr.pause()
	if vr.kick != nil {
		vr.kick.Close()
		vr.kick = nil
	}
	return vr.base
}

// clear forgets the ring configuration (reset, disconnect).
func (vr *vring) clear() {
	vr.num, vr.addr, vr.addrSet, vr.base, vr.enabled = 0, vringAddr{}, false, 0, false
	vr.setNotifyFd(&vr.call, -1)
	vr.setNotifyFd(&vr.errFd, -1)
}

func (vr *vring) run(kick *os.File, stop, done chan struct{}) {
	defer close(done)
	// A front end that shrinks its memory file under us turns our next
	// access into SIGBUS: that must break this queue, not the daemon.
	debug.SetPanicOnFault(true)
	defer func() {
		if r := recover(); r != nil {
			fe, ok := r.(interface{ Addr() uintptr })
			if !ok {
				panic(r)
			}
			vr.markBroken(fmt.Errorf("guest memory fault at %#x", fe.Addr()))
		}
	}()
	var buf [8]byte
	for {
		if !vr.process(stop) {
			return
		}
		_, err := kick.Read(buf[:])
		select {
		case <-stop:
			return
		default:
		}
		if err != nil {
			vr.b.log.Warn("vhost-user: kick fd", "vring", vr.index, "err", err)
			return
		}
	}
}

func (vr *vring) markBroken(err error) {
	vr.qmu.Lock()
	already := vr.broken
	vr.broken = true
	vr.qmu.Unlock()
	if !already {
		vr.b.log.Error("vhost-user: vring broken, no longer served", "vring", vr.index, "err", err)
		vr.signal(&vr.errFd)
	}
}

// next pops one chain with a reference on the memory it points into. It
// returns (nil, nil, nil) when the ring is empty and notifications are
// re-enabled.
func (vr *vring) next() (*virtqueue.Chain, *memory.Table, error) {
	vr.qmu.Lock()
	defer vr.qmu.Unlock()
	if vr.broken {
		return nil, nil, virtqueue.ErrBroken
	}
	if err := vr.refreshLocked(); err != nil {
		return nil, nil, err
	}
	for {
		chain, err := vr.q.Pop()
		if chain == nil && err == nil {
			if vr.q.EnableNotify() {
				continue
			}
			return nil, nil, nil
		}
		var cerr *virtqueue.ChainError
		if errors.As(err, &cerr) {
			return cerr.Chain, vr.qtbl.Acquire(), err
		}
		if err != nil {
			return nil, nil, err
		}
		return chain, vr.qtbl.Acquire(), nil
	}
}

// process pops and dispatches every available chain. It returns false when
// the queue is broken or stopping.
func (vr *vring) process(stop chan struct{}) bool {
	for {
		select {
		case <-stop:
			return false
		default:
		}
		chain, tbl, err := vr.next()
		if chain == nil {
			if err != nil {
				vr.markBroken(err)
				return false
			}
			return true
		}
		if err != nil {
			vr.b.log.Warn("vhost-user: bad descriptor chain", "vring", vr.index, "err", err)
			n := vr.b.dev.Fail(vr.index, chain, errors.Unwrap(err))
			vr.complete(chain.Head, n)
			tbl.Release()
			continue
		}
		vr.sem <- struct{}{}
		vr.inflight.Add(1)
		go func() {
			defer vr.inflight.Done()
			defer tbl.Release()
			defer func() { <-vr.sem }()
			debug.SetPanicOnFault(true)
			defer func() {
				if r := recover(); r != nil {
					fe, ok := r.(interface{ Addr() uintptr })
					if !ok {
						panic(r)
					}
					vr.markBroken(fmt.Errorf("guest memory fault at %#x", fe.Addr()))
				}
			}()
			vr.complete(chain.Head, vr.b.dev.Handle(vr.index, chain))
		}()
	}
}

// refreshLocked remaps the rings if the memory table changed.
func (vr *vring) refreshLocked() error {
	tbl, gen := vr.b.mem.Get()
	if gen == vr.qgen {
		tbl.Release()
		return nil
	}
	if tbl == nil {
		return errors.New("guest memory removed")
	}
	if err := vr.q.Remap(tbl); err != nil {
		tbl.Release()
		return err
	}
	vr.qtbl.Release()
	vr.qtbl, vr.qgen = tbl, gen
	return nil
}

func (vr *vring) complete(head uint16, n uint32) {
	if vr.pushed(head, n) {
		vr.signal(&vr.call)
	}
}

func (vr *vring) pushed(head uint16, n uint32) bool {
	vr.qmu.Lock()
	defer vr.qmu.Unlock()
	if vr.q == nil || vr.broken {
		return false
	}
	vr.q.Push(head, n)
	return vr.q.NeedsNotify()
}

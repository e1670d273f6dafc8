package cachefiles

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/storage"
)

// Config describes a daemon.
type Config struct {
	// Dir is the cache directory the kernel keeps its cache files in.
	Dir string
	// Tag names the cache ("" keeps the kernel's default).
	Tag string
	// Threads is the number of READ workers (default 8): reads of
	// different objects, or different ranges of one, run in parallel.
	Threads int
	// DevicePath is the control device (default DevicePath).
	DevicePath string
	// Device, if set, is a bound device fd handed over by a previous
	// daemon: it is adopted instead of opened and bound, and Serve sends
	// "restore" before reading.
	Device *os.File
	// ReadTimeout bounds the fill of one READ (default 2 minutes): a hung
	// backend fails the read with EIO instead of hanging the reader.
	ReadTimeout time.Duration
	// NoReadAhead turns off filling a sequentially read file's next
	// chunks beyond what the kernel asked for (see readahead.go).
	NoReadAhead bool
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
}

// Stats count the requests a daemon answered.
type Stats struct {
	Opens, OpenFailures uint64
	Closes              uint64
	Reads, ReadFailures uint64
	BytesWritten        uint64 // bytes written into cache files
	BadMessages         uint64
	Prefetched          uint64 // chunk runs written by prefetch
	Unanswered          uint64 // READs left to a successor when stopping

	// Where READs spend their time (sums over all READs, nanoseconds):
	// ReadNanos from dequeue to completion, of which FetchNanos getting
	// chunk bytes from the fetcher, WriteNanos writing the cache file and
	// CompleteNanos the READ_COMPLETE ioctl.
	ReadBytes                                        uint64 // bytes the kernel asked for
	ReadNanos, FetchNanos, WriteNanos, CompleteNanos uint64
	// Read-ahead: background fills, the chunk bytes they wrote, their time.
	ReadAheads, ReadAheadBytes, ReadAheadNanos uint64
}

// Daemon serves the cachefiles on-demand requests of one bound cache.
type Daemon struct {
	dev *Device
	cmd func(string) error // writes a reply to the device
	// complete answers a READ on its object's anon fd (readComplete;
	// tests without the real device record the calls instead).
	complete func(fd int, msgID uint32) error
	log      *slog.Logger
	threads  int
	timeout  time.Duration

	mu      sync.Mutex
	images  map[key]*image
	blobs   map[key]*sharedBlob
	objects map[uint32]*object
	bindSeq uint64

	work    chan readTask
	wg      sync.WaitGroup
	bg      sync.WaitGroup // prefetches
	serving atomic.Bool
	closed  sync.Once

	opens, openFails, closes, reads, readFails, written, bad, prefetched    atomic.Uint64
	unanswered, readBytes, readNanos, fetchNanos, writeNanos, completeNanos atomic.Uint64
	readAheads, raBytes, raNanos                                            atomic.Uint64

	noReadAhead bool
}

// object is one cache file the kernel opened through the daemon.
type object struct {
	id     uint32
	fd     int
	volume string
	cookie string
	size   uint64
	// boot is set for a bootstrap object, blob for a data blob object.
	boot     *os.File
	bootSize int64
	blob     *sharedBlob
	im       *image // the image whose fetcher serves the object
	refs     int    // in-flight READs, prefetches and read-aheads
	closing  bool
	// Read-ahead state (under Daemon.mu): the end of the last READ, how
	// far read-ahead was issued, and the runs being written.
	lastEnd, raHi uint64
	flights       map[uint64]*flight
	// ctx ends when the object closes: it stops the object's prefetch.
	ctx    context.Context
	cancel context.CancelFunc
}

type readTask struct {
	o   *object
	msg Msg
}

// New opens and binds the cachefiles device (or adopts cfg.Device) and
// returns a daemon ready to Serve. Images are bound with BindBlob, before
// or while serving.
func New(cfg Config) (*Daemon, error) {
	d := newDaemon(cfg)
	var err error
	if cfg.Device != nil {
		d.dev, err = AdoptDevice(cfg.Device)
	} else {
		if cfg.Dir == "" {
			return nil, errors.New("cachefiles: no cache dir")
		}
		d.dev, err = OpenDevice(cfg.DevicePath, cfg.Dir, cfg.Tag)
	}
	if err != nil {
		return nil, err
	}
	d.cmd = d.dev.Command
	return d, nil
}

// newDaemon is a daemon without a device yet.
func newDaemon(cfg Config) *Daemon {
	d := &Daemon{
		complete: readComplete,
		log:      cfg.Logger,
		threads:  cfg.Threads,
		timeout:  cfg.ReadTimeout,

		noReadAhead: cfg.NoReadAhead,
		images:      map[key]*image{},
		blobs:       map[key]*sharedBlob{},
		objects:     map[uint32]*object{},
	}
	if d.log == nil {
		d.log = slog.Default()
	}
	if d.threads <= 0 {
		d.threads = 8
	}
	if d.timeout <= 0 {
		d.timeout = 2 * time.Minute
	}
	return d
}

// Device returns the bound device, e.g. to hand its fd to a successor.
func (d *Daemon) Device() *Device { return d.dev }

// Stats returns the request counters.
func (d *Daemon) Stats() Stats {
	return Stats{
		Opens: d.opens.Load(), OpenFailures: d.openFails.Load(), Closes: d.closes.Load(),
		Reads: d.reads.Load(), ReadFailures: d.readFails.Load(), BytesWritten: d.written.Load(),
		BadMessages: d.bad.Load(), Prefetched: d.prefetched.Load(), Unanswered: d.unanswered.Load(),
		ReadBytes: d.readBytes.Load(), ReadNanos: d.readNanos.Load(), FetchNanos: d.fetchNanos.Load(),
		WriteNanos: d.writeNanos.Load(), CompleteNanos: d.completeNanos.Load(),
		ReadAheads: d.readAheads.Load(), ReadAheadBytes: d.raBytes.Load(), ReadAheadNanos: d.raNanos.Load(),
	}
}

// BackendMetrics returns the backend counters (nydusd's
// /api/v1/metrics/backend) of the image bound with fsid id in any domain,
// or with id "" the sums over every bound image.
func (d *Daemon) BackendMetrics(id string) (storage.BackendMetrics, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var (
		sum   storage.BackendMetrics
		found bool
	)
	for k, im := range d.images {
		if id != "" && k.name != id {
			continue
		}
		m := im.fetcher.BackendMetrics()
		switch {
		case !found:
			sum.BackendType = m.BackendType
		case sum.BackendType != m.BackendType:
			// Images on different backends: one type would be wrong.
			sum.BackendType = "mixed"
		}
		found = true
		sum.ReadCount += m.ReadCount
		sum.ReadErrors += m.ReadErrors
		sum.ReadAmountTotal += m.ReadAmountTotal
		sum.ReadCumulativeLatencyMillisTotal += m.ReadCumulativeLatencyMillisTotal
	}
	if !found && id != "" {
		return sum, fmt.Errorf("%w: image %q", ErrNotFound, id)
	}
	return sum, nil
}

// Serve reads and answers kernel requests until ctx is done or Close is
// called. OPEN and CLOSE are answered in order on the reading goroutine
// (the kernel sends no READ for an object before its OPEN is answered);
// READs go to the worker pool.
func (d *Daemon) Serve(ctx context.Context) error {
	if !d.serving.CompareAndSwap(false, true) {
		return errors.New("cachefiles: Serve called twice")
	}
	d.work = make(chan readTask, d.threads*4)
	// READs in flight when ctx ends get stopGrace to finish; cut short
	// after that, they are left unanswered rather than failed.
	fillCtx, cancelFill := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelFill()
	graceful := context.AfterFunc(ctx, func() { time.AfterFunc(stopGrace, cancelFill) })
	defer graceful()
	for range d.threads {
		d.wg.Add(1)
		go d.worker(ctx, fillCtx)
	}
	defer func() {
		close(d.work)
		d.wg.Wait()
	}()
	stop := context.AfterFunc(ctx, d.dev.Wake)
	defer stop()
	if d.dev.adopted {
		if err := d.dev.Restore(); err != nil {
			return err
		}
	}
	buf := make([]byte, MsgMaxSize)
	for {
		raw, err := d.dev.ReadMsg(buf)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return nil
			}
			return err
		}
		m, err := ParseMsg(raw)
		if err != nil {
			d.bad.Add(1)
			d.log.Error("cachefiles: dropping bad kernel message", "err", err, "bytes", len(raw))
			// An OPEN we cannot parse still installed an fd; refuse it so
			// the mount fails instead of waiting.
			if m.Opcode == OpOpen && len(raw) >= headerSize {
				d.reply(fmt.Sprintf("copen %d,%d", m.ID, -int(syscall.EINVAL)))
			}
			continue
		}
		switch m.Opcode {
		case OpOpen:
			d.handleOpen(m)
		case OpClose:
			d.handleClose(m)
		case OpRead:
			d.mu.Lock()
			o := d.objects[m.ObjectID]
			if o != nil {
				o.refs++
			}
			d.mu.Unlock()
			if o == nil {
				// Without the object there is no anon fd to complete on;
				// the kernel re-opens objects whose fd is gone.
				d.bad.Add(1)
				d.log.Error("cachefiles: READ for unknown object", "object", m.ObjectID, "msg", m.ID)
				continue
			}
			select {
			case d.work <- readTask{o, m}:
			case <-ctx.Done():
				d.leaveRead(o, m)
			}
		}
	}
}

func (d *Daemon) reply(cmd string) {
	if err := d.cmd(cmd); err != nil {
		d.log.Error("cachefiles: reply failed", "cmd", cmd, "err", err)
	}
}

// handleOpen answers OPEN with the object's size, or a negative errno for
// objects nothing bound names.
func (d *Daemon) handleOpen(m Msg) {
	d.opens.Add(1)
	om := m.Open
	fd := int(om.FD)
	fail := func(errno syscall.Errno, why string, args ...any) {
		d.openFails.Add(1)
		unix.Close(fd)
		d.log.Warn("cachefiles: OPEN refused: "+why, append(args, "volume", om.VolumeKey, "cookie", om.CookieKey, "errno", errno)...)
		d.reply(fmt.Sprintf("copen %d,%d", m.ID, -int(errno)))
	}
	domain, ok := cutPrefix(om.VolumeKey, "erofs,")
	if !ok {
		fail(syscall.ENOENT, "volume is not an EROFS one")
		return
	}
	o := &object{id: m.ObjectID, fd: fd, volume: om.VolumeKey, cookie: om.CookieKey}
	d.mu.Lock()
	if old := d.objects[m.ObjectID]; old != nil {
		d.mu.Unlock()
		fail(syscall.EALREADY, "object id already open", "object", m.ObjectID)
		return
	}
	k := key{domain, om.CookieKey}
	if im := d.images[k]; im != nil {
		o.im = im
	} else if sb := d.blobs[k]; sb != nil && len(sb.users) > 0 {
		o.blob, o.im, o.size = sb, sb.users[0], sb.size
	}
	d.mu.Unlock()
	switch {
	case o.im == nil:
		fail(syscall.ENOENT, "no bound image or blob")
		return
	case o.blob == nil:
		f, err := os.Open(o.im.path)
		if err != nil {
			fail(syscall.ENOENT, "bootstrap unreadable", "err", err)
			return
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			fail(syscall.EIO, "bootstrap unreadable", "err", err)
			return
		}
		o.boot, o.bootSize, o.size = f, fi.Size(), uint64(fi.Size())
	}
	o.ctx, o.cancel = context.WithCancel(context.Background())
	var pre []*rafs.Chunk
	d.mu.Lock()
	d.objects[m.ObjectID] = o
	if o.blob != nil {
		if pre = prefetchChunks(o.im, o.blob.layout); len(pre) > 0 {
			o.refs++
			d.bg.Add(1)
		}
	}
	d.mu.Unlock()
	d.log.Debug("cachefiles: OPEN", "object", m.ObjectID, "volume", om.VolumeKey, "cookie", om.CookieKey, "size", o.size)
	d.reply(fmt.Sprintf("copen %d,%d", m.ID, o.size))
	if len(pre) > 0 {
		go func() {
			defer d.bg.Done()
			d.prefetch(o.ctx, o, pre)
		}()
	}
}

func cutPrefix(s, p string) (string, bool) {
	if len(s) < len(p) || s[:len(p)] != p {
		return s, false
	}
	return s[len(p):], true
}

// handleClose releases an object: its anon fd is closed once no READ of
// it is in flight.
func (d *Daemon) handleClose(m Msg) {
	d.closes.Add(1)
	d.mu.Lock()
	o := d.objects[m.ObjectID]
	if o == nil {
		d.mu.Unlock()
		d.log.Warn("cachefiles: CLOSE for unknown object", "object", m.ObjectID)
		return
	}
	delete(d.objects, m.ObjectID)
	o.closing = true
	release := o.refs == 0
	d.mu.Unlock()
	o.cancel()
	if release {
		d.release(o)
	}
}

func (d *Daemon) release(o *object) {
	unix.Close(o.fd)
	if o.boot != nil {
		o.boot.Close()
	}
	d.mu.Lock()
	im := o.im
	closeFetcher := im.unbound && !d.inUse(im)
	d.mu.Unlock()
	if closeFetcher {
		im.fetcher.Close()
	}
}

// inUse reports whether an open object reads through im. Callers hold d.mu.
func (d *Daemon) inUse(im *image) bool {
	for _, o := range d.objects {
		if o.im == im {
			return true
		}
	}
	return false
}

// stopGrace is how long READs in flight may take to finish once Serve is
// asked to stop.
const stopGrace = 5 * time.Second

func (d *Daemon) worker(ctx, fillCtx context.Context) {
	defer d.wg.Done()
	for t := range d.work {
		if ctx.Err() != nil {
			// Stopping: a READ not begun is left for whoever serves next.
			d.leaveRead(t.o, t.msg)
			continue
		}
		start := time.Now()
		rctx, cancel := context.WithTimeout(fillCtx, d.timeout)
		err := d.fill(rctx, t.o, *t.msg.Read)
		cancel()
		if err != nil && fillCtx.Err() != nil {
			d.leaveRead(t.o, t.msg)
			continue
		}
		d.readBytes.Add(t.msg.Read.Len)
		d.finishRead(t.o, t.msg, err, start)
	}
}

// leaveRead drops a READ without answering it, when stopping: the kernel
// keeps it, delivers it again to a successor after "restore", or fails it
// with EIO when the last device fd closes. Answering it with an error
// would fail a reader that a successor could have served.
func (d *Daemon) leaveRead(o *object, m Msg) {
	d.unanswered.Add(1)
	d.log.Info("cachefiles: READ left for the next daemon", "object", o.id, "off", m.Read.Off, "len", m.Read.Len)
	d.unref(o)
}

// finishRead completes a READ whatever happened: on failure the range
// stays missing and the kernel fails the reader with EIO. A successful
// READ of a blob may start read-ahead.
func (d *Daemon) finishRead(o *object, m Msg, err error, start time.Time) {
	d.reads.Add(1)
	if err != nil {
		d.readFails.Add(1)
		d.log.Error("cachefiles: READ failed", "object", o.id, "cookie", o.cookie, "off", m.Read.Off, "len", m.Read.Len, "err", err)
	}
	t := time.Now()
	if cerr := d.complete(o.fd, m.ID); cerr != nil {
		d.log.Error("cachefiles: completing READ", "object", o.id, "err", cerr)
	}
	now := time.Now()
	d.completeNanos.Add(uint64(now.Sub(t)))
	d.readNanos.Add(uint64(now.Sub(start)))
	if err == nil {
		d.readAhead(o, *m.Read)
	}
	d.unref(o)
}

// unref drops a READ's or a prefetch's hold on o, releasing a closed
// object with the last one.
func (d *Daemon) unref(o *object) {
	d.mu.Lock()
	o.refs--
	release := o.closing && o.refs == 0
	d.mu.Unlock()
	if release {
		d.release(o)
	}
}

const pageSize = 4096

func roundDown(x uint64) uint64 { return x &^ (pageSize - 1) }
func roundUp(x uint64) uint64   { return (x + pageSize - 1) &^ (pageSize - 1) }

// maxRun bounds the bytes assembled for one write of chunks that share
// pages; a layout needing more is refused rather than allocated.
const maxRun = 256 << 20

// fill makes [r.Off, r.Off+r.Len) of o present in its cache file. Writes
// through the anon fd go to the cache file with direct I/O, so they are
// whole pages at page offsets.
func (d *Daemon) fill(ctx context.Context, o *object, r ReadMsg) error {
	if r.Off >= o.size {
		return fmt.Errorf("read at %d beyond the object's %d bytes: %w", r.Off, o.size, syscall.EINVAL)
	}
	end := min(r.Off+r.Len, o.size)
	if o.boot != nil {
		return d.fillBootstrap(o, roundDown(r.Off), roundUp(end))
	}
	return d.fillBlob(ctx, o, r.Off, end)
}

func (d *Daemon) fillBootstrap(o *object, lo, hi uint64) error {
	const step = 1 << 20
	buf := make([]byte, min(hi-lo, step))
	for off := lo; off < hi; off += step {
		p := buf[:min(hi-off, step)]
		n, err := o.boot.ReadAt(p, int64(off))
		if err != nil && err != io.EOF {
			return fmt.Errorf("bootstrap %s: %w", o.im.path, err)
		}
		clear(p[n:]) // the tail page past EOF
		if err := d.pwrite(o, p, off); err != nil {
			return err
		}
	}
	return nil
}

func (d *Daemon) fillBlob(ctx context.Context, o *object, off, end uint64) error {
	d.mu.Lock()
	layout := o.blob.layout // the slice is replaced, never modified, on bind
	d.mu.Unlock()
	lo, hi := roundDown(off), roundUp(end)
	// Widen to whole chunks, and to the chunks sharing their edge pages,
	// so no page is written with a neighbour's bytes missing.
	var chunks []*rafs.Chunk
	for i := 0; ; i++ {
		chunks = layout.Range(lo, hi-lo)
		if len(chunks) == 0 {
			return fmt.Errorf("no chunk of blob %s covers [%d, %d): %w", o.cookie, off, end, syscall.EIO)
		}
		first, last := chunks[0], chunks[len(chunks)-1]
		nlo := min(lo, roundDown(first.UncompressedOffset))
		nhi := max(hi, roundUp(last.UncompressedOffset+uint64(last.UncompressedSize)))
		if nlo == lo && nhi == hi {
			break
		}
		if i == 16 {
			return fmt.Errorf("blob %s: chunks around [%d, %d) overlap pages without end: %w", o.cookie, off, end, syscall.EIO)
		}
		lo, hi = nlo, nhi
	}
	// Runs of chunks whose pages touch are assembled and written at once,
	// page-contiguous runs with one pwrite (writes into the cache file are
	// direct I/O: fewer, larger ones are much cheaper), their chunks
	// fetched with as few backend requests as the merging size allows.
	return d.writeRuns(ctx, o, splitRuns(chunks))
}

// splitRuns cuts offset-sorted chunks into runs whose pages touch: each
// run is written with one page-aligned pwrite.
func splitRuns(chunks []*rafs.Chunk) [][]*rafs.Chunk {
	var runs [][]*rafs.Chunk
	for len(chunks) > 0 {
		n, end := 1, chunkEnd(chunks[0])
		for n < len(chunks) && roundDown(chunks[n].UncompressedOffset) < roundUp(end) {
			end = max(end, chunkEnd(chunks[n]))
			n++
		}
		runs = append(runs, chunks[:n])
		chunks = chunks[n:]
	}
	return runs
}

func chunkEnd(c *rafs.Chunk) uint64 { return c.UncompressedOffset + uint64(c.UncompressedSize) }

func (d *Daemon) writeRun(ctx context.Context, o *object, run []*rafs.Chunk) error {
	return d.writeGroup(ctx, o, [][]*rafs.Chunk{run})
}

// writeGroup fetches page-contiguous runs into one buffer and writes it
// with one pwrite.
func (d *Daemon) writeGroup(ctx context.Context, o *object, runs [][]*rafs.Chunk) error {
	start := roundDown(runs[0][0].UncompressedOffset)
	end := runEnd(runs[len(runs)-1])
	if end-start > maxRun {
		return fmt.Errorf("blob %s: %d bytes of chunks share pages at %d: %w", o.cookie, end-start, start, syscall.EIO)
	}
	buf := make([]byte, end-start)
	b := o.blob.blob
	t := time.Now()
	// The group's chunks are contiguous in the blob: one ReadChunks
	// fetches them with as few backend requests as the merging size
	// allows (fetching chunks one by one in parallel was no faster in the
	// guest benchmark, and costs a request each).
	var chunks []*rafs.Chunk
	var bufs [][]byte
	for _, run := range runs {
		for _, c := range run {
			chunks = append(chunks, c)
			bufs = append(bufs, buf[c.UncompressedOffset-start:chunkEnd(c)-start])
		}
	}
	if err := o.im.fetcher.ReadChunks(ctx, b, chunks, bufs); err != nil {
		return fmt.Errorf("blob %s: %w", b.ID, err)
	}
	t2 := time.Now()
	d.fetchNanos.Add(uint64(t2.Sub(t)))
	defer func() { d.writeNanos.Add(uint64(time.Since(t2))) }()
	return d.pwrite(o, buf, start)
}

// runEnd is the page-aligned end of a run.
func runEnd(run []*rafs.Chunk) uint64 {
	var end uint64
	for _, c := range run {
		end = max(end, chunkEnd(c))
	}
	return roundUp(end)
}

func (d *Daemon) pwrite(o *object, p []byte, off uint64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(o.fd, p, int64(off))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("writing %d bytes at %d into cache file of %s: %w", len(p), off, o.cookie, err)
		}
		if n == 0 {
			return fmt.Errorf("writing at %d into cache file of %s: %w", off, o.cookie, io.ErrShortWrite)
		}
		d.written.Add(uint64(n))
		p, off = p[n:], off+uint64(n)
	}
	return nil
}

// Close stops serving, closes every object's anon fd, the device (the
// kernel unbinds the cache: mounts on it fail from now on) and the
// fetchers.
func (d *Daemon) Close() error {
	var err error
	d.closed.Do(func() {
		if d.dev != nil {
			d.dev.Wake()
		}
		d.stopServing()
		if d.dev != nil {
			err = d.dev.Close()
		}
	})
	return err
}

// stopServing waits for the serving loops (already woken), cancels and
// drains in-flight READs, then closes every object's fds and the fetchers.
// The device itself is left to the caller: Close closes it, Detach hands it on.
func (d *Daemon) stopServing() {
	d.wg.Wait()
	d.mu.Lock()
	objs := d.objects
	d.objects = map[uint32]*object{}
	imgs := d.images
	d.images = map[key]*image{}
	d.mu.Unlock()
	for _, o := range objs {
		o.cancel()
	}
	d.bg.Wait()
	for _, o := range objs {
		unix.Close(o.fd)
		if o.boot != nil {
			o.boot.Close()
		}
	}
	for _, im := range imgs {
		im.fetcher.Close()
	}
}

// String is for logs.
func (o *object) String() string { return strconv.Itoa(int(o.id)) + ":" + o.cookie }

// Detach hands the bound device over to a successor daemon: it stops
// serving (in-flight READs are completed first), closes every object's
// anon fd and the fetchers, and returns the device file, still bound.
// The kernel marks the objects closed and re-opens each (a new OPEN to
// whoever reads the device next) when it next needs it, so mounted
// filesystems keep working once the successor serves with
// Config.Device = the returned file. Until then their reads wait.
func (d *Daemon) Detach() (*os.File, error) {
	var f *os.File
	err := errors.New("cachefiles: daemon already closed")
	d.closed.Do(func() {
		d.dev.Wake()
		d.stopServing()
		unix.Close(d.dev.wake[0])
		unix.Close(d.dev.wake[1])
		f, err = d.dev.f, nil
	})
	return f, err
}

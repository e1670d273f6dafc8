package fanotify

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ErrUnsupported is returned by New on kernels without pre-content events.
var ErrUnsupported = errors.New("kernel lacks fanotify pre-content events (FAN_CLASS_PRE_CONTENT / FAN_PRE_ACCESS: Linux >= 6.14 with CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")

// Group is a fanotify group of class FAN_CLASS_PRE_CONTENT.
//
// While any process holds the group's fd, readers of marked files block
// until someone answers; when the last holder closes it, the kernel allows
// every pending and future access and readers see the files' holes. So the
// fd outlives a daemon restart by being held (dup'ed) by a supervisor.
type Group struct {
	fd int
}

// ErrNoPreContentFS is wrapped by Mark for a file on a filesystem that
// does not allow pre-content events.
var ErrNoPreContentFS = errors.New("the cache file's filesystem does not allow fanotify pre-content events (tmpfs, for one): put the cache directory on ext4, xfs or btrfs")

// New creates a pre-content fanotify group. It fails with ErrUnsupported
// on a kernel that cannot mark files for FAN_PRE_ACCESS.
func New() (*Group, error) {
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_PRE_CONTENT|unix.FAN_CLOEXEC|unix.FAN_UNLIMITED_QUEUE, unix.O_RDWR|unix.O_LARGEFILE)
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			return nil, ErrUnsupported
		}
		return nil, fmt.Errorf("fanotify_init: %w", err)
	}
	// Kernels before 6.14 create the group (pre-content is an old class)
	// but refuse FAN_PRE_ACCESS in any mark: ask now, at start, rather
	// than at the first mount. Removing a mark that is not there checks
	// the mask first (EINVAL for an unknown event) and has no effect.
	if err := unix.FanotifyMark(fd, unix.FAN_MARK_REMOVE, unix.FAN_PRE_ACCESS, unix.AT_FDCWD, "/"); errors.Is(err, unix.EINVAL) {
		unix.Close(fd)
		return nil, ErrUnsupported
	}
	return &Group{fd: fd}, nil
}

// FromFD adopts the fd of an existing group, e.g. one handed over by a
// supervisor after a daemon restart.
func FromFD(fd int) *Group { return &Group{fd: fd} }

// FD returns the group's fd (to hand to a supervisor).
func (g *Group) FD() int { return g.fd }

// Mark asks for FAN_PRE_ACCESS events on the file at path. The kernel
// decides at open time whether an open file reports pre-content events, so
// a file must be marked before whoever reads it (EROFS, at mount) opens it.
func (g *Group) Mark(path string) error {
	if err := unix.FanotifyMark(g.fd, unix.FAN_MARK_ADD, unix.FAN_PRE_ACCESS, unix.AT_FDCWD, path); err != nil {
		if errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("fanotify_mark %s: %w (%w)", path, err, ErrUnsupported)
		}
		if errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("fanotify_mark %s: %w: %w", path, ErrNoPreContentFS, err)
		}
		return fmt.Errorf("fanotify_mark %s: %w", path, err)
	}
	return nil
}

// Unmark removes the mark of Mark.
func (g *Group) Unmark(path string) error {
	if err := unix.FanotifyMark(g.fd, unix.FAN_MARK_REMOVE, unix.FAN_PRE_ACCESS, unix.AT_FDCWD, path); err != nil {
		return fmt.Errorf("fanotify_mark remove %s: %w", path, err)
	}
	return nil
}

// Close closes the group fd. Unless another process holds a dup of it,
// pending readers are then allowed and see holes: callers close only once
// marked files are no longer in use (or the mounts are gone).
func (g *Group) Close() error { return unix.Close(g.fd) }

// Filler makes byte ranges of marked files present.
type Filler interface {
	// Fill makes [ev.Offset, ev.Offset+ev.Count) of the file behind f
	// present (for an event without a range, whatever the filler deems
	// needed). It must not read the marked file through an fd opened while
	// it was marked (that raises events of its own); f is such an fd that
	// raises none, and is nil for an event recovered from a Journal (its
	// fd died with the daemon that read it). A nil error answers ALLOW; an
	// error answers DENY with ErrnoOf(err), so the reader fails.
	Fill(ctx context.Context, f *os.File, ev Event) error
}

// Prober is an optional Filler extension for the fast path: Present
// reports whether ev's range is present already. The reading loop asks it
// before handing the event to a worker and, if so, answers ALLOW at once,
// so it must neither block nor make system calls.
type Prober interface {
	Present(ev Event) bool
}

// ErrnoOf is the errno a failed fill is denied with: the error's own errno
// if it carries one, EIO otherwise.
func ErrnoOf(err error) unix.Errno {
	var en unix.Errno
	if errors.As(err, &en) && en != 0 {
		return en
	}
	return unix.EIO
}

// Options tune Serve.
type Options struct {
	// Workers bounds the fills in parallel (default 4).
	Workers int
	// Timeout is the per-event deadline: a fill not done by then is answered
	// with EIO so readers never hang on a stuck backend (default 30s).
	Timeout time.Duration
	Logger  *slog.Logger
	// Observe, if set, is told of each answered event (metrics).
	Observe func(ev Event, err error, took time.Duration)
	// Trusted, if set, picks events answered ALLOW at once, without a
	// fill, by the reading loop itself. A daemon whose own cache I/O
	// touches marked files needs it: those accesses raise events too, and
	// a fill waiting on its own write would deadlock. Use with care: an
	// event it trusts is served whatever the file holds.
	Trusted func(Event) bool
	// Journal, if set, records every event from the moment it is read
	// until it is answered, so that a successor can answer the events this
	// daemon held if it dies.
	Journal *Journal
	// Recover are events a dead daemon of this group held, from its
	// Journal (Pending). Serve fills each (with a nil file) beside the
	// events it reads and answers it by the fd number the dead daemon saw;
	// RecoverDone, if set, is told how many were allowed and denied once
	// all are answered. See recovery.
	Recover     []Event
	RecoverDone func(allowed, denied int)
}

// SelfPid is a Trusted predicate for events this process raised.
func SelfPid(ev Event) bool { return int(ev.Pid) == os.Getpid() }

func (o *Options) defaults() *slog.Logger {
	if o.Workers <= 0 {
		o.Workers = 4
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Logger == nil {
		return slog.Default()
	}
	return o.Logger
}

// Serve reads events and answers each after its fill, until ctx ends or the
// group fd fails. It does not close the group.
//
// One read(2) takes every queued event (up to 64 KiB of them); each costs
// one fstat (to name its file) and, when a Prober finds it present, one
// response write and the close of its fd, all in the reading loop. The
// rest go to workers.
func (g *Group) Serve(ctx context.Context, f Filler, opts Options) error {
	log := opts.defaults()
	prober, _ := f.(Prober)
	// An eventfd wakes poll(2) when ctx ends.
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	defer unix.Close(stop)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		<-ctx.Done()
		_, _ = unix.Write(stop, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	}()

	// The reading loop never waits for a worker: a trusted event queued
	// behind busy fills could be the very write those fills wait on.
	sem := make(chan struct{}, opts.Workers)
	var wg sync.WaitGroup
	defer wg.Wait()
	rec := g.startRecovery(ctx, f, opts, log, &wg)
	dispatch := func(ev Event, slot int) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if rec.wait(ev.Fd) && opts.Trusted != nil && opts.Trusted(ev) {
				opts.Journal.doneIf(slot)
				g.respond(ev.Fd, unix.FAN_ALLOW, log)
				unix.Close(ev.Fd)
				return
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				// Answer anyway: an event left unanswered would block
				// its reader until the group closes (and Serve does not
				// close it). The next Serve of the group does the work.
				opts.Journal.doneIf(slot)
				g.respond(ev.Fd, deny(unix.EIO), log)
				unix.Close(ev.Fd)
				return
			}
			defer func() { <-sem }()
			g.answer(ctx, f, ev, slot, opts, log)
		}()
	}

	buf := make([]byte, 64<<10)
	evs := make([]Event, 0, 256)
	slots := make([]int, 0, 256)
	var resp [8]byte
	allow := func(ev Event, slot int) {
		// Unjournal before answering, never after: a SIGKILL is acted on
		// when a system call returns, so "answered but still journaled"
		// is the likely state of a daemon killed here, and a successor
		// answering that record would answer whichever event of its own
		// got the number. Unjournaled but unanswered costs one EIO.
		opts.Journal.doneIf(slot)
		putResponse(&resp, ev.Fd, unix.FAN_ALLOW)
		if _, err := unix.Write(g.fd, resp[:]); err != nil {
			log.Error("fanotify response", "fd", ev.Fd, "err", err)
		}
		unix.Close(ev.Fd)
	}
	fds := []unix.PollFd{{Fd: int32(g.fd), Events: unix.POLLIN}, {Fd: int32(stop), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("poll fanotify: %w", err)
		}
		if ctx.Err() != nil {
			return nil
		}
		if fds[0].Revents&unix.POLLIN == 0 {
			if fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
				return fmt.Errorf("fanotify fd: poll revents %#x", fds[0].Revents)
			}
			continue
		}
		n, err := unix.Read(g.fd, buf)
		if err != nil {
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
				continue
			}
			return fmt.Errorf("read fanotify: %w", err)
		}
		var perr error
		evs, perr = AppendEvents(evs[:0], buf[:n])
		// Journal every event before answering any: the window in which
		// a crash loses an event's range is this loop alone.
		slots = slots[:0]
		for i := range evs {
			ev := &evs[i]
			slot := -1
			if ev.Fd >= 0 {
				var st unix.Stat_t
				if unix.Fstat(ev.Fd, &st) == nil {
					ev.Dev, ev.Ino = st.Dev, st.Ino
				}
				if opts.Journal != nil && ev.Mask&unix.FAN_PRE_ACCESS != 0 {
					slot = opts.Journal.add(ev)
				}
			}
			slots = append(slots, slot)
		}
		for i, ev := range evs {
			switch {
			case ev.Fd < 0: // FAN_NOFD: queue overflow, nothing to answer
				log.Warn("fanotify queue overflow", "mask", ev.Mask)
			case rec.pending(ev.Fd):
				// Its number is a held event's still to be answered; an
				// answer now would go to that one (see recovery).
				dispatch(ev, slots[i])
			case ev.Mask&unix.FAN_PRE_ACCESS == 0:
				allow(ev, slots[i])
			case opts.Trusted != nil && opts.Trusted(ev):
				allow(ev, slots[i])
			case prober != nil && prober.Present(ev):
				allow(ev, slots[i])
				if opts.Observe != nil {
					opts.Observe(ev, nil, 0)
				}
			default:
				dispatch(ev, slots[i])
			}
		}
		if perr != nil {
			// The kernel never sends this; if it did, the events past the
			// bad one are lost and their readers would hang: fail loudly.
			return fmt.Errorf("fanotify: %w", perr)
		}
	}
}

func (j *Journal) doneIf(slot int) {
	if j != nil {
		j.done(slot)
	}
}

// fill runs f.Fill under the per-event deadline. finished says the fill
// returned (false: it still runs, and release must wait for it).
func fill(ctx context.Context, f Filler, file *os.File, ev Event, timeout time.Duration) (err error, finished bool, release func()) {
	fctx, cancel := context.WithTimeout(ctx, timeout)
	done := make(chan error, 1)
	go func() {
		done <- f.Fill(fctx, file, ev)
	}()
	select {
	case err = <-done:
		finished = true
	case <-fctx.Done():
		err = fmt.Errorf("fill [%d,+%d) for pid %d: deadline %s passed: %w", ev.Offset, ev.Count, ev.Pid, timeout, unix.EIO)
	}
	release = cancel
	if !finished {
		release = func() { <-done; cancel() }
	}
	return err, finished, release
}

// answer fills ev under the deadline and responds exactly once. The event's
// fd is closed only after the fill returns: closing it earlier would let the
// number be reused while the fill still writes through it.
func (g *Group) answer(ctx context.Context, f Filler, ev Event, slot int, opts Options, log *slog.Logger) {
	start := time.Now()
	file := os.NewFile(uintptr(ev.Fd), "fanotify-event")
	err, finished, release := fill(ctx, f, file, ev, opts.Timeout)
	resp := uint32(unix.FAN_ALLOW)
	if err != nil {
		resp = deny(ErrnoOf(err))
		log.Error("fanotify fill failed", "offset", ev.Offset, "count", ev.Count, "pid", ev.Pid, "err", err)
	}
	// The kernel matches the response to the event by fd number, so answer
	// before closing: a closed number can be reused by the next event.
	opts.Journal.doneIf(slot) // first: see allow in Serve
	g.respond(ev.Fd, resp, log)
	if finished {
		release()
		file.Close()
	} else {
		go func() { release(); file.Close() }()
	}
	if opts.Observe != nil {
		opts.Observe(ev, err, time.Since(start))
	}
}

func (g *Group) respond(fd int, resp uint32, log *slog.Logger) {
	if _, err := unix.Write(g.fd, encodeResponse(fd, resp)); err != nil {
		log.Error("fanotify response", "fd", fd, "err", err)
	}
}

// recovery answers the events a dead daemon held while Serve runs. The
// kernel (process_access_response in fs/notify/fanotify/fanotify_user.c)
// matches a response to the first event on the group's access list whose
// recorded fd number equals the response's, never looking the number up
// in an fd table; events join that list when read, so a dead daemon's
// events come before any this process reads. Two rules keep each answer on
// its event: a recorded number free in this process is taken (a
// placeholder fd), so no new event gets it; and a new event that got one
// anyway (the number was this process's own fd, since closed) is answered
// only after the held event of that number.
type recovery struct {
	done map[int]chan struct{}
}

func (g *Group) startRecovery(ctx context.Context, f Filler, opts Options, log *slog.Logger, wg *sync.WaitGroup) *recovery {
	if len(opts.Recover) == 0 {
		if opts.RecoverDone != nil {
			opts.RecoverDone(0, 0)
		}
		return nil
	}
	r := &recovery{done: map[int]chan struct{}{}}
	null, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		null = -1
	}
	var evs []Event
	holders := map[int]int{}
	for _, ev := range opts.Recover {
		if ev.Fd < 0 || r.done[ev.Fd] != nil {
			continue
		}
		r.done[ev.Fd] = make(chan struct{})
		evs = append(evs, ev)
		// F_DUPFD gives the lowest free number >= ev.Fd: ev.Fd itself
		// if free, taken atomically (dup2 could close a file another
		// goroutine just opened there).
		if null >= 0 {
			if h, err := unix.FcntlInt(uintptr(null), unix.F_DUPFD_CLOEXEC, ev.Fd); err == nil {
				if h == ev.Fd {
					holders[ev.Fd] = h
				} else {
					unix.Close(h)
				}
			}
		}
	}
	if null >= 0 {
		// /dev/null itself may have got a recorded number (the lowest
		// free one, as event fds do): then it is that number's holder.
		if _, held := holders[null]; r.done[null] != nil && !held {
			holders[null] = null
		} else {
			unix.Close(null)
		}
	}
	var allowed, denied atomic.Int32
	var all sync.WaitGroup
	sem := make(chan struct{}, opts.Workers)
	for _, ev := range evs {
		all.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer all.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			start := time.Now()
			err, _, release := fill(ctx, f, nil, ev, opts.Timeout)
			go release()
			resp := uint32(unix.FAN_ALLOW)
			if err != nil {
				resp = deny(ErrnoOf(err))
				log.Error("fanotify: held event of the previous daemon failed", "fd", ev.Fd, "offset", ev.Offset, "count", ev.Count, "err", err)
			}
			// Off the journal first, as in Serve: should this daemon die
			// now, its successor must not answer the number again.
			if opts.Journal != nil {
				opts.Journal.forget(ev)
			}
			_, werr := unix.Write(g.fd, encodeResponse(ev.Fd, resp))
			close(r.done[ev.Fd])
			if h, ok := holders[ev.Fd]; ok {
				unix.Close(h)
			}
			if werr != nil {
				return // ENOENT: answered before its daemon died
			}
			if err == nil {
				allowed.Add(1)
			} else {
				denied.Add(1)
			}
			if opts.Observe != nil {
				opts.Observe(ev, err, time.Since(start))
			}
		}()
	}
	if opts.RecoverDone != nil {
		go func() {
			all.Wait()
			opts.RecoverDone(int(allowed.Load()), int(denied.Load()))
		}()
	}
	return r
}

// pending reports whether a held event of number fd is still unanswered.
func (r *recovery) pending(fd int) bool {
	if r == nil {
		return false
	}
	ch, ok := r.done[fd]
	if !ok {
		return false
	}
	select {
	case <-ch:
		return false
	default:
		return true
	}
}

// wait blocks until the held event of number fd, if any, is answered,
// and reports whether there was one.
func (r *recovery) wait(fd int) bool {
	if r == nil {
		return false
	}
	ch, ok := r.done[fd]
	if ok {
		<-ch
	}
	return ok
}

// DenyOrphans answers, with EIO, the events a dead daemon read from this
// group but never answered. The kernel keeps such events pending until
// someone answers them by the fd number the dead daemon saw, which nobody
// knows, so their readers would block forever. Call it on a group adopted
// after a restart, before Serve reads anything: then every pending event is
// an orphan, and each fd number in [0, maxFD] but except is tried (except:
// the numbers of events to Recover). It returns how many events it
// answered.
func (g *Group) DenyOrphans(maxFD int, except ...int) int {
	n := 0
	for fd := 0; fd <= maxFD; fd++ {
		if slices.Contains(except, fd) {
			continue
		}
		if _, err := unix.Write(g.fd, encodeResponse(fd, deny(unix.EIO))); err == nil {
			n++
		}
	}
	return n
}

// Deny answers the event whose fd is fd with DENY and errno (which the
// reader gets). The caller still closes fd.
func (g *Group) Deny(fd int, errno unix.Errno) error {
	if _, err := unix.Write(g.fd, encodeResponse(fd, deny(errno))); err != nil {
		return fmt.Errorf("fanotify response: %w", err)
	}
	return nil
}

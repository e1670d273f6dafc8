package fanotify

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
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

// New creates a pre-content fanotify group.
func New() (*Group, error) {
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_PRE_CONTENT|unix.FAN_CLOEXEC|unix.FAN_UNLIMITED_QUEUE, unix.O_RDWR|unix.O_LARGEFILE)
	if err != nil {
		if errors.Is(err, unix.EINVAL) {
			return nil, ErrUnsupported
		}
		return nil, fmt.Errorf("fanotify_init: %w", err)
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
	// needed). It must write only through f: writes through another fd of
	// the marked file would raise events of their own. A nil error answers
	// ALLOW; an error answers DENY with ErrnoOf(err), so the reader fails.
	Fill(ctx context.Context, f *os.File, ev Event) error
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
}

// SelfPid is a Trusted predicate for events this process raised.
func SelfPid(ev Event) bool { return int(ev.Pid) == os.Getpid() }

// Serve reads events and answers each after its fill, until ctx ends or the
// group fd fails. It does not close the group.
func (g *Group) Serve(ctx context.Context, f Filler, opts Options) error {
	if opts.Workers <= 0 {
		opts.Workers = 4
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 30 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
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
	dispatch := func(ev Event) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				// Answer anyway: an event left unanswered would block
				// its reader until the group closes (and Serve does not
				// close it). The next Serve of the group does the work.
				g.respond(ev.Fd, deny(unix.EIO), log)
				unix.Close(ev.Fd)
				return
			}
			defer func() { <-sem }()
			g.answer(ctx, f, ev, opts, log)
		}()
	}

	buf := make([]byte, 64<<10)
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
		evs, perr := ParseEvents(buf[:n])
		for _, ev := range evs {
			switch {
			case ev.Fd < 0: // FAN_NOFD: queue overflow, nothing to answer
				log.Warn("fanotify queue overflow", "mask", ev.Mask)
			case ev.Mask&unix.FAN_PRE_ACCESS == 0:
				g.respond(ev.Fd, unix.FAN_ALLOW, log)
				unix.Close(ev.Fd)
			case opts.Trusted != nil && opts.Trusted(ev):
				g.respond(ev.Fd, unix.FAN_ALLOW, log)
				unix.Close(ev.Fd)
			default:
				dispatch(ev)
			}
		}
		if perr != nil {
			// The kernel never sends this; if it did, the events past the
			// bad one are lost and their readers would hang: fail loudly.
			return fmt.Errorf("fanotify: %w", perr)
		}
	}
}

// answer fills ev under the deadline and responds exactly once. The event's
// fd is closed only after the fill returns: closing it earlier would let the
// number be reused while the fill still writes through it.
func (g *Group) answer(ctx context.Context, f Filler, ev Event, opts Options, log *slog.Logger) {
	start := time.Now()
	fctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	file := os.NewFile(uintptr(ev.Fd), "fanotify-event")
	done := make(chan error, 1)
	go func() {
		done <- f.Fill(fctx, file, ev)
	}()
	var err error
	finished := false
	select {
	case err = <-done:
		finished = true
	case <-fctx.Done():
		err = fmt.Errorf("fill [%d,+%d) for pid %d: deadline %s passed: %w", ev.Offset, ev.Count, ev.Pid, opts.Timeout, unix.EIO)
	}
	resp := uint32(unix.FAN_ALLOW)
	if err != nil {
		resp = deny(ErrnoOf(err))
		log.Error("fanotify fill failed", "offset", ev.Offset, "count", ev.Count, "pid", ev.Pid, "err", err)
	}
	// The kernel matches the response to the event by fd number, so answer
	// before closing: a closed number can be reused by the next event.
	g.respond(ev.Fd, resp, log)
	release := func() { cancel(); file.Close() }
	if finished {
		release()
	} else {
		go func() { <-done; release() }()
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

// DenyOrphans answers, with EIO, the events a dead daemon read from this
// group but never answered. The kernel keeps such events pending until
// someone answers them by the fd number the dead daemon saw, which nobody
// knows, so their readers would block forever. Call it on a group adopted
// after a restart, before Serve reads anything: then every pending event is
// an orphan, and each fd number in [0, maxFD] is tried. It returns how
// many events it answered.
func (g *Group) DenyOrphans(maxFD int) int {
	n := 0
	for fd := 0; fd <= maxFD; fd++ {
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

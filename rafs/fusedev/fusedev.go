// Package fusedev serves a go-fuse RawFileSystem over a /dev/fuse connection
// that it mounts itself or adopts from another daemon (live upgrade and
// failover, as nydusd does through its supervisor).
//
// Requests are read from the /dev/fuse file descriptor by a small pool of
// goroutines and answered by go-fuse's fuse.ProtocolServer, so opcode
// dispatch stays go-fuse's. The descriptor is put in non-blocking mode and
// read through the Go runtime poller: a daemon can then stop its readers
// (a read deadline) without losing a request it has already taken from the
// kernel, which is what lets a second daemon take the connection over with
// no error seen by the processes using the mount.
package fusedev

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// FUSE protocol numbers this package needs beyond go-fuse's dispatch.
const (
	opInit           = 26
	notifyResend     = 7 // FUSE_NOTIFY_RESEND, Linux 6.9+
	notifyInvalEntry = 3
	inHeaderSize     = 40
	outHeaderSize    = 16
	defaultThreads   = 4
	// DefaultMaxWrite is the largest READ/WRITE the kernel is told to send;
	// 1 MiB with a 1 MiB readahead doubles cold sequential reads over the
	// 128 KiB defaults (see the project's FUSE performance notes).
	DefaultMaxWrite = 1 << 20
	// DefaultReadAheadKB is written to the mount's bdi read_ahead_kb.
	DefaultReadAheadKB = 1024
)

// ErrStopped is returned by Wait when the readers were stopped by Stop
// rather than by the connection ending.
var ErrStopped = errors.New("fusedev: readers stopped")

// Options configure a Server.
type Options struct {
	// Threads is the number of request readers (nydusd --thread-num).
	Threads int
	// ReadOnly mounts with MS_RDONLY.
	ReadOnly bool
	// FsName is the mount source shown in /proc/mounts ("rafs" as nydusd).
	FsName string
	// MaxWrite bounds READ and WRITE sizes; 0 means DefaultMaxWrite.
	MaxWrite int
	// ReadAheadKB is set on the mount's bdi once INIT is answered; 0 means
	// DefaultReadAheadKB, negative leaves the kernel's value.
	ReadAheadKB int
	// Logger receives transport errors; nil means slog.Default().
	Logger *slog.Logger
}

func (o *Options) fill() {
	if o.Threads <= 0 {
		o.Threads = defaultThreads
	}
	if o.FsName == "" {
		o.FsName = "rafs"
	}
	if o.MaxWrite <= 0 {
		o.MaxWrite = DefaultMaxWrite
	}
	if o.ReadAheadKB == 0 {
		o.ReadAheadKB = DefaultReadAheadKB
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Server is one FUSE connection served by one RawFileSystem.
type Server struct {
	opts       Options
	ps         *fuse.ProtocolServer
	mountpoint string
	dev        *os.File

	mu       sync.Mutex
	initReq  []byte
	initDone chan struct{}
	initOnce sync.Once

	// inflight has one slot per reader, as nydusd keeps one per FUSE
	// thread: what each is serving now (/api/v1/metrics/inflight).
	inflight []inflightSlot

	running  bool
	stopping bool
	wg       sync.WaitGroup
	done     chan struct{} // closed when the connection ends
	doneOnce sync.Once
	doneErr  error
}

// New returns a server for fs; call Mount or Adopt, then Start.
func New(fs fuse.RawFileSystem, opts Options) *Server {
	opts.fill()
	mo := &fuse.MountOptions{
		MaxWrite: opts.MaxWrite,
		Name:     opts.FsName,
		FsName:   opts.FsName,
	}
	return &Server{
		opts:     opts,
		ps:       fuse.NewProtocolServer(fs, mo),
		initDone: make(chan struct{}),
		done:     make(chan struct{}),
	}
}

// Mount opens /dev/fuse and mounts it at mountpoint, as nydusd does
// (type "fuse", source FsName, allow_other, default_permissions).
func (s *Server) Mount(mountpoint string) error {
	mp, err := filepath.Abs(mountpoint)
	if err != nil {
		return fmt.Errorf("fusedev: mountpoint %q: %w", mountpoint, err)
	}
	fi, err := os.Stat(mp)
	if err != nil {
		return fmt.Errorf("fusedev: mountpoint: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("fusedev: mountpoint %s is not a directory", mp)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("fusedev: open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("default_permissions,allow_other,fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=%d", fd, s.opts.MaxWrite)
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOATIME)
	if s.opts.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(s.opts.FsName, mp, "fuse", flags, data); err != nil {
		unix.Close(fd)
		return fmt.Errorf("fusedev: mount %s: %w", mp, err)
	}
	s.mountpoint = mp
	s.dev = os.NewFile(uintptr(fd), "/dev/fuse")
	return nil
}

// Adopt takes over a live connection: dev is the /dev/fuse descriptor the
// previous daemon served and initReq the FUSE_INIT request it answered. The
// request is replayed into this server's protocol state (negotiated flags,
// kernel limits) and its reply discarded: the kernel got one already.
func (s *Server) Adopt(dev *os.File, mountpoint string, initReq []byte) error {
	if len(initReq) < inHeaderSize || binary.LittleEndian.Uint32(initReq[4:8]) != opInit {
		return fmt.Errorf("fusedev: adopt: saved INIT request is not a FUSE_INIT (%d bytes)", len(initReq))
	}
	rc, err := dev.SyscallConn()
	if err != nil {
		return fmt.Errorf("fusedev: adopt: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetNonblock(int(fd), true) }); err != nil {
		return fmt.Errorf("fusedev: adopt: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("fusedev: adopt: set non-blocking: %w", serr)
	}
	// Re-wrap so the runtime poller owns the (now non-blocking) descriptor.
	var nfd int
	if err := rc.Control(func(fd uintptr) { nfd, serr = unix.Dup(int(fd)) }); err != nil || serr != nil {
		return fmt.Errorf("fusedev: adopt: dup: %v %v", err, serr)
	}
	unix.CloseOnExec(nfd)
	dev.Close()
	out := make([]byte, 4096)
	if _, st := s.ps.HandleRequest([][]byte{initReq}, [][]byte{out}); !st.Ok() {
		unix.Close(nfd)
		return fmt.Errorf("fusedev: adopt: replaying INIT: %v", st)
	}
	s.dev = os.NewFile(uintptr(nfd), "/dev/fuse")
	s.mountpoint = mountpoint
	s.mu.Lock()
	s.initReq = append([]byte(nil), initReq...)
	s.mu.Unlock()
	s.initOnce.Do(func() { close(s.initDone) })
	return nil
}

// Start launches the request readers.
func (s *Server) Start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running || s.dev == nil {
		return
	}
	s.running = true
	s.stopping = false
	_ = s.dev.SetReadDeadline(time.Time{})
	if len(s.inflight) != s.opts.Threads {
		s.inflight = make([]inflightSlot, s.opts.Threads)
	}
	for i := 0; i < s.opts.Threads; i++ {
		s.wg.Add(1)
		go s.loop(&s.inflight[i])
	}
}

// Stop makes the readers stop taking requests, and waits until every
// request already taken has been answered. The connection stays open, so
// another daemon (or a later Start) can go on serving it.
func (s *Server) Stop() {
	s.mu.Lock()
	s.stopping = true
	if !s.running {
		s.mu.Unlock()
		return
	}
	_ = s.dev.SetReadDeadline(time.Unix(1, 0))
	s.mu.Unlock()
	s.wg.Wait()
	s.mu.Lock()
	s.running = false
	s.mu.Unlock()
}

// Mountpoint returns the absolute path the connection is mounted at.
func (s *Server) Mountpoint() string { return s.mountpoint }

// InitRequest returns a copy of the FUSE_INIT request the kernel sent (nil
// before it arrived).
func (s *Server) InitRequest() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.initReq...)
}

// WaitInit waits until the kernel's FUSE_INIT has been answered (or
// adopted).
func (s *Server) WaitInit(ctx context.Context) error {
	select {
	case <-s.initDone:
		return nil
	case <-s.done:
		return fmt.Errorf("fusedev: connection ended before INIT: %w", s.doneErr)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Done is closed when the kernel ends the connection (unmount or abort).
func (s *Server) Done() <-chan struct{} { return s.done }

// Control calls f with the /dev/fuse descriptor without changing its mode
// (os.File.Fd would make it blocking for every holder).
func (s *Server) Control(f func(fd int)) error {
	if s.dev == nil {
		return errors.New("fusedev: not connected")
	}
	rc, err := s.dev.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { f(int(fd)) })
}

// Resend asks the kernel to queue again every request that a previous
// daemon read but never answered (FUSE_NOTIFY_RESEND, nydusd's "resend"
// failover policy).
func (s *Server) Resend() error {
	var hdr [outHeaderSize]byte
	binary.LittleEndian.PutUint32(hdr[0:4], outHeaderSize)
	binary.LittleEndian.PutUint32(hdr[4:8], notifyResend)
	var werr error
	if err := s.Control(func(fd int) { _, werr = unix.Write(fd, hdr[:]) }); err != nil {
		return err
	}
	if werr != nil {
		return fmt.Errorf("fusedev: notify resend: %w", werr)
	}
	return nil
}

// EntryNotify tells the kernel to drop its cached entry name in directory
// node parent (FUSE_NOTIFY_INVAL_ENTRY); the VFS calls it after an
// unmount. It is a no-op while the readers are stopped: the kernel may
// need a reply from them before it can take the directory lock.
func (s *Server) EntryNotify(parent uint64, name string) fuse.Status {
	s.mu.Lock()
	running := s.running && !s.stopping
	s.mu.Unlock()
	if !running {
		return fuse.ENOSYS
	}
	msg := make([]byte, outHeaderSize+16+len(name)+1)
	binary.LittleEndian.PutUint32(msg[0:4], uint32(len(msg)))
	binary.LittleEndian.PutUint32(msg[4:8], notifyInvalEntry)
	binary.LittleEndian.PutUint64(msg[16:24], parent)
	binary.LittleEndian.PutUint32(msg[24:28], uint32(len(name)))
	copy(msg[32:], name)
	var werr error
	if err := s.Control(func(fd int) { _, werr = unix.Write(fd, msg) }); err != nil {
		return fuse.EIO
	}
	if werr != nil {
		return fuse.ToStatus(werr)
	}
	return fuse.OK
}

// Unmount detaches the mount (lazily if busy) and closes the connection.
func (s *Server) Unmount() error {
	var err error
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	if s.mountpoint != "" {
		if e := unix.Unmount(s.mountpoint, 0); e != nil {
			if e2 := unix.Unmount(s.mountpoint, unix.MNT_DETACH); e2 != nil && !errors.Is(e2, unix.EINVAL) {
				err = fmt.Errorf("fusedev: umount %s: %w", s.mountpoint, e2)
			}
		}
	}
	s.Stop()
	s.Close()
	s.finish(ErrStopped)
	return err
}

// Close closes this daemon's copy of the descriptor; the connection ends
// when no process holds one.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev != nil && !s.running {
		s.dev.Close()
	}
}

func (s *Server) isStopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopping
}

func (s *Server) finish(err error) {
	s.doneOnce.Do(func() {
		s.doneErr = err
		close(s.done)
	})
}

// InflightOp is a FUSE request being served, in nydusd's
// /api/v1/metrics/inflight form.
type InflightOp struct {
	Inode         uint64 `json:"inode"`
	Opcode        uint32 `json:"opcode"`
	Unique        uint64 `json:"unique"`
	TimestampSecs int64  `json:"timestamp_secs"`
}

type inflightSlot struct {
	mu sync.Mutex
	op InflightOp
	on bool
}

func (sl *inflightSlot) set(req []byte) {
	sl.mu.Lock()
	sl.op = InflightOp{
		Opcode:        binary.LittleEndian.Uint32(req[4:8]),
		Unique:        binary.LittleEndian.Uint64(req[8:16]),
		Inode:         binary.LittleEndian.Uint64(req[16:24]),
		TimestampSecs: time.Now().Unix(),
	}
	sl.on = true
	sl.mu.Unlock()
}

func (sl *inflightSlot) clear() {
	sl.mu.Lock()
	sl.on = false
	sl.mu.Unlock()
}

// Inflight returns the requests the readers are serving now, oldest
// reader first (empty when idle).
func (s *Server) Inflight() []InflightOp {
	s.mu.Lock()
	slots := s.inflight
	s.mu.Unlock()
	out := []InflightOp{}
	for i := range slots {
		sl := &slots[i]
		sl.mu.Lock()
		if sl.on {
			out = append(out, sl.op)
		}
		sl.mu.Unlock()
	}
	return out
}

func (s *Server) loop(slot *inflightSlot) {
	defer s.wg.Done()
	in := make([]byte, s.opts.MaxWrite+4096)
	out := make([]byte, s.opts.MaxWrite+4096)
	for {
		n, err := s.dev.Read(in)
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				return
			case errors.Is(err, syscall.EINTR), errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.EAGAIN):
				continue
			case errors.Is(err, syscall.ENODEV), errors.Is(err, os.ErrClosed), s.isStopping():
				// Unmounted or aborted; after an unmount the poller may
				// also report the descriptor as no longer pollable.
				s.finish(err)
				return
			default:
				s.opts.Logger.Error("fuse read failed", "err", err)
				s.finish(err)
				return
			}
		}
		req := in[:n]
		isInit := n >= inHeaderSize && binary.LittleEndian.Uint32(req[4:8]) == opInit
		if isInit {
			s.mu.Lock()
			s.initReq = append([]byte(nil), req...)
			s.mu.Unlock()
		}
		if n >= inHeaderSize {
			slot.set(req)
		}
		m, st := s.ps.HandleRequest([][]byte{req}, [][]byte{out})
		slot.clear()
		if st.Ok() && m > 0 {
			if _, err := s.dev.Write(out[:m]); err != nil {
				// ENOENT: the request was interrupted and is gone.
				if !errors.Is(err, syscall.ENOENT) {
					s.opts.Logger.Warn("fuse reply failed", "err", err)
				}
				if errors.Is(err, syscall.ENODEV) {
					s.finish(err)
					return
				}
			}
		}
		if isInit {
			s.initOnce.Do(func() { close(s.initDone) })
			if s.opts.ReadAheadKB > 0 {
				go s.setReadAhead()
			}
		}
	}
}

// setReadAhead raises the mount's bdi read_ahead_kb. It must run after
// INIT is answered: the kernel clamps readahead to what INIT negotiated.
// The device number comes from mountinfo, since a stat of the mountpoint
// would be a FUSE request itself.
func (s *Server) setReadAhead() {
	dev, err := mountDevice(s.mountpoint)
	if err != nil {
		s.opts.Logger.Warn("read_ahead_kb not set", "err", err)
		return
	}
	p := filepath.Join("/sys/class/bdi", dev, "read_ahead_kb")
	if err := os.WriteFile(p, []byte(fmt.Sprint(s.opts.ReadAheadKB)), 0); err != nil {
		s.opts.Logger.Warn("read_ahead_kb not set", "path", p, "err", err)
	}
}

// mountDevice returns "major:minor" of the last mount at mp in
// /proc/self/mountinfo.
func mountDevice(mp string) (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	dev := ""
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && unescapeMountinfo(f[4]) == mp {
			dev = f[2]
		}
	}
	if dev == "" {
		return "", fmt.Errorf("%s not in mountinfo", mp)
	}
	return dev, nil
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// IsMounted reports whether mp is a mount point in this namespace.
func IsMounted(mp string) bool {
	_, err := mountDevice(mp)
	return err == nil
}

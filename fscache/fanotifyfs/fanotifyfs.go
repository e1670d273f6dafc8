// Package fanotifyfs serves RAFS v6 images as on-demand EROFS mounts fed
// through fanotify pre-content events: the successor of EROFS over fscache.
//
// A RAFS v6 bootstrap is a complete EROFS metadata image whose device table
// names the blobs. A mount uses the bootstrap file as the primary device and,
// per blob, the shared fetcher's uncompressed cache data file (sparse,
// uncompressed chunks at their uncompressed offsets, the layout the FUSE and
// fscache modes use too) as an extra device. Each cache file is marked for
// FAN_PRE_ACCESS before the mount; when EROFS reads a range of it, the
// Server makes the chunks covering the range present through the fetcher
// (fetched, digest-checked, durable, marked in the chunk map) and only then
// allows the read. A failed or late fill denies it with EIO: readers never
// see the holes.
//
// The fetcher opens its cache files before they are marked, and the kernel
// decides at open time whether a file reports pre-content events, so the
// fetcher's own I/O raises none. After a daemon restart (the group adopted
// from a supervisor, the marks still in place) it does: once a mount was
// adopted, Serve allows this process's own events at once
// (fanotify.SelfPid), so a restarted daemon must never read its mounts.
package fanotifyfs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/storage"
)

// ErrNoFileBackedEROFS is wrapped by Mount when the kernel cannot mount
// EROFS from a regular file.
var ErrNoFileBackedEROFS = errors.New("kernel EROFS cannot mount regular files (needs CONFIG_EROFS_FS_BACKED_BY_FILE, Linux >= 6.12)")

// DefaultReadAheadKB is the EROFS readahead set on a new mount: 1 MiB per
// event instead of the kernel's 128 KiB cuts events per MiB eightfold.
const DefaultReadAheadKB = 1024

// Options describe one mount.
type Options struct {
	// Bootstrap is the RAFS v6 bootstrap file (the EROFS primary device).
	Bootstrap string
	// Mountpoint is the directory to mount on.
	Mountpoint string
	// Image is the decoded bootstrap; nil means read Bootstrap.
	Image *rafs.Image
	// Fetcher serves the image's chunks; it must have an uncompressed
	// blob cache. The caller keeps ownership (close it after Unmount).
	Fetcher *storage.Fetcher
	// ReadAheadKB is the mount's read_ahead_kb (0: DefaultReadAheadKB,
	// negative: leave the kernel's).
	ReadAheadKB int
	// DirectIO mounts with EROFS's directio option: EROFS reads the cache
	// files with O_DIRECT, so their pages are not cached twice.
	DirectIO bool
}

// Stats count the events a Server answered.
type Stats struct {
	Events      uint64 // pre-content events answered
	FastAllows  uint64 // answered from the chunk map without I/O
	Fills       uint64 // events that needed chunks fetched
	Failures    uint64 // events denied
	UnknownFile uint64 // events for files no mount uses (denied)
}

// Server answers the pre-content events of one fanotify group for every
// mount registered with it.
type Server struct {
	g   *fanotify.Group
	log *slog.Logger

	mu     sync.RWMutex
	files  map[fileKey]*blobFile
	mounts map[string]*Mount

	events, fast, fills, failures, unknown atomic.Uint64
	// trustSelf: a mount was adopted, so the fetcher's cache files were
	// opened while marked and its own I/O raises events.
	trustSelf atomic.Bool
}

type fileKey struct{ dev, ino uint64 }

// blobFile is one marked cache file and what fills it.
type blobFile struct {
	path   string
	f      *storage.Fetcher
	layout rafs.BlobLayout
	refs   int
	// stalled counts fills that outlived their deadline and still wait on
	// the backend. While any does, fills that need the backend fail at
	// once: a reader's readahead is many events, and each waiting out the
	// deadline in turn would stretch one EIO to minutes.
	stalled atomic.Int32
}

// Mount is one on-demand EROFS mount.
type Mount struct {
	s          *Server
	mountpoint string
	keys       []fileKey
	paths      []string
	once       sync.Once
}

// NewServer returns a server for g. Register mounts with Mount (or Adopt
// after a restart) and answer events with Serve.
func NewServer(g *fanotify.Group, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	return &Server{g: g, log: log, files: map[fileKey]*blobFile{}, mounts: map[string]*Mount{}}
}

// Group returns the server's fanotify group.
func (s *Server) Group() *fanotify.Group { return s.g }

// Stats returns the event counters.
func (s *Server) Stats() Stats {
	return Stats{Events: s.events.Load(), FastAllows: s.fast.Load(), Fills: s.fills.Load(), Failures: s.failures.Load(), UnknownFile: s.unknown.Load()}
}

// Serve answers events until ctx ends. It sets opts.Trusted (see the
// package doc).
func (s *Server) Serve(ctx context.Context, opts fanotify.Options) error {
	opts.Trusted = func(ev fanotify.Event) bool { return s.trustSelf.Load() && fanotify.SelfPid(ev) }
	obs := opts.Observe
	opts.Observe = func(ev fanotify.Event, err error, took time.Duration) {
		s.events.Add(1)
		if err != nil {
			s.failures.Add(1)
		}
		if obs != nil {
			obs(ev, err, took)
		}
	}
	if opts.Logger == nil {
		opts.Logger = s.log
	}
	return s.g.Serve(ctx, s, opts)
}

// Fill implements fanotify.Filler.
func (s *Server) Fill(ctx context.Context, f *os.File, ev fanotify.Event) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("fanotifyfs: fstat event file: %w", err)
	}
	s.mu.RLock()
	bf := s.files[fileKey{st.Dev, st.Ino}]
	s.mu.RUnlock()
	if bf == nil {
		s.unknown.Add(1)
		return fmt.Errorf("fanotifyfs: event for a file no mount uses (dev %d ino %d): %w", st.Dev, st.Ino, unix.EIO)
	}
	off, n := ev.Offset, ev.Count
	if !ev.HasRange {
		off, n = 0, bf.layout.Blob.UncompressedSize
	}
	chunks := bf.layout.Range(off, n)
	b := bf.layout.Blob
	missing := false
	for _, c := range chunks {
		if !bf.f.Cached(b, c) {
			missing = true
			break
		}
	}
	if !missing {
		s.fast.Add(1)
		return nil
	}
	s.fills.Add(1)
	if k := bf.stalled.Load(); k > 0 {
		return fmt.Errorf("fanotifyfs: blob %s [%d,+%d): %d earlier fills still wait on the backend past their deadline: %w", b.ID, off, n, k, unix.EIO)
	}
	done := make(chan error, 1)
	go func() { done <- bf.f.EnsureChunks(ctx, b, chunks) }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("fanotifyfs: blob %s [%d,+%d): %w", b.ID, off, n, err)
		}
		return nil
	case <-ctx.Done():
		bf.stalled.Add(1)
		go func() { <-done; bf.stalled.Add(-1) }()
		return fmt.Errorf("fanotifyfs: blob %s [%d,+%d): %w: %w", b.ID, off, n, ctx.Err(), unix.EIO)
	}
}

// Mount registers opts' cache files, marks them and mounts the bootstrap.
func (s *Server) Mount(opts Options) (*Mount, error) {
	return s.mount(opts, false)
}

// Adopt registers a mount a previous daemon made with the same group (the
// marks and the kernel mount are still in place) so that its events are
// served again. Call it before Serve, so queued events find their files.
func (s *Server) Adopt(opts Options) (*Mount, error) {
	return s.mount(opts, true)
}

func (s *Server) mount(opts Options, adopt bool) (*Mount, error) {
	if opts.Fetcher == nil {
		return nil, errors.New("fanotifyfs: no fetcher")
	}
	mp, err := filepath.Abs(opts.Mountpoint)
	if err != nil {
		return nil, fmt.Errorf("fanotifyfs: %w", err)
	}
	boot, err := filepath.Abs(opts.Bootstrap)
	if err != nil {
		return nil, fmt.Errorf("fanotifyfs: %w", err)
	}
	img := opts.Image
	if img == nil {
		if img, err = bootstrap.Open(boot); err != nil {
			return nil, fmt.Errorf("fanotifyfs: %w", err)
		}
	}
	if img.Version != 6 {
		return nil, fmt.Errorf("fanotifyfs: %s is a RAFS v%d bootstrap; the kernel mounts only v6", boot, img.Version)
	}
	if err := opts.Fetcher.AddImage(img); err != nil {
		return nil, fmt.Errorf("fanotifyfs: %w", err)
	}
	m := &Mount{s: s, mountpoint: mp}
	s.mu.Lock()
	if _, busy := s.mounts[mp]; busy {
		s.mu.Unlock()
		return nil, fmt.Errorf("fanotifyfs: %s is already mounted by this server: %w", mp, unix.EBUSY)
	}
	s.mounts[mp] = m
	s.mu.Unlock()
	if adopt {
		// From here the fetcher may open marked files.
		s.trustSelf.Store(true)
	}
	ok := false
	defer func() {
		if !ok {
			m.release(true)
		}
	}()
	// Opening the cache files here, before they are marked, keeps the
	// fetcher's own I/O on them free of events.
	for _, l := range img.BlobLayouts() {
		path, err := opts.Fetcher.CachePath(l.Blob)
		if err != nil {
			return nil, fmt.Errorf("fanotifyfs: %w", err)
		}
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			return nil, fmt.Errorf("fanotifyfs: %w", err)
		}
		k := fileKey{st.Dev, st.Ino}
		s.mu.Lock()
		bf := s.files[k]
		if bf == nil {
			bf = &blobFile{path: path, f: opts.Fetcher, layout: l}
			s.files[k] = bf
		} else if bf.f != opts.Fetcher {
			// Two fetchers over one cache file would each trust only
			// their own chunk map.
			s.mu.Unlock()
			return nil, fmt.Errorf("fanotifyfs: blob %s is already served through another fetcher; share one fetcher per cache directory", l.Blob.ID)
		}
		bf.refs++
		first := bf.refs == 1
		s.mu.Unlock()
		m.keys = append(m.keys, k)
		m.paths = append(m.paths, path)
		if first && !adopt {
			if err := s.g.Mark(path); err != nil {
				return nil, fmt.Errorf("fanotifyfs: %w", err)
			}
		}
	}
	if adopt {
		s.trustSelf.Store(true)
		ok = true
		return m, nil
	}
	var data []string
	for _, p := range m.paths {
		if strings.ContainsAny(p, ",") {
			return nil, fmt.Errorf("fanotifyfs: cache file path %q has a comma, which the mount options cannot carry", p)
		}
		data = append(data, "device="+p)
	}
	if opts.DirectIO {
		data = append(data, "directio")
	}
	if err := kernelMount(boot, mp, data, opts.ReadAheadKB, s.log); err != nil {
		return nil, err
	}
	ok = true
	s.log.Info("fanotifyfs: mounted", "bootstrap", boot, "mountpoint", mp, "blobs", len(m.paths), "directio", opts.DirectIO)
	return m, nil
}

// kernelMount mounts the EROFS image boot on mp with mount options data
// and sets its readahead (ra: 0 default, negative: leave it).
func kernelMount(boot, mp string, data []string, ra int, log *slog.Logger) error {
	before := erofsBDIs()
	// mount(2) itself: util-linux mount would put a loop device in between,
	// and loop I/O raises no fanotify events.
	if err := unix.Mount(boot, mp, "erofs", unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID, strings.Join(data, ",")); err != nil {
		if errors.Is(err, unix.ENOTBLK) {
			return fmt.Errorf("fanotifyfs: mount %s on %s: %w: %w", boot, mp, ErrNoFileBackedEROFS, err)
		}
		if errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("fanotifyfs: mount %s on %s: kernel has no EROFS (CONFIG_EROFS_FS): %w", boot, mp, err)
		}
		return fmt.Errorf("fanotifyfs: mount -t erofs -o %s %s %s: %w", strings.Join(data, ","), boot, mp, err)
	}
	if ra == 0 {
		ra = DefaultReadAheadKB
	}
	if ra > 0 {
		if err := setReadAhead(before, ra); err != nil {
			log.Warn("fanotifyfs: read_ahead_kb not set", "mountpoint", mp, "err", err)
		}
	}
	return nil
}

func erofsBDIs() map[string]bool {
	ents, _ := os.ReadDir("/sys/class/bdi")
	out := map[string]bool{}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "erofs") {
			out[e.Name()] = true
		}
	}
	return out
}

// setReadAhead sets read_ahead_kb of the EROFS bdi that appeared since
// before. The bdi is named after a counter, not the device, so a mount is
// found by what is new; with concurrent mounts it gives up rather than
// tune someone else's.
func setReadAhead(before map[string]bool, kb int) error {
	var fresh []string
	for name := range erofsBDIs() {
		if !before[name] {
			fresh = append(fresh, name)
		}
	}
	if len(fresh) != 1 {
		return fmt.Errorf("found %d new EROFS bdis (%v), want 1", len(fresh), fresh)
	}
	p := filepath.Join("/sys/class/bdi", fresh[0], "read_ahead_kb")
	if err := os.WriteFile(p, []byte(strconv.Itoa(kb)), 0o644); err != nil {
		return err
	}
	return nil
}

// Mountpoint returns the mount's directory.
func (m *Mount) Mountpoint() string { return m.mountpoint }

// CacheFiles returns the marked cache files, in device-table order.
func (m *Mount) CacheFiles() []string { return append([]string(nil), m.paths...) }

// Unmount unmounts m and stops serving its cache files once no mount uses
// them. If the mount is busy it is detached lazily instead and its files
// stay served (and marked): open files still read through it, and an
// unmarked or unserved file would read as holes or EIO.
func (m *Mount) Unmount() error {
	var err error
	m.once.Do(func() {
		uerr := unix.Unmount(m.mountpoint, 0)
		switch {
		case uerr == nil || errors.Is(uerr, unix.EINVAL):
			m.release(true)
		case errors.Is(uerr, unix.EBUSY):
			if derr := unix.Unmount(m.mountpoint, unix.MNT_DETACH); derr != nil {
				err = fmt.Errorf("fanotifyfs: umount -l %s: %w", m.mountpoint, derr)
			}
			m.s.log.Warn("fanotifyfs: mount busy, detached lazily; its cache files stay served", "mountpoint", m.mountpoint)
		default:
			err = fmt.Errorf("fanotifyfs: umount %s: %w", m.mountpoint, uerr)
		}
	})
	return err
}

// release unregisters m; unmark removes the marks of files no mount uses
// any more (only once no kernel mount reads them).
func (m *Mount) release(unmark bool) {
	s := m.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mounts[m.mountpoint] == m {
		delete(s.mounts, m.mountpoint)
	}
	for i, k := range m.keys {
		bf := s.files[k]
		if bf == nil {
			continue
		}
		bf.refs--
		if bf.refs == 0 {
			delete(s.files, k)
			if unmark {
				_ = s.g.Unmark(m.paths[i])
			}
		}
	}
	m.keys = nil
}

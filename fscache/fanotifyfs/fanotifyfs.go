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
// Fast path: the reading loop answers an event whose chunks are all
// present itself (Server.Present: a lock-free map lookup and bit tests);
// a sequential reader's next chunks are filled ahead in the background, in
// order, by AheadWorkers goroutines (bounded by MaxAhead and the end of the
// file being read, counted in Stats.AheadBytes), so fetching overlaps
// reading; and once every chunk of a cache file is present its mark is
// removed, so the kernel raises no more events for it and reads run at the
// speed of a plain EROFS mount.
//
// Every fill goes through the fetcher (buffered writes to the cache file,
// digest checked, marked in its chunk map). Direct (O_DIRECT) fills past
// the fetcher were tried and dropped: measured cold (64 MiB read by dd from
// another process, 2 shared cores) they were 2x slower on a buffered mount
// (the backing file's readahead had cached the holes as zero pages, which
// a direct write throws away and EROFS reads back from disk) and within
// noise on a directio mount (290-410 vs 280-380 MiB/s), for a second
// fetch-decode-verify-write path outside the fetcher. O_DIRECT reads in
// the localfs backend were tried too (2026-11): no gain and ~10% more cold
// CPU than buffered reads whose pages are recycled (pinning, and a blocked
// thread per 1 MiB read, cost what the page cache copy did).
//
// Daemon is the mode as rafsd runs it: mounts added and removed while it
// serves, the group handed to a supervisor, and after a restart the events
// the dead daemon held filled and allowed (see package fanotify).
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
	"sort"
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
	// AheadBytes are uncompressed bytes filled ahead of sequential
	// readers, before any event asked for them.
	AheadBytes uint64
	// Unmarked counts cache files whose mark was removed because every
	// chunk was present: the kernel raises no more events for them.
	Unmarked uint64
	// Recovered and Orphans count, after a takeover (Daemon with
	// Upgrade), the events the dead daemon held that were filled and
	// allowed from its journal, and those only denied with EIO (not
	// journaled: read in the instant before it journaled them).
	Recovered, Orphans uint64
}

// MaxAhead bounds the bytes filled ahead of a sequential reader. Windows
// of 8-16 MiB measured ~1.2 GiB/s cold where 4-8 MiB gave ~0.65 (two
// parallel halves each way; 64 MiB read on 2 shared cores).
const MaxAhead = 16 << 20

// Server answers the pre-content events of one fanotify group for every
// mount registered with it.
type Server struct {
	g   *fanotify.Group
	log *slog.Logger

	mu sync.Mutex
	// files is copied on write under mu, so the reading loop's fast path
	// (Present) looks files up without a lock.
	files  atomic.Pointer[map[fileKey]*blobFile]
	mounts map[string]*Mount

	events, fast, fills, failures, unknown, ahead, unmarked atomic.Uint64
	recovered, orphans                                      atomic.Uint64
	timeout                                                 atomic.Int64
	// keepMarks leaves complete files marked (benchmarks measure the
	// event path with it).
	keepMarks bool
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
	// present caches, by layout position, chunks known to be in the file
	// (they never leave it while it is served), and missing counts those
	// not known yet.
	present []atomic.Bool
	missing atomic.Int64
	// marked is whether the file's mark is in place.
	marked atomic.Bool
	// ahead is the fill ahead of a sequential reader.
	ahead ahead
	// runEnd is, by layout position, where the run of chunks that one
	// file stores contiguously in the blob ends: filling ahead stops
	// there, at the end of the file being read.
	runEnd []uint64
}

// runEnds computes blobFile.runEnd: for each chunk of l, the end of the
// file extent holding it (rafs.Image.FileExtents), or its own end.
func runEnds(l rafs.BlobLayout, img *rafs.Image) []uint64 {
	es := img.FileExtents(l.Blob)
	ends := make([]uint64, len(l.Chunks))
	for i, c := range l.Chunks {
		ends[i] = c.UncompressedOffset + uint64(c.UncompressedSize)
		if e, ok := rafs.ExtentAt(es, c.UncompressedOffset); ok {
			ends[i] = max(ends[i], e.Hi)
		}
	}
	return ends
}

func newBlobFile(path string, f *storage.Fetcher, l rafs.BlobLayout, img *rafs.Image) *blobFile {
	bf := &blobFile{path: path, f: f, layout: l, present: make([]atomic.Bool, len(l.Chunks)), runEnd: runEnds(l, img)}
	bf.missing.Store(int64(len(l.Chunks)))
	for i := range l.Chunks {
		bf.has(i)
	}
	return bf
}

// has reports whether the chunk at layout position i is present.
func (bf *blobFile) has(i int) bool {
	if bf.present[i].Load() {
		return true
	}
	if !bf.f.Cached(bf.layout.Blob, bf.layout.Chunks[i]) {
		return false
	}
	if bf.present[i].CompareAndSwap(false, true) {
		bf.missing.Add(-1)
	}
	return true
}

// span is the blob range an event asks for, and the layout positions of
// the chunks covering it.
func (bf *blobFile) span(ev fanotify.Event) (off, n uint64, lo, hi int) {
	off, n = ev.Offset, ev.Count
	if !ev.HasRange {
		off, n = 0, bf.layout.Blob.UncompressedSize
	}
	lo, hi = bf.positions(off, n)
	return off, n, lo, hi
}

// positions is BlobLayout.Range as indices into layout.Chunks.
func (bf *blobFile) positions(off, n uint64) (lo, hi int) {
	cs := bf.layout.Chunks
	end := off + n
	if end < off {
		end = ^uint64(0)
	}
	lo = sort.Search(len(cs), func(k int) bool { return cs[k].UncompressedOffset+uint64(cs[k].UncompressedSize) > off })
	hi = lo
	for hi < len(cs) && cs[hi].UncompressedOffset < end {
		hi++
	}
	return lo, hi
}

func (bf *blobFile) allPresent(lo, hi int) bool {
	for i := lo; i < hi; i++ {
		if !bf.has(i) {
			return false
		}
	}
	return true
}

// Mount is one on-demand EROFS mount.
type Mount struct {
	s          *Server
	mountpoint string
	keys       []fileKey
	paths      []string
	once       sync.Once
	lazy       atomic.Bool
}

// NewServer returns a server for g. Register mounts with Mount (or Adopt
// after a restart) and answer events with Serve.
func NewServer(g *fanotify.Group, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	s := &Server{g: g, log: log, mounts: map[string]*Mount{}}
	s.files.Store(&map[fileKey]*blobFile{})
	s.timeout.Store(int64(30 * time.Second))
	return s
}

// setFile publishes files[k] = bf (nil deletes); s.mu is held.
func (s *Server) setFile(k fileKey, bf *blobFile) {
	old := *s.files.Load()
	m := make(map[fileKey]*blobFile, len(old)+1)
	for kk, v := range old {
		m[kk] = v
	}
	if bf == nil {
		delete(m, k)
	} else {
		m[k] = bf
	}
	s.files.Store(&m)
}

func (s *Server) file(dev, ino uint64) *blobFile {
	return (*s.files.Load())[fileKey{dev, ino}]
}

// Group returns the server's fanotify group.
func (s *Server) Group() *fanotify.Group { return s.g }

// Stats returns the event counters.
func (s *Server) Stats() Stats {
	return Stats{Events: s.events.Load(), FastAllows: s.fast.Load(), Fills: s.fills.Load(), Failures: s.failures.Load(), UnknownFile: s.unknown.Load(), AheadBytes: s.ahead.Load(), Unmarked: s.unmarked.Load(), Recovered: s.recovered.Load(), Orphans: s.orphans.Load()}
}

// Serve answers events until ctx ends. It sets opts.Trusted (see the
// package doc).
func (s *Server) Serve(ctx context.Context, opts fanotify.Options) error {
	opts.Trusted = func(ev fanotify.Event) bool { return s.trustSelf.Load() && fanotify.SelfPid(ev) }
	if opts.Timeout > 0 {
		s.timeout.Store(int64(opts.Timeout))
	}
	return s.serveGroup(ctx, s.g, opts)
}

// serveGroup answers g's events with s until ctx ends, counting them in
// s's Stats: s's own group, or one a daemon adopted (daemon.go).
func (s *Server) serveGroup(ctx context.Context, g *fanotify.Group, opts fanotify.Options) error {
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
	return g.Serve(ctx, s, opts)
}

// Present implements fanotify.Prober: the reading loop's fast path, a few
// atomic loads per chunk (the fetcher's chunk map under a read lock for a
// chunk not seen present yet).
func (s *Server) Present(ev fanotify.Event) bool {
	bf := s.file(ev.Dev, ev.Ino)
	if bf == nil {
		return false
	}
	off, n, lo, hi := bf.span(ev)
	if !bf.allPresent(lo, hi) {
		return false
	}
	s.fast.Add(1)
	s.readAhead(bf, off, n)
	return true
}

// ahead is a blob file's fill-ahead state: a window of layout positions
// past a sequential reader, handed out in order, unit by unit, to up to
// AheadWorkers goroutines. In-order units keep the chunk the reader needs
// next the next one finished (a window split into halves made it wait on
// the first half while the second was done early), and a window that moves
// with every event keeps the workers busy without the gap between batches.
type ahead struct {
	mu sync.Mutex
	// next is where the last event ended: a sequential reader's next
	// event starts there.
	next uint64
	// issued is the layout position up to which chunks were handed to a
	// worker (or to the event that reads them); target is where the
	// window ends (exclusive).
	issued, target int
	// start is where the window began: an event in [start, target) is
	// the same reader's.
	start   int
	workers int
}

// AheadWorkers bounds the goroutines filling ahead of one reader: each
// takes the next unit of the window, so this many units are fetched,
// verified and written at once (on 2 cores, 2 keep both busy beside the
// reader; more only queue behind them).
var AheadWorkers = 2

// aheadUnit is the uncompressed bytes one worker fills per request (at
// least one chunk): small enough that units finish in the reader's order,
// large enough that a remote backend's request cost stays small.
var aheadUnit uint64 = 1 << 20

// readAhead fills ahead of a sequential reader: the kernel asks for one
// readahead window at a time and the reader waits on each, so without it
// fetching and reading take turns. When [off,+n) starts where the last
// event ended (or inside the window being filled), the window is moved to
// reach min(max(8n, 8 MiB), MaxAhead) bytes past its end, never past the
// end of the file being read, and workers are started to fill it (counted
// in AheadBytes). It neither blocks nor makes system calls: the reading
// loop calls it.
func (s *Server) readAhead(bf *blobFile, off, n uint64) {
	end := off + n
	lo0, hi0 := bf.positions(off, n)
	if n == 0 || hi0 == 0 {
		return
	}
	stop := bf.runEnd[hi0-1]
	want := min(end+min(max(8*n, 8<<20), MaxAhead), stop)
	a := &bf.ahead
	a.mu.Lock()
	defer a.mu.Unlock()
	inWindow := lo0 >= a.start && lo0 < a.target
	seq := a.next == off || inWindow
	a.next = end
	if !seq {
		return
	}
	if !inWindow {
		// A new window (the last one was used up, or left for another
		// part of the blob): workers still at the old one move here
		// after their unit.
		a.start, a.issued, a.target = lo0, hi0, hi0
	}
	// The event's own chunks are the event's to fetch.
	a.issued = max(a.issued, hi0)
	if want > end {
		_, hi := bf.positions(end, want-end)
		a.target = max(a.target, hi)
	}
	for a.workers < AheadWorkers && a.issued < a.target {
		a.workers++
		go s.fillAhead(bf)
	}
}

// fillAhead is one fill-ahead worker: it takes the window's next unit of
// missing chunks and makes it present, until the window is filled.
func (s *Server) fillAhead(bf *blobFile) {
	a := &bf.ahead
	for {
		a.mu.Lock()
		for a.issued < a.target && bf.has(a.issued) {
			a.issued++
		}
		lo := a.issued
		var bytes uint64
		for a.issued < a.target && (bytes == 0 || bytes < aheadUnit) {
			bytes += uint64(bf.layout.Chunks[a.issued].UncompressedSize)
			a.issued++
		}
		hi := a.issued
		if lo == hi {
			a.workers--
			a.mu.Unlock()
			return
		}
		a.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(s.timeout.Load()))
		filled, err := s.fillRange(ctx, bf, lo, hi)
		cancel()
		if err != nil {
			// The event that needs these chunks fetches them again and
			// reports the failure to its reader; stop filling ahead
			// until the next sequential event.
			s.log.Debug("fanotifyfs: fill ahead failed", "blob", bf.layout.Blob.ID, "err", err)
			a.mu.Lock()
			a.target = min(a.target, a.issued)
			a.workers--
			a.mu.Unlock()
			return
		}
		s.ahead.Add(filled)
		s.maybeUnmark(bf)
	}
}

// fillRange makes the chunks at layout positions [lo,hi) present through
// the fetcher and returns the bytes of those that were missing. The
// fetcher skips present chunks and joins ones another fill is fetching
// (it is single-flight), so workers and events need no claims of their
// own.
func (s *Server) fillRange(ctx context.Context, bf *blobFile, lo, hi int) (uint64, error) {
	var bytes uint64
	for i := lo; i < hi; i++ {
		if !bf.has(i) {
			bytes += uint64(bf.layout.Chunks[i].UncompressedSize)
		}
	}
	if bytes == 0 {
		return 0, nil
	}
	err := bf.f.EnsureChunks(ctx, bf.layout.Blob, bf.layout.Chunks[lo:hi])
	for i := lo; i < hi; i++ {
		bf.has(i) // counts what is present now out of missing
	}
	return bytes, err
}

// maybeUnmark removes the mark of a file every chunk of which is present:
// the kernel then raises no more events for it (the mark is checked on
// every read; the file stays open in EROFS). The chunks stay: the fetcher
// never punches a served file's chunks out.
func (s *Server) maybeUnmark(bf *blobFile) {
	if s.keepMarks || bf.missing.Load() > 0 || !bf.marked.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if bf.refs == 0 || !bf.marked.Load() {
		return
	}
	if err := s.g.Unmark(bf.path); err != nil {
		s.log.Warn("fanotifyfs: unmark complete cache file", "path", bf.path, "err", err)
		return
	}
	bf.marked.Store(false)
	s.unmarked.Add(1)
	s.log.Debug("fanotifyfs: cache file complete, unmarked", "path", bf.path)
}

// Fill implements fanotify.Filler: it fetches the chunks covering the
// event's range that are not present (and, for a sequential reader,
// starts filling ahead first, so both overlap).
func (s *Server) Fill(ctx context.Context, f *os.File, ev fanotify.Event) error {
	if ev.Ino == 0 && f != nil {
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err != nil {
			return fmt.Errorf("fanotifyfs: fstat event file: %w", err)
		}
		ev.Dev, ev.Ino = st.Dev, st.Ino
	}
	bf := s.file(ev.Dev, ev.Ino)
	if bf == nil {
		s.unknown.Add(1)
		return fmt.Errorf("fanotifyfs: event for a file no mount uses (dev %d ino %d): %w", ev.Dev, ev.Ino, unix.EIO)
	}
	off, n, lo, hi := bf.span(ev)
	b := bf.layout.Blob
	if bf.allPresent(lo, hi) {
		s.fast.Add(1)
		s.readAhead(bf, off, n)
		return nil
	}
	s.fills.Add(1)
	if k := bf.stalled.Load(); k > 0 {
		return fmt.Errorf("fanotifyfs: blob %s [%d,+%d): %d earlier fills still wait on the backend past their deadline: %w", b.ID, off, n, k, unix.EIO)
	}
	s.readAhead(bf, off, n)
	chunks := bf.layout.Chunks[lo:hi]
	done := make(chan error, 1)
	go func() {
		// Chunks a fill-ahead worker or another event is fetching the
		// fetcher joins rather than fetching them again; a failure this
		// event shared with such a fill (or had itself) is fetched once
		// more, as this reader's own, before it is reported.
		err := bf.f.EnsureChunks(ctx, b, chunks)
		if err == nil || ctx.Err() != nil {
			done <- err
			return
		}
		s.log.Debug("fanotifyfs: fill failed, fetching again", "blob", b.ID, "err", err)
		done <- bf.f.EnsureChunks(ctx, b, chunks)
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("fanotifyfs: blob %s [%d,+%d): %w", b.ID, off, n, err)
		}
		bf.allPresent(lo, hi)
		s.maybeUnmark(bf)
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
			return nil, fmt.Errorf("fanotifyfs: %w: %w", ErrInvalid, err)
		}
		bootstrap.ReleaseMemory()
	}
	if img.Version != 6 {
		return nil, fmt.Errorf("fanotifyfs: %w: %s is a RAFS v%d bootstrap; the kernel mounts only v6", ErrInvalid, boot, img.Version)
	}
	if err := opts.Fetcher.AddImage(img); err != nil {
		return nil, fmt.Errorf("fanotifyfs: %w", err)
	}
	m := &Mount{s: s, mountpoint: mp}
	s.mu.Lock()
	if _, busy := s.mounts[mp]; busy {
		s.mu.Unlock()
		return nil, fmt.Errorf("fanotifyfs: %s is already mounted by this server: %w: %w", mp, ErrMountExists, unix.EBUSY)
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
		bf := s.file(k.dev, k.ino)
		if bf == nil {
			bf = newBlobFile(path, opts.Fetcher, l, img)
			s.setFile(k, bf)
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
		switch {
		case first && adopt:
			// The mark may be gone (removed once the file was complete):
			// removing it again is harmless, so assume it is there.
			bf.marked.Store(bf.missing.Load() > 0 || s.keepMarks)
		case first && (bf.missing.Load() > 0 || s.keepMarks):
			if err := s.g.Mark(path); err != nil {
				return nil, fmt.Errorf("fanotifyfs: %w", err)
			}
			bf.marked.Store(true)
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
			m.lazy.Store(true)
			m.s.log.Warn("fanotifyfs: mount busy, detached lazily; its cache files stay served", "mountpoint", m.mountpoint)
		default:
			err = fmt.Errorf("fanotifyfs: umount %s: %w", m.mountpoint, uerr)
		}
	})
	return err
}

// Lazy reports whether Unmount found the mount busy and detached it
// lazily: its files are still served, so its fetcher must stay open.
func (m *Mount) Lazy() bool { return m.lazy.Load() }

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
		bf := s.file(k.dev, k.ino)
		if bf == nil {
			continue
		}
		bf.refs--
		if bf.refs == 0 {
			s.setFile(k, nil)
			if unmark && bf.marked.Load() {
				_ = s.g.Unmark(m.paths[i])
				bf.marked.Store(false)
			}
		}
	}
	m.keys = nil
}

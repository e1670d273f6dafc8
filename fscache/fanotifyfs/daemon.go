package fanotifyfs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
	"github.com/rafsd/rafsd/fscache/fanotifyfs/guard"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/fusedev"
	"github.com/rafsd/rafsd/rafs/storage"
)

// MountSpec is one mount of a daemon, as saved with the supervisor.
type MountSpec struct {
	Bootstrap   string `json:"bootstrap"`
	Mountpoint  string `json:"mountpoint"`
	Config      string `json:"config"` // nydusd daemon config (JSON or TOML)
	ReadAheadKB int    `json:"read_ahead_kb,omitempty"`
	DirectIO    bool   `json:"directio,omitempty"`
}

// savedState is what a daemon hands its supervisor with the group fd.
type savedState struct {
	Mode   string      `json:"mode"` // "fanotify"
	Mounts []MountSpec `json:"mounts"`
	// Journal is the file recording the events the daemon holds
	// (fanotify.Journal), for its successor to answer.
	Journal string `json:"journal,omitempty"`
	// Dirs are the cache directories the daemon's guard, if any, listens
	// in: the successor takes its groups over there at start.
	Dirs []string `json:"dirs,omitempty"`
	// MaxFD is the highest fd number the daemon could hold: the numbers
	// the successor tries when answering the events it left unanswered.
	MaxFD int `json:"max_fd,omitempty"`
}

// ErrMountExists and ErrNoMount are wrapped by Daemon.Mount and Unmount.
var (
	ErrMountExists = errors.New("mountpoint already mounted by this daemon")
	ErrNoMount     = errors.New("no mount at this mountpoint")
	ErrInvalid     = errors.New("invalid mount")
)

// DaemonOptions configure StartDaemon and RunDaemon.
type DaemonOptions struct {
	// Mounts are mounted on a fresh start (ignored with Upgrade).
	Mounts []MountSpec
	// Supervisor is the supervisor's socket (nydus-snapshotter protocol,
	// rafs/fusedev). A fresh daemon hands it the group fd and its mounts
	// (again after every mount change), so that readers block rather than
	// read holes if the daemon dies; with Upgrade the daemon takes both
	// back and answers the events the dead daemon held.
	Supervisor string
	Upgrade    bool
	// Timeout is the per-event deadline (default 30s); Workers bounds
	// fills in parallel.
	Timeout time.Duration
	Workers int
	Logger  *slog.Logger
	// FetcherOptions are passed to storage.New for every mount.
	FetcherOptions []storage.Option
	// Guard lets the daemon start guard processes (package guard; the
	// binary must call MaybeRunGuard first thing in main). Without a
	// supervisor one starts before mounting and holds every group, so
	// that the daemon's death fails reads with EIO instead of letting them
	// see holes. With a supervisor, which holds the daemon's own group,
	// one runs only while the daemon serves groups taken over from a
	// crashed daemon's guard. Either way, a daemon with Guard takes over,
	// at start and at every mount, the groups of a crashed daemon's guard
	// in each of its cache directories; one without refuses such a
	// directory.
	Guard bool
	// CacheDirs are cache directories to take guarded groups over from at
	// start besides those of Mounts (or, with Upgrade, of the mounts and
	// directories handed back by the supervisor): the cache directory of
	// the default config of mounts made later through the API.
	CacheDirs []string
	// JournalPath is where a fresh daemon with a supervisor journals the
	// events it holds (default: rafsd-fanotify-<pid>.journal in
	// os.TempDir()); a successor finds it in the saved state.
	JournalPath string
	// KeepMarks leaves complete cache files marked, so that every read
	// that misses the page cache still raises an event (tests of the
	// event path); by default a complete file's mark is removed.
	KeepMarks bool
	// Ready, if set, is called once every mount is served (with the
	// guard, if any).
	Ready func(*Server, *guard.Guard)
}

// Daemon is the fanotify mode of rafsd: one group, one Server, and mounts
// added and removed while it serves.
type Daemon struct {
	opts    DaemonOptions
	log     *slog.Logger
	g       *fanotify.Group
	srv     *Server
	journal *fanotify.Journal
	guard   atomic.Pointer[guard.Guard]
	// ino, with a guard and no supervisor, is the inotify instance
	// watching the roots of the daemon's mounts (-1 otherwise): the
	// guard's exit condition.
	ino int
	// maxFD bounds the fd numbers of the events the daemon reads (its
	// RLIMIT_NOFILE less one, at most guard.MaxFD).
	maxFD int

	mu     sync.Mutex
	mounts []*daemonMount
	// adopted are groups taken over from a crashed daemon's guard,
	// served until no mount reads through them any more.
	adopted []*adoptedGroup
	// dirs are the cache directories of every mount made and every
	// directory guarded groups were looked for in at start, where the
	// guard listens for a successor.
	dirs []string
	// lingering fetchers serve mounts detached lazily while busy.
	lingering []*storage.Fetcher
	closed    bool

	stopServing context.CancelFunc
	served      chan error
}

type daemonMount struct {
	spec MountSpec
	m    *Mount
	f    *storage.Fetcher
}

// RunDaemon runs StartDaemon until ctx ends, then Close. A daemon that
// dies uncleanly leaves its mounts to the supervisor's copy of the group:
// their readers block until an upgraded daemon answers. Without a
// supervisor its guard detaches them and fails their reads with EIO until
// a new daemon starting on (or mounting from) the same cache directory
// takes the group over, with or without a supervisor, or their last reader
// closes (package guard).
func RunDaemon(ctx context.Context, opts DaemonOptions) error {
	d, err := StartDaemon(opts)
	if err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return d.Close()
	case err := <-d.served:
		d.served <- err
		return errors.Join(err, d.Close())
	}
}

// StartDaemon mounts opts.Mounts (or, with Upgrade, takes the group and
// the mounts over from the supervisor, answering the events the previous
// daemon held) and serves their events until Close.
func StartDaemon(opts DaemonOptions) (_ *Daemon, err error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	d := &Daemon{opts: opts, log: log, served: make(chan error, 1), ino: -1, maxFD: boundFDs(log, guard.MaxFD)}
	var state savedState
	if opts.Upgrade {
		if opts.Supervisor == "" {
			return nil, errors.New("fanotifyfs: upgrade needs a supervisor")
		}
		raw, file, err := fusedev.RecvState(opts.Supervisor, 30*time.Second)
		if err != nil {
			return nil, fmt.Errorf("fanotifyfs: take over: %w", err)
		}
		// Own a plain fd: the *os.File's finalizer would close it.
		fd, err := unix.Dup(int(file.Fd()))
		file.Close()
		if err != nil {
			return nil, fmt.Errorf("fanotifyfs: take over: %w", err)
		}
		unix.CloseOnExec(fd)
		if err := json.Unmarshal(raw, &state); err != nil || state.Mode != "fanotify" {
			unix.Close(fd)
			return nil, fmt.Errorf("fanotifyfs: take over: state from %s is not a fanotify daemon's (%v)", opts.Supervisor, err)
		}
		d.g = fanotify.FromFD(fd)
	} else {
		if d.g, err = fanotify.New(); err != nil {
			return nil, fmt.Errorf("fanotifyfs: %w", err)
		}
		state = savedState{Mode: "fanotify"}
		if opts.Supervisor != "" {
			state.Journal = opts.JournalPath
			if state.Journal == "" {
				state.Journal = filepath.Join(os.TempDir(), fmt.Sprintf("rafsd-fanotify-%d.journal", os.Getpid()))
			}
		}
	}
	d.srv = NewServer(d.g, log)
	d.srv.keepMarks = opts.KeepMarks
	if state.Journal != "" {
		if d.journal, err = fanotify.OpenJournal(state.Journal, 0); err != nil {
			d.g.Close()
			return nil, fmt.Errorf("fanotifyfs: %w", err)
		}
		if !opts.Upgrade {
			d.journal.Forget() // a stale file of an earlier daemon
		}
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	if !opts.Upgrade {
		d.startServing(nil, nil)
	}
	if opts.Guard && opts.Supervisor == "" {
		if d.ino, err = unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK); err != nil {
			return nil, fmt.Errorf("fanotifyfs: guard: inotify: %w", err)
		}
		gd, err := guard.Start([]guard.Holding{{Group: d.g, Inotify: d.ino}}, guard.Update{})
		if err != nil {
			return nil, err
		}
		d.guard.Store(gd)
	}
	if opts.Upgrade {
		for _, ms := range state.Mounts {
			if err := d.addMount(ms, true); err != nil {
				return nil, err
			}
		}
		// After the mounts are registered, so that the events of their
		// readers waiting in the groups taken over are filled, not
		// denied as events of unknown files; before serving.
		if err := d.takeOverAtStart(state.Mounts, state.Dirs); err != nil {
			return nil, err
		}
		d.recoverAndServe(state.MaxFD)
	} else {
		// Before any mount: the old groups' marks are on the cache files
		// the fetchers open.
		if err := d.takeOverAtStart(opts.Mounts, nil); err != nil {
			return nil, err
		}
		for _, ms := range opts.Mounts {
			if err := d.addMount(ms, false); err != nil {
				return nil, err
			}
		}
		gd := d.guard.Load()
		if gd != nil {
			d.mu.Lock()
			err := gd.Update(d.guardUpdate())
			d.mu.Unlock()
			if err != nil {
				return nil, err
			}
		}
		if opts.Supervisor != "" {
			if err := d.sendState(); err != nil {
				return nil, err
			}
		} else if gd == nil {
			log.Warn("fanotifyfs: no supervisor and no guard: if this daemon dies, readers of its mounts see holes (zeros)")
		}
	}
	if opts.Ready != nil {
		opts.Ready(d.srv, d.guard.Load())
	}
	return d, nil
}

// recoverAndServe answers the events the previous daemon read and never
// answered, and serves. Those its journal names are filled and allowed
// (their readers complete) while Serve runs; any other pending one is an
// orphan nobody can fill, denied with EIO before Serve reads anything so
// its reader does not hang: every fd number up to maxFD, the previous
// daemon's bound (0: it did not say: guard.MaxFD). It returns
// once the journaled ones are answered.
func (d *Daemon) recoverAndServe(maxFD int) {
	var held []fanotify.Event
	if d.journal != nil {
		held = d.journal.Pending()
	}
	var except []int
	for _, ev := range held {
		except = append(except, ev.Fd)
	}
	orphans := d.g.DenyOrphans(guard.OrphanBound(maxFD), except...)
	done := make(chan [2]int, 1)
	d.startServing(held, func(a, dn int) { done <- [2]int{a, dn} })
	r := <-done
	if d.journal != nil {
		d.journal.Forget()
	}
	d.srv.recovered.Add(uint64(r[0]))
	d.srv.orphans.Add(uint64(r[1] + orphans))
	if r[0] > 0 || r[1]+orphans > 0 {
		d.log.Warn("fanotifyfs: answered the events the previous daemon held", "filled", r[0], "denied", r[1]+orphans)
	}
}

func (d *Daemon) startServing(held []fanotify.Event, done func(allowed, denied int)) {
	ctx, cancel := context.WithCancel(context.Background())
	d.stopServing = cancel
	go func() {
		d.served <- d.srv.Serve(ctx, fanotify.Options{Timeout: d.opts.Timeout, Workers: d.opts.Workers, Logger: d.log, Journal: d.journal, Recover: held, RecoverDone: done})
	}()
}

// Server is the daemon's event server.
func (d *Daemon) Server() *Server { return d.srv }

// Guard is the daemon's guard process, if it started one. The daemon
// replaces it when it takes groups over or drops one, so ask again.
func (d *Daemon) Guard() *guard.Guard { return d.guard.Load() }

// Done delivers Serve's result if it stops before Close (a failed group).
func (d *Daemon) Done() <-chan error { return d.served }

// Mounts returns the specs of the daemon's mounts, in mount order.
func (d *Daemon) Mounts() []MountSpec {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]MountSpec, 0, len(d.mounts))
	for _, dm := range d.mounts {
		out = append(out, dm.spec)
	}
	return out
}

// Mount adds a mount while the daemon serves.
func (d *Daemon) Mount(ms MountSpec) error {
	if err := d.addMount(ms, false); err != nil {
		return err
	}
	d.changed()
	return nil
}

// Unmount removes the mount at mountpoint mp.
func (d *Daemon) Unmount(mp string) error {
	abs, err := filepath.Abs(mp)
	if err != nil {
		return fmt.Errorf("fanotifyfs: %w: %w", ErrInvalid, err)
	}
	d.mu.Lock()
	k := slices.IndexFunc(d.mounts, func(dm *daemonMount) bool { return dm.spec.Mountpoint == abs })
	if k < 0 {
		d.mu.Unlock()
		return fmt.Errorf("fanotifyfs: %s: %w", abs, ErrNoMount)
	}
	dm := d.mounts[k]
	d.mounts = slices.Delete(d.mounts, k, k+1)
	d.mu.Unlock()
	uerr := dm.m.Unmount()
	d.mu.Lock()
	if dm.m.Lazy() || uerr != nil {
		d.lingering = append(d.lingering, dm.f)
	} else {
		dm.f.Close()
	}
	d.mu.Unlock()
	d.changed()
	return uerr
}

// addMount mounts (or adopts) ms with a fetcher of its own config.
func (d *Daemon) addMount(ms MountSpec, adopt bool) error {
	if ms.Bootstrap == "" || ms.Mountpoint == "" {
		return fmt.Errorf("fanotifyfs: %w: a mount needs a bootstrap and a mountpoint", ErrInvalid)
	}
	var err error
	if ms.Mountpoint, err = filepath.Abs(ms.Mountpoint); err != nil {
		return fmt.Errorf("fanotifyfs: %w: %w", ErrInvalid, err)
	}
	if ms.Bootstrap, err = filepath.Abs(ms.Bootstrap); err != nil {
		return fmt.Errorf("fanotifyfs: %w: %w", ErrInvalid, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("fanotifyfs: daemon closed")
	}
	if slices.ContainsFunc(d.mounts, func(dm *daemonMount) bool { return dm.spec.Mountpoint == ms.Mountpoint }) {
		return fmt.Errorf("fanotifyfs: %s: %w", ms.Mountpoint, ErrMountExists)
	}
	text, tune, err := splitTuning(ms.Config)
	if err != nil {
		return fmt.Errorf("fanotifyfs: mount %s: %w: config: %w", ms.Mountpoint, ErrInvalid, err)
	}
	if ms.ReadAheadKB == 0 {
		ms.ReadAheadKB = tune.ReadAheadKB
	}
	ms.DirectIO = ms.DirectIO || tune.DirectIO
	cfg, err := config.Parse([]byte(text))
	if err != nil {
		return fmt.Errorf("fanotifyfs: mount %s: %w: config: %w", ms.Mountpoint, ErrInvalid, err)
	}
	var dir string
	if wd := cfg.Cache.WorkDir(); wd != "" {
		if dir, err = filepath.Abs(wd); err != nil {
			return fmt.Errorf("fanotifyfs: mount %s: %w: %w", ms.Mountpoint, ErrInvalid, err)
		}
	}
	if dir != "" && !adopt {
		// Before the fetcher opens a cache file: a dead daemon's guard
		// would deny its I/O. (An upgraded daemon takes over once its
		// mounts are registered: StartDaemon.)
		if err := d.takeOverGuards(dir); err != nil {
			return fmt.Errorf("fanotifyfs: mount %s: %w", ms.Mountpoint, err)
		}
	}
	f, err := storage.New(cfg, append([]storage.Option{storage.WithLogger(d.log)}, d.opts.FetcherOptions...)...)
	if err != nil {
		return fmt.Errorf("fanotifyfs: mount %s: %w", ms.Mountpoint, err)
	}
	mo := Options{Bootstrap: ms.Bootstrap, Mountpoint: ms.Mountpoint, Fetcher: f, ReadAheadKB: ms.ReadAheadKB, DirectIO: ms.DirectIO}
	var m *Mount
	if adopt {
		m, err = d.srv.Adopt(mo)
	} else {
		m, err = d.srv.Mount(mo)
	}
	if err != nil {
		f.Close()
		return err
	}
	d.mounts = append(d.mounts, &daemonMount{spec: ms, m: m, f: f})
	if d.ino >= 0 {
		if err := guard.WatchRoot(d.ino, ms.Mountpoint); err != nil {
			d.log.Error("fanotifyfs: mount not watched; if the daemon dies its guard may exit while the mount is still read", "err", err)
		}
	}
	if dir != "" && !slices.Contains(d.dirs, dir) {
		d.dirs = append(d.dirs, dir)
	}
	return nil
}

// ConfigCacheDir is the absolute cache directory a daemon config (JSON
// or TOML, as MountSpec.Config) names: "" if none, or if the config is one
// a mount would refuse. For DaemonOptions.CacheDirs.
func ConfigCacheDir(text string) string {
	text, _, err := splitTuning(text)
	if err != nil {
		return ""
	}
	cfg, err := config.Parse([]byte(text))
	if err != nil || cfg.Cache.WorkDir() == "" {
		return ""
	}
	dir, err := filepath.Abs(cfg.Cache.WorkDir())
	if err != nil {
		return ""
	}
	return dir
}

// takeOverAtStart takes over the groups of crashed daemons' guards in
// every cache directory the daemon starts with: those of mounts, dirs
// and opts.CacheDirs. At start rather than at the first mount of each
// directory: until then the old guard fails every read of its detached
// mounts and every I/O on the cache files with EIO, though a daemon is
// there to serve them (it fills those of images it mounts again), and a
// supervised successor, whose predecessor's guard leaves events waiting,
// must answer those of its own readers.
func (d *Daemon) takeOverAtStart(mounts []MountSpec, dirs []string) error {
	for _, ms := range mounts {
		dirs = append(dirs, ConfigCacheDir(ms.Config))
	}
	dirs = append(dirs, d.opts.CacheDirs...)
	d.mu.Lock()
	defer d.mu.Unlock()
	seen := map[string]bool{"": true}
	for _, dir := range dirs {
		if abs, err := filepath.Abs(dir); err == nil && dir != "" {
			dir = abs
		}
		if seen[dir] {
			continue
		}
		seen[dir] = true
		if err := d.takeOverGuards(dir); err != nil {
			return fmt.Errorf("fanotifyfs: %w", err)
		}
	}
	return nil
}

// boundFDs keeps the process's fd numbers at most maxFD (guard.MaxFD),
// lowering its RLIMIT_NOFILE (which Go raises to the hard limit) if need
// be, and returns its bound. Events it reads and never answers (it dies
// first) can only be answered by number; a successor tries every number
// up to this bound, at one write(2) each. A daemon that needs more fds
// fails to open them with EMFILE: loud, where an orphan above the bound
// would leave its reader blocked for good.
func boundFDs(log *slog.Logger, maxFD int) int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		log.Warn("fanotifyfs: RLIMIT_NOFILE unknown; orphaned events above the bound would never be answered", "bound", maxFD, "err", err)
		return maxFD
	}
	if rl.Cur > uint64(maxFD)+1 {
		old := rl.Cur
		rl.Cur = uint64(maxFD) + 1
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			log.Warn("fanotifyfs: cannot lower RLIMIT_NOFILE; orphaned events above the bound would never be answered", "limit", old, "bound", maxFD, "err", err)
			return maxFD
		}
		log.Debug("fanotifyfs: RLIMIT_NOFILE lowered so that a successor can answer every orphaned event", "from", old, "to", rl.Cur)
	}
	return int(rl.Cur) - 1
}

// Tuning is the "fanotify" object a JSON daemon config may carry for this
// mode (nydusd's config has no such knobs; config.Parse never sees it).
type Tuning struct {
	// ReadAheadKB is the mount's read_ahead_kb (0: DefaultReadAheadKB).
	ReadAheadKB int `json:"read_ahead_kb"`
	// DirectIO mounts with EROFS's directio option.
	DirectIO bool `json:"directio"`
}

// splitTuning takes the "fanotify" object out of a JSON config. TOML
// configs pass through untouched.
func splitTuning(cfg string) (string, Tuning, error) {
	var t Tuning
	var m map[string]json.RawMessage
	if json.Unmarshal([]byte(cfg), &m) != nil {
		return cfg, t, nil
	}
	raw, ok := m["fanotify"]
	if !ok {
		return cfg, t, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&t); err != nil {
		return "", t, fmt.Errorf("fanotify: %w", err)
	}
	if t.ReadAheadKB < 0 || t.ReadAheadKB > 1<<20 {
		return "", t, fmt.Errorf("fanotify.read_ahead_kb %d out of [0, 1048576]", t.ReadAheadKB)
	}
	delete(m, "fanotify")
	rest, _ := json.Marshal(m)
	return string(rest), t, nil
}

// changed tells the guard and the supervisor the new set of mounts. A
// failure is logged, not returned: the mount change itself is done, and
// the caller can retry the hand-over (SendState, PUT .../fuse/sendfd).
func (d *Daemon) changed() {
	// Under d.mu: replaceGuard swaps the guard under it, and an update
	// written to the guard it stopped would be lost.
	d.mu.Lock()
	var err error
	if gd := d.guard.Load(); gd != nil && !d.closed {
		err = gd.Update(d.guardUpdate())
	}
	d.mu.Unlock()
	if err != nil {
		d.log.Error("fanotifyfs: guard not told of the mounts; if the daemon dies they are not detached", "err", err)
	}
	if d.opts.Supervisor != "" {
		if err := d.sendState(); err != nil {
			d.log.Error("fanotifyfs: supervisor not told of the mounts; a successor will not adopt them", "err", err)
		}
	}
}

// SendState hands the supervisor the group fd and the mounts again (the
// daemon does so by itself at start and after every mount change).
func (d *Daemon) SendState() error {
	if d.opts.Supervisor == "" {
		return errors.New("fanotifyfs: no supervisor")
	}
	return d.sendState()
}

// sendState hands the supervisor the group fd and the mounts.
func (d *Daemon) sendState() error {
	st := savedState{Mode: "fanotify", Mounts: d.Mounts(), MaxFD: d.maxFD}
	d.mu.Lock()
	st.Dirs = slices.Clone(d.dirs)
	d.mu.Unlock()
	if d.journal != nil {
		st.Journal = d.journal.Path()
	}
	raw, _ := json.Marshal(st)
	if err := fusedev.SendState(d.opts.Supervisor, raw, d.g.FD(), 30*time.Second); err != nil {
		return fmt.Errorf("fanotifyfs: hand the group to the supervisor: %w", err)
	}
	return nil
}

// Close unmounts every mount while still serving (a read in flight must
// be answered), then stops serving, closes the fetchers, stops the guard
// and closes the group.
func (d *Daemon) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	mounts := d.mounts
	d.mounts = nil
	d.mu.Unlock()
	var err error
	for _, dm := range mounts {
		if uerr := dm.m.Unmount(); uerr != nil {
			d.log.Warn("fanotifyfs: unmount", "err", uerr)
		}
	}
	if d.stopServing != nil {
		d.stopServing()
		err = <-d.served
	}
	d.mu.Lock()
	adopted := d.adopted
	d.adopted = nil
	d.mu.Unlock()
	for _, a := range adopted {
		a.cancel()
		<-a.done
	}
	for _, dm := range mounts {
		dm.f.Close()
	}
	for _, f := range d.lingering {
		f.Close()
	}
	// Last, once the mounts are gone. A mount detached lazily and still
	// read is left to the guard, as if the daemon had died: it fails the
	// mount's reads with EIO (nobody fills them any more) and exits once
	// the last reader closes; without it they would read holes.
	if gd := d.guard.Load(); gd != nil {
		live := 0
		for _, ino := range append([]int{d.ino}, inos(adopted)...) {
			n, _ := guard.Watches(ino)
			live += n
		}
		if live > 0 {
			d.log.Warn("fanotifyfs: closing with mounts still read; the guard fails their reads with EIO until they close", "guard", gd.Pid(), "mounts", live)
			if d.opts.Supervisor != "" {
				// A clean exit: the old readers of the groups it took
				// over fail rather than wait for a successor.
				u := d.guardUpdate()
				u.Supervised = false
				if err := gd.Update(u); err != nil {
					d.log.Warn("fanotifyfs: guard not told to deny", "err", err)
				}
			}
			gd.LetGo()
		} else {
			gd.Stop()
		}
	}
	for _, a := range adopted {
		a.Group.Close()
		unix.Close(a.Inotify)
	}
	if d.ino >= 0 {
		unix.Close(d.ino)
	}
	if d.journal != nil {
		err = errors.Join(err, d.journal.Close(true))
	}
	return errors.Join(err, d.g.Close())
}

// adoptedGroup is a group taken over from a crashed daemon's guard.
type adoptedGroup struct {
	guard.Holding
	cancel context.CancelFunc
	done   chan struct{} // Serve returned
}

func inos(as []*adoptedGroup) []int {
	var out []int
	for _, a := range as {
		out = append(out, a.Inotify)
	}
	return out
}

// holdings are the groups the guard must hold, the daemon's own first
// unless the supervisor holds it; d.mu is held.
func (d *Daemon) holdings() []guard.Holding {
	var hs []guard.Holding
	if d.opts.Supervisor == "" {
		hs = append(hs, guard.Holding{Group: d.g, Inotify: d.ino})
	}
	for _, a := range d.adopted {
		hs = append(hs, a.Holding)
	}
	return hs
}

// guardUpdate is what the guard is to know now; d.mu is held.
func (d *Daemon) guardUpdate() guard.Update {
	u := guard.Update{Dirs: slices.Clone(d.dirs), MaxFD: d.maxFD, Supervised: d.opts.Supervisor != ""}
	if u.Supervised {
		return u // the supervisor's copy keeps the mounts' readers waiting
	}
	for _, dm := range d.mounts {
		u.Mounts = append(u.Mounts, dm.spec.Mountpoint)
	}
	return u
}

// replaceGuard starts a guard holding the current holdings and stops the
// old one; d.mu is held. The new one holds its copies before the old
// lets go, so no group is ever held by the daemon alone. A supervised
// daemon with no group taken over needs no guard: the old one stops.
func (d *Daemon) replaceGuard() error {
	var gd *guard.Guard
	if hs := d.holdings(); len(hs) > 0 {
		var err error
		if gd, err = guard.Start(hs, d.guardUpdate()); err != nil {
			return err
		}
	}
	if old := d.guard.Swap(gd); old != nil {
		old.Stop()
	}
	return nil
}

// takeOverGuards asks every guard listening in cache directory dir and
// takes the groups of those whose daemon is gone; d.mu is held. Their
// marks are on the cache files this mount will use, so until then the
// fetcher's I/O and this mount's reads would be denied (or, from a
// supervised daemon's guard, wait). The directory is remembered: the
// daemon's guard listens there for the daemon's own successor.
func (d *Daemon) takeOverGuards(dir string) error {
	// One that does not exist yet is added once a mount creates it.
	if fi, err := os.Stat(dir); err == nil && fi.IsDir() && !slices.Contains(d.dirs, dir) {
		d.dirs = append(d.dirs, dir)
	}
	for _, p := range guard.Sockets(dir) {
		rep, ho, err := guard.Ask(p, d.opts.Guard)
		if err != nil {
			d.log.Warn("fanotifyfs: guard socket in the cache directory did not answer", "socket", p, "err", err)
			continue
		}
		switch {
		case rep.Guard == 0: // a stale socket, removed
			continue
		case rep.Daemon == os.Getpid(): // this daemon's own guard
			continue
		case rep.Alive:
			d.log.Warn("fanotifyfs: cache directory shared with a live daemon; each serves the other's events", "dir", dir, "daemon", rep.Daemon)
			continue
		case !d.opts.Guard:
			return fmt.Errorf("cache directory %s is still guarded by guard %d of crashed daemon %d (a detached mount of it is still read): only a daemon that can start a guard (DaemonOptions.Guard) takes such a guard over", dir, rep.Guard, rep.Daemon)
		case ho == nil:
			continue
		}
		// This process's own cache I/O now raises events in these groups
		// (they marked the files before the fetcher opens them) and, the
		// files being opened while marked, in its own group too.
		d.srv.trustSelf.Store(true)
		for _, h := range ho.Holds {
			d.serveAdopted(h)
		}
		if err := d.replaceGuard(); err != nil {
			// No acknowledgement: the old guard keeps guarding them.
			ho.Abort()
			d.dropAdoptedLocked(ho.Holds)
			return fmt.Errorf("take over guard %d: %w", rep.Guard, err)
		}
		if err := ho.Ack(); err != nil {
			d.log.Error("fanotifyfs: guard not told of the take-over; it keeps denying events beside this daemon", "guard", rep.Guard, "err", err)
		}
		d.log.Warn("fanotifyfs: took over the groups of a crashed daemon's guard; serving the reads of its detached mounts", "dir", dir, "daemon", rep.Daemon, "guard", rep.Guard, "groups", len(ho.Holds))
	}
	return nil
}

// serveAdopted serves an adopted group with the daemon's Server until no
// mount reads through it any more; d.mu is held. Its events name the
// same cache files as the daemon's own, so the Server fills them; events
// of files no mount of this daemon uses are denied with EIO.
func (d *Daemon) serveAdopted(h guard.Holding) {
	ctx, cancel := context.WithCancel(context.Background())
	a := &adoptedGroup{Holding: h, cancel: cancel, done: make(chan struct{})}
	d.adopted = append(d.adopted, a)
	s := d.srv
	go func() {
		defer close(a.done)
		err := s.serveGroup(ctx, a.Group, fanotify.Options{
			Timeout: d.opts.Timeout, Workers: d.opts.Workers, Logger: d.log,
			// The group marked the cache files before this process
			// opened them: its own I/O raises events in it.
			Trusted: fanotify.SelfPid,
		})
		if err != nil {
			d.log.Error("fanotifyfs: serving an adopted group", "err", err)
		}
	}()
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if n, err := guard.Watches(a.Inotify); err == nil && n == 0 {
				d.dropAdopted(a)
				return
			}
		}
	}()
}

// dropAdopted stops serving and closes an adopted group once no mount
// reads through it: the guard lets go of it first, then the daemon, and
// with the last copy its marks go.
func (d *Daemon) dropAdopted(a *adoptedGroup) {
	d.mu.Lock()
	if d.closed || !slices.Contains(d.adopted, a) {
		d.mu.Unlock()
		return
	}
	d.adopted = slices.DeleteFunc(d.adopted, func(x *adoptedGroup) bool { return x == a })
	if err := d.replaceGuard(); err != nil {
		d.adopted = append(d.adopted, a)
		d.mu.Unlock()
		d.log.Error("fanotifyfs: adopted group kept (guard not replaced)", "err", err)
		return
	}
	d.mu.Unlock()
	a.cancel()
	<-a.done
	a.Group.Close()
	unix.Close(a.Inotify)
	d.log.Info("fanotifyfs: the mounts of an adopted group are gone; group closed")
}

// dropAdoptedLocked undoes serveAdopted for holds after a failed
// take-over (the old guard still holds them); d.mu is held.
func (d *Daemon) dropAdoptedLocked(holds []guard.Holding) {
	for _, h := range holds {
		k := slices.IndexFunc(d.adopted, func(a *adoptedGroup) bool { return a.Group == h.Group })
		if k < 0 {
			continue
		}
		a := d.adopted[k]
		d.adopted = slices.Delete(d.adopted, k, k+1)
		a.cancel()
		<-a.done
		a.Group.Close()
		unix.Close(a.Inotify)
	}
}

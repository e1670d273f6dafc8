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
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotify"
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
	// Guard, without a supervisor, starts a guard process (StartGuard)
	// before mounting, so that the daemon's death fails reads with EIO
	// instead of letting them see holes. The binary must call
	// MaybeRunGuard first thing in main.
	Guard bool
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
	Ready func(*Server, *Guard)
}

// Daemon is the fanotify mode of rafsd: one group, one Server, and mounts
// added and removed while it serves.
type Daemon struct {
	opts    DaemonOptions
	log     *slog.Logger
	g       *fanotify.Group
	srv     *Server
	journal *fanotify.Journal
	guard   *Guard

	mu     sync.Mutex
	mounts []*daemonMount
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
// their readers block until an upgraded daemon answers.
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
	d := &Daemon{opts: opts, log: log, served: make(chan error, 1)}
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
		var mps []string
		for _, ms := range opts.Mounts {
			mps = append(mps, ms.Mountpoint)
		}
		if d.guard, err = StartGuard(d.g, mps); err != nil {
			return nil, err
		}
	}
	if opts.Upgrade {
		for _, ms := range state.Mounts {
			if err := d.addMount(ms, true); err != nil {
				return nil, err
			}
		}
		d.recoverAndServe()
	} else {
		for _, ms := range opts.Mounts {
			if err := d.addMount(ms, false); err != nil {
				return nil, err
			}
		}
		if opts.Supervisor != "" {
			if err := d.sendState(); err != nil {
				return nil, err
			}
		} else if d.guard == nil {
			log.Warn("fanotifyfs: no supervisor and no guard: if this daemon dies, readers of its mounts see holes (zeros)")
		}
	}
	if opts.Ready != nil {
		opts.Ready(d.srv, d.guard)
	}
	return d, nil
}

// recoverAndServe answers the events the previous daemon read and never
// answered, and serves. Those its journal names are filled and allowed
// (their readers complete) while Serve runs; any other pending one is an
// orphan nobody can fill, denied with EIO before Serve reads anything so
// its reader does not hang. It returns once the journaled ones are
// answered.
func (d *Daemon) recoverAndServe() {
	var held []fanotify.Event
	if d.journal != nil {
		held = d.journal.Pending()
	}
	var except []int
	for _, ev := range held {
		except = append(except, ev.Fd)
	}
	orphans := d.g.DenyOrphans(4096, except...)
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

// Guard is the daemon's guard process, if it started one.
func (d *Daemon) Guard() *Guard { return d.guard }

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
	return nil
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
	var mps []string
	for _, ms := range d.Mounts() {
		mps = append(mps, ms.Mountpoint)
	}
	if d.guard != nil {
		if err := d.guard.SetMounts(mps); err != nil {
			d.log.Error("fanotifyfs: guard not told of the mounts; if the daemon dies they are not detached", "err", err)
		}
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
	st := savedState{Mode: "fanotify", Mounts: d.Mounts()}
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
	for _, dm := range mounts {
		dm.f.Close()
	}
	for _, f := range d.lingering {
		f.Close()
	}
	// Last, once the mounts are gone.
	if d.guard != nil {
		d.guard.Stop()
	}
	if d.journal != nil {
		err = errors.Join(err, d.journal.Close(true))
	}
	return errors.Join(err, d.g.Close())
}

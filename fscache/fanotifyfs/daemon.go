package fanotifyfs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
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
}

// DaemonOptions configure RunDaemon.
type DaemonOptions struct {
	// Mounts are mounted on a fresh start (ignored with Upgrade).
	Mounts []MountSpec
	// Supervisor is the supervisor's socket (nydus-snapshotter protocol,
	// rafs/fusedev). A fresh daemon hands it the group fd and its mounts, so
	// that readers block rather than read holes if the daemon dies; with
	// Upgrade the daemon takes both back.
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
	// Ready, if set, is called once every mount is served (with the
	// guard, if any).
	Ready func(*Server, *Guard)
}

// RunDaemon is the fanotify mode of rafsd: it mounts (or, with Upgrade,
// takes over from the supervisor) the mounts and serves their events until
// ctx ends; then it unmounts them. A daemon that dies uncleanly leaves its
// mounts to the supervisor's copy of the group: their readers block until
// an upgraded daemon answers.
func RunDaemon(ctx context.Context, opts DaemonOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	var (
		g     *fanotify.Group
		state savedState
	)
	if opts.Upgrade {
		if opts.Supervisor == "" {
			return errors.New("fanotifyfs: upgrade needs a supervisor")
		}
		raw, file, err := fusedev.RecvState(opts.Supervisor, 30*time.Second)
		if err != nil {
			return fmt.Errorf("fanotifyfs: take over: %w", err)
		}
		// Own a plain fd: the *os.File's finalizer would close it.
		fd, err := unix.Dup(int(file.Fd()))
		file.Close()
		if err != nil {
			return fmt.Errorf("fanotifyfs: take over: %w", err)
		}
		unix.CloseOnExec(fd)
		if err := json.Unmarshal(raw, &state); err != nil || state.Mode != "fanotify" {
			unix.Close(fd)
			return fmt.Errorf("fanotifyfs: take over: state from %s is not a fanotify daemon's (%v)", opts.Supervisor, err)
		}
		g = fanotify.FromFD(fd)
	} else {
		var err error
		if g, err = fanotify.New(); err != nil {
			return fmt.Errorf("fanotifyfs: %w", err)
		}
		state = savedState{Mode: "fanotify", Mounts: opts.Mounts}
	}
	defer g.Close()
	srv := NewServer(g, log)
	var mounts []*Mount
	var fetchers []*storage.Fetcher
	unmount := func() {
		for _, m := range mounts {
			if err := m.Unmount(); err != nil {
				log.Warn("fanotifyfs: unmount", "err", err)
			}
		}
		mounts = nil
	}
	// Unmount while still serving: a read in flight must be answered.
	serveCtx, stopServing := context.WithCancel(context.Background())
	served := make(chan error, 1)
	started := false
	var guard *Guard
	defer func() {
		unmount()
		stopServing()
		if started {
			<-served
			started = false
		}
		for _, f := range fetchers {
			f.Close()
		}
		// Last, once the mounts are gone.
		if guard != nil {
			guard.Stop()
		}
	}()
	startServing := func() {
		started = true
		go func() {
			served <- srv.Serve(serveCtx, fanotify.Options{Timeout: opts.Timeout, Workers: opts.Workers, Logger: log})
		}()
	}
	if !opts.Upgrade {
		startServing()
	}
	if opts.Guard && opts.Supervisor == "" {
		var mps []string
		for _, ms := range state.Mounts {
			mps = append(mps, ms.Mountpoint)
		}
		var err error
		if guard, err = StartGuard(g, mps); err != nil {
			return err
		}
	}
	for _, ms := range state.Mounts {
		cfg, err := config.Parse([]byte(ms.Config))
		if err != nil {
			return fmt.Errorf("fanotifyfs: mount %s: config: %w", ms.Mountpoint, err)
		}
		f, err := storage.New(cfg, append([]storage.Option{storage.WithLogger(log)}, opts.FetcherOptions...)...)
		if err != nil {
			return fmt.Errorf("fanotifyfs: mount %s: %w", ms.Mountpoint, err)
		}
		fetchers = append(fetchers, f)
		mo := Options{Bootstrap: ms.Bootstrap, Mountpoint: ms.Mountpoint, Fetcher: f, ReadAheadKB: ms.ReadAheadKB, DirectIO: ms.DirectIO}
		var m *Mount
		if opts.Upgrade {
			m, err = srv.Adopt(mo)
		} else {
			m, err = srv.Mount(mo)
		}
		if err != nil {
			return err
		}
		mounts = append(mounts, m)
	}
	if opts.Upgrade {
		// Before anything reads events, every pending one is an orphan.
		if n := g.DenyOrphans(4096); n > 0 {
			log.Warn("fanotifyfs: denied events the previous daemon left unanswered", "events", n)
		}
		startServing()
	} else if opts.Supervisor != "" {
		raw, _ := json.Marshal(state)
		if err := fusedev.SendState(opts.Supervisor, raw, g.FD(), 30*time.Second); err != nil {
			return fmt.Errorf("fanotifyfs: hand the group to the supervisor: %w", err)
		}
	} else if guard == nil {
		log.Warn("fanotifyfs: no supervisor and no guard: if this daemon dies, readers of its mounts see holes (zeros)")
	}
	if opts.Ready != nil {
		opts.Ready(srv, guard)
	}
	select {
	case <-ctx.Done():
		unmount()
		stopServing()
		started = false
		return <-served
	case err := <-served:
		started = false
		return err
	}
}

// Package daemon is rafsd's FUSE daemon: one /dev/fuse connection serving
// a rafs/vfs pseudo root that holds RAFS images and passthrough directories,
// nydusd's lifecycle (INIT, READY, RUNNING), and live upgrade / failover
// through a supervisor socket.
package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/fusedev"
	"github.com/rafsd/rafsd/rafs/passthrough"
	"github.com/rafsd/rafsd/rafs/vfs"
)

// Daemon states, as nydusd reports them in GET /api/v1/daemon.
const (
	StateInit      = "INIT"
	StateReady     = "READY"
	StateRunning   = "RUNNING"
	StateDestroyed = "DESTROYED"
)

// Errors the API maps to HTTP status codes.
var (
	ErrInvalid     = errors.New("invalid request")    // 400
	ErrNotFound    = errors.New("not found")          // 404
	ErrExists      = errors.New("already exists")     // 409
	ErrNotReady    = errors.New("daemon not ready")   // 503
	ErrUnsupported = errors.New("not supported")      // 501
	ErrState       = errors.New("wrong daemon state") // 409
)

// Options configure a Daemon.
type Options struct {
	ID             string
	Supervisor     string
	Mountpoint     string
	Threads        int
	Writable       bool
	Upgrade        bool
	FailoverPolicy string
	// Initial mount (--bootstrap or --shared-dir at --virtual-mountpoint).
	Initial     *MountCmd
	InitialPath string
	Logger      *slog.Logger
	LogLevel    *slog.LevelVar
	Registry    *prometheus.Registry
}

// Daemon is one rafsd FUSE daemon.
type Daemon struct {
	opts Options
	log  *slog.Logger
	reg  *prometheus.Registry

	mu        sync.Mutex
	state     string
	vfs       *vfs.VFS
	mounts    map[string]*instance // by vfs path
	srv       *fusedev.Server
	globalCfg map[string]string

	exit     chan struct{}
	exitOnce sync.Once
	exitErr  error
	unmount  bool
}

// New returns a daemon in state INIT. Call Run.
func New(opts Options) *Daemon {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.FailoverPolicy == "" {
		opts.FailoverPolicy = "resend"
	}
	d := &Daemon{
		opts:      opts,
		log:       opts.Logger,
		reg:       opts.Registry,
		state:     StateInit,
		mounts:    map[string]*instance{},
		globalCfg: map[string]string{},
		exit:      make(chan struct{}),
	}
	// The pseudo directories change with every mount: the images' default
	// cache time, not a configured one.
	rootTimeout := config.DefaultTimeout * time.Second
	d.vfs = vfs.New(vfs.Options{EntryTimeout: rootTimeout, AttrTimeout: rootTimeout, Logger: d.log})
	return d
}

// Setup brings the daemon to READY and starts serving (RUNNING), unless it
// was started to take over (--upgrade), in which case it stays INIT until
// the takeover and start API calls.
func (d *Daemon) Setup() error {
	if d.opts.Upgrade {
		d.log.Info("upgrade mode: waiting for takeover", "supervisor", d.opts.Supervisor)
		return nil
	}
	if d.opts.Initial != nil {
		if err := d.Mount(d.opts.InitialPath, *d.opts.Initial); err != nil {
			return err
		}
	}
	srv := d.newServer()
	if err := srv.Mount(d.opts.Mountpoint); err != nil {
		return err
	}
	d.mu.Lock()
	d.srv = srv
	d.state = StateReady
	d.mu.Unlock()
	return d.Start()
}

func (d *Daemon) newServer() *fusedev.Server {
	srv := fusedev.New(d.vfs, fusedev.Options{
		Threads:  d.opts.Threads,
		ReadOnly: !d.opts.Writable,
		Logger:   d.log,
	})
	d.vfs.SetNotifier(srv)
	return srv
}

// Wait blocks until the daemon should exit: an exit request, the kernel
// ending the connection, or ctx (SIGTERM). It then shuts down: with
// unmount (SIGTERM, connection gone) or without (the exit API, whose caller
// hands the connection to another daemon).
func (d *Daemon) Wait(ctx context.Context) error {
	var done <-chan struct{}
	d.mu.Lock()
	if d.srv != nil {
		done = d.srv.Done()
	}
	d.mu.Unlock()
	for {
		select {
		case <-ctx.Done():
			d.log.Info("terminating: unmounting")
			d.shutdown(true)
			return nil
		case <-d.exit:
			d.log.Info("exit requested: leaving the mount to the next daemon")
			d.shutdown(d.unmount)
			return d.exitErr
		case <-done:
			d.log.Info("FUSE connection ended")
			d.shutdown(true)
			return nil
		case <-time.After(200 * time.Millisecond):
			// A takeover may have created the server since.
			d.mu.Lock()
			if d.srv != nil {
				done = d.srv.Done()
			}
			d.mu.Unlock()
		}
	}
}

func (d *Daemon) shutdown(unmount bool) {
	d.mu.Lock()
	srv := d.srv
	d.state = StateDestroyed
	mounts := d.mounts
	d.mounts = map[string]*instance{}
	d.mu.Unlock()
	if srv != nil {
		if unmount {
			if err := srv.Unmount(); err != nil {
				d.log.Error("unmount failed", "err", err)
			}
		} else {
			srv.Stop()
			srv.Close()
		}
	}
	for _, in := range mounts {
		in.close()
	}
}

// Start begins serving requests (READY -> RUNNING).
func (d *Daemon) Start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.state == StateRunning:
		return nil
	case d.srv == nil || d.state != StateReady:
		return fmt.Errorf("%w: start in state %s", ErrState, d.state)
	}
	d.srv.Start()
	d.state = StateRunning
	d.log.Info("serving", "mountpoint", d.srv.Mountpoint(), "threads", d.opts.Threads)
	return nil
}

// Exit makes Wait return without unmounting (nydusd's exit API).
func (d *Daemon) Exit() error {
	d.exitOnce.Do(func() { close(d.exit) })
	return nil
}

// State returns the daemon state.
func (d *Daemon) State() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state
}

// ID returns the daemon id.
func (d *Daemon) ID() string { return d.opts.ID }

// SupervisorPath returns the supervisor socket path.
func (d *Daemon) SupervisorPath() string { return d.opts.Supervisor }

// Mount attaches a filesystem at path p of the FUSE mount.
func (d *Daemon) Mount(p string, cmd MountCmd) error {
	if p == "" {
		return fmt.Errorf("%w: 'mountpoint' should be specified in query string", ErrInvalid)
	}
	d.mu.Lock()
	if _, ok := d.mounts[p]; ok {
		d.mu.Unlock()
		return fmt.Errorf("%w: mountpoint %s", ErrExists, p)
	}
	d.mu.Unlock()
	in, err := d.openFS(cmd)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.mounts[p]; ok {
		in.close()
		return fmt.Errorf("%w: mountpoint %s", ErrExists, p)
	}
	if _, err := d.vfs.Mount(p, in.fs); err != nil {
		in.close()
		return vfsErr(p, err)
	}
	d.mounts[p] = in
	d.log.Info("mounted", "mountpoint", p, "fs_type", cmd.FsType, "source", cmd.Source)
	return nil
}

// Remount replaces the filesystem at p in one step, keeping its index
// (PUT /api/v1/mount).
func (d *Daemon) Remount(p string, cmd MountCmd) error {
	d.mu.Lock()
	_, ok := d.mounts[p]
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: mountpoint %s", ErrNotFound, p)
	}
	in, err := d.openFS(cmd)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	old, ok := d.mounts[p]
	if !ok {
		in.close()
		return fmt.Errorf("%w: mountpoint %s", ErrNotFound, p)
	}
	if _, err := d.vfs.Replace(p, in.fs); err != nil {
		in.close()
		return vfsErr(p, err)
	}
	d.mounts[p] = in
	old.close()
	d.log.Info("remounted", "mountpoint", p, "fs_type", cmd.FsType, "source", cmd.Source)
	return nil
}

// Umount detaches the filesystem at p.
func (d *Daemon) Umount(p string) error {
	d.mu.Lock()
	in, ok := d.mounts[p]
	if !ok {
		d.mu.Unlock()
		return fmt.Errorf("%w: mountpoint %s", ErrNotFound, p)
	}
	if err := d.vfs.Umount(p); err != nil {
		d.mu.Unlock()
		return vfsErr(p, err)
	}
	delete(d.mounts, p)
	d.mu.Unlock()
	in.close()
	d.log.Info("unmounted", "mountpoint", p)
	return nil
}

func vfsErr(p string, err error) error {
	switch {
	case errors.Is(err, vfs.ErrBusy):
		return fmt.Errorf("%w: mountpoint %s: %v", ErrExists, p, err)
	case errors.Is(err, vfs.ErrNotFound):
		return fmt.Errorf("%w: mountpoint %s: %v", ErrNotFound, p, err)
	case errors.Is(err, vfs.ErrBadPath), errors.Is(err, vfs.ErrFull):
		return fmt.Errorf("%w: mountpoint %s: %v", ErrInvalid, p, err)
	}
	return fmt.Errorf("mountpoint %s: %w", p, err)
}

// MountInfo describes one mount for the API.
type MountInfo struct {
	Mountpoint string `json:"mountpoint"`
	Index      uint32 `json:"index"`
	FsType     string `json:"fs_type"`
	Source     string `json:"source"`
}

// Mounts lists the mounts, by path.
func (d *Daemon) Mounts() []MountInfo {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []MountInfo
	for p, in := range d.mounts {
		t := in.cmd.FsType
		if t == "" {
			t = FsTypeRafs
		}
		_, idx, _ := d.vfs.Get(p)
		out = append(out, MountInfo{Mountpoint: p, Index: idx, FsType: t, Source: in.cmd.Source})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Mountpoint < out[j].Mountpoint })
	return out
}

// instanceFor returns the mount named by id (a mountpoint), or the only
// mount when id is empty.
func (d *Daemon) instanceFor(id string) (*instance, string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if id != "" {
		in, ok := d.mounts[id]
		if !ok {
			return nil, "", fmt.Errorf("%w: no filesystem %q", ErrNotFound, id)
		}
		return in, id, nil
	}
	for p, in := range d.mounts {
		return in, p, nil
	}
	return nil, "", fmt.Errorf("%w: no filesystem mounted", ErrNotFound)
}

// SetGlobalConfig stores PUT /api/v1/config settings.
func (d *Daemon) SetGlobalConfig(c map[string]string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, v := range c {
		d.globalCfg[k] = v
	}
}

// GlobalConfig returns the PUT /api/v1/config settings.
func (d *Daemon) GlobalConfig() map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]string{}
	for k, v := range d.globalCfg {
		out[k] = v
	}
	return out
}

// SetLogLevel changes the log level (PUT /api/v1/daemon {"log_level"}).
func (d *Daemon) SetLogLevel(s string) error {
	l, err := ParseLevel(s)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if d.opts.LogLevel != nil {
		d.opts.LogLevel.Set(l)
	}
	return nil
}

// ParseLevel maps nydusd's log levels to slog's.
func ParseLevel(s string) (slog.Level, error) {
	switch s {
	case "trace", "debug", "Trace", "Debug":
		return slog.LevelDebug, nil
	case "info", "Info", "":
		return slog.LevelInfo, nil
	case "warn", "Warn":
		return slog.LevelWarn, nil
	case "error", "Error", "off", "Off":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("unknown log level %q (trace, debug, info, warn, error)", s)
}

// savedState is what goes to the supervisor with the /dev/fuse fd.
type savedState struct {
	Version    int          `json:"version"`
	ID         string       `json:"id"`
	Mountpoint string       `json:"mountpoint"`
	Init       []byte       `json:"fuse_init"`
	Mounts     []savedMount `json:"mounts"`
}

type savedMount struct {
	Index uint32 `json:"index"`
	Path  string `json:"path"`
	MountCmd
	// Passthrough is a passthrough_fs mount's node and handle tables, so
	// the kernel's cached node ids and open files stay valid.
	Passthrough *passthrough.State `json:"passthrough_state,omitempty"`
}

const stateVersion = 1

// parseState decodes and checks the state a supervisor hands back: it is
// bytes from another process, so every field is validated before use.
func parseState(data []byte) (savedState, error) {
	var st savedState
	if err := json.Unmarshal(data, &st); err != nil {
		return st, fmt.Errorf("bad state from supervisor: %w", err)
	}
	if st.Version != stateVersion {
		return st, fmt.Errorf("state version %d, want %d", st.Version, stateVersion)
	}
	if len(st.Init) < 40 || len(st.Init) > 4096 {
		return st, fmt.Errorf("saved FUSE_INIT request of %d bytes", len(st.Init))
	}
	seen := map[uint32]bool{}
	for _, m := range st.Mounts {
		if m.Index == 0 || m.Index > vfs.MaxMounts || seen[m.Index] {
			return st, fmt.Errorf("mount %q: bad or duplicate index %d", m.Path, m.Index)
		}
		seen[m.Index] = true
		if m.Path == "" || m.Path[0] != '/' {
			return st, fmt.Errorf("mount path %q is not absolute", m.Path)
		}
		if m.FsType != FsTypeRafs && m.FsType != FsTypePassthrough && m.FsType != "" {
			return st, fmt.Errorf("mount %q: unknown fs_type %q", m.Path, m.FsType)
		}
	}
	return st, nil
}

// SendFD hands the /dev/fuse descriptor and the daemon's state to the
// supervisor (PUT /api/v1/daemon/fuse/sendfd). The daemon keeps serving.
func (d *Daemon) SendFD() error {
	if d.opts.Supervisor == "" {
		return fmt.Errorf("%w: no --supervisor socket", ErrInvalid)
	}
	d.mu.Lock()
	srv := d.srv
	d.mu.Unlock()
	if srv == nil {
		return fmt.Errorf("%w: no FUSE connection", ErrNotReady)
	}
	// RUNNING comes before the kernel's FUSE_INIT has been answered, and a
	// supervisor calls sendfd as soon as it sees RUNNING: the saved state
	// needs that INIT, so wait for it a little rather than refuse.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := srv.WaitInit(ctx)
	cancel()
	if err != nil {
		return fmt.Errorf("%w: FUSE connection not initialized yet: %v", ErrNotReady, err)
	}
	d.mu.Lock()
	if d.srv != srv {
		d.mu.Unlock()
		return fmt.Errorf("%w: FUSE connection replaced during sendfd", ErrNotReady)
	}
	st := savedState{Version: stateVersion, ID: d.opts.ID, Mountpoint: srv.Mountpoint(), Init: srv.InitRequest()}
	for p, in := range d.mounts {
		if _, idx, ok := d.vfs.Get(p); ok {
			m := savedMount{Index: idx, Path: p, MountCmd: in.cmd}
			if in.pass != nil {
				ps, err := in.pass.SaveState()
				if err != nil {
					d.mu.Unlock()
					return fmt.Errorf("sendfd: %s: %w", p, err)
				}
				m.Passthrough = ps
			}
			st.Mounts = append(st.Mounts, m)
		}
	}
	d.mu.Unlock()
	if len(st.Init) == 0 {
		return fmt.Errorf("%w: FUSE connection not initialized yet", ErrNotReady)
	}
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	var serr error
	if err := srv.Control(func(fd int) { serr = fusedev.SendState(d.opts.Supervisor, data, fd, 10*time.Second) }); err != nil {
		return err
	}
	if serr != nil {
		return serr
	}
	d.log.Info("sent FUSE fd and state to supervisor", "supervisor", d.opts.Supervisor, "mounts", len(st.Mounts))
	return nil
}

// Takeover receives the descriptor and state from the supervisor, restores
// every mount at its old index and adopts the connection (INIT -> READY).
// Serving begins with Start.
func (d *Daemon) Takeover() error {
	if d.opts.Supervisor == "" {
		return fmt.Errorf("%w: no --supervisor socket", ErrInvalid)
	}
	d.mu.Lock()
	if d.state != StateInit {
		st := d.state
		d.mu.Unlock()
		return fmt.Errorf("%w: takeover in state %s", ErrState, st)
	}
	d.mu.Unlock()
	data, dev, err := fusedev.RecvState(d.opts.Supervisor, 10*time.Second)
	if err != nil {
		return err
	}
	st, err := parseState(data)
	if err != nil {
		dev.Close()
		return fmt.Errorf("takeover: %w", err)
	}
	for _, m := range st.Mounts {
		in, err := d.openFS(m.MountCmd)
		if err != nil {
			dev.Close()
			return fmt.Errorf("takeover: restore %s: %w", m.Path, err)
		}
		if m.Passthrough != nil && in.pass != nil {
			if err := in.pass.RestoreState(m.Passthrough); err != nil {
				in.close()
				dev.Close()
				return fmt.Errorf("takeover: restore %s: %w", m.Path, err)
			}
		}
		if err := d.vfs.MountAt(m.Index, m.Path, in.fs); err != nil {
			in.close()
			dev.Close()
			return fmt.Errorf("takeover: restore %s at index %d: %w", m.Path, m.Index, err)
		}
		d.mu.Lock()
		d.mounts[m.Path] = in
		d.mu.Unlock()
	}
	mp := st.Mountpoint
	if mp == "" {
		mp = d.opts.Mountpoint
	}
	srv := d.newServer()
	if err := srv.Adopt(dev, mp, st.Init); err != nil {
		return err
	}
	d.mu.Lock()
	d.srv = srv
	d.state = StateReady
	d.mu.Unlock()
	d.log.Info("took over FUSE connection", "mountpoint", mp, "mounts", len(st.Mounts))
	if d.opts.FailoverPolicy == "resend" {
		// Requests the old daemon read but never answered (it crashed)
		// go back to the queue; after a clean handover there are none.
		if err := srv.Resend(); err != nil {
			d.log.Warn("failover resend not done", "err", err)
		}
	}
	return nil
}

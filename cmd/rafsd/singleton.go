package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/rafsd/rafsd/cmd/rafsd/internal/api"
	"github.com/rafsd/rafsd/cmd/rafsd/internal/daemon"
	"github.com/rafsd/rafsd/fscache/cachefiles"
	"github.com/rafsd/rafsd/internal/version"
	"github.com/rafsd/rafsd/rafs/fusedev"
)

// Daemon states, as nydusd reports them and nydus-snapshotter waits for.
const (
	stateInit    = "INIT"    // waiting for takeover (--upgrade, or a crashed predecessor)
	stateReady   = "READY"   // device and bindings in hand, not reading requests yet
	stateRunning = "RUNNING" // serving the kernel
)

// runSingleton is `rafsd singleton --fscache DIR`: EROFS over fscache,
// images bound through nydusd's /api/v2/blobs.
//
// With --supervisor the daemon can be replaced without failing the mounts,
// as nydusd's fscache mode is: PUT /api/v1/daemon/fuse/sendfd hands the
// bound /dev/cachefiles fd and the accepted bindings to the supervisor; a
// successor started with --upgrade (or with the same command line after a
// crash: the device is busy and the old API socket dead) waits in INIT
// until PUT /api/v1/daemon/fuse/takeover, rebinds the images (READY) and
// reads the device from PUT /api/v1/daemon/start on (RUNNING), sending
// "restore" first so requests the old daemon never answered come again.
func runSingleton(a *args, log *slog.Logger) error {
	if a.fscache == "" {
		return errors.New("singleton mode needs --fscache DIR (fanotify mode is not implemented yet)")
	}
	if a.apisock == "" {
		return errors.New("singleton mode needs --apisock: images are bound through PUT /api/v2/blobs")
	}
	if a.fscacheThreads < 1 || a.fscacheThreads > 1024 {
		return fmt.Errorf("--fscache-threads %d: want 1..1024", a.fscacheThreads)
	}
	if a.upgrade && a.supervisor == "" {
		return errors.New("--upgrade needs --supervisor")
	}
	raiseNofile(a.rlimitNofile, log)
	upgrade := a.upgrade
	if !upgrade && a.supervisor != "" {
		crashed, err := singletonCrashed(cachefiles.DevicePath, a.apisock)
		if err != nil {
			return err
		}
		if crashed {
			log.Warn("a previous daemon crashed holding the cache: waiting for takeover", "apisock", a.apisock)
			upgrade = true
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, exit := context.WithCancel(ctx)
	defer exit()
	s := newSingleton(ctx, exit, singletonOpts{
		ID: a.id, Dir: a.fscache, Tag: a.fscacheTag, Threads: a.fscacheThreads, Supervisor: a.supervisor,
	}, log)
	if !upgrade {
		d, err := cachefiles.New(cachefiles.Config{Dir: a.fscache, Tag: a.fscacheTag, Threads: a.fscacheThreads, Logger: log})
		if err != nil {
			return err
		}
		s.mu.Lock()
		s.d, s.state = d, stateReady
		s.mu.Unlock()
		if err := s.start(); err != nil {
			d.Close()
			return err
		}
	}
	srv, err := api.Listen(a.apisock, s.handler())
	if err != nil {
		s.close()
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		_ = os.Remove(a.apisock)
	}()
	log.Info("rafsd started", "version", version.Version, "mode", "singleton", "fscache", a.fscache,
		"apisock", a.apisock, "state", s.State(), "supervisor", a.supervisor)
	err = s.wait()
	if cerr := s.close(); err == nil {
		err = cerr
	}
	return err
}

// singletonCrashed is nydusd's is_crashed for the fscache mode: the
// device cannot be opened (someone holds it: the supervisor, after a
// crash) and the API socket is left over with nobody accepting on it. A
// busy device with a live API socket is another daemon still running.
func singletonCrashed(dev, apisock string) (bool, error) {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err == nil {
		f.Close()
		return false, nil
	}
	if !errors.Is(err, syscall.EBUSY) {
		return false, nil // New reports what is wrong with the device
	}
	if _, serr := os.Stat(apisock); serr != nil {
		return false, fmt.Errorf("%s is held by another process and no crashed daemon left %s: %w", dev, apisock, err)
	}
	c, derr := net.DialTimeout("unix", apisock, time.Second)
	if derr == nil {
		c.Close()
		return false, fmt.Errorf("%s is held by the daemon still answering on %s: %w", dev, apisock, err)
	}
	return true, nil
}

// singletonOpts are the command-line settings a singleton keeps.
type singletonOpts struct {
	ID, Dir, Tag string
	Threads      int
	Supervisor   string
}

// singleton is the fscache daemon's lifecycle: INIT -> READY -> RUNNING,
// driven by the command line or by the takeover API.
type singleton struct {
	opts singletonOpts
	log  *slog.Logger
	ctx  context.Context // ends on SIGTERM/SIGINT or the exit API
	exit context.CancelFunc

	mu     sync.Mutex
	state  string
	d      *cachefiles.Daemon
	served chan error // receives Serve's result once RUNNING
}

func newSingleton(ctx context.Context, exit context.CancelFunc, opts singletonOpts, log *slog.Logger) *singleton {
	return &singleton{opts: opts, log: log, ctx: ctx, exit: exit, state: stateInit, served: make(chan error, 1)}
}

// State returns the daemon state.
func (s *singleton) State() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

func (s *singleton) daemon() *cachefiles.Daemon {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.d
}

// start begins reading the device (READY -> RUNNING).
func (s *singleton) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch s.state {
	case stateRunning:
		return nil
	case stateReady:
	default:
		return fmt.Errorf("%w: start in state %s", daemon.ErrState, s.state)
	}
	d := s.d
	go func() { s.served <- d.Serve(s.ctx) }()
	s.state = stateRunning
	s.log.Info("serving the cachefiles device", "fscache", s.opts.Dir, "threads", s.opts.Threads)
	return nil
}

// wait blocks until the daemon should exit: SIGTERM, the exit API, or the
// device failing.
func (s *singleton) wait() error {
	select {
	case <-s.ctx.Done():
		s.log.Info("terminating")
		return nil
	case err := <-s.served:
		s.served <- err // close waits for it too
		if err != nil {
			return fmt.Errorf("serving /dev/cachefiles: %w", err)
		}
		return nil
	}
}

// close stops serving and releases the device. If the supervisor (or a
// successor) holds the device fd too, the cache stays bound and the
// mounts wait for whoever serves next; otherwise the kernel unbinds it.
func (s *singleton) close() error {
	s.exit()
	s.mu.Lock()
	d, running := s.d, s.state == stateRunning
	s.d, s.state = nil, stateInit
	s.mu.Unlock()
	if d == nil {
		return nil
	}
	if running {
		<-s.served // Serve has completed its in-flight READs
	}
	return d.Close()
}

// handoverState is what the daemon hands its supervisor with the device
// fd: enough for a successor to serve the same cache and images.
type handoverState struct {
	Version int    `json:"version"`
	Mode    string `json:"mode"` // "fscache": never mistaken for a FUSE daemon's state
	ID      string `json:"id,omitempty"`
	Fscache string `json:"fscache"`
	Tag     string `json:"fscache_tag,omitempty"`
	Threads int    `json:"fscache_threads"`
	// Blobs are the accepted PUT /api/v2/blobs bodies, in bind order.
	Blobs []cachefiles.BindRequest `json:"blobs"`
}

const (
	handoverVersion = 1
	handoverMode    = "fscache"
	maxHandoverBind = 1 << 16
)

// parseHandover decodes and checks a state from the supervisor: bytes of
// another process, so every field is checked before anything is bound.
func parseHandover(data []byte) (handoverState, error) {
	var st handoverState
	if err := json.Unmarshal(data, &st); err != nil {
		return st, fmt.Errorf("bad state from supervisor: %w", err)
	}
	if st.Mode != handoverMode {
		return st, fmt.Errorf("state of a %q daemon, want %q", st.Mode, handoverMode)
	}
	if st.Version != handoverVersion {
		return st, fmt.Errorf("state version %d, want %d", st.Version, handoverVersion)
	}
	if len(st.Blobs) > maxHandoverBind {
		return st, fmt.Errorf("state has %d bindings, more than %d", len(st.Blobs), maxHandoverBind)
	}
	seen := map[[2]string]bool{}
	for i := range st.Blobs {
		b := &st.Blobs[i]
		if b.ID == "" || b.Config.MetadataPath == "" {
			return st, fmt.Errorf("binding %d: empty id or metadata_path", i)
		}
		k := [2]string{b.Domain(), b.ID}
		if seen[k] {
			return st, fmt.Errorf("binding %d: %s in domain %s twice", i, b.ID, b.Domain())
		}
		seen[k] = true
	}
	return st, nil
}

// sendFD hands the device fd and the bindings to the supervisor
// (PUT /api/v1/daemon/fuse/sendfd, which nydus-snapshotter calls after
// every bind and unbind). The daemon keeps serving.
func (s *singleton) sendFD() error {
	if s.opts.Supervisor == "" {
		return fmt.Errorf("%w: no --supervisor socket", daemon.ErrInvalid)
	}
	d := s.daemon()
	if d == nil {
		return fmt.Errorf("%w: no cachefiles device yet (state %s)", daemon.ErrNotReady, s.State())
	}
	st := handoverState{Version: handoverVersion, Mode: handoverMode, ID: s.opts.ID, Fscache: s.opts.Dir,
		Tag: s.opts.Tag, Threads: s.opts.Threads, Blobs: d.Bindings()}
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	f := d.Device().File()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = fusedev.SendState(s.opts.Supervisor, data, int(fd), 10*time.Second)
	}); err != nil {
		return err
	}
	if serr != nil {
		return serr
	}
	s.log.Info("sent cachefiles fd and bindings to supervisor", "supervisor", s.opts.Supervisor, "bindings", len(st.Blobs))
	return nil
}

// takeover receives the device fd and bindings from the supervisor and
// binds the images again (INIT -> READY). Nothing is read from the device
// until start: during a live upgrade the old daemon is still serving.
func (s *singleton) takeover() error {
	if s.opts.Supervisor == "" {
		return fmt.Errorf("%w: no --supervisor socket", daemon.ErrInvalid)
	}
	s.mu.Lock()
	if s.state != stateInit {
		st := s.state
		s.mu.Unlock()
		return fmt.Errorf("%w: takeover in state %s", daemon.ErrState, st)
	}
	s.state = "TAKEOVER" // one takeover at a time
	s.mu.Unlock()
	d, err := s.receive()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.state = stateInit
		return err
	}
	s.d, s.state = d, stateReady
	return nil
}

func (s *singleton) receive() (*cachefiles.Daemon, error) {
	data, f, err := fusedev.RecvState(s.opts.Supervisor, 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("takeover: %w", err)
	}
	st, err := parseHandover(data)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("takeover: %w", err)
	}
	if st.Fscache != s.opts.Dir || st.Tag != s.opts.Tag {
		s.log.Warn("taking over a cache bound elsewhere than --fscache says: the kernel keeps the old binding",
			"bound", st.Fscache, "tag", st.Tag, "fscache", s.opts.Dir, "fscache-tag", s.opts.Tag)
	}
	d, err := cachefiles.New(cachefiles.Config{Device: f, Dir: st.Fscache, Tag: st.Tag, Threads: s.opts.Threads, Logger: s.log})
	if err != nil {
		return nil, fmt.Errorf("takeover: %w", err)
	}
	for i := range st.Blobs {
		if err := d.BindBlob(&st.Blobs[i]); err != nil {
			// Our copy of the fd goes; the supervisor keeps its own, so
			// the cache stays bound for another attempt.
			d.Close()
			return nil, fmt.Errorf("takeover: rebinding %s: %w", st.Blobs[i].ID, err)
		}
	}
	s.log.Info("took over the cachefiles device", "supervisor", s.opts.Supervisor, "bindings", len(st.Blobs))
	return d, nil
}

// singletonAPI is the API of the fscache mode: nydusd's /api/v2/blobs,
// the daemon info both API versions answer, and the takeover calls.
type singletonAPI struct{ s *singleton }

func (s *singleton) handler() http.Handler {
	h := &singletonAPI{s: s}
	mux := http.NewServeMux()
	mux.HandleFunc("/api/v1/daemon", h.daemonInfo)
	mux.HandleFunc("/api/v2/daemon", h.daemonInfo)
	mux.HandleFunc("/api/v2/blobs", h.blobs)
	mux.HandleFunc("/api/v1/metrics/backend", h.backendMetrics)
	mux.HandleFunc("/api/v1/daemon/fuse/sendfd", h.control(s.sendFD))
	mux.HandleFunc("/api/v1/daemon/fuse/takeover", h.control(s.takeover))
	mux.HandleFunc("/api/v1/daemon/start", h.control(s.start))
	mux.HandleFunc("/api/v1/daemon/exit", h.control(func() error {
		// nydusd answers, then SIGTERMs itself: the same as here.
		time.AfterFunc(50*time.Millisecond, s.exit)
		return nil
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, r, http.StatusNotFound, fmt.Errorf("no endpoint %s in singleton mode", r.URL.Path))
	})
	return mux
}

// control serves a PUT that runs fn and answers 204.
func (h *singletonAPI) control(fn func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut {
			h.fail(w, r, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
			return
		}
		if err := fn(); err != nil {
			h.fail(w, r, api.StatusOf(err), err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

func (h *singletonAPI) fail(w http.ResponseWriter, r *http.Request, status int, err error) {
	h.s.log.Warn("api request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	api.WriteError(w, status, err)
}

func (h *singletonAPI) daemonInfo(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		h.fail(w, r, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
		return
	}
	var stats cachefiles.Stats
	if d := h.s.daemon(); d != nil {
		stats = d.Stats()
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		api.DaemonInfo
		Fscache cachefiles.Stats `json:"fscache"`
	}{api.DaemonInfo{
		ID: h.s.opts.ID,
		Version: api.BuildInfo{PackageVer: version.Version, GitCommit: version.GitCommit, BuildTime: version.BuildTime,
			Profile: "release", Rustc: runtime.Version()},
		State:      h.s.State(),
		Supervisor: h.s.opts.Supervisor,
	}, stats})
}

// backendMetrics is nydusd's GET /api/v1/metrics/backend[?id=fsid]:
// what the bound images' fetchers read from their backends (without id,
// summed over all of them).
func (h *singletonAPI) backendMetrics(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		h.fail(w, r, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
		return
	}
	d := h.s.daemon()
	if d == nil {
		h.fail(w, r, http.StatusServiceUnavailable, fmt.Errorf("no cachefiles device yet (state %s)", h.s.State()))
		return
	}
	m, err := d.BackendMetrics(r.URL.Query().Get("id"))
	if err != nil {
		h.fail(w, r, http.StatusNotFound, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(m)
}

func (h *singletonAPI) blobs(w http.ResponseWriter, r *http.Request) {
	d := h.s.daemon()
	if d == nil {
		h.fail(w, r, http.StatusServiceUnavailable, fmt.Errorf("no cachefiles device yet (state %s): take over first", h.s.State()))
		return
	}
	q := r.URL.Query()
	switch r.Method {
	case http.MethodGet:
		w.Header().Set("Content-Type", "application/json")
		list := d.Blobs(q.Get("domain_id"))
		if list == nil {
			list = []cachefiles.BlobInfo{}
		}
		_ = json.NewEncoder(w).Encode(list)
	case http.MethodPut, http.MethodPost:
		b, err := io.ReadAll(io.LimitReader(r.Body, 4<<20+1))
		if err != nil || len(b) > 4<<20 {
			h.fail(w, r, http.StatusBadRequest, fmt.Errorf("body unreadable or larger than 4 MiB: %v", err))
			return
		}
		var req cachefiles.BindRequest
		if err := json.Unmarshal(b, &req); err != nil {
			h.fail(w, r, http.StatusBadRequest, fmt.Errorf("bad JSON body: %w", err))
			return
		}
		if err := d.BindBlob(&req); err != nil {
			st := http.StatusBadRequest
			if errors.Is(err, cachefiles.ErrExists) {
				st = http.StatusConflict
			}
			h.fail(w, r, st, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case http.MethodDelete:
		domain := q.Get("domain_id")
		if domain == "" {
			h.fail(w, r, http.StatusBadRequest, errors.New("domain_id is required"))
			return
		}
		if err := d.UnbindBlob(domain, q.Get("blob_id")); err != nil {
			st := http.StatusInternalServerError
			if errors.Is(err, cachefiles.ErrNotFound) {
				st = http.StatusNotFound
			}
			h.fail(w, r, st, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	default:
		h.fail(w, r, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
	}
}

// Package api is rafsd's HTTP administration API: nydusd's /api/v1 paths
// and JSON bodies over a unix socket, plus Prometheus /metrics.
//
// Success is 200 with a JSON body or 204 without one; failures are 4xx/5xx
// with {"code","message"}, which is what nydus-snapshotter and Kata parse.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rafsd/rafsd/cmd/rafsd/internal/daemon"
	"github.com/rafsd/rafsd/internal/version"
)

// maxBody bounds request bodies (a mount's config is a few KiB).
const maxBody = 4 << 20

// Error is the JSON error body.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// BuildInfo is nydusd's BuildTimeInfo.
type BuildInfo struct {
	PackageVer string `json:"package_ver"`
	GitCommit  string `json:"git_commit"`
	BuildTime  string `json:"build_time"`
	Profile    string `json:"profile"`
	Rustc      string `json:"rustc"`
}

// DaemonInfo is the GET /api/v1/daemon answer.
type DaemonInfo struct {
	ID                string                      `json:"id"`
	Version           BuildInfo                   `json:"version"`
	State             string                      `json:"state"`
	BackendCollection map[string]daemon.MountInfo `json:"backend_collection"`
	Supervisor        string                      `json:"supervisor,omitempty"`
}

// Server serves the API for one daemon.
type Server struct {
	d   *daemon.Daemon
	reg *prometheus.Registry
	log *slog.Logger
	mux *http.ServeMux
}

// New returns the API handler for d; reg (may be nil) is served at /metrics.
func New(d *daemon.Daemon, reg *prometheus.Registry, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	s := &Server{d: d, reg: reg, log: log, mux: http.NewServeMux()}
	s.mux.HandleFunc("/api/v1/daemon", s.daemonInfo)
	s.mux.HandleFunc("/api/v1/daemon/backend", s.backendInfo)
	s.mux.HandleFunc("/api/v1/daemon/start", s.control(d.Start))
	s.mux.HandleFunc("/api/v1/daemon/exit", s.control(d.Exit))
	s.mux.HandleFunc("/api/v1/daemon/fuse/sendfd", s.control(d.SendFD))
	s.mux.HandleFunc("/api/v1/daemon/fuse/takeover", s.control(d.Takeover))
	s.mux.HandleFunc("/api/v1/daemon/events", s.events)
	s.mux.HandleFunc("/api/v1/mount", s.mount)
	s.mux.HandleFunc("/api/v1/metrics", s.getter(func(r *http.Request) (any, error) { return d.FsMetrics(r.URL.Query().Get("id")) }))
	s.mux.HandleFunc("/api/v1/metrics/backend", s.getter(func(r *http.Request) (any, error) { return d.BackendMetrics(r.URL.Query().Get("id")) }))
	s.mux.HandleFunc("/api/v1/metrics/blobcache", s.getter(func(r *http.Request) (any, error) { return d.BlobcacheMetrics(r.URL.Query().Get("id")) }))
	s.mux.HandleFunc("/api/v1/metrics/files", s.getter(func(r *http.Request) (any, error) {
		// nydusd: ?latest=true asks for the files read since the last ask.
		latest := r.URL.Query().Get("latest") == "true"
		return d.FilesMetrics(r.URL.Query().Get("id"), latest)
	}))
	s.mux.HandleFunc("/api/v1/metrics/pattern", s.getter(func(r *http.Request) (any, error) { return d.AccessPatterns(r.URL.Query().Get("id")) }))
	s.mux.HandleFunc("/api/v1/metrics/inflight", s.inflight)
	s.mux.HandleFunc("/api/v1/config", s.config)
	if reg != nil {
		s.mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	}
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, http.StatusNotFound, fmt.Errorf("no endpoint %s", r.URL.Path))
	})
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.log.Debug("api request", "method", r.Method, "path", r.URL.Path, "query", r.URL.RawQuery)
	s.mux.ServeHTTP(w, r)
}

// Listen creates the unix socket at path (replacing a stale one) and
// serves on it in the background. The socket exists when Listen returns.
func Listen(path string, h http.Handler) (*http.Server, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("api socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	// No ReadHeaderTimeout (nor idle timeout): nydus-snapshotter's liveness
	// monitor dials this socket, never sends a request and takes the
	// connection's hangup for the daemon's death. A 10 s header timeout
	// closed it, so every daemon "died" 10 s after it was subscribed and
	// the snapshotter started a failover of a live daemon. nydusd keeps
	// such connections too; the socket is the daemon owner's alone.
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(l) }()
	return srv, nil
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(v)
}

// WriteError writes err as nydusd's JSON error body ({"code","message"},
// what nydus-snapshotter and Kata parse) with the HTTP status. Every mode's
// API answers errors through it.
func WriteError(w http.ResponseWriter, status int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(Error{Code: codeOf(status), Message: err.Error()})
}

func codeOf(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "INVALID_ARGUMENT"
	case http.StatusNotFound:
		return "NOT_FOUND"
	case http.StatusConflict:
		return "ALREADY_EXISTS"
	case http.StatusMethodNotAllowed:
		return "METHOD_NOT_ALLOWED"
	case http.StatusNotImplemented:
		return "UNIMPLEMENTED"
	case http.StatusServiceUnavailable:
		return "UNAVAILABLE"
	}
	return "UNDEFINED"
}

// StatusOf maps the daemon's errors (daemon.ErrInvalid, ErrNotFound, ...)
// to HTTP statuses.
func StatusOf(err error) int {
	switch {
	case errors.Is(err, daemon.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, daemon.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, daemon.ErrExists), errors.Is(err, daemon.ErrState):
		return http.StatusConflict
	case errors.Is(err, daemon.ErrNotReady):
		return http.StatusServiceUnavailable
	case errors.Is(err, daemon.ErrUnsupported):
		return http.StatusNotImplemented
	}
	return http.StatusInternalServerError
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	st := StatusOf(err)
	s.log.Warn("api request failed", "method", r.Method, "path", r.URL.Path, "status", st, "err", err)
	WriteError(w, st, err)
}

func badMethod(w http.ResponseWriter, r *http.Request) {
	WriteError(w, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on %s", r.Method, r.URL.Path))
}

// decode reads a JSON body into v, refusing trailing data.
func decode(r *http.Request, v any) error {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return fmt.Errorf("%w: reading body: %v", daemon.ErrInvalid, err)
	}
	if len(b) > maxBody {
		return fmt.Errorf("%w: body larger than %d bytes", daemon.ErrInvalid, maxBody)
	}
	if len(b) == 0 {
		return fmt.Errorf("%w: empty body", daemon.ErrInvalid)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: bad JSON body: %v", daemon.ErrInvalid, err)
	}
	return nil
}

func (s *Server) daemonInfo(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
		info := DaemonInfo{
			ID: s.d.ID(),
			Version: BuildInfo{
				PackageVer: version.Version,
				GitCommit:  version.GitCommit,
				BuildTime:  version.BuildTime,
				Profile:    "release",
				Rustc:      runtime.Version(),
			},
			State:             s.d.State(),
			BackendCollection: map[string]daemon.MountInfo{},
			Supervisor:        s.d.SupervisorPath(),
		}
		for _, m := range s.d.Mounts() {
			info.BackendCollection[m.Mountpoint] = m
		}
		writeJSON(w, info)
	case http.MethodPut:
		var conf struct {
			LogLevel string `json:"log_level"`
		}
		if err := decode(r, &conf); err != nil {
			s.fail(w, r, err)
			return
		}
		if err := s.d.SetLogLevel(conf.LogLevel); err != nil {
			s.fail(w, r, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	default:
		badMethod(w, r)
	}
}

func (s *Server) backendInfo(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		badMethod(w, r)
		return
	}
	mp := r.URL.Query().Get("mountpoint")
	if mp == "" {
		s.fail(w, r, fmt.Errorf("%w: 'mountpoint' should be specified in query string", daemon.ErrInvalid))
		return
	}
	cmd, err := s.d.BackendInfo(mp)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	var cfg any = cmd.Config
	var parsed map[string]any
	if json.Unmarshal([]byte(cmd.Config), &parsed) == nil {
		cfg = parsed
	}
	writeJSON(w, map[string]any{"mountpoint": mp, "fs_type": cmd.FsType, "source": cmd.Source, "config": cfg})
}

func (s *Server) control(f func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut {
			badMethod(w, r)
			return
		}
		if err := f(); err != nil {
			s.fail(w, r, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

func (s *Server) getter(f func(*http.Request) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			badMethod(w, r)
			return
		}
		v, err := f(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		writeJSON(w, v)
	}
}

func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		badMethod(w, r)
		return
	}
	writeJSON(w, []any{})
}

func (s *Server) mount(w http.ResponseWriter, r *http.Request) {
	mp := r.URL.Query().Get("mountpoint")
	if r.Method == http.MethodGet {
		if mp != "" {
			cmd, err := s.d.BackendInfo(mp)
			if err != nil {
				s.fail(w, r, err)
				return
			}
			writeJSON(w, cmd)
			return
		}
		writeJSON(w, s.d.Mounts())
		return
	}
	if mp == "" {
		s.fail(w, r, fmt.Errorf("%w: 'mountpoint' should be specified in query string", daemon.ErrInvalid))
		return
	}
	var err error
	switch r.Method {
	case http.MethodPost, http.MethodPut:
		var cmd daemon.MountCmd
		if err = decode(r, &cmd); err == nil {
			if r.Method == http.MethodPost {
				err = s.d.Mount(mp, cmd)
			} else {
				err = s.d.Remount(mp, cmd)
			}
		}
	case http.MethodDelete:
		err = s.d.Umount(mp)
	default:
		badMethod(w, r)
		return
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) config(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
		writeJSON(w, s.d.GlobalConfig())
	case http.MethodPut:
		var c map[string]string
		if err := decode(r, &c); err != nil {
			s.fail(w, r, err)
			return
		}
		s.d.SetGlobalConfig(c)
		w.WriteHeader(http.StatusNoContent)
	default:
		badMethod(w, r)
	}
}

// inflight answers nydusd's way: 204 when no request is being served,
// else the list.
func (s *Server) inflight(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		badMethod(w, r)
		return
	}
	ops := s.d.Inflight()
	if len(ops) == 0 {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	writeJSON(w, ops)
}

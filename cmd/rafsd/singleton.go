package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/rafsd/rafsd/cmd/rafsd/internal/api"
	"github.com/rafsd/rafsd/fscache/cachefiles"
	"github.com/rafsd/rafsd/internal/version"
)

// runSingleton is `rafsd singleton --fscache DIR`: EROFS over fscache,
// images bound through nydusd's /api/v2/blobs.
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
	raiseNofile(a.rlimitNofile, log)
	d, err := cachefiles.New(cachefiles.Config{Dir: a.fscache, Tag: a.fscacheTag, Threads: a.fscacheThreads, Logger: log})
	if err != nil {
		return err
	}
	defer d.Close()
	srv, err := api.Listen(a.apisock, newSingletonAPI(d, a.id, log))
	if err != nil {
		return err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		_ = os.Remove(a.apisock)
	}()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("rafsd started", "version", version.Version, "mode", "singleton", "fscache", a.fscache, "apisock", a.apisock)
	return d.Serve(ctx)
}

// singletonAPI is the API of the fscache mode: nydusd's /api/v2/blobs
// and the daemon info both API versions answer.
type singletonAPI struct {
	d   *cachefiles.Daemon
	id  string
	log *slog.Logger
}

func newSingletonAPI(d *cachefiles.Daemon, id string, log *slog.Logger) http.Handler {
	s := &singletonAPI{d: d, id: id, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("/api/v1/daemon", s.daemonInfo)
	mux.HandleFunc("/api/v2/daemon", s.daemonInfo)
	mux.HandleFunc("/api/v2/blobs", s.blobs)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.fail(w, r, http.StatusNotFound, fmt.Errorf("no endpoint %s in singleton mode", r.URL.Path))
	})
	return mux
}

func (s *singletonAPI) fail(w http.ResponseWriter, r *http.Request, status int, err error) {
	s.log.Warn("api request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	code := map[int]string{400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 409: "ALREADY_EXISTS"}[status]
	if code == "" {
		code = "UNDEFINED"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(api.Error{Code: code, Message: err.Error()})
}

func (s *singletonAPI) daemonInfo(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		s.fail(w, r, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		api.DaemonInfo
		Fscache cachefiles.Stats `json:"fscache"`
	}{api.DaemonInfo{
		ID: s.id,
		Version: api.BuildInfo{PackageVer: version.Version, GitCommit: version.GitCommit, BuildTime: version.BuildTime,
			Profile: "release", Rustc: runtime.Version()},
		State: "RUNNING",
	}, s.d.Stats()})
}

func (s *singletonAPI) blobs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	switch r.Method {
	case http.MethodGet:
		w.Header().Set("Content-Type", "application/json")
		list := s.d.Blobs(q.Get("domain_id"))
		if list == nil {
			list = []cachefiles.BlobInfo{}
		}
		_ = json.NewEncoder(w).Encode(list)
	case http.MethodPut, http.MethodPost:
		b, err := io.ReadAll(io.LimitReader(r.Body, 4<<20+1))
		if err != nil || len(b) > 4<<20 {
			s.fail(w, r, http.StatusBadRequest, fmt.Errorf("body unreadable or larger than 4 MiB: %v", err))
			return
		}
		var req cachefiles.BindRequest
		if err := json.Unmarshal(b, &req); err != nil {
			s.fail(w, r, http.StatusBadRequest, fmt.Errorf("bad JSON body: %w", err))
			return
		}
		if err := s.d.BindBlob(&req); err != nil {
			st := http.StatusBadRequest
			if errors.Is(err, cachefiles.ErrExists) {
				st = http.StatusConflict
			}
			s.fail(w, r, st, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case http.MethodDelete:
		domain := q.Get("domain_id")
		if domain == "" {
			s.fail(w, r, http.StatusBadRequest, errors.New("domain_id is required"))
			return
		}
		if err := s.d.UnbindBlob(domain, q.Get("blob_id")); err != nil {
			st := http.StatusInternalServerError
			if errors.Is(err, cachefiles.ErrNotFound) {
				st = http.StatusNotFound
			}
			s.fail(w, r, st, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	default:
		s.fail(w, r, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed", r.Method))
	}
}

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/rafsd/rafsd/cmd/rafsd/internal/api"
	"github.com/rafsd/rafsd/fscache/fanotifyfs"
	"github.com/rafsd/rafsd/internal/version"
)

// fanotifyFsType is the mount API's fs_type for this mode. nydusd has no
// such mode to copy a name from; "rafs" is accepted too, since a RAFS
// bootstrap is what it mounts and that is what nydus-snapshotter sends.
const fanotifyFsType = "fanotify"

// fanotifyAPI is the v1 API subset of the fanotify mode: daemon info, the
// mount API, exit and sendfd (re-send the state to the supervisor).
type fanotifyAPI struct {
	d             *fanotifyfs.Daemon
	id, sup       string
	defaultConfig string
	exit          func()
	log           *slog.Logger
	mux           *http.ServeMux
}

func newFanotifyAPI(d *fanotifyfs.Daemon, id, sup, defaultConfig string, exit func(), log *slog.Logger) *fanotifyAPI {
	h := &fanotifyAPI{d: d, id: id, sup: sup, defaultConfig: defaultConfig, exit: exit, log: log, mux: http.NewServeMux()}
	h.mux.HandleFunc("/api/v1/daemon", h.daemon)
	h.mux.HandleFunc("/api/v1/mount", h.mount)
	h.mux.HandleFunc("/api/v1/daemon/exit", h.put(func() error { exit(); return nil }))
	h.mux.HandleFunc("/api/v1/daemon/fuse/sendfd", h.put(d.SendState))
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		api.WriteError(w, http.StatusNotFound, fmt.Errorf("no endpoint %s in fanotify mode", r.URL.Path))
	})
	return h
}

func (h *fanotifyAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.log.Debug("api request", "method", r.Method, "path", r.URL.Path, "query", r.URL.RawQuery)
	h.mux.ServeHTTP(w, r)
}

func fanotifyJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(v)
}

func (h *fanotifyAPI) fail(w http.ResponseWriter, r *http.Request, err error) {
	st := http.StatusInternalServerError
	switch {
	case errors.Is(err, fanotifyfs.ErrInvalid):
		st = http.StatusBadRequest
	case errors.Is(err, fanotifyfs.ErrNoMount):
		st = http.StatusNotFound
	case errors.Is(err, fanotifyfs.ErrMountExists):
		st = http.StatusConflict
	}
	h.log.Warn("api request failed", "method", r.Method, "path", r.URL.Path, "status", st, "err", err)
	api.WriteError(w, st, err)
}

func (h *fanotifyAPI) put(f func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut {
			api.WriteError(w, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on %s", r.Method, r.URL.Path))
			return
		}
		if err := f(); err != nil {
			h.fail(w, r, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}
}

// fanotifyMountInfo is one entry of backend_collection and GET /api/v1/mount.
type fanotifyMountInfo struct {
	Mountpoint  string `json:"mountpoint"`
	FsType      string `json:"fs_type"`
	Source      string `json:"source"`
	ReadAheadKB int    `json:"read_ahead_kb,omitempty"`
	DirectIO    bool   `json:"directio,omitempty"`
}

func (h *fanotifyAPI) mounts() []fanotifyMountInfo {
	var out []fanotifyMountInfo
	for _, ms := range h.d.Mounts() {
		out = append(out, fanotifyMountInfo{Mountpoint: ms.Mountpoint, FsType: fanotifyFsType, Source: ms.Bootstrap, ReadAheadKB: ms.ReadAheadKB, DirectIO: ms.DirectIO})
	}
	return out
}

func (h *fanotifyAPI) daemon(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		api.WriteError(w, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on %s", r.Method, r.URL.Path))
		return
	}
	coll := map[string]fanotifyMountInfo{}
	for _, m := range h.mounts() {
		coll[m.Mountpoint] = m
	}
	st := h.d.Server().Stats()
	guard := 0
	if g := h.d.Guard(); g != nil {
		guard = g.Pid()
	}
	fanotifyJSON(w, map[string]any{
		"guard_pid": guard,
		"id":        h.id,
		"version": api.BuildInfo{PackageVer: version.Version, GitCommit: version.GitCommit, BuildTime: version.BuildTime,
			Profile: "release", Rustc: runtime.Version()},
		"state":              "RUNNING",
		"mode":               fanotifyFsType,
		"backend_collection": coll,
		"supervisor":         h.sup,
		"events":             st,
	})
}

// mountBody is the v1 mount request: nydusd's fields plus this mode's own
// (read_ahead_kb, directio), which may also come in the config's
// "fanotify" object.
type mountBody struct {
	Source      string          `json:"source"`
	FsType      string          `json:"fs_type"`
	Config      json.RawMessage `json:"config"`
	ReadAheadKB int             `json:"read_ahead_kb"`
	DirectIO    bool            `json:"directio"`
}

func (h *fanotifyAPI) mount(w http.ResponseWriter, r *http.Request) {
	mp := r.URL.Query().Get("mountpoint")
	switch r.Method {
	case http.MethodGet:
		fanotifyJSON(w, h.mounts())
		return
	case http.MethodPost, http.MethodDelete:
	default:
		api.WriteError(w, http.StatusMethodNotAllowed, fmt.Errorf("method %s not allowed on %s", r.Method, r.URL.Path))
		return
	}
	if mp == "" || !filepath.IsAbs(mp) {
		h.fail(w, r, fmt.Errorf("%w: 'mountpoint' must be an absolute path in the query string (got %q)", fanotifyfs.ErrInvalid, mp))
		return
	}
	if r.Method == http.MethodDelete {
		if err := h.d.Unmount(mp); err != nil {
			h.fail(w, r, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	ms, err := h.parseMount(r, mp)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if err := os.MkdirAll(mp, 0o755); err != nil {
		h.fail(w, r, fmt.Errorf("%w: mountpoint: %w", fanotifyfs.ErrInvalid, err))
		return
	}
	if err := h.d.Mount(ms); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *fanotifyAPI) parseMount(r *http.Request, mp string) (fanotifyfs.MountSpec, error) {
	var ms fanotifyfs.MountSpec
	const maxBody = 4 << 20
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil || len(b) > maxBody || len(b) == 0 {
		return ms, fmt.Errorf("%w: a JSON body of at most %d bytes is needed (read %d bytes: %v)", fanotifyfs.ErrInvalid, maxBody, len(b), err)
	}
	var body mountBody
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		return ms, fmt.Errorf("%w: bad JSON body: %v", fanotifyfs.ErrInvalid, err)
	}
	if body.FsType != fanotifyFsType && body.FsType != "rafs" {
		return ms, fmt.Errorf("%w: fs_type %q: this daemon mounts %q (or \"rafs\")", fanotifyfs.ErrInvalid, body.FsType, fanotifyFsType)
	}
	if body.Source == "" || !filepath.IsAbs(body.Source) {
		return ms, fmt.Errorf("%w: source must be the absolute path of a RAFS v6 bootstrap (got %q)", fanotifyfs.ErrInvalid, body.Source)
	}
	if fi, err := os.Stat(body.Source); err != nil || !fi.Mode().IsRegular() {
		return ms, fmt.Errorf("%w: source %s is not a regular file (%v)", fanotifyfs.ErrInvalid, body.Source, err)
	}
	// nydus-snapshotter sends the config as a JSON string; an object is
	// taken as is.
	cfg := h.defaultConfig
	if raw := bytes.TrimSpace(body.Config); len(raw) > 0 && !bytes.Equal(raw, []byte("null")) {
		if raw[0] == '"' {
			if err := json.Unmarshal(raw, &cfg); err != nil {
				return ms, fmt.Errorf("%w: config: %v", fanotifyfs.ErrInvalid, err)
			}
		} else {
			cfg = string(raw)
		}
	}
	if strings.TrimSpace(cfg) == "" {
		return ms, fmt.Errorf("%w: no config in the request and no --config", fanotifyfs.ErrInvalid)
	}
	if body.ReadAheadKB < 0 || body.ReadAheadKB > 1<<20 {
		return ms, fmt.Errorf("%w: read_ahead_kb %d out of [0, 1048576]", fanotifyfs.ErrInvalid, body.ReadAheadKB)
	}
	return fanotifyfs.MountSpec{Bootstrap: body.Source, Mountpoint: mp, Config: cfg, ReadAheadKB: body.ReadAheadKB, DirectIO: body.DirectIO}, nil
}

// Package backend reads byte ranges of blobs from where they are stored:
// a local directory (localfs) or an OCI distribution registry (registry,
// with mirrors and an HTTP proxy in front of it). It knows nothing about
// chunks, compression or digests; the fetcher in rafs/storage does.
package backend

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/rafsd/rafsd/rafs/config"
)

// Backend reads blobs by id (the hex sha256 of the blob).
type Backend interface {
	// ReadAt fills p with the bytes of blob id at off. Anything short of
	// len(p) bytes is an error (a *ReadError).
	ReadAt(ctx context.Context, id string, p []byte, off int64) error
	// Size returns the blob's size in bytes.
	Size(ctx context.Context, id string) (int64, error)
	// Type is the nydus backend type name, e.g. "registry".
	Type() string
	// Close releases connections, files and background health checks.
	Close() error
}

// ReadError is the error of a failed blob read: it names the backend, the
// blob and the range.
type ReadError struct {
	Backend string
	BlobID  string
	Off     int64
	Len     int
	Err     error
}

func (e *ReadError) Error() string {
	return fmt.Sprintf("%s backend: read blob %s [%d,+%d): %v", e.Backend, e.BlobID, e.Off, e.Len, e.Err)
}

func (e *ReadError) Unwrap() error { return e.Err }

// Errors wrapped by backend errors.
var (
	// ErrUnauthorized: the registry refused the configured credentials.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrNotFound: the blob does not exist.
	ErrNotFound = errors.New("blob not found")
)

// Hooks observe backend traffic (the fetcher turns them into metrics).
// Any of them may be nil; they must be safe for concurrent use.
type Hooks struct {
	// Request is called after every HTTP request (or file read) with the
	// endpoint it went to ("origin", a mirror's host, "proxy", "localfs"),
	// the bytes read, its latency and error.
	Request func(endpoint string, n int, d time.Duration, err error)
	// Retry is called before a retry of a failed request to the origin.
	Retry func()
	// Failover is called when a request moves on from a failed mirror or
	// proxy to the next mirror or the origin.
	Failover func(from, to string)
}

func (h *Hooks) request(endpoint string, n int, d time.Duration, err error) {
	if h.Request != nil {
		h.Request(endpoint, n, d, err)
	}
}

func (h *Hooks) retry() {
	if h.Retry != nil {
		h.Retry()
	}
}

func (h *Hooks) failover(from, to string) {
	if h.Failover != nil {
		h.Failover(from, to)
	}
}

// New returns the backend cfg describes.
func New(cfg *config.Backend, hooks Hooks) (Backend, error) {
	if cfg == nil {
		return nil, errors.New("backend: no backend configured")
	}
	switch cfg.Type {
	case "localfs":
		if cfg.LocalFS == nil {
			return nil, errors.New("backend: localfs: missing config")
		}
		return NewLocalFS(*cfg.LocalFS, hooks), nil
	case "registry":
		if cfg.Registry == nil {
			return nil, errors.New("backend: registry: missing config")
		}
		return NewRegistry(*cfg.Registry, hooks)
	case "":
		return nil, errors.New("backend: no backend type configured")
	}
	return nil, fmt.Errorf("backend: type %q is not supported by rafsd (localfs and registry are)", cfg.Type)
}

package backend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rafsd/rafsd/rafs/config"
)

// LocalFS reads blobs from files: cfg.BlobFile for every blob if set,
// else <dir>/<id> for the first of Dir and AltDirs that has it.
type LocalFS struct {
	cfg   config.LocalFS
	hooks Hooks

	mu    sync.Mutex
	files map[string]*os.File
}

// NewLocalFS returns a localfs backend.
func NewLocalFS(cfg config.LocalFS, hooks Hooks) *LocalFS {
	return &LocalFS{cfg: cfg, hooks: hooks, files: make(map[string]*os.File)}
}

// Type implements Backend.
func (l *LocalFS) Type() string { return "localfs" }

func (l *LocalFS) open(id string) (*os.File, error) {
	if id == "" || strings.ContainsAny(id, "/\x00") || id == "." || id == ".." {
		return nil, fmt.Errorf("bad blob id %q", id)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if f, ok := l.files[id]; ok {
		return f, nil
	}
	var paths []string
	if l.cfg.BlobFile != "" {
		paths = []string{l.cfg.BlobFile}
	} else {
		for _, d := range append([]string{l.cfg.Dir}, l.cfg.AltDirs...) {
			if d != "" {
				paths = append(paths, filepath.Join(d, id))
			}
		}
	}
	var firstErr error
	for _, p := range paths {
		f, err := os.Open(p)
		if err == nil {
			l.files[id] = f
			return f, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if errors.Is(firstErr, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %v", ErrNotFound, firstErr)
	}
	return nil, firstErr
}

// ReadAt implements Backend.
func (l *LocalFS) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	start := time.Now()
	err := l.readAt(id, p, off)
	n := len(p)
	if err != nil {
		n = 0
	}
	l.hooks.request("localfs", n, time.Since(start), err)
	if err != nil {
		return &ReadError{Backend: "localfs", BlobID: id, Off: off, Len: len(p), Err: err}
	}
	return nil
}

func (l *LocalFS) readAt(id string, p []byte, off int64) error {
	f, err := l.open(id)
	if err != nil {
		return err
	}
	if off < 0 {
		return fmt.Errorf("negative offset")
	}
	_, err = f.ReadAt(p, off)
	if err == io.EOF {
		return fmt.Errorf("past end of blob: %w", io.ErrUnexpectedEOF)
	}
	return err
}

// Size implements Backend.
func (l *LocalFS) Size(ctx context.Context, id string) (int64, error) {
	f, err := l.open(id)
	if err != nil {
		return 0, fmt.Errorf("localfs backend: blob %s: %w", id, err)
	}
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("localfs backend: blob %s: %w", id, err)
	}
	return st.Size(), nil
}

// Close implements Backend.
func (l *LocalFS) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, f := range l.files {
		f.Close()
		delete(l.files, id)
	}
	return nil
}

// OpenRange implements Streamer: the range is read from the file as the
// stream is consumed.
func (l *LocalFS) OpenRange(ctx context.Context, id string, off, n int64) (io.ReadCloser, error) {
	start := time.Now()
	f, err := l.open(id)
	if err == nil && (off < 0 || n <= 0) {
		err = errors.New("empty or negative range")
	}
	if err != nil {
		l.hooks.request("localfs", 0, time.Since(start), err)
		return nil, &ReadError{Backend: "localfs", BlobID: id, Off: off, Len: int(n), Err: err}
	}
	return newRangeReader(io.NopCloser(io.NewSectionReader(f, off, n)), "localfs", "localfs", id, off, n, &l.hooks, start, nil, 0), nil
}

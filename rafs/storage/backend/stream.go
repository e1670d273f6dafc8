package backend

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"time"
)

// Streamer is implemented by backends that can hand out a byte range as a
// stream, so that a reader of a large range can consume its start before
// its end has arrived (one request instead of many, without buffering the
// range). The fetcher uses it for read-ahead windows and prefetch.
type Streamer interface {
	// OpenRange returns the n bytes of blob id at off as a stream. Reading
	// it yields exactly n bytes and then io.EOF; a range cut short reads
	// as io.ErrUnexpectedEOF, and every error is a *ReadError. Close
	// releases the request (early, if the stream was not read to its end).
	OpenRange(ctx context.Context, id string, off, n int64) (io.ReadCloser, error)
}

// OpenRange opens n bytes of blob id at off from be: as a stream if be is
// a Streamer, else with one ReadAt of the whole range (which then costs
// n bytes of memory and arrives all at once).
func OpenRange(ctx context.Context, be Backend, id string, off, n int64) (io.ReadCloser, error) {
	if s, ok := be.(Streamer); ok {
		return s.OpenRange(ctx, id, off, n)
	}
	if n < 0 || n > 1<<31 {
		return nil, &ReadError{Backend: be.Type(), BlobID: id, Off: off, Err: fmt.Errorf("range of %d bytes", n)}
	}
	p := make([]byte, n)
	if err := be.ReadAt(ctx, id, p, off); err != nil {
		return nil, err
	}
	return io.NopCloser(bytes.NewReader(p)), nil
}

// rangeReader reads exactly n bytes of a body, turning a short body into
// io.ErrUnexpectedEOF and every failure into a *ReadError. It reports the
// request to the hooks once, on Close, with the bytes it delivered. With
// idle > 0 the request is cancelled if a Read waits longer than that for
// data: a stream of hundreds of MiB must not fall under a per-request
// timeout, but a stalled one must not hang its readers.
type rangeReader struct {
	body     io.ReadCloser
	backend  string
	id       string
	off      int64
	n        int64 // bytes still expected
	total    int64
	endpoint string
	hooks    *Hooks
	start    time.Time
	cancel   context.CancelFunc
	idle     time.Duration
	timer    *time.Timer
	failed   func(error) // tells the endpoint's health tracking of a cut

	mu     sync.Mutex
	err    error // first error seen
	closed bool
}

func newRangeReader(body io.ReadCloser, backend, endpoint, id string, off, n int64, hooks *Hooks, start time.Time, cancel context.CancelFunc, idle time.Duration) *rangeReader {
	r := &rangeReader{body: body, backend: backend, endpoint: endpoint, id: id, off: off, n: n, total: n, hooks: hooks, start: start, cancel: cancel, idle: idle}
	if idle > 0 && cancel != nil {
		// Armed only while a Read waits: a consumer may pause between reads.
		r.timer = time.AfterFunc(time.Hour, cancel)
		r.timer.Stop()
	}
	return r
}

func (r *rangeReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if r.n == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.n {
		p = p[:r.n]
	}
	if r.timer != nil {
		r.timer.Reset(r.idle)
	}
	k, err := r.body.Read(p)
	if r.timer != nil {
		r.timer.Stop()
	}
	r.n -= int64(k)
	if err == io.EOF {
		if r.n == 0 {
			err = nil
		} else {
			err = io.ErrUnexpectedEOF
		}
	}
	if err != nil {
		pos := r.total - r.n
		r.err = &ReadError{Backend: r.backend, BlobID: r.id, Off: r.off + pos, Len: int(r.n), Err: fmt.Errorf("%s: stream cut after %d of %d bytes: %w", r.endpoint, pos, r.total, err)}
		if r.failed != nil {
			r.failed(err)
		}
		return k, r.err
	}
	return k, nil
}

func (r *rangeReader) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	if r.timer != nil {
		r.timer.Stop()
	}
	err := r.body.Close()
	if r.cancel != nil {
		r.cancel()
	}
	// Closing before the end is how a reader gives up a range it no
	// longer needs, not a failure of the backend.
	if r.hooks != nil {
		r.hooks.request(r.endpoint, int(r.total-r.n), time.Since(r.start), r.err)
	}
	return err
}

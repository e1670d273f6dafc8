// Package capproxy is a TCP proxy for benchmarks: it sits on 127.0.0.1 in
// front of a server (a local registry), caps the bandwidth of the
// server->client direction with one token bucket shared by every
// connection, as one network link would, and counts the bytes it moved.
//
// Requests (client->server) pass unthrottled and uncounted: what a cold
// start costs is what it downloads.
package capproxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// DefaultBurst is how many bytes the bucket holds when full: enough for a
// few reads of a TCP stream, small against a second's worth at any rate a
// benchmark uses.
const DefaultBurst = 256 << 10

// Proxy is a running bandwidth-capped proxy.
type Proxy struct {
	// Addr is the host:port clients connect to.
	Addr string

	upstream string
	ln       net.Listener
	bucket   *bucket
	moved    atomic.Int64

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// Listen starts a proxy on a free port of 127.0.0.1 that forwards every
// connection to upstream and lets at most rate bytes/s flow back in total.
func Listen(upstream string, rate float64) (*Proxy, error) {
	if rate <= 0 {
		return nil, fmt.Errorf("capproxy: rate %v bytes/s: must be positive", rate)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("capproxy: listen: %w", err)
	}
	p := &Proxy{
		Addr:     ln.Addr().String(),
		upstream: upstream,
		ln:       ln,
		bucket:   &bucket{rate: rate, burst: DefaultBurst, tokens: DefaultBurst, last: time.Now()},
		conns:    map[net.Conn]struct{}{},
	}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Start is Listen for tests and benchmarks: it fails tb on error and closes
// the proxy when tb ends.
func Start(tb testing.TB, upstream string, rate float64) *Proxy {
	tb.Helper()
	p, err := Listen(upstream, rate)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { p.Close() })
	return p
}

// Bytes returns the bytes moved server->client since the start or the last
// Reset.
func (p *Proxy) Bytes() int64 { return p.moved.Load() }

// Reset zeroes the byte count and returns what it was.
func (p *Proxy) Reset() int64 { return p.moved.Swap(0) }

// Close stops accepting, closes every open connection and waits for the
// copying goroutines to end.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	err := p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

// track registers c for Close; false if the proxy is already closed.
func (p *Proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *Proxy) untrack(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		delete(p.conns, c)
		c.Close()
	}
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// A transient accept error (EMFILE...): keep serving.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		u, err := net.Dial("tcp", p.upstream)
		if err != nil {
			// The client sees a closed connection, as it would if the
			// server were down.
			c.Close()
			continue
		}
		if !p.track(c, u) {
			c.Close()
			u.Close()
			return
		}
		p.wg.Add(2)
		go func() { // client -> server: requests, unthrottled
			defer p.wg.Done()
			io.Copy(u, c)
			if tc, ok := u.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
		}()
		go func() { // server -> client: throttled and counted
			defer p.wg.Done()
			defer p.untrack(c, u)
			buf := make([]byte, 32<<10)
			for {
				n, err := u.Read(buf)
				if n > 0 {
					p.bucket.take(n)
					p.moved.Add(int64(n))
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					if tc, ok := c.(*net.TCPConn); ok {
						tc.CloseWrite()
					}
					return
				}
			}
		}()
	}
}

// bucket is a token bucket of bytes.
type bucket struct {
	mu     sync.Mutex
	rate   float64 // bytes/s
	burst  float64
	tokens float64
	last   time.Time
}

// take blocks until n bytes may pass. Sleeping under the lock serializes
// the connections, which is what one shared link does.
func (b *bucket) take(n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	b.tokens -= float64(n)
	if b.tokens < 0 {
		time.Sleep(time.Duration(-b.tokens / b.rate * float64(time.Second)))
	}
}

package capproxy

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// server answers every connection with the bytes of pattern repeated to n
// bytes once the client has sent one byte, then closes.
func server(t *testing.T, n int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var one [1]byte
				if _, err := io.ReadFull(c, one[:]); err != nil {
					return
				}
				c.Write(payload(n))
			}()
		}
	}()
	return ln.Addr().String()
}

func payload(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>11)
	}
	return b
}

func fetch(t *testing.T, addr string) []byte {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Error(err)
		return nil
	}
	defer c.Close()
	if _, err := c.Write([]byte{1}); err != nil {
		t.Error(err)
		return nil
	}
	b, err := io.ReadAll(c)
	if err != nil {
		t.Error(err)
	}
	return b
}

func TestBytesPassAndAreCounted(t *testing.T) {
	const n = 1<<20 + 123
	p := Start(t, server(t, n), 1<<30)
	for i := range 2 {
		if got := fetch(t, p.Addr); !bytes.Equal(got, payload(n)) {
			t.Fatalf("fetch %d: got %d bytes, not the server's %d", i, len(got), n)
		}
	}
	if got := p.Reset(); got != 2*n {
		t.Fatalf("Reset returned %d, want %d", got, 2*n)
	}
	if got := p.Bytes(); got != 0 {
		t.Fatalf("Bytes after Reset = %d", got)
	}
}

// TestRateIsShared checks the cap holds over all connections together. Only
// a lower bound on time is asserted: a loaded machine can only be slower.
func TestRateIsShared(t *testing.T) {
	const (
		n     = 1 << 20
		conns = 3
		rate  = 16 << 20
	)
	p := Start(t, server(t, n), rate)
	start := time.Now()
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() {
			if got := fetch(t, p.Addr); len(got) != n {
				t.Errorf("got %d bytes, want %d", len(got), n)
			}
		})
	}
	wg.Wait()
	min := time.Duration(float64(conns*n-DefaultBurst) / rate * float64(time.Second))
	if d := time.Since(start); d < min {
		t.Fatalf("%d bytes in %v at %d B/s: faster than the cap allows (>= %v)", conns*n, d, rate, min)
	}
	if got := p.Bytes(); got != conns*n {
		t.Fatalf("Bytes = %d, want %d", got, conns*n)
	}
}

func TestCloseEndsOpenConnections(t *testing.T) {
	// An upstream that never answers: the client blocks until Close.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	p, err := Listen(ln.Addr().String(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	up := <-accepted
	defer up.Close()
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		done <- err
	}()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("read succeeded after Close")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("client connection still open after Close")
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := net.DialTimeout("tcp", p.Addr, time.Second); err == nil {
		t.Fatal("proxy still accepts after Close")
	}
}

func TestUpstreamDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	p := Start(t, addr, 1<<20)
	c, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil || n != 0 {
		t.Fatalf("read from a proxy whose upstream is down: %d, %v; want EOF", n, err)
	}
}

func TestBadRate(t *testing.T) {
	for _, r := range []float64{0, -1} {
		if _, err := Listen("127.0.0.1:1", r); err == nil {
			t.Errorf("rate %v accepted", r)
		}
	}
}

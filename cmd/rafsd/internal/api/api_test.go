package api

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestIdleConnectionKept: nydus-snapshotter's liveness monitor holds a
// connection to the API socket that never sends a request and reads its
// hangup as the daemon's death; the server must keep it open (a 10 s
// header timeout once closed it, and the snapshotter failed over a live
// daemon). The connection then still serves a request.
func TestIdleConnectionKept(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "api.sock")
	srv, err := Listen(sock, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Longer than the header timeout the server had: a read that ends by
	// our deadline means the server kept the connection; EOF means it hung up.
	c.SetReadDeadline(time.Now().Add(12 * time.Second))
	var b [1]byte
	if _, err := c.Read(b[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("idle connection: read = %v, want our deadline (the server closed it)", err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("request on the kept connection: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("status %d", resp.StatusCode)
	}
}

package backend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs/config"
)

func TestLocalFS(t *testing.T) {
	dir, alt := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(alt, "b1"), []byte("0123456789"), 0o644)
	single := filepath.Join(t.TempDir(), "single")
	os.WriteFile(single, []byte("abcdefghij"), 0o644)

	var calls atomic.Int32
	l := NewLocalFS(config.LocalFS{Dir: dir, AltDirs: []string{alt}}, Hooks{Request: func(string, int, time.Duration, error) { calls.Add(1) }})
	defer l.Close()
	p := make([]byte, 4)
	if err := l.ReadAt(context.Background(), "b1", p, 3); err != nil || string(p) != "3456" {
		t.Fatalf("alt dir read: %q %v", p, err)
	}
	if n, err := l.Size(context.Background(), "b1"); err != nil || n != 10 {
		t.Fatalf("Size = %d, %v", n, err)
	}
	err := l.ReadAt(context.Background(), "b1", p, 8)
	var re *ReadError
	if !errors.As(err, &re) || re.BlobID != "b1" || re.Off != 8 || re.Len != 4 || !strings.Contains(err.Error(), "localfs backend: read blob b1 [8,+4)") {
		t.Fatalf("short read: %v", err)
	}
	if err := l.ReadAt(context.Background(), "nope", p, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing blob: %v", err)
	}
	if err := l.ReadAt(context.Background(), "../etc/passwd", p, 0); err == nil {
		t.Fatal("path in blob id accepted")
	}
	if calls.Load() != 4 {
		t.Errorf("request hook called %d times, want 4", calls.Load())
	}

	s := NewLocalFS(config.LocalFS{BlobFile: single}, Hooks{})
	defer s.Close()
	if err := s.ReadAt(context.Background(), "any", p, 0); err != nil || string(p) != "abcd" {
		t.Fatalf("blob_file read: %q %v", p, err)
	}
}

func registryCfg(u string) config.Registry {
	pu, _ := url.Parse(u)
	return config.Registry{Scheme: "http", Host: pu.Host, Repo: "r/x", Timeout: 5, ConnectTimeout: 5}
}

// blobServer serves blob bytes with Range support, failing the first
// fail requests with 503.
func blobServer(t *testing.T, data []byte, fail int32, check func(*http.Request)) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if check != nil {
			check(r)
		}
		if n.Add(1) <= fail {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		if !strings.HasPrefix(r.URL.Path, "/v2/r/x/blobs/sha256:") {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "", fixedTime, bytes.NewReader(data))
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func TestRegistryRetry(t *testing.T) {
	data := []byte(strings.Repeat("0123456789", 100))
	for _, tc := range []struct {
		fail, limit int32
		ok          bool
	}{{0, 0, true}, {2, 2, true}, {3, 2, false}} {
		t.Run(fmt.Sprintf("fail=%d,limit=%d", tc.fail, tc.limit), func(t *testing.T) {
			srv, n := blobServer(t, data, tc.fail, nil)
			cfg := registryCfg(srv.URL)
			cfg.RetryLimit = uint8(tc.limit)
			var retries atomic.Int32
			r, err := NewRegistry(cfg, Hooks{Retry: func() { retries.Add(1) }})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			p := make([]byte, 25)
			err = r.ReadAt(context.Background(), "abc", p, 95)
			if tc.ok != (err == nil) {
				t.Fatalf("ReadAt: %v", err)
			}
			if tc.ok && !bytes.Equal(p, data[95:120]) {
				t.Fatalf("wrong bytes %q", p)
			}
			if !tc.ok && !strings.Contains(err.Error(), "HTTP 503") {
				t.Fatalf("error %v does not name the status", err)
			}
			if want := min(tc.fail, tc.limit); retries.Load() != want || n.Load() != min(tc.fail, tc.limit)+1 {
				t.Fatalf("%d retries, %d requests", retries.Load(), n.Load())
			}
		})
	}
}

func TestRegistryRedirectAndToken(t *testing.T) {
	data := []byte(strings.Repeat("abcdefgh", 64))
	storage, _ := blobServer(t, data, 0, func(r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			t.Errorf("credentials leaked to the redirect target")
		}
	})
	su, _ := url.Parse(storage.URL)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="x"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		// Redirect to a host that does not exist; blob_redirected_host
		// points it at the storage server.
		http.Redirect(w, r, "http://storage.invalid"+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	defer origin.Close()
	cfg := registryCfg(origin.URL)
	cfg.RegistryToken = "tok"
	cfg.BlobRedirectedHost = su.Host
	r, err := NewRegistry(cfg, Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	p := make([]byte, 10)
	if err := r.ReadAt(context.Background(), "abc", p, 100); err != nil || !bytes.Equal(p, data[100:110]) {
		t.Fatalf("redirected read: %q %v", p, err)
	}
	cfg.RegistryToken = "wrong"
	r2, _ := NewRegistry(cfg, Hooks{})
	defer r2.Close()
	if err := r2.ReadAt(context.Background(), "abc", p, 0); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("wrong token: %v", err)
	}
}

func TestRegistryIgnoresRange(t *testing.T) {
	data := []byte(strings.Repeat("xyz", 100))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(data) // 200, whole blob
	}))
	defer srv.Close()
	r, _ := NewRegistry(registryCfg(srv.URL), Hooks{})
	defer r.Close()
	p := make([]byte, 7)
	if err := r.ReadAt(context.Background(), "abc", p, 50); err != nil || !bytes.Equal(p, data[50:57]) {
		t.Fatalf("read from a 200 answer: %q %v", p, err)
	}
	if err := r.ReadAt(context.Background(), "abc", p, 298); err == nil {
		t.Fatal("read past a short 200 answer succeeded")
	}
}

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		cfg  *config.Backend
		want string
	}{
		{nil, "no backend"},
		{&config.Backend{}, "no backend type"},
		{&config.Backend{Type: "oss", OSS: &config.OSS{}}, `"oss" is not supported`},
		{&config.Backend{Type: "registry", Registry: &config.Registry{Scheme: "http", Host: "h", Repo: "r", Auth: "!!"}}, "not base64"},
	} {
		if _, err := New(tc.cfg, Hooks{}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want %q", tc.cfg, err, tc.want)
		}
	}
}

var fixedTime = time.Unix(1700000000, 0)

// forwardProxy is a plain HTTP forward proxy (what dfdaemon is to nydusd).
func forwardProxy(t *testing.T) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		if !r.URL.IsAbs() {
			http.Error(w, "not a proxy request", http.StatusBadRequest)
			return
		}
		out := r.Clone(r.Context())
		out.RequestURI = ""
		resp, err := http.DefaultTransport.RoundTrip(out)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func TestRegistryProxy(t *testing.T) {
	data := []byte(strings.Repeat("proxy!", 200))
	origin, originHits := blobServer(t, data, 0, nil)
	proxy, proxyHits := forwardProxy(t)
	cfg := registryCfg(origin.URL)
	cfg.Proxy = config.Proxy{URL: proxy.URL, Fallback: true, CheckInterval: 1}
	var failovers atomic.Int32
	r, err := NewRegistry(cfg, Hooks{Failover: func(string, string) { failovers.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	p := make([]byte, 12)
	if err := r.ReadAt(context.Background(), "abc", p, 6); err != nil || !bytes.Equal(p, data[6:18]) {
		t.Fatalf("read via proxy: %q %v", p, err)
	}
	if proxyHits.Load() != 1 || originHits.Load() != 1 {
		t.Fatalf("proxy %d origin %d hits, want the request through the proxy", proxyHits.Load(), originHits.Load())
	}
	proxy.Close()
	if err := r.ReadAt(context.Background(), "abc", p, 12); err != nil || !bytes.Equal(p, data[12:24]) {
		t.Fatalf("fallback read: %q %v", p, err)
	}
	if failovers.Load() != 1 || originHits.Load() != 2 {
		t.Fatalf("failovers %d origin hits %d after the proxy died", failovers.Load(), originHits.Load())
	}
}

// FuzzReadBody feeds hostile registry answers to the response reader: it
// must fail or fill exactly the requested bytes from the right offset,
// never panic.
func FuzzReadBody(f *testing.F) {
	f.Add(206, "bytes 5-9/20", []byte("56789"), uint16(5), uint8(5))
	f.Add(200, "", []byte("0123456789"), uint16(3), uint8(4))
	f.Add(206, "bytes 4-9/20", []byte("456789"), uint16(5), uint8(5))
	f.Add(416, "", []byte("nope"), uint16(0), uint8(1))
	f.Fuzz(func(t *testing.T, status int, contentRange string, body []byte, off uint16, n uint8) {
		resp := &http.Response{StatusCode: status, Header: http.Header{}, Body: io.NopCloser(bytes.NewReader(body))}
		if contentRange != "" {
			resp.Header.Set("Content-Range", contentRange)
		}
		p := make([]byte, n)
		err := readBody(resp, p, int64(off))
		if err != nil {
			return
		}
		switch status {
		case http.StatusOK:
			if int(off)+int(n) > len(body) || !bytes.Equal(p, body[off:int(off)+int(n)]) {
				t.Fatalf("200: read %q at %d from %q", p, off, body)
			}
		case http.StatusPartialContent:
			if int(n) > len(body) || !bytes.Equal(p, body[:n]) {
				t.Fatalf("206: read %q from %q", p, body)
			}
		default:
			t.Fatalf("status %d accepted", status)
		}
	})
}

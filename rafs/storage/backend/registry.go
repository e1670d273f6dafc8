package backend

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"

	"github.com/rafsd/rafsd/rafs/config"
)

// Registry reads blobs from an OCI distribution registry with ranged GETs
// of /v2/<repo>/blobs/sha256:<id>. Authentication is containerd's
// (core/remotes/docker): basic or bearer-token challenges answered with the
// config's auth (base64 user:password) or the docker config.json entry of
// the host; a configured registry_token is sent as a bearer token as is.
//
// Mirrors are tried in order before the origin; a mirror that fails
// failure_limit times in a row is skipped until its health check (a GET of
// ping_url, default <host>/v2/) succeeds again. A proxy (proxy.url) is an
// HTTP forward proxy all requests go through while it is healthy, falling
// back to a direct request if proxy.fallback.
type Registry struct {
	cfg     config.Registry
	hooks   Hooks
	client  *http.Client
	auth    docker.Authorizer
	token   string // registry_token, if set
	base    string // scheme://host
	mirrors []*endpoint
	proxy   *endpoint

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// endpoint is a mirror or the proxy, with its health.
type endpoint struct {
	name        string // host, for logs and metrics
	base        string // scheme://host of a mirror; "" for the proxy
	headers     map[string]string
	authThrough bool
	client      *http.Client
	pingURL     string
	interval    time.Duration
	limit       int32
	fallback    bool

	failures atomic.Int32
	down     atomic.Bool
	checking atomic.Bool
}

// NewRegistry returns a registry backend.
func NewRegistry(cfg config.Registry, hooks Hooks) (*Registry, error) {
	tlsCfg, err := tlsConfig(cfg.SkipVerify, cfg.CACertFiles)
	if err != nil {
		return nil, fmt.Errorf("registry backend: %w", err)
	}
	r := &Registry{cfg: cfg, hooks: hooks, base: cfg.Scheme + "://" + cfg.Host}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.client = &http.Client{Transport: transport(tlsCfg, cfg.ConnectTimeout, nil), CheckRedirect: r.checkRedirect}
	if cfg.RegistryToken != "" {
		r.token = cfg.RegistryToken
	}
	user, secret, err := credentials(cfg)
	if err != nil {
		return nil, fmt.Errorf("registry backend: %w", err)
	}
	r.auth = docker.NewDockerAuthorizer(
		docker.WithAuthClient(r.client),
		docker.WithAuthCreds(func(string) (string, string, error) { return user, secret, nil }),
	)
	for _, m := range cfg.Mirrors {
		u, err := url.Parse(strings.TrimSuffix(m.Host, "/"))
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("registry backend: mirror host %q: not a URL", m.Host)
		}
		e := &endpoint{
			name: u.Host, base: u.Scheme + "://" + u.Host + strings.TrimSuffix(u.Path, "/"), headers: m.Headers,
			authThrough: m.AuthThrough, client: &http.Client{Transport: transport(tlsCfg, cfg.ConnectTimeout, nil), CheckRedirect: r.checkRedirect},
			pingURL: m.PingURL, interval: seconds(m.HealthCheckInterval), limit: int32(max(m.FailureLimit, 1)), fallback: true,
		}
		if e.pingURL == "" {
			e.pingURL = e.base + "/v2/"
		}
		r.mirrors = append(r.mirrors, e)
	}
	if p := cfg.Proxy; p.URL != "" {
		pu, err := url.Parse(p.URL)
		if err != nil || pu.Host == "" {
			return nil, fmt.Errorf("registry backend: proxy url %q: not a URL", p.URL)
		}
		r.proxy = &endpoint{
			name: "proxy", client: &http.Client{Transport: transport(tlsCfg, cfg.ConnectTimeout, http.ProxyURL(pu)), CheckRedirect: r.checkRedirect},
			pingURL: p.PingURL, interval: seconds(p.CheckInterval), limit: 1, fallback: p.Fallback, authThrough: true,
		}
		if p.PingURL != "" {
			// As nydusd: with a ping URL the proxy's health is polled all along.
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				r.pollProxy()
			}()
		}
	}
	return r, nil
}

func seconds(s uint64) time.Duration {
	if s == 0 {
		s = config.DefaultCheckInterval
	}
	return time.Duration(min(s, 86400)) * time.Second
}

func tlsConfig(skipVerify bool, caFiles []string) (*tls.Config, error) {
	c := &tls.Config{InsecureSkipVerify: skipVerify}
	if len(caFiles) > 0 {
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		for _, f := range caFiles {
			pem, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("ca_cert_files: %w", err)
			}
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("ca_cert_files: %s: no PEM certificates", f)
			}
		}
		c.RootCAs = pool
	}
	return c, nil
}

func transport(tlsCfg *tls.Config, connectTimeout uint32, proxy func(*http.Request) (*url.URL, error)) *http.Transport {
	ct := time.Duration(connectTimeout) * time.Second
	if ct == 0 {
		ct = 30 * time.Second
	}
	return &http.Transport{
		Proxy:                 proxy,
		DialContext:           (&net.Dialer{Timeout: ct, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsCfg,
		TLSHandshakeTimeout:   ct,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          128,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// credentials returns the user and secret from the config's auth field or,
// failing that, docker's config.json (auths, credsStore, credHelpers) for
// the registry host.
func credentials(cfg config.Registry) (string, string, error) {
	if cfg.Auth != "" {
		return decodeAuth(cfg.Auth)
	}
	creds, err := DockerCredentials("")
	if err != nil {
		return "", "", err
	}
	return creds(cfg.Host)
}

func decodeAuth(s string) (string, string, error) {
	raw, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return "", "", fmt.Errorf("auth: not base64: %w", err)
	}
	user, secret, ok := strings.Cut(string(raw), ":")
	if !ok {
		return "", "", errors.New("auth: want base64 of user:password")
	}
	return user, secret, nil
}

// checkRedirect applies blob_redirected_host and blob_url_scheme to the
// storage URL the registry redirects a blob request to.
func (r *Registry) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return errors.New("stopped after 10 redirects")
	}
	if r.cfg.BlobRedirectedHost != "" {
		req.URL.Host = r.cfg.BlobRedirectedHost
		req.Host = r.cfg.BlobRedirectedHost
	}
	if r.cfg.BlobURLScheme != "" {
		req.URL.Scheme = r.cfg.BlobURLScheme
	}
	return nil
}

// Type implements Backend.
func (r *Registry) Type() string { return "registry" }

// Close implements Backend.
func (r *Registry) Close() error {
	r.cancel()
	r.wg.Wait()
	r.client.CloseIdleConnections()
	for _, m := range r.mirrors {
		m.client.CloseIdleConnections()
	}
	if r.proxy != nil {
		r.proxy.client.CloseIdleConnections()
	}
	return nil
}

func (r *Registry) blobPath(id string) string {
	return "/v2/" + r.cfg.Repo + "/blobs/sha256:" + id
}

// ReadAt implements Backend.
func (r *Registry) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	err := r.readAt(ctx, id, p, off)
	if err != nil {
		return &ReadError{Backend: "registry", BlobID: id, Off: off, Len: len(p), Err: err}
	}
	return nil
}

func (r *Registry) readAt(ctx context.Context, id string, p []byte, off int64) error {
	if off < 0 {
		return errors.New("negative offset")
	}
	return r.each(ctx, id, func(ctx context.Context, e *endpoint, u string) error {
		return r.do(ctx, e, u, p, off)
	})
}

// OpenRange implements Streamer: one ranged GET whose body is handed out
// as it arrives. Mirrors, the proxy and retries apply to opening it; the
// config's timeout bounds the wait for the answer and then every wait
// for more body bytes.
func (r *Registry) OpenRange(ctx context.Context, id string, off, n int64) (io.ReadCloser, error) {
	if n <= 0 || off < 0 {
		return nil, &ReadError{Backend: "registry", BlobID: id, Off: off, Len: int(n), Err: errors.New("empty or negative range")}
	}
	var rc io.ReadCloser
	err := r.each(ctx, id, func(ctx context.Context, e *endpoint, u string) error {
		sctx, cancel := context.WithCancel(ctx)
		var timer *time.Timer
		idle := time.Duration(r.cfg.Timeout) * time.Second
		if idle > 0 {
			timer = time.AfterFunc(idle, cancel)
		}
		start := time.Now()
		resp, name, err := r.open(sctx, e, u, off, n)
		if timer != nil {
			timer.Stop()
		}
		if err != nil {
			r.hooks.request(name, 0, time.Since(start), err)
			cancel()
			return fmt.Errorf("%s: %w", name, err)
		}
		rr := newRangeReader(resp.Body, "registry", name, id, off, n, &r.hooks, start, cancel, idle)
		if e != nil && (e != r.proxy || e.pingURL != "") {
			// A mirror (or polled proxy) that cuts a stream is failing: the
			// reopening of the rest should go elsewhere once it is down.
			rr.failed = func(err error) {
				if ctx.Err() == nil {
					r.mirrorFailed(e, err)
					to := "next"
					if e == r.proxy {
						to = "origin"
					}
					r.hooks.failover(e.name, to)
				}
			}
		}
		rc = rr
		return nil
	})
	if err != nil {
		return nil, &ReadError{Backend: "registry", BlobID: id, Off: off, Len: int(n), Err: err}
	}
	return rc, nil
}

// each runs try against the mirrors, the proxy and the origin in turn
// until one succeeds, with failover, health tracking and the origin's
// retries.
func (r *Registry) each(ctx context.Context, id string, try func(ctx context.Context, e *endpoint, u string) error) error {
	if id == "" || strings.ContainsAny(id, "/?#%\x00") {
		return fmt.Errorf("bad blob id %q", id)
	}
	ctx = docker.ContextWithAppendPullRepositoryScope(ctx, r.cfg.Repo)
	path := r.blobPath(id)
	for _, m := range r.mirrors {
		if m.down.Load() {
			continue
		}
		err := try(ctx, m, m.base+path)
		if err == nil {
			m.failures.Store(0)
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		if errors.Is(err, ErrNotFound) || errors.Is(err, errRange) {
			// The mirror answered; a missing blob is missing upstream too,
			// but let the origin have the last word.
			slog.Debug("registry mirror answered with an error, trying next", "mirror", m.name, "err", err)
		} else {
			r.mirrorFailed(m, err)
		}
		r.hooks.failover(m.name, "next")
	}
	if r.proxy != nil {
		px := r.proxy
		if px.down.Load() {
			if !px.fallback {
				return errors.New("proxy is not healthy and fallback is disabled")
			}
		} else {
			err := try(ctx, px, r.originURL(path, true))
			if err == nil {
				return nil
			}
			if !px.fallback || ctx.Err() != nil {
				return fmt.Errorf("via proxy: %w", err)
			}
			if px.pingURL == "" {
				// Without a ping URL nothing would bring it back; keep using it.
				slog.Warn("registry proxy failed, falling back to origin", "err", err)
			} else {
				r.mirrorFailed(px, err)
			}
			r.hooks.failover(px.name, "origin")
		}
	}
	return r.originRead(ctx, r.originURL(path, false), try)
}

func (r *Registry) originURL(path string, viaProxy bool) string {
	if viaProxy && r.cfg.Proxy.UseHTTP {
		return "http://" + r.cfg.Host + path
	}
	return r.base + path
}

// originRead reads from the origin, retrying retry_limit times with
// exponential backoff on network errors and 5xx/429 answers.
func (r *Registry) originRead(ctx context.Context, u string, try func(ctx context.Context, e *endpoint, u string) error) error {
	backoff := 100 * time.Millisecond
	for attempt := 0; ; attempt++ {
		err := try(ctx, nil, u)
		if err == nil || !retryable(err) || attempt >= int(r.cfg.RetryLimit) || ctx.Err() != nil {
			return err
		}
		r.hooks.retry()
		slog.Debug("registry read failed, retrying", "url", u, "attempt", attempt+1, "err", err)
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// mirrorFailed counts a failure of m and, at its failure limit, takes it
// out of rotation until a health check succeeds.
func (r *Registry) mirrorFailed(m *endpoint, err error) {
	if m.failures.Add(1) < m.limit || !m.down.CompareAndSwap(false, true) {
		return
	}
	slog.Warn("registry mirror marked unhealthy", "mirror", m.name, "err", err)
	if m == r.proxy && r.cfg.Proxy.PingURL != "" {
		return // pollProxy brings it back
	}
	if !m.checking.CompareAndSwap(false, true) {
		return
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer m.checking.Store(false)
		for {
			select {
			case <-r.ctx.Done():
				return
			case <-time.After(m.interval):
			}
			if r.ping(m) {
				m.failures.Store(0)
				m.down.Store(false)
				slog.Info("registry mirror recovered", "mirror", m.name)
				return
			}
		}
	}()
}

func (r *Registry) pollProxy() {
	px := r.proxy
	for {
		ok := r.ping(px)
		if was := px.down.Swap(!ok); was == ok {
			slog.Info("registry proxy health changed", "healthy", ok)
		}
		select {
		case <-r.ctx.Done():
			return
		case <-time.After(px.interval):
		}
	}
}

// ping reports whether the endpoint answers its ping URL below 500 (a
// registry's /v2/ answers 401 when auth is on, which still means "up").
func (r *Registry) ping(m *endpoint) bool {
	ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.pingURL, nil)
	if err != nil {
		return false
	}
	client := m.client
	if m == r.proxy {
		client = r.client // the ping URL is the proxy's own
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	return resp.StatusCode < 500
}

// statusError is an unexpected HTTP answer.
type statusError struct {
	code int
	msg  string
}

func (e *statusError) Error() string {
	if e.msg != "" {
		return fmt.Sprintf("HTTP %d: %s", e.code, e.msg)
	}
	return fmt.Sprintf("HTTP %d", e.code)
}

var errRange = errors.New("range not satisfiable")

func retryable(err error) bool {
	var se *statusError
	if errors.As(err, &se) {
		return se.code >= 500 || se.code == http.StatusTooManyRequests || se.code == http.StatusRequestTimeout
	}
	return !errors.Is(err, ErrUnauthorized) && !errors.Is(err, ErrNotFound) && !errors.Is(err, errRange) &&
		!errors.Is(err, context.Canceled)
}

// do performs one ranged GET of u (answering auth challenges) into p.
// e is the mirror or proxy it goes to, nil for the origin.
func (r *Registry) do(ctx context.Context, e *endpoint, u string, p []byte, off int64) error {
	if t := r.cfg.Timeout; t > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(t)*time.Second)
		defer cancel()
	}
	start := time.Now()
	resp, name, err := r.open(ctx, e, u, off, int64(len(p)))
	if err == nil {
		defer resp.Body.Close()
		if _, err = io.ReadFull(resp.Body, p); err != nil {
			err = fmt.Errorf("reading body: %w", unexpected(err))
		}
	}
	n := len(p)
	if err != nil {
		n = 0
	}
	r.hooks.request(name, n, time.Since(start), err)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// open sends one GET of n bytes at off of u, answering auth challenges,
// and returns the answer with its body positioned at off. name is the
// endpoint's name for errors and metrics. Failed auth rounds are reported
// to the hooks here; the caller reports the request itself.
func (r *Registry) open(ctx context.Context, e *endpoint, u string, off, n int64) (resp *http.Response, name string, err error) {
	name, client := "origin", r.client
	if e != nil {
		name, client = e.name, e.client
	}
	var responses []*http.Response
	for {
		start := time.Now()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, name, err
		}
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
		if e != nil {
			for k, v := range e.headers {
				req.Header.Set(k, v)
			}
		}
		switch {
		case r.token != "" && (e == nil || e.authThrough):
			req.Header.Set("Authorization", "Bearer "+r.token)
		case e == nil || e == r.proxy:
			if err := r.auth.Authorize(ctx, req); err != nil {
				return nil, name, fmt.Errorf("authorize: %w: %w", ErrUnauthorized, err)
			}
		case e.authThrough:
			// The mirror gets the origin's credentials: authorize a request
			// to the origin and pass its header on.
			oreq, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.base+"/v2/", nil)
			if err := r.auth.Authorize(ctx, oreq); err != nil {
				return nil, name, fmt.Errorf("authorize: %w: %w", ErrUnauthorized, err)
			}
			if h := oreq.Header.Get("Authorization"); h != "" {
				req.Header.Set("Authorization", h)
			}
		default:
			// A mirror without auth_through answers its own challenges.
			if err := r.auth.Authorize(ctx, req); err != nil {
				return nil, name, fmt.Errorf("authorize: %w: %w", ErrUnauthorized, err)
			}
		}
		resp, err := client.Do(req)
		if err != nil {
			return nil, name, err
		}
		if resp.StatusCode == http.StatusUnauthorized && r.token == "" && len(responses) < 2 {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			responses = append(responses, resp)
			r.hooks.request(name, 0, time.Since(start), errors.New("401"))
			if err := r.auth.AddResponses(ctx, responses); err != nil {
				return nil, name, fmt.Errorf("%w: %w", ErrUnauthorized, err)
			}
			continue
		}
		if err := checkAnswer(resp, off); err != nil {
			resp.Body.Close()
			return nil, name, err
		}
		return resp, name, nil
	}
}

// readBody reads a ranged GET's answer for off into p.
func readBody(resp *http.Response, p []byte, off int64) error {
	defer resp.Body.Close()
	if err := checkAnswer(resp, off); err != nil {
		return err
	}
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return fmt.Errorf("reading body: %w", unexpected(err))
	}
	return nil
}

// checkAnswer checks a ranged GET's answer and positions its body at off.
func checkAnswer(resp *http.Response, off int64) error {
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if cr := resp.Header.Get("Content-Range"); cr != "" {
			// "bytes <first>-<last>/<size>": the server must start where asked.
			var first int64 = -1
			if s, ok := strings.CutPrefix(cr, "bytes "); ok {
				if a, _, ok := strings.Cut(s, "-"); ok {
					first, _ = strconv.ParseInt(a, 10, 64)
				}
			}
			if first != off {
				return fmt.Errorf("server answered range %q for offset %d", cr, off)
			}
		}
	case http.StatusOK:
		// The server ignored Range: skip to off.
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			return fmt.Errorf("skipping to %d of a full response: %w", off, unexpected(err))
		}
	default:
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		se := &statusError{code: resp.StatusCode, msg: strings.TrimSpace(string(msg))}
		switch resp.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("%w (check auth / registry_token): %w", ErrUnauthorized, se)
		case http.StatusNotFound:
			return fmt.Errorf("%w: %w", ErrNotFound, se)
		case http.StatusRequestedRangeNotSatisfiable:
			return fmt.Errorf("%w: %w", errRange, se)
		}
		return se
	}
	return nil
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Size implements Backend with a HEAD request to the origin.
func (r *Registry) Size(ctx context.Context, id string) (int64, error) {
	ctx = docker.ContextWithAppendPullRepositoryScope(ctx, r.cfg.Repo)
	u := r.base + r.blobPath(id)
	var responses []*http.Response
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodHead, u, nil)
		if err != nil {
			return 0, err
		}
		if r.token != "" {
			req.Header.Set("Authorization", "Bearer "+r.token)
		} else if err := r.auth.Authorize(ctx, req); err != nil {
			return 0, fmt.Errorf("registry backend: blob %s: %w: %w", id, ErrUnauthorized, err)
		}
		resp, err := r.client.Do(req)
		if err != nil {
			return 0, fmt.Errorf("registry backend: blob %s: %w", id, err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusUnauthorized && r.token == "" && len(responses) < 2 {
			responses = append(responses, resp)
			if err := r.auth.AddResponses(ctx, responses); err != nil {
				return 0, fmt.Errorf("registry backend: blob %s: %w: %w", id, ErrUnauthorized, err)
			}
			continue
		}
		switch {
		case resp.StatusCode == http.StatusOK && resp.ContentLength >= 0:
			return resp.ContentLength, nil
		case resp.StatusCode == http.StatusNotFound:
			return 0, fmt.Errorf("registry backend: blob %s: %w", id, ErrNotFound)
		case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
			return 0, fmt.Errorf("registry backend: blob %s: %w (HTTP %d)", id, ErrUnauthorized, resp.StatusCode)
		}
		return 0, fmt.Errorf("registry backend: blob %s: HEAD: HTTP %d", id, resp.StatusCode)
	}
}

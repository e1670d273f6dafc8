// Package registrytest runs a real OCI registry (Debian's docker-registry,
// the CNCF distribution server) for tests: on 127.0.0.1, a free port, a
// temporary storage directory, optional htpasswd auth, optionally as a
// pull-through cache of another registry.
package registrytest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Options configures a registry.
type Options struct {
	// User and Password turn on htpasswd (basic) auth.
	User, Password string
	// Token makes User/Password auth go through a bearer-token service
	// (an in-process token server issuing ES256 JWTs the registry trusts)
	// instead of htpasswd.
	Token bool
	// Remote makes it a pull-through cache of this registry URL, logging
	// in with RemoteUser/RemotePassword.
	Remote, RemoteUser, RemotePassword string
}

// Registry is a running docker-registry.
type Registry struct {
	Addr string // host:port
	URL  string // http://host:port
	dir  string
	opts Options
	cmd  *exec.Cmd
	done chan struct{}
	ts   *tokenServer
}

// Binary is the registry executable.
const Binary = "/usr/bin/docker-registry"

// Start starts a registry and stops it when the test ends.
func Start(t testing.TB, opts Options) *Registry {
	t.Helper()
	if _, err := os.Stat(Binary); err != nil {
		t.Fatalf("%s not installed (Debian package docker-registry; run .ci/deps): %v", Binary, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	r := &Registry{Addr: addr, URL: "http://" + addr, dir: t.TempDir(), opts: opts}
	if opts.Token {
		ts, err := newTokenServer(r.dir, opts.User, opts.Password)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ts.srv.Close)
		r.ts = ts
	}
	if err := r.writeConfig(); err != nil {
		t.Fatal(err)
	}
	if err := r.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	return r
}

func (r *Registry) writeConfig() error {
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(r.dir, "data"), r.Addr)
	if r.ts != nil {
		cfg += fmt.Sprintf("auth:\n  token:\n    realm: %s/token\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n",
			r.ts.srv.URL, tokenService, tokenIssuer, r.ts.certPath)
	} else if r.opts.User != "" {
		out, err := exec.Command("htpasswd", "-Bbn", r.opts.User, r.opts.Password).Output()
		if err != nil {
			return fmt.Errorf("htpasswd (Debian apache2-utils): %w", err)
		}
		if err := os.WriteFile(filepath.Join(r.dir, "htpasswd"), out, 0o600); err != nil {
			return err
		}
		cfg += fmt.Sprintf("auth:\n  htpasswd:\n    realm: test\n    path: %s\n", filepath.Join(r.dir, "htpasswd"))
	}
	if r.opts.Remote != "" {
		cfg += fmt.Sprintf("proxy:\n  remoteurl: %s\n", r.opts.Remote)
		if r.opts.RemoteUser != "" {
			cfg += fmt.Sprintf("  username: %s\n  password: %s\n", r.opts.RemoteUser, r.opts.RemotePassword)
		}
	}
	return os.WriteFile(filepath.Join(r.dir, "config.yml"), []byte(cfg), 0o600)
}

func (r *Registry) start() error {
	logf, err := os.OpenFile(filepath.Join(r.dir, "registry.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(Binary, "serve", filepath.Join(r.dir, "config.yml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start registry: %w", err)
	}
	r.cmd, r.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(r.done) }()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(r.URL + "/v2/")
		if err == nil {
			resp.Body.Close()
			return nil
		}
		select {
		case <-r.done:
			log, _ := os.ReadFile(filepath.Join(r.dir, "registry.log"))
			return fmt.Errorf("registry exited: %s", log)
		case <-time.After(50 * time.Millisecond):
		}
	}
	r.Stop()
	return fmt.Errorf("registry on %s did not come up", r.Addr)
}

// Stop kills the registry: SIGTERM, then SIGKILL after 2s.
func (r *Registry) Stop() {
	if r.cmd == nil {
		return
	}
	pgid := r.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(2 * time.Second):
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-r.done
	}
	r.cmd = nil
}

// Kill kills the registry at once (SIGKILL), as a crash would.
func (r *Registry) Kill() {
	if r.cmd == nil {
		return
	}
	syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
	<-r.done
	r.cmd = nil
}

// Restart starts a stopped registry again on the same address and data.
func (r *Registry) Restart(t testing.TB) {
	t.Helper()
	if r.cmd != nil {
		t.Fatal("registry still running")
	}
	var err error
	for range 50 { // the port may linger briefly
		if err = r.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal(err)
}

// Log returns the registry's log.
func (r *Registry) Log() string {
	b, _ := os.ReadFile(filepath.Join(r.dir, "registry.log"))
	return string(b)
}

// PushBlob uploads data to repo with the distribution API (POST + PUT)
// and returns its hex sha256.
func (r *Registry) PushBlob(t testing.TB, repo string, data []byte) string {
	t.Helper()
	sum := sha256.Sum256(data)
	id := hex.EncodeToString(sum[:])
	req, _ := http.NewRequest(http.MethodPost, r.URL+"/v2/"+repo+"/blobs/uploads/", nil)
	r.auth(req)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload: HTTP %d", resp.StatusCode)
	}
	loc, err := resp.Location()
	if err != nil {
		t.Fatal(err)
	}
	q := loc.Query()
	q.Set("digest", "sha256:"+id)
	loc.RawQuery = q.Encode()
	req, _ = http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(data))
	req.ContentLength = int64(len(data))
	req.Header.Set("Content-Type", "application/octet-stream")
	r.auth(req)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("put blob: HTTP %d: %s", resp.StatusCode, msg)
	}
	return id
}

func (r *Registry) auth(req *http.Request) {
	if r.ts != nil {
		tok, _ := r.ts.mint(r.opts.User, []string{"repository:" + strings.TrimPrefix(strings.SplitN(req.URL.Path, "/blobs/", 2)[0], "/v2/") + ":pull,push"})
		req.Header.Set("Authorization", "Bearer "+tok)
		return
	}
	if r.opts.User != "" {
		req.SetBasicAuth(r.opts.User, r.opts.Password)
	}
}

// CPUTime returns the CPU time (user + system) the running registry
// process has used so far, for benchmarks that compare whole-system cost
// on a shared machine; 0 if it is not running.
func (r *Registry) CPUTime() time.Duration {
	if r.cmd == nil {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", r.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// Fields after the parenthesised command name: utime and stime are
	// the 12th and 13th, in clock ticks (100 per second on Linux).
	s := string(b)
	fs := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fs) < 13 {
		return 0
	}
	var ticks int64
	for _, f := range fs[11:13] {
		var n int64
		fmt.Sscan(f, &n)
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond
}

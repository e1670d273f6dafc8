package main

// Kata Containers' virtio-fs-nydus mode replayed against the real rafsd
// binary: the arguments, API calls and bodies of kata-containers'
// src/runtime/virtcontainers/nydusd.go, in the order the shim makes them.
// The guest side (QEMU mounting the tag) is testbed's
// TestRafsdVirtioFSKata.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/internal/testutil"
)

// kataBins builds rafsd and rafs-image once for this file's tests.
var kataBins struct {
	once sync.Once
	dir  string
	err  error
}

func kataBinary(t *testing.T, name string) string {
	t.Helper()
	kataBins.once.Do(func() {
		dir, err := os.MkdirTemp("", "rafsd-kata-bin")
		if err != nil {
			kataBins.err = err
			return
		}
		kataBins.dir = dir
		cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/rafsd/rafsd/cmd/rafsd", "github.com/rafsd/rafsd/cmd/rafs-image")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			kataBins.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if kataBins.err != nil {
		t.Fatal(kataBins.err)
	}
	return filepath.Join(kataBins.dir, name)
}

// kataClient talks to the API socket the way Kata's NydusClient does:
// success is exactly 204, anything else must be a JSON {"code","message"}
// body.
type kataClient struct{ hc *http.Client }

var errKataSocket = errors.New("API socket not ready after 3 stat()s 100 ms apart")

// newKataClient is Kata's NewNydusClient: it stats the socket up to 3
// times 100 ms apart before building the transport.
func newKataClient(sock string) (*kataClient, error) {
	var err error
	for i := 0; i < 3; i++ {
		if i > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		if _, err = os.Stat(sock); err == nil {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errKataSocket, err)
	}
	tr := &http.Transport{
		MaxIdleConns:          10,
		IdleConnTimeout:       10 * time.Second,
		ExpectContinueTimeout: time.Second,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			d := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 5 * time.Second}
			return d.DialContext(ctx, "unix", sock)
		},
	}
	return &kataClient{hc: &http.Client{Timeout: 30 * time.Second, Transport: tr}}, nil
}

// kataAPIPatience is the least time Kata's waitKataAPIReady waits for a
// socket that never appears: 20 attempts of 3 stat()s 100 ms apart, 20 ms
// between attempts (retry-go's backoff and jitter only add to it).
const kataAPIPatience = 20*200*time.Millisecond + 19*20*time.Millisecond

// waitKataAPIReady is Kata's nydusd.waitUntilNydusAPIServerReady, run
// right after the daemon is started: up to 20 attempts (retry-go, 20 ms
// base delay) of NewNydusClient plus GET /api/v1/daemon until the state
// is RUNNING. The delay is kept fixed at its base, retry-go's backoff only
// waits longer, so a daemon passing this passes Kata.
func waitKataAPIReady(sock string) (*kataClient, error) {
	var err error
	for i := 0; i < 20; i++ {
		if i > 0 {
			time.Sleep(20 * time.Millisecond)
		}
		var c *kataClient
		if c, err = newKataClient(sock); err != nil {
			continue
		}
		var info kataDaemonInfo
		if info, err = c.checkStatus(); err != nil {
			continue
		}
		if info.State == "RUNNING" {
			return c, nil
		}
		err = fmt.Errorf("daemon state %q, want RUNNING", info.State)
	}
	return nil, fmt.Errorf("API server not ready after 20 attempts: %w", err)
}

type kataDaemonInfo struct {
	ID      string `json:"id"`
	Version struct {
		PackageVer string `json:"package_ver"`
		GitCommit  string `json:"git_commit"`
		BuildTime  string `json:"build_time"`
		Profile    string `json:"profile"`
		Rustc      string `json:"rustc"`
	} `json:"version"`
	State string `json:"state"`
}

func (c *kataClient) checkStatus() (kataDaemonInfo, error) {
	var info kataDaemonInfo
	resp, err := c.hc.Get("http://unix/api/v1/daemon")
	if err != nil {
		return info, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return info, err
	}
	return info, json.Unmarshal(b, &info)
}

// kataMountBody is Kata's MountRequest, fields in its order.
type kataMountBody struct {
	FsType string `json:"fs_type"`
	Source string `json:"source"`
	Config string `json:"config"`
}

// kataAPIError is a non-204 answer: its status and the decoded JSON body.
type kataAPIError struct {
	Status  int
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *kataAPIError) Error() string { return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message) }

// do sends a request with Kata's URL form (the mountpoint is not escaped)
// and returns nil on 204 or a *kataAPIError; a body that is not the JSON
// error Kata parses is an error of its own.
func (c *kataClient) do(method, mountpoint string, body []byte) error {
	url := "http://unix/api/v1/mount?mountpoint=" + mountpoint
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNoContent {
		return nil
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	e := &kataAPIError{Status: resp.StatusCode}
	if err := json.Unmarshal(b, e); err != nil {
		return fmt.Errorf("status %d with a body Kata cannot parse (%v): %q", resp.StatusCode, err, b)
	}
	return e
}

func (c *kataClient) mount(mountpoint, fsType, source, config string) error {
	b, _ := json.Marshal(kataMountBody{FsType: fsType, Source: source, Config: config})
	return c.do(http.MethodPost, mountpoint, b)
}

func (c *kataClient) umount(mountpoint string) error {
	return c.do(http.MethodDelete, mountpoint, nil)
}

// kataDaemon is rafsd started as Kata starts nydusd.
type kataDaemon struct {
	cmd    *exec.Cmd
	out    *testutil.SyncBuffer
	exited chan struct{}
	err    error
}

// startKataDaemon runs `rafsd --log-level info --apisock A --sock S
// [extra...]`: no subcommand, as nydusd.go's args() builds it.
func startKataDaemon(t *testing.T, apisock, sock string, extra ...string) *kataDaemon {
	t.Helper()
	args := append([]string{"--log-level", "info", "--apisock", apisock, "--sock", sock}, extra...)
	cmd := exec.Command(kataBinary(t, "rafsd"), args...)
	d := &kataDaemon{cmd: cmd, out: &testutil.SyncBuffer{}, exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.out, d.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.err = cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		select {
		case <-d.exited:
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.exited:
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				<-d.exited
			}
		}
		if t.Failed() {
			t.Logf("rafsd output:\n%s", d.out)
		}
	})
	return d
}

// vhostUserGetFeatures is a minimal front end: it sends
// VHOST_USER_GET_FEATURES on c and returns the reply's feature bits.
func vhostUserGetFeatures(c net.Conn) (uint64, error) {
	var msg [12]byte
	binary.LittleEndian.PutUint32(msg[0:], 1)   // VHOST_USER_GET_FEATURES
	binary.LittleEndian.PutUint32(msg[4:], 0x1) // version 1
	if _, err := c.Write(msg[:]); err != nil {
		return 0, err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var reply [20]byte
	if _, err := io.ReadFull(c, reply[:]); err != nil {
		return 0, err
	}
	if req, flags, size := binary.LittleEndian.Uint32(reply[0:]), binary.LittleEndian.Uint32(reply[4:]), binary.LittleEndian.Uint32(reply[8:]); req != 1 || flags&0x4 == 0 || size != 8 {
		return 0, fmt.Errorf("bad GET_FEATURES reply header: request %d flags %#x size %d", req, flags, size)
	}
	return binary.LittleEndian.Uint64(reply[12:]), nil
}

// TestKataVirtioFSNydus replays a Kata sandbox's life against rafsd:
// start with Kata's arguments, the shared dir mounted before the VMM
// connects, daemon state, a container image mounted and unmounted, Kata's
// rejected requests answered with JSON errors, and SIGTERM ending the
// daemon with status 0 inside Kata's 5 s grace while a front end is still
// connected.
func TestKataVirtioFSNydus(t *testing.T) {
	imgDir := t.TempDir()
	src, boot, blobs := filepath.Join(imgDir, "src"), filepath.Join(imgDir, "bootstrap"), filepath.Join(imgDir, "blobs")
	for p, data := range map[string]string{"etc/os-release": "ID=kata-test\n", "bin/app": strings.Repeat("x", 300000)} {
		if err := os.MkdirAll(filepath.Join(src, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, p), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(kataBinary(t, "rafs-image"), "create", "--bootstrap", boot, "--blob-dir", blobs, src).CombinedOutput(); err != nil {
		t.Fatalf("rafs-image create: %v\n%s", err, out)
	}
	// The config nydus-snapshotter hands Kata in the extraoption: a full
	// nydusd JSON config, passed on as a string.
	cfgBytes, _ := json.Marshal(map[string]any{
		"device": map[string]any{"backend": map[string]any{"type": "localfs", "config": map[string]any{"dir": blobs}}},
		"mode":   "direct", "digest_validate": true,
	})
	config := string(cfgBytes)

	// Kata's sandbox dir: /run/vc/vm/<sandbox>/{nydusd-api.sock,vhost-fs.sock}
	// and the shared dir /run/kata-containers/shared/sandboxes/<sandbox>/shared.
	run := t.TempDir()
	apisock, sock := filepath.Join(run, "nydusd-api.sock"), filepath.Join(run, "vhost-fs.sock")
	shared := filepath.Join(run, "shared")
	if err := os.Mkdir(shared, 0o750); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	d := startKataDaemon(t, apisock, sock, kataExtraArgs(t)...)
	// Start() -> waitUntilNydusAPIServerReady() -> setupShareDirFn(): the
	// client waits for the API as Kata does and mounts the shared dir
	// right away.
	c, err := waitKataAPIReady(apisock)
	if err != nil {
		t.Fatalf("%v (after %s)", err, time.Since(start).Round(time.Millisecond))
	}
	t.Logf("API socket ready %s after start", time.Since(start).Round(time.Millisecond))
	if err := c.mount("/containers", "passthrough_fs", shared, ""); err != nil {
		t.Fatalf("mount passthrough_fs: %v", err)
	}
	info, err := c.checkStatus()
	if err != nil {
		t.Fatal(err)
	}
	if info.State != "RUNNING" || info.Version.PackageVer == "" {
		t.Fatalf("GET /api/v1/daemon: %+v, want state RUNNING and a package_ver", info)
	}
	// The vhost-user socket is up for QEMU, which connects after the
	// shared dir is mounted; this front end stays connected to the end.
	fe, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("vhost-user socket: %v", err)
	}
	defer fe.Close()
	feats, err := vhostUserGetFeatures(fe)
	if err != nil {
		t.Fatalf("vhost-user GET_FEATURES: %v", err)
	}
	if feats&(1<<32) == 0 || feats&(1<<30) == 0 {
		t.Fatalf("features %#x lack VIRTIO_F_VERSION_1 or VHOST_USER_F_PROTOCOL_FEATURES", feats)
	}
	// The device answers, so it logged its start. The extra args took effect (--thread-num is the per-queue workers).
	if out := d.out.String(); !strings.Contains(out, "serving virtio-fs") || !strings.Contains(out, "workers=8") {
		t.Errorf("rafsd did not log serving virtio-fs with 8 workers:\n%s", out)
	}

	const cid = "3c5e0f2d9a1b-ctr"
	lower := "/rafs/" + cid + "/lowerdir"
	if err := c.mount(lower, "rafs", boot, config); err != nil {
		t.Fatalf("mount rafs at %s: %v", lower, err)
	}

	// What Kata's callers can get wrong, each answered with Kata's JSON
	// error and without disturbing the mounts.
	bad := []struct {
		name             string
		method, mp, body string
		status           int
	}{
		{"not JSON", http.MethodPost, "/rafs/x/lowerdir", `{"fs_type":`, 400},
		{"empty body", http.MethodPost, "/rafs/x/lowerdir", ``, 400},
		{"unknown fs_type", http.MethodPost, "/rafs/x/lowerdir", `{"fs_type":"ext4","source":"/","config":""}`, 400},
		{"missing bootstrap", http.MethodPost, "/rafs/x/lowerdir", mustJSON(kataMountBody{"rafs", filepath.Join(run, "nope"), config}), 400},
		{"config not JSON", http.MethodPost, "/rafs/x/lowerdir", mustJSON(kataMountBody{"rafs", boot, "{"}), 400},
		{"empty config", http.MethodPost, "/rafs/x/lowerdir", mustJSON(kataMountBody{"rafs", boot, ""}), 400},
		{"shared dir missing", http.MethodPost, "/other", mustJSON(kataMountBody{"passthrough_fs", filepath.Join(run, "nope"), ""}), 400},
		{"mounted twice", http.MethodPost, lower, mustJSON(kataMountBody{"rafs", boot, config}), 409},
		{"no mountpoint", http.MethodPost, "", mustJSON(kataMountBody{"rafs", boot, config}), 400},
		{"umount unknown", http.MethodDelete, "/rafs/unknown/lowerdir", "", 404},
	}
	for _, tc := range bad {
		var body []byte
		if tc.body != "" || tc.method == http.MethodPost {
			body = []byte(tc.body)
		}
		err := c.do(tc.method, tc.mp, body)
		var ae *kataAPIError
		if !errors.As(err, &ae) {
			t.Errorf("%s: want a JSON error, got %v", tc.name, err)
			continue
		}
		if ae.Status != tc.status || ae.Code == "" || ae.Message == "" {
			t.Errorf("%s: got %v, want status %d with a code and message", tc.name, ae, tc.status)
		}
	}

	mounts := listMounts(t, c)
	if mounts["/containers"] != "passthrough_fs" || mounts[lower] != "rafs" || len(mounts) != 2 {
		t.Fatalf("mounts after the bad requests: %v", mounts)
	}
	if err := c.umount(lower); err != nil {
		t.Fatalf("umount %s: %v", lower, err)
	}
	if m := listMounts(t, c); len(m) != 1 || m["/containers"] == "" {
		t.Fatalf("mounts after umount: %v", m)
	}
	if info, err := c.checkStatus(); err != nil || info.State != "RUNNING" {
		t.Fatalf("state after umount: %+v %v", info, err)
	}

	// Stop(): SIGTERM and 5 s grace, the front end still connected.
	stopAt := time.Now()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.exited:
	case <-time.After(5 * time.Second):
		t.Fatalf("rafsd still running 5 s after SIGTERM (Kata would kill it)")
	}
	if d.err != nil {
		t.Fatalf("rafsd exit after SIGTERM: %v, want status 0", d.err)
	}
	t.Logf("SIGTERM to exit: %s", time.Since(stopAt).Round(time.Millisecond))
	for _, p := range []string{apisock, sock} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left behind after exit", p)
		}
	}
	// Kata logs the daemon's output line by line: every line is a
	// structured record (the standard log package goes through slog too).
	for _, line := range strings.Split(strings.TrimSpace(d.out.String()), "\n") {
		if !strings.HasPrefix(line, "time=") {
			t.Errorf("unstructured output line: %q", line)
		}
	}
}

// TestVirtiofsArgs: command lines the virtio-fs mode refuses, with a
// message and a non-zero exit rather than a daemon that serves nothing.
func TestVirtiofsArgs(t *testing.T) {
	dir := t.TempDir()
	sock, api := filepath.Join(dir, "vfs.sock"), filepath.Join(dir, "api.sock")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no sock", []string{"virtiofs", "--apisock", api}, "--sock is required"},
		{"sock and mountpoint", []string{"virtiofs", "--sock", sock, "--mountpoint", dir}, "exclusive"},
		{"upgrade", []string{"virtiofs", "--sock", sock, "--upgrade", "--supervisor", filepath.Join(dir, "sup")}, "not supported"},
		{"sock in a missing dir", []string{"--sock", filepath.Join(dir, "nope", "vfs.sock")}, "vhost-user socket"},
		{"bad thread-num", []string{"--sock", sock, "--thread-num", "0"}, "--thread-num"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(kataBinary(t, "rafsd"), tc.args...)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("rafsd %v: %v, want a non-zero exit\n%s", tc.args, err, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Fatalf("rafsd %v output lacks %q:\n%s", tc.args, tc.want, out)
			}
		})
	}
}

// kataExtraArgs returns virtio_fs_extra_args of the shipped Kata config
// snippet, so the replay starts rafsd as that config would.
func kataExtraArgs(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../../configs/kata/configuration-qemu.toml")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.TrimSpace(k) != "virtio_fs_extra_args" {
			continue
		}
		// A TOML array of basic strings is also a JSON array.
		var args []string
		if err := json.Unmarshal([]byte(strings.TrimSpace(v)), &args); err != nil {
			t.Fatalf("virtio_fs_extra_args: %v", err)
		}
		return args
	}
	t.Fatal("configs/kata/configuration-qemu.toml has no virtio_fs_extra_args")
	return nil
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// listMounts returns mountpoint -> fs_type from GET /api/v1/daemon's
// backend_collection (what nydus-snapshotter reads).
func listMounts(t *testing.T, c *kataClient) map[string]string {
	t.Helper()
	resp, err := c.hc.Get("http://unix/api/v1/daemon")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var info struct {
		Backends map[string]struct {
			FsType string `json:"fs_type"`
		} `json:"backend_collection"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for mp, b := range info.Backends {
		out[mp] = b.FsType
	}
	return out
}

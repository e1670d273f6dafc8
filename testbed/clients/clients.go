// Package clients brings up the real clients that drive nydusd in
// production — containerd, nydus-snapshotter and runc — around rafsd, for
// tests: containerd from Debian with its own root, state and socket under a
// temporary directory (never the system's), nydus-snapshotter built once from
// the Go module proxy and cached, and both wired together through a proxy
// snapshotter plugin named "nydus".
//
// Every process started here is killed when the test ends (SIGTERM, then
// SIGKILL), and every mount left under the test's directory is lazily
// unmounted.
//
// The tests run the same files through runc from an OCI image on overlayfs
// and from its RAFS conversion on nydus-snapshotter + rafsd (dedicated and
// shared daemons, failover after SIGKILL). BenchmarkColdStartClients times
// a cold start through the whole stack, from containerd's pull to the
// container's first line of output, with the registry behind a
// bandwidth-capped proxy (internal/capproxy): `make bench-coldstart`.
package clients

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// SnapshotterVersion is the nydus-snapshotter release the tests pin.
const SnapshotterVersion = "v0.16.1"

// CacheDir holds binaries built for the tests, outside the repository
// ($RAFSD_CLIENTS_CACHE overrides it).
var CacheDir = cmp.Or(os.Getenv("RAFSD_CLIENTS_CACHE"), "/var/cache/rafsd-testbed/clients")

// Binaries of the stack under test.
const (
	Containerd = "/usr/bin/containerd"
	Runc       = "/usr/sbin/runc"
)

// moduleRoot is the rafsd module's root directory.
func moduleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		t.Fatal("not inside the rafsd module")
	}
	return filepath.Dir(mod)
}

// BuildRafs builds bin/rafsd and bin/rafs-image of this tree into dir and
// returns their paths. $RAFSD_CLIENTS_BIN names a directory with both
// already built instead, to compare builds (another commit, say) on the
// same stack.
func BuildRafs(t testing.TB, dir string) (rafsd, rafsImage string) {
	t.Helper()
	if bin := os.Getenv("RAFSD_CLIENTS_BIN"); bin != "" {
		rafsd, rafsImage = filepath.Join(bin, "rafsd"), filepath.Join(bin, "rafs-image")
		for _, b := range []string{rafsd, rafsImage} {
			if _, err := os.Stat(b); err != nil {
				t.Fatalf("RAFSD_CLIENTS_BIN=%s: %v", bin, err)
			}
		}
		return rafsd, rafsImage
	}
	root := moduleRoot(t)
	rafsd, rafsImage = filepath.Join(dir, "rafsd"), filepath.Join(dir, "rafs-image")
	cmd := exec.Command("go", "build", "-o", dir+"/", "./cmd/rafsd", "./cmd/rafs-image")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building rafsd and rafs-image: %v\n%s", err, out)
	}
	return rafsd, rafsImage
}

// SnapshotterBinary returns containerd-nydus-grpc at SnapshotterVersion,
// building it on first use: `go install` refuses the module (its go.mod has
// exclude directives), so the module is downloaded and built in a writable
// copy. The binary is cached under CacheDir, keyed by version.
func SnapshotterBinary(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(CacheDir, "nydus-snapshotter-"+SnapshotterVersion)
	bin := filepath.Join(dir, "containerd-nydus-grpc")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// One builder at a time: parallel test binaries share the cache.
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	out, err := exec.Command("go", "mod", "download", "-json", "github.com/containerd/nydus-snapshotter@"+SnapshotterVersion).Output()
	if err != nil {
		t.Fatalf("go mod download nydus-snapshotter: %v", err)
	}
	var mod struct{ Dir, Error string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download nydus-snapshotter: %s (%v)", out, err)
	}
	src := t.TempDir()
	if out, err := exec.Command("cp", "-r", mod.Dir+"/.", src).CombinedOutput(); err != nil {
		t.Fatalf("copy module: %v: %s", err, out)
	}
	if out, err := exec.Command("chmod", "-R", "u+w", src).CombinedOutput(); err != nil {
		t.Fatalf("chmod module copy: %v: %s", err, out)
	}
	t.Logf("building nydus-snapshotter %s (first run; cached in %s)", SnapshotterVersion, dir)
	cmd := exec.Command("go", "build", "-o", bin+".tmp", "./cmd/containerd-nydus-grpc")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building nydus-snapshotter: %v\n%s", err, out)
	}
	if err := os.Rename(bin+".tmp", bin); err != nil {
		t.Fatal(err)
	}
	return bin
}

// Proc is a process started by the harness.
type Proc struct {
	Cmd  *exec.Cmd
	Log  string
	done chan struct{}
}

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// start runs argv in its own process group with output in logName, and
// kills the whole group when the test ends: children it spawned (rafsd
// daemons, shims) go with it.
func start(t testing.TB, logName string, argv ...string) *Proc {
	t.Helper()
	logf, err := os.Create(logName)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", argv[0], err)
	}
	p := &Proc{Cmd: cmd, Log: logName, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.Stop(5 * time.Second) })
	return p
}

// Stop sends SIGTERM to the process group, then SIGKILL after grace.
func (p *Proc) Stop(grace time.Duration) {
	pgid := p.Cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
	// Whatever is left in the group (a shim that outlived its parent).
	syscall.Kill(-pgid, syscall.SIGKILL)
}

// Tail returns the last n bytes of the process log, for failure messages.
func (p *Proc) Tail(n int) string {
	b, _ := os.ReadFile(p.Log)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func waitSocket(t testing.TB, p *Proc, sock string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		if p.Exited() {
			t.Fatalf("%s exited before listening on %s:\n%s", p.Cmd.Path, sock, p.Tail(4000))
		}
	}
	t.Fatalf("%s did not listen on %s within %v:\n%s", p.Cmd.Path, sock, timeout, p.Tail(4000))
}

// SnapshotterConfig is what the tests vary in nydus-snapshotter's config.
type SnapshotterConfig struct {
	DaemonMode    string // "dedicated" or "shared"
	RecoverPolicy string // "none", "restart" or "failover"
	Rafsd         string // nydusd_path
	RafsImage     string // nydusimage_path
	// PlainHTTP makes rafsd talk HTTP to the registry.
	PlainHTTP bool
	// FsPrefetch is the "fs_prefetch" object of rafsd's config as JSON;
	// empty turns prefetch off.
	FsPrefetch string
}

// Stack is a running containerd + nydus-snapshotter.
type Stack struct {
	Dir         string // everything lives under here
	Address     string // containerd's socket
	SnapRoot    string // the snapshotter's root
	Containerd  *Proc
	Snapshotter *Proc
}

// StartStack starts nydus-snapshotter and a containerd that uses it as the
// "nydus" proxy snapshotter. Socket paths must stay under 108 bytes, so the
// directory is a short one under /tmp rather than t.TempDir.
func StartStack(t testing.TB, sc SnapshotterConfig) *Stack {
	t.Helper()
	for _, b := range []string{Containerd, Runc, "/usr/bin/containerd-shim-runc-v2"} {
		if _, err := os.Stat(b); err != nil {
			t.Fatalf("%s missing (Debian packages containerd and runc; run .ci/deps): %v", b, err)
		}
	}
	snapBin := SnapshotterBinary(t)
	dir, err := os.MkdirTemp("", "rc")
	if err != nil {
		t.Fatal(err)
	}
	s := &Stack{Dir: dir, Address: filepath.Join(dir, "ctd.sock"), SnapRoot: filepath.Join(dir, "ns")}
	// Registered first, so it runs last: after both daemons are dead.
	t.Cleanup(func() {
		// Shims detach from containerd (own session): find them by the
		// address they were given.
		for _, pid := range shimsOf(s.Address) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		UnmountUnder(t, dir)
		os.RemoveAll(dir)
	})

	scheme := "https"
	if sc.PlainHTTP {
		scheme = "http"
	}
	nydusdCfg := fmt.Sprintf(`{
  "device": {
    "backend": {"type": "registry", "config": {"scheme": %q, "timeout": 5, "connect_timeout": 5, "retry_limit": 2}},
    "cache": {"type": "blobcache"}
  },
  "mode": "direct",
  "digest_validate": true,
  "iostats_files": false,
  "enable_xattr": true,
  "fs_prefetch": %s
}
`, scheme, cmp.Or(sc.FsPrefetch, `{"enable": false}`))
	nydusdCfgPath := filepath.Join(dir, "nydusd.json")
	writeFile(t, nydusdCfgPath, nydusdCfg)
	snapSock := filepath.Join(dir, "ns.sock")
	snapCfg := fmt.Sprintf(`version = 1
root = %q
address = %q
daemon_mode = %q
cleanup_on_close = true

[system]
enable = false

[daemon]
nydusd_config = %q
nydusd_path = %q
nydusimage_path = %q
fs_driver = "fusedev"
recover_policy = %q
threads_number = 2
failover_policy = "resend"

[cgroup]
enable = false

[log]
log_to_stdout = true
level = "debug"

[metrics]
address = ""

[snapshot]
enable_nydus_overlayfs = false
sync_remove = true

[cache_manager]
disable = false
gc_period = "24h"
`, s.SnapRoot, snapSock, sc.DaemonMode, nydusdCfgPath, sc.Rafsd, sc.RafsImage, sc.RecoverPolicy)
	snapCfgPath := filepath.Join(dir, "ns.toml")
	writeFile(t, snapCfgPath, snapCfg)

	ctdCfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.opt"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  level = "debug"

[metrics]
  address = ""

[proxy_plugins.nydus]
  type = "snapshot"
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), s.Address, s.Address+".ttrpc", snapSock)
	ctdCfgPath := filepath.Join(dir, "containerd.toml")
	writeFile(t, ctdCfgPath, ctdCfg)

	s.Snapshotter = start(t, filepath.Join(dir, "snapshotter.log"), snapBin, "--config", snapCfgPath, "--log-to-stdout")
	waitSocket(t, s.Snapshotter, snapSock, 30*time.Second)
	s.Containerd = start(t, filepath.Join(dir, "containerd.log"), Containerd, "--config", ctdCfgPath)
	waitSocket(t, s.Containerd, s.Address, 30*time.Second)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("snapshotter log:\n%s", s.Snapshotter.Tail(12000))
			t.Logf("containerd log:\n%s", s.Containerd.Tail(6000))
			for _, l := range DaemonLogs(s.SnapRoot) {
				b, _ := os.ReadFile(l)
				if len(b) > 6000 {
					b = b[len(b)-6000:]
				}
				t.Logf("%s:\n%s", l, b)
			}
		}
	})
	return s
}

// DaemonLogs lists the nydusd (rafsd) log files under the snapshotter root.
func DaemonLogs(root string) []string {
	var out []string
	walkOutsideMounts(root, func(p string, d fs.DirEntry) {
		if d.Type().IsRegular() && strings.HasSuffix(p, ".log") {
			out = append(out, p)
		}
	})
	return out
}

// walkOutsideMounts calls fn for every entry under root (root itself
// included) but never enters, or stats, a mount point below root: a FUSE
// mount whose daemon was killed while a supervisor still holds the
// session answers nothing, and a lstat of it blocks for good (a failed
// failover test's log dump hung its package until the test binary's
// 40 min timeout). Errors are skipped: this is for diagnostics.
func walkOutsideMounts(root string, fn func(p string, d fs.DirEntry)) {
	mounts := map[string]bool{}
	for _, m := range Mounts(root) {
		mounts[m] = true
	}
	// WalkDir takes types from the directory listing and opens only the
	// directories it descends into, so a skipped mount point is untouched.
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && p != root && mounts[p] {
			return filepath.SkipDir
		}
		fn(p, d)
		return nil
	})
}

func writeFile(t testing.TB, name, data string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

// Mounts returns the mount points at or under dir, deepest last.
func Mounts(dir string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b bytes.Buffer
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// UnmountUnder lazily unmounts everything mounted under dir, deepest first.
func UnmountUnder(t testing.TB, dir string) {
	ms := Mounts(dir)
	for i := len(ms) - 1; i >= 0; i-- {
		if err := unix.Unmount(ms[i], unix.MNT_DETACH); err != nil {
			t.Logf("unmount %s: %v", ms[i], err)
		}
	}
}

// ProcsOf returns the pids of running processes whose executable is bin.
func ProcsOf(bin string) []int {
	var out []int
	for _, pid := range procsNamed(filepath.Base(bin)) {
		exe, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(pid), "exe"))
		if err != nil {
			continue
		}
		if strings.TrimSuffix(exe, " (deleted)") == bin {
			out = append(out, pid)
		}
	}
	return out
}

// procsNamed returns the pids of live (not zombie) processes whose command
// name (comm, at most 15 bytes) is the start of name. It reads only
// /proc/PID/status: readlink of exe, cmdline or stat block for as long as a
// process is stuck in the kernel (a FUSE server wedged on its own mount
// while exiting, say), and such a process may belong to anyone on the
// machine.
func procsNamed(name string) []int {
	if len(name) > 15 {
		name = name[:15]
	}
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		var comm, state string
		for _, l := range strings.SplitN(string(st), "\n", 4) {
			if v, ok := strings.CutPrefix(l, "Name:\t"); ok {
				comm = v
			} else if v, ok := strings.CutPrefix(l, "State:\t"); ok {
				state = v
			}
		}
		// Zombies are gone for our purpose: they hold no mount or fd.
		if comm != name || strings.HasPrefix(state, "Z") {
			continue
		}
		out = append(out, pid)
	}
	return out
}

// WaitNoProcs waits until no process runs bin, or fails the test.
func WaitNoProcs(ctx context.Context, t testing.TB, bin string) {
	t.Helper()
	for {
		pids := ProcsOf(bin)
		if len(pids) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s still running: pids %v", bin, pids)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// shimsOf returns the pids of containerd shims serving the containerd at
// address.
func shimsOf(address string) []int {
	var out []int
	for _, pid := range procsNamed("containerd-shim-runc-v2") {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-address" && args[i+1] == address {
				out = append(out, pid)
			}
		}
	}
	return out
}

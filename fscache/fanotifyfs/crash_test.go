package fanotifyfs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/fanotifyfs/guard"
	"github.com/rafsd/rafsd/internal/testutil"
	"github.com/rafsd/rafsd/rafs/fusedev"

	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/storage"
	"github.com/rafsd/rafsd/rafs/storage/backend"
	"github.com/rafsd/rafsd/rafs/storage/blobcache"
)

const roleEnv = "FANOTIFYFS_TEST_ROLE"

func TestMain(m *testing.M) {
	MaybeRunGuard()
	if os.Getenv(roleEnv) == "daemon" {
		if err := runDaemon(); err != nil {
			fmt.Fprintln(os.Stderr, "daemon:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// daemonState is what the test daemon hands its supervisor with the group
// fd, and gets back after a restart.
type daemonState struct {
	Bootstrap, BlobDir, WorkDir, Mountpoint string
}

// slowBackend delays every read, so that fills are in progress when the
// daemon is killed.
type slowBackend struct {
	backend.Backend
	delay time.Duration
}

func (s slowBackend) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	time.Sleep(s.delay)
	return s.Backend.ReadAt(ctx, id, p, off)
}

// hungBackend never answers: fills wait until the daemon dies.
type hungBackend struct{ backend.Backend }

func (hungBackend) ReadAt(ctx context.Context, id string, p []byte, off int64) error {
	select {}
}

// runDaemon runs RunDaemon with one mount, over a slowed backend; fresh,
// it mounts and hands the group to the supervisor; with takeover, it gets
// the group back and adopts the mount.
func runDaemon() error {
	var st daemonState
	if err := json.Unmarshal([]byte(os.Getenv("FANOTIFYFS_STATE")), &st); err != nil {
		return err
	}
	cfgJSON := configJSON(st.BlobDir, st.WorkDir)
	cfg, err := config.Parse(cfgJSON)
	if err != nil {
		return err
	}
	inner, err := backend.New(cfg.Backend, backend.Hooks{})
	if err != nil {
		return err
	}
	var be backend.Backend = slowBackend{inner, 2 * time.Millisecond}
	if os.Getenv("FANOTIFYFS_HANG") == "1" {
		be = hungBackend{inner}
	}
	// A daemon with many fds open: its events get high fd numbers.
	if n, _ := strconv.Atoi(os.Getenv("FANOTIFYFS_PAD_FDS")); n > 0 {
		for range n {
			if _, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
				return fmt.Errorf("pad fds: %w", err)
			}
		}
	}
	// SIGTERM closes the daemon cleanly (Close).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	return RunDaemon(ctx, DaemonOptions{
		Mounts:         []MountSpec{{Bootstrap: st.Bootstrap, Mountpoint: st.Mountpoint, Config: string(cfgJSON), ReadAheadKB: 256}},
		Supervisor:     os.Getenv("FANOTIFYFS_SUPERVISOR"),
		Upgrade:        os.Getenv("FANOTIFYFS_TAKEOVER") == "1",
		Timeout:        20 * time.Second,
		FetcherOptions: []storage.Option{storage.WithBackend(be)},
		Guard:          os.Getenv("FANOTIFYFS_NO_GUARD") != "1",
		// Every pass of the reader must raise events, complete or not.
		KeepMarks: true,
		Ready: func(s *Server, g *guard.Guard) {
			pid := 0
			if g != nil {
				pid = g.Pid()
			}
			st := s.Stats()
			fmt.Printf("ready guard=%d recovered=%d orphans=%d\n", pid, st.Recovered, st.Orphans)
		},
	})
}

// supervisor keeps the group fd the first daemon sends and hands a copy
// to every later one (the nydus-snapshotter protocol of rafs/fusedev).
type supervisor struct {
	ln    *net.UnixListener
	mu    sync.Mutex
	state []byte
	fd    int
}

func startSupervisor(t *testing.T) *supervisor {
	sock := filepath.Join(t.TempDir(), "supervisor.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	s := &supervisor{ln: ln, fd: -1}
	go func() {
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			s.handle(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		if s.fd >= 0 {
			unix.Close(s.fd)
		}
		s.mu.Unlock()
	})
	return s
}

func (s *supervisor) sock() string { return s.ln.Addr().String() }

func (s *supervisor) handle(c *net.UnixConn) {
	defer c.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd >= 0 { // takeover: send state and a dup of the fd, keep ours
		_ = fusedev.WriteState(c, s.state, s.fd)
		return
	}
	if state, fd, err := fusedev.ReadState(c); err == nil {
		s.state, s.fd = state, fd
	}
}

// describeDiff says where got differs from want and whether the bad
// bytes are zeros (holes read as data).
func describeDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("%d bytes, want %d", len(got), len(want))
	}
	first, last, zeros := -1, -1, true
	for i := range got {
		if got[i] != want[i] {
			if first < 0 {
				first = i
			}
			last = i
			if got[i] != 0 {
				zeros = false
			}
		}
	}
	return fmt.Sprintf("bytes [%d,%d] differ, all zeros: %v", first, last, zeros)
}

type daemonProc struct {
	guard int // pid of its guard, if any
	// recovered and orphans: events of the previous daemon this one
	// filled and allowed, and only denied, as it reported when ready.
	recovered, orphans int
	stderr             string
	cmd                *exec.Cmd
	done               chan struct{}
	killed             atomic.Bool
}

func fileText(f *os.File) string {
	b, _ := os.ReadFile(f.Name())
	return string(b)
}

func startDaemon(t *testing.T, sup *supervisor, st daemonState, takeover bool, env ...string) *daemonProc {
	t.Helper()
	raw, _ := json.Marshal(st)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	sock := ""
	if sup != nil {
		sock = sup.sock()
	}
	cmd.Env = append(os.Environ(), roleEnv+"=daemon", "FANOTIFYFS_SUPERVISOR="+sock, "FANOTIFYFS_STATE="+string(raw))
	if takeover {
		cmd.Env = append(cmd.Env, "FANOTIFYFS_TAKEOVER=1")
	}
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	// A file, not a pipe: Wait would wait for the guard, which inherits it.
	stderr, err := os.CreateTemp(t.TempDir(), "daemon.stderr")
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Registered before the daemon's own cleanups, so it runs after them:
	// whatever guard is left then is a failure to clean up, killed here.
	t.Cleanup(func() {
		for _, pid := range guardsOf(cmd.Process.Pid) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	d := &daemonProc{cmd: cmd, done: make(chan struct{}), stderr: stderr.Name()}
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		ready <- line
		io.Copy(io.Discard, out)
	}()
	go func() {
		err := cmd.Wait()
		if !d.killed.Load() {
			t.Errorf("daemon %d exited on its own: %v\n%s", cmd.Process.Pid, err, fileText(stderr))
		}
		close(d.done)
	}()
	select {
	case line := <-ready:
		if !strings.HasPrefix(line, "ready") {
			d.kill()
			t.Fatalf("daemon did not start: %q\n%s", line, fileText(stderr))
		}
		t.Logf("daemon %d: %s", cmd.Process.Pid, strings.TrimSpace(line))
		fmt.Sscanf(strings.TrimSpace(line), "ready guard=%d recovered=%d orphans=%d", &d.guard, &d.recovered, &d.orphans)
	case <-time.After(30 * time.Second):
		d.kill()
		t.Fatalf("daemon not ready in 30s\n%s", fileText(stderr))
	}
	return d
}

// term stops the daemon with SIGTERM (a clean Close), and reports
// whether it exited within 10s (it is SIGKILLed otherwise).
func (d *daemonProc) term() bool {
	d.killed.Store(true)
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return d.cmd.ProcessState.Success()
	case <-time.After(10 * time.Second):
		d.kill()
		return false
	}
}

func (d *daemonProc) kill() {
	d.killed.Store(true)
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

// The daemon is SIGKILLed and restarted (taking the group over from the
// supervisor) again and again while a reader checks every file of the
// tree: no read ever returns wrong bytes or zeros, and the reader finishes.
// Events a daemon held when killed are answered by its successor: filled
// and allowed from the journal, or, for one caught in the instant between
// read(2) and its journal record, denied with EIO. The reader retries an
// EIO and counts it; every EIO must be such an orphan.
func TestCrashRestartNeverZeros(t *testing.T) {
	fstest.RequireRoot(t)
	src := t.TempDir()
	want := map[string][32]byte{}
	wantData := map[string][]byte{}
	for i := range 24 {
		name := fmt.Sprintf("f%02d", i)
		data := fstest.Bytes(int64(100+i), 1<<20+i*4099)
		os.WriteFile(filepath.Join(src, name), data, 0o644)
		want[name] = sha256.Sum256(data)
		wantData[name] = data
	}
	im := buildImage(t, src, 64<<10)
	sup := startSupervisor(t)
	st := daemonState{Bootstrap: im.boot, BlobDir: im.blobDir, WorkDir: t.TempDir(), Mountpoint: t.TempDir()}

	var mu sync.Mutex
	d := startDaemon(t, sup, st, false)
	t.Cleanup(func() {
		// Unmount while a daemon still serves, then stop it.
		if err := unix.Unmount(st.Mountpoint, 0); err != nil {
			t.Logf("umount: %v; detaching", err)
			unix.Unmount(st.Mountpoint, unix.MNT_DETACH)
		}
		mu.Lock()
		d.kill()
		mu.Unlock()
	})

	var eio, passes, wrong atomic.Int64
	readerDone := make(chan error, 1)
	stop := make(chan struct{})
	go func() {
		readerDone <- func() error {
			for pass := 0; ; pass++ {
				select {
				case <-stop:
					return nil
				default:
				}
				for name, sum := range want {
					p := filepath.Join(st.Mountpoint, name)
					for try := 0; ; try++ {
						data, err := os.ReadFile(p)
						if errors.Is(err, syscall.EIO) && try < 50 {
							eio.Add(1)
							time.Sleep(20 * time.Millisecond)
							continue
						}
						if err != nil {
							return fmt.Errorf("pass %d: %s: %w", pass, name, err)
						}
						if sha256.Sum256(data) != sum {
							wrong.Add(1)
							return fmt.Errorf("pass %d: %s: wrong bytes: %s", pass, name, describeDiff(data, wantData[name]))
						}
						break
					}
					// Drop the file's pages so the next pass raises events again.
					if fh, err := os.Open(p); err == nil {
						unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
						fh.Close()
					}
				}
				passes.Add(1)
			}
		}()
	}()

	const restarts = 5
	var recovered, orphans int
	all := []*daemonProc{d}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range all {
				b, _ := os.ReadFile(p.stderr)
				t.Logf("daemon %d stderr:\n%s", p.cmd.Process.Pid, b)
			}
		}
	})
	for k := range restarts {
		time.Sleep(time.Duration(150+k*60) * time.Millisecond)
		mu.Lock()
		d.kill()
		mu.Unlock()
		time.Sleep(100 * time.Millisecond) // readers now block (the supervisor holds the group)
		nd := startDaemon(t, sup, st, true)
		all = append(all, nd)
		recovered += nd.recovered
		orphans += nd.orphans
		mu.Lock()
		d = nd
		mu.Unlock()
	}
	// Let the reader finish a full pass after the last restart.
	deadline := time.Now().Add(60 * time.Second)
	for p := passes.Load(); passes.Load() < p+2; {
		select {
		case err := <-readerDone:
			t.Fatalf("reader: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("reader made no full pass in 60s after the last restart (%d passes)", passes.Load())
		}
	}
	close(stop)
	if err := <-readerDone; err != nil {
		t.Fatalf("reader: %v", err)
	}
	t.Logf("%d restarts, %d passes over %d files, %d EIO retries, %d wrong reads; successors filled %d held events, denied %d orphans",
		restarts, passes.Load(), len(want), eio.Load(), wrong.Load(), recovered, orphans)
	if wrong.Load() != 0 {
		t.Fatal("wrong bytes read")
	}
	if eio.Load() > int64(orphans) {
		t.Fatalf("%d EIO retries but only %d orphaned events: reads failed that the journal should have saved", eio.Load(), orphans)
	}
}

// A read whose fill is in progress when the daemon is SIGKILLed completes,
// with the right bytes, once the successor takes over: the successor finds
// the event in the dead daemon's journal, fills its range and allows it by
// the fd number the dead daemon saw.
func TestTakeoverCompletesReadInFlight(t *testing.T) {
	fstest.RequireRoot(t)
	src := t.TempDir()
	data := fstest.Bytes(9, 3<<20)
	os.WriteFile(src+"/f", data, 0o644)
	im := buildImage(t, src, 64<<10)
	sup := startSupervisor(t)
	st := daemonState{Bootstrap: im.boot, BlobDir: im.blobDir, WorkDir: t.TempDir(), Mountpoint: t.TempDir()}
	// The first daemon's backend never answers: its fills hang.
	d := startDaemon(t, sup, st, false, "FANOTIFYFS_HANG=1")
	var mu sync.Mutex
	t.Cleanup(func() {
		if err := unix.Unmount(st.Mountpoint, 0); err != nil {
			unix.Unmount(st.Mountpoint, unix.MNT_DETACH)
		}
		mu.Lock()
		d.kill()
		mu.Unlock()
	})
	type result struct {
		data []byte
		err  error
	}
	res := make(chan result, 1)
	go func() {
		b, err := os.ReadFile(st.Mountpoint + "/f")
		res <- result{b, err}
	}()
	// Wait until the reader blocks in a fill (its event held by the daemon).
	time.Sleep(500 * time.Millisecond)
	select {
	case r := <-res:
		t.Fatalf("read finished against a hung backend: %d bytes, %v", len(r.data), r.err)
	default:
	}
	mu.Lock()
	d.kill()
	mu.Unlock()
	time.Sleep(200 * time.Millisecond)
	nd := startDaemon(t, sup, st, true)
	mu.Lock()
	d = nd
	mu.Unlock()
	select {
	case r := <-res:
		if r.err != nil {
			t.Fatalf("read in flight at the crash: %v (successor filled %d, denied %d)", r.err, nd.recovered, nd.orphans)
		}
		if !bytes.Equal(r.data, data) {
			t.Fatal("read in flight at the crash: wrong bytes")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("read in flight at the crash still blocked 30s after the takeover")
	}
	t.Logf("successor filled %d held events, denied %d", nd.recovered, nd.orphans)
	if nd.recovered == 0 || nd.orphans != 0 {
		t.Fatalf("successor filled %d and denied %d held events, want >0 and 0", nd.recovered, nd.orphans)
	}
}

// guardsOf lists the live guard processes of daemon pid (each guard has
// the daemon's pid in its environment; a daemon replaces its guard when it
// takes groups over or drops one).
func guardsOf(daemon int) []int {
	want := []byte(guard.DaemonEnv + "=" + fmt.Sprint(daemon) + "\x00")
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil || testutil.Exited(pid) {
			continue
		}
		env, _ := os.ReadFile("/proc/" + e.Name() + "/environ")
		if bytes.Contains(env, want) {
			out = append(out, pid)
		}
	}
	return out
}

// waitGone waits up to d for every pid to exit.
func waitGone(t *testing.T, d time.Duration, what string, pids ...int) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		var left []int
		for _, p := range pids {
			if !testutil.Exited(p) {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: pids %v still running after %v", what, left, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitDetached waits until mp is no mountpoint any more.
func waitDetached(t *testing.T, mp string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mounted, _ := os.ReadFile("/proc/self/mountinfo")
		if !bytes.Contains(mounted, []byte(" "+mp+" ")) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still mounted 10s after the daemon died", mp)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// maxEventFD is the highest fd of process pid open on a blob cache file
// (the fd of a fanotify event it holds), -1 if none.
func maxEventFD(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	hi := -1
	for _, e := range ents {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if n, err := strconv.Atoi(e.Name()); err == nil && strings.HasSuffix(l, blobcache.DataSuffix) {
			hi = max(hi, n)
		}
	}
	return hi
}

// fanotifyFDs counts the fanotify groups process pid holds.
func fanotifyFDs(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); l == "anon_inode:[fanotify]" {
			n++
		}
	}
	return n
}

// cacheDataFile is the blob cache data file of im in workDir.
func cacheDataFile(t *testing.T, im *image, workDir string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(workDir, im.img.Blobs[0].ID+"*"+blobcache.DataSuffix))
	if len(m) != 1 {
		t.Fatalf("cache data files of blob %s in %s: %v", im.img.Blobs[0].ID, workDir, m)
	}
	return m[0]
}

// readDirect reads path in this process, outside any mount: while a
// guard holds a group marking it, the guard denies the read.
func readDirect(path string) error {
	_, err := os.ReadFile(path)
	return err
}

// guardedDaemon starts a daemon without a supervisor (so with a guard)
// serving im, an image of one file, f, holding data; the test's cleanup
// detaches the mount and kills the daemon.
func guardedDaemon(t *testing.T, data []byte, env ...string) (daemonState, *daemonProc, *image) {
	t.Helper()
	fstest.RequireRoot(t)
	src := t.TempDir()
	if err := os.WriteFile(src+"/f", data, 0o644); err != nil {
		t.Fatal(err)
	}
	im := buildImage(t, src, 64<<10)
	st := daemonState{Bootstrap: im.boot, BlobDir: im.blobDir, WorkDir: t.TempDir(), Mountpoint: t.TempDir()}
	d := startDaemon(t, nil, st, false, env...)
	t.Cleanup(func() {
		unix.Unmount(st.Mountpoint, unix.MNT_DETACH)
		d.kill()
	})
	return st, d, im
}

// Without a supervisor, the guard makes a daemon's death loud: a reader
// holding a file open gets EIO for data not yet fetched, never zeros, and
// the mount is detached. Once that reader closes, the detached superblock
// goes, and the guard exits: its marks no longer deny reads of the cache
// file, and no guard process is left.
func TestGuardFailsReadsWhenDaemonDies(t *testing.T) {
	data := fstest.Bytes(5, 2<<20)
	st, d, im := guardedDaemon(t, data)
	if d.guard == 0 {
		t.Fatal("daemon started no guard")
	}
	fh, err := os.Open(st.Mountpoint + "/f")
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	p := make([]byte, 4096)
	if _, err := fh.ReadAt(p, 0); err != nil || !bytes.Equal(p, data[:4096]) {
		t.Fatalf("read while served: %v", err)
	}
	t.Log("served read ok")
	d.kill()
	// The guard notices, detaches the mount and fails reads.
	waitDetached(t, st.Mountpoint)
	t.Log("mount detached")
	readIsEIO(t, fh, 1<<20+12345, "read after the daemon died")
	cache := cacheDataFile(t, im, st.WorkDir)
	if err := readDirect(cache); !errors.Is(err, syscall.EIO) {
		t.Fatalf("direct read of the cache file while the guard lives: %v, want EIO (the guard's mark)", err)
	}
	if testutil.Exited(d.guard) {
		t.Fatal("guard exited while a reader still holds a file of the detached mount")
	}
	// The last reader closes: the superblock goes, so does the guard.
	fh.Close()
	start := time.Now()
	waitGone(t, 5*time.Second, "guard after the last reader closed", d.guard)
	t.Logf("guard exited %v after the last reader closed", time.Since(start).Round(time.Millisecond))
	if left := guardsOf(d.cmd.Process.Pid); len(left) > 0 {
		t.Fatalf("guard processes left: %v", left)
	}
	if err := readDirect(cache); err != nil {
		t.Fatalf("direct read of the cache file after the guard exited: %v (its marks should be gone)", err)
	}
	if socks := guard.Sockets(st.WorkDir); len(socks) > 0 {
		t.Fatalf("guard sockets left in the cache directory: %v", socks)
	}
}

// A read whose fill is in progress when a daemon without a supervisor is
// SIGKILLed gets EIO from the guard (it answers the events the dead daemon
// held), not a hang; then, with no file left open, the guard exits. The
// guard answers them by number, which it cannot know: a daemon with 5000
// fds open holds its events at numbers above 5000, and they are answered
// too (every number below the daemon's RLIMIT_NOFILE is tried).
func TestGuardDeniesReadInFlightAtKill(t *testing.T) {
	for _, pad := range []int{0, 5000} {
		t.Run(fmt.Sprintf("fds=%d", pad), func(t *testing.T) {
			var rl unix.Rlimit
			if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Max < uint64(pad)+200 {
				t.Fatalf("RLIMIT_NOFILE %+v (%v): the daemon cannot open %d fds", rl, err, pad)
			}
			guardDeniesReadInFlightAtKill(t, pad)
		})
	}
}

func guardDeniesReadInFlightAtKill(t *testing.T, pad int) {
	st, d, _ := guardedDaemon(t, fstest.Bytes(6, 3<<20), "FANOTIFYFS_HANG=1", "FANOTIFYFS_PAD_FDS="+strconv.Itoa(pad))
	res := make(chan error, 1)
	go func() {
		b, err := os.ReadFile(st.Mountpoint + "/f")
		if err == nil {
			err = fmt.Errorf("read %d bytes against a hung backend", len(b))
		}
		res <- err
	}()
	time.Sleep(500 * time.Millisecond)
	select {
	case err := <-res:
		t.Fatalf("read finished against a hung backend: %v", err)
	default:
	}
	if held := maxEventFD(d.cmd.Process.Pid); held < pad {
		t.Fatalf("the daemon holds its events at fds up to %d, want above %d", held, pad)
	} else {
		t.Logf("the daemon holds events at fds up to %d", held)
	}
	d.kill()
	select {
	case err := <-res:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read in flight at the kill: %v, want EIO", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("read in flight at the kill still blocked 10s later")
	}
	waitDetached(t, st.Mountpoint)
	waitGone(t, 5*time.Second, "guard with no reader left", d.guard)
}

// A daemon without a supervisor is SIGKILLed while readers hold files of
// its mount open, and a new one is started on the same cache directory and
// mountpoint (what systemd does), three times over. Each new daemon takes
// the groups over from the dead one's guard, which exits at once: the new
// mount reads the whole tree right (its fetcher and readers are not
// denied by the old guard's marks), and the readers of the old, detached
// mounts read the right bytes again, served by the new daemon. When those
// readers close, the new daemon drops the old groups; when the last daemon
// stops, no guard is left.
func TestRestartOnSameCacheWithoutSupervisor(t *testing.T) {
	fstest.RequireRoot(t)
	src := t.TempDir()
	wantData := map[string][]byte{}
	for i := range 6 {
		name := fmt.Sprintf("f%d", i)
		wantData[name] = fstest.Bytes(int64(40+i), 1<<20+i*7919)
		os.WriteFile(filepath.Join(src, name), wantData[name], 0o644)
	}
	os.MkdirAll(src+"/d/e", 0o755)
	wantData["d/e/g"] = fstest.Bytes(77, 300<<10)
	os.WriteFile(src+"/d/e/g", wantData["d/e/g"], 0o644)
	im := buildImage(t, src, 64<<10)
	st := daemonState{Bootstrap: im.boot, BlobDir: im.blobDir, WorkDir: t.TempDir(), Mountpoint: t.TempDir()}

	var mu sync.Mutex
	d := startDaemon(t, nil, st, false)
	t.Cleanup(func() {
		unix.Unmount(st.Mountpoint, unix.MNT_DETACH)
		mu.Lock()
		d.kill()
		mu.Unlock()
	})
	type held struct {
		fh   *os.File
		name string
	}
	var holders []held
	t.Cleanup(func() {
		for _, h := range holders {
			h.fh.Close()
		}
	})
	checkHeld := func(when string) {
		t.Helper()
		for _, h := range holders {
			want := wantData[h.name]
			got := make([]byte, len(want))
			// From the cache file, not the page cache: through events.
			unix.Fadvise(int(h.fh.Fd()), 0, 0, unix.FADV_DONTNEED)
			if _, err := h.fh.ReadAt(got, 0); err != nil && err != io.EOF {
				t.Fatalf("%s: reader of an old mount, %s: %v", when, h.name, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: reader of an old mount, %s: %s", when, h.name, describeDiff(got, want))
			}
		}
	}
	const kills = 3
	for k := range kills {
		// A reader opens a file and reads its first page only: the rest
		// of it is not fetched when the daemon dies.
		name := fmt.Sprintf("f%d", k)
		fh, err := os.Open(filepath.Join(st.Mountpoint, name))
		if err != nil {
			t.Fatal(err)
		}
		holders = append(holders, held{fh, name})
		if _, err := fh.ReadAt(make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		oldGuards := guardsOf(d.cmd.Process.Pid)
		mu.Lock()
		d.kill()
		mu.Unlock()
		waitDetached(t, st.Mountpoint)
		// The old guard fails the held file's reads that miss the page
		// cache (the last round's tree check read the whole file).
		unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
		readIsEIO(t, fh, 1<<20-4096, fmt.Sprintf("kill %d: read of a held file after the kill", k))
		nd := startDaemon(t, nil, st, false)
		mu.Lock()
		d = nd
		mu.Unlock()
		// The old guard handed its groups over and exited.
		waitGone(t, 5*time.Second, fmt.Sprintf("kill %d: old guard after the take-over", k), oldGuards...)
		// The new mount reads right: every file, against the source tree.
		fstest.CompareTrees(t, src, st.Mountpoint)
		// So do the readers of the old mounts, through the new daemon.
		checkHeld(fmt.Sprintf("after restart %d", k+1))
		t.Logf("kill %d: new daemon %d took over from guards %v; new mount and %d old readers read right", k, nd.cmd.Process.Pid, oldGuards, len(holders))
	}
	// The old readers close: their detached superblocks go, and the daemon
	// drops the old groups (and replaces its guard without them).
	for _, h := range holders {
		h.fh.Close()
	}
	holders = nil
	deadline := time.Now().Add(10 * time.Second)
	for n := fanotifyFDs(d.cmd.Process.Pid); n != 1; n = fanotifyFDs(d.cmd.Process.Pid) {
		if time.Now().After(deadline) {
			t.Fatalf("daemon holds %d fanotify groups 10s after the old readers closed, want its own only", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	fstest.CompareTrees(t, src, st.Mountpoint)
	// A clean end: unmount, kill the daemon; its guard finds no mount
	// left and exits at once.
	if err := unix.Unmount(st.Mountpoint, 0); err != nil {
		t.Fatalf("unmount the last mount: %v", err)
	}
	guards := guardsOf(d.cmd.Process.Pid)
	if len(guards) == 0 {
		t.Fatal("the last daemon has no guard")
	}
	mu.Lock()
	d.kill()
	mu.Unlock()
	waitGone(t, 5*time.Second, "the last daemon's guard", guards...)
	if socks := guard.Sockets(st.WorkDir); len(socks) > 0 {
		t.Fatalf("guard sockets left in the cache directory: %v", socks)
	}
	if err := readDirect(cacheDataFile(t, im, st.WorkDir)); err != nil {
		t.Fatalf("direct read of the cache file with every guard gone: %v", err)
	}
}

// A daemon closing cleanly (SIGTERM) while a reader still holds a file of
// its mount detaches the mount lazily; the group must not close under that
// reader, or its reads would see the holes. The guard takes it over as if
// the daemon had died: the reader gets EIO, and when it closes the guard
// exits.
func TestCloseLeavesBusyMountToGuard(t *testing.T) {
	data := fstest.Bytes(8, 2<<20)
	st, d, _ := guardedDaemon(t, data)
	fh, err := os.Open(st.Mountpoint + "/f")
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	p := make([]byte, 4096)
	if _, err := fh.ReadAt(p, 0); err != nil || !bytes.Equal(p, data[:4096]) {
		t.Fatalf("read while served: %v", err)
	}
	if !d.term() {
		t.Fatalf("daemon did not exit cleanly on SIGTERM:\n%s", textOf(d.stderr))
	}
	waitDetached(t, st.Mountpoint)
	readIsEIO(t, fh, 1<<20+4321, "read of a lazily detached mount after the daemon closed")
	if testutil.Exited(d.guard) {
		t.Fatal("guard gone while a reader still holds a file of the detached mount")
	}
	fh.Close()
	waitGone(t, 5*time.Second, "guard after the last reader closed", d.guard)
}

// readIsEIO reads 4 KiB of fh at off and fails t unless the read ends
// within 10 s with EIO: a read of a dead daemon's mount that hangs or
// returns the cache file's holes (zeros) is the bug these tests catch.
func readIsEIO(t *testing.T, fh *os.File, off int64, what string) {
	t.Helper()
	p := make([]byte, 4096)
	res := make(chan error, 1)
	go func() { _, err := fh.ReadAt(p, off); res <- err }()
	var err error
	select {
	case err = <-res:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: still blocked after 10s", what)
	}
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("%s: %v (zeros: %v), want EIO", what, err, bytes.Equal(p, make([]byte, len(p))))
	}
}

func textOf(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// A daemon that cannot start a guard (DaemonOptions.Guard false) cannot
// hold a group taken over from a crashed daemon's guard across its own
// death, so it refuses, with a clear error, a cache directory that guard
// still guards, instead of having its fills denied by it; the old guard
// stays while its reader holds a file.
func TestUnguardedDaemonRefusesGuardedCache(t *testing.T) {
	st, d, _ := guardedDaemon(t, fstest.Bytes(9, 1<<20))
	fh, err := os.Open(st.Mountpoint + "/f")
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	d.kill()
	waitDetached(t, st.Mountpoint)
	raw, _ := json.Marshal(st)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=daemon", "FANOTIFYFS_NO_GUARD=1", "FANOTIFYFS_STATE="+string(raw))
	out, err := cmd.CombinedOutput()
	unix.Unmount(st.Mountpoint, unix.MNT_DETACH) // had it mounted after all
	if err == nil || !strings.Contains(string(out), "still guarded by guard") {
		t.Fatalf("daemon without a guard on a guarded cache: %v, want a refusal naming the guard\n%s", err, out)
	}
	if testutil.Exited(d.guard) {
		t.Fatal("the old guard exited while its reader still holds a file")
	}
	fh.Close()
	waitGone(t, 5*time.Second, "old guard after its reader closed", d.guard)
}

// nydus-snapshotter's failover on a cache directory that a crashed daemon
// without a supervisor left guarded: a daemon WITH a supervisor starts on
// it and takes the groups over from the dead daemon's guard, which exits;
// it starts a guard of its own holding those groups only (the supervisor
// holds its own group, and keeps one fd). Its mount reads the tree right,
// and so does the reader of the old, detached mount. Then it is SIGKILLed
// too, with a reader of its mount (bytes not fetched yet) and the old
// reader each reading: both wait, neither EIO nor zeros, until the
// upgraded daemon takes its group back from the supervisor and, at start,
// the old groups from its guard (which exits: one holder answers); then
// both complete with the right bytes. When the old reader closes the
// daemon drops the old group and stops its guard.
func TestRestartOnSameCacheWithSupervisor(t *testing.T) {
	fstest.RequireRoot(t)
	src := t.TempDir()
	want := map[string][]byte{}
	for i := range 3 {
		name := fmt.Sprintf("f%d", i)
		want[name] = fstest.Bytes(int64(60+i), 1<<20+i*4099)
		os.WriteFile(filepath.Join(src, name), want[name], 0o644)
	}
	im := buildImage(t, src, 64<<10)
	st := daemonState{Bootstrap: im.boot, BlobDir: im.blobDir, WorkDir: t.TempDir(), Mountpoint: t.TempDir()}
	var mu sync.Mutex
	var daemons []*daemonProc
	t.Cleanup(func() {
		unix.Unmount(st.Mountpoint, unix.MNT_DETACH)
		mu.Lock()
		defer mu.Unlock()
		for _, d := range daemons {
			d.kill()
		}
	})
	start := func(sup *supervisor, upgrade bool) *daemonProc {
		t.Helper()
		d := startDaemon(t, sup, st, upgrade)
		mu.Lock()
		daemons = append(daemons, d)
		mu.Unlock()
		return d
	}
	kill := func(d *daemonProc) {
		mu.Lock()
		d.kill()
		mu.Unlock()
	}
	// readAll reads fh whole from the cache file (not the page cache, so
	// through events) in the background.
	type result struct {
		got []byte
		err error
	}
	readAll := func(fh *os.File, n int) chan result {
		res := make(chan result, 1)
		go func() {
			unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
			got := make([]byte, n)
			_, err := fh.ReadAt(got, 0)
			if err == io.EOF {
				err = nil
			}
			res <- result{got, err}
		}()
		return res
	}
	check := func(what string, res chan result, want []byte) {
		t.Helper()
		select {
		case r := <-res:
			if r.err != nil {
				t.Fatalf("%s: %v", what, r.err)
			}
			if !bytes.Equal(r.got, want) {
				t.Fatalf("%s: %s", what, describeDiff(r.got, want))
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: still blocked after 20s", what)
		}
	}

	// A: no supervisor, so a guard. Killed while a reader holds f0.
	a := start(nil, false)
	oldFh, err := os.Open(filepath.Join(st.Mountpoint, "f0"))
	if err != nil {
		t.Fatal(err)
	}
	defer oldFh.Close()
	if _, err := oldFh.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	aGuards := guardsOf(a.cmd.Process.Pid)
	if len(aGuards) != 1 {
		t.Fatalf("daemon without a supervisor has guards %v, want one", aGuards)
	}
	kill(a)
	waitDetached(t, st.Mountpoint)
	readIsEIO(t, oldFh, 1<<20-4096, "read of the old mount while only the guard holds it")

	// B: a supervisor, fresh start on the same cache and mountpoint.
	sup := startSupervisor(t)
	b := start(sup, false)
	waitGone(t, 5*time.Second, "the crashed daemon's guard after the supervised daemon took over", aGuards...)
	if b.guard == 0 {
		t.Fatal("supervised daemon took groups over but started no guard to hold them")
	}
	if n := fanotifyFDs(b.guard); n != 1 {
		out, _ := exec.Command("ls", "-l", fmt.Sprintf("/proc/%d/fd", b.guard)).CombinedOutput()
		t.Fatalf("the supervised daemon's guard holds %d groups, want the taken one only\n%s", n, out)
	}
	if n := fanotifyFDs(b.cmd.Process.Pid); n != 2 {
		t.Fatalf("supervised daemon holds %d groups, want its own and the taken one", n)
	}
	// f0 and f1 through the new mount; f2 stays unfetched.
	for _, name := range []string{"f0", "f1"} {
		got, err := os.ReadFile(filepath.Join(st.Mountpoint, name))
		if err != nil || !bytes.Equal(got, want[name]) {
			t.Fatalf("new mount, %s: %v (right bytes: %v)", name, err, bytes.Equal(got, want[name]))
		}
	}
	check("old reader after the supervised daemon took over", readAll(oldFh, len(want["f0"])), want["f0"])
	t.Logf("supervised daemon %d took over from guard %v; its guard %d holds the old group", b.cmd.Process.Pid, aGuards, b.guard)

	// B dies: its own readers and the old one wait for the upgrade.
	newFh, err := os.Open(filepath.Join(st.Mountpoint, "f2"))
	if err != nil {
		t.Fatal(err)
	}
	defer newFh.Close()
	kill(b)
	oldRes := readAll(oldFh, len(want["f0"]))
	newRes := readAll(newFh, len(want["f2"]))
	time.Sleep(500 * time.Millisecond)
	for what, res := range map[string]chan result{"old reader": oldRes, "reader of the supervised mount": newRes} {
		select {
		case r := <-res:
			t.Fatalf("%s finished while no daemon serves: %v (%s)", what, r.err, describeDiff(r.got, want["f0"]))
		default:
		}
	}
	if testutil.Exited(b.guard) {
		t.Fatal("the supervised daemon's guard exited while the old reader holds its file")
	}
	c := start(sup, true)
	check("reader of the supervised mount after the upgrade", newRes, want["f2"])
	check("old reader after the upgrade", oldRes, want["f0"])
	waitGone(t, 5*time.Second, "the dead supervised daemon's guard after the upgrade", b.guard)
	if c.guard == 0 || fanotifyFDs(c.cmd.Process.Pid) != 2 {
		t.Fatalf("upgraded daemon: guard %d, %d groups; want a guard and two groups", c.guard, fanotifyFDs(c.cmd.Process.Pid))
	}
	fstest.CompareTrees(t, src, st.Mountpoint)

	// The old reader closes: its detached mount goes, the old group is
	// dropped, and with it the guard.
	oldFh.Close()
	deadline := time.Now().Add(10 * time.Second)
	for fanotifyFDs(c.cmd.Process.Pid) != 1 || !testutil.Exited(c.guard) {
		if time.Now().After(deadline) {
			t.Fatalf("10s after the old reader closed: daemon holds %d groups, guard %d exited: %v", fanotifyFDs(c.cmd.Process.Pid), c.guard, testutil.Exited(c.guard))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if left := guardsOf(c.cmd.Process.Pid); len(left) > 0 {
		t.Fatalf("guards left: %v", left)
	}
	if socks := guard.Sockets(st.WorkDir); len(socks) > 0 {
		t.Fatalf("guard sockets left in the cache directory: %v", socks)
	}
	fstest.CompareTrees(t, src, st.Mountpoint)
}

// boundFDs keeps the daemon's fd numbers at most its bound (guard.MaxFD),
// lowering a larger RLIMIT_NOFILE (Go raises it to the hard limit), so
// that a successor answering its orphans by number tries a bounded range;
// a smaller limit is the bound as it is. (Bounds below this machine's
// limit stand in for guard.MaxFD: the hard limit cannot be raised here.)
func TestBoundFDs(t *testing.T) {
	var orig syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
		t.Fatal(err)
	}
	if orig.Max < 2000 {
		t.Fatalf("hard RLIMIT_NOFILE %d: too small for this test", orig.Max)
	}
	t.Cleanup(func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig); err != nil {
			t.Errorf("restore RLIMIT_NOFILE: %v", err)
		}
	})
	for _, tc := range []struct {
		cur       uint64
		bound     int
		want      int
		wantLimit uint64
	}{
		{orig.Max, 999, 999, 1000},
		{1001, 999, 999, 1000},
		{1000, 999, 999, 1000},
		{900, 999, 899, 900},
		{orig.Max, guard.MaxFD, min(int(orig.Max)-1, guard.MaxFD), min(orig.Max, guard.MaxFD+1)},
	} {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: tc.cur, Max: orig.Max}); err != nil {
			t.Fatal(err)
		}
		if got := boundFDs(testLogger(t), tc.bound); got != tc.want {
			t.Errorf("limit %d, bound %d: %d, want %d", tc.cur, tc.bound, got, tc.want)
		}
		var now syscall.Rlimit
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &now)
		if now.Cur != tc.wantLimit || now.Max != orig.Max {
			t.Errorf("limit %d, bound %d: now %+v, want soft %d, hard %d", tc.cur, tc.bound, now, tc.wantLimit, orig.Max)
		}
	}
}

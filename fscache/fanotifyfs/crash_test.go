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
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs/fusedev"

	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/rafs/storage"
	"github.com/rafsd/rafsd/rafs/storage/backend"
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
	return RunDaemon(context.Background(), DaemonOptions{
		Mounts:         []MountSpec{{Bootstrap: st.Bootstrap, Mountpoint: st.Mountpoint, Config: string(cfgJSON), ReadAheadKB: 256}},
		Supervisor:     os.Getenv("FANOTIFYFS_SUPERVISOR"),
		Upgrade:        os.Getenv("FANOTIFYFS_TAKEOVER") == "1",
		Timeout:        20 * time.Second,
		FetcherOptions: []storage.Option{storage.WithBackend(be)},
		Guard:          os.Getenv("FANOTIFYFS_SUPERVISOR") == "",
		// Every pass of the reader must raise events, complete or not.
		KeepMarks: true,
		Ready: func(s *Server, g *Guard) {
			if g != nil {
				fmt.Printf("ready guard=%d\n", g.Pid())
				return
			}
			st := s.Stats()
			fmt.Printf("ready recovered=%d orphans=%d\n", st.Recovered, st.Orphans)
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
		fmt.Sscanf(strings.TrimSpace(line), "ready guard=%d", &d.guard)
		fmt.Sscanf(strings.TrimSpace(line), "ready recovered=%d orphans=%d", &d.recovered, &d.orphans)
	case <-time.After(30 * time.Second):
		d.kill()
		t.Fatalf("daemon not ready in 30s\n%s", fileText(stderr))
	}
	return d
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

// Without a supervisor, the guard makes a daemon's death loud: a reader
// holding a file open gets EIO for data not yet fetched, never zeros, and
// the mount is detached.
func TestGuardFailsReadsWhenDaemonDies(t *testing.T) {
	fstest.RequireRoot(t)
	src := t.TempDir()
	data := fstest.Bytes(5, 2<<20)
	os.WriteFile(src+"/f", data, 0o644)
	im := buildImage(t, src, 64<<10)
	st := daemonState{Bootstrap: im.boot, BlobDir: im.blobDir, WorkDir: t.TempDir(), Mountpoint: t.TempDir()}
	d := startDaemon(t, nil, st, false)
	t.Cleanup(func() {
		unix.Unmount(st.Mountpoint, unix.MNT_DETACH)
		d.kill()
		if d.guard > 0 {
			syscall.Kill(d.guard, syscall.SIGKILL)
		}
	})
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
	deadline := time.Now().Add(10 * time.Second)
	for {
		mounted, _ := os.ReadFile("/proc/self/mountinfo")
		if !bytes.Contains(mounted, []byte(" "+st.Mountpoint+" ")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("guard did not detach the mount")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Log("mount detached")
	res := make(chan error, 1)
	go func() { _, err := fh.ReadAt(p, 1<<20+12345); res <- err }()
	select {
	case err = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("read after the daemon died still blocked after 10s")
	}
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read after the daemon died: %v (zeros: %v), want EIO", err, bytes.Equal(p, make([]byte, len(p))))
	}
}

package guest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/guest/treehash"
)

// DefaultPath is the PATH of programs the agent runs when the request gives no env.
const DefaultPath = "PATH=/bin:/sbin:/usr/bin:/usr/sbin"

// Agent is the guest end of the control channel: it runs what the host asks.
// Its background processes outlive a broken channel, so the host may reconnect.
type Agent struct {
	Version string       // reported by ping
	Channel string       // reported by sysinfo
	Console io.Writer    // banners and background process output; nil: discarded
	Log     *slog.Logger // nil: slog.Default()
	// PowerOff ends the guest; nil means sync and reboot(2) RESTART, which
	// QEMU turns into an exit under -no-reboot (tinyconfig has no ACPI power off).
	PowerOff func() error

	mu      sync.Mutex
	running map[uint64]context.CancelFunc
	procs   map[int]*proc
	handles int
}

func (a *Agent) log() *slog.Logger {
	if a.Log != nil {
		return a.Log
	}
	return slog.Default()
}

func (a *Agent) console() io.Writer {
	if a.Console != nil {
		return a.Console
	}
	return io.Discard
}

// Serve answers requests read from rw until it fails or ctx ends. Requests run
// concurrently; responses are written whole, one per line.
func (a *Agent) Serve(ctx context.Context, rw io.ReadWriter) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.mu.Lock()
	if a.running == nil {
		a.running = map[uint64]context.CancelFunc{}
		a.procs = map[int]*proc{}
	}
	a.mu.Unlock()

	var wmu sync.Mutex
	reply := func(resp *Response) {
		b, err := encode(resp)
		if err != nil {
			b, _ = encode(&Response{ID: resp.ID, Error: "encode reply: " + err.Error()})
		}
		wmu.Lock()
		defer wmu.Unlock()
		if _, err := rw.Write(b); err != nil {
			a.log().Warn("write reply", "id", resp.ID, "err", err)
		}
	}
	var wg sync.WaitGroup
	// Requests of a broken channel are cancelled: nobody can read their replies.
	defer func() { cancel(); wg.Wait() }()
	br := bufio.NewReaderSize(rw, 1<<16)
	for {
		line, err := readLine(br)
		if errors.Is(err, ErrMessageTooLarge) {
			a.log().Warn("dropped an oversized request")
			continue
		}
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		req, err := DecodeRequest(line)
		if err != nil {
			// Without a valid id there is nobody to answer; keep serving.
			a.log().Warn("bad request", "err", err)
			continue
		}
		if req.Op == OpCancel {
			var c CancelRequest
			if json.Unmarshal(req.Args, &c) == nil {
				a.mu.Lock()
				if f := a.running[c.ID]; f != nil {
					f()
				}
				a.mu.Unlock()
			}
			continue
		}
		rctx, rcancel := context.WithCancel(ctx)
		a.mu.Lock()
		a.running[req.ID] = rcancel
		a.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				a.mu.Lock()
				delete(a.running, req.ID)
				a.mu.Unlock()
				rcancel()
			}()
			result, err := a.handle(rctx, req)
			resp := &Response{ID: req.ID}
			if err != nil {
				resp.Error = err.Error()
			} else if result != nil {
				b, merr := json.Marshal(result)
				if merr != nil {
					resp.Error = "encode result: " + merr.Error()
				} else {
					resp.Result = b
				}
			}
			reply(resp)
			if req.Op == OpPowerOff && err == nil {
				go a.powerOff()
			}
		}()
	}
}

func decodeArgs(req *Request, v any) error {
	if len(req.Args) == 0 {
		return fmt.Errorf("%s: missing args", req.Op)
	}
	if err := json.Unmarshal(req.Args, v); err != nil {
		return fmt.Errorf("%s: bad args: %w", req.Op, err)
	}
	return nil
}

func (a *Agent) handle(ctx context.Context, req *Request) (any, error) {
	switch req.Op {
	case OpPing:
		return &Pong{Agent: a.Version, Uptime: uptimeMillis()}, nil
	case OpSysInfo:
		return a.sysInfo()
	case OpExec:
		var r ExecRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		return runExec(ctx, &r)
	case OpMount:
		var r MountRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		if r.Target == "" {
			return nil, errors.New("mount: no target")
		}
		if r.Mkdir {
			if err := os.MkdirAll(r.Target, 0o755); err != nil {
				return nil, fmt.Errorf("mount: %w", err)
			}
		}
		if err := unix.Mount(r.Source, r.Target, r.FSType, uintptr(r.Flags), r.Data); err != nil {
			return nil, fmt.Errorf("mount -t %s %s %s (%s): %w", r.FSType, r.Source, r.Target, r.Data, err)
		}
		return nil, nil
	case OpUnmount:
		var r UnmountRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		if err := unix.Unmount(r.Target, r.Flags); err != nil {
			return nil, fmt.Errorf("umount %s: %w", r.Target, err)
		}
		return nil, nil
	case OpTreeHash:
		var r TreeHashRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		es, err := treehash.Walk(r.Root)
		if err != nil {
			return nil, err
		}
		res := &TreeHashResult{Hash: treehash.Sum(es)}
		if r.Entries {
			res.Entries = es
		}
		return res, nil
	case OpReadFile:
		var r ReadFileRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		return readFile(&r)
	case OpWriteFile:
		var r WriteFileRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		mode := os.FileMode(r.Mode & 0o7777)
		if mode == 0 {
			mode = 0o644
		}
		if err := os.MkdirAll(filepath.Dir(r.Path), 0o755); err != nil {
			return nil, fmt.Errorf("writefile: %w", err)
		}
		return nil, writeFileAtomic(r.Path, r.Data, mode)
	case OpStart:
		var r StartRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		return a.start(&r)
	case OpStop:
		var r StopRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		return a.stop(ctx, &r)
	case OpSleep:
		var r SleepRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		if r.Banner != "" {
			fmt.Fprintln(a.console(), r.Banner)
		}
		t := time.NewTimer(time.Duration(r.Millis) * time.Millisecond)
		defer t.Stop()
		select {
		case <-t.C:
			return nil, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	case OpDial:
		var r DialRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		return dial(ctx, &r)
	case OpMkdir:
		var r MkdirRequest
		if err := decodeArgs(req, &r); err != nil {
			return nil, err
		}
		mode := os.FileMode(r.Mode & 0o777)
		if mode == 0 {
			mode = 0o755
		}
		if err := os.MkdirAll(r.Path, mode); err != nil {
			return nil, fmt.Errorf("mkdir: %w", err)
		}
		return nil, nil
	case OpPowerOff:
		return nil, nil // the reboot happens after the reply is written
	default:
		return nil, fmt.Errorf("unknown op %q", req.Op)
	}
}

func (a *Agent) powerOff() {
	// Give the reply a moment to leave the virtqueue before the machine goes.
	time.Sleep(50 * time.Millisecond)
	a.mu.Lock()
	for _, p := range a.procs {
		if p.cmd.Process != nil {
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
		}
	}
	a.mu.Unlock()
	fmt.Fprintln(a.console(), "rafsd-guest-agent: powering off")
	f := a.PowerOff
	if f == nil {
		f = func() error {
			unix.Sync()
			return unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		}
	}
	if err := f(); err != nil {
		a.log().Error("power off", "err", err)
	}
}

func uptimeMillis() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return ts.Nano() / int64(time.Millisecond)
}

func (a *Agent) sysInfo() (*SysInfo, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return nil, fmt.Errorf("uname: %w", err)
	}
	s := &SysInfo{
		KernelRelease: unix.ByteSliceToString(u.Release[:]),
		KernelVersion: unix.ByteSliceToString(u.Version[:]),
		Channel:       a.Channel,
		CPUs:          runtime.NumCPU(),
		UptimeMillis:  uptimeMillis(),
	}
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return nil, fmt.Errorf("sysinfo: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			s.Filesystems = append(s.Filesystems, f[len(f)-1])
		}
	}
	if _, err := os.Stat("/dev/cachefiles"); err == nil {
		s.Cachefiles = true
	}
	if fd, err := unix.FanotifyInit(unix.FAN_CLASS_NOTIF, unix.O_RDONLY); err == nil {
		s.Fanotify = true
		unix.Close(fd)
	}
	return s, nil
}

func readFile(r *ReadFileRequest) (*ReadFileResult, error) {
	max := r.Max
	if max <= 0 || max > MaxMessage/2 {
		max = MaxMessage / 2
	}
	f, err := os.Open(r.Path)
	if err != nil {
		return nil, fmt.Errorf("readfile: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("readfile %s: %w", r.Path, err)
	}
	res := &ReadFileResult{Data: data}
	if int64(len(data)) > max {
		res.Data, res.Truncated = data[:max], true
	}
	return res, nil
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.buf.Len(); room < len(p) {
		b.truncated = true
		if room > 0 {
			b.buf.Write(p[:room])
		}
		return len(p), nil
	}
	return b.buf.Write(p)
}

func command(ctx context.Context, argv, env []string, dir string) (*exec.Cmd, error) {
	if len(argv) == 0 || argv[0] == "" {
		return nil, errors.New("empty argv")
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = env
	if len(env) == 0 {
		cmd.Env = []string{DefaultPath}
	}
	cmd.Dir = dir
	// Own process group, so a cancel kills what the program started too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// A grandchild holding the output pipes must not block the reply forever.
	cmd.WaitDelay = 2 * time.Second
	return cmd, nil
}

func runExec(ctx context.Context, r *ExecRequest) (*ExecResult, error) {
	if r.TimeoutMS > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(r.TimeoutMS)*time.Millisecond)
		defer cancel()
	}
	cmd, err := command(ctx, r.Argv, r.Env, r.Dir)
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	stdout := &limitedBuffer{max: MaxOutput}
	stderr := &limitedBuffer{max: MaxOutput}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if len(r.Stdin) > 0 {
		cmd.Stdin = bytes.NewReader(r.Stdin)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("exec %q: %w", r.Argv, err)
	}
	werr := cmd.Wait()
	res := &ExecResult{Stdout: stdout.buf.Bytes(), Stderr: stderr.buf.Bytes(), Truncated: stdout.truncated || stderr.truncated}
	res.ExitCode, res.Signal = exitStatus(cmd.ProcessState)
	if ctx.Err() != nil {
		if r.TimeoutMS > 0 && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			res.TimedOut = true
		} else {
			return nil, fmt.Errorf("exec %q: %w", r.Argv, ctx.Err())
		}
	}
	var ee *exec.ExitError
	if werr != nil && !errors.As(werr, &ee) && !errors.Is(werr, exec.ErrWaitDelay) && !res.TimedOut {
		return nil, fmt.Errorf("exec %q: %w", r.Argv, werr)
	}
	return res, nil
}

func exitStatus(ps *os.ProcessState) (int, string) {
	if ps == nil {
		return -1, ""
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return -1, unix.SignalName(ws.Signal())
	}
	return ps.ExitCode(), ""
}

// proc is a background process started by OpStart.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *tailBuffer
	done chan struct{} // closed after Wait
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.b...)
}

func (a *Agent) start(r *StartRequest) (*StartResult, error) {
	// Not tied to the request: the process runs until OpStop or power off.
	cmd, err := command(context.Background(), r.Argv, r.Env, r.Dir)
	if err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	name := r.Name
	if name == "" {
		name = filepath.Base(r.Argv[0])
	}
	p := &proc{name: name, cmd: cmd, out: &tailBuffer{max: MaxOutput}, done: make(chan struct{})}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("start %q: %w", r.Argv, err)
	}
	pw.Close()
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		defer pr.Close()
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			fmt.Fprintf(a.console(), "[%s] %s\n", name, sc.Bytes())
			p.out.Write(append(sc.Bytes(), '\n'))
		}
	}()
	go func() {
		_ = cmd.Wait()
		// Output of grandchildren still holding the pipe is not waited for.
		select {
		case <-copied:
		case <-time.After(time.Second):
		}
		close(p.done)
	}()
	a.mu.Lock()
	a.handles++
	h := a.handles
	a.procs[h] = p
	a.mu.Unlock()
	return &StartResult{Handle: h, PID: cmd.Process.Pid}, nil
}

func (a *Agent) stop(ctx context.Context, r *StopRequest) (*ProcessResult, error) {
	a.mu.Lock()
	p := a.procs[r.Handle]
	a.mu.Unlock()
	if p == nil {
		return nil, fmt.Errorf("stop: no process with handle %d", r.Handle)
	}
	sig := syscall.SIGTERM
	if r.Signal != "" {
		name := strings.ToUpper(r.Signal)
		if !strings.HasPrefix(name, "SIG") {
			name = "SIG" + name
		}
		s := unix.SignalNum(name)
		if s == 0 {
			return nil, fmt.Errorf("stop: unknown signal %q", r.Signal)
		}
		sig = s
	}
	grace := 5 * time.Second
	if r.GraceMS > 0 {
		grace = time.Duration(r.GraceMS) * time.Millisecond
	}
	res := &ProcessResult{}
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(sig)
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-p.done:
		case <-t.C:
			res.Killed = true
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	a.mu.Lock()
	delete(a.procs, r.Handle)
	a.mu.Unlock()
	res.ExitCode, res.Signal = exitStatus(p.cmd.ProcessState)
	res.Output = p.out.Bytes()
	return res, nil
}

func dial(ctx context.Context, r *DialRequest) (*DialResult, error) {
	timeout := 10 * time.Second
	if r.TimeoutMS > 0 {
		timeout = time.Duration(r.TimeoutMS) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", r.Addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if len(r.Send) > 0 {
		if _, err := c.Write(r.Send); err != nil {
			return nil, fmt.Errorf("dial %s: write: %w", r.Addr, err)
		}
	}
	data, err := io.ReadAll(io.LimitReader(c, 1<<20))
	if err != nil && len(data) == 0 {
		return nil, fmt.Errorf("dial %s: read: %w", r.Addr, err)
	}
	return &DialResult{Data: data}, nil
}

// writeFileAtomic makes path appear whole with its final mode: guest
// daemons poll for trigger files and may remove one the moment it exists,
// so the file is written and chmod'ed under a temporary name first.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("writefile: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writefile %s: %w", path, err)
	}
	return nil
}

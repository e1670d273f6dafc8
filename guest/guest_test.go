package guest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/internal/testutil"
)

// pair serves an Agent on one end of an in-memory pipe and returns the
// Client on the other. The VM tests in package testbed run the same code
// over a real virtio-serial port.
func pair(t *testing.T) (*Client, *Agent, *testutil.SyncBuffer) {
	t.Helper()
	h, g := net.Pipe()
	console := &testutil.SyncBuffer{}
	var powered sync.WaitGroup
	powered.Add(1)
	a := &Agent{Version: "test", Console: console, PowerOff: func() error { powered.Done(); return nil }}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.Serve(ctx, g) }()
	c := NewClient(h, nil)
	t.Cleanup(func() {
		c.Close()
		cancel()
		g.Close()
		<-served
	})
	return c, a, console
}

// waitUntil polls cond until it holds; the deadline is for a loaded CI box,
// the condition (not the time) is what orders the test.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestExec(t *testing.T) {
	c, _, _ := pair(t)
	ctx := context.Background()
	tests := []struct {
		name     string
		req      ExecRequest
		code     int
		signal   string
		stdout   string
		stderr   string
		timedOut bool
	}{
		{"echo", ExecRequest{Argv: []string{"/bin/echo", "hi", "there"}}, 0, "", "hi there\n", "", false},
		{"stdin", ExecRequest{Argv: []string{"/bin/cat"}, Stdin: []byte("in\x00put")}, 0, "", "in\x00put", "", false},
		{"env and exit code", ExecRequest{Argv: []string{"/bin/sh", "-c", "echo $FOO >&2; exit 3"}, Env: []string{"FOO=bar"}}, 3, "", "", "bar\n", false},
		{"signal", ExecRequest{Argv: []string{"/bin/sh", "-c", "kill -9 $$"}}, -1, "SIGKILL", "", "", false},
		{"timeout", ExecRequest{Argv: []string{"/bin/sleep", "30"}, TimeoutMS: 200}, -1, "SIGKILL", "", "", true},
		{"dir", ExecRequest{Argv: []string{"/bin/pwd"}, Dir: "/proc"}, 0, "", "/proc\n", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := c.Exec(ctx, tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if r.ExitCode != tt.code || r.Signal != tt.signal || string(r.Stdout) != tt.stdout || string(r.Stderr) != tt.stderr || r.TimedOut != tt.timedOut {
				t.Errorf("got %+v", r)
			}
		})
	}
	if _, err := c.Exec(ctx, ExecRequest{Argv: []string{"/nonexistent"}}); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing program: %v", err)
	}
	if _, err := c.Exec(ctx, ExecRequest{}); err == nil {
		t.Error("empty argv accepted")
	}
}

func TestConcurrentCallsAndCancel(t *testing.T) {
	c, _, _ := pair(t)
	ctx := context.Background()
	// A long call does not block short ones behind it.
	sctx, cancel := context.WithCancel(ctx)
	slow := make(chan error, 1)
	go func() { slow <- c.Sleep(sctx, time.Hour, "") }()
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Ping(ctx); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	cancel()
	if err := <-slow; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled sleep: %v", err)
	}
	// The agent got the cancel: a long exec is killed, not left running.
	ectx, ecancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer ecancel()
	mark := filepath.Join(t.TempDir(), "mark")
	_, err := c.Exec(ectx, ExecRequest{Argv: []string{"/bin/sh", "-c", "sleep 2; touch " + mark}})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("exec with expired ctx: %v", err)
	}
	time.Sleep(2500 * time.Millisecond)
	if _, err := os.Stat(mark); err == nil {
		t.Error("cancelled exec kept running")
	}
}

func TestFilesAndTreeHash(t *testing.T) {
	c, _, _ := pair(t)
	ctx := context.Background()
	d := t.TempDir()
	if err := c.Mkdir(ctx, filepath.Join(d, "m/n"), 0o700); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(d, "m/n")); err != nil || fi.Mode() != os.ModeDir|0o700 {
		t.Fatalf("mkdir: %v %v", fi, err)
	}
	os.RemoveAll(filepath.Join(d, "m"))
	p := filepath.Join(d, "sub/f")
	if err := c.WriteFile(ctx, p, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("written file: %v %v", fi, err)
	}
	got, err := c.ReadFile(ctx, p, 0)
	if err != nil || string(got) != "data" {
		t.Fatalf("ReadFile = %q, %v", got, err)
	}
	if got, err := c.ReadFile(ctx, p, 2); err != nil || string(got) != "da" {
		t.Fatalf("bounded ReadFile = %q, %v", got, err)
	}
	if _, err := c.ReadFile(ctx, filepath.Join(d, "none"), 0); err == nil {
		t.Fatal("no error reading a missing file")
	}
	want, err := treehash.Hash(d)
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.TreeHash(ctx, d, true)
	if err != nil {
		t.Fatal(err)
	}
	if r.Hash != want || len(r.Entries) != 3 {
		t.Errorf("TreeHash = %s (%d entries), host %s", r.Hash, len(r.Entries), want)
	}
}

func TestBackgroundProcess(t *testing.T) {
	c, _, console := pair(t)
	ctx := context.Background()
	tests := []struct {
		name   string
		argv   []string
		signal string
		killed bool
		exit   int
		sig    string
	}{
		{"term", []string{"/bin/sh", "-c", "echo started; exec sleep 60"}, "", false, -1, "SIGTERM"},
		{"trapped term needs kill", []string{"/bin/sh", "-c", "trap '' TERM; echo started; while :; do sleep 0.1; done"}, "TERM", true, -1, "SIGKILL"},
		{"already exited", []string{"/bin/sh", "-c", "echo started; exit 7"}, "", false, 7, ""},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := c.Start(ctx, StartRequest{Name: "bg", Argv: tt.argv})
			if err != nil {
				t.Fatal(err)
			}
			// The signal must come after the shell's echo (and its trap),
			// and in "already exited" after its exit: wait for those, not
			// for a fixed time, which a loaded box overruns.
			waitUntil(t, "the process's output on the console", func() bool {
				return strings.Count(console.String(), "[bg] started\n") == i+1
			})
			if tt.exit >= 0 {
				waitUntil(t, "the process to exit", func() bool { return testutil.Exited(s.PID) })
			}
			// A process that obeys SIGTERM gets a grace a starved box
			// cannot overrun; the trapping one must wait it out.
			grace := int64(10000)
			if tt.killed {
				grace = 500
			}
			r, err := c.StopProcess(ctx, StopRequest{Handle: s.Handle, Signal: tt.signal, GraceMS: grace})
			if err != nil {
				t.Fatal(err)
			}
			if r.Killed != tt.killed || r.ExitCode != tt.exit || r.Signal != tt.sig || string(r.Output) != "started\n" {
				t.Errorf("got %+v", r)
			}
			if _, err := c.StopProcess(ctx, StopRequest{Handle: s.Handle}); err == nil {
				t.Error("second stop of the same handle succeeded")
			}
		})
	}
	if !strings.Contains(console.String(), "[bg] started\n") {
		t.Errorf("console lacks the process output: %q", console.String())
	}
}

func TestBadRequestsKeepServing(t *testing.T) {
	h, g := net.Pipe()
	a := &Agent{}
	done := make(chan error, 1)
	go func() { done <- a.Serve(context.Background(), g) }()
	defer func() { h.Close(); g.Close(); <-done }()
	br := bufio.NewReader(h)
	for _, line := range []string{
		"not json\n",
		`{"id":0,"op":"ping"}` + "\n",
		`{"id":5}` + "\n",
		`{"id":6,"op":"exec","args":"nope"}` + "\n",
		`{"id":7,"op":"teleport"}` + "\n",
		`{"id":8,"op":"ping"}` + "\n",
	} {
		if _, err := io.WriteString(h, line); err != nil {
			t.Fatal(err)
		}
	}
	want := map[uint64]string{6: "bad args", 7: "unknown op", 8: ""}
	for len(want) > 0 {
		h.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := readLine(br)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := DecodeResponse(line)
		if err != nil {
			t.Fatal(err)
		}
		sub, ok := want[resp.ID]
		if !ok || (sub == "" && resp.Error != "") || !strings.Contains(resp.Error, sub) {
			t.Errorf("unexpected response %+v", resp)
		}
		delete(want, resp.ID)
	}
}

func TestClientFailsCallsWhenChannelBreaks(t *testing.T) {
	h, g := net.Pipe()
	c := NewClient(h, func() error { return errors.New("vm gone") })
	errc := make(chan error, 1)
	go func() { _, err := c.Ping(context.Background()); errc <- err }()
	buf := make([]byte, 100)
	g.Read(buf) // the request
	g.Close()
	err := <-errc
	if err == nil || !strings.Contains(err.Error(), "vm gone") {
		t.Fatalf("err = %v", err)
	}
	if _, err := c.Ping(context.Background()); err == nil {
		t.Fatal("call on a broken client succeeded")
	}
}

func TestReadLineBounds(t *testing.T) {
	long := strings.Repeat("x", 10000)
	tests := []struct {
		name  string
		input string
		lines []string // "!" marks ErrMessageTooLarge
		end   error
	}{
		{"short", "a\nb\n", []string{"a", "b"}, io.EOF},
		{"crlf", "a\r\n", []string{"a"}, io.EOF},
		{"too long then short", long + "\n{}\n", []string{"!", "{}"}, io.EOF},
		{"limit exactly", strings.Repeat("y", 99) + "\n", []string{strings.Repeat("y", 99)}, io.EOF},
		{"partial", "abc", nil, io.ErrUnexpectedEOF},
		{"too long unterminated", long, nil, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br := bufio.NewReaderSize(strings.NewReader(tt.input), 16)
			for _, want := range tt.lines {
				line, err := readLineMax(br, 100)
				if want == "!" {
					if !errors.Is(err, ErrMessageTooLarge) {
						t.Fatalf("err = %v, want too large", err)
					}
					continue
				}
				if err != nil || string(line) != want {
					t.Fatalf("line = %q, %v; want %q", line, err, want)
				}
			}
			if _, err := readLineMax(br, 100); !errors.Is(err, tt.end) {
				t.Fatalf("end = %v, want %v", err, tt.end)
			}
		})
	}
}

func FuzzDecodeResponse(f *testing.F) {
	f.Add([]byte(`{"id":1,"result":{"agent":"x","uptime":5}}`))
	f.Add([]byte(`{"id":2,"error":"boom"}`))
	f.Add([]byte(`{"id":0}`))
	f.Add([]byte(`{"id":18446744073709551615,"result":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		resp, err := DecodeResponse(b)
		if err != nil {
			return
		}
		if resp.ID == 0 {
			t.Fatal("accepted id 0")
		}
		var s SysInfo
		_ = json.Unmarshal(resp.Result, &s)
	})
}

func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"id":1,"op":"ping"}`))
	f.Add([]byte(`{"id":3,"op":"exec","args":{"argv":["/bin/true"],"stdin":"aGk="}}`))
	f.Add([]byte(`{"id":3,"op":"cancel","args":{"id":1}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeRequest(b)
		if err != nil {
			return
		}
		if req.ID == 0 || req.Op == "" {
			t.Fatalf("accepted %+v", req)
		}
		var e ExecRequest
		_ = decodeArgs(req, &e)
	})
}

// FuzzClientStream feeds arbitrary guest bytes to a Client with a call in
// flight: it must fail or answer, never panic or hang.
func FuzzClientStream(f *testing.F) {
	f.Add([]byte(`{"id":1,"result":{"agent":"a","uptime":1}}` + "\n"))
	f.Add([]byte(`{"id":1,"error":"x"}` + "\n"))
	f.Add([]byte("{\"id\":1,\"result\":1}\n"))
	f.Add([]byte("\n\n{\"id\":9}\n{\"id\":1,\"result\":{}}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c := NewClient(&fakeConn{r: bytes.NewReader(b)}, nil)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, _ = c.Ping(ctx)
		c.Close()
	})
}

// fakeConn replays guest bytes once the first request was written, then EOF.
type fakeConn struct {
	mu      sync.Mutex
	r       io.Reader
	written chan struct{}
	once    sync.Once
}

func (f *fakeConn) ch() chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.written == nil {
		f.written = make(chan struct{})
	}
	return f.written
}

func (f *fakeConn) Read(p []byte) (int, error) {
	select {
	case <-f.ch():
	case <-time.After(time.Second):
	}
	return f.r.Read(p)
}

func (f *fakeConn) Write(p []byte) (int, error) {
	f.once.Do(func() { close(f.ch()) })
	return len(p), nil
}

func (f *fakeConn) Close() error { return nil }

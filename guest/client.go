package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/rafsd/rafsd/guest/treehash"
)

// Client is the host end of the control channel. It is safe for concurrent use.
type Client struct {
	rw io.ReadWriteCloser

	wmu sync.Mutex // serializes writes of whole lines

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan *Response
	err     error         // set once the reader stops
	done    chan struct{} // closed when the reader stops
	// closeErr, when set, decorates the error seen by calls once the channel
	// breaks (the testbed passes the VM's fate, with its console tail).
	closeErr func() error
}

// NewClient starts reading responses from rw. onBroken, if not nil, is asked
// for the error to report to calls once the channel breaks (it may return nil).
func NewClient(rw io.ReadWriteCloser, onBroken func() error) *Client {
	c := &Client{rw: rw, pending: map[uint64]chan *Response{}, done: make(chan struct{}), closeErr: onBroken}
	go c.readLoop()
	return c
}

func (c *Client) readLoop() {
	br := bufio.NewReaderSize(c.rw, 1<<16)
	var err error
	for {
		var line []byte
		line, err = readLine(br)
		if err != nil {
			break
		}
		if len(line) == 0 {
			continue
		}
		resp, derr := DecodeResponse(line)
		if derr != nil {
			err = derr
			break
		}
		c.mu.Lock()
		ch := c.pending[resp.ID]
		delete(c.pending, resp.ID)
		c.mu.Unlock()
		if ch != nil {
			ch <- resp // buffered
		}
	}
	if errors.Is(err, io.EOF) {
		err = errors.New("closed")
	}
	c.mu.Lock()
	c.err = fmt.Errorf("guest: control channel: %w", err)
	c.pending = nil
	c.mu.Unlock()
	close(c.done)
}

// Close closes the channel; calls in flight fail.
func (c *Client) Close() error {
	err := c.rw.Close()
	<-c.done
	return err
}

// Done is closed when the channel has broken or been closed.
func (c *Client) Done() <-chan struct{} { return c.done }

func (c *Client) brokenErr() error {
	c.mu.Lock()
	err := c.err
	c.mu.Unlock()
	if c.closeErr != nil {
		// The owner knows why (e.g. the VM was killed at its timeout).
		if e := c.closeErr(); e != nil {
			return e
		}
	}
	return err
}

// Call sends op with args and decodes the result into result (if not nil).
// When ctx ends first the agent is asked to cancel the request.
func (c *Client) Call(ctx context.Context, op string, args, result any) error {
	var raw json.RawMessage
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("guest: %s: encode args: %w", op, err)
		}
		raw = b
	}
	c.mu.Lock()
	if c.pending == nil {
		c.mu.Unlock()
		return fmt.Errorf("guest: %s: %w", op, c.brokenErr())
	}
	c.nextID++
	id := c.nextID
	ch := make(chan *Response, 1)
	c.pending[id] = ch
	c.mu.Unlock()

	if err := c.send(&Request{ID: id, Op: op, Args: raw}); err != nil {
		c.forget(id)
		return fmt.Errorf("guest: %s: send: %w", op, err)
	}
	select {
	case resp := <-ch:
		if resp.Error != "" {
			return &RemoteError{Op: op, Msg: resp.Error}
		}
		if result != nil {
			if len(resp.Result) == 0 {
				return fmt.Errorf("guest: %s: empty result", op)
			}
			if err := json.Unmarshal(resp.Result, result); err != nil {
				return fmt.Errorf("guest: %s: decode result: %w", op, err)
			}
		}
		return nil
	case <-c.done:
		return fmt.Errorf("guest: %s: %w", op, c.brokenErr())
	case <-ctx.Done():
		c.forget(id)
		if op != OpCancel {
			// Best effort: the agent stops the work; no reply is expected.
			_ = c.send(&Request{ID: id, Op: OpCancel, Args: mustJSON(CancelRequest{ID: id})})
		}
		return fmt.Errorf("guest: %s: %w", op, ctx.Err())
	}
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	if c.pending != nil {
		delete(c.pending, id)
	}
	c.mu.Unlock()
}

func (c *Client) send(req *Request) error {
	b, err := encode(req)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err = c.rw.Write(b)
	return err
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only used with fixed, marshalable types
	}
	return b
}

// RemoteError is an error reported by the agent.
type RemoteError struct {
	Op  string
	Msg string
}

func (e *RemoteError) Error() string { return "guest: " + e.Op + ": " + e.Msg }

// Ping checks the agent answers.
func (c *Client) Ping(ctx context.Context) (*Pong, error) {
	var p Pong
	return &p, c.Call(ctx, OpPing, nil, &p)
}

// SysInfo reports the guest kernel's version and features.
func (c *Client) SysInfo(ctx context.Context) (*SysInfo, error) {
	var s SysInfo
	return &s, c.Call(ctx, OpSysInfo, nil, &s)
}

// Exec runs a program in the guest and waits for it. A non-zero exit is not
// an error here; check ExecResult.ExitCode (or use Run).
func (c *Client) Exec(ctx context.Context, req ExecRequest) (*ExecResult, error) {
	var r ExecResult
	return &r, c.Call(ctx, OpExec, req, &r)
}

// Run runs argv and fails unless it exits 0; it returns stdout.
func (c *Client) Run(ctx context.Context, argv ...string) ([]byte, error) {
	r, err := c.Exec(ctx, ExecRequest{Argv: argv})
	if err != nil {
		return nil, err
	}
	if r.ExitCode != 0 || r.Signal != "" || r.TimedOut {
		return r.Stdout, fmt.Errorf("guest: %q: exit %d signal %q timed out %v: %s", argv, r.ExitCode, r.Signal, r.TimedOut, r.Stderr)
	}
	return r.Stdout, nil
}

// Mount mounts a file system in the guest.
func (c *Client) Mount(ctx context.Context, req MountRequest) error {
	return c.Call(ctx, OpMount, req, nil)
}

// Unmount unmounts target in the guest.
func (c *Client) Unmount(ctx context.Context, target string, flags int) error {
	return c.Call(ctx, OpUnmount, UnmountRequest{Target: target, Flags: flags}, nil)
}

// TreeHashResult is a tree digest computed in the guest.
type TreeHashResult struct {
	Hash    string           `json:"hash"`
	Entries []treehash.Entry `json:"entries,omitempty"`
}

// TreeHash hashes the guest tree at root with treehash (entries too if asked).
func (c *Client) TreeHash(ctx context.Context, root string, entries bool) (*TreeHashResult, error) {
	var r TreeHashResult
	return &r, c.Call(ctx, OpTreeHash, TreeHashRequest{Root: root, Entries: entries}, &r)
}

// ReadFile reads at most max bytes (0: default bound) of a guest file.
func (c *Client) ReadFile(ctx context.Context, path string, max int64) ([]byte, error) {
	var r ReadFileResult
	if err := c.Call(ctx, OpReadFile, ReadFileRequest{Path: path, Max: max}, &r); err != nil {
		return nil, err
	}
	return r.Data, nil
}

// WriteFile writes a guest file (mode 0 means 0644).
func (c *Client) WriteFile(ctx context.Context, path string, data []byte, mode uint32) error {
	return c.Call(ctx, OpWriteFile, WriteFileRequest{Path: path, Data: data, Mode: mode}, nil)
}

// Start starts a background process in the guest.
func (c *Client) Start(ctx context.Context, req StartRequest) (*StartResult, error) {
	var r StartResult
	return &r, c.Call(ctx, OpStart, req, &r)
}

// StopProcess ends a background process and returns how it ended.
func (c *Client) StopProcess(ctx context.Context, req StopRequest) (*ProcessResult, error) {
	var r ProcessResult
	return &r, c.Call(ctx, OpStop, req, &r)
}

// Sleep makes the agent's handler block for d, printing banner on the guest
// console first. Tests use it to simulate a hung guest.
func (c *Client) Sleep(ctx context.Context, d time.Duration, banner string) error {
	return c.Call(ctx, OpSleep, SleepRequest{Millis: d.Milliseconds(), Banner: banner}, nil)
}

// PowerOff asks the agent to sync and reboot the guest, which ends QEMU when
// it runs with -no-reboot. It returns once the agent acknowledged.
func (c *Client) PowerOff(ctx context.Context) error {
	return c.Call(ctx, OpPowerOff, nil, nil)
}

// Dial connects from the guest to a TCP address, sends send and returns what
// the peer wrote before closing.
func (c *Client) Dial(ctx context.Context, addr string, send []byte) ([]byte, error) {
	var r DialResult
	if err := c.Call(ctx, OpDial, DialRequest{Addr: addr, Send: send}, &r); err != nil {
		return nil, err
	}
	return r.Data, nil
}

// Mkdir creates a guest directory and its parents (mode 0 means 0755).
func (c *Client) Mkdir(ctx context.Context, path string, mode uint32) error {
	return c.Call(ctx, OpMkdir, MkdirRequest{Path: path, Mode: mode}, nil)
}

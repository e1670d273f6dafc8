// Package guest is the control protocol between the testbed host and the agent
// that runs as /init inside a test VM, plus both of its ends: Client (host) and
// Agent (guest).
//
// The wire format is newline-delimited JSON over one byte stream (a
// virtio-serial port or a vsock connection). The host sends Requests, each
// with an id unique among those in flight; the agent answers each with one
// Response carrying the same id, in any order, so several calls can be in
// flight at once. The agent never sends anything unsolicited. Bytes fields
// travel as base64 (encoding/json's []byte form).
package guest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// MaxMessage bounds one encoded message. Larger lines are a protocol error:
// neither side trusts the other to stay small.
const MaxMessage = 64 << 20

// Operations understood by the agent.
const (
	OpPing      = "ping"      // no args; result Pong
	OpSysInfo   = "sysinfo"   // no args; result SysInfo
	OpExec      = "exec"      // ExecRequest; result ExecResult
	OpMount     = "mount"     // MountRequest; no result
	OpUnmount   = "unmount"   // UnmountRequest; no result
	OpTreeHash  = "treehash"  // TreeHashRequest; result TreeHashResult
	OpReadFile  = "readfile"  // ReadFileRequest; result ReadFileResult
	OpWriteFile = "writefile" // WriteFileRequest; no result
	OpStart     = "start"     // StartRequest; result StartResult
	OpStop      = "stop"      // StopRequest; result ProcessResult
	OpSleep     = "sleep"     // SleepRequest; no result (for testing timeouts)
	OpCancel    = "cancel"    // CancelRequest; no result, no reply: cancels a request in flight
	OpPowerOff  = "poweroff"  // no args; replies, then reboots the guest (QEMU -no-reboot exits)
)

// Request is one call from the host.
type Request struct {
	ID   uint64          `json:"id"`
	Op   string          `json:"op"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response answers the Request with the same ID. Error is empty on success.
type Response struct {
	ID     uint64          `json:"id"`
	Error  string          `json:"error,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
}

// Pong answers OpPing.
type Pong struct {
	Agent  string `json:"agent"`  // agent version
	Uptime int64  `json:"uptime"` // guest uptime in milliseconds (from CLOCK_BOOTTIME)
}

// SysInfo describes the guest kernel.
type SysInfo struct {
	KernelRelease string   `json:"kernel_release"`
	KernelVersion string   `json:"kernel_version"`
	Filesystems   []string `json:"filesystems"` // names from /proc/filesystems
	Cachefiles    bool     `json:"cachefiles"`  // /dev/cachefiles exists
	Fanotify      bool     `json:"fanotify"`    // fanotify_init works
	Channel       string   `json:"channel"`     // "virtio-serial" or "vsock"
	CPUs          int      `json:"cpus"`
	UptimeMillis  int64    `json:"uptime_ms"`
}

// ExecRequest runs a program in the guest and waits for it.
type ExecRequest struct {
	Argv      []string `json:"argv"`
	Env       []string `json:"env,omitempty"` // KEY=VALUE; empty: the agent's default PATH only
	Dir       string   `json:"dir,omitempty"`
	Stdin     []byte   `json:"stdin,omitempty"`
	TimeoutMS int64    `json:"timeout_ms,omitempty"` // 0: until the request is cancelled
}

// ExecResult is how the program ended. Stdout and Stderr are truncated to
// MaxOutput bytes each (Truncated says so).
type ExecResult struct {
	ExitCode  int    `json:"exit_code"` // -1 when killed by a signal
	Signal    string `json:"signal,omitempty"`
	TimedOut  bool   `json:"timed_out,omitempty"`
	Stdout    []byte `json:"stdout,omitempty"`
	Stderr    []byte `json:"stderr,omitempty"`
	Truncated bool   `json:"truncated,omitempty"`
}

// MaxOutput bounds each captured output stream of an exec.
const MaxOutput = 16 << 20

// MountRequest is mount(2). Flags are MS_* bits.
type MountRequest struct {
	Source string `json:"source"`
	Target string `json:"target"`
	FSType string `json:"fstype"`
	Flags  uint64 `json:"flags,omitempty"`
	Data   string `json:"data,omitempty"`
	Mkdir  bool   `json:"mkdir,omitempty"` // create Target (and parents) first
}

// UnmountRequest is umount2(2). Flags are MNT_* / UMOUNT_* bits.
type UnmountRequest struct {
	Target string `json:"target"`
	Flags  int    `json:"flags,omitempty"`
}

// TreeHashRequest hashes the tree under Root with package treehash.
type TreeHashRequest struct {
	Root    string `json:"root"`
	Entries bool   `json:"entries,omitempty"` // also return the entry list (for diffs)
}

// ReadFileRequest reads a file, at most Max bytes (0: MaxMessage/2).
type ReadFileRequest struct {
	Path string `json:"path"`
	Max  int64  `json:"max,omitempty"`
}

// ReadFileResult holds the bytes read.
type ReadFileResult struct {
	Data      []byte `json:"data"`
	Truncated bool   `json:"truncated,omitempty"`
}

// WriteFileRequest creates or replaces a file (parents are created).
type WriteFileRequest struct {
	Path string `json:"path"`
	Data []byte `json:"data"`
	Mode uint32 `json:"mode,omitempty"` // 0: 0644
}

// StartRequest starts a background process. Its stdout and stderr are copied
// to the guest console, each line prefixed with "[Name] ", and the last
// MaxOutput bytes are kept for the ProcessResult.
type StartRequest struct {
	Name string   `json:"name,omitempty"` // for the console prefix; default: base of Argv[0]
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`
	Dir  string   `json:"dir,omitempty"`
}

// StartResult identifies a started process.
type StartResult struct {
	Handle int `json:"handle"`
	PID    int `json:"pid"`
}

// StopRequest ends a background process: Signal (default SIGTERM), then
// SIGKILL after GraceMS (default 5000) if it has not exited.
type StopRequest struct {
	Handle  int    `json:"handle"`
	Signal  string `json:"signal,omitempty"` // "TERM", "INT", "KILL", ...
	GraceMS int64  `json:"grace_ms,omitempty"`
}

// ProcessResult is how a background process ended.
type ProcessResult struct {
	ExitCode int    `json:"exit_code"`
	Signal   string `json:"signal,omitempty"`
	Killed   bool   `json:"killed,omitempty"` // needed SIGKILL after the grace period
	Output   []byte `json:"output,omitempty"` // tail of stdout+stderr
}

// SleepRequest blocks the agent's handler (not the guest) for Millis.
type SleepRequest struct {
	Millis int64 `json:"millis"`
	// Banner, when set, is printed on the guest console before sleeping.
	Banner string `json:"banner,omitempty"`
}

// CancelRequest cancels request ID if it is still running.
type CancelRequest struct {
	ID uint64 `json:"id"`
}

// ErrMessageTooLarge is returned for a line longer than MaxMessage.
var ErrMessageTooLarge = errors.New("guest: message too large")

// readLine reads one newline-terminated message of at most MaxMessage bytes.
func readLine(r *bufio.Reader) ([]byte, error) { return readLineMax(r, MaxMessage) }

// readLineMax reads one line of at most max bytes. A longer line is consumed
// whole and reported as ErrMessageTooLarge, so the stream stays in step.
func readLineMax(r *bufio.Reader, max int) ([]byte, error) {
	var buf []byte
	tooLarge := false
	for {
		frag, err := r.ReadSlice('\n')
		if !tooLarge && len(buf)+len(frag) > max {
			tooLarge, buf = true, nil
		}
		if !tooLarge {
			buf = append(buf, frag...)
		}
		if err == nil {
			if tooLarge {
				return nil, ErrMessageTooLarge
			}
			return bytes.TrimRight(buf, "\r\n"), nil
		}
		if err != bufio.ErrBufferFull {
			if err == io.EOF && (len(buf) > 0 || tooLarge) {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

// DecodeRequest parses one request line and checks it is well formed.
func DecodeRequest(line []byte) (*Request, error) {
	var req Request
	if err := json.Unmarshal(line, &req); err != nil {
		return nil, fmt.Errorf("guest: bad request: %w", err)
	}
	if req.ID == 0 {
		return nil, errors.New("guest: bad request: id 0")
	}
	if req.Op == "" {
		return nil, fmt.Errorf("guest: bad request %d: no op", req.ID)
	}
	return &req, nil
}

// DecodeResponse parses one response line and checks it is well formed.
func DecodeResponse(line []byte) (*Response, error) {
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("guest: bad response: %w", err)
	}
	if resp.ID == 0 {
		return nil, errors.New("guest: bad response: id 0")
	}
	return &resp, nil
}

// encode marshals v as one line.
func encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if len(b)+1 > MaxMessage {
		return nil, ErrMessageTooLarge
	}
	return append(b, '\n'), nil
}

// OpMkdir creates a directory and its parents (MkdirRequest; no result).
const OpMkdir = "mkdir"

// MkdirRequest is mkdir -p.
type MkdirRequest struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode,omitempty"` // 0: 0755
}

// OpDial connects to a TCP address from the guest (DialRequest; result
// DialResult): a network check that needs no tools in the guest.
const OpDial = "dial"

// DialRequest connects to Addr, writes Send, and reads until EOF (at most 1 MiB).
type DialRequest struct {
	Addr      string `json:"addr"`
	Send      []byte `json:"send,omitempty"`
	TimeoutMS int64  `json:"timeout_ms,omitempty"` // 0: 10 s
}

// DialResult holds the bytes read.
type DialResult struct {
	Data []byte `json:"data"`
}

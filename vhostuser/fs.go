package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/rafsd/rafsd/vhostuser/virtqueue"
)

// FSOptions configure a virtio-fs device.
type FSOptions struct {
	// Tag is the mount tag reported in the config space (only front ends
	// that read the config over GET_CONFIG use it; QEMU's
	// vhost-user-fs-pci takes the tag from its own command line).
	Tag string
	// RequestQueues is the largest number of request queues supported
	// (default 1); the front end chooses how many it uses.
	RequestQueues int
	// Workers bounds concurrent requests per queue (default 8).
	Workers int
	// MountOptions are passed to go-fuse's protocol server.
	MountOptions fuse.MountOptions
	// Logger receives protocol errors (default slog.Default()).
	Logger *slog.Logger
}

// FSDevice is a virtio-fs device: queue 0 is the high-priority queue
// (FORGET, BATCH_FORGET, INTERRUPT), the others carry FUSE requests. Each
// chain's readable buffers are one FUSE request and its writable buffers
// receive the reply; requests go to a go-fuse protocol server over the
// RawFileSystem, the same code path as the FUSE mount.
type FSDevice struct {
	fs   fuse.RawFileSystem
	opts FSOptions
	ps   atomic.Pointer[fuse.ProtocolServer]
}

// NewFSDevice returns a virtio-fs device serving fs.
func NewFSDevice(fs fuse.RawFileSystem, opts FSOptions) *FSDevice {
	if opts.RequestQueues <= 0 {
		opts.RequestQueues = 1
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MountOptions.Logger == nil {
		opts.MountOptions.Logger = log.New(slogWriter{opts.Logger}, "", 0)
	}
	d := &FSDevice{fs: fs, opts: opts}
	d.Reset()
	return d
}

type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Warn("virtio-fs: fuse protocol", "msg", string(p))
	return len(p), nil
}

// Serve listens on socketPath (replacing a stale socket) and serves front
// ends one after another until ctx ends.
func (d *FSDevice) Serve(ctx context.Context, socketPath string) error {
	if err := os.Remove(socketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		return fmt.Errorf("vhost-user listen: %w", err)
	}
	defer os.Remove(socketPath)
	return Serve(ctx, l, d, d.backendOptions())
}

// ServeListener is Serve on an existing listener (closed when ctx ends).
func (d *FSDevice) ServeListener(ctx context.Context, l *net.UnixListener) error {
	return Serve(ctx, l, d, d.backendOptions())
}

func (d *FSDevice) backendOptions() Options {
	return Options{Workers: d.opts.Workers, Logger: d.opts.Logger}
}

// virtio-fs feature set: VERSION_1 and the ring features we implement.
const fsFeatures = FeatureVersion1 | virtqueue.FeatureIndirectDesc | virtqueue.FeatureEventIdx

// Features implements Device.
func (d *FSDevice) Features() uint64 { return fsFeatures }

// NumQueues implements Device: hiprio plus the request queues.
func (d *FSDevice) NumQueues() int { return 1 + d.opts.RequestQueues }

// Config implements Device: struct virtio_fs_config (tag[36],
// num_request_queues, notify_buf_size).
func (d *FSDevice) Config() []byte {
	b := make([]byte, 44)
	copy(b[:36], d.opts.Tag)
	binary.LittleEndian.PutUint32(b[36:], uint32(d.opts.RequestQueues))
	return b
}

// Reset implements Device: a new guest session gets a fresh protocol
// server (the guest sends FUSE_INIT again).
func (d *FSDevice) Reset() {
	d.ps.Store(fuse.NewProtocolServer(d.fs, &d.opts.MountOptions))
}

// Handle implements Device.
func (d *FSDevice) Handle(_ int, c *virtqueue.Chain) uint32 {
	n, st := d.ps.Load().HandleRequest(c.Readable, c.Writable)
	if !st.Ok() {
		return errorReply(c, st)
	}
	return uint32(n)
}

// Fail implements Device: a malformed chain gets EIO if its header and
// a writable buffer could be decoded.
func (d *FSDevice) Fail(_ int, c *virtqueue.Chain, _ error) uint32 {
	return errorReply(c, fuse.EIO)
}

// errorReply writes a bare fuse_out_header with -errno into c.Writable,
// echoing the request's unique id.
func errorReply(c *virtqueue.Chain, st fuse.Status) uint32 {
	var in [16]byte
	if copyFrom(in[:], c.Readable) < len(in) {
		return 0
	}
	if op := binary.LittleEndian.Uint32(in[4:]); op == opForget || op == opBatchForget {
		return 0 // no reply expected
	}
	var out [16]byte
	binary.LittleEndian.PutUint32(out[0:], 16)
	binary.LittleEndian.PutUint32(out[4:], uint32(-int32(syscall.Errno(st))))
	copy(out[8:], in[8:16])
	if copyTo(c.Writable, out[:]) < len(out) {
		return 0
	}
	return 16
}

const (
	opForget      = 2
	opBatchForget = 42
)

func copyFrom(dst []byte, iov [][]byte) int {
	n := 0
	for _, b := range iov {
		n += copy(dst[n:], b)
		if n == len(dst) {
			break
		}
	}
	return n
}

func copyTo(iov [][]byte, src []byte) int {
	total := 0
	for _, b := range iov {
		total += len(b)
	}
	if total < len(src) {
		return 0
	}
	n := 0
	for _, b := range iov {
		n += copy(b, src[n:])
		if n == len(src) {
			break
		}
	}
	return n
}

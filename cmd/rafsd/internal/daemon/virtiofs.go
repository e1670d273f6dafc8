package daemon

// This file is the virtio-fs mode (`rafsd virtiofs`, and Kata's
// virtio-fs-nydus mode, which starts the daemon with --sock and no
// subcommand): the same vfs and mount API as the FUSE mode, served to a
// VMM through a vhost-user-fs socket instead of /dev/fuse.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/rafsd/rafsd/vhostuser"
)

// VirtioFSOptions configure ServeVirtioFS.
type VirtioFSOptions struct {
	// Socket is the vhost-user socket path (--sock) the VMM connects to.
	Socket string
	// Tag is the tag reported in the device's config space; QEMU takes the
	// guest-visible tag from its own command line instead.
	Tag string
	// RequestQueues is the largest number of request queues offered
	// (default 1, what QEMU's vhost-user-fs-pci uses unless told more).
	RequestQueues int
	// Workers bounds concurrent requests per queue (--thread-num).
	Workers int
	// StopTimeout bounds how long shutdown waits for the device to stop
	// its rings; Kata kills the daemon 5 s after SIGTERM.
	StopTimeout time.Duration
}

// ServeVirtioFS serves the daemon's vfs as a vhost-user virtio-fs device on
// o.Socket until ctx ends (SIGTERM), the exit API is called, or the
// listener fails. The daemon is RUNNING from the moment the socket exists:
// mounts can be added through the API before and while a VMM is connected,
// and a VMM that disconnects can reconnect without a restart.
func (d *Daemon) ServeVirtioFS(ctx context.Context, o VirtioFSOptions) error {
	if o.Socket == "" {
		return fmt.Errorf("%w: virtio-fs needs --sock", ErrInvalid)
	}
	if d.opts.Upgrade {
		// There is no /dev/fuse connection to hand over: the VMM holds
		// the device state and reconnects to a new daemon by itself.
		return fmt.Errorf("%w: --upgrade in virtio-fs mode", ErrUnsupported)
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 3 * time.Second
	}
	if d.opts.Initial != nil {
		if err := d.Mount(d.opts.InitialPath, *d.opts.Initial); err != nil {
			return err
		}
	}
	workers := o.Workers
	if workers <= 0 {
		workers = d.opts.Threads
	}
	dev := vhostuser.NewFSDevice(d.vfs, vhostuser.FSOptions{
		Tag:           o.Tag,
		RequestQueues: o.RequestQueues,
		Workers:       workers,
		Logger:        d.log,
	})
	if err := os.Remove(o.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("vhost-user socket %s: %w", o.Socket, err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: o.Socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("vhost-user socket: %w", err)
	}
	defer os.Remove(o.Socket)

	d.mu.Lock()
	d.state = StateRunning
	d.mu.Unlock()
	d.log.Info("serving virtio-fs", "sock", o.Socket, "request_queues", max(o.RequestQueues, 1), "workers", workers)

	// The device gets its own context so that shutdown can bound how long
	// it waits for the rings to stop.
	sctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- dev.ServeListener(sctx, l) }()

	var serveErr error
	select {
	case <-ctx.Done():
		d.log.Info("terminating: stopping the virtio-fs device")
	case <-d.exit:
		d.log.Info("exit requested: stopping the virtio-fs device")
		serveErr = d.exitErr
	case err := <-served:
		served = nil
		if err != nil {
			serveErr = fmt.Errorf("vhost-user: %w", err)
		}
	}
	cancel()
	if served != nil {
		select {
		case err := <-served:
			if err != nil && !errors.Is(err, net.ErrClosed) {
				d.log.Warn("virtio-fs device stopped with an error", "err", err)
			}
		case <-time.After(o.StopTimeout):
			// A request stuck in a backend must not keep the process
			// past the VMM's grace period; the mounts are closed below.
			d.log.Warn("virtio-fs device did not stop in time", "timeout", o.StopTimeout)
		}
	}
	d.shutdown(false)
	return serveErr
}

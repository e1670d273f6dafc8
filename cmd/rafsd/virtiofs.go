package main

import (
	"context"
	"errors"
	"log/slog"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/rafsd/rafsd/cmd/rafsd/internal/api"
	"github.com/rafsd/rafsd/cmd/rafsd/internal/daemon"
	"github.com/rafsd/rafsd/internal/version"
)

// runVirtiofs is `rafsd virtiofs --sock S --apisock S`, and how Kata's
// virtio-fs-nydus mode starts the daemon (--sock, no subcommand): the vfs
// is served to the VMM over vhost-user; images and the sandbox's shared
// directory are mounted into it through the API.
func runVirtiofs(a *args, log *slog.Logger, level *slog.LevelVar) error {
	if a.sock == "" {
		return errors.New("--sock is required in virtio-fs mode")
	}
	if a.mountpoint != "" {
		return errors.New("--mountpoint and --sock are exclusive")
	}
	if a.bootstrap != "" && a.sharedDir != "" {
		return errors.New("--bootstrap and --shared-dir are exclusive")
	}
	if a.upgrade {
		return errors.New("--upgrade is not supported in virtio-fs mode")
	}
	raiseNofile(a.rlimitNofile, log)
	opts := daemon.Options{
		ID: a.id, Threads: a.threads, Writable: true,
		Logger: log, LogLevel: level, InitialPath: a.virtualMountpoint,
	}
	switch {
	case a.bootstrap != "":
		cfg, err := initialConfig(a)
		if err != nil {
			return err
		}
		b, err := filepath.Abs(a.bootstrap)
		if err != nil {
			return err
		}
		opts.Initial = &daemon.MountCmd{Source: b, FsType: daemon.FsTypeRafs, Config: cfg}
	case a.sharedDir != "":
		s, err := filepath.Abs(a.sharedDir)
		if err != nil {
			return err
		}
		opts.Initial = &daemon.MountCmd{Source: s, FsType: daemon.FsTypePassthrough}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts.Registry = reg
	d := daemon.New(opts)

	// The API socket comes first: Kata stats it 3 times 100 ms apart, and
	// mounts the shared directory before QEMU connects.
	closeListeners, err := serveListeners(a, api.New(d, reg, log), reg)
	if err != nil {
		return err
	}
	defer closeListeners()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("rafsd started", "version", version.Version, "mode", "virtiofs", "sock", a.sock, "apisock", a.apisock)
	return d.ServeVirtioFS(ctx, daemon.VirtioFSOptions{Socket: a.sock, Tag: a.id, Workers: a.threads})
}

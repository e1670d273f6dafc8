package main

import (
	"context"
	"errors"
	"log/slog"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/rafsd/rafsd/fscache/fanotifyfs"
)

// runFanotify is `rafsd fanotify --bootstrap B --mountpoint DIR --config C`:
// one on-demand EROFS mount fed through fanotify pre-content events
// (fscache/fanotifyfs) until SIGTERM/SIGINT. With --supervisor the group
// and the mount are handed to the supervisor, and --upgrade takes them
// back after a restart; without one a guard process fails reads with EIO
// if the daemon dies. The HTTP mount API does not serve this mode yet.
func runFanotify(a *args, log *slog.Logger) error {
	if a.upgrade && a.supervisor == "" {
		return errors.New("--upgrade needs --supervisor")
	}
	var mounts []fanotifyfs.MountSpec
	if !a.upgrade {
		if a.bootstrap == "" || a.mountpoint == "" {
			return errors.New("fanotify mode needs --bootstrap and --mountpoint (or --upgrade)")
		}
		cfg, err := initialConfig(a)
		if err != nil {
			return err
		}
		boot, err := filepath.Abs(a.bootstrap)
		if err != nil {
			return err
		}
		mp, err := filepath.Abs(a.mountpoint)
		if err != nil {
			return err
		}
		mounts = append(mounts, fanotifyfs.MountSpec{Bootstrap: boot, Mountpoint: mp, Config: cfg})
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return fanotifyfs.RunDaemon(ctx, fanotifyfs.DaemonOptions{
		Mounts:     mounts,
		Supervisor: a.supervisor,
		Upgrade:    a.upgrade,
		Workers:    a.threads,
		Logger:     log,
		Guard:      true,
		Ready: func(*fanotifyfs.Server, *fanotifyfs.Guard) {
			log.Info("fanotify mode ready", "mountpoint", a.mountpoint)
		},
	})
}

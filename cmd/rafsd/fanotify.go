package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rafsd/rafsd/fscache/fanotifyfs"
)

// runFanotify is the fanotify mode: on-demand EROFS mounts fed through
// fanotify pre-content events (fscache/fanotifyfs) until SIGTERM/SIGINT
// or PUT /api/v1/daemon/exit.
//
//	rafsd fanotify --apisock S [--config C] [--thread-num N]
//	rafsd fanotify --bootstrap B --mountpoint DIR --config C
//
// With --apisock, images are mounted and unmounted through the v1 mount API
// (fs_type "fanotify"; --config is the default config of mounts that bring
// none); with --bootstrap one mount is made at start. With --supervisor the
// group and the mounts are handed to the supervisor, and --upgrade takes
// them back after a restart (answering the events the dead daemon held);
// without one a guard process fails reads with EIO if the daemon dies, and
// exits once the last reader of its detached mounts closes. A restarted
// daemon, with a supervisor or without, takes the groups over from that
// guard at start in every cache directory it knows (its mounts', and
// --config's for later API mounts) and at every mount from another one
// (package fscache/fanotifyfs/guard): its mounts read right, and so do the
// readers of the old detached mounts once their image is mounted again.
func runFanotify(a *args, log *slog.Logger) error {
	if a.upgrade && a.supervisor == "" {
		return errors.New("--upgrade needs --supervisor")
	}
	var mounts []fanotifyfs.MountSpec
	if !a.upgrade && a.bootstrap != "" {
		if a.mountpoint == "" {
			return errors.New("fanotify mode: --bootstrap needs --mountpoint")
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
	if !a.upgrade && len(mounts) == 0 && a.apisock == "" {
		return errors.New("fanotify mode needs --apisock, or --bootstrap and --mountpoint (or --upgrade)")
	}
	var defaultConfig string
	if a.config != "" {
		var err error
		if defaultConfig, err = initialConfig(a); err != nil {
			return err
		}
	}
	var cacheDirs []string
	if dir := fanotifyfs.ConfigCacheDir(defaultConfig); dir != "" {
		cacheDirs = append(cacheDirs, dir)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := fanotifyfs.StartDaemon(fanotifyfs.DaemonOptions{
		CacheDirs:  cacheDirs,
		Mounts:     mounts,
		Supervisor: a.supervisor,
		Upgrade:    a.upgrade,
		Workers:    a.threads,
		Logger:     log,
		Guard:      true,
	})
	if err != nil {
		return err
	}
	api := newFanotifyAPI(d, a.id, a.supervisor, defaultConfig, stop, log)
	closeListeners, err := serveListeners(a, api, prometheus.NewRegistry())
	if err != nil {
		return errors.Join(err, d.Close())
	}
	guardPid := 0
	if g := d.Guard(); g != nil {
		guardPid = g.Pid()
	}
	log.Info("fanotify mode ready", "apisock", a.apisock, "mounts", len(d.Mounts()), "guard", guardPid)
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-d.Done():
		serveErr = fmt.Errorf("fanotify group failed: %w", serveErr)
	}
	closeListeners()
	return errors.Join(serveErr, d.Close())
}

// Command cachefilesd is a minimal EROFS-over-fscache daemon built on
// package cachefiles, for the QEMU guest scenarios: it binds the images
// named by -bind files (PUT /api/v2/blobs bodies), serves the kernel, and
// writes its counters to -stats as JSON every 100 ms. SIGUSR2 hands the
// device over to a fresh copy of itself (exec, device fd inherited):
// the restart path. SIGTERM closes the daemon.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/fscache/cachefiles"
)

type binds []string

func (b *binds) String() string     { return strings.Join(*b, ",") }
func (b *binds) Set(s string) error { *b = append(*b, s); return nil }

func main() {
	var (
		dir      = flag.String("dir", "/var/cache/fscache", "cache directory")
		tag      = flag.String("tag", "", "cache tag")
		threads  = flag.Int("threads", 4, "READ workers")
		stats    = flag.String("stats", "", "write counters here as JSON")
		adoptFD  = flag.Int("adopt-fd", -1, "adopt this bound device fd (restart)")
		restart  = flag.String("restart-file", "", "when this file appears, remove it and hand over to a new process")
		noRA     = flag.Bool("no-readahead", false, "fill only what the kernel asks for")
		bindList binds
	)
	flag.Var(&bindList, "bind", "JSON file holding a PUT /api/v2/blobs body (repeatable)")
	dropCaches := flag.Bool("drop-caches", false, "write 3 to /proc/sys/vm/drop_caches and exit (the guest has no shell)")
	flag.Parse()
	if *dropCaches {
		unix.Sync()
		if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if err := run(log, *dir, *tag, *threads, *stats, *restart, *adoptFD, *noRA, bindList); err != nil {
		log.Error("cachefilesd", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, dir, tag string, threads int, statsPath, restartPath string, adoptFD int, noRA bool, bindList []string) error {
	cfg := cachefiles.Config{Dir: dir, Tag: tag, Threads: threads, Logger: log, NoReadAhead: noRA}
	if adoptFD >= 0 {
		cfg.Device = os.NewFile(uintptr(adoptFD), "cachefiles")
	}
	d, err := cachefiles.New(cfg)
	if err != nil {
		return err
	}
	for _, p := range bindList {
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		var req cachefiles.BindRequest
		if err := json.Unmarshal(data, &req); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if err := d.BindBlob(&req); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR2)
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var seq uint64
	writeStats := func() {
		if statsPath == "" {
			return
		}
		seq++
		backend, _ := d.BackendMetrics("") // "": no error, the sums over all images
		b, _ := json.Marshal(struct {
			cachefiles.Stats
			BackendBytes uint64
			Pid          int
			Adopted      bool
			Seq          uint64 // a reader waits for a later Seq to see counts as of now
		}{d.Stats(), backend.ReadAmountTotal, os.Getpid(), adoptFD >= 0, seq})
		tmp := statsPath + ".tmp"
		if os.WriteFile(tmp, b, 0o644) == nil {
			os.Rename(tmp, statsPath)
		}
	}
	log.Info("cachefilesd serving", "dir", dir, "adopted", adoptFD >= 0, "binds", len(bindList))
	for {
		select {
		case <-tick.C:
			writeStats()
			if restartPath == "" {
				continue
			}
			if err := os.Remove(restartPath); err == nil {
				sigs <- syscall.SIGUSR2
			}
		case err := <-done:
			d.Close()
			return err
		case s := <-sigs:
			if s != syscall.SIGUSR2 {
				writeStats()
				return d.Close()
			}
			f, err := d.Detach()
			if err != nil {
				return err
			}
			fd := int(f.Fd())
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
				return fmt.Errorf("clearing close-on-exec: %w", err)
			}
			args := []string{os.Args[0], "-dir", dir, "-threads", strconv.Itoa(threads), "-stats", statsPath, "-adopt-fd", strconv.Itoa(fd), "-restart-file", restartPath}
			if noRA {
				args = append(args, "-no-readahead")
			}
			if tag != "" {
				args = append(args, "-tag", tag)
			}
			for _, b := range bindList {
				args = append(args, "-bind", b)
			}
			log.Info("cachefilesd handing over to a new process", "fd", fd)
			exe, _ := os.Executable()
			return syscall.Exec(exe, args, os.Environ())
		}
	}
}

// Command guest-agent is /init of the testbed's initramfs: it sets up a
// minimal system and runs what the host asks over the control channel (see
// package guest). Run with -stdio it serves on stdin/stdout instead, which is
// how it is tested outside a VM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/internal/version"
)

func main() {
	stdio := flag.Bool("stdio", false, "serve the control protocol on stdin/stdout (not as /init)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a := &guest.Agent{Version: version.Version, Console: os.Stderr, Log: log}
	ctx := context.Background()
	if *stdio {
		a.PowerOff = func() error { os.Exit(0); return nil }
		// EOF on stdin is the normal end of a session.
		if err := a.Serve(ctx, stdioRW{}); err != nil && !errors.Is(err, io.EOF) {
			log.Error("serve", "err", err)
			os.Exit(1)
		}
		return
	}
	if err := runInit(ctx, a, log); err != nil {
		fmt.Fprintf(os.Stderr, "rafsd-guest-agent: fatal: %v\n", err)
	}
	if os.Getpid() == 1 {
		// init must not exit (the kernel would panic); end the VM instead.
		time.Sleep(500 * time.Millisecond)
		unix.Sync()
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
		select {}
	}
	os.Exit(1)
}

func runInit(ctx context.Context, a *guest.Agent, log *slog.Logger) error {
	if err := guest.SetupSystem(); err != nil {
		return err
	}
	os.Setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
	os.Setenv("HOME", "/root")
	eth0, err := guest.SetupNetwork()
	if err != nil {
		return err
	}
	channel := guest.KernelParam("rafsd.ctl")
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	// The host's console log shows this line; tests look for it.
	fmt.Fprintf(os.Stderr, "rafsd-guest-agent %s: up at %.3fs (eth0 %v, channel %q)\n",
		version.Version, float64(ts.Nano())/1e9, eth0, channel)
	log.Debug("serving")
	return a.ServeChannel(ctx, channel)
}

// stdioRW joins stdin and stdout into one stream.
type stdioRW struct{}

func (stdioRW) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdioRW) Write(p []byte) (int, error) { return os.Stdout.Write(p) }

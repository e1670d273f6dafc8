// Command testbed builds the guest kernel and boots test VMs by hand.
//
//	testbed kernel                 build (or find cached) the guest kernel
//	testbed boot [flags]           boot a VM, report, run commands, stop
//
// Example: watch the console of a booting guest and run a program in it:
//
//	go run ./cmd/testbed boot --console --file bin/rafsd:/bin/rafsd --exec "/bin/rafsd --version"
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/testbed"
	"github.com/rafsd/rafsd/testbed/initramfs"
	"github.com/rafsd/rafsd/testbed/kernel"
)

func usage() {
	fmt.Fprintf(os.Stderr, "usage: testbed kernel | testbed boot [flags]\n")
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "kernel":
		err = kernelCmd(ctx, os.Args[2:])
	case "boot":
		err = bootCmd(ctx, os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testbed:", err)
		os.Exit(1)
	}
}

func logf(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }

func kernelCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kernel", flag.ExitOnError)
	cache := fs.String("cache", kernel.DefaultCacheDir(), "cache directory (env RAFSD_TESTBED_CACHE)")
	fs.Parse(args)
	b, err := kernel.Ensure(ctx, kernel.Options{CacheDir: *cache, Logf: logf})
	if err != nil {
		return err
	}
	fmt.Printf("%s\t(source %s %s, key %s, built in %s with -j%d, cached %v)\n",
		b.Path, kernel.SourcePackage, b.SourceVersion, b.Key, b.BuildTime, b.Jobs, b.Cached)
	return nil
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(s string) error { *l = append(*l, s); return nil }

func bootCmd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("boot", flag.ExitOnError)
	console := fs.Bool("console", false, "copy the guest console to stderr as it runs")
	mem := fs.Int("mem", 512, "guest memory in MiB")
	cpus := fs.Int("cpus", 2, "guest CPUs")
	netOn := fs.Bool("net", false, "user-mode network (guest 10.0.2.15, host loopback at 10.0.2.2)")
	timeout := fs.Duration("timeout", 10*time.Minute, "hard limit on the VM's life")
	wait := fs.Bool("wait", false, "keep the VM running until interrupted")
	keep := fs.Bool("keep", false, "keep the work directory (console.log, initrd.gz)")
	verbose := fs.Bool("verbose", false, "boot without 'quiet'")
	var disks, files, execs, virtiofs, fwd listFlag
	fs.Var(&disks, "disk", "raw disk image for virtio-blk (repeatable)")
	fs.Var(&files, "file", "HOST:GUEST file to add to the initramfs (repeatable)")
	fs.Var(&execs, "exec", "command to run in the guest, space separated (repeatable)")
	fs.Var(&virtiofs, "virtiofs", "SOCKET:TAG vhost-user-fs device (repeatable)")
	fs.Var(&fwd, "hostfwd", "user-net hostfwd rule, e.g. tcp:127.0.0.1:2222-:22 (repeatable)")
	fs.Parse(args)

	o := testbed.Options{
		MemoryMiB: *mem, CPUs: *cpus, Net: *netOn, HostFwd: fwd, Timeout: *timeout,
		Disks: disks, KeepDir: *keep, Verbose: *verbose, Logf: logf,
	}
	if *console {
		o.Console = os.Stderr
	}
	for _, f := range files {
		host, g, ok := strings.Cut(f, ":")
		if !ok {
			return fmt.Errorf("--file %q: want HOST:GUEST", f)
		}
		o.Files = append(o.Files, initramfs.File{Path: g, Source: host})
	}
	for _, v := range virtiofs {
		sock, tag, ok := strings.Cut(v, ":")
		if !ok {
			return fmt.Errorf("--virtiofs %q: want SOCKET:TAG", v)
		}
		o.VirtioFS = append(o.VirtioFS, testbed.VirtioFS{Socket: sock, Tag: tag})
	}
	vm, err := testbed.Start(ctx, o)
	if err != nil {
		return err
	}
	defer func() {
		if err := vm.Stop(); err != nil {
			logf("stop: %v", err)
		}
		if *keep {
			logf("work directory kept: %s", vm.Dir())
		}
	}()
	a := vm.Agent()
	info, err := a.SysInfo(ctx)
	if err != nil {
		return err
	}
	b, _ := json.MarshalIndent(info, "", "  ")
	fmt.Printf("boot-to-agent %s\n%s\n", vm.BootTime().Round(time.Millisecond), b)
	for _, e := range execs {
		r, err := a.Exec(ctx, guest.ExecRequest{Argv: strings.Fields(e)})
		if err != nil {
			return err
		}
		fmt.Printf("$ %s\n%s%s(exit %d%s)\n", e, r.Stdout, r.Stderr, r.ExitCode, r.Signal)
	}
	if *wait {
		logf("VM running (console log %s/console.log); interrupt to stop", vm.Dir())
		select {
		case <-ctx.Done():
		case <-vm.Done():
			return vm.Err()
		}
	}
	return nil
}

// Package testbed boots throwaway QEMU guests for integration tests: our own
// kernel (package kernel), an initramfs whose /init is the guest agent
// (cmd/guest-agent) plus any files a scenario needs, and a control channel
// to the agent (virtio-serial, or vsock when the host has vhost-vsock).
//
// Every VM has a hard timeout after which QEMU is killed, its console log is
// kept and attached to errors, and Stop always ends QEMU: power off through
// the agent, then SIGTERM, then SIGKILL (QEMU ignores SIGTERM while a
// vhost-user device hangs in stop).
package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/testbed/initramfs"
	"github.com/rafsd/rafsd/testbed/kernel"
)

// VirtioFS is a vhost-user-fs device: QEMU connects to a daemon on Socket;
// the guest mounts it with `mount -t virtiofs TAG DIR`.
type VirtioFS struct {
	Socket    string
	Tag       string
	QueueSize int // 0: 1024
}

// Options describe a VM. Zero values pick the defaults.
type Options struct {
	MemoryMiB int    // default 512
	CPUs      int    // default 2
	Kernel    string // bzImage; default: $RAFSD_TESTBED_KERNEL, else kernel.Ensure (builds on first use)
	Agent     string // guest agent binary; default: built from ./cmd/guest-agent
	// Files are added to the initramfs (e.g. a static rafsd in /bin).
	Files    []initramfs.File
	VirtioFS []VirtioFS
	// Disks are raw image files attached as virtio-blk, /dev/vda, vdb, ... in order.
	Disks []string
	// Net adds a virtio-net NIC on QEMU user-mode networking; the agent gives
	// it 10.0.2.15/24, gateway 10.0.2.2, which reaches the host's loopback.
	Net     bool
	HostFwd []string // user-net hostfwd rules, e.g. "tcp:127.0.0.1:5555-:5555"
	// Timeout is the VM's whole lifetime: QEMU is killed when it passes.
	// Default 10 minutes.
	Timeout time.Duration
	// BootTimeout bounds start to first agent reply. Default 3 minutes: a
	// loaded 2-core host was measured at 60 s where an idle one takes 2-3 s.
	BootTimeout time.Duration
	// Append is added to the kernel command line.
	Append string
	// Verbose drops "quiet" from the kernel command line.
	Verbose bool
	// Console also receives the guest console as it is written.
	Console io.Writer
	// Logf reports progress (e.g. t.Logf); nil: silent.
	Logf func(format string, args ...any)
	// Channel forces "virtio-serial" or "vsock"; default: vsock when the
	// host has /dev/vhost-vsock.
	Channel string
	// QEMU is the emulator binary; default qemu-system-x86_64.
	QEMU string
	// KeepDir keeps the VM's work directory (console log, initramfs) after Stop.
	KeepDir bool
}

// VM is a running guest.
type VM struct {
	opts    Options
	name    string
	ctlSock string
	cid     uint32
	dir     string
	cmd     *exec.Cmd
	console *consoleLog
	agent   *guest.Client
	boot    time.Duration
	started time.Time

	done    chan struct{} // closed when QEMU has exited
	waitErr error

	mu     sync.Mutex
	reason error // why the harness killed QEMU (timeout), if it did

	stopOnce sync.Once
	stopErr  error
	timer    *time.Timer
}

// vmSeq numbers VMs of this process; QEMU's -name carries it so leftovers are found.
var vmSeq atomic.Int64

// NamePrefix is the QEMU -name prefix of VMs started by this process.
func NamePrefix() string { return fmt.Sprintf("rafsd-testbed-%d-", os.Getpid()) }

// Start boots a VM and waits until its agent answers.
func Start(ctx context.Context, o Options) (vm *VM, err error) {
	vm, err = launch(ctx, &o)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			vm.Stop()
			vm = nil
		}
	}()
	bootCtx, cancel := context.WithTimeout(ctx, o.BootTimeout)
	defer cancel()
	conn, err := vm.connect(bootCtx, vm.ctlSock, vm.cid)
	if err != nil {
		return vm, vm.annotate(fmt.Errorf("testbed: control channel: %w", err))
	}
	vm.agent = guest.NewClient(conn, vm.fate)
	if err := vm.waitAgent(bootCtx); err != nil {
		return vm, vm.annotate(fmt.Errorf("testbed: agent did not answer: %w", err))
	}
	vm.boot = time.Since(vm.started)
	o.Logf("testbed: %s: agent up after %s", vm.name, vm.boot.Round(time.Millisecond))
	return vm, nil
}

// launch starts QEMU without waiting for the guest.
func launch(ctx context.Context, op *Options) (vm *VM, err error) {
	o := *op
	defer func() { *op = o }()
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 512
	}
	if o.CPUs == 0 {
		o.CPUs = 2
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Minute
	}
	if o.BootTimeout == 0 {
		o.BootTimeout = 3 * time.Minute
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	logf := o.Logf
	if o.Channel == "" {
		o.Channel = guest.ChannelVirtioSerial
		if _, err := os.Stat("/dev/vhost-vsock"); err == nil {
			o.Channel = guest.ChannelVsock
		}
	}
	if o.Kernel == "" {
		o.Kernel = os.Getenv("RAFSD_TESTBED_KERNEL")
	}
	if o.Kernel == "" {
		b, err := kernel.Ensure(ctx, kernel.Options{Logf: logf})
		if err != nil {
			return nil, fmt.Errorf("testbed: guest kernel: %w", err)
		}
		o.Kernel = b.Path
	}
	if o.Agent == "" {
		if o.Agent, err = BuildStatic(ctx, "./cmd/guest-agent"); err != nil {
			return nil, err
		}
	}
	if _, err := exec.LookPath(o.QEMU); err != nil {
		return nil, fmt.Errorf("testbed: %s not found (apt-get install qemu-system-x86): %w", o.QEMU, err)
	}
	dir, err := os.MkdirTemp("", "rafsd-testbed-")
	if err != nil {
		return nil, fmt.Errorf("testbed: %w", err)
	}
	vm = &VM{opts: o, dir: dir, done: make(chan struct{})}
	defer func() {
		if err != nil {
			vm.Stop()
			vm = nil
		}
	}()
	initrd := filepath.Join(dir, "initrd.gz")
	if err := initramfs.BuildFile(initrd, o.Agent, o.Files); err != nil {
		return vm, fmt.Errorf("testbed: %w", err)
	}
	vm.console, err = newConsoleLog(filepath.Join(dir, "console.log"), o.Console)
	if err != nil {
		return vm, err
	}

	name := NamePrefix() + strconv.FormatInt(vmSeq.Add(1), 10)
	ctlSock := filepath.Join(dir, "ctl.sock")
	args, cid := qemuArgs(o, name, initrd, ctlSock)
	vm.name, vm.ctlSock, vm.cid = name, ctlSock, cid
	logf("testbed: %s %s", o.QEMU, strings.Join(args, " "))
	cmd := exec.Command(o.QEMU, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = vm.console, vm.console
	// QEMU dies with the test process even when cleanup never runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	vm.started = time.Now()
	if err := cmd.Start(); err != nil {
		close(vm.done)
		return vm, fmt.Errorf("testbed: start qemu: %w", err)
	}
	vm.cmd = cmd
	go func() {
		vm.waitErr = cmd.Wait()
		close(vm.done)
	}()
	vm.SetTimeout(o.Timeout)

	return vm, nil
}

func qemuArgs(o Options, name, initrd, ctlSock string) ([]string, uint32) {
	// no_timer_check: under a loaded host TCG is slow enough for the
	// kernel's IO-APIC timer check to fail and panic the boot.
	cmdline := "console=ttyS0 panic=-1 no_timer_check rafsd.ctl=" + o.Channel
	if !o.Verbose {
		cmdline += " quiet"
	}
	if o.Append != "" {
		cmdline += " " + o.Append
	}
	args := []string{
		"-name", name,
		"-machine", "q35", "-accel", "tcg",
		"-m", strconv.Itoa(o.MemoryMiB), "-smp", strconv.Itoa(o.CPUs),
		"-nographic", "-no-reboot",
		// Shared guest memory, so vhost-user back ends can map it.
		"-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", o.MemoryMiB),
		"-numa", "node,memdev=mem",
		"-kernel", o.Kernel, "-initrd", initrd, "-append", cmdline,
	}
	var cid uint32
	if o.Channel == guest.ChannelVsock {
		// Unique enough among this host's VMs; CIDs 0-2 are reserved.
		cid = 3 + uint32(os.Getpid()%100000)*100 + uint32(vmSeq.Load()%100)
		args = append(args, "-device", fmt.Sprintf("vhost-vsock-pci,guest-cid=%d", cid))
	} else {
		args = append(args,
			"-chardev", "socket,id=ctl,path="+ctlSock+",server=on,wait=off",
			"-device", "virtio-serial-pci",
			"-device", "virtserialport,chardev=ctl,name="+guest.PortName)
	}
	for i, fs := range o.VirtioFS {
		qs := fs.QueueSize
		if qs == 0 {
			qs = 1024
		}
		args = append(args,
			"-chardev", fmt.Sprintf("socket,id=fs%d,path=%s", i, fs.Socket),
			"-device", fmt.Sprintf("vhost-user-fs-pci,queue-size=%d,chardev=fs%d,tag=%s", qs, i, fs.Tag))
	}
	for i, d := range o.Disks {
		args = append(args,
			"-drive", fmt.Sprintf("file=%s,format=raw,if=none,id=disk%d", d, i),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=disk%d,serial=disk%d", i, i))
	}
	if o.Net {
		nd := "user,id=net0"
		for _, f := range o.HostFwd {
			nd += ",hostfwd=" + f
		}
		args = append(args, "-netdev", nd, "-device", "virtio-net-pci,netdev=net0")
	} else {
		args = append(args, "-nic", "none")
	}
	return args, cid
}

// connect reaches the agent's channel: QEMU's chardev socket, or vsock.
func (vm *VM) connect(ctx context.Context, sock string, cid uint32) (io.ReadWriteCloser, error) {
	for {
		var c io.ReadWriteCloser
		var err error
		if vm.opts.Channel == guest.ChannelVsock {
			c, err = vsock.Dial(cid, guest.VsockPort, nil)
		} else {
			var d net.Dialer
			c, err = d.DialContext(ctx, "unix", sock)
		}
		if err == nil {
			return c, nil
		}
		select {
		case <-vm.done:
			return nil, errors.New("qemu exited")
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitAgent pings until the agent answers. Pings sent before the guest opened
// its port wait in QEMU; a fresh one every second covers any that were lost.
func (vm *VM) waitAgent(ctx context.Context) error {
	ok := make(chan struct{}, 1)
	for {
		go func() {
			pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if _, err := vm.agent.Ping(pctx); err == nil {
				select {
				case ok <- struct{}{}:
				default:
				}
			}
		}()
		select {
		case <-ok:
			return nil
		case <-vm.done:
			return errors.New("qemu exited")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// SetTimeout replaces the VM's hard timeout: QEMU is killed d from now
// (a scenario can give each phase its own limit).
func (vm *VM) SetTimeout(d time.Duration) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.timer != nil {
		vm.timer.Stop()
	}
	vm.timer = time.AfterFunc(d, func() {
		vm.kill(fmt.Errorf("testbed: guest exceeded its timeout of %s", d))
	})
}

// Agent is the client of the guest agent.
func (vm *VM) Agent() *guest.Client { return vm.agent }

// BootTime is the time from starting QEMU to the agent's first answer.
func (vm *VM) BootTime() time.Duration { return vm.boot }

// Dir is the VM's work directory (console.log, initrd.gz).
func (vm *VM) Dir() string { return vm.dir }

// Done is closed when QEMU has exited.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// PID is QEMU's process id (0 before it started).
func (vm *VM) PID() int {
	if vm.cmd == nil || vm.cmd.Process == nil {
		return 0
	}
	return vm.cmd.Process.Pid
}

// ConsoleTail returns the last n lines of the guest console (and QEMU's own output).
func (vm *VM) ConsoleTail(n int) string {
	if vm.console == nil {
		return ""
	}
	return vm.console.Tail(n)
}

// kill ends QEMU at once, recording why.
func (vm *VM) kill(reason error) {
	vm.mu.Lock()
	if vm.reason == nil {
		vm.reason = reason
	}
	vm.mu.Unlock()
	if vm.cmd != nil && vm.cmd.Process != nil {
		_ = syscall.Kill(-vm.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// Err reports why the VM is gone: nil while QEMU runs, the harness's reason
// (timeout) or QEMU's exit status otherwise, with the console tail.
func (vm *VM) Err() error {
	select {
	case <-vm.done:
	default:
		return nil
	}
	vm.mu.Lock()
	reason := vm.reason
	vm.mu.Unlock()
	if reason == nil {
		reason = fmt.Errorf("testbed: qemu exited: %v", exitString(vm.waitErr))
	}
	return vm.annotate(reason)
}

// fate is what control-channel calls report once the channel breaks.
func (vm *VM) fate() error {
	select {
	case <-vm.done:
	case <-time.After(2 * time.Second): // the socket closes just before QEMU is reaped
	}
	return vm.Err()
}

func exitString(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// annotate appends the console tail to err.
func (vm *VM) annotate(err error) error {
	return &VMError{Err: err, Console: vm.ConsoleTail(40), ConsolePath: filepath.Join(vm.dir, "console.log")}
}

// VMError is an error of a VM with the tail of its console.
type VMError struct {
	Err         error
	Console     string
	ConsolePath string
}

func (e *VMError) Error() string {
	return fmt.Sprintf("%v\n--- console tail (%s) ---\n%s--- end of console ---", e.Err, e.ConsolePath, e.Console)
}

func (e *VMError) Unwrap() error { return e.Err }

// Wait waits for QEMU to exit on its own and returns Err.
func (vm *VM) Wait(ctx context.Context) error {
	select {
	case <-vm.done:
		return vm.Err()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stop ends the VM: asks the agent to power off, then SIGTERM, then SIGKILL,
// and removes its work directory. It returns an error when the guest did not
// go down by itself (escalation was needed, or the harness had killed it).
// It is safe to call more than once.
func (vm *VM) Stop() error {
	vm.stopOnce.Do(func() { vm.stopErr = vm.stop() })
	return vm.stopErr
}

func (vm *VM) stop() error {
	vm.mu.Lock()
	if vm.timer != nil {
		vm.timer.Stop()
	}
	vm.mu.Unlock()
	var errs []error
	if vm.cmd != nil {
		running := func() bool {
			select {
			case <-vm.done:
				return false
			default:
				return true
			}
		}
		if running() && vm.agent != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			// The reply may be lost when QEMU exits first; waiting on done decides.
			_ = vm.agent.PowerOff(ctx)
			cancel()
		}
		wait := func(d time.Duration) bool {
			select {
			case <-vm.done:
				return true
			case <-time.After(d):
				return false
			}
		}
		if !wait(10 * time.Second) {
			errs = append(errs, errors.New("testbed: guest did not power off; sent SIGTERM"))
			_ = syscall.Kill(-vm.cmd.Process.Pid, syscall.SIGTERM)
			if !wait(5 * time.Second) {
				errs = append(errs, errors.New("testbed: qemu ignored SIGTERM; sent SIGKILL"))
				_ = syscall.Kill(-vm.cmd.Process.Pid, syscall.SIGKILL)
				<-vm.done
			}
		}
		vm.mu.Lock()
		if vm.reason != nil {
			errs = append(errs, vm.reason)
		}
		vm.mu.Unlock()
	}
	if vm.agent != nil {
		vm.agent.Close()
	}
	if vm.console != nil {
		vm.console.Close()
	}
	if len(errs) > 0 {
		err := vm.annotate(errors.Join(errs...))
		if !vm.opts.KeepDir && os.Getenv("RAFSD_TESTBED_KEEP") == "" {
			os.RemoveAll(vm.dir)
		}
		return err
	}
	if !vm.opts.KeepDir && os.Getenv("RAFSD_TESTBED_KEEP") == "" {
		os.RemoveAll(vm.dir)
	}
	return nil
}

// Leftovers returns the pids of QEMU processes started by this process that
// are still alive, found by their -name in /proc (so even VMs whose handle
// was lost are found).
func Leftovers() []int {
	prefix := []byte("-name\x00" + NamePrefix())
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytes.Contains(b, prefix) {
			continue
		}
		if st, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil {
			// A zombie is gone already, only not yet reaped.
			if f := strings.Fields(string(st[bytes.LastIndexByte(st, ')')+1:])); len(f) > 0 && f[0] == "Z" {
				continue
			}
		}
		pids = append(pids, pid)
	}
	return pids
}

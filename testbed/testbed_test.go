package testbed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
)

// TestMain fails the run if any QEMU started by this test binary survived.
func TestMain(m *testing.M) {
	code := m.Run()
	if pids := Leftovers(); len(pids) > 0 {
		fmt.Fprintf(os.Stderr, "testbed: QEMU processes left behind: %v (killing them)\n", pids)
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
		code = 1
	}
	os.Exit(code)
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the testbed tests run as root (apt-get, kernel cache in /var/cache); run them with sudo or in CI")
	}
}

func TestSmoke(t *testing.T) {
	requireRoot(t)
	vm := StartTB(t, Options{})
	t.Logf("boot-to-agent: %s (target < 20s under TCG)", vm.BootTime().Round(time.Millisecond))
	if vm.BootTime() > 20*time.Second {
		t.Logf("warning: boot-to-agent above the 20 s target")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	a := vm.Agent()

	info, err := a.SysInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest kernel %s %s, %d CPUs, channel %s", info.KernelRelease, info.KernelVersion, info.CPUs, info.Channel)
	if !strings.HasPrefix(info.KernelRelease, "6.12.") {
		t.Errorf("kernel release %q, want 6.12.x", info.KernelRelease)
	}
	for _, fs := range []string{"virtiofs", "erofs", "fuse", "overlay", "ext4", "tmpfs"} {
		if !slices.Contains(info.Filesystems, fs) {
			t.Errorf("%s missing from /proc/filesystems %v", fs, info.Filesystems)
		}
	}
	if !info.Cachefiles {
		t.Error("/dev/cachefiles missing")
	}
	if !info.Fanotify {
		t.Error("fanotify_init failed in the guest")
	}
	if info.CPUs != 2 {
		t.Errorf("guest sees %d CPUs, want 2 (-smp 2)", info.CPUs)
	}
	if info.Channel != guest.ChannelVirtioSerial {
		t.Errorf("channel %q", info.Channel)
	}

	// A command round trip: the agent binary itself, in its stdio mode,
	// answers a ping fed on stdin.
	r, err := a.Exec(ctx, guest.ExecRequest{Argv: []string{"/init", "-stdio"}, Stdin: []byte(`{"id":42,"op":"ping"}` + "\n")})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := guest.DecodeResponse([]byte(strings.TrimSpace(string(r.Stdout))))
	if r.ExitCode != 0 || err != nil || resp.ID != 42 || resp.Error != "" {
		t.Errorf("exec round trip: %+v (%v) stderr %q", r, err, r.Stderr)
	}
	if _, err := a.Exec(ctx, guest.ExecRequest{Argv: []string{"/bin/nonexistent"}}); err == nil {
		t.Error("exec of a missing program succeeded")
	}

	// Files and mounts: a tmpfs tree written from the host hashes the same
	// inside the guest as the host's copy.
	host := t.TempDir()
	files := map[string]string{"a/b/c": "hello", "a/d": strings.Repeat("x", 70000), "e": ""}
	if err := a.Mount(ctx, guest.MountRequest{Source: "tmpfs", Target: "/mnt/t", FSType: "tmpfs", Mkdir: true, Data: "mode=0755"}); err != nil {
		t.Fatal(err)
	}
	for p, data := range files {
		if err := a.WriteFile(ctx, "/mnt/t/"+p, []byte(data), 0o640); err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Dir(host+"/"+p), 0o755)
		if err := os.WriteFile(host+"/"+p, []byte(data), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(host, 0o755)
	want, err := treehash.Hash(host)
	if err != nil {
		t.Fatal(err)
	}
	got, err := a.TreeHash(ctx, "/mnt/t", false)
	if err != nil {
		t.Fatal(err)
	}
	if got.Hash != want {
		ge, _ := a.TreeHash(ctx, "/mnt/t", true)
		he, _ := treehash.Walk(host)
		t.Errorf("guest tree hash %s != host %s:\n%s", got.Hash, want, strings.Join(treehash.Diff(he, ge.Entries, 20), "\n"))
	}
	if b, err := a.ReadFile(ctx, "/mnt/t/a/b/c", 0); err != nil || string(b) != "hello" {
		t.Errorf("ReadFile = %q, %v", b, err)
	}
	if err := a.Unmount(ctx, "/mnt/t", 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Unmount(ctx, "/mnt/t", 0); err == nil {
		t.Error("second unmount succeeded")
	}
}

// TestNetwork checks user-mode networking: the guest reaches a listener on
// the host's loopback through 10.0.2.2.
func TestNetwork(t *testing.T) {
	requireRoot(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			buf := make([]byte, 5)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			n, _ := c.Read(buf)
			fmt.Fprintf(c, "hello guest, you sent %q", buf[:n])
			c.Close()
		}
	}()
	vm := StartTB(t, Options{Net: true})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	port := l.Addr().(*net.TCPAddr).Port
	got, err := vm.Agent().Dial(ctx, fmt.Sprintf("10.0.2.2:%d", port), []byte("ping!"))
	if err != nil {
		t.Fatal(err)
	}
	if want := `hello guest, you sent "ping!"`; string(got) != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestHungGuestKilledAtTimeout: a guest that stops answering is killed at its
// hard timeout, and the error carries the console tail.
func TestHungGuestKilledAtTimeout(t *testing.T) {
	requireRoot(t)
	vm, err := Start(context.Background(), Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Stop()
	vm.SetTimeout(10 * time.Second)
	const banner = "rafsd-testbed: sleeping past the timeout"
	start := time.Now()
	err = vm.Agent().Sleep(context.Background(), time.Hour, banner)
	waited := time.Since(start)
	if err == nil {
		t.Fatal("sleep past the timeout returned no error")
	}
	var ve *VMError
	if !errors.As(err, &ve) {
		t.Fatalf("error %T %v carries no console", err, err)
	}
	if !strings.Contains(err.Error(), "exceeded its timeout of 10s") || !strings.Contains(ve.Console, banner) {
		t.Errorf("error lacks the reason or the console banner:\n%v", err)
	}
	if waited > 20*time.Second {
		t.Errorf("call returned %s after the sleep began, long after the 10 s timeout", waited)
	}
	select {
	case <-vm.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("QEMU still running after the timeout")
	}
	if err := vm.Stop(); err == nil || !strings.Contains(err.Error(), "exceeded its timeout") {
		t.Errorf("Stop after a timeout: %v", err)
	}
	if pids := Leftovers(); len(pids) > 0 {
		t.Errorf("QEMU left behind: %v", pids)
	}
	t.Logf("hung guest killed; error was:\n%v", err)
}

// TestStopEscalates: a QEMU that neither powers off nor obeys SIGTERM (here
// SIGSTOPped, like QEMU hung in a vhost-user device stop) is ended by
// SIGKILL, and Stop reports the escalation.
func TestStopEscalates(t *testing.T) {
	requireRoot(t)
	vm, err := Start(context.Background(), Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	// A stopped process ignores SIGTERM until continued; only SIGKILL ends it,
	// like QEMU hung in a vhost-user device stop.
	if err := syscall.Kill(vm.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = vm.Stop()
	if err == nil || !strings.Contains(err.Error(), "SIGKILL") {
		t.Errorf("Stop of a stuck QEMU: %v", err)
	}
	t.Logf("stuck QEMU stopped in %s", time.Since(start).Round(time.Millisecond))
	if pids := Leftovers(); len(pids) > 0 {
		t.Errorf("QEMU left behind: %v", pids)
	}
}

// BenchmarkBoot measures boot-to-agent against a baseline measured in the
// same run: the same kernel and initramfs booting to the point where it
// looks for init and (given a missing one) panics, which ends QEMU.
func BenchmarkBoot(b *testing.B) {
	requireRoot(b)
	ctx := context.Background()
	var agent, kernelOnly time.Duration
	for i := 0; i < b.N; i++ {
		vm, err := Start(ctx, Options{})
		if err != nil {
			b.Fatal(err)
		}
		agent += vm.BootTime()
		if err := vm.Stop(); err != nil {
			b.Fatal(err)
		}
		base, err := startNoAgent(ctx)
		if err != nil {
			b.Fatal(err)
		}
		kernelOnly += base
	}
	n := float64(b.N)
	b.ReportMetric(agent.Seconds()/n, "s-boot-to-agent")
	b.ReportMetric(kernelOnly.Seconds()/n, "s-qemu-kernel-only")
	b.ReportMetric(agent.Seconds()/kernelOnly.Seconds(), "agent/kernel-only")
}

// startNoAgent runs QEMU with init pointed at a missing file and returns how
// long QEMU ran.
func startNoAgent(ctx context.Context) (time.Duration, error) {
	vm, err := launch(ctx, &Options{Append: "rdinit=/missing init=/missing", Timeout: 2 * time.Minute})
	if err != nil {
		return 0, err
	}
	defer vm.Stop()
	<-vm.Done()
	if !strings.Contains(vm.ConsoleTail(50), "Kernel panic") {
		return 0, fmt.Errorf("baseline guest did not reach init:\n%s", vm.ConsoleTail(30))
	}
	return time.Since(vm.started), nil
}

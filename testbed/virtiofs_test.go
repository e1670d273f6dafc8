package testbed

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
)

// qemuVirtiofsd is the reference vhost-user-fs back end shipped with
// Debian's QEMU 7.2 (qemu-system-common).
const qemuVirtiofsd = "/usr/lib/qemu/virtiofsd"

// TestVirtioFS checks the harness's vhost-user-fs plumbing (shared memory
// backend, chardev, device, tag) against QEMU's own virtiofsd: the guest
// mounts the tag and sees the host tree, and the VM powers off cleanly.
func TestVirtioFS(t *testing.T) {
	requireRoot(t)
	if _, err := os.Stat(qemuVirtiofsd); err != nil {
		t.Fatalf("%s missing (apt-get install qemu-system-x86): %v", qemuVirtiofsd, err)
	}
	src := sourceTree(t)
	want, err := treehash.Walk(src)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "vfs.sock")
	d := exec.Command(qemuVirtiofsd, "--socket-path="+sock, "-o", "source="+src, "-o", "cache=none", "-o", "sandbox=chroot")
	out := &strings.Builder{}
	d.Stdout, d.Stderr = out, out
	d.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- d.Wait() }()
	t.Cleanup(func() {
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			syscall.Kill(-d.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			t.Logf("virtiofsd output:\n%s", out)
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("virtiofsd socket did not appear:\n%s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}

	vm := StartTB(t, Options{VirtioFS: []VirtioFS{{Socket: sock, Tag: "shared"}}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a := vm.Agent()
	if err := a.Mount(ctx, guest.MountRequest{Source: "shared", Target: "/mnt/vfs", FSType: "virtiofs", Mkdir: true}); err != nil {
		t.Fatal(err)
	}
	got, err := a.TreeHash(ctx, "/mnt/vfs", true)
	if err != nil {
		t.Fatal(err)
	}
	if got.Hash != treehash.Sum(want) {
		t.Errorf("virtiofs tree hash %s != host %s:\n%s", got.Hash, treehash.Sum(want), strings.Join(treehash.Diff(want, got.Entries, 30), "\n"))
	}
	// Power off with the device live: QEMU must stop it and exit without
	// the harness escalating (Stop reports an escalation as an error).
	if err := vm.Stop(); err != nil {
		t.Errorf("stop with a virtio-fs device: %v", err)
	}
}

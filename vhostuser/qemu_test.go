package vhostuser

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/testbed"
)

// TestQEMUVirtioFS boots a real guest (QEMU, TCG) with -device
// vhost-user-fs-pci connected to our device serving a directory, mounts
// the tag, compares bytes and the tree hash, and powers the guest off: QEMU
// must exit on its own (device stop completes). A second VM then connects
// to the same device (QEMU restart = reconnect).
func TestQEMUVirtioFS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (QEMU testbed, kernel cache in /var/cache)")
	}
	dir, big := testTree(t)
	want, err := treehash.Hash(dir)
	if err != nil {
		t.Fatal(err)
	}
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{Tag: "rafsfs"})
	for round := 0; round < 2; round++ {
		t.Run(fmt.Sprintf("vm%d", round), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			vm, err := testbed.Start(ctx, testbed.Options{
				VirtioFS: []testbed.VirtioFS{{Socket: sock, Tag: "rafsfs"}},
				Logf:     t.Logf,
			})
			if err != nil {
				t.Fatalf("start VM: %v", err)
			}
			stopped := false
			defer func() {
				if !stopped {
					vm.Stop()
				}
			}()
			a := vm.Agent()
			if err := a.Mount(ctx, guest.MountRequest{Source: "rafsfs", Target: "/mnt/vfs", FSType: "virtiofs", Mkdir: true}); err != nil {
				t.Fatalf("guest mount -t virtiofs: %v\n%s", err, vm.ConsoleTail(40))
			}
			got, err := a.ReadFile(ctx, "/mnt/vfs/big.bin", 0)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, big) {
				t.Fatalf("guest read %d bytes of big.bin, content differs", len(got))
			}
			th, err := a.TreeHash(ctx, "/mnt/vfs", false)
			if err != nil {
				t.Fatal(err)
			}
			if th.Hash != want {
				t.Fatalf("guest tree hash %s, host %s", th.Hash, want)
			}
			// Power off (reboot with -no-reboot): the guest resets the
			// device, QEMU stops the rings and exits. Stop reports an error
			// if it had to signal QEMU.
			start := time.Now()
			stopped = true
			if err := vm.Stop(); err != nil {
				t.Fatalf("QEMU did not exit on its own after guest power-off: %v", err)
			}
			t.Logf("guest power-off to QEMU exit: %s", time.Since(start).Round(time.Millisecond))
		})
		if t.Failed() {
			return
		}
	}
	if _, err := os.Stat(filepath.Dir(sock)); err != nil {
		t.Fatal(err)
	}
}

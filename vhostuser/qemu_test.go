package vhostuser

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/guest/treehash"
	"github.com/rafsd/rafsd/testbed"
	"github.com/rafsd/rafsd/testbed/kernel"
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
	// The kernel may have to be built first (once per machine, ~15 min on
	// 2 loaded cores, serialized with other suites by a lock): that gets its
	// own budget, separate from the VMs'.
	kernelPath := os.Getenv("RAFSD_TESTBED_KERNEL")
	if kernelPath == "" {
		kctx, kcancel := context.WithTimeout(context.Background(), 40*time.Minute)
		b, err := kernel.Ensure(kctx, kernel.Options{Logf: t.Logf})
		kcancel()
		if err != nil {
			t.Fatalf("guest kernel: %v", err)
		}
		kernelPath = b.Path
	}
	rec := &requestLog{}
	sock := startDevice(t, loopbackFS(t, dir), FSOptions{Tag: "rafsfs", Logger: slog.New(rec)})
	for round := 0; round < 2; round++ {
		t.Run(fmt.Sprintf("vm%d", round), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
			defer cancel()
			vm, err := testbed.Start(ctx, testbed.Options{
				Kernel:   kernelPath,
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
			// QEMU stopped the device (GET_VRING_BASE on hiprio and the
			// request queue) rather than just dropping the connection.
			if n := rec.count("GET_VRING_BASE"); n < 2 {
				t.Fatalf("QEMU sent GET_VRING_BASE %d times; requests seen: %v", n, rec.names())
			}
			t.Logf("vhost-user requests this VM sent: %d (GET_VRING_BASE %d)", len(rec.names()), rec.count("GET_VRING_BASE"))
			rec.reset()
		})
		if t.Failed() {
			return
		}
	}
	if _, err := os.Stat(filepath.Dir(sock)); err != nil {
		t.Fatal(err)
	}
}

// requestLog is a slog handler that records the vhost-user requests the
// back end logs at debug level (and drops everything else).
type requestLog struct {
	mu   sync.Mutex
	reqs []string
}

func (r *requestLog) Enabled(context.Context, slog.Level) bool { return true }
func (r *requestLog) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *requestLog) WithGroup(string) slog.Handler            { return r }

func (r *requestLog) Handle(_ context.Context, rec slog.Record) error {
	if rec.Message != "vhost-user request" {
		return nil
	}
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == "request" {
			r.mu.Lock()
			r.reqs = append(r.reqs, a.Value.String())
			r.mu.Unlock()
		}
		return true
	})
	return nil
}

func (r *requestLog) count(name string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, x := range r.reqs {
		if x == name {
			n++
		}
	}
	return n
}

func (r *requestLog) names() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.reqs...)
}

func (r *requestLog) reset() {
	r.mu.Lock()
	r.reqs = nil
	r.mu.Unlock()
}

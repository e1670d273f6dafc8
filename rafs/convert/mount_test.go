package convert

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func isMounted(mnt string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == mnt {
			return true
		}
	}
	return false
}

// TestMountByReference is the end-to-end path a user takes: convert an
// image, push it, then start rafsd in FUSE mode from the image reference
// alone (FetchBootstrap + DaemonConfig: bootstrap from the registry, blobs
// fetched lazily by the registry backend) and compare the mounted tree with
// the overlay unpack of the OCI layers.
func TestMountByReference(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root for the FUSE mount (CI runs tests as root)")
	}
	bin := buildRafsd(t)
	reg := startRegistry(t)
	ro := RegistryOptions{PlainHTTP: true}
	im := newOCIImage(t, testLayers()...)
	im.push(t, reg.Addr+"/mount/app:oci")
	ref := reg.Addr + "/mount/app:nydus"
	if _, err := Convert(context.Background(), reg.Addr+"/mount/app:oci", ref, Options{ChunkSize: 256 << 10, MergePlatform: true, Source: ro, Target: ro}); err != nil {
		t.Fatal(err)
	}

	work := t.TempDir()
	r, err := FetchBootstrap(context.Background(), ref, filepath.Join(work, "image.boot"), ro)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(work, "config.json")
	if err := os.WriteFile(cfgPath, r.DaemonConfig(filepath.Join(work, "cache"), true), 0o600); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(work, "mnt")
	os.Mkdir(mnt, 0o755)
	var out bytes.Buffer
	cmd := exec.Command(filepath.Join(bin, "rafsd"), "fuse", "--mountpoint", mnt, "--bootstrap", r.BootstrapPath,
		"--config", cfgPath, "--apisock", filepath.Join(work, "api.sock"), "--log-level", "warn")
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		unix.Unmount(mnt, unix.MNT_DETACH)
		if t.Failed() {
			t.Logf("rafsd output:\n%s", out.String())
		}
	})
	for deadline := time.Now().Add(20 * time.Second); !isMounted(mnt); time.Sleep(20 * time.Millisecond) {
		select {
		case <-done:
			t.Fatalf("rafsd exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("rafsd did not mount")
		}
	}
	want := filepath.Join(t.TempDir(), "want")
	os.Mkdir(want, 0o755)
	applyLayers(t, want, im.layers)
	compareTrees(t, want, mnt)
}

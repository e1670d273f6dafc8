package testutil

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// StartRafsdFUSE runs `bin fuse --mountpoint mnt args...` (the rafsd
// binary; env is added to the environment) and waits up to 60 s for the
// mount. Cleanup: SIGTERM, SIGKILL after 10 s, lazy unmount; rafsd's
// output is logged if the test failed.
func StartRafsdFUSE(t testing.TB, bin, mnt string, env []string, args ...string) *exec.Cmd {
	t.Helper()
	out := &SyncBuffer{}
	cmd := exec.Command(bin, append([]string{"fuse", "--mountpoint", mnt}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		unix.Unmount(mnt, unix.MNT_DETACH)
		if t.Failed() {
			t.Logf("rafsd output:\n%s", out.String())
		}
	})
	for deadline := time.Now().Add(60 * time.Second); !MountedOn(mnt); time.Sleep(10 * time.Millisecond) {
		select {
		case <-exited:
			t.Fatalf("rafsd exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("rafsd did not mount %s", mnt)
		}
	}
	return cmd
}

// MountedOn reports whether a filesystem is mounted on dir, from
// /proc/self/mountinfo (asking the mount itself could block on a hung
// daemon).
func MountedOn(dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

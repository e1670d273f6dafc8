package fanotifyfs

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rafsd/rafsd/guest"
	"github.com/rafsd/rafsd/rafs/fs/fstest"
	"github.com/rafsd/rafsd/testbed"
	"github.com/rafsd/rafsd/testbed/initramfs"
)

// TestGuestKernelWithoutPreContent runs `rafsd fanotify` on a kernel that
// lacks pre-content events: the testbed guest's 6.12 (fanotify with
// permission events and file-backed EROFS built in, FAN_PRE_ACCESS not
// yet). Both forms, the API daemon and the one-shot mount, must fail at
// start, before they serve or mount anything, with an error that names
// the missing feature and the kernel that has it.
func TestGuestKernelWithoutPreContent(t *testing.T) {
	fstest.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	bin, err := testbed.BuildStatic(ctx, "./cmd/rafsd")
	if err != nil {
		t.Fatal(err)
	}
	vm := testbed.StartTB(t, testbed.Options{Files: []initramfs.File{{Path: "/bin/rafsd", Source: bin}}})
	a := vm.Agent()
	info, err := a.SysInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var major, minor int
	if _, err := fmt.Sscanf(info.KernelRelease, "%d.%d", &major, &minor); err != nil {
		t.Fatalf("guest kernel release %q: %v", info.KernelRelease, err)
	}
	if major > 6 || major == 6 && minor >= 14 {
		t.Fatalf("guest kernel %s has pre-content events: this test needs one older than 6.14", info.KernelRelease)
	}
	if !info.Fanotify {
		t.Fatalf("guest kernel %s has no fanotify at all: the test is about one that has it, without FAN_PRE_ACCESS", info.KernelRelease)
	}
	if err := a.WriteFile(ctx, "/config.json", configJSON("/blobs", "/cache"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, argv := range [][]string{
		{"/bin/rafsd", "fanotify", "--apisock", "/api.sock"},
		{"/bin/rafsd", "fanotify", "--bootstrap", "/bootstrap", "--mountpoint", "/mnt", "--config", "/config.json"},
	} {
		r, err := a.Exec(ctx, guest.ExecRequest{Argv: argv, TimeoutMS: 60000})
		if err != nil {
			t.Fatal(err)
		}
		out := string(r.Stdout) + string(r.Stderr)
		if r.ExitCode == 0 || r.TimedOut {
			t.Fatalf("%s on %s: exit %d (timed out %v), want a start-up failure\n%s", strings.Join(argv, " "), info.KernelRelease, r.ExitCode, r.TimedOut, out)
		}
		for _, want := range []string{"pre-content", "FAN_PRE_ACCESS", "6.14"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: error does not name %q:\n%s", strings.Join(argv, " "), want, out)
			}
		}
		if strings.Contains(out, "ready") {
			t.Errorf("%s: got ready before failing:\n%s", strings.Join(argv, " "), out)
		}
		t.Logf("%s: exit %d: %s", strings.Join(argv, " "), r.ExitCode, strings.TrimSpace(out))
	}
}

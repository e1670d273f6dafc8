package clients

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestDaemonLogsSkipsDeadFUSEMount: a FUSE mount whose session nobody
// serves (a killed daemon whose /dev/fuse fd a supervisor still holds)
// blocks every lstat of it; listing the logs beside it must neither hang
// nor enter it.
func TestDaemonLogsSkipsDeadFUSEMount(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	root := t.TempDir()
	logDir, mnt := filepath.Join(root, "logs", "d1"), filepath.Join(root, "mnt", "d1")
	for _, d := range []string{logDir, mnt} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	logFile := filepath.Join(logDir, "nydusd.log")
	if err := os.WriteFile(logFile, []byte("x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open /dev/fuse: %v", err)
	}
	// Nobody reads fd: not even FUSE_INIT is answered.
	if err := unix.Mount("deadfuse", mnt, "fuse.deadfuse", unix.MS_NOSUID|unix.MS_NODEV,
		"fd="+strconv.Itoa(fd)+",rootmode=40000,user_id=0,group_id=0"); err != nil {
		unix.Close(fd)
		t.Fatalf("mount fuse: %v", err)
	}
	t.Cleanup(func() {
		// Closing the device fd aborts the connection: whatever still
		// waits on the mount gets ENOTCONN; then detach it.
		unix.Close(fd)
		unix.Unmount(mnt, unix.MNT_DETACH)
	})
	if !slices.Contains(Mounts(root), mnt) {
		t.Fatalf("%s not in mountinfo", mnt)
	}
	done := make(chan []string, 1)
	go func() { done <- DaemonLogs(root) }()
	select {
	case logs := <-done:
		if len(logs) != 1 || logs[0] != logFile {
			t.Errorf("DaemonLogs = %q, want [%s]", logs, logFile)
		}
	case <-time.After(30 * time.Second):
		// The walk is stuck in the mount; the cleanup's close of fd frees it.
		t.Fatal("DaemonLogs blocked on an unanswered FUSE mount")
	}
}

package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// losetup attaches a read-only loop device to file, detached at cleanup.
func losetup(t *testing.T, file string) string {
	t.Helper()
	cmd := exec.Command("losetup", "--find", "--show", "--read-only", file)
	var stderr strings.Builder
	cmd.Stderr = &stderr // a blob not a multiple of 512 bytes draws a warning
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("losetup %s: %v\n%s", file, err, stderr.String())
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "--detach", dev).Run() })
	return dev
}

// TestKernelMountsUncompressedBlob: with --compressor none a v6 image's
// blob is an EROFS extra device, so the kernel's own EROFS driver mounts
// bootstrap + blob and reads the files byte for byte.
func TestKernelMountsUncompressedBlob(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root for loop devices and mount; the suite runs as root")
	}
	src := t.TempDir()
	big := strings.Repeat("0123456789abcdef", 300_000) // several chunks, unaligned tail
	files := map[string]string{"a/big": big, "a/small": "small", "b/empty": "", "link": "->a/big"}
	writeTree(t, src, files)
	dir := t.TempDir()
	boot, blob := filepath.Join(dir, "bootstrap"), filepath.Join(dir, "blob")
	mustCLI(t, "", "create", "--compressor", "none", "--chunk-size", "0x100000", "--bootstrap", boot, "--blob", blob, src)
	bdev, ddev := losetup(t, boot), losetup(t, blob)
	mnt := t.TempDir()
	if err := unix.Mount(bdev, mnt, "erofs", unix.MS_RDONLY, "device="+ddev); err != nil {
		t.Fatalf("mount -t erofs -o device=%s %s: %v", ddev, bdev, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	sameMap(t, "kernel erofs mount", files, readTree(t, mnt))
}

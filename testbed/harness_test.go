package testbed

import (
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestQEMUArgs(t *testing.T) {
	tests := []struct {
		name    string
		o       Options
		want    []string // adjacent pairs or single flags that must appear
		wantNot []string
	}{
		{
			name: "defaults",
			o:    Options{MemoryMiB: 512, CPUs: 2, Channel: "virtio-serial", Kernel: "/k"},
			want: []string{"-machine q35", "-accel tcg", "-m 512", "-smp 2", "-nographic", "-no-reboot",
				"-object memory-backend-memfd,id=mem,size=512M,share=on", "-numa node,memdev=mem", "-kernel /k",
				"-initrd /i", "-device virtio-serial-pci", "-device virtserialport,chardev=ctl,name=rafsd.ctl",
				"-chardev socket,id=ctl,path=/s,server=on,wait=off", "-nic none"},
			wantNot: []string{"vhost-vsock-pci", "virtio-net-pci"},
		},
		{
			name: "devices",
			o: Options{MemoryMiB: 1024, CPUs: 1, Channel: "virtio-serial", Net: true, HostFwd: []string{"tcp:127.0.0.1:5000-:5000"},
				VirtioFS: []VirtioFS{{Socket: "/a.sock", Tag: "one"}, {Socket: "/b.sock", Tag: "two", QueueSize: 256}},
				Disks:    []string{"/d0.img", "/d1.img"}},
			want: []string{"-object memory-backend-memfd,id=mem,size=1024M,share=on",
				"-chardev socket,id=fs0,path=/a.sock", "-device vhost-user-fs-pci,queue-size=1024,chardev=fs0,tag=one",
				"-chardev socket,id=fs1,path=/b.sock", "-device vhost-user-fs-pci,queue-size=256,chardev=fs1,tag=two",
				"-drive file=/d0.img,format=raw,if=none,id=disk0", "-device virtio-blk-pci,drive=disk0,serial=disk0",
				"-drive file=/d1.img,format=raw,if=none,id=disk1",
				"-netdev user,id=net0,hostfwd=tcp:127.0.0.1:5000-:5000", "-device virtio-net-pci,netdev=net0"},
			wantNot: []string{"-nic none"},
		},
		{
			name:    "vsock",
			o:       Options{MemoryMiB: 512, CPUs: 2, Channel: "vsock"},
			want:    []string{"rafsd.ctl=vsock"},
			wantNot: []string{"virtserialport"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args, cid := qemuArgs(tt.o, "vm", "/i", "/s")
			joined := strings.Join(args, " ")
			for _, w := range tt.want {
				if !strings.Contains(joined, w) {
					t.Errorf("missing %q in %s", w, joined)
				}
			}
			for _, w := range tt.wantNot {
				if strings.Contains(joined, w) {
					t.Errorf("unexpected %q in %s", w, joined)
				}
			}
			if tt.o.Channel == "vsock" && (cid < 3 || !strings.Contains(joined, "vhost-vsock-pci,guest-cid=")) {
				t.Errorf("vsock cid %d: %s", cid, joined)
			}
			i := slices.Index(args, "-append")
			if i < 0 || !strings.Contains(args[i+1], "console=ttyS0") || !strings.Contains(args[i+1], "panic=-1") {
				t.Errorf("kernel command line: %v", args)
			}
		})
	}
}

func TestConsoleTail(t *testing.T) {
	c, err := newConsoleLog(t.TempDir()+"/c.log", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := 0; i < 5000; i++ {
		c.Write([]byte("line " + strings.Repeat("x", i%50) + "\r\n"))
	}
	c.Write([]byte("partial"))
	tail := c.Tail(3)
	lines := strings.Split(strings.TrimSuffix(tail, "\n"), "\n")
	if len(lines) != 3 || lines[2] != "partial" || strings.Contains(tail, "\r") {
		t.Errorf("tail = %q", tail)
	}
	if len(c.tail) > consoleTailBytes {
		t.Errorf("tail buffer grew to %d", len(c.tail))
	}
}

// TestLeftovers: a process carrying this test binary's QEMU -name prefix is
// found until it is gone.
func TestLeftovers(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 60; true", "-name", NamePrefix()+"fake")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	found := false
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !found; time.Sleep(20 * time.Millisecond) {
		found = slices.Contains(Leftovers(), pid)
	}
	if !found {
		t.Errorf("Leftovers() did not find pid %d", pid)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if slices.Contains(Leftovers(), pid) {
		t.Errorf("Leftovers() still lists %d after it exited", pid)
	}
}

package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// Control channel names, as passed on the kernel command line (rafsd.ctl=...).
const (
	ChannelVirtioSerial = "virtio-serial"
	ChannelVsock        = "vsock"
	// PortName is the virtio-serial port name (virtserialport name=...).
	PortName = "rafsd.ctl"
	// VsockPort is the port the agent listens on when the channel is vsock.
	VsockPort = 1024
)

// SetupSystem makes the initramfs a usable system when the agent is /init:
// the pseudo file systems, a tmpfs /tmp and /run, and the network.
func SetupSystem() error {
	mounts := []struct {
		src, target, fstype string
		flags               uintptr
	}{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("setup: %w", err)
		}
		if err := unix.Mount(m.src, m.target, m.fstype, m.flags, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("setup: mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	// fusermount-style tools and some daemons expect these.
	_ = os.Symlink("/proc/self/mounts", "/etc/mtab")
	_ = os.Symlink("/proc/self/fd", "/dev/fd")
	return nil
}

// SetupNetwork brings up lo and, when present, eth0 with QEMU user-mode
// networking's fixed addresses: 10.0.2.15/24, gateway 10.0.2.2 (the host).
func SetupNetwork() (eth0 bool, err error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("network: %w", err)
	}
	defer unix.Close(fd)
	if err := ifUp(fd, "lo"); err != nil {
		return false, err
	}
	if _, err := net.InterfaceByName("eth0"); err != nil {
		return false, nil
	}
	if err := ifAddr(fd, "eth0", unix.SIOCSIFADDR, []byte{10, 0, 2, 15}); err != nil {
		return false, err
	}
	if err := ifAddr(fd, "eth0", unix.SIOCSIFNETMASK, []byte{255, 255, 255, 0}); err != nil {
		return false, err
	}
	if err := ifUp(fd, "eth0"); err != nil {
		return false, err
	}
	if err := addDefaultRoute(fd, [4]byte{10, 0, 2, 2}); err != nil {
		return false, err
	}
	return true, nil
}

func ifUp(fd int, name string) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("network: %s: %w", name, err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("network: %s: get flags: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("network: %s: up: %w", name, err)
	}
	return nil
}

func ifAddr(fd int, name string, req uint, addr []byte) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("network: %s: %w", name, err)
	}
	if err := ifr.SetInet4Addr(addr); err != nil {
		return fmt.Errorf("network: %s: %w", name, err)
	}
	if err := unix.IoctlIfreq(fd, req, ifr); err != nil {
		return fmt.Errorf("network: %s: set %v: %w", name, net.IP(addr), err)
	}
	return nil
}

// rtentry is struct rtentry of <net/route.h> on 64-bit Linux; Go's field
// alignment matches the C layout for these types.
type rtentry struct {
	pad1    uint64
	dst     unix.RawSockaddrInet4
	gateway unix.RawSockaddrInet4
	genmask unix.RawSockaddrInet4
	flags   uint16
	pad2    int16
	pad3    uint64
	pad4    uintptr
	metric  int16
	dev     *byte
	mtu     uint64
	window  uint64
	irtt    uint16
}

func addDefaultRoute(fd int, gw [4]byte) error {
	rt := rtentry{flags: unix.RTF_UP | unix.RTF_GATEWAY}
	rt.dst.Family = unix.AF_INET
	rt.genmask.Family = unix.AF_INET
	rt.gateway.Family = unix.AF_INET
	rt.gateway.Addr = gw
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCADDRT, uintptr(unsafe.Pointer(&rt))); errno != 0 && errno != unix.EEXIST {
		return fmt.Errorf("network: default route via %v: %w", net.IP(gw[:]), errno)
	}
	return nil
}

// KernelParam returns the value of key=value on /proc/cmdline, or "".
func KernelParam(key string) string {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return ""
	}
	for _, f := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	return ""
}

// FindPort returns the /dev node of the virtio-serial port called name,
// waiting up to timeout for the driver to create it.
func FindPort(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		matches, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, m := range matches {
			b, err := os.ReadFile(m)
			if err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + filepath.Base(filepath.Dir(m))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("virtio-serial port %q not found (ports: %v)", name, matches)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ServeChannel serves the agent over the channel selected on the kernel
// command line (rafsd.ctl=vsock or virtio-serial, the default) until ctx ends,
// reconnecting when the host side goes away.
func (a *Agent) ServeChannel(ctx context.Context, channel string) error {
	a.Channel = channel
	switch channel {
	case ChannelVsock:
		l, err := vsock.Listen(VsockPort, nil)
		if err != nil {
			return fmt.Errorf("agent: vsock listen %d: %w", VsockPort, err)
		}
		go func() { <-ctx.Done(); l.Close() }()
		for {
			c, err := l.Accept()
			if err != nil {
				return fmt.Errorf("agent: vsock accept: %w", err)
			}
			// One host connection at a time; a new one replaces a dead one.
			err = a.Serve(ctx, c)
			c.Close()
			a.log().Info("control connection ended", "err", err)
		}
	case ChannelVirtioSerial, "":
		a.Channel = ChannelVirtioSerial
		dev, err := FindPort(PortName, 30*time.Second)
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		defer f.Close()
		for ctx.Err() == nil {
			// A virtio-serial port reads EOF while the host side is not
			// connected; wait for the host to (re)connect.
			err := a.Serve(ctx, f)
			if err != nil && !errors.Is(err, io.EOF) {
				a.log().Warn("control channel", "err", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return ctx.Err()
	default:
		return fmt.Errorf("agent: unknown channel %q", channel)
	}
}

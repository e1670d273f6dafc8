package cachefiles

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// DevicePath is the cachefiles control device.
const DevicePath = "/dev/cachefiles"

// iocReadComplete is CACHEFILES_IOC_READ_COMPLETE, _IOW(0x98, 1, int).
const iocReadComplete = 1<<30 | 4<<16 | 0x98<<8 | 1

// ErrNoOnDemand is wrapped when the kernel's cachefiles lacks on-demand
// mode (CONFIG_CACHEFILES_ONDEMAND) or has no /dev/cachefiles at all.
var ErrNoOnDemand = errors.New("cachefiles on-demand mode unavailable (needs /dev/cachefiles and CONFIG_CACHEFILES_ONDEMAND)")

// Device is an open /dev/cachefiles bound in on-demand mode.
type Device struct {
	f       *os.File
	wake    [2]int // pipe: Close wakes a reader blocked in poll
	adopted bool   // handed over: Serve sends "restore" first
}

// OpenDevice opens path (DevicePath if empty) and binds a cache on dir in
// on-demand mode, tagged tag ("" keeps the kernel's default, "CacheFiles").
// Only one process can hold the device: a second open fails with EBUSY.
func OpenDevice(path, dir, tag string) (*Device, error) {
	if path == "" {
		path = DevicePath
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cachefiles: cache dir: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			err = fmt.Errorf("%w: %w", ErrNoOnDemand, err)
		}
		return nil, fmt.Errorf("cachefiles: %w", err)
	}
	d, err := newDevice(f)
	if err != nil {
		return nil, err
	}
	cmds := []string{"dir " + dir}
	if tag != "" {
		cmds = append(cmds, "tag "+tag)
	}
	cmds = append(cmds, "bind ondemand")
	for _, c := range cmds {
		if err := d.Command(c); err != nil {
			d.Close()
			if c == "bind ondemand" && errors.Is(err, unix.EOPNOTSUPP) {
				err = fmt.Errorf("%w: %w", ErrNoOnDemand, err)
			}
			return nil, err
		}
	}
	return d, nil
}

// AdoptDevice takes over an already bound device fd handed over by a
// previous daemon (inherited across exec or received from a supervisor).
// It sends nothing yet: the previous daemon may still be serving (a live
// upgrade hands the fd over before the old daemon exits), and "restore"
// would make the kernel deliver that daemon's in-flight requests twice.
// Daemon.Serve sends it (Restore) when this daemon starts reading.
func AdoptDevice(f *os.File) (*Device, error) {
	d, err := newDevice(f)
	if err != nil {
		return nil, err
	}
	d.adopted = true
	return d, nil
}

// Restore sends "restore": requests a previous holder of the device had
// read but not answered are delivered again. Objects whose anon fds died
// with it are re-opened by the kernel (a new OPEN) on their next read.
func (d *Device) Restore() error { return d.Command("restore") }

func newDevice(f *os.File) (*Device, error) {
	d := &Device{f: f}
	if err := unix.Pipe2(d.wake[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		f.Close()
		return nil, fmt.Errorf("cachefiles: pipe: %w", err)
	}
	return d, nil
}

// File returns the device file, to hand over to a successor daemon.
func (d *Device) File() *os.File { return d.f }

// Command writes one control command ("dir /x", "copen 3,4096", ...).
func (d *Device) Command(cmd string) error {
	if _, err := unix.Write(int(d.f.Fd()), []byte(cmd)); err != nil {
		return fmt.Errorf("cachefiles: %q: %w", strings.SplitN(cmd, " ", 2)[0], err)
	}
	return nil
}

// ReadMsg waits for the next kernel request and returns its raw bytes in
// buf (at least MsgMaxSize long). It returns os.ErrClosed once Close was
// called.
func (d *Device) ReadMsg(buf []byte) ([]byte, error) {
	fd := int(d.f.Fd())
	for {
		n, err := unix.Read(fd, buf)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil && err != unix.EAGAIN:
			return nil, fmt.Errorf("cachefiles: read: %w", err)
		case n > 0:
			return buf[:n], nil
		}
		// Nothing pending: the device reads 0 rather than blocking.
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(d.wake[0]), Events: unix.POLLIN}}
		if _, err := unix.Poll(pfd, -1); err != nil && err != unix.EINTR {
			return nil, fmt.Errorf("cachefiles: poll: %w", err)
		}
		if pfd[1].Revents != 0 {
			return nil, os.ErrClosed
		}
		if pfd[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
			return nil, fmt.Errorf("cachefiles: poll: device error (revents %#x)", pfd[0].Revents)
		}
	}
}

// Wake makes a blocked ReadMsg return os.ErrClosed (and every later one).
func (d *Device) Wake() {
	unix.Write(d.wake[1], []byte{1})
}

// Close releases the device: the kernel unbinds the cache and every
// on-demand mount on it fails, unless the fd was handed over first.
func (d *Device) Close() error {
	d.Wake()
	err := d.f.Close()
	unix.Close(d.wake[0])
	unix.Close(d.wake[1])
	return err
}

// readComplete tells the kernel that READ msgID on the object of anon fd
// fd is done; the kernel then reads the cache file, and where the range is
// still missing the reader gets EIO.
func readComplete(fd int, msgID uint32) error {
	if err := unix.IoctlSetInt(fd, iocReadComplete, int(msgID)); err != nil {
		return fmt.Errorf("cachefiles: READ_COMPLETE %d: %w", msgID, err)
	}
	return nil
}

package fusedev

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// MaxStateSize bounds the state a daemon accepts from a supervisor.
const MaxStateSize = 16 << 20

// The supervisor protocol is nydus-snapshotter's: the supervisor listens on
// a unix socket; a daemon connects, and either writes its opaque state with
// the /dev/fuse descriptor attached (SCM_RIGHTS) and closes (sendfd), or
// reads until EOF the state and descriptor the supervisor kept (takeover).

// SendState connects to the supervisor socket and hands it state and fd.
func SendState(sock string, state []byte, fd int, timeout time.Duration) error {
	conn, err := dialUnix(sock, timeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	if timeout > 0 {
		_ = conn.SetDeadline(time.Now().Add(timeout))
	}
	oob := unix.UnixRights(fd)
	data := state
	for len(data) > 0 || len(oob) > 0 {
		n, oobn, err := conn.WriteMsgUnix(data, oob, nil)
		if err != nil {
			return fmt.Errorf("fusedev: send state to %s: %w", sock, err)
		}
		data = data[n:]
		if oobn > 0 {
			oob = nil
		}
	}
	return nil
}

// RecvState connects to the supervisor socket and reads the saved state and
// the one descriptor sent with it.
func RecvState(sock string, timeout time.Duration) ([]byte, *os.File, error) {
	conn, err := dialUnix(sock, timeout)
	if err != nil {
		return nil, nil, err
	}
	defer conn.Close()
	if timeout > 0 {
		_ = conn.SetDeadline(time.Now().Add(timeout))
	}
	var (
		state []byte
		fds   []int
	)
	closeFDs := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	buf := make([]byte, 256<<10)
	oob := make([]byte, unix.CmsgSpace(4*8))
	for {
		n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			if got, perr := parseRights(oob[:oobn]); perr == nil {
				fds = append(fds, got...)
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			closeFDs()
			return nil, nil, errors.New("fusedev: state message: control data truncated")
		}
		state = append(state, buf[:n]...)
		if len(state) > MaxStateSize {
			closeFDs()
			return nil, nil, fmt.Errorf("fusedev: state from %s larger than %d bytes", sock, MaxStateSize)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			closeFDs()
			return nil, nil, fmt.Errorf("fusedev: receive state from %s: %w", sock, err)
		}
		if n == 0 && oobn == 0 {
			break
		}
	}
	if len(fds) != 1 {
		closeFDs()
		return nil, nil, fmt.Errorf("fusedev: supervisor %s sent %d descriptors, want 1", sock, len(fds))
	}
	unix.CloseOnExec(fds[0])
	return state, os.NewFile(uintptr(fds[0]), "/dev/fuse"), nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for i := range msgs {
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func dialUnix(sock string, timeout time.Duration) (*net.UnixConn, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.Dial("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("fusedev: connect to supervisor %s: %w", sock, err)
	}
	return c.(*net.UnixConn), nil
}

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
	if err := WriteState(conn, state, fd); err != nil {
		return fmt.Errorf("fusedev: send state to %s: %w", sock, err)
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
	state, fd, err := ReadState(conn)
	if err != nil {
		return nil, nil, fmt.Errorf("fusedev: receive state from supervisor %s: %w", sock, err)
	}
	return state, os.NewFile(uintptr(fd), "/dev/fuse"), nil
}

// WriteState writes one state message on c: state with fd attached. The
// message ends when the writer closes c. A daemon's sendfd and a
// supervisor's answer to a takeover are both such a message.
func WriteState(c *net.UnixConn, state []byte, fd int) error {
	oob := unix.UnixRights(fd)
	for len(state) > 0 || len(oob) > 0 {
		n, oobn, err := c.WriteMsgUnix(state, oob, nil)
		if err != nil {
			return err
		}
		state = state[n:]
		if oobn > 0 {
			oob = nil
		}
	}
	return nil
}

// ReadState reads one state message from c until EOF: at most
// MaxStateSize bytes and exactly one descriptor, which it returns
// close-on-exec and the caller owns.
func ReadState(c *net.UnixConn) ([]byte, int, error) {
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
		n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			if got, perr := parseRights(oob[:oobn]); perr == nil {
				fds = append(fds, got...)
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			closeFDs()
			return nil, -1, errors.New("state message: control data truncated")
		}
		state = append(state, buf[:n]...)
		if len(state) > MaxStateSize {
			closeFDs()
			return nil, -1, fmt.Errorf("state message larger than %d bytes", MaxStateSize)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			closeFDs()
			return nil, -1, err
		}
		if n == 0 && oobn == 0 {
			break
		}
	}
	if len(fds) != 1 {
		closeFDs()
		return nil, -1, fmt.Errorf("state message has %d descriptors, want 1", len(fds))
	}
	unix.CloseOnExec(fds[0])
	return state, fds[0], nil
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

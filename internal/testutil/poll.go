package testutil

import (
	"time"

	"golang.org/x/sys/unix"
)

// Readable waits up to timeout for fd to become readable. poll(2) is
// retried on EINTR: Go's preemption signals interrupt it, the more often
// the busier the machine, and a test reading EINTR as "nothing came"
// fails for no reason.
func Readable(fd int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, int(left.Milliseconds())+1)
		if err == unix.EINTR {
			continue
		}
		return err == nil && n > 0
	}
}

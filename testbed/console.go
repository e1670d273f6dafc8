package testbed

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
)

// consoleLog stores the guest console: the whole of it in a file, the last
// part in memory for error messages, and a live copy to an optional writer.
type consoleLog struct {
	mu   sync.Mutex
	f    *os.File
	live io.Writer
	tail []byte
}

const consoleTailBytes = 64 << 10

func newConsoleLog(path string, live io.Writer) (*consoleLog, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("testbed: console log: %w", err)
	}
	return &consoleLog{f: f, live: live}, nil
}

func (c *consoleLog) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f != nil {
		c.f.Write(p)
	}
	if c.live != nil {
		c.live.Write(p)
	}
	c.tail = append(c.tail, p...)
	if len(c.tail) > consoleTailBytes {
		c.tail = append([]byte(nil), c.tail[len(c.tail)-consoleTailBytes/2:]...)
	}
	return len(p), nil
}

// Tail returns the last n lines, with carriage returns removed.
func (c *consoleLog) Tail(n int) string {
	c.mu.Lock()
	s := strings.ReplaceAll(string(c.tail), "\r", "")
	c.mu.Unlock()
	lines := strings.SplitAfter(s, "\n")
	if len(lines) > 0 && lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	out := strings.Join(lines, "")
	if out != "" && !strings.HasSuffix(out, "\n") {
		out += "\n"
	}
	return out
}

func (c *consoleLog) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f == nil {
		return nil
	}
	err := c.f.Close()
	c.f = nil
	return err
}

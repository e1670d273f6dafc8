package testutil

import (
	"bytes"
	"os"
	"strconv"
)

// Exited reports whether process pid has exited: gone from /proc, or a
// zombie nobody reaped yet (a test's child before Wait, an orphan whose
// new parent does not reap).
func Exited(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	// The state follows the parenthesised command name, which may hold
	// spaces and parentheses itself.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

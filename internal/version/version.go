// Package version holds build information set by the Makefile's -ldflags.
package version

import (
	"fmt"
	"runtime"
)

// Set at link time.
var (
	Version   = "dev"
	GitCommit = "unknown"
	BuildTime = "unknown"
)

// String is the one-line version shown by --version.
func String() string {
	return fmt.Sprintf("version %s, git commit %s, built %s with %s", Version, GitCommit, BuildTime, runtime.Version())
}

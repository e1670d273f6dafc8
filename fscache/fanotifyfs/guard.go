package fanotifyfs

import "github.com/rafsd/rafsd/fscache/fanotifyfs/guard"

// MaybeRunGuard turns the process into the guard of a Daemon if the
// Daemon started it as one (DaemonOptions.Guard), and then never returns;
// see guard.MaybeRun. Binaries that run a Daemon without a supervisor
// call it first thing in main (and test binaries in TestMain).
func MaybeRunGuard() { guard.MaybeRun() }

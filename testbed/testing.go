package testbed

import (
	"context"
	"testing"
)

// StartTB starts a VM for a test: the test's log gets progress, the VM is
// stopped at cleanup, and when the test failed the console tail is logged.
// A failure to boot fails the test with the console tail.
func StartTB(tb testing.TB, o Options) *VM {
	tb.Helper()
	if o.Logf == nil {
		o.Logf = tb.Logf
	}
	vm, err := Start(context.Background(), o)
	if err != nil {
		tb.Fatalf("testbed: start: %v", err)
	}
	tb.Cleanup(func() {
		err := vm.Stop()
		if tb.Failed() && err == nil {
			tb.Logf("guest console tail:\n%s", vm.ConsoleTail(60))
		}
		if err != nil {
			tb.Errorf("testbed: stop: %v", err)
		}
	})
	return vm
}

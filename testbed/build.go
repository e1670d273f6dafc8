package testbed

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/rafsd/rafsd/testbed/kernel"
)

var (
	buildMu   sync.Mutex
	buildMemo = map[string]string{}
)

// ModuleRoot returns the directory of this Go module's go.mod, found from
// the working directory (tests run in their package directory).
func ModuleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("testbed: go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("testbed: not inside the rafsd module (run from the repository)")
	}
	return filepath.Dir(mod), nil
}

// BuildStatic builds the Go command pkg (an import path or a ./path relative
// to the module root) as a static binary (CGO_ENABLED=0) for the guest and
// returns its path. Results are memoized per process; the go build cache
// makes rebuilds in later processes cheap.
func BuildStatic(ctx context.Context, pkg string) (string, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := buildMemo[pkg]; ok {
		return p, nil
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(kernel.DefaultCacheDir(), "bin")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("testbed: %w", err)
	}
	name := filepath.Base(pkg)
	// Per process: another test binary may be building the same command.
	out := filepath.Join(dir, fmt.Sprintf("%s-%d", name, os.Getpid()))
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("testbed: go build %s: %w\n%s", pkg, err, b)
	}
	buildMemo[pkg] = out
	return out, nil
}

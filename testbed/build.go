package testbed

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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
	sweepStale(dir)
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

// sweepStale removes binaries left by test processes that are gone (they are
// named NAME-PID), so repeated runs do not fill the cache directory.
func sweepStale(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		i := strings.LastIndexByte(e.Name(), '-')
		if i < 0 {
			continue
		}
		pid, err := strconv.Atoi(e.Name()[i+1:])
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

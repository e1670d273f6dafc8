// Package kernel builds the testbed's guest kernel: Debian's linux-source
// package, `make tinyconfig`, the fragment in fragment.config merged over it,
// everything built in. The bzImage is cached outside the repository, keyed by
// the source package version and the fragment's hash, so it is rebuilt only
// when either changes; concurrent builders serialize on a file lock.
package kernel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Fragment is the Kconfig fragment merged over tinyconfig.
//
//go:embed fragment.config
var Fragment []byte

// SourcePackage is the Debian package holding the kernel source tarball.
const SourcePackage = "linux-source-6.12"

// BuildDeps are the Debian packages the build needs besides the source.
var BuildDeps = []string{"build-essential", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "cpio", "xz-utils"}

// recipe changes when the build steps change in a way that alters the result.
const recipe = "rafsd-testbed-kernel v1"

// Options tune Ensure. The zero value builds with the defaults.
type Options struct {
	// CacheDir holds sources, build trees and kernels. Default: $RAFSD_TESTBED_CACHE,
	// else /var/cache/rafsd-testbed.
	CacheDir string
	// Fragment overrides the embedded fragment.
	Fragment []byte
	// Logf reports progress; nil: silent.
	Logf func(format string, args ...any)
	// NoInstall fails instead of running apt-get when a package is missing.
	NoInstall bool
}

// Build describes a cached kernel.
type Build struct {
	Path          string        `json:"path"` // the bzImage
	Key           string        `json:"key"`
	SourceVersion string        `json:"source_version"`
	BuildTime     time.Duration `json:"build_time"` // of the build that produced it
	Jobs          int           `json:"jobs"`
	Cached        bool          `json:"-"` // true when Ensure did not build
}

// DefaultCacheDir is where kernels are cached unless overridden.
func DefaultCacheDir() string {
	if d := os.Getenv("RAFSD_TESTBED_CACHE"); d != "" {
		return d
	}
	return "/var/cache/rafsd-testbed"
}

// Key is the cache key of a build from source version ver with fragment frag.
func Key(ver string, frag []byte) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s %s\n", recipe, SourcePackage, ver)
	h.Write(frag)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// RequiredOptions lists the CONFIG_ symbols that must be =y in the final
// .config: every =y line of the fragment.
func RequiredOptions(frag []byte) []string {
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(frag))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if name, ok := strings.CutSuffix(line, "=y"); ok && strings.HasPrefix(name, "CONFIG_") {
			out = append(out, name)
		}
	}
	return out
}

// MissingOptions returns the options of want that are not =y in config.
func MissingOptions(config []byte, want []string) []string {
	set := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(config))
	for sc.Scan() {
		if name, ok := strings.CutSuffix(strings.TrimSpace(sc.Text()), "=y"); ok {
			set[name] = true
		}
	}
	var missing []string
	for _, w := range want {
		if !set[w] {
			missing = append(missing, w)
		}
	}
	return missing
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._+-]`)

// Ensure returns the cached kernel for the current source package and
// fragment, building it first if needed (which takes minutes).
func Ensure(ctx context.Context, o Options) (*Build, error) {
	logf := o.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	frag := o.Fragment
	if frag == nil {
		frag = Fragment
	}
	dir := o.CacheDir
	if dir == "" {
		dir = DefaultCacheDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	unlock, err := lock(ctx, filepath.Join(dir, "lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()

	ver, err := packageVersion(SourcePackage)
	if err != nil || missingPackages(BuildDeps) != nil {
		if o.NoInstall {
			return nil, fmt.Errorf("kernel: %s or build tools not installed and NoInstall set", SourcePackage)
		}
		pkgs := append([]string{SourcePackage}, missingPackages(BuildDeps)...)
		logf("kernel: installing %v", pkgs)
		if err := aptInstall(ctx, pkgs); err != nil {
			return nil, err
		}
		if ver, err = packageVersion(SourcePackage); err != nil {
			return nil, err
		}
	}
	key := Key(ver, frag)
	b := &Build{Path: filepath.Join(dir, "bzImage-"+key), Key: key, SourceVersion: ver}
	meta := b.Path + ".json"
	if _, err := os.Stat(b.Path); err == nil {
		if mb, err := os.ReadFile(meta); err == nil {
			_ = json.Unmarshal(mb, b)
		}
		b.Cached = true
		return b, nil
	}

	srcRoot := filepath.Join(dir, "src-"+unsafeChars.ReplaceAllString(ver, "_"))
	src := filepath.Join(srcRoot, SourcePackage)
	if _, err := os.Stat(filepath.Join(src, "Makefile")); err != nil {
		tarball := "/usr/src/" + SourcePackage + ".tar.xz"
		logf("kernel: unpacking %s", tarball)
		tmp := srcRoot + ".tmp"
		os.RemoveAll(tmp)
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			return nil, fmt.Errorf("kernel: %w", err)
		}
		if err := run(ctx, tmp, nil, "tar", "xf", tarball); err != nil {
			return nil, err
		}
		os.RemoveAll(srcRoot)
		if err := os.Rename(tmp, srcRoot); err != nil {
			return nil, fmt.Errorf("kernel: %w", err)
		}
	}

	out := filepath.Join(dir, "build-"+key)
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	fragPath := filepath.Join(out, "fragment.config")
	if err := os.WriteFile(fragPath, frag, 0o644); err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	logPath := filepath.Join(dir, "build-"+key+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	defer logFile.Close()
	start := time.Now()
	jobs := runtime.NumCPU()
	steps := [][]string{
		{"make", "O=" + out, "tinyconfig"},
		{"scripts/kconfig/merge_config.sh", "-m", "-O", out, filepath.Join(out, ".config"), fragPath},
		{"make", "O=" + out, "olddefconfig"},
	}
	logf("kernel: configuring %s %s in %s (log %s)", SourcePackage, ver, out, logPath)
	for _, s := range steps {
		if err := run(ctx, src, logFile, s[0], s[1:]...); err != nil {
			return nil, fmt.Errorf("%w (log %s)", err, logPath)
		}
	}
	config, err := os.ReadFile(filepath.Join(out, ".config"))
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	if missing := MissingOptions(config, RequiredOptions(frag)); len(missing) > 0 {
		return nil, fmt.Errorf("kernel: options not set in the final .config (Kconfig dependency missing or option renamed): %s", strings.Join(missing, ", "))
	}
	logf("kernel: building bzImage with -j%d (takes minutes on few cores)", jobs)
	if err := run(ctx, src, logFile, "make", "O="+out, fmt.Sprintf("-j%d", jobs), "bzImage"); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, tailFile(logPath, 30))
	}
	b.BuildTime = time.Since(start).Round(time.Second)
	b.Jobs = jobs
	if err := copyFile(filepath.Join(out, "arch/x86/boot/bzImage"), b.Path); err != nil {
		return nil, err
	}
	mb, _ := json.MarshalIndent(b, "", "  ")
	if err := os.WriteFile(meta, mb, 0o644); err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	logf("kernel: built %s in %s", b.Path, b.BuildTime)
	return b, nil
}

// lock takes an exclusive flock on path, waiting until ctx ends.
func lock(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("kernel: lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("kernel: lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("kernel: waiting for %s: %w", path, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func packageVersion(pkg string) (string, error) {
	out, err := exec.Command("dpkg-query", "-W", "-f=${Status}\t${Version}", pkg).Output()
	if err != nil {
		return "", fmt.Errorf("kernel: %s not installed", pkg)
	}
	status, ver, _ := strings.Cut(string(out), "\t")
	if !strings.HasSuffix(status, " installed") || ver == "" {
		return "", fmt.Errorf("kernel: %s not installed (%s)", pkg, status)
	}
	return ver, nil
}

func missingPackages(pkgs []string) []string {
	var missing []string
	for _, p := range pkgs {
		if _, err := packageVersion(p); err != nil {
			missing = append(missing, p)
		}
	}
	return missing
}

func aptInstall(ctx context.Context, pkgs []string) error {
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if err := run(ctx, "/", nil, "apt-get", "update", "-qq"); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "apt-get", append([]string{"install", "-y", "-qq", "--no-install-recommends"}, pkgs...)...)
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kernel: apt-get install %v: %w\n%s", pkgs, err, out)
	}
	return nil
}

// run runs a command in dir, its output to log (or into the error when log is nil).
func run(ctx context.Context, dir string, log io.Writer, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var buf bytes.Buffer
	if log != nil {
		fmt.Fprintf(log, "+ %s %s\n", name, strings.Join(args, " "))
		cmd.Stdout, cmd.Stderr = log, log
	} else {
		cmd.Stdout, cmd.Stderr = &buf, &buf
	}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("kernel: %s %s: %w %s", name, strings.Join(args, " "), err, lastLines(buf.String(), 20))
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return lastLines(string(b), n)
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("kernel: %w", err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	return nil
}

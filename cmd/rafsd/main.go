// Command rafsd is a drop-in for nydusd: it serves RAFS (Nydus) images
// lazily through FUSE, with nydusd's command line and HTTP API, so that
// nydus-snapshotter and Kata Containers start it unchanged.
//
//	rafsd [fuse] --mountpoint DIR [--config F --bootstrap F | --shared-dir D] [--apisock S] ...
//	rafsd virtiofs --sock S --apisock S [--thread-num N]  (also: --sock without a subcommand, as Kata starts it)
//	rafsd singleton --fscache DIR [--fscache-tag T] [--fscache-threads N] --apisock S
//	rafsd fanotify --bootstrap B --mountpoint DIR --config C [--supervisor S [--upgrade]]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/cmd/rafsd/internal/api"
	"github.com/rafsd/rafsd/cmd/rafsd/internal/daemon"
	"github.com/rafsd/rafsd/fscache/fanotifyfs"
	"github.com/rafsd/rafsd/internal/version"
)

func main() {
	fanotifyfs.MaybeRunGuard() // the fanotify mode's guard child
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// args holds every nydusd flag; flags rafsd does not act on are accepted so
// that existing command lines keep working.
type args struct {
	mode string

	apisock, config, id, logLevel, logFile, supervisor string
	logRotationSize                                    string
	rlimitNofile                                       uint64
	upgrade                                            bool

	mountpoint, failoverPolicy string
	threads                    int
	writable                   bool

	bootstrap, localfsDir, sharedDir, prefetchFiles, virtualMountpoint, dedupDB string
	image                                                                       string // imageref.go

	hybridMode bool
	sock       string

	fscache, fscacheTag string
	fscacheThreads      int

	metricsAddr string
	showVersion bool
}

var subcommands = map[string]bool{"fuse": true, "virtiofs": true, "singleton": true, "fanotify": true}

func newFlagSet(a *args, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("rafsd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	str := func(p *string, def, help string, names ...string) {
		for _, n := range names {
			fs.StringVar(p, n, def, help)
		}
	}
	str(&a.apisock, "", "path to the administration API socket", "apisock", "A")
	str(&a.config, "", "path to the daemon configuration file (nydusd JSON or TOML)", "config", "C")
	str(&a.id, "", "service instance identifier", "id")
	str(&a.logLevel, "info", "log level: trace, debug, info, warn, error", "log-level", "l")
	str(&a.logFile, "", "log to this file instead of stderr", "log-file", "L")
	str(&a.logRotationSize, "0", "accepted for compatibility; rotation is left to the system", "log-rotation-size")
	fs.Uint64Var(&a.rlimitNofile, "rlimit-nofile", 1000000, "raise RLIMIT_NOFILE to this (0 leaves it)")
	str(&a.supervisor, "", "supervisor socket for failover and live upgrade", "supervisor")
	fs.BoolVar(&a.upgrade, "upgrade", false, "start in upgrade mode: wait for the takeover API call")
	str(&a.mountpoint, "", "FUSE mountpoint", "mountpoint", "M")
	str(&a.failoverPolicy, "resend", "FUSE failover policy: none, resend, flush", "failover-policy")
	for _, n := range []string{"fuse-threads", "thread-num"} {
		fs.IntVar(&a.threads, n, 4, "number of FUSE request readers")
	}
	fs.BoolVar(&a.writable, "writable", false, "mount the FUSE filesystem read-write")
	str(&a.bootstrap, "", "RAFS bootstrap (metadata) to mount", "bootstrap", "B")
	str(&a.image, "", "Nydus image reference to mount: bootstrap from the registry, blobs read lazily from it (FUSE mode, rafsd only)", "image")
	str(&a.localfsDir, "", "blob directory; enables the localfs backend without a config", "localfs-dir", "D")
	str(&a.sharedDir, "", "host directory to share through passthroughfs", "shared-dir", "s")
	str(&a.prefetchFiles, "", "file listing paths to prefetch, one per line", "prefetch-files")
	str(&a.virtualMountpoint, "/", "path inside the FUSE mount for the --bootstrap/--shared-dir filesystem", "virtual-mountpoint", "m")
	str(&a.dedupDB, "", "accepted for compatibility (chunk dedup database)", "dedup-db")
	fs.BoolVar(&a.hybridMode, "hybrid-mode", false, "enable both RAFS and passthroughfs (always on in rafsd)")
	str(&a.sock, "", "vhost-user socket (virtio-fs mode)", "sock")
	str(&a.fscache, "", "fscache working directory", "fscache", "F")
	str(&a.fscacheTag, "", "fscache tag", "fscache-tag")
	fs.IntVar(&a.fscacheThreads, "fscache-threads", 4, "fscache worker threads")
	str(&a.metricsAddr, "", "also serve Prometheus /metrics on this TCP address (rafsd only)", "metrics-addr")
	fs.BoolVar(&a.showVersion, "version", false, "print the version and exit")
	fs.BoolVar(&a.showVersion, "V", false, "print the version and exit")
	return fs
}

// parseArgs accepts nydusd's forms: global flags, an optional subcommand,
// then its flags (in any order around it).
func parseArgs(argv []string, stderr io.Writer) (*args, error) {
	a := &args{}
	fs := newFlagSet(a, stderr)
	if err := fs.Parse(argv); err != nil {
		return nil, err
	}
	rest := fs.Args()
	if len(rest) > 0 && subcommands[rest[0]] {
		a.mode = rest[0]
		if err := fs.Parse(rest[1:]); err != nil {
			return nil, err
		}
		rest = fs.Args()
	}
	if len(rest) > 0 {
		return nil, fmt.Errorf("unexpected argument %q", rest[0])
	}
	if a.mode == "" {
		switch {
		case a.sock != "" && a.mountpoint == "":
			a.mode = "virtiofs" // how Kata starts it: --sock, no subcommand
		case a.fscache != "":
			a.mode = "singleton"
		default:
			a.mode = "fuse"
		}
	}
	switch a.failoverPolicy {
	case "none", "resend", "flush":
	default:
		return nil, fmt.Errorf("--failover-policy %q: want none, resend or flush", a.failoverPolicy)
	}
	if a.threads < 1 || a.threads > 1024 {
		return nil, fmt.Errorf("--thread-num %d: want 1..1024", a.threads)
	}
	if _, err := daemon.ParseLevel(a.logLevel); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	return a, nil
}

func run(argv []string, stdout, stderr io.Writer) int {
	a, err := parseArgs(argv, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "rafsd:", err)
		return 2
	}
	if a.showVersion {
		fmt.Fprintln(stdout, "rafsd", version.String())
		return 0
	}
	level := new(slog.LevelVar)
	l, _ := daemon.ParseLevel(a.logLevel)
	level.Set(l)
	logOut := stderr
	if a.logFile != "" {
		f, err := os.OpenFile(a.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			fmt.Fprintln(stderr, "rafsd: --log-file:", err)
			return 1
		}
		defer f.Close()
		logOut = f
	}
	log := slog.New(slog.NewTextHandler(logOut, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)

	switch a.mode {
	case "virtiofs":
		if err := runVirtiofs(a, log, level); err != nil {
			log.Error("rafsd failed", "err", err)
			fmt.Fprintln(stderr, "rafsd:", err)
			return 1
		}
		return 0
	case "singleton":
		if err := runSingleton(a, log); err != nil {
			log.Error("rafsd failed", "err", err)
			fmt.Fprintln(stderr, "rafsd:", err)
			return 1
		}
		return 0
	case "fanotify":
		if err := runFanotify(a, log); err != nil {
			log.Error("rafsd failed", "err", err)
			fmt.Fprintln(stderr, "rafsd:", err)
			return 1
		}
		return 0
	}
	if err := runFuse(a, log, level); err != nil {
		log.Error("rafsd failed", "err", err)
		fmt.Fprintln(stderr, "rafsd:", err)
		return 1
	}
	return 0
}

func runFuse(a *args, log *slog.Logger, level *slog.LevelVar) error {
	if a.mountpoint == "" {
		return errors.New("--mountpoint is required in FUSE mode")
	}
	if err := useImage(a, log); err != nil {
		return err
	}
	if a.bootstrap != "" && a.sharedDir != "" {
		return errors.New("--bootstrap and --shared-dir are exclusive")
	}
	if a.prefetchFiles != "" && a.bootstrap == "" {
		return errors.New("--prefetch-files needs --bootstrap")
	}
	if a.upgrade && a.supervisor == "" {
		return errors.New("--upgrade needs --supervisor")
	}
	raiseNofile(a.rlimitNofile, log)
	// nydusd's failover: nydus-snapshotter restarts a crashed daemon with
	// its original command line (no --upgrade) and then calls takeover, so
	// a leftover mount plus a dead API socket means "take over, don't mount".
	if !a.upgrade && a.supervisor != "" && a.apisock != "" && previousCrashed(a.mountpoint, a.apisock) {
		log.Warn("a previous daemon crashed: waiting for takeover", "mountpoint", a.mountpoint)
		a.upgrade = true
	}
	// Saved in the takeover state: a new daemon may run elsewhere.
	for _, p := range []*string{&a.bootstrap, &a.sharedDir} {
		if *p != "" {
			abs, err := filepath.Abs(*p)
			if err != nil {
				return err
			}
			*p = abs
		}
	}

	opts := daemon.Options{
		ID: a.id, Supervisor: a.supervisor, Mountpoint: a.mountpoint, Threads: a.threads,
		Writable: a.writable, Upgrade: a.upgrade, FailoverPolicy: a.failoverPolicy,
		Logger: log, LogLevel: level, InitialPath: a.virtualMountpoint,
	}
	switch {
	case a.bootstrap != "":
		cfg, err := initialConfig(a)
		if err != nil {
			return err
		}
		cmd := &daemon.MountCmd{Source: a.bootstrap, FsType: daemon.FsTypeRafs, Config: cfg}
		if a.prefetchFiles != "" {
			if cmd.PrefetchFiles, err = readLines(a.prefetchFiles); err != nil {
				return fmt.Errorf("--prefetch-files: %w", err)
			}
		}
		opts.Initial = cmd
	case a.sharedDir != "":
		opts.Initial = &daemon.MountCmd{Source: a.sharedDir, FsType: daemon.FsTypePassthrough}
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts.Registry = reg
	d := daemon.New(opts)
	h := api.New(d, reg, log)

	// Catch SIGTERM before anyone can know our API socket exists.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// The API socket comes first: Kata gives it 300 ms to appear.
	closeListeners, err := serveListeners(a, h, reg)
	if err != nil {
		return err
	}
	defer closeListeners()

	if err := d.Setup(); err != nil {
		return err
	}
	log.Info("rafsd started", "version", version.Version, "mountpoint", a.mountpoint, "state", d.State(), "apisock", a.apisock)
	return d.Wait(ctx)
}

// initialConfig returns the config of the --bootstrap mount: --config's
// file, or a localfs backend at --localfs-dir.
func initialConfig(a *args) (string, error) {
	if a.config != "" {
		b, err := os.ReadFile(a.config)
		if err != nil {
			return "", fmt.Errorf("--config: %w", err)
		}
		return string(b), nil
	}
	if a.localfsDir != "" {
		q := strconv.Quote(a.localfsDir)
		return `{"device":{"backend":{"type":"localfs","config":{"dir":` + q + `}}},"mode":"direct"}`, nil
	}
	return "", errors.New("--bootstrap needs --config or --localfs-dir")
}

func readLines(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out, nil
}

// raiseNofile raises RLIMIT_NOFILE as nydusd does (bounded by nr_open).
func raiseNofile(want uint64, log *slog.Logger) {
	if want == 0 {
		return
	}
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n < want {
			want = n
		}
	}
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur >= want {
		return
	}
	rl.Cur, rl.Max = want, max(rl.Max, want)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		log.Debug("RLIMIT_NOFILE unchanged", "err", err)
	}
}

// previousCrashed reports what nydusd's is_crashed checks: mountpoint is
// still mounted and the API socket exists but nobody accepts on it.
func previousCrashed(mountpoint, apisock string) bool {
	if _, err := os.Stat(apisock); err != nil {
		return false
	}
	if c, err := net.Dial("unix", apisock); err == nil {
		c.Close()
		return false
	}
	mnt, err := filepath.Abs(mountpoint)
	if err != nil {
		return false
	}
	if r, err := filepath.EvalSymlinks(mnt); err == nil {
		mnt = r
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.ReplaceAll(f[4], "\\040", " ") == mnt {
			return true
		}
	}
	return false
}

// serveListeners starts the API on a.apisock and, with --metrics-addr,
// Prometheus on TCP, and returns what shuts both down and removes the socket.
func serveListeners(a *args, h http.Handler, reg *prometheus.Registry) (func(), error) {
	var closers []func()
	closeAll := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	if a.apisock != "" {
		srv, err := api.Listen(a.apisock, h)
		if err != nil {
			return nil, err
		}
		closers = append(closers, func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = srv.Shutdown(ctx)
			_ = os.Remove(a.apisock)
		})
	}
	if a.metricsAddr != "" {
		l, err := net.Listen("tcp", a.metricsAddr)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("--metrics-addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		ms := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = ms.Serve(l) }()
		closers = append(closers, func() { ms.Close() })
	}
	return closeAll, nil
}

package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/rafsd/rafsd/rafs/config"
)

// The configs shipped in configs/ must parse (Parse rejects unknown keys).
func TestShippedConfigsParse(t *testing.T) {
	files, _ := filepath.Glob("../../configs/*.json")
	if len(files) < 2 {
		t.Fatalf("configs: found %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := config.Parse(b); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// shippedConfig checks that path (as written in a shipped file, e.g.
// /etc/rafsd/X) names a config that configs/ ships, and that it parses.
func shippedConfig(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../../configs", filepath.Base(path)))
	if err != nil {
		t.Fatalf("%s is not one of configs/: %v", path, err)
	}
	if _, err := config.Parse(b); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// The nydus-snapshotter snippet: only keys of the snapshotter's [daemon]
// section, pointing at rafsd and at a config shipped beside it.
func TestShippedSnapshotterSnippet(t *testing.T) {
	b, err := os.ReadFile("../../configs/nydus-snapshotter-config.toml")
	if err != nil {
		t.Fatal(err)
	}
	var snippet struct {
		Daemon struct {
			NydusdPath    string `toml:"nydusd_path"`
			NydusdConfig  string `toml:"nydusd_config"`
			FsDriver      string `toml:"fs_driver"`
			RecoverPolicy string `toml:"recover_policy"`
			ThreadsNumber int    `toml:"threads_number"`
		} `toml:"daemon"`
	}
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&snippet); err != nil {
		t.Fatalf("snippet: %v", err)
	}
	d := snippet.Daemon
	if filepath.Base(d.NydusdPath) != "rafsd" || d.FsDriver != "fusedev" || d.ThreadsNumber < 1 {
		t.Fatalf("snippet [daemon] %+v: want nydusd_path .../rafsd, fs_driver fusedev, threads_number >= 1", d)
	}
	// nydus-snapshotter's recover policies; failover needs the supervisor
	// protocol, which rafsd speaks (TestFailoverAfterSIGKILL).
	if d.RecoverPolicy != "none" && d.RecoverPolicy != "restart" && d.RecoverPolicy != "failover" {
		t.Fatalf("recover_policy %q", d.RecoverPolicy)
	}
	shippedConfig(t, d.NydusdConfig)
}

// The systemd unit: systemd itself accepts it (with ExecStart pointing at
// a real binary), and its command line is one rafsd parses, naming a
// shipped config.
func TestShippedSystemdUnit(t *testing.T) {
	raw, err := os.ReadFile("../../configs/rafsd.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := strings.ReplaceAll(string(raw), "\\\n", " ")
	m := regexp.MustCompile(`(?m)^ExecStart=(\S+)(.*)$`).FindStringSubmatch(unit)
	if m == nil || filepath.Base(m[1]) != "rafsd" {
		t.Fatalf("no ExecStart=.../rafsd in the unit: %q", m)
	}
	var stderr bytes.Buffer
	a, err := parseArgs(strings.Fields(m[2]), &stderr)
	if err != nil || a.mode != "fuse" || a.mountpoint == "" || a.apisock == "" || a.bootstrap == "" {
		t.Fatalf("ExecStart args %q: %+v, %v %s", m[2], a, err, stderr.String())
	}
	shippedConfig(t, a.config)

	bin, err := os.Executable() // any executable will do for the check
	if err != nil {
		t.Fatal(err)
	}
	local := filepath.Join(t.TempDir(), "rafsd.service")
	if err := os.WriteFile(local, []byte(strings.ReplaceAll(string(raw), m[1], bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	// Unknown keys and bad values are only warnings: any output fails.
	out, err := exec.Command("systemd-analyze", "verify", local).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		args     string
		mode     string
		threads  int
		wantErr  string
		upgrade  bool
		mountpnt string
	}{
		{args: "fuse --mountpoint /m --thread-num 8 --apisock /a", mode: "fuse", threads: 8, mountpnt: "/m"},
		{args: "--mountpoint /m --fuse-threads 2", mode: "fuse", threads: 2, mountpnt: "/m"},
		{args: "--apisock /a fuse -M /m --upgrade --supervisor /s --id x --failover-policy flush", mode: "fuse", threads: 4, upgrade: true, mountpnt: "/m"},
		{args: "--sock /v --apisock /a --log-level debug", mode: "virtiofs", threads: 4},
		{args: "singleton --fscache /c --fscache-threads 2", mode: "singleton", threads: 4},
		{args: "--fscache /c", mode: "singleton", threads: 4},
		{args: "virtiofs --sock /v --hybrid-mode", mode: "virtiofs", threads: 4},
		{args: "fuse --mountpoint /m --failover-policy maybe", wantErr: "failover-policy"},
		{args: "fuse --mountpoint /m --thread-num 0", wantErr: "thread-num"},
		{args: "fuse --mountpoint /m --log-level loud", wantErr: "log level"},
		{args: "fuse --mountpoint /m extra", wantErr: "unexpected argument"},
		{args: "--no-such-flag", wantErr: "not defined"},
	} {
		var stderr bytes.Buffer
		a, err := parseArgs(strings.Fields(tc.args), &stderr)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: err %v, want %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.args, err)
			continue
		}
		if a.mode != tc.mode || a.threads != tc.threads || a.upgrade != tc.upgrade || a.mountpoint != tc.mountpnt {
			t.Errorf("%q: mode %q threads %d upgrade %v mountpoint %q", tc.args, a.mode, a.threads, a.upgrade, a.mountpoint)
		}
	}
}

func TestRunExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args string
		code int
		out  string
	}{
		{"--version", 0, "rafsd version"},
		{"-V", 0, "git commit"},
		{"fuse", 1, "--mountpoint is required"},
		{"fuse --mountpoint /nonexistent --bootstrap /b --shared-dir /s", 1, "exclusive"},
		{"fuse --mountpoint /nonexistent --upgrade", 1, "--supervisor"},
		{"--bogus", 2, ""},
	} {
		var out, errb bytes.Buffer
		code := run(strings.Fields(tc.args), &out, &errb)
		if code != tc.code || !strings.Contains(out.String()+errb.String(), tc.out) {
			t.Errorf("%q: exit %d (want %d), output %q (want %q)", tc.args, code, tc.code, out.String()+errb.String(), tc.out)
		}
	}
}

// TestVersion: --version names the version, the git commit and the Go
// version, as stamped by make build's -ldflags.
func TestVersion(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "rafsd")
	pkg := "github.com/rafsd/rafsd/internal/version"
	build := exec.Command("go", "build", "-o", bin, "-ldflags", "-X "+pkg+".Version=v9.8.7 -X "+pkg+".GitCommit=abc1234", ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("rafsd --version: %v\n%s", err, out)
	}
	for _, want := range []string{"rafsd version v9.8.7", "git commit abc1234", runtime.Version()} {
		if !strings.Contains(string(out), want) {
			t.Errorf("rafsd --version: %q lacks %q", out, want)
		}
	}
}

// TestDemo runs make demo's script against the binaries under test: the
// README's first command must keep working.
func TestDemo(t *testing.T) {
	requireRoot(t)
	cmd := exec.Command("bash", "../../scripts/demo.sh")
	cmd.Env = append(os.Environ(), "BIN="+binDir)
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("\ndemo OK\n")) {
		t.Fatalf("scripts/demo.sh: %v\n%s", err, out)
	}
	for _, want := range []string{`"state":"RUNNING"`, "big.bin: identical to the source", `"backend_type":"localfs"`, "rafsd_backend_requests_total"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}

package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

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

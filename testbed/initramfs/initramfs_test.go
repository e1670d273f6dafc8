package initramfs

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// extract unpacks a cpio archive with GNU cpio, the reference reader.
func extract(t *testing.T, archive []byte, gz bool) string {
	t.Helper()
	dir := t.TempDir()
	shell := "cpio -id --quiet --no-absolute-filenames"
	if gz {
		shell = "gzip -dc | " + shell
	}
	cmd := exec.Command("sh", "-c", shell)
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(archive)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, out)
	}
	return dir
}

func TestWriterRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	big := bytes.Repeat([]byte("0123456789abcdef"), 70000)
	src := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(src, big, 0o600); err != nil {
		t.Fatal(err)
	}
	steps := []error{
		w.Dir("/etc", 0o750),
		w.File("/etc/hostname", 0o644, []byte("guest\n")),
		w.File("deep/a/b/c.txt", 0o600, []byte("odd")), // parents made on the way; 3 bytes needs padding
		w.File("/empty", 0o644, nil),
		w.CopyFile("/bin/big", 0o755, src),
		w.Symlink("/bin/sh", "big"),
		w.CharDev("/dev/null", 0o666, 1, 3),
		w.Close(),
	}
	for i, err := range steps {
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d not 4-aligned", buf.Len())
	}
	dir := extract(t, buf.Bytes(), false)
	tests := []struct {
		path string
		mode os.FileMode
		data string
	}{
		{"etc", os.ModeDir | 0o750, ""},
		{"etc/hostname", 0o644, "guest\n"},
		{"deep/a/b", os.ModeDir | 0o755, ""},
		{"deep/a/b/c.txt", 0o600, "odd"},
		{"empty", 0o644, ""},
		{"bin/big", 0o755, string(big)},
		{"dev/null", os.ModeDevice | os.ModeCharDevice | 0o666, ""},
	}
	for _, tt := range tests {
		fi, err := os.Lstat(filepath.Join(dir, tt.path))
		if err != nil {
			t.Errorf("%s: %v", tt.path, err)
			continue
		}
		if fi.Mode() != tt.mode {
			t.Errorf("%s: mode %v, want %v", tt.path, fi.Mode(), tt.mode)
		}
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(filepath.Join(dir, tt.path))
			if string(b) != tt.data {
				t.Errorf("%s: content differs (%d bytes, want %d)", tt.path, len(b), len(tt.data))
			}
		}
	}
	if l, err := os.Readlink(filepath.Join(dir, "bin/sh")); err != nil || l != "big" {
		t.Errorf("symlink: %q %v", l, err)
	}
}

func TestWriterRejects(t *testing.T) {
	w := NewWriter(&bytes.Buffer{})
	if err := w.File("/a", 0o644, nil); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		err  error
	}{
		{"duplicate", w.File("/a", 0o644, nil)},
		{"root", w.File("/", 0o644, nil)},
		{"dot dot collapses to root", w.Dir("/..", 0o755)},
		{"not regular", w.CopyFile("/d", 0o644, "/dev")},
		{"missing source", w.CopyFile("/m", 0o644, "/nonexistent")},
	}
	for _, tt := range tests {
		if tt.err == nil {
			t.Errorf("%s: no error", tt.name)
		}
	}
	// ".." cannot climb out of the archive root.
	var buf bytes.Buffer
	w = NewWriter(&buf)
	if err := w.File("../../x", 0o644, []byte("y")); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if !strings.Contains(buf.String(), "x\x00") || strings.Contains(buf.String(), "..") {
		t.Errorf("path not confined: %q", buf.String()[:200])
	}
}

func TestBuild(t *testing.T) {
	init := filepath.Join(t.TempDir(), "init")
	if err := os.WriteFile(init, []byte("#!/bin/sh\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	err := Build(&buf, init, []File{
		{Path: "/bin/tool", Source: init},
		{Path: "/etc/conf.json", Data: []byte("{}")},
	})
	if err != nil {
		t.Fatal(err)
	}
	dir := extract(t, buf.Bytes(), true)
	for path, mode := range map[string]os.FileMode{
		"init":          0o755,
		"bin/tool":      0o755,
		"etc/conf.json": 0o644,
		"dev/console":   os.ModeDevice | os.ModeCharDevice | 0o600,
		"proc":          os.ModeDir | 0o755,
		"tmp":           os.ModeDir | 0o755,
	} {
		fi, err := os.Lstat(filepath.Join(dir, path))
		if err != nil || fi.Mode() != mode {
			t.Errorf("%s: %v %v, want mode %v", path, fi, err, mode)
		}
	}
	if err := BuildFile(filepath.Join(t.TempDir(), "x"), "", nil); err != ErrNoInit {
		t.Errorf("BuildFile without init: %v", err)
	}
}

package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/internal/testutil"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
)

var fixtures = testutil.NydusFixtures()

// cli runs rafs-image in-process and returns its exit code and output.
func cli(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

func mustCLI(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	code, out, errs := cli(t, stdin, args...)
	if code != 0 {
		t.Fatalf("rafs-image %q: exit %d\n%s%s", args, code, out, errs)
	}
	return out
}

func writeTree(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for p, c := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(c, "->") {
			if err := os.Symlink(c[2:], full); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func readTree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			tgt, _ := os.Readlink(p)
			out[rel] = "->" + tgt
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			out[rel] = string(b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameMap(t *testing.T, what string, want, got map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s: want %.30q got %.30q", what, k, v, got[k])
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: extra %s", what, k)
		}
	}
}

var sample = map[string]string{
	"etc/hosts":      "127.0.0.1 localhost\n",
	"bin/tool":       strings.Repeat("binary data ", 50000),
	"usr/lib/link":   "->../../bin/tool",
	"usr/share/doc":  "docs",
	"var/empty-file": "",
}

func TestCreateCheckInspectUnpack(t *testing.T) {
	src := t.TempDir()
	writeTree(t, src, sample)
	for _, v := range supportedVersions {
		dir := t.TempDir()
		boot, blobs := filepath.Join(dir, "bootstrap"), filepath.Join(dir, "blobs")
		out := mustCLI(t, "/etc/hosts\n/bin\n", "create", "--fs-version", v, "--compressor", "lz4_block", "--digester", "sha256",
			"--chunk-size", "0x10000", "--prefetch-policy", "fs", "--bootstrap", boot, "--blob-dir", blobs, "--output-json", filepath.Join(dir, "out.json"), src)
		if !strings.Contains(out, "blob ") {
			t.Errorf("create output: %s", out)
		}
		var res createResult
		j, _ := os.ReadFile(filepath.Join(dir, "out.json"))
		if err := json.Unmarshal(j, &res); err != nil || len(res.Blobs) != 1 || res.Blob != res.Blobs[0] {
			t.Fatalf("output json %s: %v", j, err)
		}
		if _, err := os.Stat(filepath.Join(blobs, res.Blob)); err != nil {
			t.Fatal(err)
		}
		out = mustCLI(t, "", "check", "--bootstrap", boot, "--blob-dir", blobs)
		if !strings.Contains(out, "structure OK") || !strings.Contains(out, "data OK") {
			t.Errorf("check output: %s", out)
		}
		// inspect --json
		out = mustCLI(t, "", "inspect", "--json", "-R", "all", boot)
		var ins inspection
		if err := json.Unmarshal([]byte(out), &ins); err != nil {
			t.Fatal(err)
		}
		if ins.Version != int(v[0]-'0') || ins.Stats.Files != 4 || ins.Stats.Symlinks != 1 || len(ins.Blobs) != 1 || ins.Blobs[0].Compressor != "lz4_block" ||
			len(ins.Chunks) == 0 || len(ins.Prefetch) != 2 || ins.Prefetch[0] != "/etc/hosts" {
			t.Errorf("inspect: %+v", ins)
		}
		if out := mustCLI(t, "", "inspect", boot); !strings.Contains(out, "usr/lib/link -> ../../bin/tool") {
			t.Errorf("inspect text: %s", out)
		}
		// unpack to a directory and to a tar
		mustCLI(t, "", "unpack", "--bootstrap", boot, "--blob-dir", blobs, "--output", filepath.Join(dir, "out"))
		sameMap(t, "unpack dir v"+v, sample, readTree(t, filepath.Join(dir, "out")))
		tarPath := filepath.Join(dir, "x.tar")
		mustCLI(t, "", "unpack", "--bootstrap", boot, "--blob", filepath.Join(blobs, res.Blob), "--output", tarPath)
		got := map[string]string{}
		f, _ := os.Open(tarPath)
		tr := tar.NewReader(f)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			switch h.Typeflag {
			case tar.TypeReg:
				b, _ := io.ReadAll(tr)
				got[h.Name] = string(b)
			case tar.TypeSymlink:
				got[h.Name] = "->" + h.Linkname
			}
		}
		f.Close()
		sameMap(t, "unpack tar v"+v, sample, got)
	}
}

func TestTarSourceParentAndMerge(t *testing.T) {
	dir := t.TempDir()
	mkTar := func(name string, entries map[string]string) string {
		p := filepath.Join(dir, name)
		f, _ := os.Create(p)
		tw := tar.NewWriter(f)
		for _, n := range sortedKeys(entries) {
			tw.WriteHeader(&tar.Header{Name: n, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(entries[n]))})
			tw.Write([]byte(entries[n]))
		}
		tw.Close()
		f.Close()
		return p
	}
	l0 := mkTar("l0.tar", map[string]string{"a/x": "x0", "a/y": "y0", "b": "b0"})
	l1 := mkTar("l1.tar", map[string]string{"a/.wh.x": "", "c": "y0"})
	blobs := filepath.Join(dir, "blobs")
	v := supportedVersions[len(supportedVersions)-1]
	mustCLI(t, "", "create", "--type", "tar-rafs", "--fs-version", v, "--bootstrap", filepath.Join(dir, "b0"), "--blob-dir", blobs, l0)
	mustCLI(t, "", "create", "-v", v, "-B", filepath.Join(dir, "b1"), "-D", blobs, l1) // a file: tar without --type
	// l1 built on l0: "c" has l0's data, so no new blob at all.
	out := mustCLI(t, "", "create", "--type", "tar-rafs", "--fs-version", v, "--parent-bootstrap", filepath.Join(dir, "b0"),
		"--bootstrap", filepath.Join(dir, "b01"), "--blob-dir", blobs, l1)
	if !strings.Contains(out, "no new blob") {
		t.Errorf("parent build stored data again: %s", out)
	}
	mustCLI(t, "", "merge", "--bootstrap", filepath.Join(dir, "merged"), filepath.Join(dir, "b0"), filepath.Join(dir, "b1"))
	want := map[string]string{"a/y": "y0", "b": "b0", "c": "y0"}
	for _, b := range []string{"b01", "merged"} {
		mustCLI(t, "", "check", "--bootstrap", filepath.Join(dir, b), "--blob-dir", blobs)
		out := filepath.Join(dir, "out-"+b)
		mustCLI(t, "", "unpack", "--bootstrap", filepath.Join(dir, b), "--blob-dir", blobs, "--output", out)
		sameMap(t, b, want, readTree(t, out))
	}
	// --chunk-dict: a layer whose data is all in the dictionary needs no blob.
	out = mustCLI(t, "", "create", "-t", "tar-rafs", "-v", v, "--chunk-dict", "bootstrap="+filepath.Join(dir, "b0"),
		"-B", filepath.Join(dir, "bd"), "-D", blobs, l1)
	if !strings.Contains(out, "no new blob") {
		t.Errorf("chunk dict build stored data again: %s", out)
	}
	img, err := bootstrap.Open(filepath.Join(dir, "bd"))
	if err != nil || len(img.Blobs) != 1 {
		t.Fatalf("chunk dict image: %v", err)
	}
}

func sortedKeys(m map[string]string) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	for i := range k {
		for j := i + 1; j < len(k); j++ {
			if k[j] < k[i] {
				k[i], k[j] = k[j], k[i]
			}
		}
	}
	return k
}

// TestCheckFixtures runs check on the nydus-image-built fixtures, then
// flips one byte of a chunk and expects a clear failure.
func TestCheckFixtures(t *testing.T) {
	for _, name := range fixtureNames {
		t.Run(name, func(t *testing.T) {
			boot := filepath.Join(fixtures, name, "bootstrap")
			blobs := filepath.Join(fixtures, name, "blobs")
			out := mustCLI(t, "", "check", "--bootstrap", boot, "--blob-dir", blobs)
			if !strings.Contains(out, "data OK") {
				t.Fatalf("check: %s", out)
			}
			img, err := bootstrap.Open(boot)
			if err != nil {
				t.Fatal(err)
			}
			// Copy the blob and flip a byte in the middle of a chunk.
			var c *rafs.Chunk
			for _, i := range img.Inodes {
				if len(i.Chunks) > 0 {
					c = i.Chunks[0].Chunk
					break
				}
			}
			bl := img.Blobs[c.BlobIndex]
			data, err := os.ReadFile(filepath.Join(blobs, bl.ID))
			if err != nil {
				t.Fatal(err)
			}
			bad := t.TempDir()
			data[c.CompressedOffset+uint64(c.CompressedSize)/2] ^= 0x40
			if err := os.WriteFile(filepath.Join(bad, bl.ID), data, 0o644); err != nil {
				t.Fatal(err)
			}
			code, out, errs := cli(t, "", "check", "--bootstrap", boot, "--blob-dir", bad)
			if code == 0 || !strings.Contains(errs, "data check failed") || !strings.Contains(errs, bl.ID) ||
				!(strings.Contains(errs, "digest mismatch") || strings.Contains(errs, "corrupt")) {
				t.Errorf("check of a corrupted blob: exit %d\n%s%s", code, out, errs)
			}
		})
	}
}

func TestUsageErrors(t *testing.T) {
	src := t.TempDir()
	cases := [][]string{
		{},
		{"nope"},
		{"create", src},
		{"create", "--bootstrap", "/tmp/x", src},
		{"create", "--bootstrap", "/tmp/x", "--blob-dir", t.TempDir(), "--chunk-size", "0x1001", src},
		{"create", "--bootstrap", "/tmp/x", "--blob-dir", t.TempDir(), "--compressor", "brotli", src},
		{"create", "--bootstrap", "/tmp/x", "--blob-dir", t.TempDir(), "--fs-version", "4", src},
		{"create", "--bootstrap", "/tmp/x", "--blob-dir", t.TempDir(), "--type", "stargz", src},
		{"create", "--bootstrap", "/tmp/x", "--blob-dir", t.TempDir(), "--whiteout-spec", "aufs", src},
		{"check", "--bootstrap", filepath.Join(src, "missing")},
		{"inspect", "-R", "bogus", filepath.Join(fixtures, "v5-none-sha256/bootstrap")},
		{"merge", "--bootstrap", filepath.Join(src, "m")},
		{"unpack", "--bootstrap", filepath.Join(fixtures, "v5-none-sha256/bootstrap")},
	}
	for _, args := range cases {
		if code, out, errs := cli(t, "", args...); code == 0 {
			t.Errorf("%q: exit 0\n%s%s", args, out, errs)
		}
	}
	if code, out, _ := cli(t, "", "--version"); code != 0 || !strings.HasPrefix(out, "rafs-image version ") {
		t.Errorf("--version: %d %q", code, out)
	}
}

// TestStdio: a layer tar on stdin, an unpacked tar on stdout.
func TestStdio(t *testing.T) {
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	tw.WriteHeader(&tar.Header{Name: "hello", Typeflag: tar.TypeReg, Mode: 0o644, Size: 5})
	tw.Write([]byte("world"))
	tw.Close()
	dir := t.TempDir()
	boot, blobs := filepath.Join(dir, "boot"), filepath.Join(dir, "blobs")
	mustCLI(t, layer.String(), "create", "--bootstrap", boot, "--blob-dir", blobs, "-")
	out := mustCLI(t, "", "unpack", "--bootstrap", boot, "--blob-dir", blobs, "--output", "-")
	tr := tar.NewReader(strings.NewReader(out))
	got := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		if h.Typeflag == tar.TypeReg {
			got[h.Name] = string(b)
		}
	}
	sameMap(t, "stdout tar", map[string]string{"hello": "world"}, got)
}

// TestHostileBootstraps flips bytes all over the fixtures' bootstraps and
// runs check (with blobs), inspect and unpack on each: every outcome is
// fine except a panic or a hang.
func TestHostileBootstraps(t *testing.T) {
	for _, name := range fixtureNames {
		orig, err := os.ReadFile(filepath.Join(fixtures, name, "bootstrap"))
		if err != nil {
			t.Fatal(err)
		}
		blobs := filepath.Join(fixtures, name, "blobs")
		boot := filepath.Join(t.TempDir(), "boot")
		failed, tried := 0, 0
		// About 60 positions per bootstrap, spread over all of it.
		for off := 0; off < len(orig); off += len(orig)/60 + 1 {
			tried++
			data := bytes.Clone(orig)
			data[off] ^= 0xa5
			if err := os.WriteFile(boot, data, 0o644); err != nil {
				t.Fatal(err)
			}
			if code, _, _ := cli(t, "", "check", "--bootstrap", boot, "--blob-dir", blobs); code != 0 {
				failed++
				continue
			}
			cli(t, "", "inspect", "--json", "-R", "all", boot)
			cli(t, "", "unpack", "--bootstrap", boot, "--blob-dir", blobs, "--output", "-")
		}
		t.Logf("%s: %d of %d corruptions rejected by check", name, failed, tried)
	}
}

// TestCreateTargzRef: `create --type targz-ref` keeps the tar.gz (made by
// GNU tar and gzip, i.e. zlib) as the blob and writes its separate blob
// meta (nydus's ref blob) beside it; check and unpack read every chunk
// from the tar.gz through the zran contexts of that meta.
func TestCreateTargzRef(t *testing.T) {
	src, dir := t.TempDir(), t.TempDir()
	writeTree(t, src, sample)
	tgz := filepath.Join(dir, "layer.tar.gz")
	if out, err := exec.Command("tar", "-C", src, "-czf", tgz, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	boot, blobs := filepath.Join(dir, "bootstrap"), filepath.Join(dir, "blobs")
	mustCLI(t, "", "create", "--type", "targz-ref", "--chunk-size", "0x10000", "--bootstrap", boot, "--blob-dir", blobs,
		"--output-json", filepath.Join(dir, "out.json"), tgz)
	var res createResult
	j, _ := os.ReadFile(filepath.Join(dir, "out.json"))
	if err := json.Unmarshal(j, &res); err != nil || res.Blob == "" || res.MetaBlob == "" {
		t.Fatalf("output json %s: %v", j, err)
	}
	raw, _ := os.ReadFile(tgz)
	stored, err := os.ReadFile(filepath.Join(blobs, res.Blob))
	if err != nil || !bytes.Equal(raw, stored) || res.Blob != fmt.Sprintf("%x", sha256.Sum256(raw)) {
		t.Fatalf("blob %s is not the tar.gz (%v)", res.Blob, err)
	}
	meta, err := os.ReadFile(filepath.Join(blobs, res.MetaBlob))
	if err != nil || res.MetaBlob != fmt.Sprintf("%x", sha256.Sum256(meta)) {
		t.Fatalf("meta blob %s: %v", res.MetaBlob, err)
	}
	var ins inspection
	if err := json.Unmarshal([]byte(mustCLI(t, "", "inspect", "--json", "-R", "all", boot)), &ins); err != nil ||
		len(ins.Blobs) != 1 || ins.Blobs[0].MetaBlob != res.MetaBlob || ins.Blobs[0].ID != res.Blob {
		t.Fatalf("inspect: %+v %v", ins.Blobs, err)
	}
	if out := mustCLI(t, "", "check", "--bootstrap", boot, "--blob-dir", blobs); !strings.Contains(out, "data OK") {
		t.Errorf("check output: %s", out)
	}
	mustCLI(t, "", "unpack", "--bootstrap", boot, "--blob-dir", blobs, "--output", filepath.Join(dir, "out"))
	sameMap(t, "unpack targz-ref", sample, readTree(t, filepath.Join(dir, "out")))
	// Without its meta blob the image cannot be read: an error, not data.
	os.Remove(filepath.Join(blobs, res.MetaBlob))
	if code, _, _ := cli(t, "", "check", "--bootstrap", boot, "--blob-dir", blobs); code == 0 {
		t.Error("check passed without the meta blob")
	}
	if code, _, errs := cli(t, "", "create", "--type", "targz-ref", "--fs-version", "5", "--bootstrap", boot, "--blob-dir", blobs, tgz); code == 0 || !strings.Contains(errs, "v6") {
		t.Errorf("targz-ref with v5: exit %d, %q", code, errs)
	}
}

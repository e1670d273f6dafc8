package clients

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/rafsd/rafsd/internal/capproxy"
	"github.com/rafsd/rafsd/internal/coldimage"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

// coldLayers is how many data layers the image has; busybox and the
// entrypoint ride in the first.
const coldLayers = 3

// coldEntrypoint is the image's entrypoint: it reads every file of the
// startup list and prints one line, the md5 of what it read, so the first
// output comes only once the whole startup set went through the stack.
const coldEntrypoint = "#!/bin/sh\ncat $(cat /app/startup.list) | md5sum\n"

// coldImage is the benchmark image as pushed.
type coldImage struct {
	files, startup []coldimage.File
	// want is the entrypoint's first line.
	want string
}

func newColdImage(total int64) *coldImage {
	im := &coldImage{}
	im.files, im.startup = coldimage.Plan(total, coldLayers, "usr/lib")
	h := md5.New()
	for _, f := range im.startup {
		h.Write(f.Data())
	}
	im.want = hex.EncodeToString(h.Sum(nil)) + "  -"
	return im
}

func (im *coldImage) sizes() (total, startup int64) {
	for _, f := range im.files {
		total += int64(f.Size)
	}
	for _, f := range im.startup {
		startup += int64(f.Size)
	}
	return total, startup
}

// writeLayer writes layer l as a gzip'd tar to name and returns its
// descriptor and diff ID.
func (im *coldImage) writeLayer(l int, name string, busybox []byte) (ocispec.Descriptor, digest.Digest, error) {
	out, err := os.Create(name)
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	defer out.Close()
	ch, dh := sha256.New(), sha256.New()
	zw, _ := gzip.NewWriterLevel(io.MultiWriter(out, ch), gzip.BestSpeed)
	tw := tar.NewWriter(io.MultiWriter(zw, dh))
	dirs := map[string]bool{}
	add := func(h *tar.Header, b []byte) error {
		// Parent directories first, each once (a written directory's
		// parents are written too).
		var chain []string
		for d := path.Dir(h.Name); d != "." && !dirs[d]; d = path.Dir(d) {
			chain = append(chain, d)
		}
		for i := len(chain) - 1; i >= 0; i-- {
			dirs[chain[i]] = true
			if err := tw.WriteHeader(&tar.Header{Name: chain[i] + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
				return err
			}
		}
		h.ModTime, h.Format = epoch, tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	if l == 0 {
		if err := add(&tar.Header{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(busybox))}, busybox); err != nil {
			return ocispec.Descriptor{}, "", err
		}
		for _, s := range []string{"sh", "cat", "md5sum"} {
			if err := add(&tar.Header{Name: "bin/" + s, Typeflag: tar.TypeSymlink, Mode: 0o777, Linkname: "busybox"}, nil); err != nil {
				return ocispec.Descriptor{}, "", err
			}
		}
		var list strings.Builder
		for _, f := range im.startup {
			list.WriteString("/" + f.Name + "\n")
		}
		for _, x := range []struct {
			name string
			mode int64
			data string
		}{{"app/start", 0o755, coldEntrypoint}, {"app/startup.list", 0o644, list.String()}} {
			if err := add(&tar.Header{Name: x.name, Typeflag: tar.TypeReg, Mode: x.mode, Size: int64(len(x.data))}, []byte(x.data)); err != nil {
				return ocispec.Descriptor{}, "", err
			}
		}
	}
	for _, f := range im.files {
		if f.Layer != l {
			continue
		}
		if err := add(&tar.Header{Name: f.Name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(f.Size)}, f.Data()); err != nil {
			return ocispec.Descriptor{}, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	if err := zw.Close(); err != nil {
		return ocispec.Descriptor{}, "", err
	}
	st, err := out.Stat()
	if err != nil {
		return ocispec.Descriptor{}, "", err
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.NewDigest(digest.SHA256, ch), Size: st.Size()},
		digest.NewDigest(digest.SHA256, dh), nil
}

// push writes the layers under work (in parallel) and pushes the OCI image
// to ref with containerd's pusher, children before the manifest.
func (im *coldImage) push(tb testing.TB, ref, work string) {
	tb.Helper()
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		tb.Fatalf("static busybox (Debian package busybox-static; run .ci/deps): %v", err)
	}
	ctx := context.Background()
	p, err := resolver().Pusher(ctx, ref)
	if err != nil {
		tb.Fatal(err)
	}
	pushFrom := func(d ocispec.Descriptor, r io.Reader) error {
		w, err := p.Push(ctx, d)
		if errdefs.IsAlreadyExists(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("push %s: %w", d.Digest, err)
		}
		defer w.Close()
		if _, err := io.Copy(w, r); err != nil {
			return fmt.Errorf("push %s: %w", d.Digest, err)
		}
		if err := w.Commit(ctx, d.Size, d.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("push %s: commit: %w", d.Digest, err)
		}
		return nil
	}
	layers := make([]ocispec.Descriptor, coldLayers)
	diffIDs := make([]digest.Digest, coldLayers)
	var g errgroup.Group
	for l := range coldLayers {
		g.Go(func() error {
			name := filepath.Join(work, fmt.Sprintf("layer%d.tar.gz", l))
			d, diffID, err := im.writeLayer(l, name, busybox)
			if err != nil {
				return fmt.Errorf("layer %d: %w", l, err)
			}
			layers[l], diffIDs[l] = d, diffID
			f, err := os.Open(name)
			if err != nil {
				return err
			}
			defer os.Remove(name)
			defer f.Close()
			return pushFrom(d, f)
		})
	}
	if err := g.Wait(); err != nil {
		tb.Fatal(err)
	}
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}}
	cfg.RootFS.Type = "layers"
	cfg.RootFS.DiffIDs = diffIDs
	cfg.Config.Entrypoint = []string{"/app/start"}
	cfg.Config.Env = []string{"PATH=/bin"}
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Layers: layers}
	man.SchemaVersion = 2
	cb, _ := json.Marshal(cfg)
	man.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cb), Size: int64(len(cb))}
	mb, _ := json.Marshal(man)
	md := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mb), Size: int64(len(mb))}
	for _, x := range []struct {
		d ocispec.Descriptor
		b []byte
	}{{man.Config, cb}, {md, mb}} {
		if err := pushFrom(x.d, strings.NewReader(string(x.b))); err != nil {
			tb.Fatal(err)
		}
	}
}

// coldRun is one measured cold start.
type coldRun struct {
	time  time.Duration // pull to the first line of output
	bytes int64         // moved through the capped proxy meanwhile
	// download is when the last byte went through the proxy: for the OCI
	// image, the rest of time is containerd unpacking and runc starting.
	download time.Duration
}

// coldSetup is what every cold start shares: this tree's binaries, the
// registry holding the OCI image and its two conversions, and the capped
// proxy in front of it.
type coldSetup struct {
	f     *fixture
	im    *coldImage
	proxy *capproxy.Proxy
}

// Tags of the image in the registry.
const (
	coldOCI      = "oci"
	coldNydus    = "nydus"
	coldPrefetch = "nydus-prefetch" // the startup list as prefetch table
)

// coldFsPrefetch is rafsd's fs_prefetch for the prefetch run: the
// snapshotter's shipped nydusd-config.fusedev.json, but only the image's
// prefetch table (prefetch_all would pull whole blobs in the background
// and blur the bytes the start needed).
const coldFsPrefetch = `{"enable": true, "threads_count": 8, "merging_size": 1048576, "prefetch_all": false}`

// setupCold builds an image of about mib MiB, pushes it to a fresh registry,
// converts it twice with rafs-image convert (plain, and with the startup
// list as the prefetch table, as nydusify --prefetch-patterns) and puts a
// proxy capped at rate bytes/s in front of the registry.
func setupCold(tb testing.TB, mib int64, rate float64) *coldSetup {
	tb.Helper()
	if os.Getuid() != 0 {
		tb.Fatal("needs root: containerd, runc and FUSE mounts")
	}
	cs := &coldSetup{f: &fixture{}, im: newColdImage(mib << 20)}
	f, im := cs.f, cs.im
	f.rafsd, f.rafsImage = rafsBinaries(tb)
	reg := registrytest.Start(tb, registrytest.Options{})
	total, st := im.sizes()
	tb.Logf("image: %d files, %.0f MiB in %d gzip layers; startup set: %d files, %.1f MiB (%.1f%%); link %.0f MiB/s",
		len(im.files), float64(total)/(1<<20), coldLayers, len(im.startup), float64(st)/(1<<20), 100*float64(st)/float64(total), rate/(1<<20))
	t0 := time.Now()
	im.push(tb, reg.Addr+"/cold/app:"+coldOCI, tb.TempDir())
	tb.Logf("OCI image built and pushed in %s", time.Since(t0).Round(time.Millisecond))
	var list strings.Builder
	for _, f := range im.startup {
		list.WriteString("/" + f.Name + "\n")
	}
	for _, c := range []struct {
		tag   string
		extra []string
	}{{coldNydus, nil}, {coldPrefetch, []string{"--prefetch-patterns"}}} {
		t0 = time.Now()
		cmd := exec.Command(f.rafsImage, append([]string{"convert", "--source", reg.Addr + "/cold/app:" + coldOCI, "--target", reg.Addr + "/cold/app:" + c.tag,
			"--plain-http", "--quiet", "--work-dir", tb.TempDir()}, c.extra...)...)
		cmd.Stdin = strings.NewReader(list.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			tb.Fatalf("rafs-image convert to %s: %v\n%s", c.tag, err, out)
		}
		tb.Logf("rafs-image convert %s in %s", c.tag, time.Since(t0).Round(time.Millisecond))
	}
	// Both pulls and rafsd's chunk reads go through the proxy: the
	// references name it, not the registry.
	cs.proxy = capproxy.Start(tb, reg.Addr, rate)
	return cs
}

// start starts a fresh containerd + nydus-snapshotter (empty content
// store, snapshots and rafsd cache), then times pulling the image's tag
// into snapshotter and running its entrypoint until the first line of
// output, as `nerdctl run --snapshotter` would, and checks that line. The
// stack is torn down afterwards. Only the timed part runs a benchmark's
// timer.
func (cs *coldSetup) start(tb testing.TB, tag, snapshotter, fsPrefetch string) coldRun {
	tb.Helper()
	f, im, proxy := cs.f, cs.im, cs.proxy
	ref := proxy.Addr + "/cold/app:" + tag
	s := StartStack(tb, SnapshotterConfig{DaemonMode: "dedicated", RecoverPolicy: "failover", Rafsd: f.rafsd, RafsImage: f.rafsImage, PlainHTTP: true, FsPrefetch: fsPrefetch})
	what := snapshotter
	if fsPrefetch != "" {
		what += "+prefetch"
	}
	timer, _ := tb.(*testing.B)
	c, ctx := newClient(tb, s)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()

	if timer != nil {
		timer.StartTimer()
	}
	proxy.Reset()
	t0 := time.Now()
	lastByte := watchBytes(proxy)
	img := c.pull(ctx, tb, ref, snapshotter)
	pulled := time.Since(t0)
	k := c.run(ctx, tb, img, snapshotter, "cold-"+strings.ReplaceAll(what, "+", "-"))
	started := time.Since(t0)
	at := k.firstLine(ctx, tb)
	run := coldRun{time: at.Sub(t0), bytes: proxy.Bytes()}
	if timer != nil {
		timer.StopTimer()
	}
	run.download = lastByte().Sub(t0)

	out := k.wait(ctx, tb)
	if first, _, _ := strings.Cut(out, "\n"); first != im.want {
		tb.Fatalf("%s: the entrypoint printed %q, want %q (md5 of the startup set)", what, first, im.want)
	}
	if snapshotter == "nydus" {
		if len(ProcsOf(f.rafsd)) == 0 {
			tb.Fatal("no rafsd serves the nydus container")
		}
		tb.Logf("rafsd: %s", daemonMetrics(s.SnapRoot))
	}
	tb.Logf("%s: pulled at %s, task started at %s, last byte through the proxy at %s, first line at %s; %.1f MiB moved",
		what, pulled.Round(time.Millisecond), started.Round(time.Millisecond), run.download.Round(10*time.Millisecond), run.time.Round(time.Millisecond), float64(run.bytes)/(1<<20))
	if err := k.remove(ctx); err != nil {
		tb.Fatal(err)
	}
	c.removeImage(ctx, tb, ref)
	stopStack(tb, s)
	return run
}

// daemonMetrics returns the backend and blob cache counters of every rafsd
// the snapshotter runs under root, for the log.
func daemonMetrics(root string) string {
	var out []string
	eachDaemonAPI(root, func(_ string, hc *http.Client) {
		for _, m := range []struct {
			path   string
			fields []string
		}{
			{"backend", []string{"read_count", "read_amount_total", "read_cumulative_latency_millis_total", "read_errors"}},
			{"blobcache", []string{"entries_count", "prefetch_requests_count", "prefetch_data_amount", "digest_failures"}},
		} {
			resp, err := hc.Get("http://rafsd/api/v1/metrics/" + m.path)
			if err != nil {
				out = append(out, m.path+": "+err.Error())
				continue
			}
			var v map[string]any
			dec := json.NewDecoder(resp.Body)
			dec.UseNumber()
			err = dec.Decode(&v)
			resp.Body.Close()
			if err != nil {
				out = append(out, m.path+": "+err.Error())
				continue
			}
			for _, k := range m.fields {
				out = append(out, fmt.Sprintf("%s %v", k, v[k]))
			}
		}
	})
	return strings.Join(out, ", ")
}

// watchBytes samples the proxy's byte count until the returned function is
// called, which returns when the count last grew: where the transfer ended
// and unpacking or startup work went on.
func watchBytes(proxy *capproxy.Proxy) func() time.Time {
	stop, done := make(chan struct{}), make(chan time.Time)
	go func() {
		last, n := time.Now(), proxy.Bytes()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				done <- last
				return
			case <-tick.C:
				if m := proxy.Bytes(); m != n {
					last, n = time.Now(), m
				}
			}
		}
	}()
	return func() time.Time { close(stop); return <-done }
}

// BenchmarkColdStartClients is the cold start through the real stack: an
// OCI image of ~1 GiB in gzip layers whose entrypoint reads ~6% of its
// bytes, and its RAFS conversion by rafs-image convert, both in a local
// registry behind a 100 MiB/s token-bucket proxy on 127.0.0.1. It times
// from containerd's pull to the container's first line of output for
// (a) the OCI image on the overlayfs snapshotter (pull, unpack, run) and
// (b) the RAFS image on nydus-snapshotter + rafsd (bootstrap, lazy reads),
// and (c) as (b) but converted with the startup list as prefetch table and
// rafsd's fs_prefetch on, each on a fresh containerd root and snapshotter
// root (cold rafsd cache), and reports the times, the bytes each moved
// through the proxy, and the ratios to (a). RAFS_COLDSTART_MIB sets the
// image size (default 1024; about 1.5 minutes on 2 idle cores).
func BenchmarkColdStartClients(b *testing.B) {
	mib := int64(1024)
	if s := os.Getenv("RAFS_COLDSTART_MIB"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil || v < 8 {
			b.Fatalf("RAFS_COLDSTART_MIB=%q: want a size in MiB >= 8", s)
		}
		mib = v
	}
	b.StopTimer()
	cs := setupCold(b, mib, 100<<20)
	var oci, ny, pre coldRun
	for range b.N {
		oci = cs.start(b, coldOCI, "overlayfs", "")
		ny = cs.start(b, coldNydus, "nydus", "")
		pre = cs.start(b, coldPrefetch, "nydus", coldFsPrefetch)
	}
	mibOf := func(n int64) float64 { return float64(n) / (1 << 20) }
	b.ReportMetric(float64(mib), "image-MiB")
	b.ReportMetric(oci.time.Seconds(), "oci-s")
	b.ReportMetric(oci.download.Seconds(), "oci-download-s")
	b.ReportMetric(ny.time.Seconds(), "rafs-s")
	b.ReportMetric(mibOf(oci.bytes), "oci-MiB-moved")
	b.ReportMetric(mibOf(ny.bytes), "rafs-MiB-moved")
	b.ReportMetric(pre.time.Seconds(), "rafs-prefetch-s")
	b.ReportMetric(mibOf(pre.bytes), "rafs-prefetch-MiB-moved")
	b.ReportMetric(ny.time.Seconds()/oci.time.Seconds(), "rafs/oci-time")
	b.ReportMetric(float64(ny.bytes)/float64(oci.bytes), "rafs/oci-bytes")
	b.ReportMetric(pre.time.Seconds()/oci.time.Seconds(), "rafs-prefetch/oci-time")
	b.Logf("cold start, pull to first output: OCI+overlayfs %s (%.1f MiB moved, download done at %s), RAFS+nydus-snapshotter+rafsd %s (%.1f MiB moved); time ratio %.3f (target <= 0.2), bytes ratio %.3f",
		oci.time.Round(time.Millisecond), mibOf(oci.bytes), oci.download.Round(10*time.Millisecond), ny.time.Round(time.Millisecond), mibOf(ny.bytes),
		ny.time.Seconds()/oci.time.Seconds(), float64(ny.bytes)/float64(oci.bytes))
	b.Logf("with the startup list as prefetch table and fs_prefetch on: RAFS %s (%.1f MiB moved); time ratio %.3f",
		pre.time.Round(time.Millisecond), mibOf(pre.bytes), pre.time.Seconds()/oci.time.Seconds())
}

// TestColdStartStack runs the benchmark's three cold starts on a small
// image, so the path stays working between benchmark runs: each start's
// entrypoint must print the md5 of the startup set (checked in start), and
// every start must have gone through the proxy.
func TestColdStartStack(t *testing.T) {
	cs := setupCold(t, 16, 1<<30)
	for _, c := range []struct{ tag, snapshotter, prefetch string }{
		{coldOCI, "overlayfs", ""}, {coldNydus, "nydus", ""}, {coldPrefetch, "nydus", coldFsPrefetch},
	} {
		if r := cs.start(t, c.tag, c.snapshotter, c.prefetch); r.bytes == 0 || r.time <= 0 {
			t.Fatalf("%s on %s: %v, %d bytes through the proxy", c.tag, c.snapshotter, r.time, r.bytes)
		}
	}
}

package convert

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/rafsd/rafsd/internal/capproxy"
	"github.com/rafsd/rafsd/internal/coldimage"
	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/config"
	"github.com/rafsd/rafsd/rafs/storage"
)

// pushColdImage writes the layers as tar.gz files and pushes the OCI image.
func pushColdImage(b *testing.B, ref string, files []coldimage.File, work string) {
	ctx := context.Background()
	p, err := newPusher(ctx, ref, RegistryOptions{PlainHTTP: true})
	if err != nil {
		b.Fatal(err)
	}
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}}
	cfg.RootFS.Type = "layers"
	man := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	man.SchemaVersion = 2
	layers := make([]ocispec.Descriptor, 3)
	diffIDs := make([]digest.Digest, 3)
	var g errgroup.Group
	for l := range 3 {
		g.Go(func() error {
			name := filepath.Join(work, fmt.Sprintf("layer%d.tar.gz", l))
			out, err := os.Create(name)
			if err != nil {
				return err
			}
			defer out.Close()
			ch, dh := sha256.New(), sha256.New()
			zw, _ := gzip.NewWriterLevel(io.MultiWriter(out, ch), gzip.BestSpeed)
			tw := tar.NewWriter(io.MultiWriter(zw, dh))
			dirs := map[string]bool{}
			for _, f := range files {
				if f.Layer != l {
					continue
				}
				for _, d := range []string{"usr/", "usr/share/", filepath.Dir(f.Name) + "/"} {
					if !dirs[d] {
						dirs[d] = true
						tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: testEpoch})
					}
				}
				tw.WriteHeader(&tar.Header{Name: f.Name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(f.Size), ModTime: testEpoch})
				tw.Write(f.Data())
			}
			if err := tw.Close(); err != nil {
				return err
			}
			if err := zw.Close(); err != nil {
				return err
			}
			st, _ := out.Stat()
			layers[l] = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.NewDigest(digest.SHA256, ch), Size: st.Size()}
			diffIDs[l] = digest.NewDigest(digest.SHA256, dh)
			_, err = p.pushFile(ctx, layers[l], name)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	man.Layers, cfg.RootFS.DiffIDs = layers, diffIDs
	cb, _ := json.Marshal(cfg)
	man.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cb), Size: int64(len(cb))}
	mb, _ := json.Marshal(man)
	md := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mb), Size: int64(len(mb))}
	for _, x := range []struct {
		d ocispec.Descriptor
		b []byte
	}{{man.Config, cb}, {md, mb}} {
		if _, err := p.pushBytes(ctx, x.d, x.b); err != nil {
			b.Fatal(err)
		}
	}
}

// coldOCI is the classic start: pull every layer (3 at once, as
// containerd does), gunzip and untar each into its own directory, then read
// the startup set from the unpacked tree.
func coldOCI(b *testing.B, ref string, startup []coldimage.File, work string) {
	ctx := context.Background()
	src := newRegistrySource(ref, RegistryOptions{PlainHTTP: true})
	root, err := src.root(ctx)
	if err != nil {
		b.Fatal(err)
	}
	var man ocispec.Manifest
	if _, err := readJSON(ctx, src, root, &man); err != nil {
		b.Fatal(err)
	}
	var g errgroup.Group
	for i, l := range man.Layers {
		g.Go(func() error {
			rc, err := src.fetch(ctx, l)
			if err != nil {
				return err
			}
			vr, err := newVerifiedReader(rc, l)
			if err != nil {
				return err
			}
			defer vr.Close()
			zr, err := gzip.NewReader(vr)
			if err != nil {
				return err
			}
			return untar(zr, filepath.Join(work, strconv.Itoa(i)))
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	for _, f := range startup {
		n, err := readAll(filepath.Join(work, strconv.Itoa(f.Layer), f.Name))
		if err != nil || n != f.Size {
			b.Fatalf("%s: %d bytes, %v", f.Name, n, err)
		}
	}
}

func readAll(name string) (int, error) {
	f, err := os.Open(name)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := io.Copy(io.Discard, f)
	return int(n), err
}

func untar(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		}
	}
}

// coldRAFS is the lazy start: fetch the bootstrap, then read the startup
// set through the chunk fetcher (registry backend, blob cache), which pulls
// only the chunks those files use.
func coldRAFS(b *testing.B, ref string, startup []coldimage.File, work string, prefetch bool) {
	ctx := context.Background()
	r, err := FetchBootstrap(ctx, ref, filepath.Join(work, "image.boot"), RegistryOptions{PlainHTTP: true})
	if err != nil {
		b.Fatal(err)
	}
	cfg, err := config.Parse(r.DaemonConfig(filepath.Join(work, "cache"), prefetch))
	if err != nil {
		b.Fatal(err)
	}
	f, err := storage.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.AddImage(r.Image); err != nil {
		b.Fatal(err)
	}
	if prefetch {
		if len(r.Image.Prefetch) != len(startup) {
			b.Fatalf("prefetch table has %d entries, want %d", len(r.Image.Prefetch), len(startup))
		}
		if err := f.Prefetch(ctx, r.Image); err != nil {
			b.Fatal(err)
		}
	}
	buf := make([]byte, 1<<20)
	for _, sf := range startup {
		ino, err := lookupPath(r.Image, sf.Name)
		if err != nil {
			b.Fatal(err)
		}
		var off int64
		for {
			n, err := r.Image.ReadAt(ctx, f, ino, buf, off)
			off += int64(n)
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatalf("%s: %v", sf.Name, err)
			}
		}
		if off != int64(sf.Size) {
			b.Fatalf("%s: read %d bytes, want %d", sf.Name, off, sf.Size)
		}
	}
}

func lookupPath(img *rafs.Image, p string) (*rafs.Inode, error) {
	ino := img.Root()
	for _, name := range strings.Split(p, "/") {
		var err error
		if ino, err = img.Lookup(ino, name); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
	}
	return ino, nil
}

// BenchmarkColdStart compares a container's cold start from an OCI image
// (pull, gunzip, untar everything, then read the startup set) with one from
// the converted RAFS image (bootstrap, then only the startup set's chunks),
// both from the same local registry behind a 100 MiB/s token-bucket proxy.
// RAFS_COLDSTART_MIB sets the image size (default 1024, about a minute on 2
// cores; below ~512 MiB fixed request latencies dominate the RAFS side).
func BenchmarkColdStart(b *testing.B) {
	mib := int64(1024)
	if s := os.Getenv("RAFS_COLDSTART_MIB"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil || v < 8 {
			b.Fatalf("RAFS_COLDSTART_MIB=%q", s)
		}
		mib = v
	}
	const rate = 100 << 20
	reg := startRegistry(b)
	work := b.TempDir()
	files, startup := coldimage.Plan(mib<<20, 3, "usr/share")
	var total, st int64
	for _, f := range files {
		total += int64(f.Size)
	}
	for _, f := range startup {
		st += int64(f.Size)
	}
	b.Logf("image: %d files, %.0f MiB in 3 layers; startup set: %d files, %.1f MiB (%.1f%%); link: %d MiB/s",
		len(files), float64(total)/(1<<20), len(startup), float64(st)/(1<<20), 100*float64(st)/float64(total), rate>>20)
	pushColdImage(b, reg.Addr+"/cold/app:oci", files, work)
	var trace []string
	for _, f := range startup {
		trace = append(trace, "/"+f.Name)
	}
	t0 := time.Now()
	res, err := Convert(context.Background(), reg.Addr+"/cold/app:oci", reg.Addr+"/cold/app:nydus", Options{
		Prefetch: trace,
		Source:   RegistryOptions{PlainHTTP: true}, Target: RegistryOptions{PlainHTTP: true}, WorkDir: b.TempDir(),
	})
	if err != nil {
		b.Fatal(err)
	}
	convertTime := time.Since(t0)
	var blobBytes int64
	for _, d := range res.Blobs {
		blobBytes += d.Size
	}
	b.Logf("converted in %s: %d blobs, %.0f MiB, bootstrap %.1f KiB", convertTime.Round(time.Millisecond), len(res.Blobs), float64(blobBytes)/(1<<20), float64(res.Bootstrap.Size)/1024)
	// The same image as an --oci-ref (zran) image beside the OCI one: its
	// blobs are the gzip layers themselves.
	t0 = time.Now()
	zres, err := Convert(context.Background(), reg.Addr+"/cold/app:oci", reg.Addr+"/cold/app:nydus-oci-ref", Options{
		OCIRef: true, Prefetch: trace,
		Source: RegistryOptions{PlainHTTP: true}, Target: RegistryOptions{PlainHTTP: true}, WorkDir: b.TempDir(),
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("converted with --oci-ref in %s: %d blobs uploaded, bootstrap %.1f KiB", time.Since(t0).Round(time.Millisecond), len(zres.Uploaded), float64(zres.Bootstrap.Size)/1024)
	proxy := capproxy.Start(b, reg.Addr, rate)

	var ociTime, rafsTime, preTime, zranTime time.Duration
	var ociBytes, rafsBytes, preBytes, zranBytes int64
	b.ResetTimer()
	for i := range b.N {
		dir := filepath.Join(work, "run"+strconv.Itoa(i))
		proxy.Reset()
		t := time.Now()
		coldOCI(b, proxy.Addr+"/cold/app:oci", startup, filepath.Join(dir, "oci"))
		ociTime, ociBytes = time.Since(t), proxy.Bytes()

		proxy.Reset()
		t = time.Now()
		coldRAFS(b, proxy.Addr+"/cold/app:nydus", startup, filepath.Join(dir, "rafs"), false)
		rafsTime, rafsBytes = time.Since(t), proxy.Bytes()

		proxy.Reset()
		t = time.Now()
		coldRAFS(b, proxy.Addr+"/cold/app:nydus", startup, filepath.Join(dir, "rafs-prefetch"), true)
		preTime, preBytes = time.Since(t), proxy.Bytes()

		proxy.Reset()
		t = time.Now()
		coldRAFS(b, proxy.Addr+"/cold/app:nydus-oci-ref", startup, filepath.Join(dir, "zran"), false)
		zranTime, zranBytes = time.Since(t), proxy.Bytes()
		b.StopTimer()
		os.RemoveAll(dir)
		b.StartTimer()
	}
	b.ReportMetric(float64(mib), "image-MiB")
	b.ReportMetric(ociTime.Seconds(), "oci-s")
	b.ReportMetric(rafsTime.Seconds(), "rafs-s")
	b.ReportMetric(float64(ociBytes)/(1<<20), "oci-MiB-moved")
	b.ReportMetric(float64(rafsBytes)/(1<<20), "rafs-MiB-moved")
	b.ReportMetric(preTime.Seconds(), "rafs-prefetch-s")
	b.ReportMetric(float64(preBytes)/(1<<20), "rafs-prefetch-MiB-moved")
	b.ReportMetric(rafsTime.Seconds()/ociTime.Seconds(), "rafs/oci-time")
	b.ReportMetric(preTime.Seconds()/ociTime.Seconds(), "rafs-prefetch/oci-time")
	b.ReportMetric(float64(rafsBytes)/float64(ociBytes), "rafs/oci-bytes")
	b.ReportMetric(zranTime.Seconds(), "zran-s")
	b.ReportMetric(float64(zranBytes)/(1<<20), "zran-MiB-moved")
	b.ReportMetric(zranTime.Seconds()/ociTime.Seconds(), "zran/oci-time")
	b.Logf("cold start from the --oci-ref image (gzip layers read through zran checkpoints): %s, %.1f MiB moved (time ratio %.3f)",
		zranTime.Round(time.Millisecond), float64(zranBytes)/(1<<20), zranTime.Seconds()/ociTime.Seconds())
	b.Logf("cold start: OCI %s, %.1f MiB moved; RAFS on demand %s, %.1f MiB moved (time ratio %.3f); "+
		"RAFS with the trace as prefetch table %s, %.1f MiB moved (time ratio %.3f); target <= 0.2",
		ociTime.Round(time.Millisecond), float64(ociBytes)/(1<<20),
		rafsTime.Round(time.Millisecond), float64(rafsBytes)/(1<<20), rafsTime.Seconds()/ociTime.Seconds(),
		preTime.Round(time.Millisecond), float64(preBytes)/(1<<20), preTime.Seconds()/ociTime.Seconds())
}

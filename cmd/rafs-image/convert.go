package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/convert"
	"github.com/rafsd/rafsd/rafs/storage/backend"
)

// convertResult is what `rafs-image convert` prints on stdout.
type convertResult struct {
	Target    string   `json:"target"`
	Manifest  string   `json:"manifest"`
	Index     string   `json:"index,omitempty"`
	Bootstrap string   `json:"bootstrap"`
	Blobs     []string `json:"blobs"`
	Uploaded  []string `json:"uploaded"`
	Files     uint64   `json:"files"`
	Bytes     uint64   `json:"bytes"`
	Dedup     uint64   `json:"dedup_chunks"`
}

// runConvert implements `rafs-image convert` (nydusify convert): pull an
// OCI image, convert every layer to RAFS, push the Nydus image.
func runConvert(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("convert", flag.ContinueOnError)
	var (
		source     = fs.String("source", "", "source image: REF, oci-layout:DIR[:TAG] or docker-archive:TAR")
		target     = fs.String("target", "", "target image reference")
		fsVersion  = fs.Int("fs-version", 6, "RAFS version: 5 or 6")
		compressor = fs.String("compressor", "zstd", "chunk compressor: none, lz4_block, gzip, zstd")
		chunkSize  = fs.String("chunk-size", "0x100000", "chunk size (power of two, 0x1000..0x1000000)")
		merge      = fs.Bool("merge-platform", false, "push an index with the OCI manifest beside the Nydus one")
		ociRef     = fs.Bool("oci-ref", false, "reference the source's gzip layers instead of new blobs (zran; RAFS v6): only the bootstrap layer is new")
		plainHTTP  = fs.Bool("plain-http", false, "talk HTTP to registries")
		insecure   = fs.Bool("insecure", false, "skip TLS verification")
		creds      = fs.String("creds", "", "USER:PASSWORD for the registries (default: docker's config.json, $DOCKER_CONFIG or ~/.docker)")
		platform   = fs.String("platform", "", "platform to convert from a multi-platform source (default: this machine's)")
		workDir    = fs.String("work-dir", "", "directory for blobs while converting (default: a temporary one)")
		parallel   = fs.Int("parallel", 0, "layers converted at once (default: CPUs)")
		quiet      = fs.Bool("quiet", false, "no progress on stderr")
		prefetch   = fs.Bool("prefetch-patterns", false, "read absolute paths for the prefetch table from stdin, one per line (nydusify)")
		dicts      listFlag
	)
	fs.Var(&dicts, "chunk-dict", "reuse chunks of this bootstrap: PATH, bootstrap=PATH, bootstrap:local:PATH or bootstrap:registry:REF (repeatable)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 || *source == "" || *target == "" {
		return fmt.Errorf("%w: rafs-image convert --source SRC --target REF [flags]", errUsage)
	}
	ro := convert.RegistryOptions{PlainHTTP: *plainHTTP, Insecure: *insecure}
	if *creds != "" {
		u, p, ok := strings.Cut(*creds, ":")
		if !ok {
			return fmt.Errorf("--creds: want USER:PASSWORD")
		}
		ro.Username, ro.Password = u, p
	} else {
		// As docker, nerdctl and nydusify: logins from docker's config.json.
		if ro.Credentials, err = backend.DockerCredentials(""); err != nil {
			return err
		}
	}
	comp, err := codec.ParseCompressor(*compressor)
	if err != nil {
		return fmt.Errorf("--compressor: %w", err)
	}
	cs, err := parseChunkSize(*chunkSize)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	tmp, err := os.MkdirTemp(*workDir, "rafs-convert-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	var dictImgs []*rafs.Image
	var local []string
	for i, d := range dicts {
		switch {
		case strings.HasPrefix(d, "bootstrap:registry:"):
			r, err := convert.FetchBootstrap(ctx, strings.TrimPrefix(d, "bootstrap:registry:"), filepath.Join(tmp, fmt.Sprintf("dict-%d.boot", i)), ro)
			if err != nil {
				return fmt.Errorf("--chunk-dict: %w", err)
			}
			dictImgs = append(dictImgs, r.Image)
		case strings.HasPrefix(d, "bootstrap:local:"):
			local = append(local, strings.TrimPrefix(d, "bootstrap:local:"))
		default:
			local = append(local, d)
		}
	}
	more, err := openDicts(local)
	if err != nil {
		return err
	}
	dictImgs = append(dictImgs, more...)

	var prefetchList []string
	if *prefetch {
		if prefetchList, err = readPrefetchList(stdin); err != nil {
			return err
		}
	}
	opts := convert.Options{
		Prefetch:  prefetchList,
		FsVersion: *fsVersion, Compressor: &comp, ChunkSize: cs, ChunkDicts: dictImgs,
		MergePlatform: *merge, OCIRef: *ociRef, Platform: *platform, Parallel: *parallel, WorkDir: tmp,
		Source: ro, Target: ro,
	}
	if !*quiet {
		opts.Progress = os.Stderr
	}
	res, err := convert.Convert(ctx, *source, *target, opts)
	if err != nil {
		return err
	}
	out := convertResult{
		Target: *target, Manifest: res.Manifest.Digest.String(), Bootstrap: res.Bootstrap.Digest.String(),
		Blobs: []string{}, Uploaded: []string{},
		Files: res.Stats.Files, Bytes: res.Stats.Bytes, Dedup: res.Stats.DedupChunks,
	}
	if res.Index != nil {
		out.Index = res.Index.Digest.String()
	}
	for _, b := range res.Blobs {
		out.Blobs = append(out.Blobs, b.Digest.String())
	}
	for _, u := range res.Uploaded {
		out.Uploaded = append(out.Uploaded, u.String())
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	ver "github.com/rafsd/rafsd/internal/version"
	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/codec"
	"github.com/rafsd/rafsd/rafs/zran"
)

// parseChunkSize accepts nydus-image's hex form ("0x100000") and decimal.
func parseChunkSize(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 0, 32)
	if err != nil || !rafs.ValidChunkSize(uint32(n)) {
		return 0, fmt.Errorf("--chunk-size %q: want a power of two between 0x1000 and 0x1000000", s)
	}
	return uint32(n), nil
}

// openDicts loads --chunk-dict values ("bootstrap=PATH" as in nydus-image,
// or a plain path).
func openDicts(specs []string) ([]*rafs.Image, error) {
	var out []*rafs.Image
	for _, s := range specs {
		p := s
		if k, v, ok := strings.Cut(s, "="); ok {
			if k != "bootstrap" {
				return nil, fmt.Errorf("--chunk-dict %q: only bootstrap=PATH is supported", s)
			}
			p = v
		}
		img, err := bootstrap.Open(p)
		if err != nil {
			return nil, fmt.Errorf("--chunk-dict: %w", err)
		}
		out = append(out, img)
	}
	return out, nil
}

// readPrefetchList reads the paths of --prefetch-policy fs from r, one
// per line, as nydus-image does from stdin.
func readPrefetchList(r io.Reader) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" {
			continue
		}
		if !strings.HasPrefix(l, "/") {
			return nil, fmt.Errorf("prefetch list: %q is not an absolute path", l)
		}
		out = append(out, l)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("prefetch list: %w", err)
	}
	return out, nil
}

type createResult struct {
	Version   string   `json:"version"`
	Bootstrap string   `json:"bootstrap"`
	Blobs     []string `json:"blobs"`
	// Blob is the new blob's id, empty if nothing was stored.
	Blob string `json:"blob,omitempty"`
	// MetaBlob is, for targz-ref, the id of the blob written: the
	// layer's separate blob meta (nydus's ref blob), which readers fetch
	// the zran contexts from.
	MetaBlob string        `json:"meta_blob,omitempty"`
	Stats    builder.Stats `json:"stats"`
}

func runCreate(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("create", flag.ContinueOnError)
	var (
		bootPath   = fs.String("bootstrap", "", "output bootstrap file")
		blobPath   = fs.String("blob", "", "output data blob file")
		blobDir    = fs.String("blob-dir", "", "directory to store the data blob in, named by its id")
		fsVersion  = fs.Int("fs-version", 6, "RAFS version: 5 or 6")
		compressor = fs.String("compressor", "zstd", "chunk compressor: none, lz4_block, gzip, zstd")
		digester   = fs.String("digester", "blake3", "chunk digester: blake3, sha256")
		chunkSize  = fs.String("chunk-size", "0x100000", "chunk size, a power of two in [0x1000, 0x1000000]")
		srcType    = fs.String("type", "dir-rafs", "source type: dir-rafs, tar-rafs (plain, gzip or zstd tar), targz-ref (a tar.gz that is itself the blob, read through zran checkpoints; RAFS v6)")
		parent     = fs.String("parent-bootstrap", "", "bootstrap of the image this layer is built on")
		prefetch   = fs.String("prefetch-policy", "none", "none, or fs: read paths to prefetch from stdin")
		outJSON    = fs.String("output-json", "", "write the result as JSON to this file")
		whiteouts  = fs.String("whiteout-spec", "oci", "how the layer marks deletions: oci, overlayfs or none")
		dicts      listFlag
	)
	fs.Var(&dicts, "chunk-dict", "bootstrap=PATH of an image whose chunks may be reused (repeatable)")
	fs.IntVar(fsVersion, "v", 6, "short for --fs-version")
	fs.StringVar(bootPath, "B", "", "short for --bootstrap")
	fs.StringVar(blobPath, "b", "", "short for --blob")
	fs.StringVar(blobDir, "D", "", "short for --blob-dir")
	fs.StringVar(compressor, "c", "zstd", "short for --compressor")
	fs.StringVar(digester, "d", "blake3", "short for --digester")
	fs.StringVar(srcType, "t", "dir-rafs", "short for --type")
	fs.StringVar(parent, "p", "", "short for --parent-bootstrap")
	fs.StringVar(outJSON, "J", "", "short for --output-json")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("want exactly one SOURCE (directory or tar), got %d", len(pos))
	}
	src := pos[0]
	if *bootPath == "" {
		return fmt.Errorf("--bootstrap is required")
	}
	if *blobPath == "" && *blobDir == "" {
		return fmt.Errorf("both --blob and --blob-dir are missing")
	}
	opts := builder.Options{Version: *fsVersion}
	if opts.ChunkSize, err = parseChunkSize(*chunkSize); err != nil {
		return err
	}
	c, err := codec.ParseCompressor(*compressor)
	if err != nil {
		return err
	}
	d, err := codec.ParseDigester(*digester)
	if err != nil {
		return err
	}
	opts.Compressor, opts.Digester = &c, &d
	if opts.Whiteouts, err = builder.ParseWhiteoutSpec(*whiteouts); err != nil {
		return err
	}
	switch *prefetch {
	case "none":
	case "fs":
		if opts.Prefetch, err = readPrefetchList(stdin); err != nil {
			return err
		}
	default:
		return fmt.Errorf("--prefetch-policy %q: want none or fs", *prefetch)
	}
	if *parent != "" {
		if opts.Parent, err = bootstrap.Open(*parent); err != nil {
			return fmt.Errorf("--parent-bootstrap: %w", err)
		}
	}
	if opts.ChunkDicts, err = openDicts(dicts); err != nil {
		return err
	}

	ctx := context.Background()
	typeSet := false
	fs.Visit(func(f *flag.Flag) { typeSet = typeSet || f.Name == "type" || f.Name == "t" })
	if st, err := os.Stat(src); !typeSet && (src == "-" || err == nil && !st.IsDir()) {
		*srcType = "tar-rafs" // a file given without --type can only be a tar
	}
	// targz-ref (nydus-image's name): the tar.gz itself is the blob, its
	// chunks read through zran checkpoints; what is written to --blob is
	// its separate blob meta (nydus's ref blob), and --blob-dir gets both,
	// each named by its digest.
	var ref *os.File
	if *srcType == "targz-ref" {
		if ref, err = os.Open(src); err != nil {
			return err
		}
		defer ref.Close()
		h := sha256.New()
		n, err := io.Copy(h, ref)
		if err != nil {
			return fmt.Errorf("read %s: %w", src, err)
		}
		opts.Zran = &builder.ZranLayer{ID: hex.EncodeToString(h.Sum(nil)), R: ref, Size: n}
	}

	// The blob goes to a temporary file next to its destination, renamed
	// into place once complete (its name is its digest).
	tmpDir := *blobDir
	if *blobPath != "" {
		tmpDir = filepath.Dir(*blobPath)
	}
	if err := os.MkdirAll(tmpDir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(tmpDir, ".blob-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	bw := bufio.NewWriterSize(tmp, 4<<20)
	b, err := builder.New(opts, bw)
	if err != nil {
		tmp.Close()
		return err
	}
	switch *srcType {
	case "dir-rafs", "directory":
		err = b.AddDir(ctx, src)
	case "tar-rafs", "targz-rafs":
		if src == "-" {
			if *prefetch == "fs" {
				err = fmt.Errorf("SOURCE - (tar on stdin) conflicts with --prefetch-policy fs, which reads stdin")
				break
			}
			err = b.AddTar(ctx, stdin)
			break
		}
		var f *os.File
		if f, err = os.Open(src); err != nil {
			break
		}
		err = b.AddTar(ctx, f)
		f.Close()
	case "targz-ref":
		err = b.AddTar(ctx, io.NewSectionReader(ref, 0, opts.Zran.Size))
	default:
		err = fmt.Errorf("--type %q: want dir-rafs, tar-rafs or targz-ref", *srcType)
	}
	if err != nil {
		tmp.Close()
		return err
	}
	res, err := b.Finish()
	if err == nil {
		err = bw.Flush()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	out := createResult{Version: ver.Version, Bootstrap: *bootPath, Stats: b.Stats()}
	if res.Blob != nil {
		dst := *blobPath
		name := res.Blob.ID
		if ref != nil {
			name = zran.MetaBlobID(res.Blob)
			out.MetaBlob = name
			if *blobDir != "" {
				if err := copyLayer(ref, opts.Zran.Size, filepath.Join(*blobDir, res.Blob.ID)); err != nil {
					return err
				}
			}
		}
		if dst == "" {
			dst = filepath.Join(*blobDir, name)
		}
		if err := os.Chmod(tmp.Name(), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp.Name(), dst); err != nil {
			return err
		}
		out.Blob = res.Blob.ID
	}
	if err := bootstrap.WriteFile(*bootPath, res.Image); err != nil {
		return err
	}
	for _, bl := range res.Image.Blobs {
		out.Blobs = append(out.Blobs, bl.ID)
	}
	if *outJSON != "" {
		j, _ := json.MarshalIndent(out, "", "  ")
		if err := os.WriteFile(*outJSON, append(j, '\n'), 0o644); err != nil {
			return err
		}
	}
	st := out.Stats
	fmt.Fprintf(stdout, "bootstrap %s (RAFS v%d, %d inodes)\n", *bootPath, res.Image.Version, len(res.Image.Inodes))
	if res.Blob != nil {
		fmt.Fprintf(stdout, "blob %s: %d chunks, %d bytes (%d bytes of file data, %d chunks deduplicated)\n",
			res.Blob.ID, res.Blob.ChunkCount, res.Blob.CompressedSize, st.Bytes, st.DedupChunks)
	} else {
		fmt.Fprintf(stdout, "no new blob: no file data to store (%d chunks deduplicated)\n", st.DedupChunks)
	}
	return nil
}

// copyLayer puts the targz-ref layer into the blob directory under its
// digest (atomically; kept if already there).
func copyLayer(ref io.ReaderAt, n int64, dst string) error {
	if _, err := os.Stat(dst); err == nil {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".layer-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = io.Copy(tmp, io.NewSectionReader(ref, 0, n))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err != nil {
		return fmt.Errorf("copy the layer to %s: %w", dst, err)
	}
	return os.Rename(tmp.Name(), dst)
}

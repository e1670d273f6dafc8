package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/builder/unpack"
	"github.com/rafsd/rafsd/rafs/zran"
)

func runMerge(args []string, _ io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("merge", flag.ContinueOnError)
	out := fs.String("bootstrap", "", "output bootstrap file")
	fs.StringVar(out, "B", "", "short for --bootstrap")
	fsVersion := fs.Int("fs-version", 0, "RAFS version of the result (default: the top layer's)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if *out == "" || len(pos) == 0 {
		return errors.New("want --bootstrap OUT and at least one layer bootstrap")
	}
	var layers []*rafs.Image
	for _, p := range pos {
		img, err := bootstrap.Open(p)
		if err != nil {
			return err
		}
		layers = append(layers, img)
	}
	img, err := builder.Merge(layers, *fsVersion)
	if err != nil {
		return err
	}
	if err := bootstrap.WriteFile(*out, img); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bootstrap %s (RAFS v%d, %d inodes, %d blobs) merged from %d layers\n", *out, img.Version, len(img.Inodes), len(img.Blobs), len(layers))
	return nil
}

// blobSource opens an image's blobs from --blob-dir (files named by blob
// id) or --blob (one file, for single-blob images or the blob it names).
type blobSource struct {
	dir, file string
	mu        sync.Mutex
	open      map[string]*os.File
}

func (s *blobSource) path(b *rafs.Blob, img *rafs.Image) (string, error) {
	if s.file != "" && (img != nil && len(img.Blobs) == 1 || filepath.Base(s.file) == b.ID) {
		return s.file, nil
	}
	if s.dir != "" {
		return filepath.Join(s.dir, b.ID), nil
	}
	return "", fmt.Errorf("blob %s: not given (use --blob-dir)", b.ID)
}

func (s *blobSource) reader(img *rafs.Image) rafs.BlobChunkReader {
	return rafs.BlobChunkReader{Open: func(b *rafs.Blob) (io.ReaderAt, error) {
		p, err := s.path(b, img)
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if f, ok := s.open[p]; ok {
			return f, nil
		}
		f, err := os.Open(p)
		if err != nil {
			return nil, err
		}
		if s.open == nil {
			s.open = map[string]*os.File{}
		}
		s.open[p] = f
		return f, nil
	}}
}

// ReadAt reads blob id from --blob-dir: the zran contexts of --oci-ref
// images come from their separate meta blobs (rafs/zran.Resolve).
func (s *blobSource) ReadAt(_ context.Context, id string, p []byte, off int64) error {
	if s.dir == "" {
		return fmt.Errorf("blob %s: not given (use --blob-dir)", id)
	}
	f, err := s.reader(nil).Open(&rafs.Blob{ID: id})
	if err != nil {
		return err
	}
	if _, err := f.ReadAt(p, off); err != nil {
		return fmt.Errorf("blob %s at %d: %w", id, off, err)
	}
	return nil
}

func (s *blobSource) Close() {
	for _, f := range s.open {
		f.Close()
	}
}

func runUnpack(args []string, _ io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("unpack", flag.ContinueOnError)
	boot := fs.String("bootstrap", "", "bootstrap file")
	fs.StringVar(boot, "B", "", "short for --bootstrap")
	var src blobSource
	fs.StringVar(&src.dir, "blob-dir", "", "directory holding the blobs, named by id")
	fs.StringVar(&src.dir, "D", "", "short for --blob-dir")
	fs.StringVar(&src.file, "blob", "", "blob file (single-blob images)")
	fs.StringVar(&src.file, "b", "", "short for --blob")
	out := fs.String("output", "", "output: a directory, FILE.tar, or - for a tar on stdout")
	fs.StringVar(out, "o", "", "short for --output")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := bootstrapArg(boot, pos); err != nil {
		return err
	}
	if *boot == "" || *out == "" {
		return errors.New("want --bootstrap and --output")
	}
	img, err := bootstrap.Open(*boot)
	if err != nil {
		return err
	}
	defer src.Close()
	if err := zran.Resolve(context.Background(), img, &src); err != nil {
		return err
	}
	cr := src.reader(img)
	ctx := context.Background()
	st, statErr := os.Stat(*out)
	switch {
	case *out == "-":
		bw := bufio.NewWriterSize(stdout, 1<<20)
		if err := unpack.ToTar(ctx, img, cr, bw); err != nil {
			return err
		}
		return bw.Flush()
	case statErr == nil && st.IsDir(), !strings.HasSuffix(*out, ".tar"):
		if err := os.MkdirAll(*out, 0o755); err != nil {
			return err
		}
		return unpack.ToDir(ctx, img, cr, *out)
	default:
		f, err := os.Create(*out)
		if err != nil {
			return err
		}
		bw := bufio.NewWriterSize(f, 1<<20)
		err = unpack.ToTar(ctx, img, cr, bw)
		if err == nil {
			err = bw.Flush()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	}
}

func runCheck(args []string, _ io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	boot := fs.String("bootstrap", "", "bootstrap file")
	fs.StringVar(boot, "B", "", "short for --bootstrap")
	var src blobSource
	fs.StringVar(&src.dir, "blob-dir", "", "directory holding the blobs: verify every chunk")
	fs.StringVar(&src.dir, "D", "", "short for --blob-dir")
	fs.StringVar(&src.file, "blob", "", "blob file (single-blob images): verify every chunk")
	fs.StringVar(&src.file, "b", "", "short for --blob")
	verbose := fs.Bool("verbose", false, "list every file")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := bootstrapArg(boot, pos); err != nil {
		return err
	}
	if *boot == "" {
		return errors.New("want --bootstrap")
	}
	// Open decodes and validates the structure (rafs.Image.Validate).
	img, err := bootstrap.Open(*boot)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bootstrap %s: RAFS v%d, %d inodes, %d blobs: structure OK\n", *boot, img.Version, len(img.Inodes), len(img.Blobs))
	if src.dir == "" && src.file == "" {
		return nil
	}
	defer src.Close()
	cr := src.reader(img)
	for k, b := range img.Blobs {
		if err := checkBlobMeta(img, &src, b); err != nil {
			return fmt.Errorf("blob %d (%s): %w", k, b.ID, err)
		}
	}
	if err := zran.Resolve(context.Background(), img, &src); err != nil {
		return err
	}
	// Every distinct chunk once; the error names a file that uses it.
	type key struct{ blob, index uint32 }
	seen := map[key]bool{}
	var n, bytes uint64
	err = img.Walk(func(p string, i *rafs.Inode) error {
		if *verbose {
			fmt.Fprintln(stdout, p)
		}
		for _, fc := range i.Chunks {
			k := key{fc.BlobIndex, fc.Index}
			if seen[k] {
				continue
			}
			seen[k] = true
			b, err := img.Blob(fc.Chunk)
			if err != nil {
				return err
			}
			if _, err := cr.ReadChunk(b, fc.Chunk); err != nil {
				return fmt.Errorf("file %s at offset %d: %w", p, fc.FileOffset, err)
			}
			n++
			bytes += uint64(fc.UncompressedSize)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("data check failed: %w", err)
	}
	fmt.Fprintf(stdout, "data OK: %d chunks (%d bytes) verified\n", n, bytes)
	return nil
}

// checkBlobMeta compares a v6 blob's blob meta table, when it has one,
// with the chunks of the bootstrap: nydusd reads data through that table,
// so a mismatch serves wrong bytes even when every chunk verifies.
func checkBlobMeta(img *rafs.Image, src *blobSource, b *rafs.Blob) error {
	if b.Meta.CompressedSize == 0 {
		return nil
	}
	var p string
	var err error
	switch id := zran.MetaBlobID(b); {
	case id == "":
		p, err = src.path(b, img)
	case src.dir == "":
		err = fmt.Errorf("zran blob %s: its blob meta %s needs --blob-dir", b.ID, id)
	default:
		// A zran blob's meta is a blob of its own (nydus's ref blob).
		p = filepath.Join(src.dir, id)
	}
	if err != nil {
		return err
	}
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	m, err := blobmeta.Read(f, b.Meta.Offset, b.Meta.CompressedSize)
	if err != nil {
		return fmt.Errorf("blob meta: %w", err)
	}
	if m.Header.CIEntries != b.ChunkCount {
		return fmt.Errorf("blob meta has %d chunks, bootstrap says %d", m.Header.CIEntries, b.ChunkCount)
	}
	idx := -1
	for k, bl := range img.Blobs {
		if bl == b {
			idx = k
		}
	}
	for _, i := range img.Inodes {
		for _, c := range i.Chunks {
			if int(c.BlobIndex) != idx {
				continue
			}
			if int(c.Index) >= len(m.Chunks) {
				return fmt.Errorf("inode %d: chunk index %d past the blob meta's %d", i.Ino, c.Index, len(m.Chunks))
			}
			ci := m.Chunks[c.Index]
			if ci.CompressedOffset != c.CompressedOffset || ci.CompressedSize != c.CompressedSize ||
				ci.UncompressedOffset != c.UncompressedOffset || ci.UncompressedSize != c.UncompressedSize {
				return fmt.Errorf("chunk %d: blob meta says %+v, bootstrap %+v", c.Index, ci, *c.Chunk)
			}
		}
	}
	return nil
}

// inspection is inspect's JSON output.
type inspection struct {
	Version    int          `json:"version"`
	ChunkSize  uint32       `json:"chunk_size"`
	Compressor string       `json:"compressor"`
	Digester   string       `json:"digester"`
	Stats      *stats       `json:"stats,omitempty"`
	Blobs      []blobInfo   `json:"blobs,omitempty"`
	Files      []fileInfo   `json:"files,omitempty"`
	Chunks     []chunkEntry `json:"chunks,omitempty"`
	Prefetch   []string     `json:"prefetch,omitempty"`
}

type stats struct {
	Inodes      int    `json:"inodes"`
	Dirs        int    `json:"dirs"`
	Files       int    `json:"files"`
	Symlinks    int    `json:"symlinks"`
	Others      int    `json:"others"`
	Hardlinks   int    `json:"hardlinks"`
	FileBytes   uint64 `json:"file_bytes"`
	Chunks      int    `json:"chunks"`
	ChunkRefs   int    `json:"chunk_refs"`
	StoredBytes uint64 `json:"stored_bytes"`
}

type blobInfo struct {
	Index            int    `json:"index"`
	ID               string `json:"id"`
	Compressor       string `json:"compressor"`
	Digester         string `json:"digester"`
	ChunkSize        uint32 `json:"chunk_size"`
	ChunkCount       uint32 `json:"chunk_count"`
	CompressedSize   uint64 `json:"compressed_size"`
	UncompressedSize uint64 `json:"uncompressed_size"`
	Features         uint32 `json:"features"`
	MetaOffset       uint64 `json:"meta_offset,omitempty"`
	// MetaBlob names a zran (--oci-ref) blob's separate blob meta, the
	// blob its contexts are read from.
	MetaBlob string `json:"meta_blob,omitempty"`
}

type fileInfo struct {
	Path   string `json:"path"`
	Ino    uint64 `json:"ino"`
	Mode   string `json:"mode"`
	UID    uint32 `json:"uid"`
	GID    uint32 `json:"gid"`
	Size   uint64 `json:"size"`
	Nlink  uint32 `json:"nlink"`
	Mtime  int64  `json:"mtime"`
	Target string `json:"target,omitempty"`
	Chunks int    `json:"chunks,omitempty"`
	Xattrs int    `json:"xattrs,omitempty"`
}

type chunkEntry struct {
	Path               string `json:"path"`
	FileOffset         uint64 `json:"file_offset"`
	Blob               uint32 `json:"blob"`
	Index              uint32 `json:"index"`
	Digest             string `json:"digest"`
	CompressedOffset   uint64 `json:"compressed_offset"`
	CompressedSize     uint32 `json:"compressed_size"`
	UncompressedOffset uint64 `json:"uncompressed_offset"`
	UncompressedSize   uint32 `json:"uncompressed_size"`
	Compressed         bool   `json:"compressed"`
}

func modeString(m uint32) string {
	t := map[uint32]byte{syscall.S_IFDIR: 'd', syscall.S_IFREG: '-', syscall.S_IFLNK: 'l', syscall.S_IFCHR: 'c', syscall.S_IFBLK: 'b', syscall.S_IFIFO: 'p', syscall.S_IFSOCK: 's'}[m&syscall.S_IFMT]
	if t == 0 {
		t = '?'
	}
	return fmt.Sprintf("%c%04o", t, m&07777)
}

func runInspect(args []string, _ io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("inspect", flag.ContinueOnError)
	boot := fs.String("bootstrap", "", "bootstrap file")
	fs.StringVar(boot, "B", "", "short for --bootstrap")
	asJSON := fs.Bool("json", false, "JSON output")
	request := fs.String("request", "stats,blobs,files", "what to show: any of stats, blobs, files, chunks, prefetch (comma separated) or all")
	fs.StringVar(request, "R", "stats,blobs,files", "short for --request")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := bootstrapArg(boot, pos); err != nil {
		return err
	}
	if *boot == "" {
		return errors.New("want a bootstrap")
	}
	want := map[string]bool{}
	for _, r := range strings.Split(*request, ",") {
		switch r = strings.TrimSpace(r); r {
		case "all":
			for _, k := range []string{"stats", "blobs", "files", "chunks", "prefetch"} {
				want[k] = true
			}
		case "stats", "blobs", "files", "chunks", "prefetch":
			want[r] = true
		default:
			return fmt.Errorf("--request %q: unknown %q", *request, r)
		}
	}
	img, err := bootstrap.Open(*boot)
	if err != nil {
		return err
	}
	res := inspect(img, want)
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "RAFS v%d, chunk size %#x, %s/%s\n", res.Version, res.ChunkSize, res.Compressor, res.Digester)
	if s := res.Stats; s != nil {
		fmt.Fprintf(&buf, "inodes %d: %d dirs, %d files, %d symlinks, %d others; %d extra hardlink names\n", s.Inodes, s.Dirs, s.Files, s.Symlinks, s.Others, s.Hardlinks)
		fmt.Fprintf(&buf, "file data %d bytes in %d chunk references to %d chunks (%d stored bytes)\n", s.FileBytes, s.ChunkRefs, s.Chunks, s.StoredBytes)
	}
	for _, b := range res.Blobs {
		fmt.Fprintf(&buf, "blob %d %s: %s/%s, %d chunks of up to %#x, %d bytes (%d uncompressed), features %#x\n",
			b.Index, b.ID, b.Compressor, b.Digester, b.ChunkCount, b.ChunkSize, b.CompressedSize, b.UncompressedSize, b.Features)
	}
	for _, f := range res.Files {
		fmt.Fprintf(&buf, "%s %5d %5d %10d %s", f.Mode, f.UID, f.GID, f.Size, f.Path)
		if f.Target != "" {
			fmt.Fprintf(&buf, " -> %s", f.Target)
		}
		buf.WriteByte('\n')
	}
	for _, c := range res.Chunks {
		fmt.Fprintf(&buf, "chunk %s@%d: blob %d #%d %s c[%d,+%d) u[%d,+%d)\n", c.Path, c.FileOffset, c.Blob, c.Index, c.Digest, c.CompressedOffset, c.CompressedSize, c.UncompressedOffset, c.UncompressedSize)
	}
	for _, p := range res.Prefetch {
		fmt.Fprintf(&buf, "prefetch %s\n", p)
	}
	_, err = stdout.Write(buf.Bytes())
	return err
}

func inspect(img *rafs.Image, want map[string]bool) *inspection {
	res := &inspection{Version: img.Version, ChunkSize: img.ChunkSize, Compressor: img.Compressor.String(), Digester: img.Digester.String()}
	if want["blobs"] {
		for k, b := range img.Blobs {
			res.Blobs = append(res.Blobs, blobInfo{k, b.ID, b.Compressor.String(), b.Digester.String(), b.ChunkSize, b.ChunkCount, b.CompressedSize, b.UncompressedSize, b.Features, b.Meta.Offset, zran.MetaBlobID(b)})
		}
	}
	s := &stats{Inodes: len(img.Inodes)}
	type key struct{ blob, index uint32 }
	chunks := map[key]bool{}
	seenIno := map[uint64]bool{}
	paths := map[uint64]string{}
	_ = img.Walk(func(p string, i *rafs.Inode) error {
		if _, ok := paths[i.Ino]; !ok {
			paths[i.Ino] = p
		}
		if want["files"] {
			res.Files = append(res.Files, fileInfo{p, i.Ino, modeString(i.Mode), i.UID, i.GID, i.Size, i.Nlink, i.Mtime, i.Target, len(i.Chunks), len(i.Xattrs)})
		}
		if seenIno[i.Ino] {
			s.Hardlinks++
			return nil
		}
		seenIno[i.Ino] = true
		switch {
		case i.IsDir():
			s.Dirs++
		case i.IsRegular():
			s.Files++
			s.FileBytes += i.Size
		case i.IsSymlink():
			s.Symlinks++
		default:
			s.Others++
		}
		for _, c := range i.Chunks {
			s.ChunkRefs++
			k := key{c.BlobIndex, c.Index}
			if !chunks[k] {
				chunks[k] = true
				s.StoredBytes += uint64(c.CompressedSize)
			}
			if want["chunks"] {
				res.Chunks = append(res.Chunks, chunkEntry{p, c.FileOffset, c.BlobIndex, c.Index, c.Digest.String(), c.CompressedOffset, c.CompressedSize, c.UncompressedOffset, c.UncompressedSize, c.Compressed})
			}
		}
		return nil
	})
	s.Chunks = len(chunks)
	if want["stats"] {
		res.Stats = s
	}
	if want["prefetch"] {
		for _, ino := range img.Prefetch {
			res.Prefetch = append(res.Prefetch, paths[ino])
		}
	}
	return res
}

// bootstrapArg lets the bootstrap be given as the one positional argument
// instead of --bootstrap, as nydus-image accepts; other positionals are errors.
func bootstrapArg(boot *string, pos []string) error {
	if *boot == "" && len(pos) == 1 {
		*boot = pos[0]
	} else if len(pos) != 0 {
		return fmt.Errorf("unexpected arguments %q", pos)
	}
	return nil
}

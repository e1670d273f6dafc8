package daemon

// This file is the glue between the daemon and the filesystems it serves:
// RAFS images (rafs/bootstrap + rafs/storage + rafs/fs) and passthrough
// directories (rafs/passthrough).

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/config"
	rafsfs "github.com/rafsd/rafsd/rafs/fs"
	"github.com/rafsd/rafsd/rafs/passthrough"
	"github.com/rafsd/rafsd/rafs/storage"
)

// Filesystem types of the mount API (nydusd's names).
const (
	FsTypeRafs        = "rafs"
	FsTypePassthrough = "passthrough_fs"
)

// MountCmd is the body of POST/PUT /api/v1/mount.
type MountCmd struct {
	Source        string   `json:"source"`
	FsType        string   `json:"fs_type"`
	Config        string   `json:"config"`
	PrefetchFiles []string `json:"prefetch_files,omitempty"`
}

// instance is one mounted filesystem and what it holds.
type instance struct {
	cmd     MountCmd
	fs      fuse.RawFileSystem
	rafs    *rafsfs.FS       // nil for passthrough
	pass    *passthrough.FS  // nil for rafs
	fetcher *storage.Fetcher // nil for passthrough
	cancel  context.CancelFunc
}

func (in *instance) close() {
	if in.cancel != nil {
		in.cancel()
	}
	if in.fetcher != nil {
		_ = in.fetcher.Close()
	}
	if in.pass != nil {
		_ = in.pass.Close()
	}
}

// openFS builds the filesystem a mount command names.
func (d *Daemon) openFS(cmd MountCmd) (*instance, error) {
	switch cmd.FsType {
	case FsTypeRafs, "":
		return d.openRafs(cmd)
	case FsTypePassthrough:
		if cmd.Source == "" {
			return nil, fmt.Errorf("%w: passthrough_fs needs a source directory", ErrInvalid)
		}
		if fi, err := os.Stat(cmd.Source); err != nil || !fi.IsDir() {
			return nil, fmt.Errorf("%w: passthrough_fs source %q is not a directory", ErrInvalid, cmd.Source)
		}
		// nydusd's passthroughfs keeps fuse-backend-rs's 5 s entry and
		// attr timeouts; with none, every guest stat costs 2-3 requests.
		fs, err := passthrough.New(cmd.Source, passthrough.Options{Logger: d.log, EntryTimeout: 5 * time.Second, AttrTimeout: 5 * time.Second})
		if err != nil {
			return nil, fmt.Errorf("passthrough_fs %s: %w", cmd.Source, err)
		}
		return &instance{cmd: cmd, fs: fs, pass: fs}, nil
	default:
		return nil, fmt.Errorf("%w: unknown fs_type %q (want %q or %q)", ErrInvalid, cmd.FsType, FsTypeRafs, FsTypePassthrough)
	}
}

func (d *Daemon) openRafs(cmd MountCmd) (*instance, error) {
	if cmd.Source == "" {
		return nil, fmt.Errorf("%w: rafs mount needs a bootstrap as source", ErrInvalid)
	}
	if _, err := os.Stat(cmd.Source); err != nil {
		return nil, fmt.Errorf("%w: bootstrap: %v", ErrInvalid, err)
	}
	if strings.TrimSpace(cmd.Config) == "" {
		return nil, fmt.Errorf("%w: rafs mount needs a config", ErrInvalid)
	}
	cfg, err := config.Parse([]byte(cmd.Config))
	if err != nil {
		return nil, fmt.Errorf("%w: config: %v", ErrInvalid, err)
	}
	img, err := bootstrap.Open(cmd.Source)
	if err != nil {
		return nil, fmt.Errorf("%w: bootstrap %s: %v", ErrInvalid, cmd.Source, err)
	}
	bootstrap.ReleaseMemory()
	if len(cmd.PrefetchFiles) > 0 {
		img.Prefetch = prefetchInodes(img, cmd.PrefetchFiles)
	}
	var reg prometheus.Registerer
	if d.reg != nil {
		reg = d.reg
	}
	f, err := storage.New(cfg, storage.WithRegisterer(reg), storage.WithLogger(d.log))
	if err != nil {
		return nil, fmt.Errorf("storage: %w", err)
	}
	if err := f.AddImage(img); err != nil {
		f.Close()
		return nil, fmt.Errorf("storage: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := f.Prefetch(ctx, img); err != nil {
		d.log.Warn("prefetch not started", "source", cmd.Source, "err", err)
	}
	opts := rafsfs.DefaultOptions()
	opts.Logger = d.log
	if cfg.Rafs != nil {
		opts.FilesAccount, opts.AccessPattern = cfg.Rafs.IOStatsFiles, cfg.Rafs.AccessPattern
		opts.LatestReadFiles = cfg.Rafs.LatestReadFiles
		opts.EntryTimeout = time.Duration(cfg.Rafs.EntryTimeout) * time.Second
		opts.AttrTimeout = time.Duration(cfg.Rafs.AttrTimeout) * time.Second
	}
	fs := rafsfs.New(img, f, opts)
	return &instance{cmd: cmd, fs: fs, rafs: fs, fetcher: f, cancel: cancel}, nil
}

// prefetchInodes resolves prefetch paths to inode numbers; paths that do
// not exist are skipped, as nydusd does.
func prefetchInodes(img *rafs.Image, paths []string) []uint64 {
	var out []uint64
	for _, p := range paths {
		i := img.Root()
		var err error
		for _, name := range strings.Split(strings.Trim(p, "/"), "/") {
			if name == "" {
				continue
			}
			if i, err = img.Lookup(i, name); err != nil {
				break
			}
		}
		if err == nil && i != nil {
			out = append(out, i.Ino)
		}
	}
	return out
}

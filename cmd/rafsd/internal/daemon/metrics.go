package daemon

import (
	"encoding/json"
	"fmt"

	"github.com/rafsd/rafsd/rafs/fusedev"
	"github.com/rafsd/rafsd/rafs/storage"
)

// FsMetrics is the GET /api/v1/metrics answer: a subset of nydusd's
// FsIoStats, from the rafs/fs request counters.
type FsMetrics struct {
	ID             string `json:"id"`
	DataRead       uint64 `json:"data_read"`
	NrOpens        uint64 `json:"nr_opens"`
	Lookups        uint64 `json:"lookups"`
	GetAttrs       uint64 `json:"getattrs"`
	ReadDirs       uint64 `json:"readdirs"`
	Xattrs         uint64 `json:"xattrs"`
	Reads          uint64 `json:"reads"`
	ReadErrors     uint64 `json:"read_errors"`
	FilesAccount   bool   `json:"files_account_enabled"`
	AccessPattern  bool   `json:"access_pattern_enabled"`
	MeasureLatency bool   `json:"measure_latency"`
	FsType         string `json:"fs_type"`
	Source         string `json:"source"`
}

// FsMetrics returns the counters of the RAFS mount id (a mountpoint), or of
// all RAFS mounts added up when id is empty.
func (d *Daemon) FsMetrics(id string) (FsMetrics, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := FsMetrics{ID: id}
	found := false
	for p, in := range d.mounts {
		if (id != "" && p != id) || in.rafs == nil {
			continue
		}
		found = true
		s := in.rafs.Stats()
		out.DataRead += s.ReadBytes.Load()
		out.NrOpens += s.Opens.Load()
		out.Lookups += s.Lookups.Load()
		out.GetAttrs += s.GetAttrs.Load()
		out.ReadDirs += s.ReadDirs.Load()
		out.Xattrs += s.Xattrs.Load()
		out.Reads += s.Reads.Load()
		out.ReadErrors += s.ReadErrors.Load()
		o := in.rafs.Options()
		out.FilesAccount = out.FilesAccount || o.FilesAccount
		out.AccessPattern = out.AccessPattern || o.AccessPattern
		out.FsType, out.Source = FsTypeRafs, in.cmd.Source
	}
	if !found && id != "" {
		return out, fmt.Errorf("%w: no rafs filesystem %q", ErrNotFound, id)
	}
	return out, nil
}

// BackendMetrics returns the backend counters of mount id (or the first).
func (d *Daemon) BackendMetrics(id string) (storage.BackendMetrics, error) {
	in, _, err := d.rafsInstance(id)
	if err != nil {
		return storage.BackendMetrics{}, err
	}
	return in.fetcher.BackendMetrics(), nil
}

// BlobcacheMetrics returns the cache counters of mount id (or the first).
func (d *Daemon) BlobcacheMetrics(id string) (storage.BlobcacheMetrics, error) {
	in, _, err := d.rafsInstance(id)
	if err != nil {
		return storage.BlobcacheMetrics{}, err
	}
	return in.fetcher.BlobcacheMetrics(), nil
}

// BackendInfo returns the config a mount was made with
// (GET /api/v1/daemon/backend?mountpoint=).
func (d *Daemon) BackendInfo(mountpoint string) (MountCmd, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	in, ok := d.mounts[mountpoint]
	if !ok {
		return MountCmd{}, fmt.Errorf("%w: mountpoint %s", ErrNotFound, mountpoint)
	}
	return in.cmd, nil
}

func (d *Daemon) rafsInstance(id string) (*instance, string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for p, in := range d.mounts {
		if (id == "" || p == id) && in.fetcher != nil {
			return in, p, nil
		}
	}
	if id != "" {
		return nil, "", fmt.Errorf("%w: no rafs filesystem %q", ErrNotFound, id)
	}
	return nil, "", fmt.Errorf("%w: no rafs filesystem mounted", ErrNotFound)
}

// onlyRafs returns the RAFS mount id names, or with no id the only RAFS
// mount: nydusd answers per-file metrics for one filesystem, never a sum.
func (d *Daemon) onlyRafs(id string) (*instance, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if id != "" {
		in, ok := d.mounts[id]
		if !ok || in.rafs == nil {
			return nil, fmt.Errorf("%w: no rafs filesystem %q", ErrNotFound, id)
		}
		return in, nil
	}
	var found *instance
	for _, in := range d.mounts {
		if in.rafs == nil {
			continue
		}
		if found != nil {
			return nil, fmt.Errorf("%w: several rafs filesystems mounted, name one with ?id=", ErrInvalid)
		}
		found = in
	}
	if found == nil {
		return nil, fmt.Errorf("%w: no rafs filesystem mounted", ErrNotFound)
	}
	return found, nil
}

// FilesMetrics is GET /api/v1/metrics/files: per-inode counters of one
// RAFS mount (an empty object unless its config sets iostats_files), or
// with latest the inode ranges read since the last such call
// (latest_read_files).
func (d *Daemon) FilesMetrics(id string, latest bool) (json.RawMessage, error) {
	in, err := d.onlyRafs(id)
	if err != nil {
		return nil, err
	}
	if latest {
		return in.rafs.LatestReadFilesJSON()
	}
	return in.rafs.FilesJSON()
}

// AccessPatterns is GET /api/v1/metrics/pattern: files read so far with
// their read count and first read time (empty unless access_pattern).
func (d *Daemon) AccessPatterns(id string) (json.RawMessage, error) {
	in, err := d.onlyRafs(id)
	if err != nil {
		return nil, err
	}
	return in.rafs.AccessPatternsJSON()
}

// Inflight is GET /api/v1/metrics/inflight: the FUSE requests being
// served now.
func (d *Daemon) Inflight() []fusedev.InflightOp {
	d.mu.Lock()
	srv := d.srv
	d.mu.Unlock()
	if srv == nil {
		return nil
	}
	return srv.Inflight()
}

package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/pelletier/go-toml/v2"
)

// Blob cache entry types (nydus BLOB_CACHE_TYPE_*).
const (
	EntryBootstrap = "bootstrap"
	EntryDataBlob  = "datablob"
)

// BlobCacheEntry is what nydusd's /api/v2/blobs takes to bind a blob or a
// bootstrap for fscache mode (nydus api BlobCacheEntry): the legacy
// "config" object or "config_v2", normalized into Config.
type BlobCacheEntry struct {
	// Type is EntryBootstrap or EntryDataBlob.
	Type     string
	ID       string
	DomainID string
	// MetadataPath is the bootstrap file, if given.
	MetadataPath string
	// Config holds the backend and cache (Rafs is the defaults).
	Config *Config
}

type entryTree struct {
	Type     string `cfg:"type"`
	ID       string `cfg:"id"`
	Config   any    `cfg:"config"`
	ConfigV2 any    `cfg:"config_v2"`
	DomainID string `cfg:"domain_id"`
}

type entryConfigV1 struct {
	ID               string            `cfg:"id"`
	BackendType      string            `cfg:"backend_type"`
	BackendConfig    any               `cfg:"backend_config"`
	ExternalBackends []ExternalBackend `cfg:"external_backends"`
	CacheType        string            `cfg:"cache_type"`
	CacheConfig      any               `cfg:"cache_config"`
	PrefetchConfig   entryPrefetch     `cfg:"prefetch_config"`
	// nydus's sample config spells it metadata_file; serde ignored that.
	MetadataPath string `cfg:"metadata_path,metadata_file"`
}

type entryPrefetch struct {
	Enable        bool   `cfg:"enable"`
	ThreadsCount  int    `cfg:"threads_count"`
	MergingSize   int    `cfg:"merging_size"`
	BandwidthRate uint32 `cfg:"bandwidth_rate"`
}

func (p *entryPrefetch) setDefaults() {
	*p = entryPrefetch{ThreadsCount: DefaultPrefetchThreads, MergingSize: DefaultBatchSize}
}

type entryConfigV2 struct {
	Version          int               `cfg:"version"`
	ID               string            `cfg:"id"`
	Backend          *Backend          `cfg:"backend"`
	ExternalBackends []ExternalBackend `cfg:"external_backends"`
	Cache            *Cache            `cfg:"cache"`
	MetadataPath     string            `cfg:"metadata_path"`
}

// ParseBlobCacheEntry parses a blob cache entry (JSON or TOML), strictly
// like Parse.
func ParseBlobCacheEntry(data []byte) (*BlobCacheEntry, error) {
	e, err := parseEntry(data)
	if err != nil {
		return nil, fmt.Errorf("%w: blob cache entry: %w", ErrInvalid, err)
	}
	return e, nil
}

func parseEntry(data []byte) (*BlobCacheEntry, error) {
	trimmed := bytes.TrimSpace(data)
	var tree map[string]any
	if len(trimmed) > 0 && trimmed[0] == '{' {
		dec := json.NewDecoder(bytes.NewReader(trimmed))
		dec.UseNumber()
		if err := dec.Decode(&tree); err != nil {
			return nil, fmt.Errorf("json: %w", err)
		}
		if dec.More() {
			return nil, errors.New("json: trailing data")
		}
	} else if err := toml.Unmarshal(trimmed, &tree); err != nil {
		return nil, fmt.Errorf("toml: %w", err)
	}
	var et entryTree
	if err := decodeInto("", tree, &et); err != nil {
		return nil, err
	}
	if et.Type != EntryBootstrap && et.Type != EntryDataBlob {
		return nil, fmt.Errorf("type: %q, want %q or %q", et.Type, EntryBootstrap, EntryDataBlob)
	}
	if et.ID == "" {
		return nil, errors.New("id: missing")
	}
	e := &BlobCacheEntry{Type: et.Type, ID: et.ID, DomainID: et.DomainID}
	var cfg *Config
	switch {
	case et.ConfigV2 != nil:
		var v2 entryConfigV2
		if err := decodeInto("config_v2", et.ConfigV2, &v2); err != nil {
			return nil, err
		}
		if v2.Version != 2 {
			return nil, fmt.Errorf("config_v2.version: %d unsupported, want 2", v2.Version)
		}
		cfg = &Config{Version: 2, ID: v2.ID, Backend: v2.Backend, ExternalBackends: v2.ExternalBackends, Cache: v2.Cache}
		e.MetadataPath = v2.MetadataPath
	case et.Config != nil:
		var v1 entryConfigV1
		if err := decodeInto("config", et.Config, &v1); err != nil {
			return nil, err
		}
		be, err := decodeBackendV1("config.backend", v1.BackendType, v1.BackendConfig)
		if err != nil {
			return nil, err
		}
		cache, err := decodeCacheV1("config.cache", v1.CacheType, false, false, v1.CacheConfig)
		if err != nil {
			return nil, err
		}
		p := v1.PrefetchConfig
		cache.Prefetch = Prefetch{Enable: p.Enable, ThreadsCount: p.ThreadsCount, BatchSize: p.MergingSize,
			BandwidthLimit: p.BandwidthRate, PrefetchAll: true}
		cfg = &Config{Version: 1, ID: v1.ID, Backend: be, ExternalBackends: v1.ExternalBackends, Cache: cache}
		e.MetadataPath = v1.MetadataPath
	default:
		return nil, errors.New("config or config_v2: missing")
	}
	if cfg.Backend == nil || cfg.Backend.Type == "" {
		return nil, errors.New("backend: missing")
	}
	if cfg.Cache == nil || cfg.Cache.Type == "" {
		return nil, errors.New("cache: missing (a blob cache entry needs fscache or blobcache)")
	}
	var err error
	if e.Config, err = finish(cfg); err != nil {
		return nil, err
	}
	return e, nil
}

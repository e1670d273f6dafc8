// Package config parses nydusd's daemon configuration: the v1 JSON file
// (`{"device": {"backend": ..., "cache": ...}, "mode": ..., "fs_prefetch": ...}`)
// and the v2 TOML (or JSON with "version": 2) file of api/src/config.rs,
// into one normalized Config shaped like nydus's ConfigV2.
//
// Unlike nydusd (serde ignores unknown keys), Parse rejects unknown and
// mistyped fields with an error naming the field path, e.g.
// `device.backend.config.timout: unknown field`, so a typo does not
// silently fall back to a default.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Defaults nydusd fills in (api/src/config.rs default_* functions).
const (
	DefaultHTTPScheme        = "https"
	DefaultHTTPTimeout       = 5 // seconds
	DefaultCheckInterval     = 5 // seconds
	DefaultCheckPauseElapsed = 300
	DefaultFailureLimit      = 5
	DefaultWorkDir           = "."
	DefaultBatchSize         = 1 << 20
	DefaultPrefetchThreads   = 8
	DefaultMode              = "direct"
	// DefaultTimeout (seconds) is the kernel's entry and attribute cache
	// time for an image: long enough that a walk asks once, short enough
	// that a remount at the same path (PUT /api/v1/mount) is seen soon.
	DefaultTimeout = 5
	// MaxTimeout bounds entry_timeout and attr_timeout (nydusd's 2^32 s).
	MaxTimeout = 1 << 32
	// MaxBatchSize bounds batch/merging sizes as nydusd's validate() does.
	MaxBatchSize = 0x10000000
)

// ErrInvalid is wrapped by every error Parse returns.
var ErrInvalid = errors.New("invalid config")

// Config is a parsed daemon configuration. Parse always fills Backend,
// Cache and Rafs.
type Config struct {
	// Version is the format the config was written in: 1 (JSON) or 2.
	Version          int               `cfg:"version"`
	ID               string            `cfg:"id"`
	Backend          *Backend          `cfg:"backend"`
	ExternalBackends []ExternalBackend `cfg:"external_backends"`
	Cache            *Cache            `cfg:"cache"`
	Rafs             *Rafs             `cfg:"rafs"`
	Overlay          *Overlay          `cfg:"overlay"`
}

// Backend selects and configures the storage backend. Type is one of
// "localfs", "registry", "oss", "s3", "localdisk", "http-proxy"; the
// matching field holds its settings.
type Backend struct {
	Type      string     `cfg:"type"`
	LocalDisk *LocalDisk `cfg:"localdisk"`
	LocalFS   *LocalFS   `cfg:"localfs"`
	OSS       *OSS       `cfg:"oss"`
	S3        *S3        `cfg:"s3"`
	Registry  *Registry  `cfg:"registry"`
	HTTPProxy *HTTPProxy `cfg:"http-proxy"`
}

// LocalDisk is the localdisk backend (blobs in a GPT-partitioned disk).
type LocalDisk struct {
	DevicePath string `cfg:"device_path"`
	DisableGPT bool   `cfg:"disable_gpt"`
}

// LocalFS reads blobs from files: BlobFile if set, else Dir/<blob id>
// (then each of AltDirs).
type LocalFS struct {
	BlobFile string   `cfg:"blob_file"`
	Dir      string   `cfg:"dir"`
	AltDirs  []string `cfg:"alt_dirs"`
}

// Registry reads blobs from an OCI distribution registry.
type Registry struct {
	Scheme string `cfg:"scheme"`
	Host   string `cfg:"host"`
	Repo   string `cfg:"repo"`
	// Auth is base64("user:password"), used for basic auth or to get a
	// bearer token from the registry's token service.
	Auth        string   `cfg:"auth"`
	SkipVerify  bool     `cfg:"skip_verify"`
	CACertFiles []string `cfg:"ca_cert_files"`
	// Timeout and ConnectTimeout are in seconds; 0 means none.
	Timeout        uint32 `cfg:"timeout"`
	ConnectTimeout uint32 `cfg:"connect_timeout"`
	RetryLimit     uint8  `cfg:"retry_limit"`
	// RegistryToken is a bearer token sent as is.
	RegistryToken      string   `cfg:"registry_token"`
	BlobURLScheme      string   `cfg:"blob_url_scheme"`
	BlobRedirectedHost string   `cfg:"blob_redirected_host"`
	Proxy              Proxy    `cfg:"proxy"`
	Mirrors            []Mirror `cfg:"mirrors"`
	// ReadAhead and ReadAheadSec are localfs fields that nydus-snapshotter
	// writes for every backend type (one BackendConfig struct, "readahead"
	// always present); nydusd ignores them here, and so does rafsd.
	ReadAhead    bool   `cfg:"readahead"`
	ReadAheadSec uint32 `cfg:"readahead_sec"`
}

func (r *Registry) setDefaults() {
	r.Scheme = DefaultHTTPScheme
	r.Timeout = DefaultHTTPTimeout
	r.ConnectTimeout = DefaultHTTPTimeout
	r.Proxy.setDefaults()
}

// OSS is Aliyun object storage (parsed for compatibility; rafsd has no OSS backend).
type OSS struct {
	Scheme          string   `cfg:"scheme"`
	Endpoint        string   `cfg:"endpoint"`
	BucketName      string   `cfg:"bucket_name"`
	ObjectPrefix    string   `cfg:"object_prefix"`
	AccessKeyID     string   `cfg:"access_key_id"`
	AccessKeySecret string   `cfg:"access_key_secret"`
	SkipVerify      bool     `cfg:"skip_verify"`
	CACertFiles     []string `cfg:"ca_cert_files"`
	Timeout         uint32   `cfg:"timeout"`
	ConnectTimeout  uint32   `cfg:"connect_timeout"`
	RetryLimit      uint8    `cfg:"retry_limit"`
	Proxy           Proxy    `cfg:"proxy"`
	Mirrors         []Mirror `cfg:"mirrors"`
	// ReadAhead and ReadAheadSec are localfs fields that nydus-snapshotter
	// writes for every backend type (one BackendConfig struct, "readahead"
	// always present); nydusd ignores them here, and so does rafsd.
	ReadAhead    bool   `cfg:"readahead"`
	ReadAheadSec uint32 `cfg:"readahead_sec"`
}

func (o *OSS) setDefaults() {
	o.Scheme = DefaultHTTPScheme
	o.Timeout = DefaultHTTPTimeout
	o.ConnectTimeout = DefaultHTTPTimeout
	o.Proxy.setDefaults()
}

// S3 is AWS S3 (parsed for compatibility; rafsd has no S3 backend).
type S3 struct {
	Scheme          string   `cfg:"scheme"`
	Endpoint        string   `cfg:"endpoint"`
	Region          string   `cfg:"region"`
	BucketName      string   `cfg:"bucket_name"`
	ObjectPrefix    string   `cfg:"object_prefix"`
	AccessKeyID     string   `cfg:"access_key_id"`
	AccessKeySecret string   `cfg:"access_key_secret"`
	SkipVerify      bool     `cfg:"skip_verify"`
	CACertFiles     []string `cfg:"ca_cert_files"`
	Timeout         uint32   `cfg:"timeout"`
	ConnectTimeout  uint32   `cfg:"connect_timeout"`
	RetryLimit      uint8    `cfg:"retry_limit"`
	Proxy           Proxy    `cfg:"proxy"`
	Mirrors         []Mirror `cfg:"mirrors"`
	// ReadAhead and ReadAheadSec are localfs fields that nydus-snapshotter
	// writes for every backend type (one BackendConfig struct, "readahead"
	// always present); nydusd ignores them here, and so does rafsd.
	ReadAhead    bool   `cfg:"readahead"`
	ReadAheadSec uint32 `cfg:"readahead_sec"`
}

func (s *S3) setDefaults() {
	s.Scheme = DefaultHTTPScheme
	s.Timeout = DefaultHTTPTimeout
	s.ConnectTimeout = DefaultHTTPTimeout
	s.Proxy.setDefaults()
}

// HTTPProxy is nydus's http-proxy backend (parsed for compatibility).
type HTTPProxy struct {
	Addr           string   `cfg:"addr"`
	Path           string   `cfg:"path"`
	SkipVerify     bool     `cfg:"skip_verify"`
	CACertFiles    []string `cfg:"ca_cert_files"`
	Timeout        uint32   `cfg:"timeout"`
	ConnectTimeout uint32   `cfg:"connect_timeout"`
	RetryLimit     uint8    `cfg:"retry_limit"`
	Proxy          Proxy    `cfg:"proxy"`
}

func (h *HTTPProxy) setDefaults() {
	h.Timeout = DefaultHTTPTimeout
	h.ConnectTimeout = DefaultHTTPTimeout
	h.Proxy.setDefaults()
}

// Proxy sends blob requests through an HTTP proxy such as Dragonfly's
// dfdaemon, falling back to the origin while it is unhealthy if Fallback.
type Proxy struct {
	URL                        string `cfg:"url"`
	PingURL                    string `cfg:"ping_url"`
	Fallback                   bool   `cfg:"fallback"`
	CheckInterval              uint64 `cfg:"check_interval"`
	UseHTTP                    bool   `cfg:"use_http"`
	CheckPauseElapsed          uint64 `cfg:"check_pause_elapsed"`
	DragonflySchedulerEndpoint string `cfg:"dragonfly_scheduler_endpoint"`
}

func (p *Proxy) setDefaults() {
	*p = Proxy{Fallback: true, CheckInterval: DefaultCheckInterval, CheckPauseElapsed: DefaultCheckPauseElapsed}
}

// Mirror is a registry mirror tried before the origin (nydus <= 2.3
// "mirrors"; Dragonfly P2P uses it with an X-Dragonfly-Registry header).
type Mirror struct {
	// Host is the mirror's base URL, e.g. http://127.0.0.1:65001.
	Host    string            `cfg:"host"`
	PingURL string            `cfg:"ping_url"`
	Headers map[string]string `cfg:"headers"`
	// AuthThrough sends the origin's Authorization header to the mirror.
	AuthThrough             bool   `cfg:"auth_through"`
	HealthCheckInterval     uint64 `cfg:"health_check_interval"`
	FailureLimit            uint8  `cfg:"failure_limit"`
	HealthCheckPauseElapsed uint64 `cfg:"health_check_pause_elapsed"`
}

func (m *Mirror) setDefaults() {
	*m = Mirror{HealthCheckInterval: DefaultCheckInterval, FailureLimit: DefaultFailureLimit, HealthCheckPauseElapsed: DefaultCheckPauseElapsed}
}

// ExternalBackend is nydus's external backend patch (kept as given).
type ExternalBackend struct {
	Patch  map[string]string `cfg:"patch"`
	Kind   string            `cfg:"type"`
	Config map[string]string `cfg:"config"`
}

// Cache configures the local blob cache. Type is "blobcache" (alias
// "filecache"), "fscache", or "" / "dummycache" for none.
type Cache struct {
	Type string `cfg:"type"`
	// Compressed caches chunks as stored in the blob instead of uncompressed.
	Compressed bool `cfg:"compressed"`
	// Validate re-checks digests of data read from the cache.
	Validate  bool       `cfg:"validate"`
	Prefetch  Prefetch   `cfg:"prefetch"`
	FileCache *FileCache `cfg:"filecache"`
	FsCache   *FsCache   `cfg:"fscache"`
}

func (c *Cache) setDefaults() { c.Prefetch.setDefaults() }

// WorkDir is the cache directory of the configured cache type ("" if none).
func (c *Cache) WorkDir() string {
	switch {
	case c.Type == "fscache" && c.FsCache != nil:
		return c.FsCache.WorkDir
	case (c.Type == "blobcache" || c.Type == "filecache") && c.FileCache != nil:
		return c.FileCache.WorkDir
	}
	return ""
}

// FileCache is the blobcache/filecache settings.
type FileCache struct {
	WorkDir                    string `cfg:"work_dir"`
	DisableIndexedMap          bool   `cfg:"disable_indexed_map"`
	EnableEncryption           bool   `cfg:"enable_encryption"`
	EnableConvergentEncryption bool   `cfg:"enable_convergent_encryption"`
	EncryptionKey              string `cfg:"encryption_key"`
}

func (f *FileCache) setDefaults() { f.WorkDir = DefaultWorkDir }

// FsCache is the fscache settings.
type FsCache struct {
	WorkDir string `cfg:"work_dir"`
}

func (f *FsCache) setDefaults() { f.WorkDir = DefaultWorkDir }

// Prefetch configures background prefetch (v2 names; v1 "fs_prefetch"
// uses threads_count, merging_size and bandwidth_rate).
type Prefetch struct {
	Enable       bool `cfg:"enable"`
	ThreadsCount int  `cfg:"threads"`
	// BatchSize is the most bytes merged into one backend request.
	BatchSize int `cfg:"batch_size"`
	// BandwidthLimit is in bytes per second; 0 is unlimited.
	BandwidthLimit uint32 `cfg:"bandwidth_limit"`
	PrefetchAll    bool   `cfg:"prefetch_all"`
	StreamPrefetch bool   `cfg:"stream_prefetch"`
}

func (p *Prefetch) setDefaults() {
	*p = Prefetch{ThreadsCount: DefaultPrefetchThreads, BatchSize: DefaultBatchSize}
}

// Rafs configures the filesystem.
type Rafs struct {
	Mode string `cfg:"mode"`
	// BatchSize amplifies user reads to this many bytes (v1 "amplify_io").
	BatchSize int `cfg:"batch_size"`
	// Validate checks chunk digests on every read (v1 "digest_validate").
	Validate        bool     `cfg:"validate"`
	EnableXattr     bool     `cfg:"enable_xattr"`
	IOStatsFiles    bool     `cfg:"iostats_files"`
	AccessPattern   bool     `cfg:"access_pattern"`
	LatestReadFiles bool     `cfg:"latest_read_files"`
	Prefetch        Prefetch `cfg:"prefetch"`
	// EntryTimeout and AttrTimeout are how many seconds the kernel may
	// cache a FUSE/virtio-fs lookup and attributes of the image (rafsd's
	// keys: nydusd hard-codes 2^32 s; 0 makes the kernel ask every time).
	EntryTimeout int `cfg:"entry_timeout"`
	AttrTimeout  int `cfg:"attr_timeout"`
}

func (r *Rafs) setDefaults() {
	*r = Rafs{Mode: DefaultMode, BatchSize: DefaultBatchSize, EntryTimeout: DefaultTimeout, AttrTimeout: DefaultTimeout}
	r.Prefetch.setDefaults()
}

// Overlay is the writable-layer configuration.
type Overlay struct {
	UpperDir string `cfg:"upper_dir"`
	WorkDir  string `cfg:"work_dir"`
}

// Parse parses a daemon config: v1 JSON, v2 JSON ("version": 2), v2 TOML,
// or any of those JSON-encoded as a string (how the daemon API passes a
// mount's config). It fills nydusd's defaults and validates the result.
func Parse(data []byte) (*Config, error) {
	cfg, err := parse(data, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return cfg, nil
}

func parse(data []byte, depth int) (*Config, error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return nil, errors.New("empty config")
	}
	switch trimmed[0] {
	case '"':
		if depth > 0 {
			return nil, errors.New("config string nested in a string")
		}
		var s string
		if err := json.Unmarshal(trimmed, &s); err != nil {
			return nil, fmt.Errorf("config string: %w", err)
		}
		return parse([]byte(s), depth+1)
	case '{':
		var tree map[string]any
		dec := json.NewDecoder(bytes.NewReader(trimmed))
		dec.UseNumber()
		if err := dec.Decode(&tree); err != nil {
			return nil, fmt.Errorf("json: %w", err)
		}
		if dec.More() {
			return nil, errors.New("json: trailing data after the config object")
		}
		if _, ok := tree["version"]; ok {
			return parseV2(tree)
		}
		return parseV1(tree)
	}
	var tree map[string]any
	if err := toml.Unmarshal(trimmed, &tree); err != nil {
		return nil, fmt.Errorf("toml: %w", err)
	}
	return parseV2(tree)
}

func parseV2(tree map[string]any) (*Config, error) {
	cfg := &Config{}
	if err := decodeInto("", tree, cfg); err != nil {
		return nil, err
	}
	if cfg.Version != 2 {
		return nil, fmt.Errorf("version: %d unsupported, want 2", cfg.Version)
	}
	return finish(cfg)
}

// v1 (legacy JSON) layout.
type v1Config struct {
	Device          v1Device   `cfg:"device"`
	Mode            string     `cfg:"mode"`
	DigestValidate  bool       `cfg:"digest_validate"`
	IOStatsFiles    bool       `cfg:"iostats_files"`
	FsPrefetch      v1Prefetch `cfg:"fs_prefetch"`
	EnableXattr     bool       `cfg:"enable_xattr"`
	AccessPattern   bool       `cfg:"access_pattern"`
	LatestReadFiles bool       `cfg:"latest_read_files"`
	AmplifyIO       int        `cfg:"amplify_io"`
	EntryTimeout    int        `cfg:"entry_timeout"`
	AttrTimeout     int        `cfg:"attr_timeout"`
}

func (c *v1Config) setDefaults() {
	c.Mode = DefaultMode
	c.AmplifyIO = DefaultBatchSize
	c.EntryTimeout, c.AttrTimeout = DefaultTimeout, DefaultTimeout
	c.FsPrefetch.setDefaults()
}

type v1Device struct {
	ID               string            `cfg:"id"`
	Backend          v1Backend         `cfg:"backend"`
	ExternalBackends []ExternalBackend `cfg:"external_backends"`
	Cache            v1Cache           `cfg:"cache"`
}

type v1Backend struct {
	Type   string `cfg:"type"`
	Config any    `cfg:"config"`
}

type v1Cache struct {
	Type       string `cfg:"type"`
	Compressed bool   `cfg:"compressed"`
	Config     any    `cfg:"config"`
	Validate   bool   `cfg:"validate"`
}

type v1Prefetch struct {
	Enable         bool   `cfg:"enable"`
	ThreadsCount   int    `cfg:"threads_count"`
	MergingSize    int    `cfg:"merging_size"`
	BandwidthRate  uint32 `cfg:"bandwidth_rate"`
	PrefetchAll    bool   `cfg:"prefetch_all"`
	StreamPrefetch bool   `cfg:"stream_prefetch"`
}

func (p *v1Prefetch) setDefaults() {
	*p = v1Prefetch{ThreadsCount: DefaultPrefetchThreads, MergingSize: DefaultBatchSize, PrefetchAll: true}
}

func parseV1(tree map[string]any) (*Config, error) {
	var v1 v1Config
	v1.setDefaults()
	if err := decodeInto("", tree, &v1); err != nil {
		return nil, err
	}
	if _, ok := tree["device"]; !ok {
		return nil, errors.New("device: missing (a v1 config needs device.backend)")
	}
	be, err := decodeBackendV1("device.backend", v1.Device.Backend.Type, v1.Device.Backend.Config)
	if err != nil {
		return nil, err
	}
	c := v1.Device.Cache
	cache, err := decodeCacheV1("device.cache", c.Type, c.Compressed, c.Validate, c.Config)
	if err != nil {
		return nil, err
	}
	fp := v1.FsPrefetch
	rafs := &Rafs{
		Mode:            v1.Mode,
		BatchSize:       v1.AmplifyIO,
		Validate:        v1.DigestValidate,
		EnableXattr:     v1.EnableXattr,
		IOStatsFiles:    v1.IOStatsFiles,
		AccessPattern:   v1.AccessPattern,
		LatestReadFiles: v1.LatestReadFiles,
		EntryTimeout:    v1.EntryTimeout,
		AttrTimeout:     v1.AttrTimeout,
		Prefetch: Prefetch{
			Enable: fp.Enable, ThreadsCount: fp.ThreadsCount, BatchSize: fp.MergingSize,
			BandwidthLimit: fp.BandwidthRate, PrefetchAll: fp.PrefetchAll, StreamPrefetch: fp.StreamPrefetch,
		},
	}
	// As nydusd: the filesystem prefetch settings drive blob prefetch too.
	if !cache.Prefetch.Enable && rafs.Prefetch.Enable {
		cache.Prefetch = rafs.Prefetch
	}
	return finish(&Config{
		Version: 1, ID: v1.Device.ID, Backend: be, ExternalBackends: v1.Device.ExternalBackends,
		Cache: cache, Rafs: rafs,
	})
}

// decodeBackendV1 decodes a legacy {type, config} backend; path names
// the config object in errors.
func decodeBackendV1(path, typ string, tree any) (*Backend, error) {
	be := &Backend{Type: typ}
	bp := path + ".config"
	if tree == nil {
		tree = map[string]any{}
	}
	var err error
	switch typ {
	case "localfs":
		err = decodeInto(bp, tree, &be.LocalFS)
	case "registry":
		err = decodeInto(bp, tree, &be.Registry)
	case "oss":
		err = decodeInto(bp, tree, &be.OSS)
	case "s3":
		err = decodeInto(bp, tree, &be.S3)
	case "localdisk":
		err = decodeInto(bp, tree, &be.LocalDisk)
	case "http-proxy":
		err = decodeInto(bp, tree, &be.HTTPProxy)
	case "":
		return nil, fmt.Errorf("%s.type: missing", path)
	default:
		return nil, fmt.Errorf("%s.type: unsupported backend type %q", path, typ)
	}
	if err != nil {
		return nil, err
	}
	return be, nil
}

// decodeCacheV1 decodes a legacy {type, config} cache.
func decodeCacheV1(path, typ string, compressed, validate bool, tree any) (*Cache, error) {
	cache := &Cache{Type: typ, Compressed: compressed, Validate: validate}
	cache.Prefetch.setDefaults()
	cp := path + ".config"
	if tree == nil {
		tree = map[string]any{}
	}
	var err error
	switch typ {
	case "blobcache", "filecache":
		err = decodeInto(cp, tree, &cache.FileCache)
	case "fscache":
		err = decodeInto(cp, tree, &cache.FsCache)
	case "", "dummycache":
	default:
		return nil, fmt.Errorf("%s.type: unsupported cache type %q", path, typ)
	}
	if err != nil {
		return nil, err
	}
	return cache, nil
}

// finish fills absent sections and checks what nydusd's validate() checks.
func finish(cfg *Config) (*Config, error) {
	if cfg.Backend == nil {
		cfg.Backend = &Backend{}
	}
	if cfg.Cache == nil {
		cfg.Cache = &Cache{}
		cfg.Cache.setDefaults()
	}
	if cfg.Rafs == nil {
		cfg.Rafs = &Rafs{}
		cfg.Rafs.setDefaults()
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

func (cfg *Config) validate() error {
	b := cfg.Backend
	switch b.Type {
	case "localfs":
		if b.LocalFS == nil || (b.LocalFS.Dir == "" && b.LocalFS.BlobFile == "") {
			return errors.New("backend.localfs: needs dir or blob_file")
		}
	case "registry":
		r := b.Registry
		if r == nil || r.Host == "" || r.Repo == "" {
			return errors.New("backend.registry: needs host and repo")
		}
		if r.Scheme != "http" && r.Scheme != "https" {
			return fmt.Errorf("backend.registry.scheme: %q, want http or https", r.Scheme)
		}
		if r.BlobURLScheme != "" && r.BlobURLScheme != "http" && r.BlobURLScheme != "https" {
			return fmt.Errorf("backend.registry.blob_url_scheme: %q, want http or https", r.BlobURLScheme)
		}
		if r.Proxy.URL != "" && len(r.Mirrors) > 0 {
			return errors.New("backend.registry: proxy and mirrors cannot be configured at the same time")
		}
		for i, m := range r.Mirrors {
			if !strings.HasPrefix(m.Host, "http://") && !strings.HasPrefix(m.Host, "https://") {
				return fmt.Errorf("backend.registry.mirrors[%d].host: %q, want an http(s) URL", i, m.Host)
			}
		}
	case "oss":
		if b.OSS == nil || b.OSS.Endpoint == "" || b.OSS.BucketName == "" {
			return errors.New("backend.oss: needs endpoint and bucket_name")
		}
	case "s3":
		if b.S3 == nil || b.S3.Region == "" || b.S3.BucketName == "" {
			return errors.New("backend.s3: needs region and bucket_name")
		}
	case "localdisk":
		if b.LocalDisk == nil || b.LocalDisk.DevicePath == "" {
			return errors.New("backend.localdisk: needs device_path")
		}
	case "http-proxy":
		if b.HTTPProxy == nil || b.HTTPProxy.Addr == "" {
			return errors.New("backend.http-proxy: needs addr")
		}
	case "":
		// A config without a backend is valid for API-driven mounts that
		// supply their own; storage.New rejects it.
	default:
		return fmt.Errorf("backend.type: unsupported backend type %q", b.Type)
	}
	c := cfg.Cache
	switch c.Type {
	case "blobcache", "filecache":
		if c.FileCache == nil {
			c.FileCache = &FileCache{WorkDir: DefaultWorkDir}
		}
		if c.FileCache.WorkDir == "" {
			return errors.New("cache.filecache.work_dir: empty")
		}
	case "fscache":
		if c.FsCache == nil {
			c.FsCache = &FsCache{WorkDir: DefaultWorkDir}
		}
		if c.FsCache.WorkDir == "" {
			return errors.New("cache.fscache.work_dir: empty")
		}
	case "", "dummycache":
	default:
		return fmt.Errorf("cache.type: unsupported cache type %q", c.Type)
	}
	r := cfg.Rafs
	if r.Mode != "direct" && r.Mode != "cached" {
		return fmt.Errorf("rafs.mode: %q, want direct or cached", r.Mode)
	}
	if r.BatchSize < 0 || r.BatchSize > MaxBatchSize {
		return fmt.Errorf("rafs.batch_size: %d out of range [0, %#x]", r.BatchSize, MaxBatchSize)
	}
	if r.EntryTimeout < 0 || r.EntryTimeout > MaxTimeout {
		return fmt.Errorf("rafs.entry_timeout: %d out of range [0, %d] seconds", r.EntryTimeout, MaxTimeout)
	}
	if r.AttrTimeout < 0 || r.AttrTimeout > MaxTimeout {
		return fmt.Errorf("rafs.attr_timeout: %d out of range [0, %d] seconds", r.AttrTimeout, MaxTimeout)
	}
	for _, np := range []struct {
		name string
		p    *Prefetch
	}{{"rafs.prefetch", &r.Prefetch}, {"cache.prefetch", &c.Prefetch}} {
		name, p := np.name, np.p
		if !p.Enable {
			continue
		}
		if p.BatchSize < 0 || p.BatchSize > MaxBatchSize {
			return fmt.Errorf("%s.batch_size: %d out of range [0, %#x]", name, p.BatchSize, MaxBatchSize)
		}
		if p.ThreadsCount < 1 || p.ThreadsCount > 1024 {
			return fmt.Errorf("%s.threads: %d out of range [1, 1024]", name, p.ThreadsCount)
		}
	}
	return nil
}

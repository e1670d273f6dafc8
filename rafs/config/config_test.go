package config

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// nydusV1 is misc/configs/nydusd-config.json of nydus, plus a few fields.
const nydusV1 = `{
  "device": {
    "backend": {
      "type": "registry",
      "config": {
        "host": "127.0.0.1:5000", "repo": "library/busybox", "scheme": "http",
        "auth": "dXNlcjpwYXNz", "registry_token": "tok",
        "timeout": 5,
        "connect_timeout": 5,
        "retry_limit": 2,
        "skip_verify": false,
        "ca_cert_files": ["/etc/ssl/certs/my-ca.pem"],
        "blob_redirected_host": "redirect.example.com",
        "mirrors": [{"host": "http://127.0.0.1:65001", "headers": {"X-Dragonfly-Registry": "https://index.docker.io"}, "auth_through": true, "failure_limit": 2}]
      }
    },
    "cache": {
      "type": "blobcache",
      "config": {
        "work_dir": "/var/lib/nydus/cache"
      }
    }
  },
  "mode": "direct",
  "digest_validate": true,
  "iostats_files": false,
  "enable_xattr": true,
  "amplify_io": 131072,
  "fs_prefetch": {
    "enable": true,
    "threads_count": 4,
    "merging_size": 262144,
    "bandwidth_rate": 1048576
  }
}`

const v2TOML = `
version = 2
id = "my_id"

[backend]
type = "localfs"

[backend.localfs]
blob_file = "/tmp/nydus.blob.data"
dir = "/tmp"
alt_dirs = ["/var/nydus/cache"]

[cache]
type = "filecache"
compressed = true
validate = true

[cache.filecache]
work_dir = "/var/cache/rafsd"

[cache.prefetch]
enable = true
threads = 2
batch_size = 1000000
bandwidth_limit = 10000000

[rafs]
mode = "cached"
batch_size = 1000000
validate = true
enable_xattr = true

[rafs.prefetch]
enable = true
threads = 8
prefetch_all = true
`

func TestParseV1(t *testing.T) {
	cfg, err := Parse([]byte(nydusV1))
	if err != nil {
		t.Fatal(err)
	}
	r := cfg.Backend.Registry
	if cfg.Version != 1 || cfg.Backend.Type != "registry" || r == nil {
		t.Fatalf("backend = %+v", cfg.Backend)
	}
	if r.Host != "127.0.0.1:5000" || r.Repo != "library/busybox" || r.Scheme != "http" || r.Auth != "dXNlcjpwYXNz" ||
		r.RegistryToken != "tok" || r.RetryLimit != 2 || r.Timeout != 5 || r.BlobRedirectedHost != "redirect.example.com" {
		t.Errorf("registry = %+v", r)
	}
	// Defaults nydusd fills.
	if !r.Proxy.Fallback || r.Proxy.CheckInterval != 5 {
		t.Errorf("proxy defaults = %+v", r.Proxy)
	}
	if len(r.Mirrors) != 1 {
		t.Fatalf("mirrors = %+v", r.Mirrors)
	}
	m := r.Mirrors[0]
	if m.Host != "http://127.0.0.1:65001" || m.Headers["X-Dragonfly-Registry"] != "https://index.docker.io" || !m.AuthThrough ||
		m.FailureLimit != 2 || m.HealthCheckInterval != DefaultCheckInterval {
		t.Errorf("mirror = %+v", m)
	}
	if cfg.Cache.Type != "blobcache" || cfg.Cache.WorkDir() != "/var/lib/nydus/cache" {
		t.Errorf("cache = %+v", cfg.Cache)
	}
	rf := cfg.Rafs
	if rf.Mode != "direct" || !rf.Validate || !rf.EnableXattr || rf.BatchSize != 131072 {
		t.Errorf("rafs = %+v", rf)
	}
	want := Prefetch{Enable: true, ThreadsCount: 4, BatchSize: 262144, BandwidthLimit: 1 << 20, PrefetchAll: true}
	if rf.Prefetch != want || cfg.Cache.Prefetch != want {
		t.Errorf("prefetch = %+v / %+v, want %+v", rf.Prefetch, cfg.Cache.Prefetch, want)
	}
}

func TestParseV2TOML(t *testing.T) {
	cfg, err := Parse([]byte(v2TOML))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Version != 2 || cfg.ID != "my_id" || cfg.Backend.LocalFS == nil || cfg.Backend.LocalFS.Dir != "/tmp" ||
		len(cfg.Backend.LocalFS.AltDirs) != 1 {
		t.Errorf("backend = %+v", cfg.Backend)
	}
	c := cfg.Cache
	if c.Type != "filecache" || !c.Compressed || !c.Validate || c.WorkDir() != "/var/cache/rafsd" {
		t.Errorf("cache = %+v", c)
	}
	if c.Prefetch != (Prefetch{Enable: true, ThreadsCount: 2, BatchSize: 1000000, BandwidthLimit: 10000000}) {
		t.Errorf("cache.prefetch = %+v", c.Prefetch)
	}
	if cfg.Rafs.Mode != "cached" || cfg.Rafs.Prefetch.BatchSize != DefaultBatchSize || !cfg.Rafs.Prefetch.PrefetchAll {
		t.Errorf("rafs = %+v", cfg.Rafs)
	}
}

func TestParseForms(t *testing.T) {
	v1 := `{"device":{"backend":{"type":"localfs","config":{"dir":"/blobs"}}},"mode":"direct"}`
	quoted, _ := json.Marshal(v1)
	v2json := `{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/blobs"}}}`
	for name, in := range map[string]string{"v1": v1, "api string": string(quoted), "v2 json": v2json} {
		t.Run(name, func(t *testing.T) {
			cfg, err := Parse([]byte(in))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Backend.LocalFS == nil || cfg.Backend.LocalFS.Dir != "/blobs" {
				t.Fatalf("backend = %+v", cfg.Backend)
			}
			// Defaults when sections are absent.
			if cfg.Cache.Type != "" || cfg.Rafs.Mode != "direct" || cfg.Rafs.BatchSize != DefaultBatchSize {
				t.Errorf("cache %+v rafs %+v", cfg.Cache, cfg.Rafs)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"empty", "  ", "empty config"},
		{"bad json", `{"device":`, "json"},
		{"bad toml", "version = = 2", "toml"},
		{"unknown top v1", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"mdoe":"direct"}`, "mdoe: unknown field"},
		{"unknown backend field", `{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","timout":3}}}}`, "device.backend.config.timout: unknown field"},
		{"mistyped", `{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","timeout":"3"}}}}`, "device.backend.config.timeout: want an integer, got string"},
		{"negative", `{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","retry_limit":-1}}}}`, "device.backend.config.retry_limit: -1 out of range"},
		{"overflow u8", `{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","retry_limit":256}}}}`, "retry_limit: 256 out of range"},
		{"mirror field", `{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","mirrors":[{"host":"http://m","hdrs":{}}]}}}}`, "device.backend.config.mirrors[0].hdrs: unknown field"},
		{"mirror host", `{"device":{"backend":{"type":"registry","config":{"host":"h","repo":"r","mirrors":[{"host":"m:1"}]}}}}`, "mirrors[0].host"},
		{"backend type", `{"device":{"backend":{"type":"ftp","config":{}}}}`, `unsupported backend type "ftp"`},
		{"no device", `{"mode":"direct"}`, "device: missing"},
		{"cache type", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}},"cache":{"type":"ram"}}}`, `unsupported cache type "ram"`},
		{"cache field", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}},"cache":{"type":"blobcache","config":{"workdir":"/x"}}}}`, "device.cache.config.workdir: unknown field"},
		{"prefetch threads", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"fs_prefetch":{"enable":true,"threads_count":0}}`, "prefetch.threads: 0 out of range"},
		{"fraction", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"amplify_io":1.5}`, "amplify_io: want an integer"},
		{"mode", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"mode":"fast"}`, "rafs.mode"},
		{"localfs empty", `{"device":{"backend":{"type":"localfs","config":{}}}}`, "needs dir or blob_file"},
		{"v2 version", "version = 3", "version: 3 unsupported"},
		// nydus's own sample v2 TOML misspells [backend.registy]: strict
		// parsing names it instead of ignoring it.
		{"v2 typo", "version = 2\n[backend.registy]\nhost = \"x\"\n", "backend.registy: unknown field"},
		{"v2 type", "version = 2\n[rafs]\nvalidate = \"yes\"\n", "rafs.validate: want a boolean, got string"},
		{"entry_timeout", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"entry_timeout":-1}`, "rafs.entry_timeout: -1 out of range"},
		{"v2 attr_timeout", "version = 2\n[backend]\ntype = \"localfs\"\n[backend.localfs]\ndir = \"/b\"\n[rafs]\nattr_timeout = 4294967297\n", "rafs.attr_timeout: 4294967297 out of range"},
		{"nested string", `"\"{}\""`, "nested"},
		{"trailing", `{"device":{}} {}`, "trailing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.in))
			if err == nil {
				t.Fatalf("Parse(%s) = nil error, want %q", tt.in, tt.want)
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Parse error %q, want it to contain %q", err, tt.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{nydusV1, v2TOML, `"{\"device\":{}}"`, `{"version":2}`, `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			return
		}
		if cfg.Backend == nil || cfg.Cache == nil || cfg.Rafs == nil {
			t.Fatalf("Parse left a section nil: %+v", cfg)
		}
	})
}

// nydusEntry is misc/configs/nydusd-boostrap-blob-cache-entry.json of nydus.
const nydusEntry = `{
  "type": "bootstrap",
  "id": "bootstrap1",
  "domain_id": "userid1",
  "config": {
    "id": "factory1",
    "backend_type": "localfs",
    "backend_config": {
      "dir": "/tmp/nydus"
    },
    "cache_type": "fscache",
    "cache_config": {
      "work_dir": "/tmp/nydus"
    },
    "metadata_file": "/tmp/nydus/bootstrap1"
  }
}`

func TestParseBlobCacheEntry(t *testing.T) {
	e, err := ParseBlobCacheEntry([]byte(nydusEntry))
	if err != nil {
		t.Fatal(err)
	}
	if e.Type != EntryBootstrap || e.ID != "bootstrap1" || e.DomainID != "userid1" || e.MetadataPath != "/tmp/nydus/bootstrap1" {
		t.Errorf("entry %+v", e)
	}
	if e.Config.Backend.LocalFS.Dir != "/tmp/nydus" || e.Config.Cache.Type != "fscache" || e.Config.Cache.WorkDir() != "/tmp/nydus" ||
		!e.Config.Cache.Prefetch.PrefetchAll || e.Config.Rafs.Mode != "direct" {
		t.Errorf("config %+v / %+v", e.Config.Backend, e.Config.Cache)
	}
	v2 := `{"type":"datablob","id":"b1","config_v2":{"version":2,"id":"f","backend":{"type":"registry","registry":{"host":"h","repo":"r"}},
		"cache":{"type":"fscache","fscache":{"work_dir":"/w"}},"metadata_path":"/m"}}`
	e, err = ParseBlobCacheEntry([]byte(v2))
	if err != nil {
		t.Fatal(err)
	}
	if e.Type != EntryDataBlob || e.MetadataPath != "/m" || e.Config.Backend.Registry.Scheme != "https" || e.Config.Cache.WorkDir() != "/w" {
		t.Errorf("v2 entry %+v %+v", e, e.Config.Backend.Registry)
	}
	for _, tc := range []struct{ in, want string }{
		{`{"type":"blob","id":"x","config":{}}`, `type: "blob"`},
		{`{"type":"bootstrap","config":{}}`, "id: missing"},
		{`{"type":"bootstrap","id":"x"}`, "config or config_v2: missing"},
		{`{"type":"bootstrap","id":"x","config":{"backend_type":"localfs","backend_config":{"dri":"/x"}}}`, "config.backend.config.dri: unknown field"},
		{`{"type":"bootstrap","id":"x","config":{"backend_type":"localfs","backend_config":{"dir":"/x"}}}`, "cache: missing"},
		{`{"type":"bootstrap","id":"x","config_v2":{"version":1}}`, "config_v2.version"},
		{`{"type":"bootstrap","id":"x","extra":1}`, "extra: unknown field"},
	} {
		if _, err := ParseBlobCacheEntry([]byte(tc.in)); err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseBlobCacheEntry(%s) = %v, want %q", tc.in, err, tc.want)
		}
	}
}

func FuzzParseBlobCacheEntry(f *testing.F) {
	f.Add([]byte(nydusEntry))
	f.Add([]byte(`{"type":"datablob","id":"b1","config_v2":{"version":2,"backend":{"type":"localfs","localfs":{"dir":"/b"}},"cache":{"type":"fscache"}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := ParseBlobCacheEntry(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			return
		}
		if e.Config == nil || e.Config.Backend == nil || e.Config.Cache == nil || e.Config.Rafs == nil {
			t.Fatalf("incomplete entry %+v", e)
		}
	})
}

// TestSnapshotterConfig parses the config nydus-snapshotter v0.16.1 writes
// for a fusedev daemon (pkg daemonconfig: one BackendConfig for every
// backend type, so localfs's "readahead" is always there).
func TestSnapshotterConfig(t *testing.T) {
	s := `{"device":{"id":"abc","backend":{"type":"registry","config":{"readahead":false,"host":"127.0.0.1:5000","repo":"a/b","scheme":"http","proxy":{"fallback":false},"timeout":5,"connect_timeout":5,"retry_limit":2}},"cache":{"type":"blobcache","config":{"work_dir":"/tmp/x","disable_indexed_map":false}}},"mode":"direct","digest_validate":true,"enable_xattr":true,"fs_prefetch":{"enable":false,"prefetch_all":false}}`
	c, err := Parse([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	if c.Backend.Registry == nil || c.Backend.Registry.Host != "127.0.0.1:5000" || c.Backend.Registry.Scheme != "http" {
		t.Fatalf("registry backend: %+v", c.Backend)
	}
}

// TestParseTimeouts: rafsd's entry_timeout/attr_timeout keys, top level in
// v1 and under [rafs] in v2; absent means DefaultTimeout.
func TestParseTimeouts(t *testing.T) {
	for _, tt := range []struct {
		name, in     string
		entry, attrs int
	}{
		{"v1 default", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}}}`, DefaultTimeout, DefaultTimeout},
		{"v1 set", `{"device":{"backend":{"type":"localfs","config":{"dir":"/b"}}},"entry_timeout":0,"attr_timeout":3600}`, 0, 3600},
		{"v2 default", "version = 2\n[backend]\ntype = \"localfs\"\n[backend.localfs]\ndir = \"/b\"\n[rafs]\nmode = \"direct\"\n", DefaultTimeout, DefaultTimeout},
		{"v2 set", "version = 2\n[backend]\ntype = \"localfs\"\n[backend.localfs]\ndir = \"/b\"\n[rafs]\nentry_timeout = 60\nattr_timeout = 0\n", 60, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse([]byte(tt.in))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Rafs.EntryTimeout != tt.entry || cfg.Rafs.AttrTimeout != tt.attrs {
				t.Fatalf("entry_timeout %d attr_timeout %d, want %d %d", cfg.Rafs.EntryTimeout, cfg.Rafs.AttrTimeout, tt.entry, tt.attrs)
			}
		})
	}
}

package storage

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the fetcher's Prometheus collectors. Several fetchers may
// share one Registerer: they then share the collectors.
type metrics struct {
	backendRequests *prometheus.CounterVec   // backend, endpoint, result
	backendBytes    *prometheus.CounterVec   // backend, endpoint
	backendLatency  *prometheus.HistogramVec // backend, endpoint
	retries         *prometheus.CounterVec   // backend
	failovers       *prometheus.CounterVec   // backend, from
	cacheHits       prometheus.Counter
	cacheMisses     prometheus.Counter
	cacheWriteFails prometheus.Counter
	digestFailures  *prometheus.CounterVec // source: cache|backend
	readErrors      prometheus.Counter
	prefetchQueued  prometheus.Counter
	prefetchDone    prometheus.Counter
	prefetchBytes   prometheus.Counter
	readaheads      prometheus.Counter
	splits          prometheus.Counter
	cancelled       prometheus.Counter
}

func register[T prometheus.Collector](reg prometheus.Registerer, c T) T {
	if reg == nil {
		return c
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(T); ok {
				return existing
			}
		}
		// A clashing collector of another type: keep ours unregistered
		// rather than fail the mount.
	}
	return c
}

func newMetrics(reg prometheus.Registerer) *metrics {
	const ns = "rafsd"
	return &metrics{
		backendRequests: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "backend", Name: "requests_total",
			Help: "Backend read requests by backend type, endpoint (origin, mirror host, proxy) and result.",
		}, []string{"backend", "endpoint", "result"})),
		backendBytes: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "backend", Name: "read_bytes_total",
			Help: "Bytes read from the backend.",
		}, []string{"backend", "endpoint"})),
		backendLatency: register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: "backend", Name: "request_duration_seconds",
			Help:    "Latency of backend read requests.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"backend", "endpoint"})),
		retries: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "backend", Name: "retries_total",
			Help: "Retried backend requests.",
		}, []string{"backend"})),
		failovers: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "backend", Name: "mirror_failovers_total",
			Help: "Requests that moved on from a failed mirror or proxy.",
		}, []string{"backend", "from"})),
		cacheHits: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "blobcache", Name: "hits_total", Help: "Chunk reads served from the blob cache.",
		})),
		cacheMisses: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "blobcache", Name: "misses_total", Help: "Chunk reads that had to fetch.",
		})),
		cacheWriteFails: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "blobcache", Name: "write_errors_total",
			Help: "Verified chunks the blob cache could not store (disk full, I/O error): handed out from memory and fetched again when next read.",
		})),
		digestFailures: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "chunk", Name: "digest_failures_total",
			Help: "Chunks whose bytes failed decompression or their digest check, by where they came from.",
		}, []string{"source"})),
		readErrors: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "chunk", Name: "read_errors_total", Help: "Chunk reads failed with EIO.",
		})),
		prefetchQueued: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "prefetch", Name: "chunks_queued_total", Help: "Chunks queued for prefetch.",
		})),
		prefetchDone: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "prefetch", Name: "chunks_done_total", Help: "Queued prefetch chunks that are now cached (fetched or found cached).",
		})),
		prefetchBytes: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "prefetch", Name: "bytes_total", Help: "Compressed bytes fetched by prefetch.",
		})),
		readaheads: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "fetch", Name: "readahead_windows_total", Help: "Read-ahead windows started by sequential readers reaching a marker.",
		})),
		splits: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "fetch", Name: "stream_splits_total", Help: "Streams split because a reader wanted a chunk far beyond their position.",
		})),
		cancelled: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: "fetch", Name: "readahead_cancelled_total", Help: "Read-ahead streams stopped before their end because their reader had left.",
		})),
	}
}

// stats are the counters of the nydusd-style JSON snapshots.
type stats struct {
	readCount, readErrors, readBytes, readLatencyMillis atomic.Uint64
	total, hits, partialHits                            atomic.Uint64
	prefetchBytes, prefetchRequests, prefetchUnmerged   atomic.Uint64
	prefetchMillis                                      atomic.Uint64
	prefetchWorkers                                     atomic.Int64
	prefetchBegin, prefetchEnd                          atomic.Int64 // unix millis
	digestFailures                                      atomic.Uint64
	readaheads                                          atomic.Uint64
}

// BackendMetrics is nydusd's /api/v1/metrics/backend answer
// (nydus-utils metrics.rs BackendMetrics), without the histograms.
type BackendMetrics struct {
	BackendType                      string `json:"backend_type"`
	ReadCount                        uint64 `json:"read_count"`
	ReadErrors                       uint64 `json:"read_errors"`
	ReadAmountTotal                  uint64 `json:"read_amount_total"`
	ReadCumulativeLatencyMillisTotal uint64 `json:"read_cumulative_latency_millis_total"`
}

// BlobcacheMetrics is nydusd's /api/v1/metrics/blobcache answer
// (nydus-utils metrics.rs BlobcacheMetrics).
type BlobcacheMetrics struct {
	UnderlyingFiles              []string `json:"underlying_files"`
	StorePath                    string   `json:"store_path"`
	PartialHits                  uint64   `json:"partial_hits"`
	WholeHits                    uint64   `json:"whole_hits"`
	Total                        uint64   `json:"total"`
	EntriesCount                 uint64   `json:"entries_count"`
	PrefetchDataAmount           uint64   `json:"prefetch_data_amount"`
	PrefetchRequestsCount        uint64   `json:"prefetch_requests_count"`
	PrefetchWorkers              int64    `json:"prefetch_workers"`
	PrefetchUnmergedChunks       uint64   `json:"prefetch_unmerged_chunks"`
	PrefetchCumulativeTimeMillis uint64   `json:"prefetch_cumulative_time_millis"`
	PrefetchBeginTimeSecs        int64    `json:"prefetch_begin_time_secs"`
	PrefetchBeginTimeMillis      int64    `json:"prefetch_begin_time_millis"`
	PrefetchEndTimeSecs          int64    `json:"prefetch_end_time_secs"`
	PrefetchEndTimeMillis        int64    `json:"prefetch_end_time_millis"`
	BufferedBackendSize          uint64   `json:"buffered_backend_size"`
	DataAllReady                 bool     `json:"data_all_ready"`
	// DigestFailures is rafsd's addition: chunks that failed their check.
	DigestFailures uint64 `json:"digest_failures"`
}

// BackendMetrics returns the snapshot nydusd's /api/v1/metrics/backend returns.
func (f *Fetcher) BackendMetrics() BackendMetrics {
	s := &f.stats
	return BackendMetrics{
		BackendType: f.be.Type(), ReadCount: s.readCount.Load(), ReadErrors: s.readErrors.Load(),
		ReadAmountTotal: s.readBytes.Load(), ReadCumulativeLatencyMillisTotal: s.readLatencyMillis.Load(),
	}
}

// BlobcacheMetrics returns the snapshot nydusd's /api/v1/metrics/blobcache returns.
func (f *Fetcher) BlobcacheMetrics() BlobcacheMetrics {
	s := &f.stats
	m := BlobcacheMetrics{
		UnderlyingFiles: []string{}, PartialHits: s.partialHits.Load(), WholeHits: s.hits.Load(), Total: s.total.Load(),
		PrefetchDataAmount: s.prefetchBytes.Load(), PrefetchRequestsCount: s.prefetchRequests.Load(),
		PrefetchWorkers: s.prefetchWorkers.Load(), PrefetchUnmergedChunks: s.prefetchUnmerged.Load(),
		PrefetchCumulativeTimeMillis: s.prefetchMillis.Load(), DigestFailures: s.digestFailures.Load(),
	}
	if b := s.prefetchBegin.Load(); b != 0 {
		m.PrefetchBeginTimeSecs, m.PrefetchBeginTimeMillis = b/1000, b%1000
	}
	if e := s.prefetchEnd.Load(); e != 0 {
		m.PrefetchEndTimeSecs, m.PrefetchEndTimeMillis = e/1000, e%1000
	}
	if f.store != nil {
		m.StorePath = f.store.Dir()
	}
	allReady := true
	f.mu.Lock()
	for _, bs := range f.blobs {
		if bs.cache == nil {
			allReady = false
			continue
		}
		m.UnderlyingFiles = append(m.UnderlyingFiles, bs.cache.DataPath())
		ready, total := bs.cache.Ready()
		m.EntriesCount += uint64(ready)
		if ready < total {
			allReady = false
		}
	}
	f.mu.Unlock()
	m.DataAllReady = allReady && len(m.UnderlyingFiles) > 0
	return m
}

func (f *Fetcher) backendHook(endpoint string, n int, d time.Duration, err error) {
	result := "ok"
	f.stats.readCount.Add(1)
	if err != nil {
		result = "error"
		f.stats.readErrors.Add(1)
	}
	f.stats.readBytes.Add(uint64(n))
	f.stats.readLatencyMillis.Add(uint64(d.Milliseconds()))
	bt := f.beType
	f.m.backendRequests.WithLabelValues(bt, endpoint, result).Inc()
	f.m.backendBytes.WithLabelValues(bt, endpoint).Add(float64(n))
	f.m.backendLatency.WithLabelValues(bt, endpoint).Observe(d.Seconds())
}

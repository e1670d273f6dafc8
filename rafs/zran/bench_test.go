package zran

import (
	"bytes"
	"compress/gzip"
	"io"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// BenchmarkZranScan indexes a 32 MiB gzip layer and reports the time
// against plain compress/gzip decompression of the same stream (the
// baseline every conversion pays anyway), plus the checkpoint table size.
func BenchmarkZranScan(b *testing.B) {
	data := testData(21, 32<<20)
	gz := goGzip(b, data, gzip.DefaultCompression)
	var scan, plain time.Duration
	var ix *Index
	for range b.N {
		t0 := time.Now()
		zr, _ := gzip.NewReader(bytes.NewReader(gz))
		if _, err := io.Copy(io.Discard, zr); err != nil {
			b.Fatal(err)
		}
		plain += time.Since(t0)
		t0 = time.Now()
		var err error
		if ix, err = Scan(bytes.NewReader(gz), 0); err != nil {
			b.Fatal(err)
		}
		scan += time.Since(t0)
	}
	b.ReportMetric(float64(len(data))/(1<<20)/scan.Seconds()*float64(b.N), "scan-MiB/s")
	b.ReportMetric(scan.Seconds()/plain.Seconds(), "scan/gunzip")
	b.ReportMetric(float64(len(ix.Checkpoints)), "checkpoints")
	b.ReportMetric(float64(len(data))/float64(len(ix.Checkpoints))/(1<<10), "KiB/checkpoint")
}

// BenchmarkZranChunkRead reads every 1 MiB chunk of a layer through its
// checkpoint and reports the time against decompressing the same chunks
// stored as zstd (a regular RAFS blob), and the compressed bytes fetched
// against the layer size.
func BenchmarkZranChunkRead(b *testing.B) {
	data := testData(22, 16<<20)
	gz := goGzip(b, data, gzip.DefaultCompression)
	spans := tile(int64(len(data)), 1<<20)
	var starts []int64
	for _, s := range spans {
		starts = append(starts, s.Off)
	}
	ix, err := ScanFor(bytes.NewReader(gz), 0, starts)
	if err != nil {
		b.Fatal(err)
	}
	blob, zcs := attach(b, data, gz, ix, spans)
	zblob := &rafs.Blob{ID: "zstd", Digester: codec.SHA256, Compressor: codec.Zstd}
	type pair struct {
		zc, sc *rafs.Chunk
		stored []byte
	}
	var ps []pair
	var fetched int64
	for i, s := range spans {
		d := data[s.Off : s.Off+int64(s.Size)]
		dg := codec.SHA256.Sum(d)
		st, ok, err := codec.Compress(codec.Zstd, nil, d)
		if err != nil {
			b.Fatal(err)
		}
		ps = append(ps, pair{
			zc:     zcs[i],
			sc:     &rafs.Chunk{Digest: dg, CompressedSize: uint32(len(st)), UncompressedSize: s.Size, Compressed: ok},
			stored: st,
		})
		fetched += int64(zcs[i].CompressedSize)
	}
	var zt, st time.Duration
	for range b.N {
		for _, p := range ps {
			t0 := time.Now()
			if _, err := rafs.DecodeChunkBytes(blob, p.zc, gz[p.zc.CompressedOffset:p.zc.CompressedOffset+uint64(p.zc.CompressedSize)]); err != nil {
				b.Fatal(err)
			}
			zt += time.Since(t0)
			t0 = time.Now()
			if _, err := rafs.DecodeChunkBytes(zblob, p.sc, p.stored); err != nil {
				b.Fatal(err)
			}
			st += time.Since(t0)
		}
	}
	b.ReportMetric(zt.Seconds()/st.Seconds(), "zran/zstd-time")
	b.ReportMetric(float64(fetched)/float64(len(gz)), "fetched/layer")
}

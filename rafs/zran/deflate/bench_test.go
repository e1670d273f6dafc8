package deflate_test

import (
	"bytes"
	"compress/flate"
	"io"
	"testing"
	"time"

	"github.com/rafsd/rafsd/rafs/zran"
	"github.com/rafsd/rafsd/rafs/zran/deflate"
)

// BenchmarkInflate inflates 1 MiB from each block boundary of a zlib
// stream that is not on a byte with Inflate (what chunks of nydus-built
// images go through: contexts wherever zlib ended a block) and from each
// one on a byte with compress/flate (what contexts on a byte use), and
// reports the time per MiB against compress/flate.
func BenchmarkInflate(b *testing.B) {
	want := data(16 << 20)
	gz := zlibGzip(b, want)
	ix, err := zran.Scan(bytes.NewReader(gz), 0)
	if err != nil {
		b.Fatal(err)
	}
	var aligned, unaligned []zran.Block
	for _, bl := range ix.Blocks {
		if bl.Out+1<<20 > int64(len(want)) {
			continue
		}
		if bl.InBit%8 == 0 {
			aligned = append(aligned, bl)
		} else {
			unaligned = append(unaligned, bl)
		}
	}
	if len(aligned) == 0 || len(unaligned) == 0 {
		b.Fatalf("%d aligned, %d unaligned blocks", len(aligned), len(unaligned))
	}
	out := make([]byte, 1<<20)
	var own, std time.Duration
	for range b.N {
		for _, bl := range unaligned {
			in, bits, prev := at(gz, bl.InBit)
			dict := want[max(0, bl.Out-deflate.WindowSize):bl.Out]
			t0 := time.Now()
			if err := deflate.Inflate(in, bits, prev, dict, 0, out); err != nil {
				b.Fatal(err)
			}
			own += time.Since(t0)
		}
		for _, bl := range aligned {
			t0 := time.Now()
			fr := flate.NewReaderDict(bytes.NewReader(gz[bl.InBit/8:]), want[max(0, bl.Out-deflate.WindowSize):bl.Out])
			if _, err := io.ReadFull(fr, out); err != nil {
				b.Fatal(err)
			}
			std += time.Since(t0)
		}
	}
	perOwn, perStd := own.Seconds()/float64(len(unaligned)), std.Seconds()/float64(len(aligned))
	b.ReportMetric(perOwn/perStd, "unaligned/flate-time")
	b.ReportMetric(1/perOwn*float64(b.N), "unaligned-MiB/s")
}

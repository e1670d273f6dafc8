package deflate_test

import (
	"bytes"
	"compress/gzip"
	"errors"
	"math/rand/v2"
	"os/exec"
	"testing"

	"github.com/rafsd/rafsd/rafs/zran"
	"github.com/rafsd/rafsd/rafs/zran/deflate"
)

// data mixes text, random bytes, zeros and repeats, so that streams hold
// fixed, dynamic and stored blocks.
func data(n int) []byte {
	r := rand.New(rand.NewPCG(3, 9))
	var b bytes.Buffer
	words := []string{"usr", "lib", "bin", "linux", ".so", "\n", " ", "/", "config"}
	for b.Len() < n {
		switch r.IntN(3) {
		case 0:
			for range r.IntN(3000) {
				b.WriteString(words[r.IntN(len(words))])
			}
		case 1:
			p := make([]byte, r.IntN(70000))
			for i := range p {
				p[i] = byte(r.Uint32())
			}
			b.Write(p)
		default:
			b.Write(make([]byte, r.IntN(40000)))
		}
	}
	return b.Bytes()[:n]
}

// zlibGzip compresses with gzip(1) (zlib), whose blocks end at any bit.
func zlibGzip(t testing.TB, d []byte) []byte {
	cmd := exec.Command("gzip", "-c", "-6")
	cmd.Stdin = bytes.NewReader(d)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("gzip: %v", err)
	}
	return out
}

// at returns Inflate's inputs for a block starting at bit InBit of gz: the
// bytes from the next whole byte on, and the pending bits of the byte
// before (nydus's in_offset, ctx_bits, ctx_byte).
func at(gz []byte, inBit int64) (in []byte, bits uint8, prev byte) {
	k := inBit / 8
	if inBit%8 == 0 {
		return gz[k:], 0, 0
	}
	return gz[k+1:], uint8(8 - inBit%8), gz[k]
}

// TestInflateFromEveryBlock restarts at every block boundary, most of them
// not on a byte, with the window before it as dictionary, and compares a
// range of output with the original data.
func TestInflateFromEveryBlock(t *testing.T) {
	for name, gz := range map[string][]byte{
		"zlib": zlibGzip(t, data(3<<20)),
		"go": func() []byte {
			var b bytes.Buffer
			zw, _ := gzip.NewWriterLevel(&b, gzip.BestSpeed)
			zw.Write(data(3 << 20))
			zw.Close()
			return b.Bytes()
		}(),
	} {
		t.Run(name, func(t *testing.T) {
			want := data(3 << 20)
			ix, err := zran.Scan(bytes.NewReader(gz), 0)
			if err != nil {
				t.Fatal(err)
			}
			unaligned := 0
			for i, bl := range ix.Blocks {
				if bl.InBit%8 != 0 {
					unaligned++
				}
				in, bits, prev := at(gz, bl.InBit)
				dict := want[max(0, bl.Out-deflate.WindowSize):bl.Out]
				skip := int64(i % 5000)
				n := min(int64(100000), int64(len(want))-bl.Out-skip)
				if n <= 0 {
					continue
				}
				out := make([]byte, n)
				if err := deflate.Inflate(in, bits, prev, dict, skip, out); err != nil {
					t.Fatalf("block %d at bit %d: %v", i, bl.InBit, err)
				}
				if !bytes.Equal(out, want[bl.Out+skip:bl.Out+skip+n]) {
					t.Fatalf("block %d at bit %d: wrong bytes", i, bl.InBit)
				}
			}
			if unaligned == 0 {
				t.Fatalf("%d blocks, none unaligned: the test proves nothing", len(ix.Blocks))
			}
			t.Logf("%d blocks, %d not on a byte", len(ix.Blocks), unaligned)
		})
	}
}

// TestInflateAcrossMembers starts in one gzip member and reads into the
// next ones (over trailers and headers, some with a name), from every
// block boundary.
func TestInflateAcrossMembers(t *testing.T) {
	want := data(2 << 20)
	var gz []byte
	for _, cut := range [][2]int{{0, 300000}, {300000, 300010}, {300010, 1 << 20}, {1 << 20, 2 << 20}} {
		var b bytes.Buffer
		zw, _ := gzip.NewWriterLevel(&b, gzip.BestSpeed)
		zw.Name = "part" // FNAME in some headers
		if cut[0] > 0 {
			zw.Name = ""
		}
		zw.Write(want[cut[0]:cut[1]])
		zw.Close()
		gz = append(gz, b.Bytes()...)
		gz = append(gz, zlibGzip(t, nil)...) // an empty member too
	}
	ix, err := zran.Scan(bytes.NewReader(gz), 0)
	if err != nil {
		t.Fatal(err)
	}
	for i, bl := range ix.Blocks {
		in, bits, prev := at(gz, bl.InBit)
		n := min(int64(400000), int64(len(want))-bl.Out-7)
		if n <= 0 {
			continue
		}
		out := make([]byte, n)
		if err := deflate.Inflate(in, bits, prev, want[max(0, bl.Out-deflate.WindowSize):bl.Out], 7, out); err != nil {
			t.Fatalf("block %d at bit %d: %v", i, bl.InBit, err)
		}
		if !bytes.Equal(out, want[bl.Out+7:bl.Out+7+n]) {
			t.Fatalf("block %d at bit %d: wrong bytes", i, bl.InBit)
		}
	}
}

// TestInflateErrors: a stream cut short, a wrong dictionary reach and bad
// context bits are errors, never short or wrong output without one.
func TestInflateErrors(t *testing.T) {
	want := data(1 << 20)
	gz := zlibGzip(t, want)
	ix, err := zran.Scan(bytes.NewReader(gz), 0)
	if err != nil {
		t.Fatal(err)
	}
	bl := ix.Blocks[len(ix.Blocks)/2]
	in, bits, prev := at(gz, bl.InBit)
	dict := want[bl.Out-deflate.WindowSize : bl.Out]
	out := make([]byte, 50000)
	if err := deflate.Inflate(in[:100], bits, prev, dict, 0, out); !errors.Is(err, deflate.ErrFormat) {
		t.Errorf("truncated input: %v", err)
	}
	if err := deflate.Inflate(in, 9, prev, dict, 0, out); !errors.Is(err, deflate.ErrFormat) {
		t.Errorf("9 context bits: %v", err)
	}
	// Past the end of the stream.
	last := ix.Blocks[len(ix.Blocks)-1]
	in, bits, prev = at(gz, last.InBit)
	big := make([]byte, int64(len(want))-last.Out+1)
	if err := deflate.Inflate(in, bits, prev, want[max(0, last.Out-deflate.WindowSize):last.Out], 0, big); !errors.Is(err, deflate.ErrFormat) {
		t.Errorf("output past the stream's end: %v", err)
	}
	// From the first block with no dictionary: fine.
	in, bits, prev = at(gz, ix.Blocks[0].InBit)
	if err := deflate.Inflate(in, bits, prev, nil, 10, out); err != nil || !bytes.Equal(out, want[10:10+len(out)]) {
		t.Errorf("from the start: %v", err)
	}
}

// FuzzInflate feeds arbitrary streams, context bits and dictionaries:
// errors are fine, panics and hangs are not.
func FuzzInflate(f *testing.F) {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write(data(200000))
	zw.Close()
	gz := b.Bytes()
	f.Add(gz[10:], uint8(0), byte(0), []byte(nil), uint16(0), uint32(1000))
	f.Add(gz[10:400], uint8(3), byte(0xa5), []byte("dictionary"), uint16(7), uint32(100000))
	f.Add([]byte{0x01, 0x05, 0x00, 0xfa, 0xff, 'h', 'e', 'l', 'l', 'o'}, uint8(0), byte(0), []byte{}, uint16(1), uint32(3))
	f.Add([]byte{0xff, 0xff, 0xff}, uint8(7), byte(0xff), []byte{1, 2, 3}, uint16(0), uint32(10))
	f.Fuzz(func(t *testing.T, in []byte, bits uint8, prev byte, dict []byte, skip uint16, n uint32) {
		out := make([]byte, n%(1<<20))
		_ = deflate.Inflate(in, bits, prev, dict, int64(skip), out)
	})
}

package codec

import (
	"bytes"
	"crypto/rand"
	"errors"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	random := make([]byte, 64<<10)
	rand.Read(random)
	inputs := map[string][]byte{
		"empty":    {},
		"zeros":    make([]byte, 1<<20),
		"text":     bytes.Repeat([]byte("the quick brown fox "), 5000),
		"random":   random,
		"one byte": {42},
	}
	for _, c := range []Compressor{None, LZ4Block, Gzip, Zstd} {
		for name, in := range inputs {
			t.Run(c.String()+"/"+name, func(t *testing.T) {
				out, compressed, err := Compress(c, nil, in)
				if err != nil {
					t.Fatal(err)
				}
				if c == None && compressed {
					t.Fatal("none compressed")
				}
				if compressed && len(out) >= len(in) {
					t.Fatalf("compressed %d -> %d is not smaller", len(in), len(out))
				}
				dst := make([]byte, len(in))
				alg := c
				if !compressed {
					alg = None
				}
				if err := Decompress(alg, dst, out); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(dst, in) {
					t.Fatal("round trip differs")
				}
			})
		}
	}
}

// A stream that expands beyond the declared size must fail, not grow.
func TestDecompressRejectsWrongSize(t *testing.T) {
	in := make([]byte, 1<<20)
	for _, c := range []Compressor{LZ4Block, Gzip, Zstd} {
		out, compressed, err := Compress(c, nil, in)
		if err != nil || !compressed {
			t.Fatalf("%s: %v %v", c, compressed, err)
		}
		for _, size := range []int{0, 4096, len(in) - 1, len(in) + 1} {
			if err := Decompress(c, make([]byte, size), out); !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s into %d bytes: got %v, want ErrCorrupt", c, size, err)
			}
		}
	}
	if err := Decompress(None, make([]byte, 3), []byte{1, 2}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("none short: %v", err)
	}
	if err := Decompress(Compressor(9), make([]byte, 3), []byte{1, 2}); err == nil {
		t.Error("unknown compressor accepted")
	}
}

func TestDigest(t *testing.T) {
	// Known answers: sha256("abc") and blake3("abc").
	for _, tc := range []struct {
		d    Digester
		want string
	}{
		{SHA256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
		{Blake3, "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"},
	} {
		got := tc.d.Sum([]byte("abc"))
		if got.String() != tc.want {
			t.Errorf("%s: got %s want %s", tc.d, got, tc.want)
		}
		if err := tc.d.Verify([]byte("abc"), got); err != nil {
			t.Error(err)
		}
		if err := tc.d.Verify([]byte("abd"), got); !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("%s: mismatch not detected: %v", tc.d, err)
		}
	}
}

func TestParseNames(t *testing.T) {
	for _, c := range []Compressor{None, LZ4Block, Gzip, Zstd} {
		if got, err := ParseCompressor(c.String()); err != nil || got != c {
			t.Errorf("%s: %v %v", c, got, err)
		}
	}
	if _, err := ParseCompressor("lzma"); err == nil {
		t.Error("lzma accepted")
	}
	for _, d := range []Digester{Blake3, SHA256} {
		if got, err := ParseDigester(d.String()); err != nil || got != d {
			t.Errorf("%s: %v %v", d, got, err)
		}
	}
	if _, err := ParseDigester("md5"); err == nil {
		t.Error("md5 accepted")
	}
}

// FuzzDecompress feeds hostile compressed chunks: never a panic, never more
// bytes than declared.
func FuzzDecompress(f *testing.F) {
	for _, c := range []Compressor{LZ4Block, Gzip, Zstd} {
		out, _, _ := Compress(c, nil, bytes.Repeat([]byte("abcd"), 1024))
		f.Add(uint8(c), uint16(4096), out)
	}
	f.Fuzz(func(t *testing.T, alg uint8, size uint16, src []byte) {
		dst := make([]byte, size)
		_ = Decompress(Compressor(alg%4), dst, src)
	})
}

func BenchmarkDigest4K(b *testing.B) {
	data := make([]byte, 4096)
	for _, d := range []Digester{Blake3, SHA256} {
		b.Run(d.String(), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				d.Sum(data)
			}
		})
	}
}

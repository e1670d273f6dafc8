package zran

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"slices"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// testData mixes what layers hold: text, random bytes, zeros, repeats.
func testData(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	var b bytes.Buffer
	words := []string{"usr", "lib", "bin", "x86_64", "linux", "gnu", ".so", "\n", " ", "=", "/", "config"}
	for b.Len() < n {
		switch r.IntN(4) {
		case 0:
			for range r.IntN(4000) {
				b.WriteString(words[r.IntN(len(words))])
			}
		case 1:
			p := make([]byte, r.IntN(70000))
			for i := range p {
				p[i] = byte(r.Uint32())
			}
			b.Write(p)
		case 2:
			b.Write(make([]byte, r.IntN(50000)))
		default:
			if b.Len() > 1000 {
				s := r.IntN(b.Len() - 500)
				b.Write(append([]byte(nil), b.Bytes()[s:s+r.IntN(500)]...))
			}
		}
	}
	return b.Bytes()[:n]
}

func goGzip(t testing.TB, data []byte, level int) []byte {
	var b bytes.Buffer
	zw, err := gzip.NewWriterLevel(&b, level)
	if err != nil {
		t.Fatal(err)
	}
	zw.Name = "layer.tar" // an FNAME header, as some tools write
	zw.Write(data)
	zw.Close()
	return b.Bytes()
}

// zlibGzip compresses with the gzip(1) command (zlib's deflate), which
// ends blocks at other bit offsets than compress/flate.
func zlibGzip(t testing.TB, data []byte, level string) []byte {
	cmd := exec.Command("gzip", "-c", level)
	cmd.Stdin = bytes.NewReader(data)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("gzip %s: %v", level, err)
	}
	return out
}

// checkAll places spans over data's stream gz, round-trips the table and
// reads every span back through rafs.DecodeChunkBytes.
func checkAll(t *testing.T, data, gz []byte, span int64, spans []Span) {
	t.Helper()
	checkAllFor(t, data, gz, span, spans, false)
}

// checkAllFor is checkAll with ScanFor's checkpoints near the spans'
// starts if near.
func checkAllFor(t *testing.T, data, gz []byte, span int64, spans []Span, near bool) {
	t.Helper()
	var starts []int64
	if near {
		for _, s := range spans {
			starts = append(starts, s.Off)
		}
		slices.Sort(starts)
	}
	ix, err := ScanFor(bytes.NewReader(gz), span, starts)
	if err != nil {
		t.Fatal(err)
	}
	if ix.Size != int64(len(data)) {
		t.Fatalf("size %d, want %d", ix.Size, len(data))
	}
	blob, chunks := attach(t, data, gz, ix, spans)
	for i, s := range spans {
		want := data[s.Off : s.Off+int64(s.Size)]
		c := chunks[i]
		got, err := rafs.DecodeChunkBytes(blob, c, gz[c.CompressedOffset:c.CompressedOffset+uint64(c.CompressedSize)])
		if err != nil {
			t.Fatalf("chunk %d [%d,+%d): %v", i, s.Off, s.Size, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("chunk %d: wrong bytes", i)
		}
	}
}

// attach lays spans out as nydus's blob meta (through its encoding and
// back) and attaches it to a one-blob image, as a reader would; every
// chunk then has a distinct fetch extent.
func attach(t testing.TB, data, gz []byte, ix *Index, spans []Span) (*rafs.Blob, []*rafs.Chunk) {
	t.Helper()
	z, ext, err := ix.Layout(spans)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := DecodeContexts(EncodeContexts(z.Contexts), uint32(len(z.Contexts)))
	if err != nil {
		t.Fatal(err)
	}
	z.Contexts = cs
	blob := &rafs.Blob{ID: "test", Digester: codec.SHA256, Compressor: codec.Gzip, ChunkCount: uint32(len(spans)), CompressedSize: uint64(len(gz))}
	in := &rafs.Inode{Ino: 1}
	ends := make([]uint64, len(spans))
	var chunks []*rafs.Chunk
	for i, s := range spans {
		if ext[i].Offset < z.Contexts[z.Chunks[i].Context].InOffset {
			t.Fatalf("chunk %d: extent at %d before its context", i, ext[i].Offset)
		}
		ends[i] = ext[i].Offset + uint64(ext[i].Size)
		c := &rafs.Chunk{Digest: codec.SHA256.Sum(data[s.Off : s.Off+int64(s.Size)]), Index: uint32(i),
			CompressedOffset: ext[i].Offset, CompressedSize: ext[i].Size, UncompressedSize: s.Size, Compressed: true}
		chunks = append(chunks, c)
		in.Chunks = append(in.Chunks, rafs.FileChunk{Chunk: c})
	}
	img := &rafs.Image{Blobs: []*rafs.Blob{blob}, Inodes: []*rafs.Inode{in}}
	if err := Attach(img, 0, z, ends, func(p []byte, off int64) error { copy(p, gz[off:]); return nil }); err != nil {
		t.Fatal(err)
	}
	// Distinct offsets, growing with chunk order (read-ahead follows it).
	for i, c := range chunks {
		if i > 0 && c.CompressedOffset <= chunks[i-1].CompressedOffset {
			t.Fatalf("chunk %d at %d, chunk %d at %d", i, c.CompressedOffset, i-1, chunks[i-1].CompressedOffset)
		}
	}
	return blob, chunks
}

func tile(n int64, size uint32) []Span {
	var out []Span
	for off := int64(0); off < n; off += int64(size) {
		out = append(out, Span{Off: off, Size: uint32(min(int64(size), n-off))})
	}
	return out
}

func TestScanPlaceDecode(t *testing.T) {
	data := testData(1, 6<<20)
	r := rand.New(rand.NewPCG(2, 3))
	var small []Span // many small chunks, several per block (tar headers, tiny files)
	for off := int64(0); off < int64(len(data))-3000; off += int64(600 + r.IntN(50000)) {
		small = append(small, Span{Off: off, Size: uint32(1 + r.IntN(2000))})
	}
	for _, tc := range []struct {
		name string
		gz   []byte
	}{
		{"go-default", goGzip(t, data, gzip.DefaultCompression)},
		{"go-best-speed", goGzip(t, data, gzip.BestSpeed)},
		{"go-best", goGzip(t, data, gzip.BestCompression)},
		{"go-huffman-only", goGzip(t, data, gzip.HuffmanOnly)},
		{"go-stored", goGzip(t, data, gzip.NoCompression)},
		{"zlib-6", zlibGzip(t, data, "-6")},
		{"zlib-1", zlibGzip(t, data, "-1")},
		{"zlib-9", zlibGzip(t, data, "-9")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkAll(t, data, tc.gz, 256<<10, tile(int64(len(data)), 64<<10))
			checkAll(t, data, tc.gz, 128<<10, small)
			checkAllFor(t, data, tc.gz, 0, tile(int64(len(data)), 256<<10), true)
			checkAllFor(t, data, tc.gz, 256<<10, small, true)
		})
	}
}

// TestScanFor: checkpoints before chunk starts cut what a chunk read
// fetches (and inflates) before its data.
func TestScanFor(t *testing.T) {
	data := testData(31, 8<<20)
	for _, gz := range [][]byte{goGzip(t, data, 6), zlibGzip(t, data, "-6")} {
		spans := tile(int64(len(data)), 1<<20)
		var starts []int64
		for _, s := range spans {
			starts = append(starts, s.Off)
		}
		// What reads fetch: from a chunk's context to its end.
		fetched := func(ix *Index) (n int64) {
			_, chunks := attach(t, data, gz, ix, spans)
			for _, c := range chunks {
				n += int64(c.CompressedSize)
			}
			return n
		}
		plain, err := Scan(bytes.NewReader(gz), 0)
		if err != nil {
			t.Fatal(err)
		}
		near, err := ScanFor(bytes.NewReader(gz), 0, starts)
		if err != nil {
			t.Fatal(err)
		}
		fp, fn := fetched(plain), fetched(near)
		t.Logf("fetched/layer: %.2f by span, %.2f near chunk starts (%d and %d checkpoints)",
			float64(fp)/float64(len(gz)), float64(fn)/float64(len(gz)), len(plain.Checkpoints), len(near.Checkpoints))
		if fn >= fp {
			t.Errorf("checkpoints near chunk starts fetch %d bytes, by span %d", fn, fp)
		}
		if len(near.Checkpoints) > 2*len(plain.Checkpoints)+1 {
			t.Errorf("%d checkpoints near starts, %d by span", len(near.Checkpoints), len(plain.Checkpoints))
		}
		checkAllFor(t, data, gz, 0, spans, true)
	}
}

// TestMultiMember: a layer of several gzip members (pigz --independent,
// bgzip, concatenated files) is indexed across them, and chunks whose
// contexts run over a member boundary read through the trailer and the
// next header, as nydus's ZranDecoder does.
func TestMultiMember(t *testing.T) {
	data := testData(41, 3<<20)
	var gz []byte
	for _, cut := range [][2]int{{0, 700000}, {700000, 700001}, {700001, 2 << 20}, {2 << 20, 3 << 20}} {
		gz = append(gz, zlibGzip(t, data[cut[0]:cut[1]], "-6")...)
	}
	ix, err := Scan(bytes.NewReader(gz), 0)
	if err != nil {
		t.Fatal(err)
	}
	if ix.Size != int64(len(data)) {
		t.Fatalf("size %d, want %d", ix.Size, len(data))
	}
	checkAll(t, data, gz, 512<<10, tile(int64(len(data)), 100000))
	checkAllFor(t, data, gz, 0, tile(int64(len(data)), 1<<20), true)
	// A member with a bad CRC is refused.
	bad := append([]byte(nil), gz...)
	first := zlibGzip(t, data[:700000], "-6")
	bad[len(first)-8] ^= 1
	if _, err := Scan(bytes.NewReader(bad), 0); !errors.Is(err, ErrFormat) {
		t.Fatalf("bad CRC in member 0: %v", err)
	}
}

func TestSmallAndEmpty(t *testing.T) {
	for _, n := range []int{1, 100, 40 << 10} {
		data := testData(uint64(n), n)
		checkAll(t, data, goGzip(t, data, 6), 0, tile(int64(n), 4096))
	}
	// Many chunks restarting at the first checkpoint: their offsets run
	// into the gzip stream past the header, held as head bytes.
	data := testData(9, 30000)
	var spans []Span
	for off := int64(0); off < 29000; off += 100 {
		spans = append(spans, Span{Off: off, Size: 50})
	}
	checkAll(t, data, goGzip(t, data, 6), 0, spans)
	ix, err := Scan(bytes.NewReader(goGzip(t, nil, 6)), 0)
	if err != nil || ix.Size != 0 {
		t.Fatalf("empty stream: %v, %d bytes", err, ix.Size)
	}
}

func TestCorrupt(t *testing.T) {
	// Text only: every byte up to the chunk's end is Huffman-coded and
	// matters (bytes of a stored block before the chunk would not).
	var tb bytes.Buffer
	for i := 0; tb.Len() < 1<<20; i++ {
		fmt.Fprintf(&tb, "line %d of a config file, value=%x\n", i, i*i*7919)
	}
	data := tb.Bytes()
	gz := goGzip(t, data, 6)
	ix, err := Scan(bytes.NewReader(gz), 128<<10)
	if err != nil {
		t.Fatal(err)
	}
	spans := tile(int64(len(data)), 64<<10)
	_, ext, err := ix.Layout(spans)
	if err != nil {
		t.Fatal(err)
	}
	blob, chunks := attach(t, data, gz, ix, spans)
	i := 5
	c := chunks[i]
	ctx := blob.Zran.Contexts[blob.Zran.Chunks[i].Context]
	raw := append([]byte(nil), gz[c.CompressedOffset:c.CompressedOffset+uint64(c.CompressedSize)]...)
	// The context's first byte and the first byte of the block holding
	// the chunk's start: both are inflated.
	first := int(ctx.InOffset - c.CompressedOffset)
	for _, at := range []int{first, first + int(ext[i].Offset-ctx.InOffset)} {
		bad := append([]byte(nil), raw...)
		bad[at] ^= 0x10
		if _, err := rafs.DecodeChunkBytes(blob, c, bad); err == nil {
			t.Errorf("flipped byte %d of %d: no error", at, len(raw))
		} else if rafs.Errno(err) != 5 { // EIO
			t.Errorf("flipped byte %d: errno %v (%v)", at, rafs.Errno(err), err)
		}
	}
	if _, err := rafs.DecodeChunkBytes(blob, c, raw[:len(raw)/2]); err == nil {
		t.Error("truncated extent: no error")
	}
	// A whole-stream corruption is caught by Scan's CRC check or inflate.
	bad := append([]byte(nil), gz...)
	bad[len(bad)/2] ^= 1
	if _, err := Scan(bytes.NewReader(bad), 0); !errors.Is(err, ErrFormat) {
		t.Errorf("corrupt stream: %v", err)
	}
	for _, in := range [][]byte{nil, []byte("not gzip at all"), gz[:20], append(append([]byte(nil), gz...), "garbage"...), append(append([]byte(nil), gz...), gz[:30]...)} {
		if _, err := Scan(bytes.NewReader(in), 0); !errors.Is(err, ErrFormat) {
			t.Errorf("Scan(%d bytes): %v, want ErrFormat", len(in), err)
		}
	}
}

func FuzzScan(f *testing.F) {
	f.Add(goGzip(f, testData(4, 5000), 6))
	f.Add(goGzip(f, testData(4, 5000), gzip.HuffmanOnly))
	f.Add(goGzip(f, testData(4, 100), gzip.NoCompression))
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := Scan(bytes.NewReader(b), 1000)
		if err != nil {
			return
		}
		// What Scan accepts, gzip accepts with the same size.
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("Scan accepted what gzip refuses: %v", err)
		}
		var out bytes.Buffer
		if _, err := out.ReadFrom(zr); err != nil {
			t.Fatalf("Scan accepted what gzip refuses: %v", err)
		}
		if int64(out.Len()) < ix.Size {
			t.Fatalf("Scan size %d, gzip %d", ix.Size, out.Len())
		}
	})
}

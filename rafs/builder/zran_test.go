package builder

import (
	"archive/tar"
	"bytes"
	"compress/flate"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/bootstrap"
	"github.com/rafsd/rafsd/rafs/zran"
)

// memBlobs serves blobs from memory, as a storage backend would.
type memBlobs map[string][]byte

func (m memBlobs) ReadAt(_ context.Context, id string, p []byte, off int64) error {
	b, ok := m[id]
	if !ok || off < 0 || off+int64(len(p)) > int64(len(b)) {
		return io.ErrUnexpectedEOF
	}
	copy(p, b[off:])
	return nil
}

// zranLayer returns a gzip tar layer with small, large, incompressible,
// long-named and hardlinked files, and the files' contents.
func zranLayer(t *testing.T) ([]byte, map[string][]byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(11, 12))
	files := map[string][]byte{}
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	add := func(name string, data []byte) {
		files[name] = data
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, Format: tar.FormatPAX}); err != nil {
			t.Fatal(err)
		}
		tw.Write(data)
	}
	tw.WriteHeader(&tar.Header{Name: "etc/", Mode: 0o755, Typeflag: tar.TypeDir})
	for i := range 300 {
		add(fmt.Sprintf("etc/conf-%03d", i), []byte(strings.Repeat(fmt.Sprintf("key%d=value %d\n", i, i*i), 1+i%40)))
	}
	rnd := make([]byte, 3<<20+4321)
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	add("usr/lib/random.bin", rnd)
	text := []byte(strings.Repeat("the quick brown fox jumps over the lazy dog\n", 120000))
	add("usr/share/"+strings.Repeat("long-name-", 20)+"text", text)
	add("empty", nil)
	tw.WriteHeader(&tar.Header{Name: "usr/lib/random-link", Linkname: "usr/lib/random.bin", Typeflag: tar.TypeLink})
	tw.Close()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(tb.Bytes())
	zw.Close()
	return gz.Bytes(), files
}

func TestZranBuild(t *testing.T) {
	layer, files := zranLayer(t)
	sum := sha256.Sum256(layer)
	id := hex.EncodeToString(sum[:])
	var blob bytes.Buffer
	b, err := New(Options{ChunkSize: 64 << 10, Zran: &ZranLayer{ID: id, R: bytes.NewReader(layer), Size: int64(len(layer)), Span: 256 << 10}}, &blob)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.AddTar(context.Background(), bytes.NewReader(layer)); err != nil {
		t.Fatal(err)
	}
	res, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	// What the build writes is the layer's separate blob meta (nydus's
	// "RAFS blob for ZRAN"), named by its sha256.
	if res.Blob == nil || res.Blob.ID != id || res.Blob.Zran != nil || !res.Blob.IsZran() || res.Blob.CompressedSize != uint64(len(layer)) {
		t.Fatalf("blob %+v", res.Blob)
	}
	if sha256.Sum256(blob.Bytes()) != res.Blob.Meta.Digest || res.Blob.Meta.Size != uint64(blob.Len()) || res.Blob.Features != 0x7000_003d {
		t.Fatalf("meta blob of %d bytes, entry %+v features %#x", blob.Len(), res.Blob.Meta, res.Blob.Features)
	}
	if m, err := blobmeta.ReadBlob(bytes.NewReader(blob.Bytes()), int64(blob.Len())); err != nil || len(m.Chunks) != int(res.Blob.ChunkCount) {
		t.Fatalf("meta blob: %v", err)
	}
	// Through the v6 bootstrap and back; the contexts come from the meta
	// blob, fetched as nydusd does.
	var boot bytes.Buffer
	if err := bootstrap.Write(&boot, res.Image); err != nil {
		t.Fatal(err)
	}
	img, err := bootstrap.Read(bytes.NewReader(boot.Bytes()), int64(boot.Len()))
	if err != nil {
		t.Fatal(err)
	}
	if err := zran.Resolve(context.Background(), img, memBlobs{id: layer, zran.MetaBlobID(img.Blobs[0]): blob.Bytes()}); err != nil {
		t.Fatal(err)
	}
	if img.Blobs[0].Zran == nil || len(img.Blobs[0].Zran.Chunks) != int(res.Blob.ChunkCount) {
		t.Fatalf("zran contexts not loaded")
	}
	open := func(data []byte) rafs.BlobChunkReader {
		return rafs.BlobChunkReader{Open: func(*rafs.Blob) (io.ReaderAt, error) { return bytes.NewReader(data), nil }}
	}
	read := func(img *rafs.Image, cr rafs.ChunkReader, name string, want []byte) error {
		in := img.Root()
		for _, p := range strings.Split(name, "/") {
			if in, err = img.Lookup(in, p); err != nil {
				return err
			}
		}
		got := make([]byte, len(want))
		if len(want) > 0 {
			if _, err := img.ReadAt(context.Background(), cr, in, got, 0); err != nil && err != io.EOF {
				return err
			}
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%s: wrong bytes", name)
		}
		return nil
	}
	for name, want := range files {
		if err := read(img, open(layer), name, want); err != nil {
			t.Fatal(err)
		}
	}
	if err := read(img, open(layer), "usr/lib/random-link", files["usr/lib/random.bin"]); err != nil {
		t.Fatal(err)
	}
	// A flipped byte inside the text file's stretch of the layer: EIO.
	bad := append([]byte(nil), layer...)
	for i := len(bad) - 20000; i < len(bad)-100; i += 997 {
		bad[i] ^= 0x55
	}
	err = read(img, open(bad), "usr/share/"+strings.Repeat("long-name-", 20)+"text", files["usr/share/"+strings.Repeat("long-name-", 20)+"text"])
	if err == nil || !errors.Is(err, rafs.ErrInvalid) && rafs.Errno(err) != 5 {
		t.Fatalf("corrupt layer: %v, want EIO", err)
	}
}

func TestZranRefusals(t *testing.T) {
	layer, _ := zranLayer(t)
	if _, err := New(Options{Version: 5, Zran: &ZranLayer{ID: "x", R: bytes.NewReader(layer), Size: int64(len(layer))}}, io.Discard); err == nil {
		t.Error("zran with RAFS v5 accepted")
	}
	// Not gzip: AddTar reads it, Finish's scan refuses it.
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: "f", Mode: 0o644, Size: 5, Typeflag: tar.TypeReg})
	tw.Write([]byte("hello"))
	tw.Close()
	b, err := New(Options{Zran: &ZranLayer{ID: "x", R: bytes.NewReader(tb.Bytes()), Size: int64(tb.Len())}}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.AddTar(context.Background(), bytes.NewReader(tb.Bytes())); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Finish(); err == nil || !strings.Contains(err.Error(), "gzip") {
		t.Errorf("plain tar as zran layer: %v", err)
	}
}

// TestZranMetaAsNydusdReadsIt checks a built meta blob against what nydusd
// requires and does, without our reader: BlobCompressionContextInfo's
// validate_header, BlobChunkInfoV2Ondisk::validate, the TOC lookup of
// blob.digest (storage/src/meta/mod.rs, chunk_info_v2.rs, toc.rs), and
// the read path of storage/src/cache/mod.rs: inflate a context's in_len
// bytes from in_offset with its dictionary into exactly out_len bytes
// (decompress_zran), then slice [zran_offset, +size) out of it
// (next_zran); every slice must have the chunk's digest from blob.digest.
// The layer comes from gzip(1), i.e. zlib, as real layers do.
func TestZranMetaAsNydusdReadsIt(t *testing.T) {
	_, files := zranLayer(t)
	src := t.TempDir()
	for name, data := range files {
		p := filepath.Join(src, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, data, 0o644)
	}
	tgz := filepath.Join(t.TempDir(), "layer.tar.gz")
	if out, err := exec.Command("tar", "-C", src, "-czf", tgz, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	layer, _ := os.ReadFile(tgz)
	sum := sha256.Sum256(layer)
	var metaBlob bytes.Buffer
	b, err := New(Options{Zran: &ZranLayer{ID: hex.EncodeToString(sum[:]), R: bytes.NewReader(layer), Size: int64(len(layer))}}, &metaBlob)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.AddTar(context.Background(), bytes.NewReader(layer)); err != nil {
		t.Fatal(err)
	}
	res, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	bl, mb := res.Blob, metaBlob.Bytes()

	// The meta as nydusd fetches it: [ci_offset, +ci_compressed_size+4096).
	m, err := zran.ReadMeta(context.Background(), bl, func(p []byte, off int64) error {
		if off+int64(len(p)) > int64(len(mb)) {
			return io.ErrUnexpectedEOF
		}
		copy(p, mb[off:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	h := m.Header
	n := uint64(h.CIEntries)
	if h.CIEntries != bl.ChunkCount || h.CIZranOffset != n*24 || h.CIZranOffset+h.CIZranSize > h.CIUncompressedSize ||
		uint64(h.CIZranCount) > n || uint64(h.CIZranCount)*40 > h.CIZranSize || h.Features&0x3d != 0x3d {
		t.Fatalf("header fails nydus's validate_header: %+v", h)
	}
	cs, err := zran.DecodeContexts(m.Table[h.CIZranOffset:h.CIZranOffset+h.CIZranSize], h.CIZranCount)
	if err != nil {
		t.Fatal(err)
	}
	// blob.digest through the TOC at the end of the meta blob, checked
	// against blob_toc_digest as nydusd does.
	if bl.Meta.TOCSize == 0 || sha256.Sum256(mb[len(mb)-int(bl.Meta.TOCSize):]) != bl.Meta.TOCDigest {
		t.Fatal("TOC does not match blob_toc_digest/size")
	}
	toc, err := blobmeta.ReadTOC(bytes.NewReader(mb), int64(len(mb)))
	if err != nil {
		t.Fatal(err)
	}
	var digests []byte
	for _, e := range toc {
		if e.Name == blobmeta.TOCDigests {
			digests = mb[e.CompressedOffset : e.CompressedOffset+e.CompressedSize]
			if sha256.Sum256(digests) != e.UncompressedDigest || len(digests) != 32*int(n) {
				t.Fatalf("blob.digest entry %+v", e)
			}
		}
	}
	if digests == nil {
		t.Fatal("no blob.digest in the TOC")
	}
	inflated := map[uint32][]byte{}
	var prevC, prevU uint64
	for i, ci := range m.Chunks {
		isZran, idx, off := ci.ZranChunk()
		switch {
		case !isZran || !ci.Compressed || ci.UncompressedSize == 0:
			t.Fatalf("chunk %d: flags %+v", i, ci)
		case ci.CompressedOffset+uint64(ci.CompressedSize) > bl.CompressedSize || ci.UncompressedOffset+uint64(ci.UncompressedSize) > (bl.UncompressedSize+0xfff)&^0xfff:
			t.Fatalf("chunk %d past the blob: %+v", i, ci)
		case ci.UncompressedOffset&0xfff != 0 || i > 0 && (ci.UncompressedOffset <= prevU || ci.CompressedOffset < prevC):
			t.Fatalf("chunk %d out of order: %+v", i, ci)
		case int(idx) >= len(cs) || uint64(off)+uint64(ci.UncompressedSize) > uint64(cs[idx].OutLen):
			t.Fatalf("chunk %d outside its context %d", i, idx)
		}
		prevC, prevU = ci.CompressedOffset, ci.UncompressedOffset
		out, ok := inflated[idx]
		if !ok {
			c := cs[idx]
			if c.OutLen > 16<<20 || c.InOffset+uint64(c.InLen) > uint64(len(layer)) || c.CtxBits != 0 {
				t.Fatalf("context %d: %+v", idx, c)
			}
			fr := flate.NewReaderDict(bytes.NewReader(layer[c.InOffset:c.InOffset+uint64(c.InLen)]), c.Dict)
			out = make([]byte, c.OutLen)
			if _, err := io.ReadFull(fr, out); err != nil {
				t.Fatalf("context %d: %d input bytes do not give %d output bytes: %v", idx, c.InLen, c.OutLen, err)
			}
			inflated[idx] = out
		}
		if sha256.Sum256(out[off:off+ci.UncompressedSize]) != [32]byte(digests[32*i:32*i+32]) {
			t.Fatalf("chunk %d: inflated bytes do not match blob.digest", i)
		}
	}
	t.Logf("%d chunks, %d contexts, meta blob %d bytes for a %d-byte layer", n, len(cs), len(mb), len(layer))
}

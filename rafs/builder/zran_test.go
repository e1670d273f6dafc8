package builder

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
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

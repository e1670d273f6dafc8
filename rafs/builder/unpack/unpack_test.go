package unpack_test

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/builder"
	"github.com/rafsd/rafsd/rafs/builder/unpack"
	"github.com/rafsd/rafsd/rafs/codec"
)

// A blob that fails its digest check must fail the unpack, never write
// wrong bytes silently.
func TestCorruptBlob(t *testing.T) {
	var blob bytes.Buffer
	b, err := builder.New(builder.Options{Compressor: ptr(codec.None)}, &blob)
	if err != nil {
		t.Fatal(err)
	}
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	tw.WriteHeader(&tar.Header{Name: "f", Typeflag: tar.TypeReg, Mode: 0o644, Size: 5})
	tw.Write([]byte("hello"))
	tw.Close()
	if err := b.AddTar(context.Background(), &layer); err != nil {
		t.Fatal(err)
	}
	res, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	data := blob.Bytes()
	data[0] ^= 1
	cr := rafs.BlobChunkReader{Open: func(*rafs.Blob) (io.ReaderAt, error) { return bytes.NewReader(data), nil }}
	if err := unpack.ToDir(context.Background(), res.Image, cr, t.TempDir()); !errors.Is(err, codec.ErrDigestMismatch) {
		t.Errorf("ToDir: %v", err)
	}
	if err := unpack.ToTar(context.Background(), res.Image, cr, io.Discard); !errors.Is(err, codec.ErrDigestMismatch) {
		t.Errorf("ToTar: %v", err)
	}
	// Into a directory that already has the file: refuse, do not overwrite.
	data[0] ^= 1
	dir := t.TempDir()
	os.WriteFile(dir+"/f", []byte("mine"), 0o644)
	if err := unpack.ToDir(context.Background(), res.Image, cr, dir); !errors.Is(err, os.ErrExist) {
		t.Errorf("ToDir over an existing file: %v", err)
	}
}

func ptr[T any](v T) *T { return &v }

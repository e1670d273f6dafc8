package builder

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsd/rafsd/rafs/bootstrap"
)

func TestBuildDirFiles(t *testing.T) {
	src, blobDir := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("some file data"), 0o644); err != nil {
		t.Fatal(err)
	}
	boot := filepath.Join(t.TempDir(), "bootstrap")
	res, err := BuildDirFiles(context.Background(), Options{Version: 6}, src, blobDir, boot)
	if err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(blobDir)
	if len(ents) != 1 || ents[0].Name() != res.Blob.ID {
		t.Fatalf("blob dir holds %v, want only %s (no temporary left)", ents, res.Blob.ID)
	}
	data, err := os.ReadFile(filepath.Join(blobDir, res.Blob.ID))
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != res.Blob.ID {
		t.Fatalf("blob named %s has sha256 %x", res.Blob.ID, sum)
	}
	img, err := bootstrap.Open(boot)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.Lookup(img.Root(), "f"); err != nil {
		t.Fatal(err)
	}
}

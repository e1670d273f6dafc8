package builder

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rafsd/rafsd/rafs/bootstrap"
)

// BuildDirFiles builds directory src into a blob file named by its id in
// blobDir (the layout a localfs backend reads) and a bootstrap file at
// boot. The blob is written under a temporary name and renamed once
// complete, so blobDir never holds a partial blob under a real id.
func BuildDirFiles(ctx context.Context, opts Options, src, blobDir, boot string) (*Result, error) {
	tmp, err := os.CreateTemp(blobDir, ".blob-*")
	if err != nil {
		return nil, fmt.Errorf("build %s: %w", src, err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	b, err := New(opts, tmp)
	if err != nil {
		tmp.Close()
		return nil, err
	}
	if err := b.AddDir(ctx, src); err != nil {
		tmp.Close()
		return nil, err
	}
	res, err := b.Finish()
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	if res.Blob != nil {
		if err := os.Rename(tmp.Name(), filepath.Join(blobDir, res.Blob.ID)); err != nil {
			return nil, fmt.Errorf("build %s: %w", src, err)
		}
	}
	if err := bootstrap.WriteFile(boot, res.Image); err != nil {
		return nil, fmt.Errorf("build %s: %w", src, err)
	}
	return res, nil
}

package bootstrap

import (
	"io"

	"github.com/rafsd/rafsd/rafs"
	v6 "github.com/rafsd/rafsd/rafs/v6"
)

func readV6(r io.ReaderAt, size int64) (*rafs.Image, error) { return v6.Read(r, size) }

func writeV6(w io.Writer, img *rafs.Image) error { return v6.Write(w, img) }

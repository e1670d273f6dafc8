package bootstrap

import (
	"errors"
	"io"

	"github.com/rafsd/rafsd/rafs"
)

// errNoV6 stands in until rafs/v6 lands.
var errNoV6 = errors.New("RAFS v6 support is not built in yet")

func readV6(r io.ReaderAt, size int64) (*rafs.Image, error) { return nil, errNoV6 }

func writeV6(w io.Writer, img *rafs.Image) error { return errNoV6 }

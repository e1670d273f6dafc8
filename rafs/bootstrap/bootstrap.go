// Package bootstrap reads and writes RAFS bootstraps of either version:
// it sniffs v5 (magic "RAFS" little-endian at offset 0) or v6 (EROFS
// superblock magic at offset 1024) and hands the bytes to rafs/v5 or
// rafs/v6.
package bootstrap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/rafsd/rafsd/rafs"
	v5 "github.com/rafsd/rafsd/rafs/v5"
)

// Magic numbers used for sniffing.
const (
	V5Magic     = 0x5241_4653 // "RAFS" read as a little-endian u32
	EROFSMagic  = 0xe0f5_e1e2
	erofsSBOff  = 1024
	sniffLength = erofsSBOff + 4
)

// ErrUnknownFormat is returned for input that is neither v5 nor v6.
var ErrUnknownFormat = errors.New("not a RAFS v5 or v6 bootstrap")

// Version reports which RAFS version hdr (the first bytes of a bootstrap)
// is: 5, 6, or 0 if neither.
func Version(hdr []byte) int {
	if len(hdr) >= 4 && binary.LittleEndian.Uint32(hdr) == V5Magic {
		return 5
	}
	if len(hdr) >= sniffLength && binary.LittleEndian.Uint32(hdr[erofsSBOff:]) == EROFSMagic {
		return 6
	}
	return 0
}

// Read decodes the bootstrap of size bytes in r, whichever its version.
func Read(r io.ReaderAt, size int64) (*rafs.Image, error) {
	hdr := make([]byte, min(size, sniffLength))
	if n, err := r.ReadAt(hdr, 0); n < len(hdr) {
		return nil, fmt.Errorf("bootstrap: read header: %w", err)
	}
	switch Version(hdr) {
	case 5:
		img, err := v5.Read(r, size)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: %w", err)
		}
		return img, nil
	case 6:
		img, err := readV6(r, size)
		if err != nil {
			return nil, fmt.Errorf("bootstrap: %w", err)
		}
		return img, nil
	}
	return nil, fmt.Errorf("bootstrap: %d bytes: %w", size, ErrUnknownFormat)
}

// Open reads the bootstrap file at path.
func Open(path string) (*rafs.Image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	img, err := Read(f, st.Size())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return img, nil
}

// Write encodes img in the format img.Version names.
func Write(w io.Writer, img *rafs.Image) error {
	switch img.Version {
	case 5:
		return v5.Write(w, img)
	case 6:
		return writeV6(w, img)
	}
	return fmt.Errorf("bootstrap: write: RAFS version %d (want 5 or 6)", img.Version)
}

// WriteFile writes img to path atomically (a temporary file renamed into
// place), so that a crashed build never leaves a truncated bootstrap.
func WriteFile(path string, img *rafs.Image) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".bootstrap-*")
	if err != nil {
		return fmt.Errorf("bootstrap: %w", err)
	}
	defer os.Remove(f.Name())
	if err := Write(f, img); err != nil {
		f.Close()
		return fmt.Errorf("bootstrap: write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("bootstrap: %w", err)
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return fmt.Errorf("bootstrap: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("bootstrap: %w", err)
	}
	return nil
}

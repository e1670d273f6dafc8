package blobmeta

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/rafsd/rafsd/rafs/codec"
)

// Names of TOC entries (storage/src/meta/toc.rs).
const (
	TOCBlobRaw    = "image.blob"
	TOCBootstrap  = "image.boot"
	TOCBlobMeta   = "blob.meta"
	TOCMetaHeader = "blob.meta.header"
	TOCDigests    = "blob.digest"
	TOCName       = "rafs.blob.toc"
)

// TOCEntrySize is the on-disk size of a TOC entry.
const TOCEntrySize = 128

// maxTOCEntries bounds a TOC (nydus accepts at most 64 KiB of entries).
const maxTOCEntries = 0x10000 / TOCEntrySize

// TOCEntry is one entry of a blob's table of contents: where a named
// section (chunk data, blob meta, bootstrap...) lies in the blob.
type TOCEntry struct {
	Flags              uint32
	Name               string
	UncompressedDigest codec.Digest // sha256 of the uncompressed section
	CompressedOffset   uint64
	CompressedSize     uint64
	UncompressedSize   uint64
}

// ReadTOC decodes the table of contents that nydus-image --features
// blob-toc appends to a blob: entries of 128 bytes followed by a 512-byte
// tar header named rafs.blob.toc, at the very end of the blob.
func ReadTOC(r io.ReaderAt, size int64) ([]TOCEntry, error) {
	if size < 512 {
		return nil, fmt.Errorf("%w: blob of %d bytes has no TOC", ErrFormat, size)
	}
	hb := make([]byte, 512)
	if _, err := r.ReadAt(hb, size-512); err != nil {
		return nil, fmt.Errorf("read TOC header: %w", err)
	}
	hdr, err := tar.NewReader(bytes.NewReader(hb)).Next()
	if err != nil || hdr.Name != TOCName {
		return nil, fmt.Errorf("%w: no TOC tar header at the end of the blob", ErrFormat)
	}
	if hdr.Size <= 0 || hdr.Size%TOCEntrySize != 0 || hdr.Size/TOCEntrySize > maxTOCEntries || hdr.Size > size-512 {
		return nil, fmt.Errorf("%w: TOC of %d bytes", ErrFormat, hdr.Size)
	}
	raw := make([]byte, hdr.Size)
	if _, err := r.ReadAt(raw, size-512-hdr.Size); err != nil {
		return nil, fmt.Errorf("read TOC: %w", err)
	}
	var out []TOCEntry
	le := binary.LittleEndian
	for e := raw; len(e) >= TOCEntrySize; e = e[TOCEntrySize:] {
		name := string(bytes.TrimRight(e[8:24], "\x00"))
		if name == "" || bytes.IndexByte([]byte(name), 0) >= 0 {
			return nil, fmt.Errorf("%w: TOC entry with a bad name %q", ErrFormat, name)
		}
		te := TOCEntry{
			Flags:            le.Uint32(e[0:]),
			Name:             name,
			CompressedOffset: le.Uint64(e[56:]),
			CompressedSize:   le.Uint64(e[64:]),
			UncompressedSize: le.Uint64(e[72:]),
		}
		copy(te.UncompressedDigest[:], e[24:56])
		// Offsets are not checked here: nydus-image records image.blob
		// with its end offset, so only the entries a caller uses can be.
		out = append(out, te)
	}
	return out, nil
}

// ReadBlob decodes the blob meta of a blob in either layout nydus-image
// writes: header at the very end, or (blob-toc) located by the TOC.
func ReadBlob(r io.ReaderAt, size int64) (*Meta, error) {
	m, err := ReadTail(r, size)
	if err == nil {
		return m, nil
	}
	toc, terr := ReadTOC(r, size)
	if terr != nil {
		return nil, err
	}
	for _, e := range toc {
		if e.Name == TOCMetaHeader {
			if e.CompressedSize != HeaderSize || e.CompressedOffset > uint64(size-HeaderSize) {
				return nil, fmt.Errorf("%w: TOC puts the blob meta header at %d+%d", ErrFormat, e.CompressedOffset, e.CompressedSize)
			}
			hb := make([]byte, HeaderSize)
			if _, err := r.ReadAt(hb, int64(e.CompressedOffset)); err != nil {
				return nil, fmt.Errorf("read blob meta header: %w", err)
			}
			var h Header
			if err := h.UnmarshalBinary(hb); err != nil {
				return nil, err
			}
			if h.CIOffset+h.CICompressedSize != e.CompressedOffset {
				return nil, fmt.Errorf("%w: table at %d+%d does not end at the header (%d)", ErrFormat, h.CIOffset, h.CICompressedSize, e.CompressedOffset)
			}
			return readTable(r, h)
		}
	}
	return nil, fmt.Errorf("%w: TOC has no %s entry", ErrFormat, TOCMetaHeader)
}

package blobmeta

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/rafsd/rafsd/rafs/codec"
)

// Separate describes a blob meta written apart from the data it indexes:
// nydus's "RAFS blob for ZRAN" (builder/src/core/blob.rs dump_meta_data,
// builder/src/lib.rs dump_toc, for `nydus-image create --type targz-ref
// --features blob-toc`), whose data blob is an untouched OCI gzip layer:
//
//	ci table, zstd-compressed when that is smaller (chunk entries v2,
//	         then the zran context and dictionary tables)  @ 0
//	header   4096 bytes
//	tar header "blob.meta" (size: table + header)           512 bytes
//	chunk digests, 32 bytes each, by chunk index
//	tar header "blob.digest"                                512 bytes
//	TOC      128-byte entries blob.meta, blob.meta.header, blob.digest
//	tar header "rafs.blob.toc"                              512 bytes
//
// Tar headers follow their content (nydus's "reverse tar": a reader
// finds the TOC from the end). The bootstrap's blob entry names the whole
// as blob_meta_digest (its sha256) and blob_meta_size, and the TOC
// (entries + its tar header) as blob_toc_digest and blob_toc_size.
type Separate struct {
	Header    Header
	Size      uint64
	Digest    codec.Digest // sha256 of all Size bytes
	TOCDigest codec.Digest
	TOCSize   uint32
}

// SeparateFeatures are the blob features of such a blob, as nydus-image
// sets them (CAP_TAR_TOC, HAS_TAR_HEADER and HAS_TOC for blob-toc,
// CHUNK_INFO_V2 and SEPARATE for ref conversions, ALIGNED, and
// INLINED_CHUNK_DIGEST for the digest table).
const SeparateFeatures = FeatureCapTarTOC | FeatureHasTarHeader | FeatureHasTOC | FeatureChunkInfoV2 |
	FeatureSeparate | FeatureAligned | FeatureInlinedChunkDigest

// TOC entry flags (storage/src/meta/toc.rs TocEntryFlags).
const (
	tocCompressNone = 0x1
	tocCompressZstd = 0x2
	tocCompressLZ4  = 0x4
)

// WriteSeparate writes the blob meta of a zran blob (features are ORed
// with SeparateFeatures and FeatureZran): entries infos, the zran
// context and dictionary tables zran (of zranCount contexts, see
// rafs/zran.EncodeContexts) and the chunks' digests.
func WriteSeparate(w io.Writer, features uint32, infos []ChunkInfo, zran []byte, zranCount uint32, digests []codec.Digest) (*Separate, error) {
	if len(digests) != len(infos) {
		return nil, fmt.Errorf("blob meta: %d digests for %d chunks", len(digests), len(infos))
	}
	entries, err := EncodeTable(infos, true)
	if err != nil {
		return nil, fmt.Errorf("encode blob meta: %w", err)
	}
	table := append(entries, zran...)
	c := codec.Zstd
	stored, compressed, err := codec.Compress(c, nil, table)
	if err != nil {
		return nil, fmt.Errorf("compress blob meta: %w", err)
	}
	if !compressed {
		c, stored = codec.None, table
	}
	h := Header{
		Features:           features | SeparateFeatures | FeatureZran,
		CICompressor:       c,
		CIEntries:          uint32(len(infos)),
		CIOffset:           0,
		CICompressedSize:   uint64(len(stored)),
		CIUncompressedSize: uint64(len(table)),
		CIZranOffset:       uint64(len(entries)),
		CIZranSize:         uint64(len(zran)),
		CIZranCount:        zranCount,
	}
	if err := h.check(); err != nil {
		return nil, fmt.Errorf("blob meta: %w", err)
	}
	hb, _ := h.MarshalBinary()

	var out bytes.Buffer
	out.Write(stored)
	out.Write(hb)
	out.Write(tarHeader(TOCBlobMeta, uint64(len(stored)+len(hb))))
	digOff := uint64(out.Len())
	dig := make([]byte, 0, 32*len(digests))
	for _, d := range digests {
		dig = append(dig, d[:]...)
	}
	out.Write(dig)
	out.Write(tarHeader(TOCDigests, uint64(len(dig))))

	tocFlags := map[codec.Compressor]uint32{codec.None: tocCompressNone, codec.Zstd: tocCompressZstd, codec.LZ4Block: tocCompressLZ4}
	var toc []byte
	for _, e := range []TOCEntry{
		{tocFlags[c], TOCBlobMeta, sha256.Sum256(table), 0, uint64(len(stored)), uint64(len(table))},
		{tocCompressNone, TOCMetaHeader, sha256.Sum256(hb), uint64(len(stored)), HeaderSize, HeaderSize},
		{tocCompressNone, TOCDigests, sha256.Sum256(dig), digOff, uint64(len(dig)), uint64(len(dig))},
	} {
		toc = e.appendTo(toc)
	}
	tocStart := out.Len()
	out.Write(toc)
	out.Write(tarHeader(TOCName, uint64(len(toc))))

	s := &Separate{
		Header:    h,
		Size:      uint64(out.Len()),
		Digest:    sha256.Sum256(out.Bytes()),
		TOCDigest: sha256.Sum256(out.Bytes()[tocStart:]),
		TOCSize:   uint32(out.Len() - tocStart),
	}
	if _, err := w.Write(out.Bytes()); err != nil {
		return nil, fmt.Errorf("write blob meta: %w", err)
	}
	return s, nil
}

// appendTo appends e as a TocEntry (toc.rs, 128 bytes), the layout
// ReadTOC decodes: flags u32 @0, name [16] @8, sha256 of the uncompressed
// data @24, compressed offset @56, compressed size @64, uncompressed size
// @72.
func (e *TOCEntry) appendTo(b []byte) []byte {
	r := make([]byte, TOCEntrySize)
	le := binary.LittleEndian
	le.PutUint32(r[0:], e.Flags)
	copy(r[8:24], e.Name)
	copy(r[24:56], e.UncompressedDigest[:])
	le.PutUint64(r[56:], e.CompressedOffset)
	le.PutUint64(r[64:], e.CompressedSize)
	le.PutUint64(r[72:], e.UncompressedSize)
	return append(b, r...)
}

// tarHeader is the 512-byte header nydus-image writes after a section:
// tar-rs Header::new_gnu with the path, a regular-file type, the size and
// the checksum set, everything else zero (context.rs write_tar_header).
func tarHeader(name string, size uint64) []byte {
	h := make([]byte, 512)
	copy(h[0:100], name)
	octal(h[124:136], size)
	h[156] = '0'
	copy(h[257:265], "ustar  \x00") // GNU magic and version
	for i := 148; i < 156; i++ {
		h[i] = ' '
	}
	var sum uint64
	for _, c := range h {
		sum += uint64(c)
	}
	octal(h[148:156], sum)
	return h
}

// octal writes v zero-padded in all but the last byte of f, which is NUL
// (tar-rs octal_into).
func octal(f []byte, v uint64) {
	s := fmt.Sprintf("%0*o", len(f)-1, v)
	copy(f, s[len(s)-(len(f)-1):])
	f[len(f)-1] = 0
}

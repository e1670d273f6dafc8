package v5

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/codec"
)

// Fixture table indexes used below (see TestFixture for the tree).
const (
	idxRoot        = 1
	idxHardlinkDir = 2  // /hardlink-test, children 5..6
	idxSymlinkDir  = 4  // /symlink-test, children 48..54
	idxFoo         = 5  // /hardlink-test/foo, inode 5
	idxTestSh      = 6  // /hardlink-test/test.sh, hardlink of inode 5
	idxBusyboxDir  = 7  // /normal-file-test/busybox
	idxJSON        = 11 // /normal-file-test/busybox/af2f...json, 1 chunk
	idxManifest    = 12 // /normal-file-test/busybox/manifest.json, 1 chunk
	idxBinDir      = 15 // .../bin, empty
	idxBar         = 48 // /symlink-test/bar -> ../hardlink-test-tt
)

// Field offsets within a RafsV5Inode record.
const (
	fIno         = 40
	fMode        = 60
	fSize        = 64
	fFlags       = 80
	fChildIndex  = 92
	fChildCount  = 96
	fNameSize    = 100
	fSymlinkSize = 102
)

// Field offsets within the superblock.
const (
	sbVersion         = 4
	sbSize            = 8
	sbBlockSize       = 12
	sbFlags           = 16
	sbInodesCount     = 24
	sbInodeTableOff   = 32
	sbPrefetchOff     = 40
	sbBlobTableOff    = 48
	sbInodeEntries    = 56
	sbPrefetchEntries = 60
	sbBlobTableSize   = 64
	sbExtEntries      = 68
)

func recordOff(b []byte, idx uint32) uint64 {
	return uint64(le.Uint32(b[SuperblockSize+4*(idx-1):])) << 3
}

// chunkOff is the offset of the first chunk info of a regular file record
// without xattrs.
func chunkOff(b []byte, idx uint32) uint64 {
	off := recordOff(b, idx)
	var in inode
	in.decode(b[off:])
	return off + inodeSize + alignUp(uint64(in.nameSize)) + alignUp(uint64(in.symlinkSize))
}

func TestReadHostile(t *testing.T) {
	u32 := func(off uint64, v uint32) func(b []byte) { return func(b []byte) { le.PutUint32(b[off:], v) } }
	u64 := func(off uint64, v uint64) func(b []byte) { return func(b []byte) { le.PutUint64(b[off:], v) } }
	rec := func(idx uint32, field uint64, put func(b []byte, off uint64)) func(b []byte) {
		return func(b []byte) { put(b, recordOff(b, idx)+field) }
	}
	rec16 := func(idx uint32, field uint64, v uint16) func(b []byte) {
		return rec(idx, field, func(b []byte, off uint64) { le.PutUint16(b[off:], v) })
	}
	rec32 := func(idx uint32, field uint64, v uint32) func(b []byte) {
		return rec(idx, field, func(b []byte, off uint64) { le.PutUint32(b[off:], v) })
	}
	rec64 := func(idx uint32, field uint64, v uint64) func(b []byte) {
		return rec(idx, field, func(b []byte, off uint64) { le.PutUint64(b[off:], v) })
	}
	name := func(idx uint32, n string) func(b []byte) {
		return func(b []byte) {
			off := recordOff(b, idx)
			copy(b[off+inodeSize:], n)
		}
	}
	chunk := func(idx uint32, field uint64, v uint64, size int) func(b []byte) {
		return func(b []byte) {
			off := chunkOff(b, idx) + field
			switch size {
			case 4:
				le.PutUint32(b[off:], uint32(v))
			case 8:
				le.PutUint64(b[off:], v)
			}
		}
	}
	const (
		cBlobIndex  = 32
		cFlags      = 36
		cCompSize   = 40
		cUncompSize = 44
		cCompOff    = 48
		cIndex      = 72
	)
	cases := []struct {
		name   string
		mutate func(b []byte)
		notV5  bool
	}{
		{"bad magic", func(b []byte) { b[0] = 'X' }, true},
		{"v4 version", u32(sbVersion, 0x400), true},
		{"superblock size", u32(sbSize, 4096), false},
		{"chunk size zero", u32(sbBlockSize, 0), false},
		{"chunk size not a power of two", u32(sbBlockSize, 0x100001), false},
		{"chunk size too big", u32(sbBlockSize, 1<<30), false},
		{"unknown superblock flag", u64(sbFlags, 0x9|0x400), false},
		{"superblock flag above 32 bits", u64(sbFlags, 0x9|1<<40), false},
		{"encrypted", u64(sbFlags, 0x9|flagEncryptAES128XTS), false},
		{"inode count above table", u64(sbInodesCount, 1000), false},
		{"inode table entries absurd", u32(sbInodeEntries, 0xffffffff), false},
		{"inode table entries zero", u32(sbInodeEntries, 0), false},
		{"inode table past end", u64(sbInodeTableOff, 1<<40), false},
		{"inode table offset wraps", u64(sbInodeTableOff, 0xffff_ffff_ffff_fff8), false},
		{"inode table misaligned", u64(sbInodeTableOff, SuperblockSize+4), false},
		{"inode table inside superblock", u64(sbInodeTableOff, 0), false},
		{"blob table size absurd", u32(sbBlobTableSize, 0xffffffff), false},
		{"blob table overlaps inode table", u64(sbBlobTableOff, SuperblockSize), false},
		{"ext blob table entries absurd", u32(sbExtEntries, 0xffffffff), false},
		{"prefetch table entries absurd", u32(sbPrefetchEntries, 0xffffffff), false},
		{"prefetch table overlaps blob table", u32(sbPrefetchEntries, 2), false},
		{"blob id not text", func(b []byte) {
			off := le.Uint64(b[sbBlobTableOff:])
			b[off+8] = 0xff
		}, false},
		{"empty blob id", func(b []byte) {
			off := le.Uint64(b[sbBlobTableOff:])
			b[off+8] = 0
		}, false},
		{"root not a directory", rec32(idxRoot, fMode, syscall.S_IFREG|0o644), false},
		{"root inode number", rec64(idxRoot, fIno, 2), false},
		{"table offset in superblock", u32(SuperblockSize+4, 1), false},
		{"table offset at 2^32", u32(SuperblockSize+4, 1<<29), false},
		{"table offset past end", u32(SuperblockSize+4, 1<<28), false},
		{"two indexes share a record", func(b []byte) { copy(b[SuperblockSize+4*(idxFoo-1):], b[SuperblockSize+4*(idxTestSh-1):][:4]) }, false},
		{"records overlap", func(b []byte) {
			le.PutUint32(b[SuperblockSize+4*(idxTestSh-1):], uint32((recordOff(b, idxFoo)+8)>>3))
		}, false},
		{"child range past table", rec32(idxRoot, fChildCount, 100), false},
		{"child range wraps", rec32(idxRoot, fChildIndex, 0xffffffff), false},
		{"child index points back (loop)", rec32(idxHardlinkDir, fChildIndex, 1), false},
		{"child index is itself", rec32(idxHardlinkDir, fChildIndex, idxHardlinkDir), false},
		{"two directories share children", func(b []byte) {
			rec32(idxSymlinkDir, fChildIndex, idxFoo)(b)
			rec32(idxSymlinkDir, fChildCount, 2)(b)
		}, false},
		{"child count absurd", rec32(idxRoot, fChildCount, 0xffffffff), false},
		{"name with slash", name(idxFoo, "f/o"), false},
		{"name with NUL", name(idxFoo, "f\x00o"), false},
		{"name dot-dot", func(b []byte) { rec16(idxHardlinkDir, fNameSize, 2)(b); name(idxHardlinkDir, "..")(b) }, false},
		{"name dot", func(b []byte) { rec16(idxHardlinkDir, fNameSize, 1)(b); name(idxHardlinkDir, ".")(b) }, false},
		{"empty name", rec16(idxHardlinkDir, fNameSize, 0), false},
		{"name too long", rec16(idxHardlinkDir, fNameSize, 300), false},
		{"duplicate names", func(b []byte) {
			// "test.sh" -> "foo\0\0\0\0" with size 3: both children named foo.
			rec16(idxTestSh, fNameSize, 3)(b)
			name(idxTestSh, "foo\x00\x00\x00\x00")(b)
		}, false},
		{"hardlink to a directory", rec64(idxTestSh, fIno, idxBusyboxDir), false},
		{"hardlink to a symlink", rec64(idxTestSh, fIno, idxBar), false},
		{"inode number zero", rec64(idxJSON, fIno, 0), false},
		{"inode number past table", rec64(idxJSON, fIno, 1000), false},
		{"symlink without target", rec16(idxBar, fSymlinkSize, 0), false},
		{"regular file with a target", rec16(idxJSON, fSymlinkSize, 3), false},
		{"unknown inode flag", rec64(idxJSON, fFlags, 0x100), false},
		{"no file type", rec32(idxBinDir, fMode, 0o755), false},
		{"mode bits above the type", rec32(idxBar, fMode, 0xf0000|0o777), false},
		{"chunk count absurd", rec32(idxJSON, fChildCount, 0xffffffff), false},
		{"chunk count without holes", rec32(idxJSON, fChildCount, 0), false},
		{"file size absurd", func(b []byte) {
			rec64(idxJSON, fFlags, inodeFlagHasHole)(b)
			rec64(idxJSON, fSize, 1<<50)(b)
		}, false},
		{"chunk past file size", rec64(idxJSON, fSize, 10), false},
		{"xattr table absurd", rec64(idxBinDir, fFlags, inodeFlagXattr), false},
		{"chunk past blob end", chunk(idxJSON, cCompOff, 3508766, 8), false},
		{"chunk offset wraps", chunk(idxJSON, cCompOff, 0xffff_ffff_ffff_f000, 8), false},
		{"chunk size absurd", chunk(idxJSON, cUncompSize, 0xffffffff, 4), false},
		{"chunk size zero", chunk(idxJSON, cUncompSize, 0, 4), false},
		{"raw chunk sizes differ", chunk(idxJSON, cCompSize, 10, 4), false},
		{"chunk blob index", chunk(idxJSON, cBlobIndex, 5, 4), false},
		{"chunk index past blob", chunk(idxJSON, cIndex, 1000, 4), false},
		{"encrypted chunk", chunk(idxJSON, cFlags, chunkFlagEncrypted, 4), false},
		{"batch chunk", chunk(idxJSON, cFlags, chunkFlagBatch, 4), false},
		{"unknown chunk flag", chunk(idxJSON, cFlags, 0x100, 4), false},
		{"one chunk described two ways", func(b []byte) {
			jsonIndex := le.Uint32(b[chunkOff(b, idxJSON)+cIndex:])
			le.PutUint32(b[chunkOff(b, idxManifest)+cIndex:], jsonIndex)
		}, false},
	}
	orig := fixture(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := bytes.Clone(orig)
			c.mutate(b)
			if bytes.Equal(b, orig) {
				t.Fatal("mutation changed nothing")
			}
			img, err := Read(bytes.NewReader(b), int64(len(b)))
			if err == nil {
				t.Fatalf("accepted:\n%s", describe(img))
			}
			want := rafs.ErrInvalid
			if c.notV5 {
				want = ErrNotV5
			}
			if !errors.Is(err, want) {
				t.Fatalf("error %q does not wrap %q", err, want)
			}
			t.Log(err)
		})
	}
}

// TestReadHostileWritten corrupts a written image, which has the tables
// the fixture lacks (prefetch, xattrs).
func TestReadHostileWritten(t *testing.T) {
	img, _ := mixedImage(t, codec.None, codec.SHA256, 4096)
	orig := encode(t, img)
	var sb superblock
	sb.decode(orig)
	cases := []struct {
		name   string
		mutate func(b []byte)
	}{
		{"prefetch of a missing inode", func(b []byte) { le.PutUint32(b[sb.prefetchTableOffset:], 0x7fffffff) }},
		{"prefetch table past end", func(b []byte) { le.PutUint64(b[sbPrefetchOff:], uint64(len(b))) }},
		{"ext table offset wraps", func(b []byte) { le.PutUint64(b[72:], 0xffff_ffff_ffff_ffc0) }},
		{"xattr pair past table", func(b []byte) {
			// The first xattr pair of /etc (a directory) claims more
			// bytes than its table has.
			etcIdx := findIndex(t, b, "etc")
			off := recordOff(b, etcIdx)
			var in inode
			in.decode(b[off:])
			x := off + inodeSize + alignUp(uint64(in.nameSize))
			le.PutUint32(b[x+8:], 1000)
		}},
		{"xattr pair without NUL", func(b []byte) {
			etcIdx := findIndex(t, b, "etc")
			off := recordOff(b, etcIdx)
			var in inode
			in.decode(b[off:])
			x := off + inodeSize + alignUp(uint64(in.nameSize))
			// "user.dir\0d" -> "user.dirXd"
			b[x+8+4+8] = 'X'
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := bytes.Clone(orig)
			c.mutate(b)
			if _, err := Read(bytes.NewReader(b), int64(len(b))); !errors.Is(err, rafs.ErrInvalid) {
				t.Fatalf("got %v, want an error wrapping rafs.ErrInvalid", err)
			}
		})
	}
}

// findIndex returns the table index of the first record named name.
func findIndex(t *testing.T, b []byte, name string) uint32 {
	var sb superblock
	sb.decode(b)
	for idx := uint32(1); idx <= sb.inodeTableEntries; idx++ {
		off := recordOff(b, idx)
		var in inode
		in.decode(b[off:])
		if string(b[off+inodeSize:off+inodeSize+uint64(in.nameSize)]) == name {
			return idx
		}
	}
	t.Fatalf("no record named %q", name)
	return 0
}

func TestReadBadSizes(t *testing.T) {
	orig := fixture(t)
	v6, err := os.ReadFile(filepath.Join(fixtureDir, "..", "v6-zstd-blake3", "bootstrap"))
	if err != nil {
		t.Fatalf("v6 fixture: %v", err)
	}
	cases := []struct {
		name string
		r    io.ReaderAt
		size int64
		want error
	}{
		{"empty", bytes.NewReader(nil), 0, ErrNotV5},
		{"v6 bootstrap", bytes.NewReader(v6), int64(len(v6)), ErrNotV5},
		{"superblock only", bytes.NewReader(orig[:SuperblockSize]), SuperblockSize, rafs.ErrInvalid},
		{"unaligned size", bytes.NewReader(orig[:len(orig)-1]), int64(len(orig) - 1), rafs.ErrInvalid},
		{"size beyond the v5 limit", bytes.NewReader(orig), 1 << 40, rafs.ErrInvalid},
		{"negative size", bytes.NewReader(orig), -8, rafs.ErrInvalid},
		{"reader shorter than size", bytes.NewReader(orig[:SuperblockSize+8]), int64(len(orig)), io.ErrUnexpectedEOF},
		{"reader fails", errReader{}, int64(len(orig)), errBroken},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := Read(c.r, c.size); !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
}

var errBroken = errors.New("broken disk")

type errReader struct{}

func (errReader) ReadAt(p []byte, off int64) (int, error) { return 0, errBroken }

// TestReadTruncated: every prefix of a bootstrap is rejected.
func TestReadTruncated(t *testing.T) {
	orig := fixture(t)
	for n := range len(orig) {
		if img, err := Read(bytes.NewReader(orig[:n]), int64(n)); err == nil {
			t.Fatalf("%d-byte prefix accepted:\n%s", n, describe(img))
		}
	}
}

// TestReadBitFlips flips one bit in every byte of the fixture and of a
// written image: each result is rejected or is an image that survives a
// write/read round trip unchanged.
func TestReadBitFlips(t *testing.T) {
	img, _ := mixedImage(t, codec.Zstd, codec.Blake3, 4096)
	caps := lookup(img, "/etc/caps")
	caps.Xattrs = caps.Xattrs[:2] // drop the 64 KiB value: keep the loop quick
	for name, orig := range map[string][]byte{"fixture": fixture(t), "written": encode(t, img)} {
		t.Run(name, func(t *testing.T) {
			var accepted int
			b := bytes.Clone(orig)
			for k := range orig {
				b[k] ^= 1 << (k % 8)
				// Every flip is decoded; an eighth of them also go
				// through the (slower) digest check and round trip.
				if k%8 == 0 {
					if checkAccepted(t, b) {
						accepted++
					}
				} else if _, err := Read(bytes.NewReader(b), int64(len(b))); err == nil {
					accepted++
				}
				b[k] = orig[k]
			}
			t.Logf("%d of %d flips accepted (mtimes, digests, uids, ...)", accepted, len(orig))
		})
	}
}

// checkAccepted decodes b; if it decodes, the image must validate, read
// through Spans, write a bootstrap whose digests verify, and round-trip
// through Write and Read.
func checkAccepted(t testing.TB, b []byte) bool {
	if err := VerifyDigests(bytes.NewReader(b), int64(len(b))); err != nil &&
		!errors.Is(err, rafs.ErrInvalid) && !errors.Is(err, ErrNotV5) && !errors.Is(err, codec.ErrDigestMismatch) {
		t.Fatalf("VerifyDigests: unexpected error %q", err)
	}
	img, err := Read(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		if !errors.Is(err, rafs.ErrInvalid) && !errors.Is(err, ErrNotV5) {
			t.Fatalf("error %q wraps neither rafs.ErrInvalid nor ErrNotV5", err)
		}
		return false
	}
	if err := img.Validate(); err != nil {
		t.Fatalf("Read returned an invalid image: %v", err)
	}
	for _, i := range img.Inodes {
		if i.IsRegular() {
			i.Spans(0, i.Size)
		}
	}
	// Write numbers inodes canonically, so equal encodings mean equal
	// trees whatever order the hostile input listed them in.
	var w1, w2 bytes.Buffer
	if err := Write(&w1, img); err != nil {
		t.Fatalf("accepted image does not write: %v", err)
	}
	if err := VerifyDigests(bytes.NewReader(w1.Bytes()), int64(w1.Len())); err != nil {
		t.Fatalf("written image fails digest validation: %v", err)
	}
	again, err := Read(bytes.NewReader(w1.Bytes()), int64(w1.Len()))
	if err != nil {
		t.Fatalf("written image does not read: %v", err)
	}
	if err := Write(&w2, again); err != nil {
		t.Fatalf("re-read image does not write: %v", err)
	}
	if !bytes.Equal(w1.Bytes(), w2.Bytes()) {
		t.Fatalf("round trip of an accepted image differs:\n%s", diffLines(describe(img), describe(again)))
	}
	return true
}

// TestReadAllocBound: hostile counts do not turn into big allocations.
func TestReadAllocBound(t *testing.T) {
	orig := fixture(t)
	muts := map[string]func(b []byte){
		"inode entries":   func(b []byte) { le.PutUint32(b[sbInodeEntries:], 0xffffffff) },
		"child count":     func(b []byte) { le.PutUint32(b[recordOff(b, idxRoot)+fChildCount:], 0xffffffff) },
		"chunk count":     func(b []byte) { le.PutUint32(b[recordOff(b, idxJSON)+fChildCount:], 0x7fffffff) },
		"blob table":      func(b []byte) { le.PutUint32(b[sbBlobTableSize:], 0xffffffff) },
		"prefetch":        func(b []byte) { le.PutUint32(b[sbPrefetchEntries:], 0xffffffff) },
		"ext blob table":  func(b []byte) { le.PutUint32(b[sbExtEntries:], 0xffffffff) },
		"xattr table":     func(b []byte) { le.PutUint64(b[recordOff(b, idxBinDir)+fFlags:], inodeFlagXattr) },
		"symlink, name":   func(b []byte) { le.PutUint16(b[recordOff(b, idxBar)+fSymlinkSize:], 0xffff) },
		"declared size":   func(b []byte) {},
		"file size holes": func(b []byte) { le.PutUint64(b[recordOff(b, idxJSON)+fSize:], 1<<62) },
	}
	for name, mut := range muts {
		t.Run(name, func(t *testing.T) {
			b := bytes.Clone(orig)
			mut(b)
			size := int64(len(b))
			if name == "declared size" {
				size = MaxMetadataSize
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := Read(bytes.NewReader(b), size)
			runtime.ReadMemStats(&after)
			if err == nil {
				t.Fatal("accepted")
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > 32*uint64(len(b))+1<<20 {
				t.Fatalf("allocated %d bytes for a %d-byte input", got, len(b))
			}
		})
	}
}

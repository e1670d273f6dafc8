package fs

import (
	"encoding/json"
	"math/bits"
	"strconv"
	"sync/atomic"
	"time"
)

// Fop numbers a filesystem operation as nydusd's StatsFop does, so the
// per-file arrays line up with nydusd's /metrics/files output.
type Fop int

// Operations counted per file.
const (
	FopGetattr Fop = iota
	FopReadlink
	FopOpen
	FopRelease
	FopRead
	FopStatfs
	FopGetxattr
	FopListxattr
	FopOpendir
	FopLookup
	FopReaddir
	FopReaddirplus
	FopAccess
	FopForget
	FopBatchForget
	fopMax
)

// blockSizes is the number of read-size buckets: <1K, 1K, 4K, 16K, 64K,
// 128K, 512K, 1M and up (nydusd's BLOCK_READ_SIZES_MAX).
const blockSizes = 8

// sizeIndex buckets a read size as nydusd's request_size_index does.
func sizeIndex(size int) int {
	ceil := bits.LeadingZeros64(uint64(size) >> 10)
	shift := (max(ceil, 53) - 53) << 2
	return int(uint64(0x0112_2334_5567)>>shift) & 0xf
}

// FileStats are one inode's counters (nydusd InodeIoStats).
type FileStats struct {
	TotalFops      atomic.Uint64
	DataRead       atomic.Uint64
	BlockCountRead [blockSizes]atomic.Uint64
	FopHits        [fopMax]atomic.Uint64
	FopErrors      [fopMax]atomic.Uint64
}

// AccessPattern records how often and since when a file is read (nydusd
// AccessPattern).
type AccessPattern struct {
	NrRead      atomic.Uint64
	FirstAccess atomic.Int64 // unix nanoseconds of the first read
}

// accounting holds the optional per-inode records; slots are allocated on
// first use so that a large image costs one pointer per inode.
type accounting struct {
	files    []atomic.Pointer[FileStats]
	patterns []atomic.Pointer[AccessPattern]
	latest   []atomic.Uint64 // bit ino%64 of word ino/64: read since last export
}

func newAccounting(n int, files, patterns, latest bool) *accounting {
	a := &accounting{}
	if files {
		a.files = make([]atomic.Pointer[FileStats], n)
	}
	if patterns {
		a.patterns = make([]atomic.Pointer[AccessPattern], n)
	}
	if latest {
		a.latest = make([]atomic.Uint64, n/64+1) // inodes 1..n
	}
	return a
}

func slot[T any](s []atomic.Pointer[T], ino uint64) *T {
	if ino == 0 || ino > uint64(len(s)) {
		return nil
	}
	p := &s[ino-1]
	if v := p.Load(); v != nil {
		return v
	}
	p.CompareAndSwap(nil, new(T))
	return p.Load()
}

// record counts one operation on ino; size is the bytes read for FopRead.
func (a *accounting) record(ino uint64, fop Fop, size int, ok bool) {
	if a == nil {
		return
	}
	if fs := slot(a.files, ino); fs != nil {
		if ok {
			fs.FopHits[fop].Add(1)
			fs.TotalFops.Add(1)
		} else {
			fs.FopErrors[fop].Add(1)
		}
		if fop == FopRead && ok {
			fs.DataRead.Add(uint64(size))
			fs.BlockCountRead[sizeIndex(size)].Add(1)
		}
	}
	if fop == FopRead && ok && ino/64 < uint64(len(a.latest)) {
		a.latest[ino/64].Or(1 << (ino % 64))
	}
	if fop == FopRead {
		if p := slot(a.patterns, ino); p != nil {
			p.NrRead.Add(1)
			p.FirstAccess.CompareAndSwap(0, time.Now().UnixNano())
		}
	}
}

func loadAll(s []atomic.Uint64) []uint64 {
	out := make([]uint64, len(s))
	for k := range s {
		out[k] = s[k].Load()
	}
	return out
}

// FilesJSON returns the per-file counters as nydusd's /metrics/files
// does: an object keyed by inode number. It is empty unless
// Options.FilesAccount is set.
func (f *FS) FilesJSON() ([]byte, error) {
	type fileJSON struct {
		TotalFops      uint64   `json:"total_fops"`
		DataRead       uint64   `json:"data_read"`
		BlockCountRead []uint64 `json:"block_count_read"`
		FopHits        []uint64 `json:"fop_hits"`
		FopErrors      []uint64 `json:"fop_errors"`
	}
	out := map[string]fileJSON{}
	if f.acct != nil {
		for k := range f.acct.files {
			s := f.acct.files[k].Load()
			if s == nil {
				continue
			}
			out[strconv.Itoa(k+1)] = fileJSON{
				TotalFops: s.TotalFops.Load(), DataRead: s.DataRead.Load(),
				BlockCountRead: loadAll(s.BlockCountRead[:]),
				FopHits:        loadAll(s.FopHits[:]), FopErrors: loadAll(s.FopErrors[:]),
			}
		}
	}
	return json.Marshal(out)
}

// AccessPatternsJSON returns the files read so far as nydusd's
// /metrics/pattern does. It is empty unless Options.AccessPattern is set.
func (f *FS) AccessPatternsJSON() ([]byte, error) {
	type patternJSON struct {
		Ino                  uint64 `json:"ino"`
		NrRead               uint64 `json:"nr_read"`
		FirstAccessTimeSecs  int64  `json:"first_access_time_secs"`
		FirstAccessTimeNanos int64  `json:"first_access_time_nanos"`
	}
	out := []patternJSON{}
	if f.acct != nil {
		for k := range f.acct.patterns {
			p := f.acct.patterns[k].Load()
			if p == nil || p.NrRead.Load() == 0 {
				continue
			}
			t := p.FirstAccess.Load()
			out = append(out, patternJSON{Ino: uint64(k + 1), NrRead: p.NrRead.Load(),
				FirstAccessTimeSecs: t / 1e9, FirstAccessTimeNanos: t % 1e9})
		}
	}
	return json.Marshal(out)
}

// LatestReadFilesJSON returns the files read since the previous call and
// forgets them, as nydusd's /metrics/files?latest=true: inode ranges,
// [first, last] or [ino] alone, ascending. It is [] unless
// Options.LatestReadFiles is set.
func (f *FS) LatestReadFilesJSON() ([]byte, error) {
	out := [][]uint64{}
	if f.acct != nil {
		var start, last uint64
		flush := func() {
			if start == 0 {
				return
			}
			if start == last {
				out = append(out, []uint64{start})
			} else {
				out = append(out, []uint64{start, last})
			}
		}
		for w := range f.acct.latest {
			v := f.acct.latest[w].Swap(0)
			for v != 0 {
				ino := uint64(w)*64 + uint64(bits.TrailingZeros64(v))
				v &= v - 1
				if start == 0 || ino != last+1 {
					flush()
					start = ino
				}
				last = ino
			}
		}
		flush()
	}
	return json.Marshal(out)
}

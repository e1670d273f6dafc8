// Package blobcache is the on-disk chunk cache: per blob a data file and a
// persisted chunk map, in nydusd's filecache layout so the fscache and
// fanotify modes (and nydusd itself) can use the same files:
//
//	<work_dir>/<blob id>.blob.data   uncompressed chunks at their uncompressed offsets
//	<work_dir>/<blob id>.chunk_map   4 KiB header + one bit per chunk (index order)
//
// or, with compressed caching, <blob id>.blob.raw (chunks as stored, at
// their compressed offsets) and <blob id>.blob.raw.chunk_map. The map
// header is nydus's PersistMap (magic 0x424D4150, version 1, magic2
// 0x434D4150); bit i is (0x80 >> (i%8)) of byte i/8.
//
// A chunk's bit is set in the map file only after its (verified) bytes
// were written and fdatasync'd, so after a crash at any point a set bit
// always means good data; a lost bit only costs a refetch. Marking is
// batched: written chunks are served from the data file at once, and a
// flush (every FlushInterval, every 256 MiB written to a blob, and on release)
// syncs the data and then writes their bits.
//
// A Store is shared by everything in the process that opens the same
// directory, and a Blob by every image that uses it. With a size limit,
// blobs no image holds are evicted, least recently used first.
package blobcache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/rafs"
)

// Chunk map header constants (nydus storage/src/cache/state/persist_map.rs).
const (
	mapMagic1   = 0x424D4150
	mapMagic2   = 0x434D4150
	mapAllReady = 0x4D4D4150
	mapHeader   = 4096
)

// File name suffixes.
const (
	DataSuffix = ".blob.data"
	RawSuffix  = ".blob.raw"
	MapSuffix  = ".chunk_map"
)

// ErrNoGeometry: the blob record lacks the chunk count or size the cache
// files are laid out by; such blobs are read uncached.
var ErrNoGeometry = errors.New("blob has no chunk count or size")

var (
	storesMu sync.Mutex
	stores   = map[string]*Store{}
)

// Store is one cache directory.
type Store struct {
	dir   string
	limit int64

	mu      sync.Mutex
	refs    int
	blobs   map[string]*Blob // by file base name (id + suffix)
	written int64            // bytes written since the last eviction pass
	// dirty holds blobs with unflushed writes; flushTimer flushes them.
	dirty      map[*Blob]int64
	flushTimer *time.Timer
}

// Open returns the process-wide Store of dir, creating dir if needed.
// limit (bytes, 0 = none) bounds the disk space of the directory's cache
// files; the largest limit any opener asked for wins. Close each Open.
func Open(dir string, limit int64) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	storesMu.Lock()
	defer storesMu.Unlock()
	if s, ok := stores[abs]; ok {
		s.mu.Lock()
		s.refs++
		if limit == 0 || (s.limit != 0 && limit > s.limit) {
			s.limit = limit
		}
		s.mu.Unlock()
		return s, nil
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	s := &Store{dir: abs, limit: limit, refs: 1, blobs: map[string]*Blob{}, dirty: map[*Blob]int64{}}
	stores[abs] = s
	return s, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// Close drops this opener's reference; the last one closes all files.
func (s *Store) Close() error {
	storesMu.Lock()
	defer storesMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refs--
	if s.refs > 0 {
		return nil
	}
	delete(stores, s.dir)
	for k, b := range s.blobs {
		b.closeFiles()
		delete(s.blobs, k)
	}
	return nil
}

// Blob opens (or returns the already open) cache of b. compressed selects
// the raw (compressed) layout. Release it when done.
func (s *Store) Blob(b *rafs.Blob, compressed bool) (*Blob, error) {
	if b.ChunkCount == 0 {
		return nil, ErrNoGeometry
	}
	size := b.UncompressedSize
	suffix := DataSuffix
	if compressed {
		size, suffix = b.CompressedSize, RawSuffix
	}
	if size == 0 {
		return nil, ErrNoGeometry
	}
	name := b.ID + suffix
	s.mu.Lock()
	defer s.mu.Unlock()
	if cb, ok := s.blobs[name]; ok {
		if cb.count != b.ChunkCount || cb.size != size {
			return nil, fmt.Errorf("blobcache: blob %s opened with %d chunks/%d bytes, now %d/%d", b.ID, cb.count, cb.size, b.ChunkCount, size)
		}
		cb.refs++
		return cb, nil
	}
	cb, err := openBlob(s, b.ID, name, b.ChunkCount, size, compressed)
	if err != nil {
		return nil, err
	}
	cb.refs = 1
	s.blobs[name] = cb
	return cb, nil
}

// Blob is one blob's cache files.
type Blob struct {
	store      *Store
	id, name   string
	count      uint32
	size       uint64
	compressed bool
	data, cmap *os.File

	mu    sync.RWMutex
	bits  []byte // chunks present in the data file (in page cache at least)
	ready uint32
	// durable mirrors the map file: bits whose data is known fdatasync'd.
	durable []byte
	pending []uint32 // set in bits, not yet in durable

	flushMu  sync.Mutex // serializes flushes
	refs     int        // under store.mu
	lastUsed time.Time
}

func mapName(name string, compressed bool) string {
	if compressed {
		return name + MapSuffix // <id>.blob.raw.chunk_map
	}
	return strings.TrimSuffix(name, DataSuffix) + MapSuffix // nydus: <id>.chunk_map
}

func openBlob(s *Store, id, name string, count uint32, size uint64, compressed bool) (*Blob, error) {
	dataPath := filepath.Join(s.dir, name)
	mapPath := filepath.Join(s.dir, mapName(name, compressed))
	data, err := os.OpenFile(dataPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	cmap, err := os.OpenFile(mapPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		data.Close()
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	b := &Blob{store: s, id: id, name: name, count: count, size: size, compressed: compressed, data: data, cmap: cmap}
	if err := b.load(); err != nil {
		b.closeFiles()
		return nil, fmt.Errorf("blobcache: blob %s: %w", id, err)
	}
	return b, nil
}

// load reads the chunk map, or starts an empty one if it is missing or
// does not match the blob (then the data is untrusted and zapped).
func (b *Blob) load() error {
	mapSize := int64(mapHeader + (b.count+7)/8)
	st, err := b.cmap.Stat()
	if err != nil {
		return err
	}
	buf := make([]byte, mapSize)
	valid := false
	if st.Size() == mapSize {
		if _, err := b.cmap.ReadAt(buf, 0); err == nil {
			le := binary.LittleEndian
			valid = le.Uint32(buf[0:]) == mapMagic1 && le.Uint32(buf[4:]) >= 1 && le.Uint32(buf[8:]) == mapMagic2
		}
	}
	dst, err := b.data.Stat()
	if err != nil {
		return err
	}
	if valid && dst.Size() != int64(b.size) {
		valid = false
	}
	if !valid {
		if st.Size() != 0 {
			slog.Warn("blobcache: chunk map does not match the blob, starting empty", "blob", b.id, "map", b.cmap.Name())
		}
		// Data first, so no stale bit can outlive the data it described.
		if err := b.data.Truncate(0); err != nil {
			return err
		}
		if err := b.data.Truncate(int64(b.size)); err != nil {
			return err
		}
		clear(buf)
		le := binary.LittleEndian
		le.PutUint32(buf[0:], mapMagic1)
		le.PutUint32(buf[4:], 1)
		le.PutUint32(buf[8:], mapMagic2)
		if err := b.cmap.Truncate(0); err != nil {
			return err
		}
		if _, err := b.cmap.WriteAt(buf, 0); err != nil {
			return err
		}
		if err := unix.Fdatasync(int(b.cmap.Fd())); err != nil {
			return err
		}
	}
	b.bits = buf[mapHeader:]
	// Bits past count are padding; ignore any set there.
	if tail := b.count % 8; tail != 0 {
		b.bits[len(b.bits)-1] &= byte(0xff << (8 - tail))
	}
	b.durable = append([]byte(nil), b.bits...)
	for _, x := range b.bits {
		for ; x != 0; x &= x - 1 {
			b.ready++
		}
	}
	return nil
}

func mask(i uint32) byte { return 0x80 >> (i % 8) }

// Has reports whether chunk index i is cached.
func (b *Blob) Has(i uint32) bool {
	if i >= b.count {
		return false
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.bits[i/8]&mask(i) != 0
}

// Ready returns how many of the blob's chunks are cached.
func (b *Blob) Ready() (ready, total uint32) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.ready, b.count
}

// Compressed reports whether the cache holds chunks as stored (compressed).
func (b *Blob) Compressed() bool { return b.compressed }

// DataPath and MapPath are the blob's cache files.
func (b *Blob) DataPath() string { return b.data.Name() }
func (b *Blob) MapPath() string  { return b.cmap.Name() }

// ReadAt reads cached bytes at off of the data file.
func (b *Blob) ReadAt(p []byte, off int64) error {
	if off < 0 || uint64(off)+uint64(len(p)) > b.size {
		return fmt.Errorf("blobcache: blob %s: read [%d,+%d) past its %d bytes", b.id, off, len(p), b.size)
	}
	_, err := b.data.ReadAt(p, off)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return fmt.Errorf("blobcache: blob %s: %w", b.id, err)
	}
	return nil
}

// Write is one verified chunk to store.
type Write struct {
	Index uint32
	Off   int64 // in the data file
	Data  []byte
}

// WriteChunks stores verified chunks. They are readable (Has) at once;
// they are marked in the map file only by a later Flush, after their data
// is fdatasync'd, so a set bit on disk always means durable data.
func (b *Blob) WriteChunks(ws []Write) error {
	var n int64
	for _, w := range ws {
		if w.Index >= b.count || w.Off < 0 || uint64(w.Off)+uint64(len(w.Data)) > b.size {
			return fmt.Errorf("blobcache: blob %s: chunk %d [%d,+%d) outside %d chunks/%d bytes", b.id, w.Index, w.Off, len(w.Data), b.count, b.size)
		}
		if _, err := b.data.WriteAt(w.Data, w.Off); err != nil {
			return fmt.Errorf("blobcache: blob %s: write chunk %d: %w", b.id, w.Index, err)
		}
		n += int64(len(w.Data))
	}
	b.mu.Lock()
	for _, w := range ws {
		byteIdx := w.Index / 8
		if b.bits[byteIdx]&mask(w.Index) != 0 {
			continue
		}
		b.bits[byteIdx] |= mask(w.Index)
		b.ready++
		b.pending = append(b.pending, w.Index)
	}
	b.mu.Unlock()
	b.store.wrote(b, n)
	return nil
}

// Flush makes the data of every chunk written so far durable, then marks
// those chunks in the map file.
func (b *Blob) Flush() error {
	b.flushMu.Lock()
	defer b.flushMu.Unlock()
	b.mu.Lock()
	pend := b.pending
	b.pending = nil
	b.mu.Unlock()
	if len(pend) == 0 {
		return nil
	}
	if err := unix.Fdatasync(int(b.data.Fd())); err != nil {
		// A failed writeback may have lost the data (Linux marks the
		// pages clean and reports the error once): a retry would succeed
		// and mark chunks durable that never reached the disk, and the
		// page cache may drop them and read back holes. Forget them, and
		// those written meanwhile (their pages may have been in the failed
		// writeback too); a later read fetches them again.
		b.mu.Lock()
		pend = append(pend, b.pending...)
		b.pending = nil
		for _, i := range pend {
			if b.bits[i/8]&mask(i) != 0 {
				b.bits[i/8] &^= mask(i)
				b.ready--
			}
		}
		b.mu.Unlock()
		return fmt.Errorf("blobcache: blob %s: fdatasync: %d chunks dropped from the cache: %w", b.id, len(pend), err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	dirty := map[uint32]bool{}
	for _, i := range pend {
		// Invalidated meanwhile: leave it unmarked.
		if b.bits[i/8]&mask(i) != 0 {
			b.durable[i/8] |= mask(i)
			dirty[i/8] = true
		}
	}
	for byteIdx := range dirty {
		if _, err := b.cmap.WriteAt(b.durable[byteIdx:byteIdx+1], int64(mapHeader+byteIdx)); err != nil {
			return fmt.Errorf("blobcache: blob %s: chunk map: %w", b.id, err)
		}
	}
	return nil
}

// Invalidate clears chunk i's bit (its cached bytes failed a check).
func (b *Blob) Invalidate(i uint32) error {
	if i >= b.count {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	byteIdx := i / 8
	if b.bits[byteIdx]&mask(i) == 0 {
		return nil
	}
	b.bits[byteIdx] &^= mask(i)
	b.ready--
	b.durable[byteIdx] &^= mask(i)
	if _, err := b.cmap.WriteAt(b.durable[byteIdx:byteIdx+1], int64(mapHeader+byteIdx)); err != nil {
		return fmt.Errorf("blobcache: blob %s: chunk map: %w", b.id, err)
	}
	return nil
}

// Release drops a reference taken by Store.Blob.
func (b *Blob) Release() {
	if err := b.Flush(); err != nil {
		slog.Warn("blobcache: flush", "blob", b.id, "err", err)
	}
	s := b.store
	s.mu.Lock()
	b.refs--
	b.lastUsed = time.Now()
	s.mu.Unlock()
	s.maybeEvict(true)
}

func (b *Blob) closeFiles() {
	if err := b.Flush(); err != nil {
		slog.Warn("blobcache: flush", "blob", b.id, "err", err)
	}
	b.data.Close()
	b.cmap.Close()
}

// FlushInterval is how long written chunks may wait to be marked in
// their map file (a crash loses at most this much cache work).
var FlushInterval = time.Second

// flushBytes flushes a blob early once this much was written to it.
const flushBytes = 256 << 20

func (s *Store) wrote(b *Blob, n int64) {
	s.mu.Lock()
	s.written += n
	check := s.limit > 0 && s.written > s.limit/16
	s.dirty[b] += n
	early := s.dirty[b] >= flushBytes
	if early {
		delete(s.dirty, b)
	}
	if s.flushTimer == nil {
		s.flushTimer = time.AfterFunc(FlushInterval, s.flushAll)
	}
	s.mu.Unlock()
	if early {
		// Off the read path: readers must not wait for the disk.
		go func() {
			if err := b.Flush(); err != nil {
				slog.Warn("blobcache: flush", "blob", b.id, "err", err)
			}
		}()
	}
	if check {
		s.maybeEvict(false)
	}
}

// flushAll flushes every blob written since the last pass.
func (s *Store) flushAll() {
	s.mu.Lock()
	dirty := s.dirty
	s.dirty = map[*Blob]int64{}
	s.flushTimer = nil
	var open []*Blob
	for b := range dirty {
		if s.blobs[b.name] == b {
			open = append(open, b)
		}
	}
	s.mu.Unlock()
	for _, b := range open {
		if err := b.Flush(); err != nil {
			slog.Warn("blobcache: flush", "blob", b.id, "err", err)
		}
	}
}

// Usage returns the disk space of the directory's cache files.
func (s *Store) Usage() (int64, error) {
	files, err := s.scan()
	if err != nil {
		return 0, err
	}
	var total int64
	for _, f := range files {
		total += f.bytes
	}
	return total, nil
}

type cacheFile struct {
	base  string // <id>.blob.data or <id>.blob.raw
	paths []string
	bytes int64
	mtime time.Time
}

// scan groups the directory's cache files by blob.
func (s *Store) scan() (map[string]*cacheFile, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("blobcache: %w", err)
	}
	out := map[string]*cacheFile{}
	for _, e := range ents {
		n := e.Name()
		var base string
		switch {
		case strings.HasSuffix(n, RawSuffix+MapSuffix):
			base = strings.TrimSuffix(n, MapSuffix)
		case strings.HasSuffix(n, MapSuffix):
			base = strings.TrimSuffix(n, MapSuffix) + DataSuffix
		case strings.HasSuffix(n, DataSuffix), strings.HasSuffix(n, RawSuffix):
			base = n
		default:
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(s.dir, n), &st); err != nil {
			continue
		}
		f := out[base]
		if f == nil {
			f = &cacheFile{base: base}
			out[base] = f
		}
		f.paths = append(f.paths, filepath.Join(s.dir, n))
		f.bytes += st.Blocks * 512
		if info.ModTime().After(f.mtime) {
			f.mtime = info.ModTime()
		}
	}
	return out, nil
}

// maybeEvict removes blobs nobody holds, least recently used first, until
// the directory is within the limit.
func (s *Store) maybeEvict(force bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.limit <= 0 || (!force && s.written <= s.limit/16) {
		return
	}
	s.written = 0
	files, err := s.scan()
	if err != nil {
		slog.Warn("blobcache: eviction scan failed", "err", err)
		return
	}
	var total int64
	var victims []*cacheFile
	for base, f := range files {
		total += f.bytes
		if b, ok := s.blobs[base]; ok {
			if b.refs > 0 {
				continue
			}
			f.mtime = b.lastUsed
		}
		victims = append(victims, f)
	}
	sort.Slice(victims, func(i, j int) bool { return victims[i].mtime.Before(victims[j].mtime) })
	for _, f := range victims {
		if total <= s.limit {
			break
		}
		if b, ok := s.blobs[f.base]; ok {
			b.closeFiles()
			delete(s.blobs, f.base)
		}
		for _, p := range f.paths {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				slog.Warn("blobcache: evict", "file", p, "err", err)
			}
		}
		total -= f.bytes
		slog.Info("blobcache: evicted unused blob", "blob", f.base, "bytes", f.bytes)
	}
}

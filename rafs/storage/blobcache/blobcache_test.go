package blobcache

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/rafs"
)

func testBlob(id string, chunks uint32, size uint64) *rafs.Blob {
	return &rafs.Blob{ID: id, ChunkCount: chunks, UncompressedSize: size, CompressedSize: size / 2, ChunkSize: 4096}
}

func TestChunkMapFormat(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := testBlob(strings.Repeat("a", 64), 20, 20*4096)
	cb, err := s.Blob(b, false)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 4096)
	if err := cb.WriteChunks([]Write{{Index: 0, Off: 0, Data: data}, {Index: 9, Off: 9 * 4096, Data: data}, {Index: 19, Off: 19 * 4096, Data: data}}); err != nil {
		t.Fatal(err)
	}
	if !cb.Has(0) || !cb.Has(9) || !cb.Has(19) || cb.Has(1) || cb.Has(20) {
		t.Fatal("Has disagrees with what was written")
	}
	cb.Release()
	s.Close()

	// nydusd's PersistMap layout: header then MSB-first bits.
	raw, err := os.ReadFile(filepath.Join(dir, b.ID+MapSuffix))
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) != 4096+3 {
		t.Fatalf("map is %d bytes, want 4099", len(raw))
	}
	le := binary.LittleEndian
	if le.Uint32(raw) != 0x424D4150 || le.Uint32(raw[4:]) != 1 || le.Uint32(raw[8:]) != 0x434D4150 {
		t.Fatalf("header % x", raw[:16])
	}
	if got := raw[4096:]; !bytes.Equal(got, []byte{0x80, 0x40, 0x10}) {
		t.Fatalf("bitmap % x, want 80 40 10", got)
	}
	if st, _ := os.Stat(filepath.Join(dir, b.ID+DataSuffix)); st.Size() != 20*4096 {
		t.Fatalf("data file %d bytes", st.Size())
	}

	// Persisted across reopen.
	s, _ = Open(dir, 0)
	defer s.Close()
	cb, err = s.Blob(b, false)
	if err != nil {
		t.Fatal(err)
	}
	if r, n := cb.Ready(); r != 3 || n != 20 || !cb.Has(9) {
		t.Fatalf("after reopen ready %d/%d", r, n)
	}
	p := make([]byte, 4096)
	if err := cb.ReadAt(p, 9*4096); err != nil || !bytes.Equal(p, data) {
		t.Fatalf("ReadAt: %v", err)
	}
	if err := cb.Invalidate(9); err != nil || cb.Has(9) {
		t.Fatalf("Invalidate: %v", err)
	}
	if err := cb.ReadAt(p, 20*4096-1); err == nil {
		t.Fatal("read past the data file succeeded")
	}
	if err := cb.WriteChunks([]Write{{Index: 20, Off: 0, Data: data}}); err == nil {
		t.Fatal("write of chunk index past count succeeded")
	}
	cb.Release()
}

func TestBadMapStartsEmpty(t *testing.T) {
	for name, corrupt := range map[string]func(path string){
		"truncated": func(p string) { os.Truncate(p, 100) },
		"bad magic": func(p string) {
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			f.WriteAt([]byte{1, 2, 3, 4}, 0)
			f.Close()
		},
		"wrong size": func(p string) { os.Truncate(p, 4096+100) },
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			b := testBlob(strings.Repeat("b", 64), 16, 16*4096)
			s, _ := Open(dir, 0)
			cb, err := s.Blob(b, false)
			if err != nil {
				t.Fatal(err)
			}
			cb.WriteChunks([]Write{{Index: 3, Off: 3 * 4096, Data: make([]byte, 4096)}})
			cb.Release()
			s.Close()
			corrupt(filepath.Join(dir, b.ID+MapSuffix))
			s, _ = Open(dir, 0)
			defer s.Close()
			cb, err = s.Blob(b, false)
			if err != nil {
				t.Fatal(err)
			}
			defer cb.Release()
			if r, _ := cb.Ready(); r != 0 || cb.Has(3) {
				t.Fatalf("a corrupt map still claims %d chunks", r)
			}
		})
	}
}

func TestGeometry(t *testing.T) {
	s, _ := Open(t.TempDir(), 0)
	defer s.Close()
	if _, err := s.Blob(testBlob(strings.Repeat("c", 64), 0, 4096), false); err != ErrNoGeometry {
		t.Fatalf("no chunk count: %v", err)
	}
	b := testBlob(strings.Repeat("c", 64), 4, 4*4096)
	cb, err := s.Blob(b, false)
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Release()
	if _, err := s.Blob(testBlob(b.ID, 5, 4*4096), false); err == nil {
		t.Fatal("same blob with another chunk count opened")
	}
	raw, err := s.Blob(b, true)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Release()
	if raw == cb || !strings.HasSuffix(raw.DataPath(), RawSuffix) || !strings.HasSuffix(raw.MapPath(), RawSuffix+MapSuffix) {
		t.Fatalf("compressed cache files %s %s", raw.DataPath(), raw.MapPath())
	}
}

func TestEvictUnused(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, 1<<20+64<<10)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fill := func(id string) *Blob {
		b := testBlob(strings.Repeat(id, 64), 128, 128*4096) // 512 KiB
		cb, err := s.Blob(b, false)
		if err != nil {
			t.Fatal(err)
		}
		var ws []Write
		for i := range uint32(128) {
			ws = append(ws, Write{Index: i, Off: int64(i) * 4096, Data: bytes.Repeat([]byte{1}, 4096)})
		}
		if err := cb.WriteChunks(ws); err != nil {
			t.Fatal(err)
		}
		return cb
	}
	a := fill("a")
	a.Release() // unused, oldest
	b := fill("b")
	c := fill("c") // 1.5 MiB on disk: over the limit
	c.Release()
	b.Release()
	if _, err := os.Stat(filepath.Join(dir, strings.Repeat("a", 64)+DataSuffix)); !os.IsNotExist(err) {
		t.Fatalf("least recently used blob not evicted: %v", err)
	}
	for _, id := range []string{"b", "c"} {
		if _, err := os.Stat(filepath.Join(dir, strings.Repeat(id, 64)+DataSuffix)); err != nil {
			t.Fatalf("blob %s evicted: %v", id, err)
		}
	}
	if u, _ := s.Usage(); u > 1<<20+64<<10 {
		t.Fatalf("usage %d over the limit", u)
	}
	// A blob in use is never evicted, even over the limit.
	held := fill("d")
	defer held.Release()
	if _, err := os.Stat(held.DataPath()); err != nil {
		t.Fatalf("held blob evicted: %v", err)
	}
}

// FuzzChunkMap opens a cache whose chunk map file holds arbitrary bytes:
// it must start empty or load consistently, never panic.
func FuzzChunkMap(f *testing.F) {
	hdr := make([]byte, 4096+2)
	binary.LittleEndian.PutUint32(hdr, 0x424D4150)
	binary.LittleEndian.PutUint32(hdr[4:], 1)
	binary.LittleEndian.PutUint32(hdr[8:], 0x434D4150)
	hdr[4096], hdr[4097] = 0xff, 0xff
	f.Add(hdr, uint16(10))
	f.Add([]byte{}, uint16(1))
	f.Add([]byte("garbage"), uint16(3))
	f.Fuzz(func(t *testing.T, data []byte, count uint16) {
		if count == 0 {
			count = 1
		}
		dir := t.TempDir()
		b := testBlob(strings.Repeat("f", 64), uint32(count), uint64(count)*4096)
		os.WriteFile(filepath.Join(dir, b.ID+MapSuffix), data, 0o600)
		os.WriteFile(filepath.Join(dir, b.ID+DataSuffix), make([]byte, b.UncompressedSize), 0o600)
		s, err := Open(dir, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		cb, err := s.Blob(b, false)
		if err != nil {
			return
		}
		defer cb.Release()
		ready, total := cb.Ready()
		n := uint32(0)
		for i := range uint32(count) + 8 {
			if cb.Has(i) {
				if i >= uint32(count) {
					t.Fatalf("chunk %d past count %d reported present", i, count)
				}
				n++
			}
		}
		if ready != n || total != uint32(count) {
			t.Fatalf("Ready %d/%d, Has counts %d", ready, total, n)
		}
	})
}

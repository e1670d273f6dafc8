package cachefiles

import (
	"context"
	"os"
	"testing"

	"github.com/rafsd/rafsd/rafs"
)

// TestReadAhead: a READ at the start of a file makes the daemon fill the
// file's next chunks (up to the window) after answering it, and nothing
// of the neighbouring file; a READ in the middle of a file that does not
// continue the previous one starts no read-ahead; read-ahead never
// refetches what a READ wrote, and a READ of what read-ahead wrote is
// answered without fetching.
func TestReadAhead(t *testing.T) {
	blobDir, src := t.TempDir(), t.TempDir()
	writeTree(t, src, 7, map[string]int{"a/big": 3 << 20, "b/next": 1 << 20})
	im := buildImage(t, src, blobDir)
	d, _ := testDaemon(t)
	if err := d.BindBlob(bindReq("fsid", "", im)); err != nil {
		t.Fatal(err)
	}
	blob := im.img.Blobs[0]
	extentOf := func(path string) rafs.Extent {
		var ino *rafs.Inode
		im.img.Walk(func(p string, i *rafs.Inode) error {
			if p == path {
				ino = i
			}
			return nil
		})
		if ino == nil {
			t.Fatalf("%s not in the image", path)
		}
		es := (&rafs.Image{Inodes: []*rafs.Inode{ino}, Blobs: im.img.Blobs}).FileExtents(blob)
		if len(es) != 1 {
			t.Fatalf("%s: %d extents, want 1 (the builder stores a file's chunks together)", path, len(es))
		}
		return es[0]
	}
	big, next := extentOf("/a/big"), extentOf("/b/next")
	fd, path := cacheFile(t)
	open(d, 1, 1, "erofs,fsid", blob.ID, fd)
	o := d.objects[1]
	fetched := func() uint64 { return o.im.fetcher.BackendMetrics().ReadAmountTotal }

	// The kernel's first READ of a/big: 128 KiB at its start.
	r := ReadMsg{Off: big.Lo, Len: 128 << 10}
	if err := d.fill(context.Background(), o, r); err != nil {
		t.Fatal(err)
	}
	d.readAhead(o, r)
	d.bg.Wait()
	want := min(big.Hi, r.Off+r.Len+minReadAhead*2) // 4 x 128 KiB window
	if !present(fd, roundDown(big.Lo), roundDown(want)) {
		t.Fatalf("read-ahead did not fill [%d, %d)", big.Lo, want)
	}
	if s := d.Stats(); s.ReadAheads != 1 || s.ReadAheadBytes == 0 || s.ReadAheadBytes > maxReadAhead+64<<10 {
		t.Fatalf("read-ahead stats %+v", s)
	}
	cache, _ := os.ReadFile(path)
	if n := checkFiles(t, im, blob, cache, func(c *rafs.Chunk) bool { return chunkEnd(c) <= want && c.UncompressedOffset >= big.Lo }); n == 0 {
		t.Fatal("no read-ahead chunk checked")
	}

	// A READ of what read-ahead wrote fetches nothing.
	before := fetched()
	if err := d.fill(context.Background(), o, ReadMsg{Off: big.Lo + 256<<10, Len: 128 << 10}); err != nil {
		t.Fatal(err)
	}
	if fetched() != before {
		t.Fatalf("a READ of read-ahead data fetched %d bytes", fetched()-before)
	}

	// The last READ of a/big: read-ahead stops at the file's end.
	r = ReadMsg{Off: roundDown(big.Hi - 64<<10), Len: 64 << 10}
	if err := d.fill(context.Background(), o, r); err != nil {
		t.Fatal(err)
	}
	d.readAhead(o, r)
	d.bg.Wait()
	if next.Lo >= roundUp(big.Hi) && present(fd, next.Lo, next.Lo+pageSize) {
		t.Fatal("read-ahead crossed into the next file")
	}

	// A random READ in the middle of b/next starts nothing.
	n := d.Stats().ReadAheads
	r = ReadMsg{Off: roundDown(next.Lo + (next.Hi-next.Lo)/2), Len: 4096}
	if err := d.fill(context.Background(), o, r); err != nil {
		t.Fatal(err)
	}
	d.readAhead(o, r)
	d.bg.Wait()
	if d.Stats().ReadAheads != n {
		t.Fatal("a random READ started read-ahead")
	}
	d.handleClose(Msg{Opcode: OpClose, ObjectID: 1})
}

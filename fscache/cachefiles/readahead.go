package cachefiles

import (
	"context"
	"time"

	"github.com/rafsd/rafsd/rafs"
)

// Read-ahead. The kernel asks for what its own read-ahead window misses,
// at most a few hundred KiB per READ, and a sequential reader waits for
// each READ in turn. When a READ continues the previous one of the object
// (or starts a file), the daemon fills the file's next chunks into the
// cache file in the background once the READ is answered, so the kernel
// finds them present and sends no READ for them. Read-ahead never crosses
// the end of the file the READ is in (the extent of its chunks in the
// blob), so reading part of an image fetches little more than that part.

// Read-ahead window: four times the READ, within these bounds.
const (
	minReadAhead = 256 << 10
	maxReadAhead = 2 << 20
)

// flight is a run of chunks being written into an object's cache file by
// a READ or a read-ahead: others wanting the same run wait for it.
type flight struct {
	done chan struct{}
	err  error
}

// maxWrite bounds the page-contiguous runs written with one pwrite.
const maxWrite = 1 << 20

// claim is a run an object's writer took on, or waits for.
type claim struct {
	run []*rafs.Chunk
	key uint64 // the run's first page
	f   *flight
}

// writeRuns writes page-disjoint runs into o's cache file, each once:
// runs another READ or read-ahead is writing are waited for (and written
// here only if that failed), runs read-ahead already wrote are skipped,
// and the rest go out in page-contiguous groups of up to maxWrite bytes,
// one pwrite each.
func (d *Daemon) writeRuns(ctx context.Context, o *object, runs [][]*rafs.Chunk) error {
	var mine, waits []claim
	d.mu.Lock()
	ahead := o.raHi
	for _, run := range runs {
		key := roundDown(run[0].UncompressedOffset)
		if f := o.flights[key]; f != nil {
			waits = append(waits, claim{run, key, f})
			continue
		}
		f := &flight{done: make(chan struct{})}
		if o.flights == nil {
			o.flights = map[uint64]*flight{}
		}
		o.flights[key] = f
		mine = append(mine, claim{run, key, f})
	}
	d.mu.Unlock()
	release := func(c claim, err error) {
		c.f.err = err
		d.mu.Lock()
		delete(o.flights, c.key)
		d.mu.Unlock()
		close(c.f.done)
	}
	todo := mine[:0:0]
	for _, c := range mine {
		// Only read-ahead fills what the kernel did not ask for: without
		// it, asking the cache file would be a wasted pair of syscalls.
		if ahead > c.key && present(o.fd, c.key, min(runEnd(c.run), roundUp(o.size))) {
			release(c, nil)
			continue
		}
		todo = append(todo, c)
	}
	var first error
	for len(todo) > 0 {
		n, end := 1, runEnd(todo[0].run)
		for n < len(todo) && todo[n].key == end && runEnd(todo[n].run)-todo[0].key <= maxWrite {
			end = runEnd(todo[n].run)
			n++
		}
		group := make([][]*rafs.Chunk, n)
		for i, c := range todo[:n] {
			group[i] = c.run
		}
		err := d.writeGroup(ctx, o, group)
		for _, c := range todo[:n] {
			release(c, err)
		}
		if err != nil && first == nil {
			first = err
		}
		todo = todo[n:]
	}
	for _, c := range waits {
		select {
		case <-c.f.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		if c.f.err != nil {
			if err := d.writeRun(ctx, o, c.run); err != nil && first == nil {
				first = err
			}
		}
	}
	return first
}

// readAhead is called once READ r of blob object o is answered: if the
// READ continues the object's previous one or starts a file, the rest of
// the file's extent, up to the window, is filled in the background.
func (d *Daemon) readAhead(o *object, r ReadMsg) {
	if o.blob == nil || d.noReadAhead {
		return
	}
	end := min(r.Off+r.Len, o.size)
	d.mu.Lock()
	defer d.mu.Unlock()
	prev := o.lastEnd
	o.lastEnd = end
	if o.closing {
		return
	}
	e, ok := rafs.ExtentAt(o.blob.extents, end-1)
	if !ok || e.Hi <= end {
		return
	}
	seq := (r.Off <= prev && prev <= end) || roundDown(r.Off) <= e.Lo
	if !seq {
		return
	}
	window := min(max(4*r.Len, minReadAhead), maxReadAhead)
	lo, hi := max(end, o.raHi), min(e.Hi, end+window)
	if lo >= hi {
		return
	}
	chunks := o.blob.layout.Range(lo, hi-lo)
	// Whole chunks, and only those starting at or after lo: the one
	// holding lo was written with the READ.
	for len(chunks) > 0 && chunks[0].UncompressedOffset < lo {
		chunks = chunks[1:]
	}
	if len(chunks) == 0 {
		return
	}
	// Chunks sharing a page with the last one ride along, as for a READ.
	last := chunks[len(chunks)-1]
	for _, c := range o.blob.layout.Range(chunkEnd(last), pageSize) {
		if roundDown(c.UncompressedOffset) < roundUp(chunkEnd(last)) && c.UncompressedOffset > last.UncompressedOffset {
			chunks = append(chunks[:len(chunks):len(chunks)], c)
		}
	}
	o.raHi = max(o.raHi, chunkEnd(chunks[len(chunks)-1]))
	o.refs++
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		defer d.unref(o)
		start := time.Now()
		ctx, cancel := context.WithTimeout(o.ctx, d.timeout)
		defer cancel()
		if err := d.writeRuns(ctx, o, splitRuns(chunks)); err != nil {
			if ctx.Err() == nil {
				d.log.Debug("cachefiles: read-ahead failed", "blob", o.cookie, "off", chunks[0].UncompressedOffset, "err", err)
			}
			return
		}
		for _, c := range chunks {
			d.raBytes.Add(uint64(c.UncompressedSize))
		}
		d.readAheads.Add(1)
		d.raNanos.Add(uint64(time.Since(start)))
	}()
}

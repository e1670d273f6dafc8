package storage

import (
	"context"
	"fmt"
	"io"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/zran"
)

// Zran blobs (--oci-ref images: chunks are ranges of an original gzip
// layer, see rafs.Zran). A zran chunk's stored extent runs from its
// context's checkpoint (InOffset) to the end of its own data, so the
// extents of neighbouring chunks overlap instead of abutting: every chunk
// of a context starts at about the same byte. A stream still covers a run
// of them with one range request, the union of their extents, and the
// chunks of one context are inflated together, once (nydus's ZranDecoder
// inflates a context once for all of its chunks): a run of n chunks costs
// one round trip and one pass of inflate instead of n of each.

// zranGap is how many unused compressed bytes may lie between a zran
// chunk's extent and the next chunk's for both to be fetched with one
// request: bytes of the layer no chunk needs (tar headers and padding
// between files are inside the blocks chunks need, so gaps are rare and
// small), well under what a round trip costs.
const zranGap = 64 << 10

// maxZranGroup bounds the output inflated at once for one context's
// chunks (nydusd inflates at most a chunk's size per context).
const maxZranGroup = 2 * rafs.MaxChunkSize

// chunkEnd is where c's stored extent ends in its blob.
func chunkEnd(c *rafs.Chunk) uint64 { return c.CompressedOffset + uint64(c.CompressedSize) }

// follows reports whether chunk n, stored after the chunks of a run whose
// extents end at end, can join the run's range request: it is stored
// right at end, or, in a zran blob, starts within (or just after) the
// bytes the run already fetches.
func (bs *blobState) follows(end uint64, n *rafs.Chunk) bool {
	if bs.blob.IsZran() {
		return n.CompressedOffset <= end+zranGap
	}
	return n.CompressedOffset == end
}

// sameContext reports whether zran chunk n inflates from the same context
// as p, the last chunk of a group whose range is span bytes so far (at
// most maxZranGroup): see plan.
func (bs *blobState) sameContext(p, n *rafs.Chunk, span uint64) bool {
	if span > maxZranGroup {
		return false
	}
	// zranContext finds no context outside a zran blob.
	cp, ok1 := zranContext(bs.blob, p)
	cn, ok2 := zranContext(bs.blob, n)
	return ok1 && ok2 && cp == cn
}

// spanEnd is where the union of cs's extents ends.
func spanEnd(cs []*call) uint64 {
	var end uint64
	for _, cl := range cs {
		end = max(end, chunkEnd(cl.c))
	}
	return end
}

// zranContext returns the context chunk c of zran blob b inflates from,
// or false if b has no contexts loaded or c has no valid record.
func zranContext(b *rafs.Blob, c *rafs.Chunk) (uint32, bool) {
	z := b.Zran
	if z == nil || int64(c.Index) >= int64(len(z.Chunks)) {
		return 0, false
	}
	ci := z.Chunks[c.Index].Context
	return ci, int64(ci) < int64(len(z.Contexts))
}

// pumpZran is pump for a zran blob's stream: the network stage reads the
// body a context's run of chunks at a time (keeping the bytes the next
// run shares with it: extents overlap), the verify stage inflates each
// run once and hands out its chunks, the cache stage writes them.
func (f *Fetcher) pumpZran(ctx context.Context, st *stream, rc io.Reader, i int) (int, error) {
	b := st.bs.blob
	read := func(send func(piece) bool) {
		pos := st.items[i].c.CompressedOffset // the body's next byte
		// carry holds the layer's bytes [cbase, +len(carry)) that the
		// last run fetched and the next one needs too.
		var carry []byte
		var cbase uint64
		for j := i; ; {
			st.mu.Lock()
			if j >= st.limit {
				st.mu.Unlock()
				return
			}
			// The run is read as one: claim it so that no split
			// (join) takes chunks from its middle.
			g := j + 1
			ci, ok := zranContext(b, st.items[j].c)
			for ok && g < st.limit {
				cj, ok2 := zranContext(b, st.items[g].c)
				if !ok2 || cj != ci {
					break
				}
				g++
			}
			st.next = g - 1
			st.mu.Unlock()
			if st.orphaned() && f.abandon(st, j) {
				return
			}
			lo, hi := st.items[j].c.CompressedOffset, spanEnd(st.items[j:g])
			err := f.paceBytes(ctx, st, hi-lo)
			var raw []byte
			if err == nil {
				raw = getBuf(int(hi - lo))
				// What the last run fetched already, then the rest.
				copyRange(raw, lo, carry, cbase)
				if lo > pos {
					if _, err = io.CopyN(io.Discard, rc, int64(lo-pos)); err == nil {
						pos = lo
					}
				}
				if err == nil && hi > pos {
					_, err = io.ReadFull(rc, raw[pos-lo:])
					if err == nil {
						pos = hi
					}
				}
			}
			if err == nil && g < len(st.items) {
				// Keep what the next run shares with this one.
				next := st.items[g].c.CompressedOffset
				var keep []byte
				if next < pos {
					keep = make([]byte, pos-next)
					copyRange(keep, next, carry, cbase)
					copyRange(keep, next, raw, lo)
				}
				carry, cbase = keep, next
			}
			if !send(piece{i: j, n: g - j, lo: lo, raw: raw, err: err}) || err != nil {
				return
			}
			j = g
		}
	}
	return f.pipeline(st, i, read, func(p piece, writes chan<- verified) {
		f.verifyZran(ctx, st, p, writes)
	})
}

// copyRange copies into dst, which holds bytes [at, at+len(dst)) of the
// layer, the part of src (bytes [from, from+len(src))) that overlaps it.
func copyRange(dst []byte, at uint64, src []byte, from uint64) {
	lo, hi := max(at, from), min(at+uint64(len(dst)), from+uint64(len(src)))
	if lo < hi {
		copy(dst[lo-at:hi-at], src[lo-from:hi-from])
	}
}

// verifyZran inflates the chunks of p (one context's) at once, checks
// each one's digest and hands it out, then passes it to writes. If the
// run does not inflate, or a chunk fails its check, that chunk goes
// through verify alone (inflated from its own extent, then fetched again
// alone once): a corrupt layer is still EIO for the chunks it spoils.
func (f *Fetcher) verifyZran(ctx context.Context, st *stream, p piece, writes chan<- verified) {
	defer putBuf(p.raw)
	b := st.bs.blob
	items := st.items[p.i : p.i+p.n]
	if st.prefetch {
		f.m.prefetchBytes.Add(float64(len(p.raw)))
		f.stats.prefetchBytes.Add(uint64(len(p.raw)))
	}
	alone := func(cl *call) {
		// The chunk's own extent, as a pooled buffer verify takes over.
		c := cl.c
		stored := getBuf(int(c.CompressedSize))
		copy(stored, p.raw[c.CompressedOffset-p.lo:])
		if v, ok := f.verify(ctx, st, cl, stored); ok {
			writes <- v
		}
	}
	out, skip, err := inflateRun(b, items, p.raw, p.lo)
	if err != nil {
		if len(items) > 1 {
			f.log.Debug("storage: zran run did not inflate, inflating its chunks one by one", "blob", b.ID, "chunk", items[0].c.Index, "chunks", len(items), "err", err)
		}
		for _, cl := range items {
			alone(cl)
		}
		return
	}
	defer putBuf(out)
	z := b.Zran
	for _, cl := range items {
		c := cl.c
		data := getBuf(int(c.UncompressedSize))
		copy(data, out[int64(z.Chunks[c.Index].Offset)-skip:])
		if err := b.Digester.Verify(data, c.Digest); err != nil {
			putBuf(data)
			alone(cl)
			continue
		}
		var stored []byte
		if f.compressed {
			stored = getBuf(int(c.CompressedSize))
			copy(stored, p.raw[c.CompressedOffset-p.lo:])
		}
		cl.data, cl.pooled = data, true
		close(cl.done)
		writes <- verified{cl, stored, data}
	}
}

// inflateRun inflates the output of items' context that items need from
// raw (the layer's bytes from lo): out holds the context's output from
// skip on.
func inflateRun(b *rafs.Blob, items []*call, raw []byte, lo uint64) (out []byte, skip int64, err error) {
	z := b.Zran
	ci, ok := zranContext(b, items[0].c)
	if !ok {
		return nil, 0, fmt.Errorf("chunk %d: no zran context: %w", items[0].c.Index, rafs.ErrInvalid)
	}
	skip = -1
	var end int64
	for _, cl := range items {
		c := cl.c
		if cj, ok := zranContext(b, c); !ok || cj != ci {
			return nil, 0, fmt.Errorf("chunk %d: not of zran context %d: %w", c.Index, ci, rafs.ErrInvalid)
		}
		off := int64(z.Chunks[c.Index].Offset)
		if skip < 0 || off < skip {
			skip = off
		}
		end = max(end, off+int64(c.UncompressedSize))
	}
	if end-skip > maxZranGroup {
		return nil, 0, fmt.Errorf("zran context %d: %d bytes of output: %w", ci, end-skip, rafs.ErrInvalid)
	}
	out = getBuf(int(end - skip))
	if err := zran.InflateContext(z, ci, raw, lo, skip, out); err != nil {
		putBuf(out)
		return nil, 0, err
	}
	return out, skip, nil
}

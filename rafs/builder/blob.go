package builder

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"runtime"
	"sync"

	"github.com/rafsd/rafsd/rafs"
	"github.com/rafsd/rafsd/rafs/blobmeta"
	"github.com/rafsd/rafsd/rafs/codec"
)

const blockSize = 4096

// blobWriter streams one data blob. Chunks are compressed by a pool of
// workers and written in submission order by one writer goroutine, so a
// build uses every CPU while holding only a bounded number of chunks
// (2 per worker) in memory.
//
// A chunk's record is returned at once with its digest, index and
// uncompressed extent; its compressed extent is filled in when it is
// written, which is before finish returns.
type blobWriter struct {
	w    io.Writer
	sum  hash.Hash
	comp codec.Compressor
	dig  codec.Digester
	// uoff is the uncompressed cursor, always 4 KiB aligned as nydus's v6
	// layout (and EROFS) require; off the compressed (file) cursor, owned
	// by the writer goroutine until finish.
	uoff, off uint64
	count     int
	infos     []blobmeta.ChunkInfo
	pad       []byte

	started bool
	jobs    chan *job
	order   chan *job
	done    chan struct{}
	workers sync.WaitGroup
	errMu   sync.Mutex
	err     error
	bufs    sync.Pool
}

type job struct {
	c          *rafs.Chunk
	data       *[]byte
	out        *[]byte
	stored     []byte
	compressed bool
	err        error
	ready      chan struct{}
}

func newBlobWriter(w io.Writer, c codec.Compressor, d codec.Digester) *blobWriter {
	return &blobWriter{w: w, sum: sha256.New(), comp: c, dig: d, pad: make([]byte, blockSize)}
}

func (bw *blobWriter) start() {
	bw.started = true
	n := runtime.GOMAXPROCS(0)
	bw.jobs = make(chan *job, n)
	bw.order = make(chan *job, 2*n)
	bw.done = make(chan struct{})
	for range n {
		bw.workers.Add(1)
		go func() {
			defer bw.workers.Done()
			for j := range bw.jobs {
				j.stored, j.compressed, j.err = codec.Compress(bw.comp, (*j.out)[:0], *j.data)
				close(j.ready)
			}
		}()
	}
	go bw.writeLoop()
}

func (bw *blobWriter) getBuf(n int) *[]byte {
	if p, ok := bw.bufs.Get().(*[]byte); ok && cap(*p) >= n {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n)
	return &b
}

func (bw *blobWriter) setErr(err error) {
	bw.errMu.Lock()
	if bw.err == nil {
		bw.err = err
	}
	bw.errMu.Unlock()
}

func (bw *blobWriter) firstErr() error {
	bw.errMu.Lock()
	defer bw.errMu.Unlock()
	return bw.err
}

func (bw *blobWriter) write(p []byte) error {
	if _, err := bw.w.Write(p); err != nil {
		return fmt.Errorf("write blob: %w", err)
	}
	bw.sum.Write(p)
	bw.off += uint64(len(p))
	return nil
}

func (bw *blobWriter) writeLoop() {
	defer close(bw.done)
	for j := range bw.order {
		<-j.ready
		if err := bw.writeChunk(j); err != nil {
			bw.setErr(err)
		}
		bw.bufs.Put(j.data)
		bw.bufs.Put(j.out)
	}
}

func (bw *blobWriter) writeChunk(j *job) error {
	if j.err != nil {
		return j.err
	}
	if bw.firstErr() != nil {
		return nil // keep draining after a failure
	}
	c := j.c
	if bw.comp == codec.None {
		// Pad so that file offset == uncompressed offset: an uncompressed
		// blob is then directly usable as an EROFS extra device.
		for bw.off < c.UncompressedOffset {
			n := min(uint64(len(bw.pad)), c.UncompressedOffset-bw.off)
			if err := bw.write(bw.pad[:n]); err != nil {
				return err
			}
		}
	}
	c.CompressedOffset = bw.off
	c.CompressedSize = uint32(len(j.stored))
	c.Compressed = j.compressed
	if err := bw.write(j.stored); err != nil {
		return err
	}
	bw.infos = append(bw.infos, blobmeta.ChunkInfo{
		CompressedOffset: c.CompressedOffset, CompressedSize: c.CompressedSize,
		UncompressedOffset: c.UncompressedOffset, UncompressedSize: c.UncompressedSize,
		Compressed: c.Compressed,
	})
	return nil
}

// add queues one chunk (already digested as dg) and returns its record;
// BlobIndex is left for the caller.
func (bw *blobWriter) add(data []byte, dg codec.Digest) (*rafs.Chunk, error) {
	if err := bw.firstErr(); err != nil {
		return nil, err
	}
	if bw.count >= blobmeta.MaxChunks {
		return nil, fmt.Errorf("blob has more than %d chunks: use a larger chunk size", blobmeta.MaxChunks)
	}
	if !bw.started {
		bw.start()
	}
	c := &rafs.Chunk{
		Digest:             dg,
		Index:              uint32(bw.count),
		UncompressedOffset: bw.uoff,
		UncompressedSize:   uint32(len(data)),
	}
	bw.count++
	bw.uoff += (uint64(len(data)) + blockSize - 1) &^ (blockSize - 1)
	j := &job{c: c, data: bw.getBuf(len(data)), out: bw.getBuf(len(data) + len(data)/8 + 1024), ready: make(chan struct{})}
	copy(*j.data, data)
	bw.order <- j
	bw.jobs <- j
	return c, nil
}

// wait drains the pipeline and returns its first error.
func (bw *blobWriter) wait() error {
	if bw.started {
		close(bw.jobs)
		close(bw.order)
		bw.workers.Wait()
		<-bw.done
		bw.started = false
	}
	return bw.firstErr()
}

// finish completes the blob, appending its blob meta (v6 only, like
// nydus-image), and describes it.
func (bw *blobWriter) finish(version int, chunkSize uint32) (*rafs.Blob, error) {
	if err := bw.wait(); err != nil {
		return nil, err
	}
	b := &rafs.Blob{
		Compressor: bw.comp,
		Digester:   bw.dig,
		ChunkSize:  chunkSize,
		ChunkCount: uint32(len(bw.infos)),
		// The uncompressed size covers the last chunk's aligned extent:
		// that is the size of the blob's cache file.
		UncompressedSize: bw.uoff,
		// nydus-image marks every blob it builds (v5 too) as built by
		// 2.2 or newer; v6 adds ALIGNED with the blob meta below.
		Features: blobmeta.FeatureCapTarTOC,
	}
	if version == 6 && len(bw.infos) > 0 {
		h, _, err := blobmeta.Write(hashingWriter{bw}, bw.off, bw.comp, blobmeta.FeatureCapTarTOC, bw.infos)
		if err != nil {
			return nil, err
		}
		b.Features = h.Features
		b.Meta = rafs.BlobMeta{
			Compressor:       h.CICompressor,
			Offset:           h.CIOffset,
			CompressedSize:   h.CICompressedSize,
			UncompressedSize: h.CIUncompressedSize,
		}
	}
	b.CompressedSize = bw.off
	b.ID = hex.EncodeToString(bw.sum.Sum(nil))
	return b, nil
}

// hashingWriter routes blob meta bytes through blobWriter.write so they
// count in the blob's digest and offset.
type hashingWriter struct{ bw *blobWriter }

func (h hashingWriter) Write(p []byte) (int, error) {
	if err := h.bw.write(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

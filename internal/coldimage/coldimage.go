// Package coldimage plans the synthetic container image of the cold-start
// benchmarks (rafs/convert and testbed/clients): files of a typical size
// mix spread over layers, data that compresses about 2:1, and a startup
// set of about 6% of the bytes, as a trace of a container's start lists.
package coldimage

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
)

// File is one data file of the image.
type File struct {
	Name  string
	Size  int
	Seed  uint64
	Layer int
}

// Data returns the file's bytes: 4 KiB blocks alternate at random between
// noise and text, so layers compress about 2:1 as real ones do.
func (f File) Data() []byte {
	r := rand.New(rand.NewPCG(f.Seed, 7))
	b := make([]byte, f.Size)
	const text = "lorem ipsum dolor sit amet, consectetur\n"
	for off := 0; off < len(b); off += 4096 {
		blk := b[off:min(off+4096, len(b))]
		if r.IntN(2) == 0 {
			for i := 0; i+8 <= len(blk); i += 8 {
				binary.LittleEndian.PutUint64(blk[i:], r.Uint64())
			}
			for i := len(blk) &^ 7; i < len(blk); i++ {
				blk[i] = byte(r.Uint32())
			}
		} else {
			for i := range blk {
				blk[i] = text[(off+i+int(f.Seed))%len(text)]
			}
		}
	}
	return b
}

// Plan lays out about total bytes of files under dir over layers layers
// (mostly small files, a fifth large, like a runtime with its libraries)
// and picks the startup set: whole files, about 6% of the bytes, spread
// over the layers.
func Plan(total int64, layers int, dir string) (files, startup []File) {
	r := rand.New(rand.NewPCG(42, 42))
	var sum, st int64
	for i := 0; sum < total; i++ {
		size := 4<<10 + r.IntN(256<<10)
		if r.IntN(5) == 0 {
			size = 256<<10 + r.IntN(8<<20)
		}
		files = append(files, File{Name: fmt.Sprintf("%s/app%d/file%05d", dir, i%37, i), Size: size, Seed: uint64(i + 1), Layer: i % layers})
		sum += int64(size)
	}
	for _, i := range r.Perm(len(files)) {
		if st >= sum*6/100 {
			break
		}
		startup = append(startup, files[i])
		st += int64(files[i].Size)
	}
	return files, startup
}

package v5

import (
	"bytes"
	"testing"

	"github.com/rafsd/rafsd/rafs/codec"
)

// FuzzV5Read feeds arbitrary bytes to Read. Whatever it accepts must be a
// valid image that survives Write and Read unchanged; whatever it rejects
// must be rejected with an error, never a panic, hang or huge allocation.
func FuzzV5Read(f *testing.F) {
	orig := fixture(f)
	f.Add(orig)
	f.Add(blake3Fixture(f))
	img, _ := mixedImage(f, codec.Zstd, codec.Blake3, 4096)
	caps := lookup(img, "/etc/caps")
	caps.Xattrs = caps.Xattrs[:2]
	f.Add(encode(f, img))
	small := newImageBuilder(f, codec.None, codec.SHA256, 4096)
	d := small.dir(1, "d")
	x := small.dense(d, "x", []byte("hello"))
	small.link(1, "y", x)
	small.symlink(1, "s", "/")
	simg, _ := small.finish()
	simg.Prefetch = []uint64{x}
	f.Add(encode(f, simg))
	// A few structural mutations as starting points.
	for _, mut := range []func(b []byte){
		func(b []byte) { le.PutUint32(b[recordOff(b, idxRoot)+fChildCount:], 100) },
		func(b []byte) { le.PutUint64(b[recordOff(b, idxTestSh)+fIno:], idxBusyboxDir) },
		func(b []byte) { le.PutUint64(b[recordOff(b, idxJSON)+fFlags:], inodeFlagHasHole|inodeFlagXattr) },
	} {
		b := bytes.Clone(orig)
		mut(b)
		f.Add(b)
	}
	// Seeds are kilobytes long, so minimizing each new input takes long:
	// for long runs pass -fuzzminimizetime=100x.
	f.Fuzz(func(t *testing.T, b []byte) {
		checkAccepted(t, b)
	})
}

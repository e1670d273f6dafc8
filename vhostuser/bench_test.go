package vhostuser

import (
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// BenchmarkVirtioFS measures requests through the whole device path (our
// test front end: guest memory, rings, eventfd kick and call, go-fuse
// protocol server, loopback file system) against the same operation done
// directly on the host file (pread, stat) in the same run, and reports the
// ratio. One request in flight at a time: this is per-request latency, not
// the throughput of a guest with many queues busy.
func BenchmarkVirtioFS(b *testing.B) {
	dir, big := testTree(b)
	sock := startDevice(b, loopbackFS(b, dir), FSOptions{})
	fe := dialFrontend(b, sock)
	fe.connect(2)
	s := &session{t: b, fe: fe, q: 1}
	s.init()
	e := s.lookup(1, "big.bin")
	fh := s.open(opOpen, e.NodeId)
	f, err := os.Open(filepath.Join(dir, "big.bin"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()

	b.Run("read128k", func(b *testing.B) {
		const size = 128 << 10
		buf := make([]byte, size)
		n := len(big) / size
		base := timeIt(func(i int) {
			if _, err := f.ReadAt(buf, int64(i%n)*size); err != nil {
				b.Fatal(err)
			}
		}, 200)
		b.SetBytes(size)
		b.ResetTimer()
		start := time.Now()
		for i := 0; i < b.N; i++ {
			r := fe.fuseCall(1, readReq(e.NodeId, fh, int64(i%n)*size, size), []int{0}, []int{16, size}, false)
			if len(r) != 16+size {
				b.Fatalf("reply %d bytes", len(r))
			}
		}
		per := time.Since(start) / time.Duration(b.N)
		b.ReportMetric(float64(per)/float64(base), "x-vs-pread")
	})
	b.Run("getattr", func(b *testing.B) {
		base := timeIt(func(int) {
			if _, err := f.Stat(); err != nil {
				b.Fatal(err)
			}
		}, 1000)
		in := fuse.GetAttrIn{}
		out := 16 + int(unsafe.Sizeof(fuse.AttrOut{}))
		b.ResetTimer()
		start := time.Now()
		for i := 0; i < b.N; i++ {
			mustOK(b, s.call(opGetattr, e.NodeId, structBody(&in), nil, out))
		}
		per := time.Since(start) / time.Duration(b.N)
		b.ReportMetric(float64(time.Second)/float64(per), "req/s")
		b.ReportMetric(float64(per)/float64(base), "x-vs-fstat")
	})
}

// timeIt returns the mean duration of f over n calls.
func timeIt(f func(i int), n int) time.Duration {
	start := time.Now()
	for i := 0; i < n; i++ {
		f(i)
	}
	return time.Since(start) / time.Duration(n)
}

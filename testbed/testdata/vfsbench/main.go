// Command vfsbench runs inside a testbed guest: it times sequential reads,
// random 4 KiB reads and lstat of many files under one or more roots (a
// virtio-fs mount, the same tree on a virtio-blk disk) with the guest's
// page and dentry caches dropped before each pass, and prints one JSON
// object per root. BenchmarkRafsdVirtioFS in package testbed drives it.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"time"
)

// Result is one root's numbers.
type Result struct {
	Root       string  `json:"root"`
	SeqMiBps   float64 `json:"seq_mib_per_s"`
	RandOpsps  float64 `json:"rand_4k_reads_per_s"`
	StatOpsps  float64 `json:"stats_per_s"`
	Files      int     `json:"files"`
	SeqBytes   int64   `json:"seq_bytes"`
	RandReads  int     `json:"rand_reads"`
	DropCaches bool    `json:"drop_caches"`
}

func main() {
	file := flag.String("file", "big.bin", "file (relative to each root) for the read passes")
	dir := flag.String("dir", "many", "directory (relative to each root) whose files are stat'ed")
	reads := flag.Int("rand", 2000, "random 4 KiB reads")
	flag.Parse()
	enc := json.NewEncoder(os.Stdout)
	for _, root := range flag.Args() {
		r, err := bench(root, *file, *dir, *reads)
		if err != nil {
			fmt.Fprintf(os.Stderr, "vfsbench %s: %v\n", root, err)
			os.Exit(1)
		}
		enc.Encode(r)
	}
}

// dropCaches empties the guest's page, dentry and inode caches so a pass
// goes through the device rather than guest memory.
func dropCaches() error {
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

func bench(root, file, dir string, reads int) (*Result, error) {
	r := &Result{Root: root, RandReads: reads, DropCaches: true}
	path := filepath.Join(root, file)
	// Warm-up: every chunk has been fetched once (the daemon's cache is
	// warm); the timed passes measure the transport, not the backend.
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	if _, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{f}, buf); err != nil {
		return nil, err
	}
	if err := dropCaches(); err != nil {
		return nil, fmt.Errorf("drop caches: %w", err)
	}
	start := time.Now()
	var n int64
	for off := int64(0); ; {
		m, err := f.ReadAt(buf, off)
		n += int64(m)
		off += int64(m)
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	r.SeqBytes = n
	r.SeqMiBps = float64(n) / (1 << 20) / time.Since(start).Seconds()

	if err := dropCaches(); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewSource(1))
	small := buf[:4096]
	start = time.Now()
	for i := 0; i < reads; i++ {
		off := rng.Int63n(n/4096) * 4096
		if _, err := f.ReadAt(small, off); err != nil && err != io.EOF {
			return nil, err
		}
	}
	r.RandOpsps = float64(reads) / time.Since(start).Seconds()

	d, err := os.Open(filepath.Join(root, dir))
	if err != nil {
		return nil, err
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return nil, err
	}
	if err := dropCaches(); err != nil {
		return nil, err
	}
	start = time.Now()
	for _, name := range names {
		if _, err := os.Lstat(filepath.Join(root, dir, name)); err != nil {
			return nil, err
		}
	}
	r.StatOpsps = float64(len(names)) / time.Since(start).Seconds()
	r.Files = len(names)
	return r, nil
}

package fs

import "testing"

// The buckets match nydusd's request_size_index (utils/src/metrics.rs).
func TestSizeIndex(t *testing.T) {
	cases := []struct{ size, want int }{
		{0, 0}, {0x3ff, 0}, {0x400, 1}, {0xfff, 1}, {0x1000, 2}, {0x3fff, 2},
		{0x4000, 3}, {0xffff, 3}, {0x1_0000, 4}, {0x1_ffff, 4}, {0x2_0000, 5},
		{0x7_ffff, 5}, {0x8_0000, 6}, {0xf_ffff, 6}, {0x10_0000, 7}, {1 << 30, 7},
	}
	for _, c := range cases {
		if got := sizeIndex(c.size); got != c.want {
			t.Errorf("sizeIndex(%#x) = %d, want %d", c.size, got, c.want)
		}
	}
}

// Ranges as nydusd's InodeBitmap::bitmap_to_array_and_clear gives them
// (its test's inode set), cleared by the export; failed reads not marked.
func TestLatestReadFilesJSON(t *testing.T) {
	f := &FS{acct: newAccounting(40003, false, false, true)}
	for _, ino := range []uint64{1, 2, 5, 65, 66, 4000, 40001, 40002, 40003} {
		f.acct.record(ino, FopRead, 4096, true)
	}
	f.acct.record(7, FopRead, 0, false)
	f.acct.record(9, FopGetattr, 0, true)
	f.acct.record(1<<40, FopRead, 1, true) // out of range: ignored
	for _, want := range []string{`[[1,2],[5],[65,66],[4000],[40001,40003]]`, `[]`} {
		b, err := f.LatestReadFilesJSON()
		if err != nil || string(b) != want {
			t.Fatalf("LatestReadFilesJSON = %s, %v; want %s", b, err, want)
		}
	}
	if b, _ := (&FS{}).LatestReadFilesJSON(); string(b) != `[]` {
		t.Fatalf("without accounting: %s", b)
	}
}

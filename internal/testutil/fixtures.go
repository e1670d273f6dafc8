package testutil

import (
	"os"
	"path/filepath"
)

// NydusFixtures returns the directory of the nydus-image-built fixtures:
// $RAFSD_FIXTURES if set, else shared/fixtures/nydus beside the module's
// checkout (where CI and developers have it), found from the working
// directory (a test's package directory) up to go.mod.
func NydusFixtures() string {
	if d := os.Getenv("RAFSD_FIXTURES"); d != "" {
		return d
	}
	dir, err := os.Getwd()
	if err != nil {
		return "shared/fixtures/nydus"
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(filepath.Dir(dir), "shared", "fixtures", "nydus")
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "shared/fixtures/nydus"
		}
		dir = parent
	}
}

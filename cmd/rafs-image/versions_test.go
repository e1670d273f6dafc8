package main

// RAFS versions the round-trip tests cover, and the nydus fixtures check
// must pass on.
var (
	supportedVersions = []string{"5", "6"}
	fixtureNames      = []string{"v5-none-sha256", "v6-zstd-blake3"}
)

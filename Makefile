# rafsd: see README.md. Tests need root (FUSE, EROFS and fanotify mounts).
GO        ?= go
GIT_COMMIT = $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
VERSION    = $(shell git describe --tags --always 2>/dev/null || echo dev)
LDFLAGS    = -X github.com/rafsd/rafsd/internal/version.Version=$(VERSION) -X github.com/rafsd/rafsd/internal/version.GitCommit=$(GIT_COMMIT)
BIN        = bin

.PHONY: all build test deps bench bench-coldstart demo fuzz clean testbed

all: build

build:
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

# deps installs the system tools the tests use (Debian).
deps:
	./.ci/deps

test: build
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 60m ./...
	./.ci/fuzz 5s

fuzz:
	./.ci/fuzz 10s

bench: build
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./...

# bench-coldstart: OCI pull+unpack vs lazy RAFS start of a 1 GiB image from a
# local registry behind a 100 MiB/s proxy (also part of make bench): first in
# process (rafs/convert), then through the real stack, containerd + overlayfs
# vs containerd + nydus-snapshotter + rafsd + runc (testbed/clients). One
# after the other: run side by side they would share the 2 cores.
bench-coldstart:
	RAFS_COLDSTART_MIB=1024 $(GO) test -run '^$$' -bench BenchmarkColdStart -benchtime 1x -timeout 30m -v ./rafs/convert/
	RAFS_COLDSTART_MIB=1024 $(GO) test -run '^$$' -bench BenchmarkColdStartClients -benchtime 1x -timeout 30m -v ./testbed/clients/

# testbed builds (or finds cached) the guest kernel, then boots a guest and runs the smoke scenario.
testbed:
	$(GO) run ./cmd/testbed kernel
	$(GO) test -count=1 -timeout 30m -v -run 'TestSmoke' ./testbed/

demo: build
	./scripts/demo.sh

clean:
	rm -rf $(BIN)

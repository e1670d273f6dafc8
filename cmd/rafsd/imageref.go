package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/pkg/reference"

	"github.com/rafsd/rafsd/rafs/convert"
	"github.com/rafsd/rafsd/rafs/storage/backend"
)

// imageDirEnv overrides where `--image` keeps fetched bootstraps, their
// generated configs and blob caches (default defaultImageDir).
const imageDirEnv = "RAFSD_IMAGE_DIR"

const defaultImageDir = "/var/lib/rafsd/images"

// imageFetchTimeout bounds resolving the reference and downloading the
// bootstrap layer, so a dead registry fails the start instead of hanging.
const imageFetchTimeout = 5 * time.Minute

// useImage turns `--image REF` into --bootstrap (fetched from the registry
// by the image's bootstrap layer) and, without --config, a generated config
// reading the blobs from the same repository through the registry backend
// with a blob cache. Registry logins come from docker's config.json. The
// files live in a directory per reference and mountpoint under
// $RAFSD_IMAGE_DIR (default /var/lib/rafsd/images).
func useImage(a *args, log *slog.Logger) error {
	if a.image == "" {
		return nil
	}
	if a.bootstrap != "" || a.sharedDir != "" {
		return errors.New("--image is exclusive with --bootstrap and --shared-dir")
	}
	if _, err := reference.Parse(a.image); err != nil {
		return fmt.Errorf("--image %q: not an image reference: %w", a.image, err)
	}
	base := os.Getenv(imageDirEnv)
	if base == "" {
		base = defaultImageDir
	}
	// One directory per reference and mountpoint: two daemons must not
	// share a blob cache, and a takeover daemon (same command line) finds
	// its predecessor's.
	mnt, err := filepath.Abs(a.mountpoint)
	if err != nil {
		return fmt.Errorf("--mountpoint: %w", err)
	}
	sum := sha256.Sum256([]byte(a.image + "\x00" + mnt))
	dir := filepath.Join(base, hex.EncodeToString(sum[:8]))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("--image: %w", err)
	}
	creds, err := backend.DockerCredentials("")
	if err != nil {
		return fmt.Errorf("--image: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), imageFetchTimeout)
	defer cancel()
	start := time.Now()
	r, err := convert.FetchBootstrap(ctx, a.image, filepath.Join(dir, "image.boot"), convert.RegistryOptions{Credentials: creds})
	if err != nil {
		return fmt.Errorf("--image: %w", err)
	}
	log.Info("fetched bootstrap", "image", a.image, "manifest", r.Manifest.Digest, "bootstrap", r.Bootstrap.Digest,
		"blobs", len(r.Image.Blobs), "took", time.Since(start).Round(time.Millisecond))
	a.bootstrap = r.BootstrapPath
	if a.config == "" {
		cfg := filepath.Join(dir, "config.json")
		// The login may be in it: owner-only.
		if err := os.WriteFile(cfg, r.DaemonConfig(filepath.Join(dir, "cache"), true), 0o600); err != nil {
			return fmt.Errorf("--image: %w", err)
		}
		a.config = cfg
	}
	return nil
}

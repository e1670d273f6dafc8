package convert

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// pusher uploads to one target reference with containerd's docker pusher
// (which checks for existing content with HEAD first).
type pusher struct {
	ref     string
	p       remotes.Pusher
	fetcher remotes.Fetcher
}

func newPusher(ctx context.Context, ref string, ro RegistryOptions) (*pusher, error) {
	r := ro.resolver()
	p, err := r.Pusher(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("pusher for %s: %w", ref, err)
	}
	f, err := r.Fetcher(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("fetcher for %s: %w", ref, err)
	}
	return &pusher{ref: ref, p: p, fetcher: f}, nil
}

// pushFrom uploads desc unless the target has it, reporting whether it did.
func (p *pusher) push(ctx context.Context, desc ocispec.Descriptor, open func() (io.ReadCloser, error)) (bool, error) {
	w, err := p.p.Push(ctx, desc)
	if errdefs.IsAlreadyExists(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("push %s to %s: %w", desc.Digest, p.ref, err)
	}
	defer w.Close()
	rc, err := open()
	if err != nil {
		return false, err
	}
	defer rc.Close()
	if err := content.Copy(ctx, w, rc, desc.Size, desc.Digest); err != nil {
		if errdefs.IsAlreadyExists(err) {
			return false, nil
		}
		return false, fmt.Errorf("push %s to %s: %w", desc.Digest, p.ref, err)
	}
	return true, nil
}

func (p *pusher) pushFrom(ctx context.Context, desc ocispec.Descriptor, open func() (io.ReadCloser, error)) error {
	_, err := p.push(ctx, desc, open)
	return err
}

func (p *pusher) pushFile(ctx context.Context, desc ocispec.Descriptor, name string) (bool, error) {
	return p.push(ctx, desc, func() (io.ReadCloser, error) { return os.Open(name) })
}

func (p *pusher) pushBytes(ctx context.Context, desc ocispec.Descriptor, b []byte) (bool, error) {
	return p.push(ctx, desc, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
}

// exists reports an error unless the target repository holds blob desc.
func (p *pusher) exists(ctx context.Context, desc ocispec.Descriptor) error {
	rc, err := p.fetcher.Fetch(ctx, desc)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return fmt.Errorf("not in %s: %w", p.ref, err)
		}
		return fmt.Errorf("check %s in %s: %w", desc.Digest, p.ref, err)
	}
	defer rc.Close()
	// containerd's fetcher opens blobs lazily: only a read shows whether
	// the registry has it.
	if _, err := io.ReadFull(rc, make([]byte, 1)); err != nil && desc.Size > 0 {
		if errdefs.IsNotFound(err) {
			return fmt.Errorf("not in %s: %w", p.ref, err)
		}
		return fmt.Errorf("check %s in %s: %w", desc.Digest, p.ref, err)
	}
	return nil
}

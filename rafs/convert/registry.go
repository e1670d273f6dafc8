package convert

import (
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"net/http"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/reference"

	"github.com/rafsd/rafsd/rafs/config"
)

// RegistryOptions say how to reach registries.
type RegistryOptions struct {
	// PlainHTTP talks HTTP instead of HTTPS to every registry (localhost
	// and 127.0.0.1 always may use HTTP, as containerd allows).
	PlainHTTP bool
	// Insecure skips TLS certificate verification.
	Insecure bool
	// Username and Password answer basic and token auth challenges.
	Username, Password string
	// Credentials answers for a registry host when Username is empty,
	// e.g. backend.DockerCredentials (docker's config.json). Nil: anonymous.
	Credentials func(host string) (user, password string, err error)
}

// creds returns the credentials for host.
func (o RegistryOptions) creds(host string) (string, string, error) {
	if o.Username != "" || o.Credentials == nil {
		return o.Username, o.Password, nil
	}
	return o.Credentials(host)
}

func (o RegistryOptions) client() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if o.Insecure {
		tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // asked for by --insecure
	}
	return &http.Client{Transport: tr}
}

// resolver builds a containerd resolver (core/remotes/docker) with the
// options' transport, plain-HTTP policy and credentials.
func (o RegistryOptions) resolver() remotes.Resolver {
	client := o.client()
	authz := docker.NewDockerAuthorizer(
		docker.WithAuthClient(client),
		docker.WithAuthCreds(o.creds),
	)
	plain := docker.MatchLocalhost
	if o.PlainHTTP {
		plain = docker.MatchAllHosts
	}
	return docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(
			docker.WithClient(client),
			docker.WithAuthorizer(authz),
			docker.WithPlainHTTP(plain),
		),
	})
}

// splitRef returns the registry host (docker.io mapped to its API host, as
// containerd does) and the repository of an image reference.
func splitRef(ref string) (host, repo string, err error) {
	spec, err := reference.Parse(ref)
	if err != nil {
		return "", "", fmt.Errorf("image reference %q: %w", ref, err)
	}
	host = spec.Hostname()
	repo = strings.TrimPrefix(spec.Locator, host+"/")
	if host == "docker.io" {
		host = "registry-1.docker.io"
	}
	return host, repo, nil
}

// backendConfig is the registry backend config (nydusd's
// device.backend.config) that reads the blobs of image ref.
func (o RegistryOptions) backendConfig(ref string) (config.Registry, error) {
	host, repo, err := splitRef(ref)
	if err != nil {
		return config.Registry{}, err
	}
	scheme := "https"
	if local, _ := docker.MatchLocalhost(host); o.PlainHTTP || local {
		scheme = "http"
	}
	rc := config.Registry{Scheme: scheme, Host: host, Repo: repo, SkipVerify: o.Insecure, Timeout: 30, ConnectTimeout: 10, RetryLimit: 2}
	user, pass, err := o.creds(host)
	if err != nil {
		return config.Registry{}, err
	}
	if user != "" || pass != "" {
		rc.Auth = base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	}
	return rc, nil
}

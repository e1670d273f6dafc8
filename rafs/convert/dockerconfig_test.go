package convert

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsd/rafsd/rafs/storage/backend"
	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

// TestDockerConfigCredentials pulls from and pushes to two registries
// with htpasswd auth and different users, the logins coming only from a
// docker config.json (one "auth" entry, one username/password entry).
func TestDockerConfigCredentials(t *testing.T) {
	src := registrytest.Start(t, registrytest.Options{User: "puller", Password: "pull-secret"})
	dst := registrytest.Start(t, registrytest.Options{User: "pusher", Password: "push-secret"})
	cfgDir := t.TempDir()
	conf := `{"auths": {
		"` + src.Addr + `": {"auth": "` + base64.StdEncoding.EncodeToString([]byte("puller:pull-secret")) + `"},
		"http://` + dst.Addr + `": {"username": "pusher", "password": "push-secret"}
	}}`
	if err := os.WriteFile(filepath.Join(cfgDir, "config.json"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	creds, err := backend.DockerCredentials(cfgDir)
	if err != nil {
		t.Fatal(err)
	}
	ro := RegistryOptions{PlainHTTP: true, Credentials: creds}

	im := newOCIImage(t, []entry{dir("etc", 0o755), fileStr("etc/motd", "authenticated\n")})
	im.pushWith(t, src.Addr+"/auth/app:oci", RegistryOptions{PlainHTTP: true, Username: "puller", Password: "pull-secret"})
	ctx := context.Background()
	target := dst.Addr + "/auth/app:nydus"

	// Anonymous: both registries refuse.
	anon := RegistryOptions{PlainHTTP: true}
	if _, err := Convert(ctx, src.Addr+"/auth/app:oci", target, Options{WorkDir: t.TempDir(), Source: anon, Target: anon}); err == nil || !strings.Contains(strings.ToLower(err.Error()), "authoriz") {
		t.Fatalf("anonymous conversion from an htpasswd registry: %v, want an authorization error", err)
	}
	// Wrong password for the target: the push fails.
	bad := RegistryOptions{PlainHTTP: true, Username: "pusher", Password: "wrong"}
	if _, err := Convert(ctx, src.Addr+"/auth/app:oci", target, Options{WorkDir: t.TempDir(), Source: ro, Target: bad}); err == nil || !strings.Contains(strings.ToLower(err.Error()), "authoriz") {
		t.Fatalf("push with a wrong password: %v, want an authorization error", err)
	}
	if _, err := Convert(ctx, src.Addr+"/auth/app:oci", target, Options{WorkDir: t.TempDir(), Source: ro, Target: ro}); err != nil {
		t.Fatalf("convert with config.json logins: %v", err)
	}
	r, err := FetchBootstrap(ctx, target, filepath.Join(t.TempDir(), "image.boot"), ro)
	if err != nil {
		t.Fatal(err)
	}
	// The daemon config carries the login for the blobs' registry.
	if got, want := r.Registry.Auth, base64.StdEncoding.EncodeToString([]byte("pusher:push-secret")); got != want {
		t.Errorf("backend auth %q, want %q", got, want)
	}
	if _, err := r.Image.Lookup(r.Image.Root(), "etc"); err != nil {
		t.Error(err)
	}
}

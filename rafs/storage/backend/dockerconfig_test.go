package backend

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDockerCredentialsFile(t *testing.T) {
	dir := t.TempDir()
	// No config.json: anonymous, as docker.
	creds, err := DockerCredentials(dir)
	if err != nil {
		t.Fatal(err)
	}
	if u, p, err := creds("example.com"); u != "" || p != "" || err != nil {
		t.Errorf("no config: %q %q %v", u, p, err)
	}
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"auths": {"https://index.docker.io/v1/": {"auth": "`+
		base64.StdEncoding.EncodeToString([]byte("hub:pw"))+`"}, "tok.example": {"identitytoken": "refresh"}}}`), 0o600)
	if creds, err = DockerCredentials(dir); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ host, user, pass string }{
		{"registry-1.docker.io", "hub", "pw"}, {"docker.io", "hub", "pw"}, {"tok.example", "", "refresh"}, {"other.example", "", ""},
	} {
		if u, p, err := creds(tc.host); u != tc.user || p != tc.pass || err != nil {
			t.Errorf("%s: %q %q %v, want %q %q", tc.host, u, p, err, tc.user, tc.pass)
		}
	}
	t.Setenv("DOCKER_CONFIG", dir)
	if DockerConfigDir() != dir {
		t.Errorf("DockerConfigDir ignores $DOCKER_CONFIG")
	}
	// A malformed file is an error, not silently anonymous.
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"auths": [`), 0o600)
	if _, err := DockerCredentials(dir); err == nil || !strings.Contains(err.Error(), "docker config") {
		t.Errorf("malformed config.json: %v", err)
	}
}

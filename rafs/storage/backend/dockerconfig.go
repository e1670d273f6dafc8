package backend

import (
	"fmt"
	"os"
	"path/filepath"

	dockerconfig "github.com/docker/cli/cli/config"
	"github.com/docker/cli/cli/config/configfile"
)

// dockerHubAuthKey is the key docker login writes Docker Hub credentials
// under in config.json (the v1 index URL, for historical reasons).
const dockerHubAuthKey = "https://index.docker.io/v1/"

// DockerConfigDir is where docker (and nerdctl, nydusify, crane) keep
// config.json: $DOCKER_CONFIG, else ~/.docker.
func DockerConfigDir() string {
	if d := os.Getenv(dockerconfig.EnvOverrideConfigDir); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".docker")
}

// DockerCredentials loads dir/config.json (DockerConfigDir() if dir is
// empty) with docker's own parser and returns a credentials function for
// RegistryOptions.Credentials: the "auths" entries, credsStore and
// credHelpers answer as they do for docker pull. A missing file gives a
// function that answers no credentials, as docker does.
func DockerCredentials(dir string) (func(host string) (user, password string, err error), error) {
	if dir == "" {
		dir = DockerConfigDir()
	}
	cf, err := dockerconfig.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("docker config in %s: %w", dir, err)
	}
	return func(host string) (string, string, error) { return dockerAuth(cf, host) }, nil
}

func dockerAuth(cf *configfile.ConfigFile, host string) (string, string, error) {
	key := host
	if host == "registry-1.docker.io" || host == "docker.io" || host == "index.docker.io" {
		key = dockerHubAuthKey
	}
	ac, err := cf.GetAuthConfig(key)
	if err != nil {
		return "", "", fmt.Errorf("credentials for %s from %s: %w", host, cf.Filename, err)
	}
	if ac.IdentityToken != "" {
		// An identity token is a refresh token: containerd's authorizer
		// sends it as the secret with an empty user name.
		return "", ac.IdentityToken, nil
	}
	return ac.Username, ac.Password, nil
}

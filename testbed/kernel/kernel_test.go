package kernel

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

func TestRequiredOptions(t *testing.T) {
	opts := RequiredOptions(Fragment)
	want := []string{
		"CONFIG_EROFS_FS_ONDEMAND", "CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_BACKED_BY_FILE",
		"CONFIG_FANOTIFY_ACCESS_PERMISSIONS", "CONFIG_VIRTIO_FS", "CONFIG_FUSE_FS", "CONFIG_VSOCKETS",
		"CONFIG_VIRTIO_VSOCKETS", "CONFIG_VIRTIO_CONSOLE", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET",
		"CONFIG_INET", "CONFIG_OVERLAY_FS", "CONFIG_EXT4_FS", "CONFIG_MISC_FILESYSTEMS",
	}
	have := map[string]bool{}
	for _, o := range opts {
		have[o] = true
	}
	for _, w := range want {
		if !have[w] {
			t.Errorf("fragment lacks %s=y", w)
		}
	}
}

func TestMissingOptions(t *testing.T) {
	config := []byte("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\nCONFIG_D=y\n")
	tests := []struct {
		want    []string
		missing string
	}{
		{[]string{"CONFIG_A", "CONFIG_D"}, ""},
		{[]string{"CONFIG_A", "CONFIG_B"}, "CONFIG_B"},
		{[]string{"CONFIG_C", "CONFIG_E"}, "CONFIG_C,CONFIG_E"},
	}
	for _, tt := range tests {
		if got := strings.Join(MissingOptions(config, tt.want), ","); got != tt.missing {
			t.Errorf("MissingOptions(%v) = %q, want %q", tt.want, got, tt.missing)
		}
	}
}

func TestKeyChangesWithInputs(t *testing.T) {
	k := Key("6.12.117-1~deb12u1", Fragment)
	if len(k) != 16 {
		t.Fatalf("key %q", k)
	}
	if k == Key("6.12.118-1~deb12u1", Fragment) {
		t.Error("key ignores the source version")
	}
	if k == Key("6.12.117-1~deb12u1", append([]byte("CONFIG_X=y\n"), Fragment...)) {
		t.Error("key ignores the fragment")
	}
}

// TestEnsure builds (or finds cached) the real kernel and checks the final
// .config carries every option; a second call must hit the cache.
func TestEnsure(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	b, err := Ensure(ctx, Options{Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(b.Path)
	if err != nil || fi.Size() < 1<<20 {
		t.Fatalf("bzImage %s: %v %v", b.Path, fi, err)
	}
	config, err := os.ReadFile(DefaultCacheDir() + "/build-" + b.Key + "/.config")
	if err != nil {
		t.Fatal(err)
	}
	if m := MissingOptions(config, RequiredOptions(Fragment)); len(m) > 0 {
		t.Errorf("missing in .config: %v", m)
	}
	t.Logf("kernel %s (source %s, built in %s with -j%d, cached %v)", b.Path, b.SourceVersion, b.BuildTime, b.Jobs, b.Cached)
	again, err := Ensure(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cached || again.Path != b.Path {
		t.Errorf("second Ensure did not hit the cache: %+v", again)
	}
}

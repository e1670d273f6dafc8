package clients

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rafsd/rafsd/internal/testutil"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/pkg/snapshotters"

	"github.com/rafsd/rafsd/rafs/storage/registrytest"
)

// built holds rafsd and rafs-image as built once for the whole test binary:
// one build instead of one per test, and every test runs the same bytes.
var built struct {
	sync.Mutex
	dir, rafsd, rafsImage string
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// rafsBinaries returns this tree's rafsd and rafs-image, building them on
// first use (a failed build is tried again by the next test).
func rafsBinaries(tb testing.TB) (rafsd, rafsImage string) {
	tb.Helper()
	built.Lock()
	defer built.Unlock()
	if built.rafsd == "" {
		if built.dir == "" {
			dir, err := os.MkdirTemp("", "rafs-clients-bin")
			if err != nil {
				tb.Fatal(err)
			}
			built.dir = dir
		}
		built.rafsd, built.rafsImage = BuildRafs(tb, built.dir)
	}
	return built.rafsd, built.rafsImage
}

// fixture is what every scenario shares: the registry, the OCI image and
// its Nydus conversion, and this tree's rafsd and rafs-image.
type fixture struct {
	img              *testImage
	ociRef, nydusRef string
	rafsd, rafsImage string
}

func setup(t *testing.T) *fixture {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("needs root: containerd, runc and FUSE mounts")
	}
	f := &fixture{img: newTestImage(t)}
	f.rafsd, f.rafsImage = rafsBinaries(t)
	reg := registrytest.Start(t, registrytest.Options{})
	f.ociRef = reg.Addr + "/rafsd/clients:oci"
	f.nydusRef = reg.Addr + "/rafsd/clients:nydus"
	f.img.push(t, f.ociRef)
	cmd := exec.Command(f.rafsImage, "convert", "--source", f.ociRef, "--target", f.nydusRef, "--plain-http", "--quiet", "--work-dir", t.TempDir())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("rafs-image convert: %v\n%s", err, out)
	} else {
		t.Logf("rafs-image convert: %s", bytes.TrimSpace(out))
	}
	return f
}

// client is a containerd client in a namespace of its own, like nerdctl.
type client struct {
	*containerd.Client
	ns    string
	stack *Stack
}

func newClient(t testing.TB, s *Stack) (*client, context.Context) {
	t.Helper()
	var r [4]byte
	rand.Read(r[:])
	ns := "rafsd-" + hex.EncodeToString(r[:])
	c, err := containerd.New(s.Address, containerd.WithDefaultNamespace(ns), containerd.WithTimeout(30*time.Second))
	if err != nil {
		t.Fatalf("containerd client: %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		// Backstop: containers the test did not delete (runc's root for
		// the runc.v2 shim is /run/containerd/runc/<namespace>).
		root := filepath.Join("/run/containerd/runc", ns)
		if out, err := exec.Command(Runc, "--root", root, "list", "-q").Output(); err == nil {
			for _, id := range strings.Fields(string(out)) {
				exec.Command(Runc, "--root", root, "delete", "--force", id).Run()
			}
		}
		os.RemoveAll(root)
	})
	ctx := namespaces.WithNamespace(context.Background(), ns)
	return &client{Client: c, ns: ns, stack: s}, ctx
}

// resolver talks plain HTTP to the test registry on 127.0.0.1.
func resolver() remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts))})
}

// pull pulls and unpacks ref into snapshotter with the labels CRI passes,
// as `nerdctl pull --snapshotter` does.
func (c *client) pull(ctx context.Context, t testing.TB, ref, snapshotter string) containerd.Image {
	t.Helper()
	img, err := c.Pull(ctx, ref,
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithResolver(resolver()),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	)
	if err != nil {
		t.Fatalf("pull %s with %s: %v", ref, snapshotter, err)
	}
	return img
}

// container is a started container; wait for it with done.
type container struct {
	c    containerd.Container
	task containerd.Task
	exit <-chan containerd.ExitStatus
	out  *testutil.SyncBuffer
	// line is closed when the first line of output has been written, at
	// lineAt.
	line   chan struct{}
	lineAt time.Time
	// status is the exit status once received from exit.
	status *containerd.ExitStatus
}

// lineWriter is the container's stdout and stderr: it notes when the first
// complete line arrives, for cold-start timing.
type lineWriter struct {
	k    *container
	once sync.Once
}

func (w *lineWriter) Write(p []byte) (int, error) {
	n, err := w.k.out.Write(p)
	if bytes.IndexByte(p, '\n') >= 0 {
		w.once.Do(func() {
			w.k.lineAt = time.Now()
			close(w.k.line)
		})
	}
	return n, err
}

// run creates a container from img on snapshotter and starts args in it
// (the image's entrypoint and command if none) under runc, as `nerdctl run
// --snapshotter` does.
func (c *client) run(ctx context.Context, t testing.TB, img containerd.Image, snapshotter, id string, args ...string) *container {
	t.Helper()
	spec := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(args) > 0 {
		spec = append(spec, oci.WithProcessArgs(args...))
	}
	ctr, err := c.NewContainer(ctx, id,
		containerd.WithImage(img),
		containerd.WithSnapshotter(snapshotter),
		containerd.WithNewSnapshot(id+"-rootfs", img),
		containerd.WithNewSpec(spec...),
	)
	if err != nil {
		t.Fatalf("create container %s: %v", id, err)
	}
	k := &container{c: ctr, out: &testutil.SyncBuffer{}, line: make(chan struct{})}
	w := &lineWriter{k: k}
	fifos := filepath.Join(c.stack.Dir, "fifo")
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, w, w), cio.WithFIFODir(fifos)))
	if err != nil {
		ctr.Delete(ctx, containerd.WithSnapshotCleanup)
		t.Fatalf("create task %s: %v", id, err)
	}
	exit, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		task.Delete(ctx, containerd.WithProcessKill)
		ctr.Delete(ctx, containerd.WithSnapshotCleanup)
		t.Fatalf("start task %s: %v", id, err)
	}
	k.task, k.exit = task, exit
	t.Cleanup(func() {
		// Bounded: containerd may already be gone when this runs.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := k.remove(cctx); err != nil {
			t.Logf("cleanup of container %s: %v", id, err)
		}
	})
	return k
}

// wait waits for the container's command to exit and returns its output.
func (k *container) wait(ctx context.Context, t testing.TB) string {
	t.Helper()
	if k.status != nil {
		return k.checkExit(t, *k.status)
	}
	select {
	case st := <-k.exit:
		return k.checkExit(t, st)
	case <-ctx.Done():
		t.Fatalf("container %s did not exit: %v\noutput so far:\n%s", k.c.ID(), ctx.Err(), k.out.String())
	}
	return ""
}

// firstLine waits for the container's first line of output and returns
// when it arrived; a container that exits without one fails t.
func (k *container) firstLine(ctx context.Context, t testing.TB) time.Time {
	t.Helper()
	select {
	case <-k.line:
		return k.lineAt
	case st := <-k.exit:
		k.status = &st
		// The exit may be seen before the line written just ahead of it.
		k.drain()
		select {
		case <-k.line:
			return k.lineAt
		default:
		}
		k.checkExit(t, st)
		t.Fatalf("container %s exited without a line of output:\n%q", k.c.ID(), k.out.String())
	case <-ctx.Done():
		t.Fatalf("container %s printed no line: %v\noutput so far:\n%s", k.c.ID(), ctx.Err(), k.out.String())
	}
	return time.Time{}
}

// drain waits until the container's output is copied in full. The exit
// status comes from the shim's exit event, which races with the copy of
// the process's last writes through the fifos: md5sum writes all its
// lines at exit (a pipe is block-buffered), and a test reading at the
// exit event saw no line, or all but "WHITEOUT-OK". containerd's own tests
// read output after task.Delete, which waits for the IO the same way.
// Bounded: a grandchild holding stdout open keeps the copy going.
func (k *container) drain() {
	if k.task == nil {
		return
	}
	done := make(chan struct{})
	go func() {
		k.task.IO().Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
	}
}

// checkExit fails t unless the command exited 0, and returns its output,
// all of it.
func (k *container) checkExit(t testing.TB, st containerd.ExitStatus) string {
	t.Helper()
	k.drain()
	code, _, err := st.Result()
	out := k.out.String()
	if err != nil || code != 0 {
		t.Fatalf("container %s exited %d (%v):\n%s", k.c.ID(), code, err, out)
	}
	return out
}

// remove deletes the task and the container with its snapshot.
func (k *container) remove(ctx context.Context) error {
	if k.task != nil {
		if _, err := k.task.Delete(ctx, containerd.WithProcessKill); err != nil {
			return fmt.Errorf("delete task: %w", err)
		}
		k.task = nil
	}
	if k.c != nil {
		if err := k.c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
			return fmt.Errorf("delete container: %w", err)
		}
		k.c = nil
	}
	return nil
}

// md5Script prints the md5 of every file of the image and checks the
// whiteout hid data/gone.
func md5Script(im *testImage) []string {
	return []string{"/bin/sh", "-c", "md5sum " + strings.Join(im.names(), " ") + " && ! cat /data/gone 2>/dev/null && echo WHITEOUT-OK"}
}

func checkSums(t *testing.T, what, out string, want []string) {
	t.Helper()
	if err := sameLines(parseSums(out), want); err != nil {
		t.Fatalf("%s: md5s differ: %v\nfull output:\n%s", what, err, out)
	}
	if !strings.Contains(out, "WHITEOUT-OK") {
		t.Fatalf("%s: whiteout not applied:\n%s", what, out)
	}
}

// fuseMounts returns the FUSE mounts under dir.
func fuseMounts(dir string) []string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 {
			continue
		}
		// Fields after " - " are fstype, source, options.
		i := strings.Index(line, " - ")
		if i < 0 {
			continue
		}
		tail := strings.Fields(line[i+3:])
		mp := unescapeMount(f[4])
		if len(tail) > 0 && strings.HasPrefix(tail[0], "fuse") && (mp == dir || strings.HasPrefix(mp, dir+"/")) {
			out = append(out, mp)
		}
	}
	return out
}

// removeImage deletes the image synchronously (containerd's GC removes its
// snapshots, and the snapshotter, with sync_remove, the RAFS instance).
func (c *client) removeImage(ctx context.Context, t testing.TB, name string) {
	t.Helper()
	if err := c.ImageService().Delete(ctx, name, images.SynchronousDelete()); err != nil {
		t.Fatalf("delete image %s: %v", name, err)
	}
}

// TestContainerdNydus runs the same files through runc twice — the OCI
// image on overlayfs and its RAFS conversion on the nydus snapshotter with
// rafsd — and compares the md5s, in dedicated and shared daemon mode.
func TestContainerdNydus(t *testing.T) {
	f := setup(t)
	want := f.img.expectedSums()
	for _, mode := range []string{"dedicated", "shared"} {
		t.Run(mode, func(t *testing.T) {
			s := StartStack(t, SnapshotterConfig{DaemonMode: mode, RecoverPolicy: "failover", Rafsd: f.rafsd, RafsImage: f.rafsImage, PlainHTTP: true})
			c, ctx := newClient(t, s)
			ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
			defer cancel()

			oci := c.pull(ctx, t, f.ociRef, "overlayfs")
			k := c.run(ctx, t, oci, "overlayfs", "oci-"+mode, md5Script(f.img)...)
			ociOut := k.wait(ctx, t)
			checkSums(t, "OCI image on overlayfs", ociOut, want)
			if err := k.remove(ctx); err != nil {
				t.Fatal(err)
			}

			ny := c.pull(ctx, t, f.nydusRef, "nydus")
			k = c.run(ctx, t, ny, "nydus", "nydus-"+mode, md5Script(f.img)...)
			nyOut := k.wait(ctx, t)
			checkSums(t, "RAFS image on nydus+rafsd", nyOut, want)
			if err := sameLines(parseSums(nyOut), parseSums(ociOut)); err != nil {
				t.Fatalf("nydus vs overlayfs: %v", err)
			}
			if len(ProcsOf(f.rafsd)) == 0 {
				t.Fatal("no rafsd process serves the nydus container")
			}
			if len(fuseMounts(s.SnapRoot)) == 0 {
				t.Fatal("no FUSE mount under the snapshotter root")
			}
			serving := rafsInstances(t, s.SnapRoot)
			if len(serving) == 0 {
				t.Fatal("no rafsd lists a RAFS instance while the container exists")
			}
			t.Logf("%s: %d files, same md5s through overlayfs and nydus+rafsd; rafsd instances %v", mode, len(want), serving)

			if err := k.remove(ctx); err != nil {
				t.Fatal(err)
			}
			c.removeImage(ctx, t, f.nydusRef)
			if mode == "dedicated" {
				// The image's daemon goes with its last snapshot.
				wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
				WaitNoProcs(wctx, t, f.rafsd)
				wcancel()
				if ms := Mounts(s.Dir); len(ms) != 0 {
					t.Fatalf("mounts left after removing container and image: %v", ms)
				}
			} else {
				// The shared daemon stays up for the next image, but
				// serves nothing of the removed one: its RAFS instance is
				// unmounted (the snapshotter's umount call), and only the
				// daemon's own FUSE mount is left under the stack's dir.
				for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
					left := rafsInstances(t, s.SnapRoot)
					if len(left) == 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("RAFS instances still mounted in the shared rafsd after removing container and image: %v (while running: %v)", left, serving)
					}
				}
				if ms, fm := Mounts(s.Dir), fuseMounts(s.Dir); len(fm) != 1 || len(ms) != 1 {
					t.Fatalf("after removing container and image, mounts under the stack: %v (want only the shared daemon's FUSE mount; FUSE: %v)", ms, fm)
				}
			}
			stopStack(t, s)
			if pids := ProcsOf(f.rafsd); len(pids) != 0 {
				t.Fatalf("rafsd still running after the snapshotter stopped: %v", pids)
			}
			if ms := Mounts(s.Dir); len(ms) != 0 {
				t.Fatalf("mounts left: %v", ms)
			}
		})
	}
}

// stopStack stops containerd, then the snapshotter alone (SIGTERM to its
// pid, not its group) so that what it leaves behind is its own doing.
func stopStack(t testing.TB, s *Stack) {
	t.Helper()
	s.Containerd.Stop(10 * time.Second)
	s.Snapshotter.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.Snapshotter.done:
	case <-time.After(20 * time.Second):
		t.Errorf("snapshotter did not exit on SIGTERM")
		s.Snapshotter.Stop(time.Second)
	}
}

// TestContainerdNydusFailover kills rafsd while a container reads its
// files: with recover_policy "failover" the snapshotter starts a new rafsd
// that takes the FUSE session over from the supervisor, and the container's
// next reads succeed with the right bytes.
func TestContainerdNydusFailover(t *testing.T) {
	f := setup(t)
	want := f.img.expectedSums()
	s := StartStack(t, SnapshotterConfig{DaemonMode: "dedicated", RecoverPolicy: "failover", Rafsd: f.rafsd, RafsImage: f.rafsImage, PlainHTTP: true})
	c, ctx := newClient(t, s)
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()

	ny := c.pull(ctx, t, f.nydusRef, "nydus")
	script := "md5sum /data/a && echo READY && while [ ! -e /tmp/go ]; do sleep 0.1; done && md5sum " + strings.Join(f.img.names(), " ") + " && ! cat /data/gone 2>/dev/null && echo WHITEOUT-OK"
	k := c.run(ctx, t, ny, "nydus", "failover", "/bin/sh", "-c", script)
	for !strings.Contains(k.out.String(), "READY") {
		select {
		case <-ctx.Done():
			t.Fatalf("container never got ready:\n%s", k.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	pids := ProcsOf(f.rafsd)
	if len(pids) != 1 {
		t.Fatalf("want one rafsd (dedicated mode), got %v", pids)
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Wait for the new daemon, then let the container read on.
	for {
		now := ProcsOf(f.rafsd)
		if len(now) == 1 && now[0] != pids[0] {
			t.Logf("rafsd %d killed, snapshotter started %d", pids[0], now[0])
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("snapshotter did not restart rafsd (running: %v)", now)
		case <-time.After(50 * time.Millisecond):
		}
	}
	// The container reads on through the new daemon. /tmp is in the
	// container's writable layer: poke it through the task.
	rootfs := filepath.Join("/proc", fmt.Sprint(taskPid(ctx, t, k)), "root", "tmp", "go")
	if err := os.WriteFile(rootfs, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	out := k.wait(ctx, t)
	_, after, _ := strings.Cut(out, "READY\n")
	checkSums(t, "after failover", after, want)

	// Removing container and image stops the restarted daemon too.
	if err := k.remove(ctx); err != nil {
		t.Fatal(err)
	}
	c.removeImage(ctx, t, f.nydusRef)
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	defer wcancel()
	WaitNoProcs(wctx, t, f.rafsd)
	stopStack(t, s)
	if ms := Mounts(s.Dir); len(ms) != 0 {
		t.Fatalf("mounts left: %v", ms)
	}
}

func taskPid(ctx context.Context, t *testing.T, k *container) uint32 {
	t.Helper()
	return k.task.Pid()
}

// eachDaemonAPI calls fn with an HTTP client for the API socket of every
// rafsd the snapshotter runs under root (each api.sock).
func eachDaemonAPI(root string, fn func(sock string, hc *http.Client)) {
	walkOutsideMounts(root, func(p string, d fs.DirEntry) {
		if d.Type()&fs.ModeSocket == 0 || filepath.Base(p) != "api.sock" {
			return
		}
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", p)
			},
		}}
		defer hc.CloseIdleConnections()
		fn(p, hc)
	})
}

// rafsInstances asks every rafsd under the snapshotter root (each API
// socket) for the RAFS instances it serves (GET /api/v1/daemon,
// backend_collection) and returns them as "socket:mountpoint".
func rafsInstances(t testing.TB, root string) []string {
	t.Helper()
	var out []string
	eachDaemonAPI(root, func(p string, hc *http.Client) {
		resp, err := hc.Get("http://rafsd/api/v1/daemon")
		if err != nil {
			return // a dedicated daemon on its way out
		}
		defer resp.Body.Close()
		var info struct {
			BackendCollection map[string]json.RawMessage `json:"backend_collection"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
			t.Fatalf("GET /api/v1/daemon on %s: %v", p, err)
		}
		for mp := range info.BackendCollection {
			out = append(out, filepath.Base(filepath.Dir(p))+":"+mp)
		}
	})
	sort.Strings(out)
	return out
}

package fusedev

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

func TestAdoptRejectsNonInit(t *testing.T) {
	s := New(nil, Options{})
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := s.Adopt(f, "/x", make([]byte, 40)); err == nil {
		t.Fatal("accepted a non-INIT request")
	}
}

func TestSupervisorRoundTrip(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "sup.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	state := make([]byte, 600<<10) // larger than one message
	for i := range state {
		state[i] = byte(i)
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// The supervisor relays what it got from SendState to RecvState.
	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		relay := c.(*net.UnixConn)
		data, fd, err := readAll(relay)
		c.Close()
		if err != nil {
			done <- err
			return
		}
		c2, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		// Like nydus-snapshotter: loop, since a stream write may be short.
		oob := unix.UnixRights(fd)
		for len(data) > 0 && err == nil {
			var n int
			n, _, err = c2.(*net.UnixConn).WriteMsgUnix(data, oob, nil)
			data, oob = data[n:], nil
		}
		c2.Close()
		unix.Close(fd)
		done <- err
	}()
	if err := SendState(sock, state, int(f.Fd()), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	got, dev, err := RecvState(sock, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(got) != len(state) || string(got) != string(state) {
		t.Fatalf("state: %d bytes, want %d", len(got), len(state))
	}
	var st1, st2 unix.Stat_t
	unix.Fstat(int(f.Fd()), &st1)
	unix.Fstat(int(dev.Fd()), &st2)
	if st1.Rdev != st2.Rdev {
		t.Fatal("received descriptor is not the one sent")
	}
}

func readAll(c *net.UnixConn) ([]byte, int, error) {
	var data []byte
	fd := -1
	buf, oob := make([]byte, 64<<10), make([]byte, 128)
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			if fds, perr := parseRights(oob[:oobn]); perr == nil && len(fds) > 0 {
				fd = fds[0]
			}
		}
		data = append(data, buf[:n]...)
		if err != nil || n == 0 {
			break
		}
	}
	return data, fd, nil
}

// blockingFS parks every LOOKUP until release is closed.
type blockingFS struct {
	fuse.RawFileSystem
	entered chan struct{}
	release chan struct{}
}

// GetAttr answers for the root, which the kernel checks before a lookup.
func (b *blockingFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	out.Ino, out.Mode, out.Nlink = 1, unix.S_IFDIR|0o755, 2
	return fuse.OK
}

func (b *blockingFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	b.entered <- struct{}{}
	<-b.release
	return fuse.ENOENT
}

func TestInflightShowsRequestBeingServed(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a FUSE mount")
	}
	fs := &blockingFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), entered: make(chan struct{}, 1), release: make(chan struct{})}
	s := New(fs, Options{Threads: 2, ReadAheadKB: -1})
	mnt := t.TempDir()
	if err := s.Mount(mnt); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release := func() { once.Do(func() { close(fs.release) }) }
	t.Cleanup(func() {
		release()
		if err := s.Unmount(); err != nil {
			t.Error(err)
		}
	})
	s.Start()
	if got := s.Inflight(); len(got) != 0 {
		t.Fatalf("inflight before any request: %+v", got)
	}
	statErr := make(chan error, 1)
	go func() {
		_, err := os.Stat(filepath.Join(mnt, "x"))
		statErr <- err
	}()
	select {
	case <-fs.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("LOOKUP never reached the filesystem")
	}
	got := s.Inflight()
	if len(got) != 1 || got[0].Opcode != 1 /* FUSE_LOOKUP */ || got[0].Inode != 1 || got[0].Unique == 0 ||
		time.Since(time.Unix(got[0].TimestampSecs, 0)) > time.Minute {
		t.Fatalf("inflight while a LOOKUP of the root is served: %+v", got)
	}
	release()
	select {
	case err := <-statErr:
		if !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("stat: %v, want ENOENT", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("stat not answered")
	}
	if got := s.Inflight(); len(got) != 0 {
		t.Fatalf("inflight after the reply: %+v", got)
	}
}

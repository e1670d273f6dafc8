package fanotify

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func pattern(off, n uint64) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte((off + uint64(i)) * 31 >> 3)
	}
	return p
}

// patternFiller writes the pattern for the event's range through the
// event's fd, or fails as told.
type patternFiller struct {
	fail  error
	block bool
	calls atomic.Int32
}

func (p *patternFiller) Fill(ctx context.Context, f *os.File, ev Event) error {
	p.calls.Add(1)
	if p.block {
		<-ctx.Done()
		return ctx.Err()
	}
	if p.fail != nil {
		return p.fail
	}
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	off, n := ev.Offset, ev.Count
	if !ev.HasRange || off+n > uint64(fi.Size()) {
		off, n = 0, uint64(fi.Size())
	}
	_, err = f.WriteAt(pattern(off, n), int64(off))
	return err
}

// markedFile creates a sparse file of size bytes and a group that marks
// it for pre-content events.
func markedFile(t *testing.T, size int64) (string, *Group) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "blob.cache")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	g, err := New()
	if err != nil {
		t.Fatalf("this kernel must support pre-content events: %v", err)
	}
	if err := g.Mark(path); err != nil {
		t.Fatal(err)
	}
	return path, g
}

// serve marks a fresh sparse file and serves it with f until the test ends.
func serve(t *testing.T, f Filler, opts Options) string {
	t.Helper()
	path, g := markedFile(t, 1<<20)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Serve(ctx, f, opts) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		g.Close()
	})
	return path
}

func readAt(path string, off int64, n int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p := make([]byte, n)
	m, err := f.ReadAt(p, off)
	return p[:m], err
}

func TestFillOnRead(t *testing.T) {
	fl := &patternFiller{}
	path := serve(t, fl, Options{})
	for _, tc := range []struct {
		off int64
		n   int
	}{{0, 4096}, {123456, 777}, {1<<20 - 10, 10}} {
		got, err := readAt(path, tc.off, tc.n)
		if err != nil {
			t.Fatalf("read at %d: %v", tc.off, err)
		}
		if !bytes.Equal(got, pattern(uint64(tc.off), uint64(tc.n))) {
			t.Fatalf("read at %d: bytes differ from the fill", tc.off)
		}
	}
	if fl.calls.Load() == 0 {
		t.Fatal("no fill was asked for")
	}
}

func TestFailedFillIsEIO(t *testing.T) {
	path := serve(t, &patternFiller{fail: errors.New("backend down")}, Options{})
	_, err := readAt(path, 0, 4096)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read = %v, want EIO", err)
	}
}

func TestErrnoPassedThrough(t *testing.T) {
	path := serve(t, &patternFiller{fail: unix.ENOSPC}, Options{})
	if _, err := readAt(path, 0, 1); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("read = %v, want ENOSPC", err)
	}
}

// A stuck backend must not hang the reader past the deadline.
func TestDeadline(t *testing.T) {
	path := serve(t, &patternFiller{block: true}, Options{Timeout: 300 * time.Millisecond})
	start := time.Now()
	_, err := readAt(path, 0, 4096)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read = %v, want EIO", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("reader waited %s", took)
	}
}

func event(mask uint64, fd, pid int32, rng *[2]uint64) []byte {
	b := make([]byte, metadataLen)
	le := binary.LittleEndian
	b[4] = unix.FANOTIFY_METADATA_VERSION
	le.PutUint16(b[6:], metadataLen)
	le.PutUint64(b[8:], mask)
	le.PutUint32(b[16:], uint32(fd))
	le.PutUint32(b[20:], uint32(pid))
	if rng != nil {
		r := make([]byte, infoRangeLen)
		r[0] = unix.FAN_EVENT_INFO_TYPE_RANGE
		le.PutUint16(r[2:], infoRangeLen)
		le.PutUint64(r[8:], rng[0])
		le.PutUint64(r[16:], rng[1])
		b = append(b, r...)
	}
	le.PutUint32(b[0:], uint32(len(b)))
	return b
}

func TestParseEvents(t *testing.T) {
	buf := append(event(unix.FAN_PRE_ACCESS, 7, 100, &[2]uint64{4096, 131072}), event(unix.FAN_PRE_ACCESS, 8, 101, nil)...)
	evs, err := ParseEvents(buf)
	if err != nil || len(evs) != 2 {
		t.Fatalf("%v %v", evs, err)
	}
	if e := evs[0]; !e.HasRange || e.Offset != 4096 || e.Count != 131072 || e.Fd != 7 || e.Pid != 100 {
		t.Errorf("event 0: %+v", e)
	}
	if e := evs[1]; e.HasRange || e.Fd != 8 {
		t.Errorf("event 1: %+v", e)
	}
	bad := map[string][]byte{
		"short":        buf[:10],
		"length past":  func() []byte { b := bytes.Clone(buf); binary.LittleEndian.PutUint32(b, 9999); return b }(),
		"length small": func() []byte { b := bytes.Clone(buf); binary.LittleEndian.PutUint32(b, 3); return b }(),
		"version":      func() []byte { b := bytes.Clone(buf); b[4] = 9; return b }(),
		"info length":  func() []byte { b := bytes.Clone(buf); binary.LittleEndian.PutUint16(b[metadataLen+2:], 200); return b }(),
		"info zero":    func() []byte { b := bytes.Clone(buf); binary.LittleEndian.PutUint16(b[metadataLen+2:], 0); return b }(),
	}
	for name, b := range bad {
		if _, err := ParseEvents(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func FuzzParseEvents(f *testing.F) {
	f.Add(event(unix.FAN_PRE_ACCESS, 7, 100, &[2]uint64{0, 4096}))
	f.Add(append(event(unix.FAN_PRE_ACCESS, 7, 100, nil), event(0, -1, 0, nil)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		evs, _ := ParseEvents(b)
		if len(evs)*metadataLen > len(b) {
			t.Fatalf("%d events from %d bytes", len(evs), len(b))
		}
	})
}

// While a second holder keeps the group alive, a reader that arrives when no
// daemon serves blocks (no zeros) and is answered by the next daemon that
// serves the same group.
func TestHandoverKeepsReadersBlocked(t *testing.T) {
	path, g := markedFile(t, 1<<16)
	held, err := unix.Dup(g.FD()) // the supervisor's copy
	if err != nil {
		t.Fatal(err)
	}
	g.Close() // the first daemon is gone

	type result struct {
		b   []byte
		err error
	}
	res := make(chan result, 1)
	go func() { b, err := readAt(path, 100, 200); res <- result{b, err} }()
	select {
	case r := <-res:
		t.Fatalf("reader was answered with no daemon serving: %v %v", r.b[:8], r.err)
	case <-time.After(300 * time.Millisecond):
	}

	g2 := FromFD(held)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g2.Serve(ctx, &patternFiller{}, Options{}) }()
	defer func() { cancel(); <-done; g2.Close() }()
	select {
	case r := <-res:
		if r.err != nil || !bytes.Equal(r.b, pattern(100, 200)) {
			t.Fatalf("after handover: %v, bytes ok=%v", r.err, bytes.Equal(r.b, pattern(100, 200)))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("reader not answered by the new daemon")
	}
}

// An event a dead daemon read but never answered stays pending: the next
// daemon cannot fill it (it does not know it), but DenyOrphans fails it
// with EIO instead of leaving its reader blocked forever.
func TestDenyOrphans(t *testing.T) {
	path, g := markedFile(t, 1<<16)
	held, err := unix.Dup(g.FD()) // the supervisor's copy
	if err != nil {
		t.Fatal(err)
	}
	res := make(chan error, 1)
	go func() { _, err := readAt(path, 0, 100); res <- err }()
	// The "dead daemon" reads the event and dies without answering.
	buf := make([]byte, 4096)
	n, err := unix.Read(g.FD(), buf)
	if err != nil {
		t.Fatal(err)
	}
	evs, err := ParseEvents(buf[:n])
	if err != nil || len(evs) == 0 {
		t.Fatalf("%v %v", evs, err)
	}
	for _, ev := range evs {
		unix.Close(ev.Fd)
	}
	g.Close()
	select {
	case err := <-res:
		t.Fatalf("reader answered with its event orphaned: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	g2 := FromFD(held)
	defer g2.Close()
	if got := g2.DenyOrphans(1024); got != len(evs) {
		t.Errorf("DenyOrphans answered %d events, want %d", got, len(evs))
	}
	select {
	case err := <-res:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("orphaned reader got %v, want EIO", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("orphaned reader still blocked")
	}
}

// Events the Trusted predicate picks are allowed at once without a fill,
// even while every worker is busy (a fill waiting on the daemon's own I/O
// must not deadlock).
func TestTrustedBypassesBusyWorkers(t *testing.T) {
	fl := &patternFiller{block: true}
	path := serve(t, fl, Options{Workers: 1, Timeout: time.Second, Trusted: SelfPid})
	// A foreign reader (dd in another process) occupies the only worker.
	cmd := exec.Command("dd", "if="+path, "of=/dev/null", "bs=4096", "count=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	for fl.calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	// Our own read is answered at once, with no fill: the file's hole.
	start := time.Now()
	got, err := readAt(path, 8192, 10)
	if err != nil || !bytes.Equal(got, make([]byte, 10)) {
		t.Fatalf("own read: %v %v", got, err)
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Fatalf("own read waited %s behind a busy worker", took)
	}
}

// FuzzJournal opens arbitrary bytes as a journal file: a clear error or
// records, never a panic.
func FuzzJournal(f *testing.F) {
	dir := f.TempDir()
	seed := filepath.Join(dir, "seed")
	j, err := OpenJournal(seed, 4)
	if err != nil {
		f.Fatal(err)
	}
	j.add(&Event{Fd: 7, Offset: 4096, Count: 1 << 20, HasRange: true, Dev: 1, Ino: 2})
	j.Close(false)
	b, _ := os.ReadFile(seed)
	f.Add(b)
	f.Add([]byte(journalMagic))
	f.Add(append([]byte(journalMagic), 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0))
	f.Fuzz(func(t *testing.T, data []byte) {
		tf, err := os.CreateTemp(dir, "j")
		if err != nil {
			t.Fatal(err)
		}
		p := tf.Name()
		defer os.Remove(p)
		_, err = tf.Write(data)
		tf.Close()
		if err != nil {
			t.Fatal(err)
		}
		j, err := OpenJournal(p, 4)
		if err != nil {
			return
		}
		defer j.Close(true)
		for _, ev := range j.Pending() {
			_ = ev.Fd
		}
		j.Forget()
		if len(j.Pending()) != 0 {
			t.Fatal("records left after Forget")
		}
	})
}

// A journal keeps the records of a dead writer for the next opener, and
// frees their slots only on Forget.
func TestJournalSurvivesReopen(t *testing.T) {
	p := filepath.Join(t.TempDir(), "j")
	j, err := OpenJournal(p, 2)
	if err != nil {
		t.Fatal(err)
	}
	a := j.add(&Event{Fd: 11, Offset: 1, Count: 2, HasRange: true, Dev: 3, Ino: 4})
	b := j.add(&Event{Fd: 12})
	if a < 0 || b < 0 || j.add(&Event{Fd: 13}) != -1 {
		t.Fatal("a 2-slot journal took a third record")
	}
	j.done(b)
	// No Close: the writer "dies"; its mapping's stores are in the file.
	k, err := OpenJournal(p, 2)
	if err != nil {
		t.Fatal(err)
	}
	got := k.Pending()
	if len(got) != 1 || got[0].Fd != 11 || got[0].Offset != 1 || got[0].Count != 2 || !got[0].HasRange || got[0].Dev != 3 || got[0].Ino != 4 {
		t.Fatalf("pending after reopen: %+v", got)
	}
	if k.add(&Event{Fd: 20}) < 0 || k.add(&Event{Fd: 21}) != -1 {
		t.Fatal("a held record's slot was reused before Forget")
	}
	k.Forget()
	if len(k.Pending()) != 0 || k.add(&Event{Fd: 22}) < 0 {
		t.Fatal("Forget did not free the held slot")
	}
	j.Close(false)
	k.Close(true)
}

// TestMarkOnTmpfs: a cache file on a filesystem that does not allow
// pre-content events (tmpfs) gets ErrNoPreContentFS, which says where the
// cache must go instead, not a bare EOPNOTSUPP.
func TestMarkOnTmpfs(t *testing.T) {
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Fatalf("/dev/shm is not a tmpfs here (%v): the test needs one", err)
	}
	f, err := os.CreateTemp("/dev/shm", "rafsd-mark-")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer os.Remove(f.Name())
	g, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	err = g.Mark(f.Name())
	if !errors.Is(err, ErrNoPreContentFS) || !errors.Is(err, unix.EOPNOTSUPP) {
		t.Fatalf("Mark on tmpfs: %v, want ErrNoPreContentFS wrapping EOPNOTSUPP", err)
	}
}

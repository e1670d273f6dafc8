package guard

import (
	"bytes"
	"encoding/json"
	"testing"

	"golang.org/x/sys/unix"
)

// A reply comes from whatever listens at a socket path in a cache
// directory: decoding never panics, and a reply with fds is accepted only
// with a group and an inotify instance per group.
func FuzzDecodeReply(f *testing.F) {
	ok, _ := json.Marshal(Reply{Daemon: 7, Guard: 9, Groups: 2})
	f.Add(ok, 4)
	f.Add(ok, 3)
	f.Add(ok, 0)
	f.Add([]byte(`{"daemon":1,"guard":2,"alive":true,"groups":1}`), 0)
	f.Add([]byte(`{"groups":-1}`), 2)
	f.Add([]byte(`{"groups":1e40}`), 2)
	f.Add([]byte(`{`), 0)
	f.Add([]byte{}, 0)
	f.Fuzz(func(t *testing.T, b []byte, nfds int) {
		rep, err := decodeReply(b, nfds)
		if err == nil && nfds != 0 && nfds != 2*rep.Groups {
			t.Fatalf("accepted %d fds for %d groups", nfds, rep.Groups)
		}
	})
}

// Control messages are parsed without a panic (and without closing
// anything: the fds a message names are only numbers here).
func FuzzParseRights(f *testing.F) {
	f.Add(unix.UnixRights(5, 6, 7, 8))
	f.Add(unix.UnixRights())
	f.Add(append(unix.UnixRights(3), unix.UnixCredentials(&unix.Ucred{Pid: 1})...))
	f.Add(unix.UnixRights(3)[:10])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, oob []byte) {
		fds, _ := parseRights(oob)
		if len(fds) > len(oob)/4 {
			t.Fatalf("%d fds from %d bytes", len(fds), len(oob))
		}
	})
}

// Updates arrive as JSON lines on a pipe, possibly cut anywhere: every
// complete line is consumed (those that decode, in order), and only an
// incomplete one is left.
func FuzzSplitUpdates(f *testing.F) {
	one, _ := json.Marshal(Update{Mounts: []string{"/mnt/a"}, Dirs: []string{"/var/cache"}})
	f.Add(append(one, '\n'))
	f.Add(append(append(one, '\n'), one[:5]...))
	f.Add([]byte("garbage\n{\"dirs\":[\"/x\"]}\n\n"))
	f.Add([]byte("{\"mounts\":3}\n"))
	f.Add([]byte("{\"dirs\":[\"/c\"],\"supervised\":true,\"max_fd\":-7}\n{\"max_fd\":1e99}\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, buf []byte) {
		us, rest := splitUpdates(buf)
		if bytes.IndexByte(rest, '\n') >= 0 || !bytes.HasSuffix(buf, rest) {
			t.Fatalf("rest %q of %q", rest, buf)
		}
		if lines := bytes.Count(buf, []byte("\n")); len(us) > lines {
			t.Fatalf("%d updates from %d lines", len(us), lines)
		}
		for _, u := range us {
			// The orphans a guard tries stay within MaxFD, whatever
			// the daemon said.
			if n := u.maxFD(); n < 1 || n > MaxFD {
				t.Fatalf("update %+v: orphans tried up to fd %d", u, n)
			}
		}
		// Fed in two pieces, the same updates come out.
		for _, cut := range []int{len(buf) / 2, len(buf) / 3} {
			a, r := splitUpdates(buf[:cut])
			b, r2 := splitUpdates(append(bytes.Clone(r), buf[cut:]...))
			if len(a)+len(b) != len(us) || !bytes.Equal(r2, rest) {
				t.Fatalf("cut at %d: %d+%d updates, rest %q; whole: %d, rest %q", cut, len(a), len(b), r2, len(us), rest)
			}
		}
	})
}

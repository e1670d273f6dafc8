// Package treehash computes a content digest of a directory tree. The host and
// the guest agent use the same function, so a tree served inside a VM can be
// compared with the tree it was built from by one string.
//
// The digest covers, for every entry in lexical path order: the relative path,
// the file type, the permission bits (with setuid, setgid and sticky), the size
// and content of regular files, the target of symlinks and the device number
// of device nodes. Owners, times and xattrs are not covered: images built by
// an unprivileged tool and unpacked elsewhere legitimately differ in them.
package treehash

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
)

// Entry is one file system object of a tree, as hashed.
type Entry struct {
	Path   string `json:"path"`             // slash separated, relative to the root; "." is the root
	Type   byte   `json:"type"`             // one of 'd', 'f', 'l', 'c', 'b', 'p', 's'
	Mode   uint32 `json:"mode"`             // permission bits plus setuid/setgid/sticky (07777)
	Size   int64  `json:"size,omitempty"`   // regular files only
	Digest string `json:"digest,omitempty"` // sha256 of the content, regular files only
	Link   string `json:"link,omitempty"`   // symlink target
	Rdev   uint64 `json:"rdev,omitempty"`   // device nodes only
}

// String renders the entry as one line, the exact bytes that enter the tree digest.
func (e Entry) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%q %c %04o", e.Path, e.Type, e.Mode)
	switch e.Type {
	case 'f':
		fmt.Fprintf(&b, " %d %s", e.Size, e.Digest)
	case 'l':
		fmt.Fprintf(&b, " -> %q", e.Link)
	case 'c', 'b':
		fmt.Fprintf(&b, " rdev=%d", e.Rdev)
	}
	return b.String()
}

// Walk lists the tree under root (not following symlinks, not crossing into
// other paths) in lexical path order, hashing file contents on the way.
func Walk(root string) ([]Entry, error) {
	var out []Entry
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("treehash: walk %s: %w", p, err)
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return fmt.Errorf("treehash: %s: %w", p, err)
		}
		e, err := entry(p, filepath.ToSlash(rel))
		if err != nil {
			return err
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, err
	}
	// WalkDir visits in lexical order per directory; sort the whole list by
	// path so the order does not depend on how directories nest ("a/b" vs "a.b").
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}

func entry(p, rel string) (Entry, error) {
	fi, err := os.Lstat(p)
	if err != nil {
		return Entry{}, fmt.Errorf("treehash: %w", err)
	}
	m := fi.Mode()
	e := Entry{Path: rel, Mode: uint32(m.Perm())}
	if m&fs.ModeSetuid != 0 {
		e.Mode |= 04000
	}
	if m&fs.ModeSetgid != 0 {
		e.Mode |= 02000
	}
	if m&fs.ModeSticky != 0 {
		e.Mode |= 01000
	}
	switch {
	case m.IsDir():
		e.Type = 'd'
	case m.IsRegular():
		e.Type = 'f'
		e.Size = fi.Size()
		if e.Digest, err = fileDigest(p); err != nil {
			return Entry{}, err
		}
	case m&fs.ModeSymlink != 0:
		e.Type = 'l'
		if e.Link, err = os.Readlink(p); err != nil {
			return Entry{}, fmt.Errorf("treehash: %w", err)
		}
	case m&fs.ModeCharDevice != 0:
		e.Type = 'c'
		e.Rdev = rdev(fi)
	case m&fs.ModeDevice != 0:
		e.Type = 'b'
		e.Rdev = rdev(fi)
	case m&fs.ModeNamedPipe != 0:
		e.Type = 'p'
	case m&fs.ModeSocket != 0:
		e.Type = 's'
	default:
		return Entry{}, fmt.Errorf("treehash: %s: unsupported file type %v", p, m.Type())
	}
	return e, nil
}

func rdev(fi fs.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Rdev)
	}
	return 0
}

func fileDigest(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", fmt.Errorf("treehash: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("treehash: read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Sum is the digest of a list of entries as returned by Walk: sha256 over
// their String forms, one per line.
func Sum(entries []Entry) string {
	h := sha256.New()
	for _, e := range entries {
		io.WriteString(h, e.String())
		h.Write([]byte{'\n'})
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// Hash walks root and returns the digest of the tree.
func Hash(root string) (string, error) {
	es, err := Walk(root)
	if err != nil {
		return "", err
	}
	return Sum(es), nil
}

// Diff describes how tree b differs from tree a, one line per differing path,
// at most max lines (0: no limit). Both lists must be sorted by path, as Walk returns them.
func Diff(a, b []Entry, max int) []string {
	var out []string
	add := func(s string) bool {
		if max > 0 && len(out) >= max {
			out = append(out, "...")
			return false
		}
		out = append(out, s)
		return true
	}
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j >= len(b) || (i < len(a) && a[i].Path < b[j].Path):
			if !add("- " + a[i].String()) {
				return out
			}
			i++
		case i >= len(a) || b[j].Path < a[i].Path:
			if !add("+ " + b[j].String()) {
				return out
			}
			j++
		default:
			if a[i] != b[j] {
				if !add("- "+a[i].String()) || !add("+ "+b[j].String()) {
					return out
				}
			}
			i++
			j++
		}
	}
	return out
}

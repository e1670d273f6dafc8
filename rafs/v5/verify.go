package v5

import (
	"fmt"
	"io"

	"github.com/rafsd/rafsd/rafs/codec"
)

// VerifyDigests checks the inode digests of the v5 bootstrap of size bytes
// in r the way nydusd does when digest validation is enabled
// (rafsv5_validate_inode, recursively from the root): a regular file's
// digest is over its chunk digests, a symlink's over its target, a
// directory's over its children's digests in table order. Special files'
// digests only enter their directory's. Every record reached is checked,
// hardlink names included. Errors wrap codec.ErrDigestMismatch, or what
// Read would return for a malformed bootstrap.
//
// Read does not call it: digests guard metadata against corruption, not
// tampering (whoever can rewrite the bootstrap can recompute them), and
// nydusd skips them by default.
func VerifyDigests(r io.ReaderAt, size int64) error {
	var hdr [8]byte
	if n, _ := r.ReadAt(hdr[:], 0); n < len(hdr) || !IsV5(hdr[:]) {
		return fmt.Errorf("rafs v5: verify: %w", ErrNotV5)
	}
	if size <= SuperblockSize || size > MaxMetadataSize || size%align != 0 {
		return errf("bootstrap size %d", size)
	}
	buf, err := readAll(r, size)
	if err != nil {
		return err
	}
	d := decoder{buf: buf}
	if err := d.superblock(); err != nil {
		return err
	}
	if err := d.walk(); err != nil {
		return err
	}
	dg := digesterOf(d.sb.flags)
	var data []byte
	// Children are visited after their directory, so a reverse sweep
	// checks every child before the directory that hashes it.
	for vi := len(d.visits) - 1; vi >= 0; vi-- {
		v := &d.visits[vi]
		off := uint64(v.start)
		var in inode
		in.decode(d.buf[off : off+inodeSize])
		_, _, coff, _, err := d.layout(off, &in)
		if err != nil {
			return err
		}
		data = data[:0]
		switch {
		case isReg(in.mode):
			for k := range uint64(in.childCount) {
				p := coff + k*chunkInfoSize
				data = append(data, d.buf[p:p+32]...)
			}
		case isLnk(in.mode):
			p := off + inodeSize + alignUp(uint64(in.nameSize))
			data = append(data, d.buf[p:p+uint64(in.symlinkSize)]...)
		case isDir(in.mode):
			for k := range v.childCount {
				p := uint64(d.visits[v.firstChild+k].start)
				data = append(data, d.buf[p:p+32]...)
			}
		default:
			continue
		}
		if got := dg.Sum(data); got != in.digest {
			return fmt.Errorf("rafs v5: inode %d (table index %d): digest %s, contents hash to %s: %w", in.ino, v.index, in.digest, got, codec.ErrDigestMismatch)
		}
	}
	return nil
}

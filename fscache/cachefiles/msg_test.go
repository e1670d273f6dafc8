package cachefiles

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

func TestParseMsgRoundTrip(t *testing.T) {
	for _, m := range []Msg{
		{ID: 7, Opcode: OpOpen, ObjectID: 3, Open: &OpenMsg{VolumeKey: "erofs,domain", CookieKey: "fsid-1", FD: 12, Flags: 0}},
		{ID: 1, Opcode: OpOpen, ObjectID: 1, Open: &OpenMsg{VolumeKey: "", CookieKey: "", FD: 4}},
		{ID: 8, Opcode: OpClose, ObjectID: 3},
		{ID: 9, Opcode: OpRead, ObjectID: 3, Read: &ReadMsg{Off: 1 << 20, Len: 128 << 10}},
	} {
		raw := AppendMsg(nil, m)
		got, err := ParseMsg(raw)
		if err != nil {
			t.Fatalf("%v: %v", m.Opcode, err)
		}
		if got.ID != m.ID || got.Opcode != m.Opcode || got.ObjectID != m.ObjectID {
			t.Errorf("%v: header %+v, want %+v", m.Opcode, got, m)
		}
		if m.Open != nil && *got.Open != *m.Open {
			t.Errorf("OPEN payload %+v, want %+v", *got.Open, *m.Open)
		}
		if m.Read != nil && *got.Read != *m.Read {
			t.Errorf("READ payload %+v, want %+v", *got.Read, *m.Read)
		}
	}
}

// TestParseMsgKernelLayout checks the byte layout against the uapi structs
// as the kernel fills them (volume key size counts its NUL, cookie key
// has none).
func TestParseMsgKernelLayout(t *testing.T) {
	le := binary.LittleEndian
	var b []byte
	vol, cookie := "erofs,abc\x00", "blob"
	b = le.AppendUint32(b, 5) // msg_id
	b = le.AppendUint32(b, 0) // OPEN
	b = le.AppendUint32(b, uint32(16+16+len(vol)+len(cookie)))
	b = le.AppendUint32(b, 2) // object_id
	b = le.AppendUint32(b, uint32(len(vol)))
	b = le.AppendUint32(b, uint32(len(cookie)))
	b = le.AppendUint32(b, 9) // fd
	b = le.AppendUint32(b, 0) // flags
	b = append(b, vol...)
	b = append(b, cookie...)
	m, err := ParseMsg(b)
	if err != nil {
		t.Fatal(err)
	}
	if m.ID != 5 || m.ObjectID != 2 || m.Open.FD != 9 || m.Open.VolumeKey != "erofs,abc" || m.Open.CookieKey != "blob" {
		t.Fatalf("parsed %+v %+v", m, *m.Open)
	}
	if !bytes.Equal(AppendMsg(nil, m), b) {
		t.Fatal("AppendMsg does not reproduce the kernel's bytes")
	}
}

func TestParseMsgRejects(t *testing.T) {
	valid := AppendMsg(nil, Msg{ID: 1, Opcode: OpOpen, Open: &OpenMsg{VolumeKey: "erofs,x", CookieKey: "y"}})
	withLen := func(b []byte, n uint32) []byte {
		b = bytes.Clone(b)
		binary.LittleEndian.PutUint32(b[8:], n)
		return b
	}
	patch := func(b []byte, off int, v uint32) []byte {
		b = bytes.Clone(b)
		binary.LittleEndian.PutUint32(b[off:], v)
		return b
	}
	read := AppendMsg(nil, Msg{Opcode: OpRead, Read: &ReadMsg{Off: 1, Len: 1}})
	overflow := bytes.Clone(read)
	binary.LittleEndian.PutUint64(overflow[16:], ^uint64(0)-10)
	binary.LittleEndian.PutUint64(overflow[24:], 100)
	noNUL := bytes.Clone(valid)
	noNUL[32+len("erofs,x")] = 'z'
	innerNUL := bytes.Clone(valid)
	innerNUL[32+2] = 0
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short header", valid[:15]},
		{"len larger than read", withLen(valid, uint32(len(valid)+1))},
		{"len smaller than read", withLen(valid, uint32(len(valid)-1))},
		{"open payload short", withLen(valid[:20], 20)},
		{"keys longer than payload", patch(valid, 20, 200)},
		{"volume key huge", patch(valid, 16, 0xffffffff)},
		{"volume key without NUL", noNUL},
		{"volume key inner NUL", innerNUL},
		{"zero-size volume key", patch(patch(valid, 16, 0), 20, uint32(len("erofs,x")+1+1))},
		{"close with payload", withLen(append(AppendMsg(nil, Msg{Opcode: OpClose}), 1), 17)},
		{"read short", withLen(read[:24], 24)},
		{"read long", withLen(append(bytes.Clone(read), 0), uint32(len(read)+1))},
		{"read overflow", overflow},
		{"unknown opcode", patch(AppendMsg(nil, Msg{Opcode: OpClose}), 4, 3)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseMsg(tc.b); !errors.Is(err, ErrBadMsg) {
				t.Fatalf("ParseMsg = %v, want ErrBadMsg", err)
			}
		})
	}
}

// FuzzCachefilesMsg: any bytes parse without panicking, and whatever
// parses re-encodes to the same bytes (nothing is silently ignored).
func FuzzCachefilesMsg(f *testing.F) {
	f.Add(AppendMsg(nil, Msg{ID: 7, Opcode: OpOpen, ObjectID: 3, Open: &OpenMsg{VolumeKey: "erofs,domain", CookieKey: "0123456789abcdef", FD: 12}}))
	f.Add(AppendMsg(nil, Msg{ID: 8, Opcode: OpClose, ObjectID: 3}))
	f.Add(AppendMsg(nil, Msg{ID: 9, Opcode: OpRead, ObjectID: 3, Read: &ReadMsg{Off: 4096, Len: 1 << 20}}))
	f.Add([]byte{})
	f.Add(make([]byte, 16))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseMsg(b)
		if err != nil {
			if !errors.Is(err, ErrBadMsg) {
				t.Fatalf("error %v does not wrap ErrBadMsg", err)
			}
			return
		}
		if (m.Opcode == OpOpen) != (m.Open != nil) || (m.Opcode == OpRead) != (m.Read != nil) {
			t.Fatalf("payload does not match opcode: %+v", m)
		}
		if got := AppendMsg(nil, m); !bytes.Equal(got, b) {
			t.Fatalf("re-encoded %x, input %x", got, b)
		}
	})
}

package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"

	"github.com/rafsd/rafsd/vhostuser/memory"
)

// Front-end request codes (QEMU docs/interop/vhost-user.rst).
const (
	reqGetFeatures         = 1
	reqSetFeatures         = 2
	reqSetOwner            = 3
	reqResetOwner          = 4
	reqSetMemTable         = 5
	reqSetLogBase          = 6
	reqSetLogFd            = 7
	reqSetVringNum         = 8
	reqSetVringAddr        = 9
	reqSetVringBase        = 10
	reqGetVringBase        = 11
	reqSetVringKick        = 12
	reqSetVringCall        = 13
	reqSetVringErr         = 14
	reqGetProtocolFeatures = 15
	reqSetProtocolFeatures = 16
	reqGetQueueNum         = 17
	reqSetVringEnable      = 18
	reqSetBackendReqFd     = 21
	reqGetConfig           = 24
	reqSetConfig           = 25
	reqResetDevice         = 34
	reqGetMaxMemSlots      = 36
	reqAddMemReg           = 37
	reqRemMemReg           = 38
)

var reqNames = map[uint32]string{
	1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
	6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE",
	11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR",
	15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE",
	19: "SEND_RARP", 20: "NET_SET_MTU", 21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN",
	24: "GET_CONFIG", 25: "SET_CONFIG", 31: "GET_INFLIGHT_FD", 32: "SET_INFLIGHT_FD", 34: "RESET_DEVICE",
	36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG", 39: "SET_STATUS", 40: "GET_STATUS",
}

func reqName(r uint32) string {
	if n, ok := reqNames[r]; ok {
		return n
	}
	return fmt.Sprintf("request(%d)", r)
}

// Header flags.
const (
	flagVersion   = 0x1
	flagVersionMk = 0x3
	flagReply     = 0x4
	flagNeedReply = 0x8
)

// Virtio and vhost-user feature bits.
const (
	// FeatureProtocolFeatures is VHOST_USER_F_PROTOCOL_FEATURES.
	FeatureProtocolFeatures = 1 << 30
	// FeatureVersion1 is VIRTIO_F_VERSION_1.
	FeatureVersion1 = 1 << 32
	featureLogAll   = 1 << 26
)

// Protocol feature bits.
const (
	protoMQ               = 1 << 0
	protoLogShmfd         = 1 << 1
	protoReplyAck         = 1 << 3
	protoConfig           = 1 << 9
	protoResetDevice      = 1 << 13
	protoConfigureMemSlot = 1 << 15
)

// supportedProtocolFeatures is what the back end offers.
const supportedProtocolFeatures = protoMQ | protoReplyAck | protoConfig | protoResetDevice | protoConfigureMemSlot

// Limits on what a front end may send.
const (
	headerSize    = 12
	maxPayload    = 4096 // larger than any message we accept
	maxFds        = 8    // VHOST_MEMORY_BASELINE_NREGIONS
	maxMemRegions = 8    // in one SET_MEM_TABLE
	maxMemSlots   = 32   // with ADD_MEM_REG
	regionSize    = 32
	maxConfigSize = 256
	vringFdNoFd   = 0x100 // "invalid FD" flag in SET_VRING_KICK/CALL/ERR
	vringIdxMask  = 0xff
)

// header is the fixed 12-byte message header.
type header struct {
	Request uint32
	Flags   uint32
	Size    uint32
}

func decodeHeader(b []byte) (header, error) {
	if len(b) < headerSize {
		return header{}, fmt.Errorf("header: %d bytes, need %d", len(b), headerSize)
	}
	h := header{
		Request: binary.LittleEndian.Uint32(b[0:]),
		Flags:   binary.LittleEndian.Uint32(b[4:]),
		Size:    binary.LittleEndian.Uint32(b[8:]),
	}
	if h.Flags&flagVersionMk != flagVersion {
		return h, fmt.Errorf("%s: unsupported protocol version %d", reqName(h.Request), h.Flags&flagVersionMk)
	}
	if h.Flags&flagReply != 0 {
		return h, fmt.Errorf("%s: front end sent a reply", reqName(h.Request))
	}
	if h.Size > maxPayload {
		return h, fmt.Errorf("%s: payload of %d bytes exceeds %d", reqName(h.Request), h.Size, maxPayload)
	}
	return h, nil
}

// message is one decoded request with the fds that came with it. The
// receiver owns the fds and must close the ones it does not keep.
type message struct {
	header
	Payload []byte
	Fds     []int
	// FdErr is set when the sender attached more descriptors than allowed
	// (they are closed already); the request fails, the stream stays in sync.
	FdErr error
}

func (m *message) closeFds() {
	for _, fd := range m.Fds {
		unix.Close(fd)
	}
	m.Fds = nil
}

// takeFd returns the single fd of the message (closing any others).
func (m *message) takeFd() (int, error) {
	if m.FdErr != nil {
		return -1, m.FdErr
	}
	if len(m.Fds) != 1 {
		n := len(m.Fds)
		m.closeFds()
		return -1, fmt.Errorf("%s: got %d fds, want 1", reqName(m.Request), n)
	}
	fd := m.Fds[0]
	m.Fds = nil
	return fd, nil
}

func (m *message) u64() (uint64, error) {
	if len(m.Payload) != 8 {
		return 0, fmt.Errorf("%s: payload %d bytes, want 8", reqName(m.Request), len(m.Payload))
	}
	return binary.LittleEndian.Uint64(m.Payload), nil
}

// vringState is struct vhost_vring_state.
type vringState struct{ Index, Num uint32 }

func (m *message) vringState() (vringState, error) {
	if len(m.Payload) != 8 {
		return vringState{}, fmt.Errorf("%s: payload %d bytes, want 8", reqName(m.Request), len(m.Payload))
	}
	return vringState{binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:])}, nil
}

// vringAddr is struct vhost_vring_addr.
type vringAddr struct {
	Index, Flags           uint32
	Desc, Used, Avail, Log uint64
}

func (m *message) vringAddr() (vringAddr, error) {
	p := m.Payload
	if len(p) != 40 {
		return vringAddr{}, fmt.Errorf("%s: payload %d bytes, want 40", reqName(m.Request), len(p))
	}
	le := binary.LittleEndian
	return vringAddr{le.Uint32(p), le.Uint32(p[4:]), le.Uint64(p[8:]), le.Uint64(p[16:]), le.Uint64(p[24:]), le.Uint64(p[32:])}, nil
}

func decodeRegion(p []byte) memory.RegionDesc {
	le := binary.LittleEndian
	return memory.RegionDesc{GuestAddr: le.Uint64(p), Size: le.Uint64(p[8:]), UserAddr: le.Uint64(p[16:]), MmapOffset: le.Uint64(p[24:])}
}

// memTable decodes SET_MEM_TABLE: one fd per region, in order.
func (m *message) memTable() ([]memory.RegionDesc, error) {
	p := m.Payload
	if len(p) < 8 {
		return nil, fmt.Errorf("SET_MEM_TABLE: payload %d bytes", len(p))
	}
	n := binary.LittleEndian.Uint32(p)
	if n == 0 || n > maxMemRegions {
		return nil, fmt.Errorf("SET_MEM_TABLE: %d regions (1..%d)", n, maxMemRegions)
	}
	if uint32(len(p)) < 8+n*regionSize {
		return nil, fmt.Errorf("SET_MEM_TABLE: %d regions in %d bytes", n, len(p))
	}
	rs := make([]memory.RegionDesc, n)
	for i := range rs {
		rs[i] = decodeRegion(p[8+i*regionSize:])
	}
	return rs, nil
}

// memRegion decodes ADD_MEM_REG / REM_MEM_REG (u64 padding + one region).
func (m *message) memRegion() (memory.RegionDesc, error) {
	if len(m.Payload) != 8+regionSize {
		return memory.RegionDesc{}, fmt.Errorf("%s: payload %d bytes, want %d", reqName(m.Request), len(m.Payload), 8+regionSize)
	}
	return decodeRegion(m.Payload[8:]), nil
}

// configReq is the VhostUserConfig header: offset, size, flags, then data.
type configReq struct {
	Offset, Size, Flags uint32
	Data                []byte
}

func (m *message) config() (configReq, error) {
	p := m.Payload
	if len(p) < 12 {
		return configReq{}, fmt.Errorf("%s: payload %d bytes", reqName(m.Request), len(p))
	}
	c := configReq{binary.LittleEndian.Uint32(p), binary.LittleEndian.Uint32(p[4:]), binary.LittleEndian.Uint32(p[8:]), p[12:]}
	if c.Size > maxConfigSize || uint32(len(c.Data)) < c.Size {
		return c, fmt.Errorf("%s: size %d with %d data bytes", reqName(m.Request), c.Size, len(c.Data))
	}
	c.Data = c.Data[:c.Size]
	return c, nil
}

var errClosed = errors.New("front end closed the connection")

// readMessage reads one message and its fds from c.
func readMessage(c *net.UnixConn) (*message, error) {
	var hb [headerSize]byte
	m := &message{}
	if err := readFull(c, hb[:], m); err != nil {
		m.closeFds()
		return nil, err
	}
	h, err := decodeHeader(hb[:])
	if err != nil {
		m.closeFds()
		return nil, err
	}
	m.header = h
	m.Payload = make([]byte, h.Size)
	if err := readFull(c, m.Payload, m); err != nil {
		m.closeFds()
		return nil, fmt.Errorf("%s: truncated payload: %w", reqName(h.Request), err)
	}
	return m, nil
}

// readFull fills b, collecting any SCM_RIGHTS fds into m (closing those
// beyond maxFds and recording the violation).
func readFull(c *net.UnixConn, b []byte, m *message) error {
	oob := make([]byte, unix.CmsgSpace(4*maxFds))
	for got := 0; got < len(b); {
		n, oobn, flags, _, err := c.ReadMsgUnix(b[got:], oob)
		if oobn > 0 {
			collectFds(oob[:oobn], m)
		}
		if flags&unix.MSG_CTRUNC != 0 && m.FdErr == nil {
			m.FdErr = fmt.Errorf("more than %d fds attached", maxFds)
		}
		got += n
		if err != nil {
			if got == 0 && n == 0 {
				return errClosed
			}
			return err
		}
		if n == 0 {
			if got == 0 {
				return errClosed
			}
			return fmt.Errorf("short read (%d of %d bytes)", got, len(b))
		}
	}
	return nil
}

func collectFds(oob []byte, m *message) {
	cms, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		m.FdErr = fmt.Errorf("control message: %w", err)
		return
	}
	for _, cm := range cms {
		fds, err := unix.ParseUnixRights(&cm)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if len(m.Fds) >= maxFds {
				unix.Close(fd)
				m.FdErr = fmt.Errorf("more than %d fds attached", maxFds)
				continue
			}
			m.Fds = append(m.Fds, fd)
		}
	}
	if m.FdErr != nil {
		m.closeFds()
	}
}

// writeReply sends a reply to request req with payload p.
func writeReply(c *net.UnixConn, req uint32, p []byte) error {
	b := make([]byte, headerSize+len(p))
	binary.LittleEndian.PutUint32(b, req)
	binary.LittleEndian.PutUint32(b[4:], flagVersion|flagReply)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(p)))
	copy(b[headerSize:], p)
	_, err := c.Write(b)
	return err
}

func u64Bytes(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

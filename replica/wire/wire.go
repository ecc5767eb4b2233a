// Package wire holds the messages of stor's replication protocol for one
// partition and their binary encoding. The replica core (package replica)
// is stepped by these messages; a transport (TCP, or the in-memory network
// of replicatest) carries them as encoded frames.
//
// # Frame
//
// Every message is one frame: a fixed 40-byte header, then a body. All
// integers in the header are little-endian.
//
//	+--------+------+------------------------------------------------+
//	| offset | size | field                                          |
//	+--------+------+------------------------------------------------+
//	|      0 |    4 | magic 0x4c505253 ("SRPL" little-endian)        |
//	|      4 |    1 | version (1)                                    |
//	|      5 |    1 | type (Type)                                    |
//	|      6 |    1 | flags (FlagReject, FlagNeedSnap, FlagLast)     |
//	|      7 |    1 | kind (Kind; requests, grants)                  |
//	|      8 |    8 | epoch                                          |
//	|     16 |    4 | partition                                      |
//	|     20 |    8 | request id                                     |
//	|     28 |    4 | body length in bytes                           |
//	|     32 |    4 | crc32c (Castagnoli) of header[0:32] and body   |
//	|     36 |    4 | reserved, zero                                 |
//	+--------+------+------------------------------------------------+
//
// The body is every remaining field of Msg in this fixed order; numbers
// are unsigned varints (zero costs one byte), strings and byte slices are
// a varint length then the bytes:
//
//	from, to, prev_epoch, prev_op, commit, sync, index, off, len, data,
//	peers (count, then each), entries (count, then each entry)
//
// An entry is:
//
//	epoch, opnum, kind (1 byte), request id, off, len, data
//
// A decoder refuses a frame whose magic, version, type, lengths or
// checksum are wrong, and any field past MaxData/MaxEntries/MaxPeers: a
// malformed frame is an error, never a panic or a huge allocation.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"stor.dev/stor/ctl/api"
)

// Errors.
var (
	ErrFormat   = errors.New("wire: malformed frame")
	ErrChecksum = errors.New("wire: checksum mismatch")
	ErrVersion  = errors.New("wire: unknown version")
)

// Limits a decoder enforces.
const (
	HeaderSize = 40
	MaxBody    = 64 << 20 // bytes of one frame's body
	MaxData    = 32 << 20 // bytes of one data field
	MaxEntries = 4096     // entries in one Append
	MaxPeers   = 16       // peers in one Promote
	MaxString  = 255      // bytes of a node id

	magic   = 0x4c505253
	version = 1
	crcOff  = 32
)

// Type is a message type.
type Type uint8

// Message types. Replication (primary <-> secondary):
//
//   - Append: primary -> secondary. Entries after (PrevEpoch, PrevOp);
//     Commit is the primary's commit index; Sync asks the secondary to have
//     every op up to it fsynced. Empty Entries is a heartbeat.
//   - AppendResp: secondary -> primary. Index is the highest opnum known to
//     match the primary's log (the ack), Sync the highest fsynced. With
//     FlagReject, Index is a hint: the secondary's log may match up to it;
//     FlagNeedSnap: only a snapshot can repair it.
//   - Snapshot: primary -> secondary. The whole state at Index (whose op
//     had epoch PrevEpoch), in Data.
//   - Stale: the answer to any message of a lower epoch; Epoch is the
//     higher epoch.
//   - SnapChunk: primary -> secondary. Part ReqID (0, 1, ...) of the state
//     at Index, sent before the Snapshot message that ends the transfer
//     (whose Data is then empty): Entries are pieces of it in LBA order
//     (KindWrite with Data, KindZero without); FlagLast marks the last.
//   - SnapAck: secondary -> primary. ReqID is the next part it expects of
//     the transfer at Index.
//
// Client (volume client <-> primary):
//
//   - Request: a client op: Kind, Off, Len, Data; ReqID makes it
//     idempotent.
//   - Reply: the answer to Request by ReqID: Index is the op's opnum, Data
//     read data; FlagReject means retry on the current primary.
//
// Control plane:
//
//   - Promote: control -> replica: be primary at Epoch of a replica set of
//     Peers (the other replicas) of which InSync (in Peers' order, as
//     Data bytes 0/1) are in sync.
//   - Control: replica -> control: a ControlKind request for Peers[0].
//   - Grant: control -> replica: the answer to Control (FlagReject: refused).
const (
	TypeAppend Type = 1 + iota
	TypeAppendResp
	TypeSnapshot
	TypeStale
	TypeRequest
	TypeReply
	TypePromote
	TypeControl
	TypeGrant
	TypeSnapChunk
	TypeSnapAck
	typeEnd
)

var typeNames = [...]string{"", "append", "append-resp", "snapshot", "stale", "request", "reply", "promote", "control", "grant",
	"snap-chunk", "snap-ack"}

func (t Type) String() string {
	if t > 0 && t < typeEnd {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Flags.
const (
	FlagReject   uint8 = 1 << 0
	FlagNeedSnap uint8 = 1 << 1
	FlagLast     uint8 = 1 << 2 // SnapChunk: the transfer's last part
	flagsAll           = FlagReject | FlagNeedSnap | FlagLast
)

// Kind is the kind of a client op or log entry, or of a control request.
type Kind uint8

// Op kinds (Request, Entry).
const (
	KindWrite Kind = 1 + iota // Data at Off; Len == len(Data)
	KindZero                  // [Off, Off+Len) reads as zeros
	KindTrim                  // [Off, Off+Len) discarded
	KindFlush                 // make every acknowledged op durable everywhere
	KindRead                  // read [Off, Off+Len) (goes through the log)
	KindNoop                  // a primary's first entry of its epoch
	kindEnd
)

// Control kinds (Control, Grant).
const (
	CtlDropPeer Kind = 16 + iota // take Peers[0] out of the in-sync set
	CtlInSync                    // add Peers[0] to the in-sync set
	CtlBless                     // solo blessing for Epoch
	ctlEnd
)

var kindNames = map[Kind]string{KindWrite: "write", KindZero: "zero", KindTrim: "trim", KindFlush: "flush",
	KindRead: "read", KindNoop: "noop", CtlDropPeer: "drop-peer", CtlInSync: "in-sync", CtlBless: "bless"}

func (k Kind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

func (k Kind) valid() bool {
	return k == 0 || (k >= KindWrite && k < kindEnd) || (k >= CtlDropPeer && k < ctlEnd)
}

// Entry is one op of the partition's log: a note until committed.
type Entry struct {
	Epoch api.Epoch // epoch of the primary that numbered it
	OpNum api.OpNum
	Kind  Kind
	ReqID uint64
	Off   int64
	Len   int64
	Data  []byte
}

// Msg is one protocol message. Which fields mean something depends on
// Type (see the Type constants).
type Msg struct {
	Type      Type
	Flags     uint8
	Kind      Kind
	Epoch     api.Epoch
	Partition api.PartitionID
	ReqID     uint64
	From, To  api.NodeID
	PrevEpoch api.Epoch
	PrevOp    api.OpNum
	Commit    api.OpNum
	Sync      api.OpNum
	Index     api.OpNum
	Off       int64
	Len       int64
	Data      []byte
	Peers     []api.NodeID
	Entries   []Entry
}

// Reject reports whether FlagReject is set.
func (m *Msg) Reject() bool { return m.Flags&FlagReject != 0 }

func (m Msg) String() string {
	s := fmt.Sprintf("%s %s->%s e%d", m.Type, m.From, m.To, m.Epoch)
	switch m.Type {
	case TypeAppend:
		s += fmt.Sprintf(" prev=%d/%d n=%d commit=%d sync=%d", m.PrevEpoch, m.PrevOp, len(m.Entries), m.Commit, m.Sync)
	case TypeAppendResp:
		s += fmt.Sprintf(" index=%d sync=%d flags=%d", m.Index, m.Sync, m.Flags)
	case TypeSnapshot:
		s += fmt.Sprintf(" index=%d/%d", m.PrevEpoch, m.Index)
	case TypeSnapChunk, TypeSnapAck:
		s += fmt.Sprintf(" index=%d part=%d n=%d flags=%d", m.Index, m.ReqID, len(m.Entries), m.Flags)
	case TypeRequest, TypeReply, TypeControl, TypeGrant:
		s += fmt.Sprintf(" %s req=%d index=%d flags=%d peers=%v", m.Kind, m.ReqID, m.Index, m.Flags, m.Peers)
	case TypePromote:
		s += fmt.Sprintf(" peers=%v", m.Peers)
	}
	return s
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Append encodes m as one frame appended to buf.
func Append(buf []byte, m *Msg) []byte {
	start := len(buf)
	var h [HeaderSize]byte
	buf = append(buf, h[:]...)
	buf = appendString(buf, string(m.From))
	buf = appendString(buf, string(m.To))
	buf = binary.AppendUvarint(buf, uint64(m.PrevEpoch))
	buf = binary.AppendUvarint(buf, uint64(m.PrevOp))
	buf = binary.AppendUvarint(buf, uint64(m.Commit))
	buf = binary.AppendUvarint(buf, uint64(m.Sync))
	buf = binary.AppendUvarint(buf, uint64(m.Index))
	buf = binary.AppendUvarint(buf, uint64(m.Off))
	buf = binary.AppendUvarint(buf, uint64(m.Len))
	buf = appendBytes(buf, m.Data)
	buf = binary.AppendUvarint(buf, uint64(len(m.Peers)))
	for _, p := range m.Peers {
		buf = appendString(buf, string(p))
	}
	buf = binary.AppendUvarint(buf, uint64(len(m.Entries)))
	for i := range m.Entries {
		e := &m.Entries[i]
		buf = binary.AppendUvarint(buf, uint64(e.Epoch))
		buf = binary.AppendUvarint(buf, uint64(e.OpNum))
		buf = append(buf, byte(e.Kind))
		buf = binary.AppendUvarint(buf, e.ReqID)
		buf = binary.AppendUvarint(buf, uint64(e.Off))
		buf = binary.AppendUvarint(buf, uint64(e.Len))
		buf = appendBytes(buf, e.Data)
	}
	hd := buf[start : start+HeaderSize]
	binary.LittleEndian.PutUint32(hd[0:], magic)
	hd[4] = version
	hd[5] = byte(m.Type)
	hd[6] = m.Flags
	hd[7] = byte(m.Kind)
	binary.LittleEndian.PutUint64(hd[8:], uint64(m.Epoch))
	binary.LittleEndian.PutUint32(hd[16:], uint32(m.Partition))
	binary.LittleEndian.PutUint64(hd[20:], m.ReqID)
	binary.LittleEndian.PutUint32(hd[28:], uint32(len(buf)-start-HeaderSize))
	crc := crc32.Update(0, castagnoli, hd[:crcOff])
	crc = crc32.Update(crc, castagnoli, buf[start+HeaderSize:])
	binary.LittleEndian.PutUint32(hd[crcOff:], crc)
	return buf
}

// Encode returns m as one frame, in a buffer allocated once.
func Encode(m *Msg) []byte { return Append(make([]byte, 0, maxSize(m)), m) }

// maxSize bounds the frame Append makes of m: every varint at its longest.
func maxSize(m *Msg) int {
	const v = binary.MaxVarintLen64
	n := HeaderSize + 2*v + len(m.From) + len(m.To) + 7*v + v + len(m.Data) + v + v
	for _, p := range m.Peers {
		n += v + len(p)
	}
	for i := range m.Entries {
		n += 6*v + 1 + len(m.Entries[i].Data)
	}
	return n
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBytes(b []byte, d []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(d)))
	return append(b, d...)
}

// BodyLen checks a frame header and returns the length of the body that
// follows it: a stream reader reads HeaderSize bytes, then BodyLen.
func BodyLen(hdr []byte) (int, error) {
	if len(hdr) < HeaderSize {
		return 0, fmt.Errorf("%w: short header (%d bytes)", ErrFormat, len(hdr))
	}
	if binary.LittleEndian.Uint32(hdr[0:]) != magic {
		return 0, fmt.Errorf("%w: bad magic", ErrFormat)
	}
	if hdr[4] != version {
		return 0, fmt.Errorf("%w: %d", ErrVersion, hdr[4])
	}
	n := binary.LittleEndian.Uint32(hdr[28:])
	if n > MaxBody {
		return 0, fmt.Errorf("%w: body of %d bytes", ErrFormat, n)
	}
	return int(n), nil
}

// Decode decodes one whole frame. Data fields of the result alias frame.
func Decode(frame []byte) (*Msg, error) {
	n, err := BodyLen(frame)
	if err != nil {
		return nil, err
	}
	if len(frame) != HeaderSize+n {
		return nil, fmt.Errorf("%w: frame of %d bytes, header says %d", ErrFormat, len(frame), HeaderSize+n)
	}
	hd := frame[:HeaderSize]
	crc := crc32.Update(0, castagnoli, hd[:crcOff])
	crc = crc32.Update(crc, castagnoli, frame[HeaderSize:])
	if crc != binary.LittleEndian.Uint32(hd[crcOff:]) {
		return nil, ErrChecksum
	}
	m := &Msg{
		Type:      Type(hd[5]),
		Flags:     hd[6],
		Kind:      Kind(hd[7]),
		Epoch:     api.Epoch(binary.LittleEndian.Uint64(hd[8:])),
		Partition: api.PartitionID(binary.LittleEndian.Uint32(hd[16:])),
		ReqID:     binary.LittleEndian.Uint64(hd[20:]),
	}
	if m.Type == 0 || m.Type >= typeEnd {
		return nil, fmt.Errorf("%w: %s", ErrFormat, m.Type)
	}
	if m.Flags&^flagsAll != 0 || !m.Kind.valid() || binary.LittleEndian.Uint32(hd[36:]) != 0 {
		return nil, fmt.Errorf("%w: bad flags, kind or reserved bytes", ErrFormat)
	}
	d := decoder{b: frame[HeaderSize:]}
	m.From = api.NodeID(d.str())
	m.To = api.NodeID(d.str())
	m.PrevEpoch = api.Epoch(d.uvarint())
	m.PrevOp = api.OpNum(d.uvarint())
	m.Commit = api.OpNum(d.uvarint())
	m.Sync = api.OpNum(d.uvarint())
	m.Index = api.OpNum(d.uvarint())
	m.Off = d.int()
	m.Len = d.int()
	m.Data = d.bytes()
	if np := d.count(MaxPeers); np > 0 {
		m.Peers = make([]api.NodeID, np)
		for i := range m.Peers {
			m.Peers[i] = api.NodeID(d.str())
		}
	}
	if ne := d.count(MaxEntries); ne > 0 {
		if ne > len(d.b) { // every entry takes at least 7 bytes
			d.fail()
			ne = 0
		}
		m.Entries = make([]Entry, ne)
		for i := range m.Entries {
			e := &m.Entries[i]
			e.Epoch = api.Epoch(d.uvarint())
			e.OpNum = api.OpNum(d.uvarint())
			e.Kind = Kind(d.byte())
			e.ReqID = d.uvarint()
			e.Off = d.int()
			e.Len = d.int()
			e.Data = d.bytes()
			if e.Kind < KindWrite || e.Kind >= kindEnd {
				d.fail()
			}
		}
	}
	if d.err || len(d.b) != 0 {
		return nil, fmt.Errorf("%w: %s body", ErrFormat, m.Type)
	}
	return m, nil
}

type decoder struct {
	b   []byte
	err bool
}

func (d *decoder) fail() { d.err, d.b = true, nil }

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) int() int64 {
	v := d.uvarint()
	if v > 1<<62 {
		d.fail()
		return 0
	}
	return int64(v)
}

func (d *decoder) byte() byte {
	if len(d.b) < 1 {
		d.fail()
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) count(max int) int {
	v := d.uvarint()
	if v > uint64(max) {
		d.fail()
		return 0
	}
	return int(v)
}

func (d *decoder) take(max int) []byte {
	n := d.count(max)
	if n > len(d.b) {
		d.fail()
		return nil
	}
	s := d.b[:n:n]
	d.b = d.b[n:]
	return s
}

func (d *decoder) str() string { return string(d.take(MaxString)) }

func (d *decoder) bytes() []byte {
	s := d.take(MaxData)
	if len(s) == 0 {
		return nil
	}
	return s
}

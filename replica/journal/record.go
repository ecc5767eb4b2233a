package journal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"

	"github.com/cockroachdb/pebble/vfs"
)

// Kind is the type of a journal record.
type Kind uint8

// Record kinds.
const (
	KindWrite Kind = 1 // data for [Off, Off+Len); len(Data) == Len
	KindZero  Kind = 2 // [Off, Off+Len) reads as zeros; no data
	KindTrim  Kind = 3 // [Off, Off+Len) is discarded; no data
	KindMeta  Kind = 4 // engine metadata op: aux only

	// kindSeal ends a sealed segment (journal-internal, never replayed):
	// what follows it in the file is left from an earlier use of the file.
	kindSeal Kind = 5
)

func (k Kind) String() string {
	switch k {
	case KindWrite:
		return "write"
	case KindZero:
		return "zero"
	case KindTrim:
		return "trim"
	case KindMeta:
		return "meta"
	case kindSeal:
		return "seal"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Record is one journaled op. See the package doc for its encoding.
type Record struct {
	Kind  Kind
	Flags uint8 // opaque to the journal
	Epoch uint64
	OpNum uint64
	Off   int64  // byte offset of the logical range, >= 0
	Len   int64  // byte length of the logical range, <= math.MaxUint32
	Data  []byte // KindWrite: len(Data) == Len; otherwise empty
	Aux   []byte // opaque bytes for the engine
}

// Pos addresses a record: the file offset of its data payload within segment
// Seg. A sub-range of the data is at Pos{Seg, Off + k}; the aux bytes follow
// the data, at Pos{Seg, Off + len(Data)}.
type Pos struct {
	Seg uint64
	Off int64
}

// Format constants.
const (
	HeaderSize = 48
	MaxPayload = 128 << 20 // data + aux bytes of one record

	magic   = 0x4c4e524a // "JRNL" as little-endian bytes
	version = 2          // 1: no tag (read, never written)
	crcOff  = 44
	tagOff  = 40
)

// segTag is the tag of segment id's records: a record read from a segment
// file with another tag was left there by an earlier use of the file.
func segTag(id uint64) uint32 { return uint32(id) }

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// header is a decoded record header.
type header struct {
	vers   uint8
	tag    uint32 // version 2: segTag of the segment written to
	kind   Kind
	flags  uint8
	epoch  uint64
	opnum  uint64
	off    uint64
	length uint32
	auxlen uint32
	crc    uint32
}

// dataLen is the number of data bytes that follow the header.
func (h *header) dataLen() int64 {
	if h.kind == KindWrite {
		return int64(h.length)
	}
	return 0
}

// payloadLen is the number of bytes after the header.
func (h *header) payloadLen() int64 { return h.dataLen() + int64(h.auxlen) }

// checkRecord reports why r cannot be appended, wrapped in ErrInvalid.
func checkRecord(r *Record) error {
	switch r.Kind {
	case KindWrite:
		if int64(len(r.Data)) != r.Len {
			return fmt.Errorf("%w: write opnum %d: len(Data) %d != Len %d", ErrInvalid, r.OpNum, len(r.Data), r.Len)
		}
	case KindZero, KindTrim, KindMeta:
		if len(r.Data) != 0 {
			return fmt.Errorf("%w: %v opnum %d carries %d data bytes", ErrInvalid, r.Kind, r.OpNum, len(r.Data))
		}
	default:
		return fmt.Errorf("%w: opnum %d: unknown kind %d", ErrInvalid, r.OpNum, r.Kind)
	}
	if r.Off < 0 || r.Len < 0 || r.Len > math.MaxUint32 {
		return fmt.Errorf("%w: opnum %d: range off %d len %d", ErrInvalid, r.OpNum, r.Off, r.Len)
	}
	if int64(len(r.Data))+int64(len(r.Aux)) > MaxPayload {
		return fmt.Errorf("%w: opnum %d: payload of %d bytes exceeds %d", ErrInvalid, r.OpNum, len(r.Data)+len(r.Aux), MaxPayload)
	}
	return nil
}

// encodeRecord writes r's header, data and aux into b, which must hold
// HeaderSize+len(r.Data)+len(r.Aux) bytes, as a record of the segment
// with tag.
func encodeRecord(b []byte, r *Record, tag uint32) {
	encodeHeader(b[:HeaderSize], r, tag)
	n := HeaderSize + copy(b[HeaderSize:], r.Data)
	copy(b[n:], r.Aux)
}

// encodeHeader fills the HeaderSize bytes of h for r in the segment with
// tag, with the crc of the header and r's payload (data, then aux).
func encodeHeader(h []byte, r *Record, tag uint32) { encodeHeaderVersion(h, r, version, tag) }

// encodeHeaderVersion is encodeHeader in format version vers (1: tag 0).
func encodeHeaderVersion(h []byte, r *Record, vers uint8, tag uint32) {
	_ = h[HeaderSize-1]
	binary.LittleEndian.PutUint32(h[0:], magic)
	h[4] = byte(r.Kind)
	h[5] = r.Flags
	h[6] = vers
	h[7] = 0
	binary.LittleEndian.PutUint64(h[8:], r.Epoch)
	binary.LittleEndian.PutUint64(h[16:], r.OpNum)
	binary.LittleEndian.PutUint64(h[24:], uint64(r.Off))
	binary.LittleEndian.PutUint32(h[32:], uint32(r.Len))
	binary.LittleEndian.PutUint32(h[36:], uint32(len(r.Aux)))
	binary.LittleEndian.PutUint32(h[tagOff:], tag)
	crc := crc32.Update(0, castagnoli, h[:crcOff])
	crc = crc32.Update(crc, castagnoli, r.Data)
	crc = crc32.Update(crc, castagnoli, r.Aux)
	binary.LittleEndian.PutUint32(h[crcOff:], crc)
}

// decodeHeader parses b[:HeaderSize] and checks everything but the crc.
// It returns a reason when the bytes are not a plausible header.
func decodeHeader(b []byte, h *header) string {
	_ = b[HeaderSize-1]
	if binary.LittleEndian.Uint32(b[0:]) != magic {
		return "bad magic"
	}
	h.vers = b[6]
	h.tag = binary.LittleEndian.Uint32(b[tagOff:])
	if h.vers != 1 && h.vers != version {
		return fmt.Sprintf("unknown version %d", b[6])
	}
	if b[7] != 0 || h.vers == 1 && h.tag != 0 {
		return "reserved bytes set"
	}
	h.kind = Kind(b[4])
	if h.kind < KindWrite || h.kind > kindSeal || h.kind == kindSeal && h.vers == 1 {
		return fmt.Sprintf("unknown kind %d", b[4])
	}
	h.flags = b[5]
	h.epoch = binary.LittleEndian.Uint64(b[8:])
	h.opnum = binary.LittleEndian.Uint64(b[16:])
	h.off = binary.LittleEndian.Uint64(b[24:])
	h.length = binary.LittleEndian.Uint32(b[32:])
	h.auxlen = binary.LittleEndian.Uint32(b[36:])
	h.crc = binary.LittleEndian.Uint32(b[crcOff:])
	if h.off > math.MaxInt64 {
		return "offset out of range"
	}
	if h.payloadLen() > MaxPayload {
		return "payload too long"
	}
	return ""
}

// scanner reads the records of one segment file in order through a window
// buffer. Slices it returns are valid until the next call.
type scanner struct {
	tag  uint32 // the segment's: a version-2 record with another is stale
	f    vfs.File
	size int64  // bytes to consider
	buf  []byte // window; buf[:n] holds file bytes [base, base+n)
	base int64
	n    int
}

// newScanner reads f up to size, reusing buf if it makes a big enough
// window (a full one, or the whole file).
func newScanner(f vfs.File, tag uint32, size int64, buf []byte) *scanner {
	if int64(len(buf)) < min(scanBufSize, size) {
		buf = nil
	}
	return &scanner{tag: tag, f: f, size: size, buf: buf}
}

// window returns file bytes [off, off+n), which must lie inside s.size.
func (s *scanner) window(off int64, n int) ([]byte, error) {
	if off >= s.base && off+int64(n) <= s.base+int64(s.n) {
		i := int(off - s.base)
		return s.buf[i : i+n], nil
	}
	if n > len(s.buf) {
		// Grow to the record, and to a full window unless the file is smaller.
		s.buf = make([]byte, max(int64(n), min(scanBufSize, s.size-off)))
	}
	want := min(int64(len(s.buf)), s.size-off)
	s.base, s.n = off, 0
	m, err := s.f.ReadAt(s.buf[:want], off)
	if int64(m) < want {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	s.n = m
	return s.buf[:n], nil
}

// staleRecord is next's reason for a record of an earlier use of the file.
const staleRecord = "record of an earlier use of the file"

// next reads the record at off. bad is non-empty when the bytes there are not
// a valid record (torn, corrupt, or past the end); err reports a failed read.
// data and aux alias the window.
func (s *scanner) next(off int64, h *header) (data, aux []byte, bad string, err error) {
	if s.size-off < HeaderSize {
		return nil, nil, "short header", nil
	}
	b, err := s.window(off, HeaderSize)
	if err != nil {
		return nil, nil, "", err
	}
	if bad := decodeHeader(b, h); bad != "" {
		return nil, nil, bad, nil
	}
	if h.vers != 1 && h.tag != s.tag {
		return nil, nil, staleRecord, nil
	}
	pl := h.payloadLen()
	if s.size-off-HeaderSize < pl {
		return nil, nil, "record extends past end of file", nil
	}
	b, err = s.window(off, HeaderSize+int(pl))
	if err != nil {
		return nil, nil, "", err
	}
	crc := crc32.Update(0, castagnoli, b[:crcOff])
	crc = crc32.Update(crc, castagnoli, b[HeaderSize:])
	if crc != h.crc {
		return nil, nil, "crc mismatch", nil
	}
	dl := int(h.dataLen())
	return b[HeaderSize : HeaderSize+dl], b[HeaderSize+dl:], "", nil
}

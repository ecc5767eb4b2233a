package iscsi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Opcodes (RFC 7143 11.2.1.2).
const (
	opNopOut      = 0x00
	opSCSICmd     = 0x01
	opTaskMgmt    = 0x02
	opLoginReq    = 0x03
	opTextReq     = 0x04
	opDataOut     = 0x05
	opLogoutReq   = 0x06
	opSNACK       = 0x10
	opNopIn       = 0x20
	opSCSIResp    = 0x21
	opTaskMgmtRsp = 0x22
	opLoginResp   = 0x23
	opTextResp    = 0x24
	opDataIn      = 0x25
	opLogoutResp  = 0x26
	opR2T         = 0x31
	opAsync       = 0x32
	opReject      = 0x3f
)

// Reject reasons (RFC 7143 11.17.1).
const (
	rejectDataDigest   = 0x02
	rejectSNACK        = 0x03
	rejectProtocol     = 0x04
	rejectUnsupported  = 0x05
	rejectImmediate    = 0x06
	rejectTaskInProg   = 0x07
	rejectInvalidField = 0x09
	rejectOutOfRes     = 0x0a
	rejectWaitLogout   = 0x0c
)

const (
	bhsLen     = 48
	maxAHS     = 255 * 4
	reservedTT = 0xffffffff
)

// Errors of this package.
var (
	ErrClosed  = errors.New("iscsi: server closed")
	ErrDigest  = errors.New("iscsi: digest mismatch")
	ErrTooLong = errors.New("iscsi: data segment longer than negotiated")
	ErrAuth    = errors.New("iscsi: authentication failed")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the iSCSI digest (RFC 7143 13.1): CRC32C; the value goes on the
// wire little-endian.
func crc32c(p ...[]byte) uint32 {
	var c uint32
	for _, b := range p {
		c = crc32.Update(c, castagnoli, b)
	}
	return c
}

// bhs is the Basic Header Segment (RFC 7143 11.2.1):
//
//	byte  0       1        2  3   4        5..7    8..15    16..19  20..47
//	    +-------+--------+------+--------+-------+--------+-------+----------+
//	    |.|I|op | F|spec | spec | AHSlen | DSlen | LUN or | ITT   | opcode   |
//	    |       |        |      | (words)| bytes | spec   |       | specific |
//	    +-------+--------+------+--------+-------+--------+-------+----------+
//
// followed by AHS, header digest (4, if negotiated), the data segment padded
// to 4 bytes, and the data digest (4, if negotiated).
type bhs [bhsLen]byte

func (b *bhs) opcode() byte     { return b[0] & 0x3f }
func (b *bhs) immediate() bool  { return b[0]&0x40 != 0 }
func (b *bhs) final() bool      { return b[1]&0x80 != 0 }
func (b *bhs) ahsLen() int      { return int(b[4]) * 4 }
func (b *bhs) dataLen() int     { return int(b[5])<<16 | int(b[6])<<8 | int(b[7]) }
func (b *bhs) u32(i int) uint32 { return binary.BigEndian.Uint32(b[i:]) }
func (b *bhs) u16(i int) uint16 { return binary.BigEndian.Uint16(b[i:]) }
func (b *bhs) lunField() uint64 { return binary.BigEndian.Uint64(b[8:]) }
func (b *bhs) itt() uint32      { return b.u32(16) }

func (b *bhs) setU32(i int, v uint32) { binary.BigEndian.PutUint32(b[i:], v) }
func (b *bhs) setDataLen(n int)       { b[5], b[6], b[7] = byte(n>>16), byte(n>>8), byte(n) }

// decodeLUN turns the 8-byte SAM LUN field into a LUN number: peripheral
// and flat addressing of the first level; anything else maps to a LUN that
// does not exist.
func decodeLUN(v uint64) uint64 {
	b0, b1 := byte(v>>56), byte(v>>48)
	if v&0x0000ffffffffffff != 0 {
		return 1 << 62
	}
	switch b0 >> 6 {
	case 0:
		if b0&0x3f != 0 {
			return 1 << 62
		}
		return uint64(b1)
	case 1:
		return uint64(b0&0x3f)<<8 | uint64(b1)
	}
	return 1 << 62
}

// pdu is one received PDU. Data aliases the reader's buffer until the next
// read.
type pdu struct {
	hdr  bhs
	ahs  []byte
	data []byte
}

func pad4(n int) int { return (n + 3) &^ 3 }

// pduReader reads PDUs from a stream into buffers it reuses.
type pduReader struct {
	r       io.Reader
	hdigest bool
	ddigest bool
	maxData int // largest data segment accepted
	ahs     [maxAHS]byte
	buf     []byte
	dig     [4]byte
}

// errDataDigest reports a data digest mismatch; the PDU header is valid.
var errDataDigest = fmt.Errorf("%w: data", ErrDigest)

// read reads one PDU into p (RFC 7143 11.2). Header digest errors and
// oversized data segments are fatal to the connection; a data digest error
// returns errDataDigest with p's header filled in.
func (rd *pduReader) read(p *pdu) error {
	if _, err := io.ReadFull(rd.r, p.hdr[:]); err != nil {
		return err
	}
	al := p.hdr.ahsLen()
	p.ahs = rd.ahs[:al]
	if _, err := io.ReadFull(rd.r, p.ahs); err != nil {
		return err
	}
	if rd.hdigest {
		if _, err := io.ReadFull(rd.r, rd.dig[:]); err != nil {
			return err
		}
		if binary.LittleEndian.Uint32(rd.dig[:]) != crc32c(p.hdr[:], p.ahs) {
			return fmt.Errorf("%w: header", ErrDigest)
		}
	}
	dl := p.hdr.dataLen()
	if dl > rd.maxData {
		return fmt.Errorf("%w: %d > %d", ErrTooLong, dl, rd.maxData)
	}
	n := pad4(dl)
	if cap(rd.buf) < n {
		rd.buf = make([]byte, n)
	}
	buf := rd.buf[:n]
	if _, err := io.ReadFull(rd.r, buf); err != nil {
		return err
	}
	p.data = buf[:dl]
	if rd.ddigest && dl > 0 {
		if _, err := io.ReadFull(rd.r, rd.dig[:]); err != nil {
			return err
		}
		if binary.LittleEndian.Uint32(rd.dig[:]) != crc32c(buf) {
			return errDataDigest
		}
	}
	return nil
}

var zeroPad [4]byte

// appendPDU appends the wire form of a PDU with header h and data to out.
func appendPDU(out []byte, h *bhs, data []byte, hdigest, ddigest bool) []byte {
	h.setDataLen(len(data))
	out = append(out, h[:]...)
	if hdigest {
		out = binary.LittleEndian.AppendUint32(out, crc32c(h[:]))
	}
	if len(data) > 0 {
		out = append(out, data...)
		p := pad4(len(data)) - len(data)
		out = append(out, zeroPad[:p]...)
		if ddigest {
			out = binary.LittleEndian.AppendUint32(out, crc32c(data, zeroPad[:p]))
		}
	}
	return out
}

// serial number arithmetic (RFC 1982, 32 bits) for CmdSN windows.
func snLess(a, b uint32) bool { return a != b && int32(a-b) < 0 }

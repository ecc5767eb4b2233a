package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"stor.dev/stor/target"
)

// Magic numbers (doc/proto.md "Newstyle negotiation", "Request message",
// "Simple reply message", "Structured reply chunk message").
const (
	magicNBD        uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt        uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply   uint64 = 0x3e889045565a9
	magicRequest    uint32 = 0x25609513
	magicSimple     uint32 = 0x67446698
	magicStructured uint32 = 0x668e33ef
	// magicExtRequest is the extended-header request magic of the
	// experimental EXTENDED_HEADERS extension; we never negotiate it, so a
	// client sending it is broken and gets disconnected like any bad magic.
	magicExtRequest uint32 = 0x21e41c71
)

// Handshake flags ("Handshake flags") and client flags ("Client flags").
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFixedNewstyle uint32 = 1 << 0
	clientNoZeroes      uint32 = 1 << 1
)

// Transmission flags ("Transmission flags").
const (
	tflagHasFlags       uint16 = 1 << 0
	tflagReadOnly       uint16 = 1 << 1
	tflagSendFlush      uint16 = 1 << 2
	tflagSendFUA        uint16 = 1 << 3
	tflagRotational     uint16 = 1 << 4
	tflagSendTrim       uint16 = 1 << 5
	tflagSendWriteZeros uint16 = 1 << 6
	tflagSendDF         uint16 = 1 << 7
	tflagCanMultiConn   uint16 = 1 << 8
	tflagSendResize     uint16 = 1 << 9
	tflagSendCache      uint16 = 1 << 10
	tflagSendFastZero   uint16 = 1 << 11
)

// Option types ("Option types").
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types ("Option reply types").
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4

	repErrUnsup         uint32 = 1<<31 + 1
	repErrPolicy        uint32 = 1<<31 + 2
	repErrInvalid       uint32 = 1<<31 + 3
	repErrPlatform      uint32 = 1<<31 + 4
	repErrTLSReqd       uint32 = 1<<31 + 5
	repErrUnknown       uint32 = 1<<31 + 6
	repErrShutdown      uint32 = 1<<31 + 7
	repErrBlockSizeReqd uint32 = 1<<31 + 8
	repErrTooBig        uint32 = 1<<31 + 9
)

// Information types of NBD_REP_INFO ("NBD_REP_INFO").
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Command types ("Request types").
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags ("Command flags").
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and types ("Structured reply flags",
// "Structured reply types").
const (
	replyFlagDone uint16 = 1 << 0

	replyNone        uint16 = 0
	replyOffsetData  uint16 = 1
	replyOffsetHole  uint16 = 2
	replyBlockStatus uint16 = 5
	replyError       uint16 = 1<<15 + 1
	replyErrorOffset uint16 = 1<<15 + 2
)

// base:allocation flags ("base:allocation metadata context").
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

// metaAllocation is the one metadata context we offer; metaAllocationID is
// the id SET_META_CONTEXT gives it.
const (
	metaAllocation   = "base:allocation"
	metaAllocationID = 1
)

// Error values ("Error values").
const (
	errnoPerm     uint32 = 1
	errnoIO       uint32 = 5
	errnoNoMem    uint32 = 12
	errnoInval    uint32 = 22
	errnoNoSpc    uint32 = 28
	errnoOverflow uint32 = 75
	errnoNotSup   uint32 = 95
	errnoShutdown uint32 = 108
)

// Size limits ("Size constraints").
const (
	// MaxPayload is the largest READ or WRITE payload the server accepts
	// and advertises in NBD_INFO_BLOCK_SIZE: 2^25, which the spec says no
	// client may treat as a denial of service.
	MaxPayload = 32 << 20
	// preferredBlock is the advertised preferred block size (at least the
	// logical block size).
	preferredBlock = 4096
	// maxString is the spec's limit on strings (names, queries, messages).
	maxString = 4096
	// maxOptionLen bounds the data of one option. Longer options are
	// skipped and refused with NBD_REP_ERR_TOO_BIG; beyond maxOptionSkip
	// the client is considered hostile and disconnected.
	maxOptionLen  = 64 << 10
	maxOptionSkip = 1 << 20
	// maxExtents bounds the descriptors of one BLOCK_STATUS chunk.
	maxExtents = 1 << 20
)

// Wire sizes.
const (
	requestSize         = 28 // magic, flags, type, cookie, offset, length
	simpleReplySize     = 16 // magic, error, cookie
	structuredReplySize = 20 // magic, flags, type, cookie, length
	optHeaderSize       = 16 // magic, option, length
	optReplyHeaderSize  = 20 // magic, option, type, length
	// hdrRoom is the space kept in front of every request buffer so that a
	// reply header can be laid down right before the data it precedes and
	// the whole reply leaves in one write.
	hdrRoom = 32
)

// request is the fixed part of a transmission request ("Request message").
type request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint32
}

// errBadMagic reports a request that does not start with NBD_REQUEST_MAGIC;
// the stream cannot be resynchronised and the connection is dropped.
var errBadMagic = fmt.Errorf("%w: bad request magic", ErrProtocol)

// parseRequest decodes a request header. It checks only the magic; the
// command, flags and range are judged by the caller, which answers EINVAL.
func parseRequest(b []byte) (request, error) {
	_ = b[requestSize-1]
	if binary.BigEndian.Uint32(b[0:4]) != magicRequest {
		return request{}, errBadMagic
	}
	return request{
		Flags:  binary.BigEndian.Uint16(b[4:6]),
		Type:   binary.BigEndian.Uint16(b[6:8]),
		Cookie: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// appendRequest encodes r (clients and tests).
func appendRequest(b []byte, r request) []byte {
	b = binary.BigEndian.AppendUint32(b, magicRequest)
	b = binary.BigEndian.AppendUint16(b, r.Flags)
	b = binary.BigEndian.AppendUint16(b, r.Type)
	b = binary.BigEndian.AppendUint64(b, r.Cookie)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	return binary.BigEndian.AppendUint32(b, r.Length)
}

// putSimpleReply lays a simple reply header into b[:16].
func putSimpleReply(b []byte, errno uint32, cookie uint64) {
	_ = b[simpleReplySize-1]
	binary.BigEndian.PutUint32(b[0:4], magicSimple)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], cookie)
}

// putChunk lays a structured reply chunk header into b[:20].
func putChunk(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	_ = b[structuredReplySize-1]
	binary.BigEndian.PutUint32(b[0:4], magicStructured)
	binary.BigEndian.PutUint16(b[4:6], flags)
	binary.BigEndian.PutUint16(b[6:8], typ)
	binary.BigEndian.PutUint64(b[8:16], cookie)
	binary.BigEndian.PutUint32(b[16:20], length)
}

// cmdClass picks the column of errnoTable a command's errors are read from.
type cmdClass uint8

const (
	classRead  cmdClass = iota // READ, TRIM, CACHE, BLOCK_STATUS, FLUSH
	classWrite                 // WRITE, WRITE_ZEROES
)

// errnoTable is the one place device errors become NBD error values
// ("Error values"): a write past the end is ENOSPC, a read or trim past the
// end is EINVAL, misalignment is EINVAL, a write to a read-only export is
// EPERM. Anything not listed is EIO.
var errnoTable = []struct {
	err         error
	read, write uint32
}{
	{target.ErrOutOfRange, errnoInval, errnoNoSpc},
	{target.ErrInvalid, errnoInval, errnoInval},
	{target.ErrNoSpace, errnoNoSpc, errnoNoSpc},
	{target.ErrReadOnly, errnoPerm, errnoPerm},
	{target.ErrNotSupported, errnoNotSup, errnoNotSup},
	{target.ErrIO, errnoIO, errnoIO},
	{target.ErrClosed, errnoShutdown, errnoShutdown},
	{context.Canceled, errnoShutdown, errnoShutdown},
	{context.DeadlineExceeded, errnoIO, errnoIO},
}

// errno maps a device error to the NBD error value for a command class.
func errno(err error, class cmdClass) uint32 {
	if err == nil {
		return 0
	}
	for _, e := range errnoTable {
		if errors.Is(err, e.err) {
			if class == classWrite {
				return e.write
			}
			return e.read
		}
	}
	return errnoIO
}

// transmissionFlags are the flags announced for a device.
func transmissionFlags(geo target.Geometry, structured bool) uint16 {
	f := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim |
		tflagSendWriteZeros | tflagSendFastZero | tflagSendCache | tflagCanMultiConn
	if structured {
		// Every read is answered with a single OFFSET_DATA chunk, so the
		// don't-fragment flag is honoured by construction.
		f |= tflagSendDF
	}
	if geo.ReadOnly {
		f |= tflagReadOnly
	}
	return f
}

// errnoName is the message sent with an error chunk that has no device
// error behind it.
func errnoName(e uint32) string {
	switch e {
	case errnoPerm:
		return "EPERM: export is read-only"
	case errnoIO:
		return "EIO: I/O error"
	case errnoNoMem:
		return "ENOMEM: out of memory"
	case errnoInval:
		return "EINVAL: invalid request (flags, alignment or range)"
	case errnoNoSpc:
		return "ENOSPC: write past the end of the export"
	case errnoOverflow:
		return "EOVERFLOW: request too large"
	case errnoNotSup:
		return "ENOTSUP: not supported"
	case errnoShutdown:
		return "ESHUTDOWN: server shutting down"
	}
	return fmt.Sprintf("error %d", e)
}

// Package nbd is an NBD server: it serves the exports of a target.Catalog to
// NBD clients (the Linux kernel via nbd-client, QEMU, libnbd's nbdinfo,
// nbdcopy and nbdfuse, fio's nbd engine). It implements the protocol of
// doc/proto.md in github.com/NetworkBlockDevice/nbd; comments cite its
// section titles in quotes.
//
// # Model
//
// A Server accepts TCP connections (Serve) and runs each on its own
// goroutine. A connection first haggles options ("Fixed newstyle
// negotiation"); at NBD_OPT_GO or NBD_OPT_EXPORT_NAME it opens its Device
// from the Catalog and enters transmission, and it closes the Device when
// the connection ends.
//
// In transmission one reader goroutine per connection parses requests and
// hands them to a bounded set of worker goroutines (Config.MaxInFlight,
// default 64, created lazily); when all are busy the reader stops reading,
// which pushes back on the client through TCP. READs and WRITEs over 1 MiB
// also draw on a 64 MiB per-connection budget, so pipelined 32 MiB requests
// cannot pin gigabytes.
//
// While the device answers READs or WRITEs faster than Config.InlineBelow
// (a moving average per connection), the reader runs them itself: for a
// fast device a goroutine handoff, often a wakeup on another CPU, costs
// more than the request (on 2 vCPUs under fio this doubled QD32 IOPS). A
// request alone on its connection (queue depth 1: nothing else received,
// nothing on the workers) runs inline under a 25 times higher bound, as
// there is nothing to overlap it with. A FLUSH runs inline only alone,
// while recent ones took under 100 times Config.InlineBelow (2 ms by
// default: a request arriving meanwhile waits no longer than that to be
// read). A slow device never runs inline, so its requests keep
// overlapping. READs of 256 KiB up to 1 MiB have their own average, per
// MiB, and bound (Config.InlineLargeReadsBelow, on where GOMAXPROCS is 2
// or less): served from memory they are CPU work, and without spare CPUs
// serial beats parallel there too.
//
// Workers execute requests concurrently and write replies out of order
// under a write mutex, each reply whole in one write call: a read reply's
// header is laid down in buffer space reserved just before the data it
// precedes, and small replies finished while another worker is writing are
// queued (up to 1 MiB) and leave together in that worker's next write.
// Replies of requests the reader runs inline while more requests are
// already buffered are held back the same way (corked) and leave with the
// last of them, before the reader can block: at queue depth 32 this halves
// the write calls or better.
// Request buffers are owned by their slot and reused, so the steady state
// allocates nothing per request.
//
// A device that can start a write without waiting for it
// (target.AsyncWriter: a replicated volume's client) gets plain WRITEs (no
// FUA, up to 1 MiB) from the reader that way, and its completion writes
// the reply and frees the slot, on whatever goroutine the device completes
// on: no worker waits, and a replicated write's acknowledgement leaves
// from the goroutine that received it (on 2 vCPUs a goroutine hand-off
// costs a wake-up of another thread, tens of microseconds). A completion
// never blocks: its reply joins the queue of a writer at work, or is
// written as far as the socket takes it at once and a goroutine writes the
// rest; the reader waits before starting another write while that queue
// is past 1 MiB, so a client that stops reading stays bounded as above.
//
// # Rules
//
//   - Handshake: fixed newstyle with NBD_FLAG_NO_ZEROES. Options EXPORT_NAME,
//     ABORT, LIST, INFO, GO (NBD_INFO_EXPORT, NAME, DESCRIPTION,
//     BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT
//     (base:allocation). Anything else, including STARTTLS and the
//     experimental EXTENDED_HEADERS, gets NBD_REP_ERR_UNSUP and haggling
//     goes on. An unknown export is NBD_REP_ERR_UNKNOWN (GO, INFO) or a hang
//     up (EXPORT_NAME, which cannot report errors). The empty export name
//     means the only export when the catalog holds exactly one.
//   - Size constraints ("Size constraints"): minimum block = the device's
//     logical block size, preferred = max(4096, block size), maximum payload
//     = 32 MiB. NBD_INFO_BLOCK_SIZE is always sent.
//   - Commands: READ, WRITE, FLUSH, TRIM, CACHE (checked, then a no-op),
//     WRITE_ZEROES (NO_HOLE and FAST_ZERO honoured: the device's WriteZeroes
//     is metadata only and never leaves a hole), BLOCK_STATUS
//     (base:allocation from target.Mapper, REQ_ONE honoured), DISC. FUA on
//     WRITE and WRITE_ZEROES passes fua=true; FUA on TRIM flushes after.
//   - Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
//     SEND_WRITE_ZEROES, SEND_FAST_ZERO, SEND_CACHE, CAN_MULTI_CONN (the
//     BlockDevice contract makes writes visible to every connection),
//     READ_ONLY for read-only devices, SEND_DF with structured replies
//     (every read is one OFFSET_DATA chunk, so DF holds by construction).
//     Never ROTATIONAL or SEND_RESIZE.
//   - Errors ("Error values"), mapped in one table (errnoTable): out of
//     range is EINVAL for READ, TRIM, CACHE and BLOCK_STATUS but ENOSPC for
//     WRITE and WRITE_ZEROES; misalignment, unknown commands and misplaced
//     flags are EINVAL; writes to a read-only export are EPERM;
//     target.ErrNoSpace is ENOSPC, ErrNotSupported ENOTSUP, ErrClosed
//     ESHUTDOWN, anything else EIO. With structured replies errors travel as
//     NBD_REPLY_TYPE_ERROR chunks with a message.
//   - A client that breaks the framing (bad request or option magic, a write
//     payload over 32 MiB, unknown client flags, option data over 1 MiB)
//     loses its connection after its earlier requests are answered; other
//     connections never notice.
//   - Close stops accepting, answers options still being haggled with
//     NBD_REP_ERR_SHUTDOWN and hangs up, stops each connection reading, answers every
//     request already read (the spec's "SHOULD wait for inflight requests"),
//     closes connections and devices, and joins every goroutine. After
//     Config.DrainTimeout it cancels the contexts of device calls still
//     running (they are answered ESHUTDOWN); after twice that it gives up on
//     clients that do not read their replies.
//   - Logging: one line per connection event (attached, disconnected,
//     failed negotiation), never per I/O. Metrics: stor_nbd_connections,
//     stor_nbd_connections_total, stor_nbd_handshake_failures_total.
//
// # Wire formats
//
// All integers are big-endian. Handshake ("Newstyle negotiation"):
//
//	server greeting                     client flags
//	+----------+----------+-------+     +-----------------+
//	| NBDMAGIC | IHAVEOPT | flags |     | client flags    |
//	| 8        | 8        | 2     |     | 4               |
//	+----------+----------+-------+     +-----------------+
//	flags: bit 0 FIXED_NEWSTYLE, bit 1 NO_ZEROES
//
// Option request and reply ("Fixed newstyle negotiation"):
//
//	+----------+--------+--------+------------+
//	| IHAVEOPT | option | length | data ...   |   client -> server
//	| 8        | 4      | 4      | length     |
//	+----------+--------+--------+------------+
//	+-----------------+--------+------+--------+------------+
//	| 0x3e889045565a9 | option | type | length | data ...   |   server -> client
//	| 8               | 4      | 4    | 4      | length     |
//	+-----------------+--------+------+--------+------------+
//
// Data of NBD_OPT_INFO / NBD_OPT_GO, and the NBD_REP_INFO payloads sent back
// ("NBD_OPT_INFO and NBD_OPT_GO", "NBD_REP_INFO"):
//
//	+----------+------+-----------+---------------------+
//	| name len | name | n         | info type x n       |
//	| 4        | var  | 2         | 2 x n               |
//	+----------+------+-----------+---------------------+
//	NBD_INFO_EXPORT      type 0 | size 8 | transmission flags 2
//	NBD_INFO_NAME        type 1 | name
//	NBD_INFO_DESCRIPTION type 2 | description
//	NBD_INFO_BLOCK_SIZE  type 3 | minimum 4 | preferred 4 | maximum payload 4
//
// Reply to NBD_OPT_EXPORT_NAME (no option reply header; the zeroes are left
// out when the client set NO_ZEROES):
//
//	+------+--------------------+----------------+
//	| size | transmission flags | zeroes         |
//	| 8    | 2                  | 124            |
//	+------+--------------------+----------------+
//
// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT, and the
// NBD_REP_META_CONTEXT reply ("Option types"):
//
//	+----------+------+-----------+-----------+-------+ ...
//	| name len | name | n queries | query len | query |
//	| 4        | var  | 4         | 4         | var   |
//	+----------+------+-----------+-----------+-------+ ...
//	NBD_REP_META_CONTEXT: context id 4 | "base:allocation"
//
// Transmission ("Request message", "Simple reply message", "Structured
// reply chunk message"):
//
//	request (28 bytes, then length bytes of data for WRITE)
//	+------------+-------+------+--------+--------+--------+
//	| 0x25609513 | flags | type | cookie | offset | length |
//	| 4          | 2     | 2    | 8      | 8      | 4      |
//	+------------+-------+------+--------+--------+--------+
//
//	simple reply (16 bytes, then the data of a successful READ)
//	+------------+-------+--------+
//	| 0x67446698 | error | cookie |
//	| 4          | 4     | 8      |
//	+------------+-------+--------+
//
//	structured reply chunk (20 bytes, then length bytes of payload)
//	+------------+-------+------+--------+--------+
//	| 0x668e33ef | flags | type | cookie | length |
//	| 4          | 2     | 2    | 8      | 4      |
//	+------------+-------+------+--------+--------+
//	flags: bit 0 DONE
//
// Structured chunk payloads ("Structured reply types"):
//
//	OFFSET_DATA  (1)       offset 8 | data
//	BLOCK_STATUS (5)       context id 4 | (extent length 4 | status flags 4) x n
//	ERROR        (2^15+1)  error 4 | message length 2 | message
//	NONE         (0)       (empty)
//	base:allocation status flags: bit 0 HOLE, bit 1 ZERO
//	  target.ExtentHole -> HOLE|ZERO, ExtentZero -> ZERO, ExtentData -> 0
//
// Command types: READ 0, WRITE 1, DISC 2, FLUSH 3, TRIM 4, CACHE 5,
// WRITE_ZEROES 6, BLOCK_STATUS 7. Command flags: FUA 1<<0, NO_HOLE 1<<1,
// DF 1<<2, REQ_ONE 1<<3, FAST_ZERO 1<<4.
//
// # Reply choices
//
// Without structured replies every reply is simple. With them, a READ is
// answered by one OFFSET_DATA chunk flagged DONE (the data is read before
// the header is sent, so no error can follow it); a payload-free success
// may be a simple reply ("Simple reply message" allows it); every error is
// an ERROR chunk; BLOCK_STATUS is one BLOCK_STATUS chunk flagged DONE.
package nbd

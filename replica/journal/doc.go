// Package journal is the append-only op journal of one partition replica.
//
// # Model
//
// A journal is a directory of segment files named NNNNNNNNNNNNNNNN.log (the
// segment id as 16 lower-case hex digits). Ids only grow: the newest file is
// never removed, and an id is reused only after Open dropped that segment as
// part of a torn tail (it held nothing ever reported durable). Records are appended to the newest
// segment, the active one. Once the active segment holds Options.SegmentSize
// bytes or more, the next Append first seals it and creates the next segment
// (the directory is fsync'ed after every remove, and after a create by the
// next Sync round, before it reports anything in the new segment durable).
// Rotate seals on
// demand. Sealing appends a seal record (kind 5, journal-internal, never
// replayed); a sealed segment never changes again. Remove deletes it once
// the engine no longer needs its records (their data lives elsewhere).
//
// Where the file system can truncate, a new segment's file is presized to
// SegmentSize (sparse: nothing allocated), so appends write inside the
// file instead of extending it (on ext4 several times cheaper; see
// presize). Open cuts the newest segment's unwritten tail like any torn
// tail, then presizes it again; Close cuts the active segment to its
// records.
//
// # Reused files
//
// Remove keeps up to Options.Recycle removed files, renamed to
// NNNNNNNNNNNNNNNN.free (durably), and a new segment takes one of them
// (renamed to its name) instead of creating a file: writing over pages the
// page cache still holds is many times cheaper than making the kernel
// allocate new ones (see reuse). A file joins the pool only when no reader
// holds its segment any more, so a reader never sees it rewritten. Open
// deletes leftover .free files, Close and DropRecycled delete the pool.
//
// A reused file still holds records of its earlier use past the new
// segment's records. Every record therefore carries a tag, the low 32
// bits of the id of the segment it was written to; a record with another
// tag ends a segment's records exactly as zeros or a torn record do. In a
// sealed segment the seal record marks the end, and nothing past it is
// read.
//
// Every record carries an opnum; opnums are strictly increasing across the
// whole journal (gaps are allowed). A record is addressed by a Pos: the
// segment id and the file offset of its data payload, which stays valid until
// the segment is removed.
//
// # Record format
//
// All integers are little-endian. A record is a 48-byte header followed by
// the payload: the data bytes (KindWrite only, Len of them) and then AuxLen
// opaque aux bytes for the engine.
//
//	offset size field    meaning
//	+------+----+--------+-------------------------------------------------+
//	|    0 |  4 | magic  | 0x4c4e524a ("JRNL" as little-endian bytes)      |
//	|    4 |  1 | kind   | 1 Write, 2 Zero, 3 Trim, 4 Meta, 5 Seal         |
//	|    5 |  1 | flags  | opaque to the journal, kept for the engine      |
//	|    6 |  1 | vers   | format version, 2 (1: no tag, still read)       |
//	|    7 |  1 | -      | reserved, 0                                     |
//	|    8 |  8 | epoch  | epoch of the primary that gave the opnum        |
//	|   16 |  8 | opnum  | operation number, > every earlier record's      |
//	|   24 |  8 | off    | byte offset of the logical range                |
//	|   32 |  4 | length | byte length of the logical range; for Write     |
//	|      |    |        | also the number of data bytes                   |
//	|   36 |  4 | auxlen | number of aux bytes                             |
//	|   40 |  4 | tag    | low 32 bits of the segment id (version 1: 0)    |
//	|   44 |  4 | crc32c | Castagnoli CRC of bytes [0,44) + data + aux     |
//	|   48 |  n | data   | Write: length bytes; other kinds: none          |
//	|48+n  |  a | aux    | auxlen opaque bytes                             |
//	+------+----+--------+-------------------------------------------------+
//
// Records are packed back to back with no padding; Pos.Off is the record's
// file offset + 48. Zero and Trim carry no data; Meta carries only aux (its
// off and length are stored as given). The payload (data + aux) of one record
// is at most MaxPayload bytes.
//
// # Durability contract
//
//   - Append writes the whole record (with one write call up to 1 MiB) and
//     does not fsync.
//     The record is readable (ReadAt, Replay) as soon as Append returns, and
//     survives a crash of the process (SIGKILL) but not of the machine.
//   - Sync returns once every record whose Append returned before Sync was
//     called is fsync'ed, including the tails of segments sealed since the
//     last Sync (they are synced oldest first, the active segment last).
//     Concurrent callers share fsyncs: at most one round of fsyncs is in
//     flight, and callers that arrive during it are served together by the
//     next round (group commit).
//   - After a power loss, Open finds every record appended before the last
//     completed Sync. Each record is either wholly present (crc ok) or cut:
//     Open truncates the newest segment at its first invalid record, so no
//     record after a cut survives and later appends follow valid data.
//   - An older (sealed) segment may also end in a torn tail after a crash
//     soon after a rotation. Open cuts it, and deletes every later segment,
//     when its invalid tail looks torn (the file ends inside the record,
//     only zeros follow, or the file holds no seal record of the segment
//     past it) or when no later segment holds a valid record. This loses
//     nothing acknowledged: Sync fsyncs sealed segments, seal included,
//     before newer ones, so no later record was reported durable while this
//     tail was not.
//   - Any other invalid record in an older segment (say a complete record
//     whose crc fails, or a damaged seal, while a later segment holds valid
//     records), and any opnum that does not increase, is ErrCorrupt (see
//     CorruptError): Open fails rather than drop data that may have been
//     acknowledged.
//   - A failed Append (say out of space) appends nothing: the file is cut
//     back to the end of the last record and later Appends may succeed.
//   - An fsync error, or a failed write that cannot be cut back, poisons the
//     journal (ErrFailed): every later Append and Sync returns it, because
//     after a failed fsync the kernel may have dropped dirty pages and a
//     retry could falsely succeed. Reopen to recover what is on disk.
//   - Remove is durable when it returns (the directory is fsync'ed).
//
// # Concurrency
//
// Every method is safe for concurrent use. Appends are serialized and land in
// the order of the calls. ReadAt and Replay never wait for an Append's write
// call; a segment removed while a reader holds it stays readable by that
// reader, and later reads of it return ErrRemoved. The journal assumes its
// vfs.File allows WriteAt concurrently with Sync and ReadAt on the same file,
// as both vfs.Default (os.File) and vfs.MemFS do.
//
// Open takes a lock file (LOCK) in the directory; a second Open of the same
// directory fails until Close.
//
// # Costs
//
//   - Append: one pwrite of header+data+aux, assembled in a buffer the
//     journal keeps (up to 1 MiB; larger records allocate); no allocation
//     otherwise.
//   - Sync: one fdatasync per unsynced segment per round (normally just the
//     active one); none when nothing was appended since the last round.
//   - Rotation: a seal record, and a rename of a pooled file or a file
//     create and truncate (presize), inside the Append that crosses
//     SegmentSize (or in Rotate); the directory fsync waits for the next
//     Sync round, so no Append waits for one.
//   - Every live segment keeps one open file descriptor.
//   - Open reads and checks every record of every segment, and fsyncs each
//     segment (cheap when clean).
package journal

package replica

// This file is the driver that runs a Core over a real Partition: a
// Replica, one replica of a replicated partition, primary or secondary.
//
// # Model
//
//	Deliver(m) --in (bounded, drops)--\     (replication, control, and
//	Write/.../ReadAt --reqs-----------+-->  remote clients' Requests)
//	ticker ---------------------------/    run, or a caller (serve): Step / Tick --> Core
//	                                               |
//	                                         Ready, in the Core's order:
//	  1. Hard          -> HardStore.Save (durable)
//	  2. Snapshot      -> install the staged transfer (see snapshot.go)
//	  3. TruncateFrom  -> Journal.TruncateFrom (durable cut)
//	  4. Entries       -> journal notes with the entry's own epoch and opnum
//	  5. Sync          -> journal fsync (group commit)
//	  6. Committed     -> extent map, in opnum order (writes point at the notes)
//	  7. Done          -> wake the local client calls; Reply to remote ones
//	                     (a read's data is read off run, see Remote clients)
//	  8. Messages      -> Send (Append entries get their data from the journal)
//	                     then Core.Advance
//
// Whoever holds Replica.loop owns the Core and everything in the "owned by
// run" part of Replica: the run goroutine (started by OpenReplica, joined
// by Close), or a caller that found it free. Client calls queue a request
// and wait for its Completion; Deliver queues a message, dropping it when
// the queue is full. Either then takes the loop if nobody holds it and
// serves the queues itself (serve: what waits, in queue order, then the
// Readies), so that an op at queue depth 1 crosses no goroutine: on a
// secondary the transport's reader notes an Append and sends its ack; on a
// primary the client's goroutine notes and sends its write, and the reader
// that receives the ack commits it. If the loop is held, they kick run,
// which serves once the holder lets go. Items leave the queues only under
// the loop, in order, so an inline serve never overtakes a message queued
// before it. run also ticks the Core, and shuts it down at Close (after
// which nobody steps it). A second goroutine (persist) commits the extent map's
// pending updates to Pebble every PersistEvery applied ops and once a
// second, off run's path (the partition's background flush does that for
// an unreplicated partition). Short-lived reader goroutines (at most
// maxRemoteReaders) read the data of remote clients' reads and send their
// Replies; Close joins them.
//
// # Rules
//
//   - The journal only ever holds notes in opnum order: every record is an
//     entry of the Core's log, written with the entry's epoch and opnum
//     (the partition assigns no opnum in replicated mode). Entries that a
//     new primary's log replaced are cut with Journal.TruncateFrom before
//     the replacements are appended. Ops with no journal kind of their own
//     (noop, read, flush) are KindMeta records; every note's aux bytes
//     carry its wire kind and request id (noteAux), so that a restart
//     recovers the entries exactly.
//   - The extent map only ever reflects the committed prefix: an entry is
//     applied (Committed) only when the Core says it is committed, so the
//     partition's applied opnum never passes the commit index, and the map
//     never holds a note that a later epoch could replace.
//   - A restarted replica comes back as a secondary (NewCore): its Storage
//     is SnapIndex = the extent map's persisted applied opnum (committed by
//     the rule above), Entries = the journal's records after it. Notes
//     that were committed but not yet persisted in the map are notes again
//     until the primary's commit index covers them; that is safe, since no
//     primary's log can conflict with a committed op.
//   - The partition must be opened with OpenReplicaPartition, which does
//     not replay notes into the map (OpenPartition would apply every
//     journal record, committed or not). While the partition is open its
//     own mutators (Write, WriteZeroes, Trim, and Flush's relocation ops)
//     refuse with ErrReplicated: ops go through the Replica.
//   - The partition's background work is Replica.Background, never
//     Partition.Flush directly: moves of data into shards are recorded
//     straight into the extent map (opnums are the Core's), and journal
//     segments the Core or a restart still needs are kept. Reads
//     (Partition.ReadAt) are fine at any time and see the committed
//     prefix.
//   - The metastore's BeforeFlush hook must call SyncJournal, not
//     Partition.Sync, while a Replica runs: a journal Sync must not overlap
//     a TruncateFrom (see there), and SyncJournal takes the driver's lock.
//
// # Data and memory
//
// The Core keeps its whole log in memory (the driver does not Compact it:
// a peer that needs compacted entries needs a snapshot). To keep that log
// small, write entries hold no data inside the Core: a client's data waits
// in pending until its note is written, an Append's data waits in stash
// until Ready hands its entries back, and outgoing Appends get their data
// from the notes just written (fresh) or from the journal (pos).
//
// # Snapshots and log compaction
//
// A peer the primary's log cannot bring up to date (a new replica, or one
// behind what the log still holds) gets a snapshot: the state at an opnum,
// sent in parts and installed at once (snapshot.go). A Snapshot message
// that does not end a staged transfer is dropped before Step, so the Core
// never believes it installed a state the partition does not have. The
// Core's log (and the journal positions beside it) keeps at most about
// compactAbove entries: past that, all but the last compactKeep applied
// ones are forgotten (Core.Compact).
//
// Request ids: a Replica numbers its requests from a random 64-bit base,
// so ids of different replicas do not meet in a Core's set of applied ids
// (which a new primary inherits). At open, the ids of applied ops
// (Storage.Seen) are recovered from the journal's last MaxSeen notes.
//
// # Remote clients
//
// A volume client on another node (Client, remote.go) sends wire Requests;
// Deliver queues them with the replication messages and run steps them
// into the Core, which numbers them like local calls (Core.stepRequest:
// refused unless this replica is the primary at the Request's epoch;
// deduplicated by request id). The rules:
//
//   - A request is checked before the Core sees it (checkRemote: an op
//     kind, a non-empty range at a non-negative offset and within
//     ReplicaConfig.Size when set, at most wire.MaxData bytes for a read or
//     write, write data of the stated length); a malformed one is answered RejectInvalid and never reaches
//     the Core, so it can neither leak pending data nor fail the replica
//     at apply.
//   - A remote write's data waits in pending under its request id until its
//     note is written, as a local write's does: the Core's log holds no
//     data. A retry of an id whose data still waits leaves the first copy's
//     there (the Core dedupes the retry, so the note is the first copy's,
//     whatever the retry carries); every Completion of the id clears it.
//   - A Completion answers a local call if its request id is a waiting
//     local call's and its Client is this node; every other Completion
//     gets a Reply to its Client: ReqID, Kind, Index = the op's opnum, and
//     for a read Data = the partition's bytes read after the op was applied
//     (as ReadAt does for a local call). Those reads run on reader
//     goroutines (at most maxRemoteReaders; past that, on the loop itself), so
//     that a large read does not stall replication; Close joins them.
//   - A refused or failed op is a Reply with FlagReject, the RejectReason
//     in Data[0], Epoch the replica's epoch, and Peers[0] the primary it
//     knows of (perhaps itself: a request of another epoch), so that the
//     client redirects at once. A Request that reaches a failed Replica is
//     answered RejectUnavailable; ops a Replica held when it failed or
//     closed are not answered (the client's attempt times out).
//   - Replies go through ReplicaConfig.Send like every message; a lost one
//     is the client's timeout and retry, which the request id makes
//     idempotent.
//

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
	"stor.dev/stor/replica/wire"
)

// Errors of a Replica.
var (
	// ErrReplicated: the partition's ops go through a Replica (its own
	// mutators refuse), or OpenReplica got a partition that was not opened
	// with OpenReplicaPartition.
	ErrReplicated = errors.New("replica: partition is replicated: ops go through its Replica")
	// ErrReplicaClosed: the Replica was closed before the op completed.
	ErrReplicaClosed = errors.New("replica: replica closed")
	// ErrReplicaFailed wraps the error that stopped a Replica (a journal,
	// hard state or extent map failure): its Core can no longer be driven
	// by the rules, so every later op fails. Reopen the partition.
	ErrReplicaFailed = errors.New("replica: replica failed")
	// ErrInvalidRequest: a remote client's request is malformed
	// (answered RejectInvalid).
	ErrInvalidRequest = errors.New("replica: invalid request")
)

// RejectReason says why a replica refused a Request: a Reply with
// wire.FlagReject carries it in Data[0].
type RejectReason uint8

// Reject reasons.
const (
	// RejectNotPrimary: the replica is not the primary of the Request's
	// epoch (ErrNotPrimary). Retry on Peers[0] if given, at the Reply's
	// epoch.
	RejectNotPrimary RejectReason = 1 + iota
	// RejectStepDown: the primary learned of a higher epoch with the op
	// pending (ErrStepDown). Retry on the current primary.
	RejectStepDown
	// RejectUnavailable: the replica has failed or closed. Retry elsewhere.
	RejectUnavailable
	// RejectInvalid: the Request is malformed (ErrInvalidRequest); no
	// replica will serve it.
	RejectInvalid
	// RejectIO: the primary committed a read but could not read the data.
	RejectIO
)

var rejectNames = [...]string{"", "not-primary", "step-down", "unavailable", "invalid", "io"}

func (r RejectReason) String() string {
	if int(r) < len(rejectNames) && r != 0 {
		return rejectNames[r]
	}
	return fmt.Sprintf("reject(%d)", uint8(r))
}

// Defaults of ReplicaConfig.
const (
	DefaultTick     = 10 * time.Millisecond
	DefaultQueueLen = 1024
)

// HardStore persists a replica's HardState. Save must be durable when it
// returns; Load returns the last state saved (the zero HardState if none).
// Both are called only by whoever drives the Replica, one call at a time
// (Load from OpenReplica).
type HardStore struct {
	Load func() (HardState, error)
	Save func(HardState) error
}

// ReplicaConfig configures a Replica.
type ReplicaConfig struct {
	// Core configures the replication core; ID, Partition and Control are
	// required.
	Core CoreConfig
	// Send sends a message (the transport). It must not block; it may
	// drop. It is called by whoever drives the Replica (run, or a client
	// call or Deliver serving inline; so it may be called from inside
	// Deliver) and from the reader goroutines that answer remote reads (so
	// it must be safe for concurrent use); the caller gives up the message
	// and its Data.
	Send func(*wire.Msg)
	// Tick is the interval of Core ticks; 0: DefaultTick.
	Tick time.Duration
	// Hard persists the hard state; zero: FileHardStore in the partition's
	// journal directory.
	Hard HardStore
	// QueueLen bounds the inbound messages waiting to be stepped (Deliver
	// drops past it); 0: DefaultQueueLen.
	QueueLen int
	// Size is the partition's size in bytes: a remote request past it is
	// refused (RejectInvalid) before the Core numbers it; 0: unchecked.
	Size int64
	// SnapshotRate bounds a snapshot transfer to a peer, in bytes per
	// second (see snapshot.go); 0: DefaultSnapshotRate; negative: none.
	SnapshotRate int64
	Logger       *slog.Logger
}

// ReplicaStatus is a Replica's state as of its goroutine's last loop.
type ReplicaStatus struct {
	Role    Role
	Epoch   api.Epoch
	Primary api.NodeID
	Commit  api.OpNum // commit index
	Applied api.OpNum // applied to the extent map
	Last    api.OpNum // last entry of the log (notes included)
	InSync  []api.NodeID
	Peers   []PeerProgress // on a primary: every peer's progress
	Blessed bool           // on a primary: it holds a solo blessing
	Dropped uint64         // inbound messages dropped (queue full)
	Err     error          // the failure that stopped the Replica, if any
}

// request is one client call in flight.
type request struct {
	id   uint64
	kind wire.Kind
	off  int64
	len  int64
	data []byte          // write data
	done chan Completion // buffered: run never blocks on it
}

// noteKey identifies a log entry.
type noteKey struct {
	epoch api.Epoch
	op    api.OpNum
}

// Replica drives a Core over a Partition. See the comment at the top of
// this file. The client methods and Deliver are safe for concurrent use.
type Replica struct {
	cfg  ReplicaConfig
	p    *Partition
	log  *slog.Logger
	in   chan *wire.Msg
	reqs chan *request
	kick chan struct{} // capacity 1: in or reqs got an item while loop was held
	stop chan struct{}
	done chan struct{} // closed when run returns
	once sync.Once

	// loop is held by whoever drives the Core: run, or an inline caller
	// (see serve). Everything "owned by run" below is owned by its holder.
	loop sync.Mutex
	shut bool // run shut the Core down: nobody steps it again; owned by loop
	// backlog is the Core's uncommitted entries (LastIndex - Commit) as of
	// the last Ready loop: a call or message serves inline only while it is
	// at most 1 (see shallow).
	backlog atomic.Uint64

	reqBase   atomic.Uint64 // request ids: a random base per Replica, counting up
	dropped   atomic.Uint64
	snapIndex atomic.Uint64 // the Core's SnapIndex, for Background
	status    atomic.Pointer[ReplicaStatus]
	failed    atomic.Pointer[error]
	active    *error // the ErrReplicated this Replica stored in the partition

	// cutMu: TruncateFrom holds it, SyncJournal shares it.
	cutMu sync.RWMutex
	// bgMu: Background holds it, and so does a snapshot install (which
	// replaces the journal and the map under a flush).
	bgMu sync.Mutex

	// persistKick wakes the persister goroutine (persist), which commits
	// the extent map's pending updates to Pebble off run's path, as the
	// partition's background flush does for an unreplicated partition.
	persistKick chan struct{}
	persistDone chan struct{}
	sinceKick   int       // applied since the last kick; owned by run
	kicked      time.Time // last kick; owned by run

	// readers holds a token per reader goroutine answering a remote read;
	// replies counts them for Close.
	readers chan struct{}
	replies sync.WaitGroup

	// Owned by run.
	core       *Core
	waiting    map[uint64]*request
	pending    map[uint64][]byte    // write data by request id, until its note is written
	stash      map[noteKey][]byte   // write data of received appends, until Ready hands them
	fresh      map[api.OpNum][]byte // write data of the notes written in this Ready
	base       api.OpNum            // opnum of pos[0]
	pos        []journal.Pos        // journal position of every entry from base on
	applied    api.OpNum            // last op applied to the extent map
	snapLog    time.Time            // last time a dropped snapshot was logged
	loopLog    time.Time            // last time a Ready loop was logged
	scratch    []byte               // note aux
	recs       []*journal.Record    // notes being written
	senders    map[api.NodeID]*snapSender
	staged     *staged // a snapshot being received
	installing *staged // a received one, stepped into the Core, until its Ready installs it
}

// idleGuard is what OpenReplicaPartition leaves in Partition.failed: its
// mutators refuse, and OpenReplica knows the partition was opened for it.
var idleGuard = fmt.Errorf("%w (no Replica open)", ErrReplicated)

// OpenReplicaPartition opens partition pkey for a Replica. It is
// OpenPartition without the replay: journal records after the extent map's
// applied opnum are notes, left for OpenReplica to hand to the Core, not
// applied. The partition's own mutators refuse with ErrReplicated, and it
// starts no background work (Options.DefragPieces is ignored: a rewrite is
// a relocation op).
func OpenReplicaPartition(ctx context.Context, pkey uint64, meta *metastore.DB, store erasure.ShardStore, o Options) (*Partition, error) {
	o.DefragPieces = 0 // its rewrites would be ops outside the replicated stream
	p, err := openPartition(ctx, pkey, meta, store, o, false)
	if err != nil {
		return nil, err
	}
	guard := idleGuard
	p.failed.Store(&guard)
	p.replicated = true
	p.keep.Store(0) // Replica.Background says which segments may go
	return p, nil
}

// OpenReplica starts driving partition p (opened with OpenReplicaPartition,
// and not driven by another Replica) as a secondary: its Core is recovered
// from the hard state and the journal (see the rules at the top of this
// file). Close stops it; closing p is the caller's, after that.
func OpenReplica(ctx context.Context, p *Partition, cfg ReplicaConfig) (*Replica, error) {
	c := cfg.Core
	if c.ID == "" || c.Control == "" || cfg.Send == nil {
		return nil, fmt.Errorf("replica: OpenReplica needs Core.ID, Core.Control and Send")
	}
	if cfg.Tick <= 0 {
		cfg.Tick = DefaultTick
	}
	if cfg.QueueLen <= 0 {
		cfg.QueueLen = DefaultQueueLen
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Hard.Load == nil || cfg.Hard.Save == nil {
		cfg.Hard = FileHardStore(p.opts.FS, p.opts.Dir)
	}
	r := &Replica{cfg: cfg, p: p, in: make(chan *wire.Msg, cfg.QueueLen), reqs: make(chan *request, maxBatch),
		kick: make(chan struct{}, 1),
		stop: make(chan struct{}), done: make(chan struct{}),
		persistKick: make(chan struct{}, 1), persistDone: make(chan struct{}),
		readers: make(chan struct{}, maxRemoteReaders),
		waiting: make(map[uint64]*request), pending: make(map[uint64][]byte),
		stash: make(map[noteKey][]byte), fresh: make(map[api.OpNum][]byte), senders: make(map[api.NodeID]*snapSender)}
	if cfg.SnapshotRate == 0 {
		r.cfg.SnapshotRate = DefaultSnapshotRate
	}
	r.log = cfg.Logger.With("replica", c.ID, "partition", c.Partition)
	r.reqBase.Store(rand.Uint64())
	active := fmt.Errorf("%w (Replica %s)", ErrReplicated, c.ID)
	r.active = &active
	cur := p.failed.Load()
	if cur == nil || *cur != idleGuard || !p.failed.CompareAndSwap(cur, r.active) {
		return nil, fmt.Errorf("%w: partition %016x was not opened with OpenReplicaPartition, or has a Replica",
			ErrReplicated, p.pkey)
	}
	wiped, err := wipeIfMarked(p)
	if wiped {
		r.log.Warn("a snapshot install did not finish: the partition was emptied", "err", err)
	}
	var st Storage
	if err == nil {
		st, err = r.recover(ctx)
	}
	if err == nil {
		st.Hard, err = cfg.Hard.Load()
	}
	if err != nil {
		p.failed.CompareAndSwap(r.active, cur)
		return nil, fmt.Errorf("replica: open replica %s of partition %016x: %w", c.ID, p.pkey, err)
	}
	r.core = NewCore(c, st)
	p.syncJournal = r.SyncJournal
	r.publish()
	r.log.Info("replica open", "epoch", st.Hard.Epoch, "applied", st.SnapIndex, "notes", len(st.Entries))
	go r.run()
	go r.persist()
	return r, nil
}

// PersistEvery is how many applied ops make a Replica persist its extent
// map (also once a second when anything was applied).
const PersistEvery = 1024

// persist is the persister goroutine: it commits the map's pending updates
// to Pebble when run kicks it, and a last time at Close. A Pebble commit
// that waits for a memtable flush stalls only this goroutine.
func (r *Replica) persist() {
	defer close(r.persistDone)
	for {
		select {
		case <-r.persistKick:
		case <-r.done:
			return // Partition.Close persists the rest
		}
		if err := r.p.Persist(); err != nil {
			r.log.Warn("persist extent map", "err", err) // the journal has every op
		}
	}
}

// kickPersist wakes the persister without blocking.
func (r *Replica) kickPersist() {
	r.sinceKick, r.kicked = 0, time.Now()
	select {
	case r.persistKick <- struct{}{}:
	default:
	}
}

// recover builds the Core's Storage from the partition: the applied opnum
// is the snapshot, the journal's records after it are the log.
func (r *Replica) recover(ctx context.Context) (Storage, error) {
	p := r.p
	p.mu.Lock()
	applied := api.OpNum(p.mu.applied)
	p.mu.Unlock()
	st := Storage{SnapIndex: applied, Seen: make(map[uint64]api.OpNum)}
	r.base, r.applied = applied+1, applied
	// The last MaxSeen ops before the snapshot give its request ids (opnums
	// are dense) and its epoch.
	from := api.OpNum(0)
	if applied > MaxSeen {
		from = applied - MaxSeen
	}
	foundSnap := applied == 0
	err := p.j.Replay(uint64(from), func(rec *journal.Record, pos journal.Pos) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		e, err := entryOf(rec)
		if err != nil {
			return err
		}
		if e.OpNum <= applied {
			if e.ReqID != 0 {
				st.Seen[e.ReqID] = e.OpNum
			}
			if e.OpNum == applied {
				st.SnapEpoch, foundSnap = e.Epoch, true
			}
			return nil
		}
		if want := applied + api.OpNum(len(st.Entries)) + 1; e.OpNum != want {
			return fmt.Errorf("%w: journal note %d where %d was expected", journal.ErrCorrupt, e.OpNum, want)
		}
		st.Entries = append(st.Entries, e)
		r.pos = append(r.pos, pos)
		return nil
	})
	if err != nil {
		return st, err
	}
	if !foundSnap {
		// Only a journal from before replication (its segments reclaimed)
		// lacks it; appends then need a snapshot at the first conflict.
		r.log.Warn("journal lacks the applied op: its epoch is unknown", "applied", applied)
	}
	return st, nil
}

// noteAux is the aux payload of every note a Replica writes:
//
//	+-----------+----------------+-----------------------+
//	| tag u8=2  | wire kind u8   | request id u64 (BE)   |
//	+-----------+----------------+-----------------------+
//
// (tag 1 is the partition's relocation record.)
const (
	noteTag    = 2
	noteAuxLen = 10
)

func appendNoteAux(b []byte, k wire.Kind, reqID uint64) []byte {
	b = append(b, noteTag, byte(k))
	return binary.BigEndian.AppendUint64(b, reqID)
}

// entryOf returns the log entry a journal record holds, without its data.
// Records without note aux are ops of an unreplicated partition (epoch 1).
func entryOf(rec *journal.Record) (wire.Entry, error) {
	e := wire.Entry{Epoch: api.Epoch(rec.Epoch), OpNum: api.OpNum(rec.OpNum), Off: rec.Off, Len: rec.Len}
	aux := rec.Aux
	switch {
	case len(aux) == noteAuxLen && aux[0] == noteTag:
		e.Kind = wire.Kind(aux[1])
		e.ReqID = binary.BigEndian.Uint64(aux[2:])
	case len(aux) == 0 && rec.Kind == journal.KindWrite:
		e.Kind = wire.KindWrite
	case len(aux) == 0 && rec.Kind == journal.KindZero:
		e.Kind = wire.KindZero
	case len(aux) == 0 && rec.Kind == journal.KindTrim:
		e.Kind = wire.KindTrim
	default:
		return e, fmt.Errorf("%w: op %d (%v) is not a replicated note", journal.ErrCorrupt, rec.OpNum, rec.Kind)
	}
	if jk, ok := journalKind(e.Kind); !ok || jk != rec.Kind {
		return e, fmt.Errorf("%w: op %d: note of kind %v in a %v record", journal.ErrCorrupt, rec.OpNum, e.Kind, rec.Kind)
	}
	return e, nil
}

// journalKind is the journal record kind of an entry kind.
func journalKind(k wire.Kind) (journal.Kind, bool) {
	switch k {
	case wire.KindWrite:
		return journal.KindWrite, true
	case wire.KindZero:
		return journal.KindZero, true
	case wire.KindTrim:
		return journal.KindTrim, true
	case wire.KindFlush, wire.KindRead, wire.KindNoop:
		return journal.KindMeta, true
	}
	return 0, false
}

// Deliver hands the Replica a message from the transport: past
// ReplicaConfig.QueueLen waiting messages it drops (the protocol
// retransmits). The message and its Data become the Replica's. It does
// not wait for the Replica's goroutine, but when nobody drives the Replica
// it does the work the message brings on the caller's goroutine (serve),
// as run would: journal writes and sends, and when the batch holds one, an
// fsync, a hard state save or a snapshot install (which waits for a
// running Background).
func (r *Replica) Deliver(m *wire.Msg) {
	select {
	case r.in <- m:
		if shallow(m, r.backlog.Load()) {
			r.nudge()
		} else {
			r.kickRun()
		}
	default:
		r.dropped.Add(1)
	}
}

// nudge serves the queues on the caller's goroutine if nobody holds the
// loop, else kicks run (the holder may be past its last look at them).
func (r *Replica) nudge() {
	if !r.loop.TryLock() {
		r.kickRun()
		return
	}
	if !r.shut {
		r.serve()
	}
	r.loop.Unlock()
}

// shallow reports whether m comes from a pipeline at about queue depth 1,
// where serving it inline saves goroutine switches: an Append with at most
// one entry past its primary's commit index, or anything else (a request,
// an ack) while at most one entry of this replica's log is uncommitted
// (backlog). A deeper pipeline goes to run, which takes what piled up
// meanwhile in one batch (one journal write, one Append or ack for many
// ops): serving each message inline costs more there (4k random writes
// at queue depth 32 on a 2-node cluster: 8.0-8.6k IOPS with every message
// inline, 10.9-11.4k through run). A client call (do) serves inline only
// with nothing uncommitted.
func shallow(m *wire.Msg, backlog uint64) bool {
	if m.Type == wire.TypeAppend {
		n := len(m.Entries)
		return n == 0 || n == 1 && m.Entries[0].OpNum <= m.Commit+1
	}
	return backlog <= 1
}

// kickRun wakes run to serve the queues.
func (r *Replica) kickRun() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// SyncJournal makes the partition's journal durable. Call it, not
// Partition.Sync, from the metastore's BeforeFlush hook while the Replica
// runs (it must not overlap a journal truncation).
func (r *Replica) SyncJournal(ctx context.Context) error {
	r.cutMu.RLock()
	defer r.cutMu.RUnlock()
	return r.p.Sync(ctx)
}

// Background is the partition's background work while the Replica runs:
// Partition.Flush (journal data into shards when over budget or idle, then
// reclaim), with the moves recorded straight into the extent map (not as
// ops: opnums are the Core's) and no journal segment removed that holds
// an op the Core's log still has (a lagging peer's appends read it) or
// one of the last MaxSeen ops before the persisted map (a restart reads
// their request ids and the applied op's epoch). Run it from one
// goroutine at a time, never from the metastore's BeforeFlush hook.
func (r *Replica) Background(ctx context.Context, force bool) (FlushResult, error) {
	if err := r.Err(); err != nil {
		return FlushResult{}, err
	}
	if !r.bgMu.TryLock() {
		return FlushResult{}, nil // a snapshot transfer or install holds it: next time
	}
	defer r.bgMu.Unlock()
	// The map as of now goes to Pebble first (Flush makes it durable
	// before it removes anything), so keep counts from it.
	if err := r.p.Persist(); err != nil {
		return FlushResult{}, err
	}
	keep := api.OpNum(r.snapIndex.Load())
	if per := api.OpNum(r.p.m.Persisted()); per > seenKeep {
		keep = min(keep, per-seenKeep-1)
	} else {
		keep = 0
	}
	r.p.keep.Store(uint64(keep))
	return r.p.Flush(ctx, force)
}

// Status returns the Replica's state as of its goroutine's last loop.
func (r *Replica) Status() ReplicaStatus {
	s := *r.status.Load()
	s.Dropped = r.dropped.Load()
	if err := r.failed.Load(); err != nil {
		s.Err = *err
	}
	return s
}

// Err returns the failure that stopped the Replica, or nil.
func (r *Replica) Err() error {
	if err := r.failed.Load(); err != nil {
		return *err
	}
	return nil
}

// Close stops the Replica's goroutine and fails the ops still waiting with
// ErrReplicaClosed (remote clients' ops are not answered: their attempts
// time out). The partition stays open (close it after). Ops that were
// already noted or committed stay in the journal.
func (r *Replica) Close() error {
	r.once.Do(func() { close(r.stop) })
	<-r.done
	<-r.persistDone
	r.replies.Wait()
	r.p.failed.CompareAndSwap(r.active, &idleGuard)
	return nil
}

// Write writes data at off (bytes within the partition) once the write is
// committed; with fua, it also waits for it to be durable on every in-sync
// replica (a flush). data is copied.
func (r *Replica) Write(ctx context.Context, data []byte, off int64, fua bool) error {
	if _, err := r.do(ctx, wire.KindWrite, off, int64(len(data)), bytes.Clone(data)); err != nil {
		return err
	}
	if fua {
		return r.Flush(ctx)
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeros.
func (r *Replica) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if _, err := r.do(ctx, wire.KindZero, off, n, nil); err != nil {
		return err
	}
	if fua {
		return r.Flush(ctx)
	}
	return nil
}

// Trim discards [off, off+n) (it reads as zeros after).
func (r *Replica) Trim(ctx context.Context, off, n int64) error {
	_, err := r.do(ctx, wire.KindTrim, off, n, nil)
	return err
}

// Flush returns once every op completed before it is durable on this
// replica and every in-sync peer.
func (r *Replica) Flush(ctx context.Context) error {
	_, err := r.do(ctx, wire.KindFlush, 0, 0, nil)
	return err
}

// ReadAt fills buf from off with the partition's committed state as of a
// read op that went through the log (so no later epoch had committed
// anything when it did): linearizable.
func (r *Replica) ReadAt(ctx context.Context, buf []byte, off int64) error {
	if _, err := r.do(ctx, wire.KindRead, off, int64(len(buf)), nil); err != nil {
		return err
	}
	return r.p.ReadAt(ctx, buf, off)
}

// do submits one request and waits for its completion. An error is ctx's,
// ErrReplicaClosed, ErrReplicaFailed, or the Core's (ErrNotPrimary,
// ErrStepDown), wrapped with the facts.
func (r *Replica) do(ctx context.Context, kind wire.Kind, off, n int64, data []byte) (Completion, error) {
	id := r.reqBase.Add(1)
	if id == 0 {
		id = r.reqBase.Add(1)
	}
	q := &request{id: id, kind: kind, off: off, len: n, data: data, done: make(chan Completion, 1)}
	select {
	case r.reqs <- q:
		if r.backlog.Load() == 0 {
			r.nudge()
		} else {
			r.kickRun()
		}
	case <-ctx.Done():
		return Completion{}, ctx.Err()
	case <-r.done:
		return Completion{}, r.closedErr()
	}
	select {
	case c := <-q.done:
		if c.Err != nil {
			return c, fmt.Errorf("replica %s partition %d %s [%d,+%d): %w", r.cfg.Core.ID, r.cfg.Core.Partition, kind, off, n, c.Err)
		}
		return c, nil
	case <-ctx.Done():
		return Completion{}, ctx.Err() // the op may still complete
	case <-r.done:
		// run answered every waiter before it returned.
		select {
		case c := <-q.done:
			if c.Err != nil {
				return c, fmt.Errorf("replica %s partition %d %s [%d,+%d): %w", r.cfg.Core.ID, r.cfg.Core.Partition, kind, off, n, c.Err)
			}
			return c, nil
		default:
			return Completion{}, r.closedErr()
		}
	}
}

func (r *Replica) closedErr() error {
	if err := r.Err(); err != nil {
		return err
	}
	return ErrReplicaClosed
}

// run is the Replica's goroutine: it ticks the Core, serves the queues
// when an inline caller could not (kick), and shuts the Core down at
// Close.
func (r *Replica) run() {
	defer close(r.done)
	t := time.NewTicker(r.cfg.Tick)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			r.loop.Lock()
			r.shutdown()
			r.shut = true
			r.loop.Unlock()
			return
		case <-r.kick:
			r.loop.Lock()
			r.serve()
			r.loop.Unlock()
		case <-t.C:
			r.loop.Lock()
			// A Tick ends a batch (see serve): it gets a Ready of its own.
			if r.failed.Load() == nil {
				r.core.Tick()
			}
			if r.sinceKick > 0 && time.Since(r.kicked) >= time.Second {
				r.kickPersist()
			}
			r.drain()
			r.loop.Unlock()
		}
	}
}

// maxBatch bounds the queued items one serve takes (and the requests
// waiting in reqs).
const maxBatch = 256

// serve takes what waits in the queues, in order, up to maxBatch items,
// so that one Ready (one fsync) serves many ops, then does the Readies; if
// more waits after that, it kicks run rather than keep an inline caller.
// A Promote ends the batch (as a Tick does in run): each sets the Core's
// heartbeat flag, which only a primary's Ready clears, and a later message
// in the same batch could make it step down with the flag set — HasReady
// would then stay true for ever (the Core's stepDown does not clear it).
// REQUIRES: r.loop held, !r.shut.
func (r *Replica) serve() {
	for i, more := 0, true; more && i < maxBatch; i++ {
		select {
		case m := <-r.in:
			more = r.step(m)
		case q := <-r.reqs:
			r.request(q)
		default:
			more = false
		}
	}
	r.drain()
	if len(r.in) > 0 || len(r.reqs) > 0 {
		r.kickRun()
	}
}

// maxReadyLoop bounds the Readies done in a row: a Core whose HasReady
// never turns false must not keep run from Close and from new messages.
const maxReadyLoop = 4096

// drain does Readies while the Core has any.
func (r *Replica) drain() {
	for i := 0; r.failed.Load() == nil && r.core.HasReady(); i++ {
		if i == maxReadyLoop {
			if time.Since(r.loopLog) >= time.Second {
				r.loopLog = time.Now()
				r.log.Error("replica: the core keeps having Ready work; back to the event loop", "core", r.core.String())
			}
			break
		}
		if err := r.ready(); err != nil {
			r.fail(err)
		}
	}
	clear(r.stash)
	r.compact()
	if r.sinceKick >= PersistEvery {
		r.kickPersist()
	}
	r.publish()
}

// Log compaction: the Core's log (and pos) keeps at most about
// compactAbove entries; past that it forgets all but the last compactKeep
// applied ones, and none a catching-up peer still needs while the log is
// under compactLimit. A peer that needs a forgotten entry gets a snapshot.
// (Reads are log entries too.)
// (Variables for tests.) seenKeep is how many ops before the persisted
// map Background keeps in the journal for a restart (MaxSeen: their
// request ids, and the applied op's epoch).
var (
	compactKeep  api.OpNum = 1 << 16
	compactAbove api.OpNum = 1 << 17
	compactLimit api.OpNum = 1 << 20 // entries kept for peers catching up, at most
	seenKeep     api.OpNum = MaxSeen
)

func (r *Replica) compact() {
	n := r.core.LastIndex() + 1 - r.base
	if r.failed.Load() != nil || n < compactAbove || r.applied < compactKeep {
		return
	}
	upTo := r.applied - compactKeep
	// A peer catching up (by appends, or by a snapshot transfer under
	// way) keeps the entries it still needs, unless the log grows past
	// compactLimit: compacting them away would only make it start over
	// with a new snapshot.
	if n < compactLimit {
		for _, p := range r.core.Progress() {
			if !p.InSync && !p.NeedSnap {
				upTo = min(upTo, p.Match)
			}
		}
		for _, s := range r.senders {
			select {
			case <-s.done:
			default:
				upTo = min(upTo, s.index)
			}
		}
	}
	r.core.Compact(upTo)
	if upTo := r.core.SnapIndex(); upTo >= r.base {
		r.pos = append(r.pos[:0:0], r.pos[upTo+1-r.base:]...)
		r.base = upTo + 1
	}
}

func (r *Replica) publish() {
	c := r.core
	r.backlog.Store(uint64(c.LastIndex() - min(c.Commit(), c.LastIndex())))
	r.snapIndex.Store(uint64(c.SnapIndex()))
	r.status.Store(&ReplicaStatus{Role: c.Role(), Epoch: c.Epoch(), Primary: c.Primary(), Commit: c.Commit(),
		Applied: r.applied, Last: c.LastIndex(), InSync: c.InSync(), Peers: c.Progress(), Blessed: c.Blessed()})
}

// fail stops driving the Core: the partition may now disagree with it.
func (r *Replica) fail(err error) {
	err = fmt.Errorf("%w: %s partition %016x: %w", ErrReplicaFailed, r.cfg.Core.ID, r.p.pkey, err)
	if !r.failed.CompareAndSwap(nil, &err) {
		return
	}
	r.log.Error("replica failed; reopen the partition", "err", err)
	r.p.failed.Store(&err)
	for id, q := range r.waiting {
		q.done <- Completion{ReqID: id, Kind: q.kind, Err: err}
	}
	clear(r.waiting)
	clear(r.pending)
}

func (r *Replica) shutdown() {
	r.dropStaged()
	r.dropObjects(r.installing)
	r.installing = nil
	for id, q := range r.waiting {
		q.done <- Completion{ReqID: id, Kind: q.kind, Err: ErrReplicaClosed}
	}
	clear(r.waiting)
	clear(r.pending)
}

// step feeds a message to the Core. It returns false after a Promote (see
// run).
func (r *Replica) step(m *wire.Msg) bool {
	if m.Type == wire.TypeRequest {
		r.remoteRequest(m)
		return true
	}
	if r.failed.Load() != nil {
		return true
	}
	switch m.Type {
	case wire.TypeSnapChunk:
		r.snapChunk(m)
		return true
	case wire.TypeSnapAck:
		r.snapAck(m)
		return true
	case wire.TypeSnapshot:
		if !r.snapshotReady(m) {
			r.logSnapshot("snapshot without its staged parts dropped", m)
			return true
		}
		r.stepFinal()
	case wire.TypeAppend:
		if st := r.staged; st != nil && m.Epoch == st.epoch && !st.done {
			return true // a transfer from this primary is under way (see snapshot.go)
		}
		for i := range m.Entries {
			if e := &m.Entries[i]; e.Kind == wire.KindWrite {
				r.stash[noteKey{e.Epoch, e.OpNum}] = e.Data
				e.Data = nil
			}
		}
	}
	if err := r.core.Step(*m); err != nil {
		r.log.Debug("message ignored", "msg", m.String(), "err", err)
	}
	return m.Type != wire.TypePromote
}

// maxRemoteReaders bounds the reader goroutines answering remote reads.
const maxRemoteReaders = 8

// remoteRequest steps a remote client's Request into the Core (see Remote
// clients at the top of this file).
func (r *Replica) remoteRequest(m *wire.Msg) {
	if m.From == "" || m.Partition != r.cfg.Core.Partition {
		r.log.Debug("request dropped: no client or another partition", "msg", m.String())
		return
	}
	if r.failed.Load() != nil {
		r.reject(m.From, m.ReqID, m.Kind, RejectUnavailable)
		return
	}
	if err := checkRemote(m, r.cfg.Size); err != nil {
		r.log.Debug("request refused", "msg", m.String(), "err", err)
		r.reject(m.From, m.ReqID, m.Kind, RejectInvalid)
		return
	}
	if _, ok := r.pending[m.ReqID]; !ok && m.Kind == wire.KindWrite {
		r.pending[m.ReqID] = m.Data
	}
	m.Data = nil
	if err := r.core.Step(*m); err != nil {
		panic(fmt.Sprintf("replica: checked request refused: %v", err)) // our partition, a Request
	}
}

// checkRemote checks what the Core and the extent map take on trust.
func checkRemote(m *wire.Msg, size int64) error {
	switch m.Kind {
	case wire.KindFlush:
		return nil
	case wire.KindWrite, wire.KindZero, wire.KindTrim, wire.KindRead:
	default:
		return fmt.Errorf("%w: request of kind %v", ErrInvalidRequest, m.Kind)
	}
	if m.Off < 0 || m.Len <= 0 || m.Off > math.MaxInt64-m.Len ||
		(m.Len > wire.MaxData && (m.Kind == wire.KindWrite || m.Kind == wire.KindRead)) {
		return fmt.Errorf("%w: %v [%d,+%d)", ErrInvalidRequest, m.Kind, m.Off, m.Len)
	}
	if size > 0 && m.Off+m.Len > size {
		return fmt.Errorf("%w: %v [%d,+%d) past the partition's %d bytes", ErrInvalidRequest, m.Kind, m.Off, m.Len, size)
	}
	if (m.Kind == wire.KindWrite) != (len(m.Data) > 0) || (m.Kind == wire.KindWrite && int64(len(m.Data)) != m.Len) {
		return fmt.Errorf("%w: %v of %d bytes carries %d", ErrInvalidRequest, m.Kind, m.Len, len(m.Data))
	}
	return nil
}

// answer sends the Reply for a remote client's Completion.
func (r *Replica) answer(c Completion) {
	if c.Client == "" {
		return
	}
	if c.Err != nil {
		reason := RejectUnavailable
		switch {
		case errors.Is(c.Err, ErrNotPrimary):
			reason = RejectNotPrimary
		case errors.Is(c.Err, ErrStepDown):
			reason = RejectStepDown
		}
		r.reject(c.Client, c.ReqID, c.Kind, reason)
		return
	}
	m := &wire.Msg{Type: wire.TypeReply, Kind: c.Kind, Epoch: r.core.Epoch(), Partition: r.cfg.Core.Partition,
		ReqID: c.ReqID, From: r.cfg.Core.ID, To: c.Client, Index: c.OpNum}
	if c.Kind != wire.KindRead {
		r.cfg.Send(m)
		return
	}
	read := func() {
		buf := make([]byte, c.Len)
		if err := r.p.ReadAt(context.Background(), buf, c.Off); err != nil {
			r.log.Warn("remote read failed", "client", c.Client, "op", c.OpNum, "off", c.Off, "len", c.Len, "err", err)
			m.Flags, m.Index, m.Data = wire.FlagReject, 0, []byte{byte(RejectIO)}
		} else {
			m.Data = buf
		}
		r.cfg.Send(m)
	}
	select {
	case r.readers <- struct{}{}:
		r.replies.Add(1)
		go func() {
			defer r.replies.Done()
			defer func() { <-r.readers }()
			read()
		}()
	default:
		read() // every reader busy: this one waits here (backpressure)
	}
}

// reject sends a Reply with FlagReject and reason, hinting the primary this
// replica knows of.
func (r *Replica) reject(to api.NodeID, reqID uint64, kind wire.Kind, reason RejectReason) {
	m := &wire.Msg{Type: wire.TypeReply, Flags: wire.FlagReject, Kind: kind, Epoch: r.core.Epoch(),
		Partition: r.cfg.Core.Partition, ReqID: reqID, From: r.cfg.Core.ID, To: to, Data: []byte{byte(reason)}}
	if p := r.core.Primary(); p != "" {
		m.Peers = []api.NodeID{p}
	}
	r.cfg.Send(m)
}

func (r *Replica) logSnapshot(what string, m *wire.Msg) {
	if time.Since(r.snapLog) < time.Second {
		return
	}
	r.snapLog = time.Now()
	r.log.Warn(what, "msg", m.String())
}

func (r *Replica) request(q *request) {
	if err := r.failed.Load(); err != nil {
		q.done <- Completion{ReqID: q.id, Kind: q.kind, Err: *err}
		return
	}
	m := wire.Msg{Type: wire.TypeRequest, Kind: q.kind, Epoch: r.core.Epoch(), Partition: r.cfg.Core.Partition,
		ReqID: q.id, From: r.cfg.Core.ID, To: r.cfg.Core.ID, Off: q.off, Len: q.len}
	if q.kind == wire.KindWrite {
		r.pending[q.id] = q.data
	}
	r.waiting[q.id] = q
	if err := r.core.Step(m); err != nil {
		panic(fmt.Sprintf("replica: local request refused: %v", err)) // our own partition and type
	}
}

// ready does one Ready, in the order the Core's contract requires.
func (r *Replica) ready() error {
	rd := r.core.Ready()
	if rd.Hard != nil {
		if err := r.cfg.Hard.Save(*rd.Hard); err != nil {
			return fmt.Errorf("save hard state: %w", err)
		}
	}
	if rd.Snapshot != nil {
		// Only a Snapshot message that ends a staged transfer reaches the
		// Core (step), so the state is here to install.
		if err := r.install(rd.Snapshot); err != nil {
			return err
		}
	}
	if t := rd.TruncateFrom; t != 0 {
		if err := r.truncate(t); err != nil {
			return err
		}
	}
	if len(rd.Entries) > 0 {
		if err := r.note(rd.Entries); err != nil {
			return err
		}
	}
	if rd.Sync {
		if err := r.p.j.Sync(context.Background()); err != nil {
			return fmt.Errorf("journal sync: %w", err)
		}
	}
	if len(rd.Committed) > 0 {
		if err := r.apply(rd.Committed); err != nil {
			return err
		}
	}
	for _, c := range rd.Done {
		delete(r.pending, c.ReqID)
		if q := r.waiting[c.ReqID]; q != nil && c.Client == r.cfg.Core.ID {
			delete(r.waiting, c.ReqID)
			q.done <- c
			continue
		}
		r.answer(c)
	}
	for i := range rd.Messages {
		m := &rd.Messages[i]
		switch m.Type {
		case wire.TypeSnapshot:
			r.startSnapshot(m)
			continue
		case wire.TypeAppend:
			if err := r.fill(m); err != nil {
				return err
			}
		}
		r.cfg.Send(m)
	}
	clear(r.fresh)
	r.core.Advance(rd)
	return nil
}

// truncate drops the notes from opnum t on, durably.
func (r *Replica) truncate(t api.OpNum) error {
	if t <= r.applied {
		panic(fmt.Sprintf("replica: %s truncating from %d, applied %d", r.cfg.Core.ID, t, r.applied))
	}
	r.cutMu.Lock()
	err := r.p.j.TruncateFrom(uint64(t))
	r.cutMu.Unlock()
	if err != nil {
		return fmt.Errorf("truncate journal from %d: %w", t, err)
	}
	if k := int(t - r.base); k < len(r.pos) {
		r.pos = r.pos[:k]
	}
	r.p.seq.Lock()
	r.p.seq.next = uint64(t)
	r.p.seq.Unlock()
	return nil
}

// note appends entries ents, in order, to the journal as notes (records
// that follow each other in a segment in one write call).
func (r *Replica) note(ents []wire.Entry) error {
	const auxLen = 10 // appendNoteAux
	if cap(r.scratch) < auxLen*len(ents) {
		r.scratch = make([]byte, 0, auxLen*len(ents))
	}
	aux := r.scratch[:0]
	recs := r.recs[:0]
	for i := range ents {
		e := &ents[i]
		if want := r.base + api.OpNum(len(r.pos)+i); e.OpNum != want {
			panic(fmt.Sprintf("replica: %s noting opnum %d, journal ends before %d", r.cfg.Core.ID, e.OpNum, want))
		}
		jk, ok := journalKind(e.Kind)
		if !ok {
			return fmt.Errorf("op %d: entry of kind %v", e.OpNum, e.Kind)
		}
		at := len(aux)
		aux = appendNoteAux(aux, e.Kind, e.ReqID) // within cap: earlier records' aux stays put
		rec := &journal.Record{Kind: jk, Epoch: uint64(e.Epoch), OpNum: uint64(e.OpNum), Off: e.Off, Len: e.Len, Aux: aux[at:len(aux):len(aux)]}
		if jk == journal.KindWrite {
			data, ok := r.stash[noteKey{e.Epoch, e.OpNum}]
			if !ok {
				data, ok = r.pending[e.ReqID]
			}
			if !ok && e.Len > 0 {
				panic(fmt.Sprintf("replica: %s has no data for write op %d (epoch %d, request %d)", r.cfg.Core.ID, e.OpNum, e.Epoch, e.ReqID))
			}
			if int64(len(data)) != e.Len {
				return fmt.Errorf("op %d: write of %d bytes carries %d", e.OpNum, e.Len, len(data))
			}
			rec.Data = data
			r.fresh[e.OpNum] = data
			delete(r.pending, e.ReqID)
		}
		recs = append(recs, rec)
	}
	r.recs = recs
	n := len(r.pos)
	var err error
	r.pos, err = r.p.j.AppendBatch(recs, r.pos)
	clear(recs)
	if len(r.pos) > n {
		r.p.seq.Lock()
		r.p.seq.next = uint64(ents[len(r.pos)-n-1].OpNum) + 1
		r.p.seq.Unlock()
	}
	if err != nil {
		return fmt.Errorf("journal append op %d: %w", ents[len(r.pos)-n].OpNum, err)
	}
	return nil
}

// apply applies committed entries to the extent map, in order.
func (r *Replica) apply(ents []wire.Entry) error {
	p := r.p
	p.mu.Lock()
	defer p.mu.Unlock()
	wrote := false
	for i := range ents {
		e := &ents[i]
		if e.OpNum != r.applied+1 || e.OpNum < r.base {
			panic(fmt.Sprintf("replica: %s applying op %d after %d (journal from %d)", r.cfg.Core.ID, e.OpNum, r.applied, r.base))
		}
		var err error
		switch e.Kind {
		case wire.KindWrite, wire.KindZero, wire.KindTrim:
			wrote = true
			jk, _ := journalKind(e.Kind)
			rec := journal.Record{Kind: jk, OpNum: uint64(e.OpNum), Off: e.Off, Len: e.Len}
			err = p.applyLocked(&rec, r.pos[e.OpNum-r.base])
		default:
			// Nothing to map; the applied opnum still moves.
			err = p.m.Update().Commit(uint64(e.OpNum))
			if err == nil {
				p.mu.applied = uint64(e.OpNum)
			}
		}
		if err != nil {
			return fmt.Errorf("apply op %d: %w", e.OpNum, err)
		}
		r.applied = e.OpNum
		r.sinceKick++
	}
	now := time.Now().UnixNano()
	p.lastOpTime.Store(now)
	if wrote { // reads go through the log too; they leave the idle defragmentation be
		p.lastWrite.Store(now)
	}
	return nil
}

// fill gives the write entries of an outgoing Append their data: from the
// notes of this Ready, or from the journal.
func (r *Replica) fill(m *wire.Msg) error {
	for i := range m.Entries {
		e := &m.Entries[i] // the message's own copy of the entry
		if e.Kind != wire.KindWrite || e.Len == 0 {
			continue
		}
		if d, ok := r.fresh[e.OpNum]; ok {
			e.Data = d
			continue
		}
		d := make([]byte, e.Len)
		if err := r.p.j.ReadAt(d, r.pos[e.OpNum-r.base]); err != nil {
			return fmt.Errorf("read note %d for %s: %w", e.OpNum, m.To, err)
		}
		e.Data = d
	}
	return nil
}

// FileHardStore keeps a HardState in the file HARDSTATE of dir (the
// partition's journal directory by default), replaced atomically:
//
//	+-------------+-----------+----------------+---------+---------------+
//	| magic u32   | epoch u64 | primary len u8 | primary | crc32c u32    |
//	| "HSTR"      |           |                | bytes   | of all before |
//	+-------------+-----------+----------------+---------+---------------+
//
// (little-endian). Save writes HARDSTATE.tmp, fsyncs it, renames it over
// HARDSTATE and fsyncs dir.
func FileHardStore(fs vfs.FS, dir string) HardStore {
	name := fs.PathJoin(dir, "HARDSTATE")
	return HardStore{
		Load: func() (HardState, error) { return loadHard(fs, name) },
		Save: func(h HardState) error { return saveHard(fs, dir, name, h) },
	}
}

const hardMagic = 0x52545348 // "HSTR" little-endian

var errBadHard = errors.New("replica: bad hard state file")

func loadHard(fs vfs.FS, name string) (HardState, error) {
	f, err := fs.Open(name)
	if errors.Is(err, os.ErrNotExist) {
		return HardState{}, nil
	}
	if err != nil {
		return HardState{}, fmt.Errorf("replica: open %s: %w", name, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 1<<10))
	if err != nil {
		return HardState{}, fmt.Errorf("replica: read %s: %w", name, err)
	}
	if len(b) < 17 || binary.LittleEndian.Uint32(b) != hardMagic || int(b[12]) != len(b)-17 ||
		crc32.Checksum(b[:len(b)-4], castagnoli) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return HardState{}, fmt.Errorf("%w: %s", errBadHard, name)
	}
	return HardState{Epoch: api.Epoch(binary.LittleEndian.Uint64(b[4:])), Primary: api.NodeID(b[13 : len(b)-4])}, nil
}

func saveHard(fs vfs.FS, dir, name string, h HardState) error {
	if len(h.Primary) > 255 {
		return fmt.Errorf("replica: node id %q too long", h.Primary)
	}
	b := binary.LittleEndian.AppendUint32(nil, hardMagic)
	b = binary.LittleEndian.AppendUint64(b, uint64(h.Epoch))
	b = append(b, byte(len(h.Primary)))
	b = append(b, h.Primary...)
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	if err := replaceDurable(fs, dir, name, b); err != nil {
		return fmt.Errorf("replica: save hard state in %s: %w", name, err)
	}
	return nil
}

// replaceDurable replaces file name in dir with b, durably: it writes and
// fsyncs name.tmp, renames it over name and fsyncs dir.
func replaceDurable(fs vfs.FS, dir, name string, b []byte) error {
	tmp := name + ".tmp"
	f, err := fs.Create(tmp)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = fs.Rename(tmp, name)
	}
	if err != nil {
		return err
	}
	d, err := fs.OpenDir(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

package replica

// This file is the replication protocol of one partition as a pure state
// machine: Core. It does no I/O and reads no clock.
//
// # Driving a Core
//
//	for {
//	    select {
//	    case m := <-in:      c.Step(m)
//	    case <-ticker:       c.Tick()
//	    }
//	    if c.HasReady() {
//	        rd := c.Ready()
//	        persist rd.Hard (durably), install rd.Snapshot (durably),
//	        truncate the journal from rd.TruncateFrom, append rd.Entries,
//	        fsync if rd.Sync, apply rd.Committed in order, answer rd.Done,
//	        then send rd.Messages (filling Snapshot messages' Data with the
//	        state after applying Committed, which is the state at their Index)
//	        c.Advance(rd)
//	    }
//	}
//
// The order is the contract: nothing in Messages may leave before what
// comes earlier in Ready is done, because acks claim it.
//
// # Protocol (one partition; one primary per epoch, chosen by the control plane)
//
//   - Log. Every op has an opnum; an entry is identified by (epoch, opnum):
//     the primary of an epoch numbers each opnum at most once and never
//     truncates its own log. Two logs holding the same (epoch, opnum) hold
//     the same entries up to it (log matching; appends check PrevEpoch/PrevOp).
//   - Primary. Appends each client op as a note, sends it to every peer;
//     commits opnum N when its own journal has it and every replica of its
//     commit quorum acked it. The commit quorum is the in-sync set the
//     control plane granted plus the peers it asked to add (InSync pending)
//     and minus none it merely asked to drop (DropPeer pending): it is
//     always a superset of the set the control plane records, so every
//     replica the control plane could promote holds every committed op.
//     With no peer in its quorum it commits nothing unless it holds a solo
//     blessing for its epoch.
//   - Client ops complete (Ready.Done) only when committed. Reads go through
//     the log too (a KindRead entry): committing it proves that no later
//     epoch had committed anything, since every peer in the quorum acked it
//     at this epoch. FLUSH is a KindFlush entry that completes when it is
//     committed and fsynced on the primary and on every quorum peer.
//   - Secondary. Accepts appends of its epoch's primary whose (PrevEpoch,
//     PrevOp) matches its log; otherwise it rejects with a hint, and the
//     primary resends from there (or sends a snapshot: the whole state at
//     an opnum). It commits up to min(primary's commit, what it verified).
//     An ordinary snapshot never drops ops it acked in its epoch: when its
//     log holds the snapshot's op, it only moves the commit index.
//   - Snapshots wait for the noop. A primary sends none before its epoch's
//     noop commits (until then its commit index can be below what a peer
//     committed earlier: after a restart it is the checkpoint); a quorum
//     peer that needs one is dropped instead, and gets it after.
//   - Fencing. A message of a lower epoch is answered with Stale carrying
//     the higher one; anyone learning a higher epoch adopts it (durably,
//     Ready.Hard) and a primary steps down, failing its pending client ops
//     with ErrStepDown (retryable; ops are idempotent by request id).
//   - Peer loss. A quorum peer not heard from for PeerTimeoutTicks is asked
//     to be dropped (Control DropPeer); it stays in the quorum until the
//     grant. A peer that has caught up (acked everything in the primary's
//     log) is asked to be added (Control InSync) and counts in the quorum
//     from the moment of asking. Adding a peer releases the solo blessing.
//
// # Failover rule: adopt
//
// A replica promoted at epoch E keeps its whole log, including notes past
// its commit index, and appends a KindNoop entry at E. All of it commits
// once the quorum acks the noop. It must not truncate: every op the old
// primary committed (and so perhaps acknowledged) is in its log, since
// commit needed its ack, but it cannot tell which of its notes were
// committed. (A power loss of the promoted replica breaks this: committed
// ops it had not synced are gone from its log, and its state then replaces
// the peers' by a forced snapshot, see stepAppendResp. Flushed ops were
// synced on every quorum replica and survive.) Notes that other replicas
// hold beyond the new primary's log were never committed (commit needed
// the new primary's ack) and are
// truncated there: by the conflict check, and, once a secondary verified an
// entry of the current epoch, every later entry of an older epoch is
// dropped (the primary's log past its noop holds only current-epoch
// entries). A request id is therefore applied at most once: a retried op
// either finds its id in the new primary's log (and waits for it), or no
// copy of it survives anywhere that could later be adopted into a log the
// quorum verified.
//
// A replica that restarts comes back as a secondary; it never becomes
// primary again at an epoch it was primary of before the restart, because
// its journal may have lost notes it had numbered (power loss).

import (
	"cmp"
	"errors"
	"fmt"
	"slices"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica/wire"
)

// Errors of the core.
var (
	// ErrNotPrimary: the request reached a replica that is not the primary.
	ErrNotPrimary = errors.New("replica: not the primary")
	// ErrStepDown: the primary learned of a higher epoch before the op
	// completed; retry on the current primary (the op may or may not have
	// been applied; request ids make the retry idempotent).
	ErrStepDown = errors.New("replica: primary stepped down")
)

// maxAppendBytes bounds the write data of one Append (several entries; one
// larger entry goes alone), well under wire.MaxBody; maxInflightBytes the
// write data sent to a peer past its ack; maxCatchupBytes both, for a peer
// out of the commit quorum (catching up).
const (
	maxAppendBytes   = 16 << 20
	maxInflightBytes = 64 << 20
	maxCatchupBytes  = 4 << 20
)

// Role of a replica.
type Role uint8

// Roles.
const (
	RoleSecondary Role = iota
	RolePrimary
)

func (r Role) String() string {
	if r == RolePrimary {
		return "primary"
	}
	return "secondary"
}

// CoreConfig configures a Core.
type CoreConfig struct {
	ID        api.NodeID
	Partition api.PartitionID
	// Control is the address of the control plane in messages' To.
	Control api.NodeID
	// HeartbeatTicks between heartbeats (empty appends); 0: 1.
	HeartbeatTicks int
	// PeerTimeoutTicks without a reply before a quorum peer is asked to be
	// dropped; 0: 10.
	PeerTimeoutTicks int
	// RetryTicks between resends of a pending control request; 0: 5.
	RetryTicks int
	// MaxAppend entries per Append message; 0: 64.
	MaxAppend int
	// MaxInflight entries sent past a peer's ack; 0: 1024.
	MaxInflight int
}

// HardState is what a replica must persist durably when it changes
// (Ready.Hard), before sending anything.
type HardState struct {
	Epoch   api.Epoch
	Primary api.NodeID // the primary of Epoch, if known
}

// Snapshot is the whole state of a partition at an opnum: every op up to
// Index applied. Data is opaque to the core.
type Snapshot struct {
	Index api.OpNum
	Epoch api.Epoch // epoch of the op at Index
	Data  []byte
	Seen  map[uint64]api.OpNum // request ids applied, for Storage.Seen
}

// Storage is what a replica recovered from its disk at start.
type Storage struct {
	Hard HardState
	// SnapIndex/SnapEpoch: the state the driver recovered includes every op
	// up to SnapIndex (0 for none).
	SnapIndex api.OpNum
	SnapEpoch api.Epoch
	// Entries: the durable journal after SnapIndex, in opnum order.
	Entries []wire.Entry
	// Seen: the request ids of ops up to SnapIndex (Core.Seen at the
	// checkpoint, or Snapshot.Seen), so a retry is never applied twice.
	Seen map[uint64]api.OpNum
}

// Completion is the outcome of a client request.
type Completion struct {
	ReqID  uint64
	Client api.NodeID
	Kind   wire.Kind
	OpNum  api.OpNum // the op's opnum; for a read, read the state after it
	Off    int64
	Len    int64
	Err    error // nil, ErrNotPrimary or ErrStepDown
}

// Ready is the work a Core hands its driver, in the order it must be done.
type Ready struct {
	Hard         *HardState   // persist durably first
	Snapshot     *Snapshot    // install durably: replaces the state and the whole log
	TruncateFrom api.OpNum    // if not 0: drop journal entries >= TruncateFrom
	Entries      []wire.Entry // append to the journal
	Sync         bool         // fsync the journal (all appended entries)
	Committed    []wire.Entry // apply in order: now readable
	Done         []Completion // answer the clients
	Messages     []wire.Msg   // send last
}

type waiter struct {
	reqID  uint64
	client api.NodeID
	kind   wire.Kind
	off    int64
	len    int64
}

type progress struct {
	match, next api.OpNum
	synced      api.OpNum
	lastHeard   int
	needSnap    bool
	forceSnap   bool   // its committed state is ahead of our log: replace it
	inSync      bool   // granted by the control plane
	joining     bool   // InSync asked: counts in the quorum
	dropping    bool   // DropPeer asked: still counts until granted
	inSyncSeq   uint64 // request id of the last InSync sent for it
	probing     bool   // after a reject: one append at a time until an ack
	probeSent   bool   // probing, and an append is out
}

func (p *progress) quorum() bool { return p.inSync || p.joining }

type ctlKey struct {
	kind wire.Kind
	peer api.NodeID
}

// ctlReq is a pending control request.
type ctlReq struct {
	sent  int    // tick it was last sent
	first uint64 // request id it was first sent with; 0: not sent yet
	seq   uint64 // request id it was last sent with
}

// Core is the replication state machine of one partition replica. Not safe
// for concurrent use: one driver goroutine owns it.
type Core struct {
	cfg CoreConfig

	epoch     api.Epoch
	primary   api.NodeID
	role      Role
	restarted api.Epoch // was primary of this epoch before a restart: never again
	hardDirty bool

	// Log: entries snapIndex+1 .. snapIndex+len(log).
	snapIndex api.OpNum
	snapEpoch api.Epoch
	log       []wire.Entry
	handed    api.OpNum // entries up to here were handed to the driver
	stable    api.OpNum // appended by the driver
	synced    api.OpNum // fsynced by the driver
	truncFrom api.OpNum // pending truncation for the next Ready
	snap      *Snapshot // pending install for the next Ready
	commit    api.OpNum
	applied   api.OpNum // handed in Committed
	ticks     int

	// Secondary.
	verified  api.OpNum // highest opnum known to match the primary's log
	syncWant  api.OpNum // fsync wanted up to here
	needAck   bool
	needSnap  bool // conflict below commit: only a snapshot repairs the log
	ackTo     api.NodeID
	heardFrom int

	// Primary.
	peers   map[api.NodeID]*progress
	order   []api.NodeID // peers in a fixed order (determinism)
	blessed bool
	noop    api.OpNum // opnum of this epoch's noop
	hbDue   bool
	ctl     map[ctlKey]*ctlReq
	ctlSeq  uint64               // request id of the last control request sent
	relSeq  uint64               // request id of the last InSync granted (it released any blessing)
	reqs    map[uint64]api.OpNum // request id -> opnum, of ops in the log or seen
	waiters map[api.OpNum][]waiter
	flushes []api.OpNum // flush entries pending sync, ascending

	// seen: request ids of applied ops (every role), the most recent
	// MaxSeen of them; seenQ is their order.
	seen  map[uint64]api.OpNum
	seenQ []uint64

	done []Completion
	msgs []wire.Msg
}

// MaxSeen is how many applied request ids a replica remembers: a client
// retry older than that could apply twice.
const MaxSeen = 1 << 16

// NewCore returns a replica recovered from st, as a secondary.
func NewCore(cfg CoreConfig, st Storage) *Core {
	if cfg.HeartbeatTicks <= 0 {
		cfg.HeartbeatTicks = 1
	}
	if cfg.PeerTimeoutTicks <= 0 {
		cfg.PeerTimeoutTicks = 10
	}
	if cfg.RetryTicks <= 0 {
		cfg.RetryTicks = 5
	}
	if cfg.MaxAppend <= 0 {
		cfg.MaxAppend = 64
	}
	if cfg.MaxInflight <= 0 {
		cfg.MaxInflight = 1024
	}
	c := &Core{cfg: cfg, epoch: st.Hard.Epoch, primary: st.Hard.Primary}
	if c.primary == cfg.ID {
		c.restarted = c.epoch
	}
	c.snapIndex, c.snapEpoch = st.SnapIndex, st.SnapEpoch
	c.log = slices.Clone(st.Entries)
	for i, e := range c.log {
		if e.OpNum != c.snapIndex+api.OpNum(i)+1 {
			panic(fmt.Sprintf("replica: recovered log has opnum %d at position %d after %d", e.OpNum, i, c.snapIndex))
		}
	}
	last := c.lastIndex()
	c.handed, c.stable, c.synced = last, last, last
	c.commit, c.applied = c.snapIndex, c.snapIndex
	c.seen = make(map[uint64]api.OpNum)
	for _, id := range sortedSeen(st.Seen) {
		c.see(id, st.Seen[id])
	}
	return c
}

func sortedSeen(m map[uint64]api.OpNum) []uint64 {
	ids := make([]uint64, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, func(a, b uint64) int {
		if m[a] != m[b] {
			return cmp.Compare(m[a], m[b])
		}
		return cmp.Compare(a, b)
	})
	return ids
}

func (c *Core) see(id uint64, n api.OpNum) {
	if id == 0 {
		return
	}
	if _, ok := c.seen[id]; !ok {
		c.seenQ = append(c.seenQ, id)
	}
	c.seen[id] = n
	for len(c.seenQ) > MaxSeen {
		delete(c.seen, c.seenQ[0])
		c.seenQ = c.seenQ[1:]
	}
}

// Seen returns the request ids of applied ops the replica remembers; a
// driver saves it with a checkpoint (Storage.Seen).
func (c *Core) Seen() map[uint64]api.OpNum {
	m := make(map[uint64]api.OpNum, len(c.seen))
	for k, v := range c.seen {
		m[k] = v
	}
	return m
}

// Epoch returns the replica's epoch.
func (c *Core) Epoch() api.Epoch { return c.epoch }

// Role returns the replica's role.
func (c *Core) Role() Role { return c.role }

// Primary returns the primary of the current epoch, if known.
func (c *Core) Primary() api.NodeID { return c.primary }

// Commit returns the commit index.
func (c *Core) Commit() api.OpNum { return c.commit }

// LastIndex returns the opnum of the last entry in the log.
func (c *Core) LastIndex() api.OpNum { return c.lastIndex() }

// InSync reports, on a primary, the peers in its commit quorum.
func (c *Core) InSync() []api.NodeID {
	var s []api.NodeID
	for _, id := range c.order {
		if c.peers[id].quorum() {
			s = append(s, id)
		}
	}
	return s
}

// PeerProgress is what a primary knows of one peer.
type PeerProgress struct {
	ID       api.NodeID
	Match    api.OpNum // the peer's log matches the primary's up to here
	Synced   api.OpNum // fsynced on the peer up to here
	InSync   bool      // in the commit quorum (granted, or asked for)
	NeedSnap bool      // only a snapshot can bring it up to date
}

// Progress reports, on a primary, every peer's progress, in the order of
// its promotion (nil on a secondary).
func (c *Core) Progress() []PeerProgress {
	if c.role != RolePrimary {
		return nil
	}
	out := make([]PeerProgress, 0, len(c.order))
	for _, id := range c.order {
		p := c.peers[id]
		out = append(out, PeerProgress{ID: id, Match: p.match, Synced: p.synced, InSync: p.quorum(), NeedSnap: p.needSnap})
	}
	return out
}

// Blessed reports whether a primary holds a solo blessing.
func (c *Core) Blessed() bool { return c.blessed }

// SnapIndex returns the opnum of the last entry compacted away (or of the
// snapshot the log starts after): the log holds the entries after it.
func (c *Core) SnapIndex() api.OpNum { return c.snapIndex }

func (c *Core) lastIndex() api.OpNum { return c.snapIndex + api.OpNum(len(c.log)) }

// term returns the epoch of the entry at i, and whether the log knows it.
func (c *Core) term(i api.OpNum) (api.Epoch, bool) {
	switch {
	case i == c.snapIndex:
		return c.snapEpoch, true
	case i < c.snapIndex || i > c.lastIndex():
		return 0, false
	}
	return c.log[i-c.snapIndex-1].Epoch, true
}

func (c *Core) entry(i api.OpNum) *wire.Entry { return &c.log[i-c.snapIndex-1] }

// entries returns a copy of the entries in [lo, hi].
func (c *Core) entries(lo, hi api.OpNum) []wire.Entry {
	if lo > hi {
		return nil
	}
	return slices.Clone(c.log[lo-c.snapIndex-1 : hi-c.snapIndex])
}

func (c *Core) send(m wire.Msg) {
	m.From = c.cfg.ID
	m.Partition = c.cfg.Partition
	if m.Epoch == 0 {
		m.Epoch = c.epoch
	}
	c.msgs = append(c.msgs, m)
}

// truncate drops entries >= i.
func (c *Core) truncate(i api.OpNum) {
	if i <= c.commit {
		panic(fmt.Sprintf("replica: %s truncating committed op %d (commit %d)", c.cfg.ID, i, c.commit))
	}
	c.log = c.log[:i-c.snapIndex-1]
	if c.truncFrom == 0 || i < c.truncFrom {
		if i <= c.handed {
			c.truncFrom = i
		}
	}
	c.handed = min(c.handed, i-1)
	c.stable = min(c.stable, i-1)
	c.synced = min(c.synced, i-1)
	c.verified = min(c.verified, i-1)
	c.syncWant = min(c.syncWant, i-1)
}

// setEpoch adopts a higher epoch: a primary steps down.
func (c *Core) setEpoch(e api.Epoch, primary api.NodeID) {
	if c.role == RolePrimary {
		c.stepDown()
	}
	c.epoch, c.primary, c.role = e, primary, RoleSecondary
	c.hardDirty = true
	c.verified = 0
	c.syncWant = 0
	c.needAck = false
}

func (c *Core) stepDown() {
	for _, n := range sortedKeys(c.waiters) {
		for _, w := range c.waiters[n] {
			c.complete(w, 0, ErrStepDown)
		}
	}
	c.waiters, c.peers, c.order, c.ctl, c.reqs, c.flushes = nil, nil, nil, nil, nil, nil
	c.blessed = false
	c.noop = 0
	c.hbDue = false // a heartbeat is a primary's; left set, HasReady would stay true
}

func (c *Core) complete(w waiter, n api.OpNum, err error) {
	c.done = append(c.done, Completion{ReqID: w.reqID, Client: w.client, Kind: w.kind, OpNum: n, Off: w.off, Len: w.len, Err: err})
}

// Step feeds one message to the replica. It returns an error only for a
// message that makes no sense (wrong partition, unknown type); the message
// is then ignored.
func (c *Core) Step(m wire.Msg) error {
	if m.Partition != c.cfg.Partition {
		return fmt.Errorf("replica: message for partition %d at partition %d", m.Partition, c.cfg.Partition)
	}
	switch m.Type {
	case wire.TypeRequest:
		c.stepRequest(&m)
		return nil
	case wire.TypePromote:
		c.stepPromote(&m)
		return nil
	case wire.TypeReply:
		return fmt.Errorf("replica: unexpected %s", m.Type)
	}
	// Fencing: every replica and control message carries an epoch.
	if m.Epoch < c.epoch {
		if m.Type != wire.TypeStale && m.Type != wire.TypeGrant {
			c.send(wire.Msg{Type: wire.TypeStale, To: m.From})
		}
		return nil
	}
	if m.Epoch > c.epoch {
		var p api.NodeID
		if m.Type == wire.TypeAppend || m.Type == wire.TypeSnapshot {
			p = m.From
		}
		c.setEpoch(m.Epoch, p)
	}
	switch m.Type {
	case wire.TypeAppend:
		c.stepAppend(&m)
	case wire.TypeSnapshot:
		c.stepSnapshot(&m)
	case wire.TypeAppendResp:
		c.stepAppendResp(&m)
	case wire.TypeGrant:
		c.stepGrant(&m)
	case wire.TypeStale:
		// Epoch adopted above.
	default:
		return fmt.Errorf("replica: unexpected %s", m.Type)
	}
	return nil
}

func (c *Core) stepRequest(m *wire.Msg) {
	w := waiter{reqID: m.ReqID, client: m.From, kind: m.Kind, off: m.Off, len: m.Len}
	if c.role != RolePrimary {
		c.complete(w, 0, ErrNotPrimary)
		return
	}
	switch m.Kind {
	case wire.KindWrite, wire.KindZero, wire.KindTrim, wire.KindFlush, wire.KindRead:
	default:
		return
	}
	if m.Epoch != c.epoch {
		// Sent for another epoch: perhaps a late copy of a request that a
		// retry already carried out. The client asks the control plane.
		c.complete(w, 0, ErrNotPrimary)
		return
	}
	if n, ok := c.reqs[m.ReqID]; ok {
		// A retry of an op already in the log or applied. A flush waits
		// for the fsyncs of everything up to its entry, even if applied.
		if n <= c.applied && m.Kind != wire.KindFlush {
			c.complete(w, n, nil)
			return
		}
		c.addWaiter(n, w)
		return
	}
	n := c.appendLocal(wire.Entry{Kind: m.Kind, ReqID: m.ReqID, Off: m.Off, Len: m.Len, Data: m.Data})
	c.addWaiter(n, w)
}

func (c *Core) addWaiter(n api.OpNum, w waiter) {
	if w.kind == wire.KindFlush {
		if i, ok := slices.BinarySearch(c.flushes, n); !ok {
			c.flushes = slices.Insert(c.flushes, i, n)
		}
	}
	c.waiters[n] = append(c.waiters[n], w)
}

// appendLocal numbers e as the primary's next op.
func (c *Core) appendLocal(e wire.Entry) api.OpNum {
	e.Epoch, e.OpNum = c.epoch, c.lastIndex()+1
	c.log = append(c.log, e)
	if e.ReqID != 0 {
		c.reqs[e.ReqID] = e.OpNum
	}
	return e.OpNum
}

func (c *Core) stepPromote(m *wire.Msg) {
	if m.Epoch < c.epoch || (m.Epoch == c.epoch && (c.primary != "" || c.restarted == m.Epoch)) {
		return // old, or a duplicate
	}
	c.setEpoch(m.Epoch, c.cfg.ID)
	c.role = RolePrimary
	c.peers = make(map[api.NodeID]*progress)
	c.order = nil
	c.ctl = make(map[ctlKey]*ctlReq)
	c.reqs = make(map[uint64]api.OpNum)
	c.waiters = make(map[api.OpNum][]waiter)
	for i, id := range m.Peers {
		if id == c.cfg.ID {
			continue
		}
		in := i < len(m.Data) && m.Data[i] != 0
		c.peers[id] = &progress{next: c.lastIndex() + 1, inSync: in, lastHeard: c.ticks}
		c.order = append(c.order, id)
	}
	for id, n := range c.seen {
		c.reqs[id] = n
	}
	for i := range c.log {
		if e := &c.log[i]; e.ReqID != 0 {
			c.reqs[e.ReqID] = e.OpNum
		}
	}
	// Adopt: the whole log stays; the noop commits it in this epoch.
	c.noop = c.appendLocal(wire.Entry{Kind: wire.KindNoop})
	c.hbDue = true
	c.maybeCommit()
}

func (c *Core) stepAppend(m *wire.Msg) {
	if c.role == RolePrimary {
		panic(fmt.Sprintf("replica: %s primary of epoch %d got an append from %s of the same epoch", c.cfg.ID, c.epoch, m.From))
	}
	if c.primary == "" {
		c.primary = m.From
		c.hardDirty = true
	}
	c.heardFrom = c.ticks
	c.ackTo = m.From
	c.needAck = true
	reject := func(hint api.OpNum) {
		c.needAck = false
		c.send(wire.Msg{Type: wire.TypeAppendResp, To: m.From, Flags: wire.FlagReject, Index: hint})
	}
	if c.needSnap {
		c.needAck = false
		c.send(wire.Msg{Type: wire.TypeAppendResp, To: m.From, Flags: wire.FlagReject | wire.FlagNeedSnap})
		return
	}
	if m.PrevOp < c.snapIndex || m.PrevOp > c.lastIndex() {
		reject(c.lastIndex())
		return
	}
	if t, _ := c.term(m.PrevOp); t != m.PrevEpoch {
		if m.PrevOp <= c.commit {
			c.needSnap = true
			c.needAck = false
			c.send(wire.Msg{Type: wire.TypeAppendResp, To: m.From, Flags: wire.FlagReject | wire.FlagNeedSnap})
			return
		}
		reject(m.PrevOp - 1)
		return
	}
	for i, e := range m.Entries {
		if e.OpNum != m.PrevOp+api.OpNum(i)+1 {
			reject(c.lastIndex()) // malformed; ask again
			return
		}
		if e.OpNum <= c.lastIndex() {
			if t, _ := c.term(e.OpNum); t == e.Epoch {
				continue
			}
			if e.OpNum <= c.commit {
				c.needSnap = true
				c.needAck = false
				c.send(wire.Msg{Type: wire.TypeAppendResp, To: m.From, Flags: wire.FlagReject | wire.FlagNeedSnap})
				return
			}
			c.truncate(e.OpNum)
		}
		c.log = append(c.log, e)
	}
	c.verified = max(c.verified, m.PrevOp+api.OpNum(len(m.Entries)))
	// Past an entry of this epoch, the primary's log holds only this
	// epoch's entries: anything older after it is a dead note.
	if t, _ := c.term(c.verified); t == c.epoch {
		for i := c.verified + 1; i <= c.lastIndex(); i++ {
			if c.entry(i).Epoch != c.epoch {
				c.truncate(i)
				break
			}
		}
	}
	if n := min(m.Commit, c.verified); n > c.commit {
		c.commit = n
	}
	c.syncWant = max(c.syncWant, min(m.Sync, c.verified))
}

func (c *Core) stepSnapshot(m *wire.Msg) {
	if c.role == RolePrimary {
		panic(fmt.Sprintf("replica: %s primary of epoch %d got a snapshot from %s", c.cfg.ID, c.epoch, m.From))
	}
	c.heardFrom = c.ticks
	c.ackTo = m.From
	c.needAck = true
	// A forced snapshot (FlagNeedSnap) may move the state back, but never
	// below what this replica acked in this epoch.
	force := m.Flags&wire.FlagNeedSnap != 0 && m.Index >= c.verified
	if m.Index <= c.commit && !c.needSnap && !force {
		return
	}
	// Nor does an ordinary one drop ops this replica acked in this epoch:
	// its ack may be on its way (a reject sent earlier, arriving late, made
	// the primary send the snapshot), and the primary commits on it. When
	// the log holds the snapshot's op, the snapshot only moves the commit
	// index (a simulation seed lost an acknowledged write here).
	if !c.needSnap && !force && m.Index <= c.verified {
		if t, ok := c.term(m.Index); ok && t == m.PrevEpoch {
			c.commit = max(c.commit, m.Index)
			return
		}
	}
	c.log = nil
	c.snapIndex, c.snapEpoch = m.Index, m.PrevEpoch
	c.snap = &Snapshot{Index: m.Index, Epoch: m.PrevEpoch, Data: m.Data}
	// The sender's seen request ids ride as entries without data.
	clear(c.seen)
	c.seenQ = c.seenQ[:0]
	for _, e := range m.Entries {
		c.see(e.ReqID, e.OpNum)
	}
	c.snap.Seen = c.Seen()
	c.truncFrom = 0
	c.handed, c.stable, c.synced = m.Index, m.Index, m.Index
	c.commit, c.applied, c.verified = m.Index, m.Index, m.Index
	c.needSnap = false
	c.syncWant = m.Index
}

func (c *Core) stepAppendResp(m *wire.Msg) {
	if c.role != RolePrimary {
		return
	}
	p := c.peers[m.From]
	if p == nil {
		return
	}
	p.lastHeard = c.ticks
	p.probeSent = false
	if m.Reject() {
		p.probing = true
		if m.Flags&wire.FlagNeedSnap != 0 {
			p.needSnap = true
			p.match = 0
			return
		}
		// The hint may be behind (a gap) or ahead (we sent a prev below
		// its snapshot): resume there; its term check guards either way.
		p.match = min(p.match, m.Index)
		p.next = min(m.Index, c.lastIndex()) + 1
		if m.Index > c.lastIndex() && p.next <= m.Index {
			// Its snapshot is past our log: only after a power loss
			// took ops we had committed. Replace its state with ours.
			p.needSnap, p.forceSnap = true, true
		}
		if p.next <= c.snapIndex {
			p.needSnap = true
		}
		return
	}
	if m.Index > c.lastIndex() {
		return // cannot happen: acks only what we sent
	}
	p.probing = false
	p.match = max(p.match, m.Index)
	p.synced = max(p.synced, min(m.Sync, m.Index))
	p.next = max(p.next, p.match+1)
	c.maybeCommit()
}

func (c *Core) stepGrant(m *wire.Msg) {
	if c.role != RolePrimary || m.Epoch != c.epoch {
		return
	}
	var peer api.NodeID
	if len(m.Peers) > 0 {
		peer = m.Peers[0]
	}
	k := ctlKey{m.Kind, peer}
	r := c.ctl[k]
	if r == nil || r.first == 0 || m.ReqID < r.first || m.ReqID > r.seq {
		return // not an answer to this request
	}
	p := c.peers[peer]
	switch m.Kind {
	case wire.CtlDropPeer:
		// The control plane handles requests in request id order and
		// ignores older ones: past this grant, no InSync we sent can
		// still add the peer.
		if m.Reject() || p == nil || m.ReqID < p.inSyncSeq {
			return // keep asking
		}
		delete(c.ctl, k)
		p.inSync, p.joining, p.dropping = false, false, false
	case wire.CtlInSync:
		if p == nil || p.dropping {
			return
		}
		delete(c.ctl, k)
		if m.Reject() {
			p.joining = false // the control plane did not record it
			return
		}
		p.inSync, p.joining = true, false
		c.blessed = false // released
		c.relSeq = m.ReqID
		delete(c.ctl, ctlKey{wire.CtlBless, ""})
	case wire.CtlBless:
		if m.Reject() || m.ReqID < c.relSeq {
			return
		}
		delete(c.ctl, k)
		c.blessed = true
	}
	c.maybeCommit()
}

// solo reports whether no peer is in the commit quorum.
func (c *Core) solo() bool {
	for _, p := range c.peers {
		if p.quorum() {
			return false
		}
	}
	return true
}

func (c *Core) maybeCommit() {
	if c.role != RolePrimary {
		return
	}
	n := c.stable
	if c.solo() {
		if !c.blessed {
			return
		}
	}
	for _, p := range c.peers {
		if p.quorum() {
			n = min(n, p.match)
		}
	}
	if n > c.commit && n >= c.noop {
		c.commit = n
	}
}

// Tick advances the replica's clock by one tick.
func (c *Core) Tick() {
	c.ticks++
	if c.role != RolePrimary {
		return
	}
	if c.ticks%c.cfg.HeartbeatTicks == 0 {
		c.hbDue = true
	}
	for _, id := range c.order {
		p := c.peers[id]
		if p.quorum() && !p.dropping && c.ticks-p.lastHeard > c.cfg.PeerTimeoutTicks {
			p.dropping = true
			delete(c.ctl, ctlKey{wire.CtlInSync, id}) // stays joining until the drop
			c.askControl(wire.CtlDropPeer, id)
		}
	}
	if c.solo() && !c.blessed {
		if _, ok := c.ctl[ctlKey{wire.CtlBless, ""}]; !ok {
			c.askControl(wire.CtlBless, "")
		}
	}
}

// HasReady reports whether Ready has anything to hand out.
func (c *Core) HasReady() bool {
	if c.hardDirty || c.snap != nil || c.truncFrom != 0 || c.handed < c.lastIndex() || c.needAck || c.hbDue ||
		len(c.msgs) > 0 || len(c.done) > 0 || c.commit > c.applied || c.syncWant > c.synced {
		return true
	}
	if c.role == RolePrimary {
		if len(c.flushes) > 0 && c.synced < c.flushes[len(c.flushes)-1] {
			return true
		}
		for _, id := range c.order {
			if p := c.peers[id]; !c.snapHeld(p) && (p.needSnap || (p.next <= c.lastIndex() && p.next <= p.match+api.OpNum(c.cfg.MaxInflight) && !p.probeSent)) {
				return true
			}
		}
		if k, ok := c.ctlNext(); ok && c.ticks-c.ctl[k].sent >= c.cfg.RetryTicks {
			return true
		}
		if c.flushReady() {
			return true
		}
	}
	return false
}

// Ready returns the work to do, and marks it handed out: the driver must
// do all of it, in order, then call Advance(rd) before the next Ready.
func (c *Core) Ready() Ready {
	var rd Ready
	if c.hardDirty {
		rd.Hard = &HardState{Epoch: c.epoch, Primary: c.primary}
		c.hardDirty = false
	}
	rd.Snapshot, c.snap = c.snap, nil
	rd.TruncateFrom, c.truncFrom = c.truncFrom, 0
	last := c.lastIndex()
	if c.handed < last {
		rd.Entries = c.entries(c.handed+1, last)
		c.handed = last
	}
	syncAfter := c.synced
	if c.syncWant > c.synced || (c.role == RolePrimary && len(c.flushes) > 0 && c.synced < c.flushes[len(c.flushes)-1]) {
		rd.Sync = true
		syncAfter = last
	}
	if c.commit > c.applied {
		rd.Committed = c.entries(c.applied+1, c.commit)
		c.applied = c.commit
		for _, e := range rd.Committed {
			c.see(e.ReqID, e.OpNum)
		}
	}
	if c.role == RolePrimary {
		c.completeCommitted(rd.Committed)
		c.completeFlushes()
		c.sendAppends()
		c.sendControl()
	} else if c.needAck {
		c.send(wire.Msg{Type: wire.TypeAppendResp, To: c.ackTo, Index: c.verified, Sync: min(syncAfter, c.verified)})
		c.needAck = false
	}
	rd.Done, c.done = c.done, nil
	rd.Messages, c.msgs = c.msgs, nil
	return rd
}

func (c *Core) completeCommitted(ents []wire.Entry) {
	for _, e := range ents {
		if e.Kind == wire.KindFlush {
			continue // completes when synced everywhere
		}
		for _, w := range c.waiters[e.OpNum] {
			c.complete(w, e.OpNum, nil)
		}
		delete(c.waiters, e.OpNum)
	}
}

// flushReady reports whether the oldest pending flush can complete.
func (c *Core) flushReady() bool {
	if len(c.flushes) == 0 {
		return false
	}
	n := c.flushes[0]
	if n > c.applied || n > c.synced {
		return false
	}
	for _, p := range c.peers {
		if p.quorum() && p.synced < n {
			return false
		}
	}
	return true
}

// completeFlushes completes flush entries that are committed and fsynced
// on the primary and on every quorum peer.
func (c *Core) completeFlushes() {
	for c.flushReady() {
		n := c.flushes[0]
		for _, w := range c.waiters[n] {
			c.complete(w, n, nil)
		}
		delete(c.waiters, n)
		c.flushes = c.flushes[1:]
	}
}

func (c *Core) sendAppends() {
	var syncTo api.OpNum
	if len(c.flushes) > 0 {
		syncTo = c.flushes[len(c.flushes)-1]
	}
	last := c.lastIndex()
	for _, id := range c.order {
		p := c.peers[id]
		if c.snapHeld(p) {
			// A peer in the quorum that needs a snapshot cannot ack the
			// noop either: drop it (the noop then commits under a solo
			// blessing); it gets its snapshot after, and joins again as
			// any peer does.
			if p.quorum() && !p.dropping {
				p.dropping = true
				delete(c.ctl, ctlKey{wire.CtlInSync, id})
				c.askControl(wire.CtlDropPeer, id)
			}
			continue
		}
		if p.needSnap || p.next <= c.snapIndex {
			// The state at the commit index; the driver fills Data.
			t, _ := c.term(c.commit)
			var seen []wire.Entry
			for _, rid := range c.seenQ[max(0, len(c.seenQ)-wire.MaxEntries):] {
				seen = append(seen, wire.Entry{OpNum: c.seen[rid], Kind: wire.KindNoop, ReqID: rid})
			}
			var fl uint8
			if p.forceSnap {
				fl = wire.FlagNeedSnap
			}
			c.send(wire.Msg{Type: wire.TypeSnapshot, To: id, Flags: fl, Index: c.commit, PrevEpoch: t, Commit: c.commit, Entries: seen})
			p.needSnap, p.forceSnap = false, false
			p.next = c.commit + 1
		}
		// A peer catching up fsyncs all it gets: it joins the in-sync set
		// only with everything durable, so that no flushed op depends on a
		// replica that could lose it.
		sync := syncTo
		if !p.quorum() {
			sync = last
		}
		sent := false
		if p.probing && c.hbDue {
			p.probeSent = false
		}
		// Write data in flight (sent past the ack) is bounded too, tighter
		// for a peer catching up: its copy must not take the driver's
		// loop, the disk and the network from the ops in flight (the
		// driver reads the data of old entries back from its journal).
		limit, frame := int64(maxInflightBytes), int64(maxAppendBytes)
		if !p.quorum() {
			limit, frame = maxCatchupBytes, maxCatchupBytes
		}
		var inflight int64
		for i := max(p.match, c.snapIndex) + 1; i < p.next && i <= last; i++ {
			if e := c.entry(i); e.Kind == wire.KindWrite {
				inflight += e.Len
			}
		}
		for p.next <= last && p.next <= p.match+api.OpNum(c.cfg.MaxInflight) && !p.probeSent &&
			(inflight < limit || p.next == p.match+1) {
			hi := min(last, p.next+api.OpNum(c.cfg.MaxAppend)-1)
			// Bound the frame too: write entries carry their data on the
			// wire (the driver fills it in), and a frame over the wire's
			// limit would be refused every time.
			var bytes int64
			for i := p.next; i <= hi; i++ {
				if e := c.entry(i); e.Kind == wire.KindWrite {
					if bytes += e.Len; bytes > frame && i > p.next {
						hi = i - 1
						bytes -= e.Len
						break
					}
				}
			}
			inflight += bytes
			t, _ := c.term(p.next - 1)
			c.send(wire.Msg{Type: wire.TypeAppend, To: id, PrevOp: p.next - 1, PrevEpoch: t,
				Entries: c.entries(p.next, hi), Commit: c.commit, Sync: sync})
			p.next = hi + 1
			sent = true
			p.probeSent = p.probing
		}
		if c.hbDue && !sent {
			t, _ := c.term(p.next - 1)
			c.send(wire.Msg{Type: wire.TypeAppend, To: id, PrevOp: p.next - 1, PrevEpoch: t, Commit: c.commit, Sync: sync})
		}
		// A peer that acked everything joins the in-sync set.
		if !p.inSync && !p.joining && p.match == last && p.synced == last && last >= c.noop && c.ticks-p.lastHeard <= c.cfg.HeartbeatTicks {
			p.joining = true
			c.askControl(wire.CtlInSync, id)
		}
	}
	c.hbDue = false
}

// snapHeld reports whether p needs a snapshot that must wait for this
// epoch's noop to commit. Until then our commit index can be below what
// the peer committed in an earlier epoch (after a restart it is our
// checkpoint), and a snapshot of that state would take the peer back past
// acknowledged, even flushed, writes while it still counts as in sync: the
// control plane could then promote it and lose them (a simulation seed
// did, with a power loss of the primary).
func (c *Core) snapHeld(p *progress) bool {
	return (p.needSnap || p.next <= c.snapIndex) && c.commit < c.noop
}

// ctlNext returns the control request to send next: the one in flight,
// or the first pending.
func (c *Core) ctlNext() (ctlKey, bool) {
	keys := sortedCtl(c.ctl)
	for _, k := range keys {
		if c.ctl[k].first != 0 {
			return k, true
		}
	}
	if len(keys) == 0 {
		return ctlKey{}, false
	}
	return keys[0], true
}

// askControl makes a control request pending; sendControl sends it.
func (c *Core) askControl(kind wire.Kind, peer api.NodeID) {
	c.ctl[ctlKey{kind, peer}] = &ctlReq{sent: c.ticks - c.cfg.RetryTicks}
}

// sendControl sends one pending control request at a time, in the order
// drop, in-sync, bless, each with a new request id (resends too): the
// control plane handles them in request id order and ignores older ones.
func (c *Core) sendControl() {
	if k, ok := c.ctlNext(); ok {
		r := c.ctl[k]
		if c.ticks-r.sent < c.cfg.RetryTicks {
			return
		}
		c.ctlSeq++
		r.sent, r.seq = c.ticks, c.ctlSeq
		if r.first == 0 {
			r.first = r.seq
		}
		if k.kind == wire.CtlInSync {
			c.peers[k.peer].inSyncSeq = r.seq
		}
		m := wire.Msg{Type: wire.TypeControl, To: c.cfg.Control, Kind: k.kind, ReqID: r.seq}
		if k.peer != "" {
			m.Peers = []api.NodeID{k.peer}
		}
		c.send(m)
	}
}

// Advance tells the core that the driver did everything rd asked.
func (c *Core) Advance(rd Ready) {
	if n := len(rd.Entries); n > 0 {
		e := rd.Entries[n-1]
		if t, ok := c.term(e.OpNum); ok && t == e.Epoch {
			c.stable = max(c.stable, e.OpNum)
		}
	}
	if rd.Sync {
		c.synced = max(c.synced, c.stable)
	}
	c.maybeCommit()
}

// Compact forgets log entries up to upTo (at most the applied index): the
// driver's state includes them, and a peer that needs them gets a
// snapshot.
func (c *Core) Compact(upTo api.OpNum) {
	upTo = min(upTo, c.applied, c.stable)
	if upTo <= c.snapIndex {
		return
	}
	t, _ := c.term(upTo)
	c.log = slices.Clone(c.log[upTo-c.snapIndex:])
	c.snapIndex, c.snapEpoch = upTo, t
}

func sortedKeys[V any](m map[api.OpNum]V) []api.OpNum {
	ks := make([]api.OpNum, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func sortedCtl(m map[ctlKey]*ctlReq) []ctlKey {
	ks := make([]ctlKey, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.SortFunc(ks, func(a, b ctlKey) int {
		if a.kind != b.kind {
			return int(a.kind) - int(b.kind)
		}
		if a.peer < b.peer {
			return -1
		}
		if a.peer > b.peer {
			return 1
		}
		return 0
	})
	return ks
}

// String describes the replica's state, for logs and test failures.
func (c *Core) String() string {
	s := fmt.Sprintf("%s %s e%d primary=%s snap=%d last=%d handed=%d stable=%d synced=%d commit=%d applied=%d",
		c.cfg.ID, c.role, c.epoch, c.primary, c.snapIndex, c.lastIndex(), c.handed, c.stable, c.synced, c.commit, c.applied)
	if c.role == RolePrimary {
		s += fmt.Sprintf(" noop=%d blessed=%v flushes=%v waiters=%d", c.noop, c.blessed, c.flushes, len(c.waiters))
		for _, id := range c.order {
			p := c.peers[id]
			s += fmt.Sprintf(" [%s match=%d next=%d synced=%d heard=%d in=%v join=%v drop=%v snap=%v]",
				id, p.match, p.next, p.synced, c.ticks-p.lastHeard, p.inSync, p.joining, p.dropping, p.needSnap)
		}
		for k, r := range c.ctl {
			s += fmt.Sprintf(" ctl{%s %s first=%d seq=%d}", k.kind, k.peer, r.first, r.seq)
		}
	} else {
		s += fmt.Sprintf(" verified=%d needSnap=%v", c.verified, c.needSnap)
	}
	return s
}

// Package replica holds a partition replica's storage: the op stream of one
// partition, numbered by opnum, landing in the partition's journal and
// extent map, and moved in the background to the long-term store.
//
// # Model
//
// Every mutation of a partition (write, zero, trim, relocation by flush) is
// an op with the next opnum. An op is appended to the journal first, then
// applied to the extent map (metastore) in the same opnum order, and only
// then acknowledged. Reads look up the extent map and read the bytes from
// the journal or from a store shard; ranges with no extent read as zeros.
//
// # Rules (enforced here)
//
//   - p.seq orders ops: opnum assignment and journal append happen under it.
//     An op takes p.mu (the apply lock) before it lets go of p.seq
//     (hand-over-hand), so ops reach the extent map in opnum order while
//     the next op's journal write overlaps this op's map update. The map is
//     always the map after a prefix of the journal.
//   - p.gc guards container lifetime: readers hold it shared while they read
//     a journal segment or shard; segments and shards are deleted only under
//     it exclusively.
//   - A journal segment is removed only when no extent points into it and
//     the extent map that says so is durable (metastore Sync), and every op
//     in it is at or below the durable applied opnum.
//   - A shard is deleted only when no extent points into it and the ops that
//     emptied it are synced in the journal, so no crash can bring back a
//     reference to it.
//   - Flush (FLUSH/FUA) is a journal group commit: the journal is the log,
//     and the extent map is rebuilt from it after any crash.
package replica

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
	"stor.dev/stor/target"
)

// Options of a partition.
type Options struct {
	FS  vfs.FS
	Dir string // journal directory
	// SegmentSize is the journal segment size; 0: 64 MiB.
	SegmentSize int64
	// JournalBudget is the journal size above which Flush moves data out of
	// the oldest segments; 0: 1 GiB.
	JournalBudget int64
	// IdleFlush: a partition that has seen no op for this long is flushed
	// entirely (its active segment sealed); 0: 30 s.
	IdleFlush time.Duration
	// DefragPieces: a read of 128 KiB or more that needed this many read
	// calls (pieces of data stored apart) rewrites what it read side by
	// side before it returns (see defrag.go); 0: never. Off by default:
	// in scripts/bench's 1 MiB read row, right after the 4 KiB random
	// write rows, it cost more than it saved (0.27 of nbd-server with it
	// at 16, 0.47 without, 2026-11-26): the rewrite of the first pass
	// writes 1 GiB into new page-cache pages, ~2.3 ms per MiB of kernel
	// time on the test VM, where reading the ~200 pieces of a MiB costs
	// ~0.9 ms.
	DefragPieces int
	// DefragIdle: a partition that has seen no write for this long moves
	// the data of its fragmented ranges into shards in LBA order, in the
	// background (see defrag.go); 0: 2 s; < 0: never.
	DefragIdle time.Duration
	Logger     *slog.Logger
}

// container identifies a journal segment or a shard.
type container struct {
	where metastore.Where
	id    uint64
}

// Partition is one partition replica's local storage. Safe for concurrent
// use.
type Partition struct {
	pkey  uint64
	meta  *metastore.DB
	m     *metastore.Map // the extent map; updates under p.mu
	store erasure.ShardStore
	j     *journal.Journal
	opts  Options
	log   *slog.Logger

	lastOpTime atomic.Int64 // unix nanos of the last op
	lastWrite  atomic.Int64 // unix nanos of the last write, zero or trim
	flushedOp  atomic.Uint64

	gc sync.RWMutex

	lastReclaim time.Time   // owned by Flush (one caller at a time)
	defrag      defragState // owned by Flush

	failed atomic.Pointer[error] // sticky: the map and journal disagree

	// replicated: opened for a Replica (OpenReplicaPartition). Its flush
	// records moves straight into the map, not as ops (see
	// Replica.Flush); syncJournal is the Replica's SyncJournal, and no
	// journal segment holding an op past keep is removed.
	replicated  bool
	syncJournal func(context.Context) error
	keep        atomic.Uint64

	seq struct {
		sync.Mutex
		next uint64 // next opnum
	}

	mu struct {
		sync.Mutex
		live    map[container]int64  // bytes referenced by extents
		shardSz map[uint64]int64     // known shard sizes
		deadAt  map[container]uint64 // container emptied by op
		nextSeq uint64               // next shard sequence number
		applied uint64               // newest op applied; every older one is too
	}
}

// OpenPartition opens (creating) partition pkey and recovers it: the journal
// is replayed after the extent map's applied opnum.
func OpenPartition(ctx context.Context, pkey uint64, meta *metastore.DB, store erasure.ShardStore, o Options) (*Partition, error) {
	return openPartition(ctx, pkey, meta, store, o, true)
}

// openPartition opens partition pkey. With replay, it applies the journal
// records after the extent map's applied opnum (OpenPartition); without,
// it leaves them as they are, for a Replica to decide which are committed
// (OpenReplicaPartition).
func openPartition(ctx context.Context, pkey uint64, meta *metastore.DB, store erasure.ShardStore, o Options, replay bool) (*Partition, error) {
	if o.FS == nil {
		o.FS = vfs.Default
	}
	if o.SegmentSize == 0 {
		o.SegmentSize = 64 << 20
	}
	if o.JournalBudget == 0 {
		o.JournalBudget = 1 << 30
	}
	if o.IdleFlush == 0 {
		o.IdleFlush = 30 * time.Second
	}
	if o.DefragIdle == 0 {
		o.DefragIdle = 2 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	p := &Partition{pkey: pkey, meta: meta, store: store, opts: o}
	p.log = o.Logger.With("partition", fmt.Sprintf("%016x", pkey))
	p.mu.live = make(map[container]int64)
	p.mu.shardSz = make(map[uint64]int64)
	p.mu.deadAt = make(map[container]uint64)
	p.keep.Store(math.MaxUint64)
	j, err := journal.Open(o.FS, o.Dir, journal.Options{SegmentSize: o.SegmentSize, Logger: p.log, Prezero: true})
	if err != nil {
		return nil, fmt.Errorf("replica: partition %016x: %w", pkey, err)
	}
	p.j = j
	p.m, err = meta.OpenMap(pkey)
	if err != nil {
		j.Close()
		return nil, err
	}
	applied := p.m.Applied()
	if last := j.LastOpNum(); last < applied && last != 0 {
		// The hook in metastore keeps this from happening; if it does, the
		// map references journal records that are gone.
		p.log.Error("extent map is ahead of the journal", "applied", applied, "journal", last)
	}
	replayed := 0
	if replay {
		err = j.Replay(applied, func(r *journal.Record, pos journal.Pos) error {
			replayed++
			return p.applyLocked(r, pos)
		})
		if err != nil {
			j.Close()
			return nil, fmt.Errorf("replica: partition %016x: replay: %w", pkey, err)
		}
	}
	p.seq.next = max(applied, j.LastOpNum()) + 1
	p.mu.applied = applied
	if replay {
		p.mu.applied = p.seq.next - 1
	}
	p.flushedOp.Store(p.mu.applied)
	// Rebuild space accounting from the map.
	all := p.m.Lookup(nil, 0, 1<<62)
	for _, e := range all {
		if e.Kind == metastore.KindData {
			p.mu.live[container{e.Where, e.Container}] += e.Len
		}
	}
	shards, err := store.List(ctx, pkey)
	if err != nil {
		j.Close()
		return nil, err
	}
	for _, s := range shards {
		p.mu.nextSeq = max(p.mu.nextSeq, s.Seq+1)
		c := container{metastore.InObject, s.Seq}
		if p.mu.live[c] == 0 {
			p.mu.deadAt[c] = p.mu.applied
		}
	}
	for _, s := range j.Segments() {
		c := container{metastore.InJournal, s.ID}
		if !s.Active && p.mu.live[c] == 0 {
			p.mu.deadAt[c] = p.mu.applied
		}
		if s.Active || p.mu.live[c] > 0 {
			p.flushedOp.Store(min(p.flushedOp.Load(), s.FirstOp-1))
		}
	}
	if replayed > 0 {
		p.log.Info("partition recovered", "applied", applied, "replayed", replayed, "next_op", p.seq.next)
	}
	p.lastOpTime.Store(time.Now().UnixNano())
	p.lastWrite.Store(p.lastOpTime.Load())
	return p, nil
}

// Persist hands the extent map's pending updates to the metastore, so that
// closing the metastore makes them durable and the next open replays less.
func (p *Partition) Persist() error {
	return p.m.Persist(&p.mu.Mutex)
}

// Close persists the extent map if the metastore is still open (nothing
// is lost if not: the journal has every op) and closes the journal.
// In-flight ops must have returned.
func (p *Partition) Close() error {
	perr := p.Persist()
	p.gc.Lock()
	defer p.gc.Unlock()
	return errors.Join(perr, p.j.Close())
}

func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, erasure.ErrNoSpace):
		return fmt.Errorf("%w: %v", target.ErrNoSpace, err)
	case errors.Is(err, target.ErrNoSpace), errors.Is(err, target.ErrIO):
		return err
	default:
		return fmt.Errorf("%w: %v", target.ErrIO, err)
	}
}

// op appends r (with the next opnum) and applies it.
func (p *Partition) op(r *journal.Record) error {
	p.seq.Lock()
	if err := p.failed.Load(); err != nil {
		p.seq.Unlock()
		return *err
	}
	r.OpNum = p.seq.next
	r.Epoch = 1
	pos, err := p.j.Append(r)
	if err != nil {
		p.seq.Unlock()
		return mapErr(fmt.Errorf("replica: partition %016x op %d: %w", p.pkey, r.OpNum, err))
	}
	p.seq.next++
	p.mu.Lock() // before p.seq is released: ops apply in opnum order
	p.seq.Unlock()
	defer p.mu.Unlock()
	if err := p.failed.Load(); err != nil {
		return *err
	}
	if err := p.applyLocked(r, pos); err != nil {
		// The journal has the op but the map does not: only a restart
		// (replay) can reconcile them.
		err = fmt.Errorf("%w: partition %016x failed at op %d: %v", target.ErrIO, p.pkey, r.OpNum, err)
		p.failed.Store(&err)
		p.log.Error("partition failed", "op", r.OpNum, "err", err)
		return err
	}
	now := time.Now().UnixNano()
	p.lastOpTime.Store(now)
	if r.Kind != journal.KindMeta {
		p.lastWrite.Store(now)
	}
	return nil
}

// lastOp is the opnum of the newest op appended.
func (p *Partition) lastOp() uint64 {
	p.seq.Lock()
	defer p.seq.Unlock()
	return p.seq.next - 1
}

// applied is the opnum of the newest op applied to the map; every op up to
// it is applied (ops apply in opnum order).
func (p *Partition) applied() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mu.applied
}

// applyLocked applies one journal record to the extent map.
// REQUIRES: p.mu held, or p not yet shared (recovery).
func (p *Partition) applyLocked(r *journal.Record, pos journal.Pos) error {
	u := p.m.Update()
	removed := func(old metastore.Extent) {
		if old.Kind == metastore.KindData {
			p.dropLiveLocked(container{old.Where, old.Container}, old.Len, r.OpNum)
		}
	}
	switch r.Kind {
	case journal.KindWrite:
		e := metastore.Extent{Start: r.Off, Len: r.Len, Kind: metastore.KindData, Where: metastore.InJournal,
			Container: pos.Seg, COff: pos.Off, Op: r.OpNum}
		u.Set(e, removed)
		p.mu.live[container{metastore.InJournal, pos.Seg}] += r.Len
	case journal.KindZero:
		u.Set(metastore.Extent{Start: r.Off, Len: r.Len, Kind: metastore.KindZero, Op: r.OpNum}, removed)
	case journal.KindTrim:
		u.Set(metastore.Extent{Start: r.Off, Len: r.Len, Op: r.OpNum}, removed)
	case journal.KindMeta:
		rel, err := decodeRelocation(r.Aux)
		if err != nil {
			u.Abort()
			return err
		}
		p.relocateLocked(u, rel, r.OpNum)
	default:
		u.Abort()
		return fmt.Errorf("replica: unknown record kind %d at op %d", r.Kind, r.OpNum)
	}
	if err := u.Commit(r.OpNum); err != nil {
		return err
	}
	p.mu.applied = r.OpNum
	return nil
}

// relocateLocked points the extents rel moved, if the map still holds
// them unchanged, at rel's shard; op is the opnum the change counts at.
// REQUIRES: p.mu, u in flight
func (p *Partition) relocateLocked(u *metastore.Update, rel *relocation, op uint64) {
	for _, m := range rel.moves {
		moved := m.old
		moved.Where, moved.Container, moved.COff = metastore.InObject, rel.seq, m.coff
		if u.Replace(m.old, moved) {
			p.dropLiveLocked(container{m.old.Where, m.old.Container}, m.old.Len, op)
			p.mu.live[container{metastore.InObject, rel.seq}] += m.old.Len
		}
	}
	p.mu.shardSz[rel.seq] = rel.size
	p.mu.nextSeq = max(p.mu.nextSeq, rel.seq+1)
	if p.mu.live[container{metastore.InObject, rel.seq}] == 0 {
		p.mu.deadAt[container{metastore.InObject, rel.seq}] = op
	}
}

// REQUIRES: p.mu
func (p *Partition) dropLiveLocked(c container, n int64, op uint64) {
	p.mu.live[c] -= n
	if p.mu.live[c] <= 0 {
		delete(p.mu.live, c)
		p.mu.deadAt[c] = op
	}
}

// Write writes data at off (bytes within the partition).
func (p *Partition) Write(ctx context.Context, data []byte, off int64, fua bool) error {
	if err := p.op(&journal.Record{Kind: journal.KindWrite, Off: off, Len: int64(len(data)), Data: data}); err != nil {
		return err
	}
	if fua {
		return p.Sync(ctx)
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeros without storing data.
func (p *Partition) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if err := p.op(&journal.Record{Kind: journal.KindZero, Off: off, Len: n}); err != nil {
		return err
	}
	if fua {
		return p.Sync(ctx)
	}
	return nil
}

// Trim discards [off, off+n).
func (p *Partition) Trim(ctx context.Context, off, n int64) error {
	return p.op(&journal.Record{Kind: journal.KindTrim, Off: off, Len: n})
}

// Sync makes every op completed before the call durable.
func (p *Partition) Sync(ctx context.Context) error {
	if err := p.j.Sync(ctx); err != nil {
		return mapErr(fmt.Errorf("replica: partition %016x sync: %w", p.pkey, err))
	}
	return nil
}

// ReadAt fills buf from off; holes read as zeros.
func (p *Partition) ReadAt(ctx context.Context, buf []byte, off int64) error {
	var eb [8]metastore.Extent
	es, reads, err := p.readAt(ctx, eb[:0], buf, off)
	if err != nil {
		return mapErr(fmt.Errorf("replica: partition %016x read [%d,+%d): %w", p.pkey, off, len(buf), err))
	}
	if p.opts.DefragPieces > 0 && reads >= p.opts.DefragPieces && len(buf) >= defragMinRead {
		p.defragAfterRead(es, buf, off)
	}
	return nil
}

// readAt fills buf from off and returns the extents it looked up and the
// number of read calls it made for data.
func (p *Partition) readAt(ctx context.Context, eb []metastore.Extent, buf []byte, off int64) ([]metastore.Extent, int, error) {
	p.gc.RLock()
	defer p.gc.RUnlock()
	at := off
	end := off + int64(len(buf))
	es := p.m.Lookup(eb, off, int64(len(buf)))
	var err error
	reads := 0 // read calls for data
	for i := 0; i < len(es) && err == nil; i++ {
		e := es[i]
		// Pieces adjacent both in the partition and in one container (a
		// large write split by later overwrites, then rewritten) are one
		// read.
		for i+1 < len(es) && contiguous(e, es[i+1]) {
			e.Len += es[i+1].Len
			i++
		}
		if e.Start > at {
			clear(buf[at-off : e.Start-off])
		}
		dst := buf[e.Start-off : e.End()-off]
		at = e.End()
		switch {
		case e.Kind != metastore.KindData:
			clear(dst)
		case e.Where == metastore.InJournal:
			reads++
			err = p.j.ReadAt(dst, journal.Pos{Seg: e.Container, Off: e.COff})
		default:
			reads++
			err = p.store.ReadAt(ctx, erasure.ShardID{PKey: p.pkey, Seq: e.Container}, dst, e.COff)
		}
	}
	if err != nil {
		return nil, 0, err
	}
	if at < end {
		clear(buf[at-off:])
	}
	return es, reads, nil
}

// Map describes [off, off+n) as target extents (offsets within the partition).
func (p *Partition) Map(ctx context.Context, off, n int64) ([]target.Extent, error) {
	var out []target.Extent
	add := func(o, l int64, k target.ExtentKind) {
		if i := len(out); i > 0 && out[i-1].Kind == k && out[i-1].Off+out[i-1].Len == o {
			out[i-1].Len += l
			return
		}
		out = append(out, target.Extent{Off: o, Len: l, Kind: k})
	}
	at := off
	for _, e := range p.m.Lookup(nil, off, n) {
		if e.Start > at {
			add(at, e.Start-at, target.ExtentHole)
		}
		k := target.ExtentData
		if e.Kind == metastore.KindZero {
			k = target.ExtentZero
		}
		add(e.Start, e.Len, k)
		at = e.End()
	}
	if at < off+n {
		add(at, off+n-at, target.ExtentHole)
	}
	return out, nil
}

// Stats is a partition's state for metrics.
type Stats struct {
	JournalBytes int64
	Extents      int64
	LastOp       uint64
	FlushLag     uint64 // ops not yet moved out of the journal
	Allocated    int64  // bytes referenced by data extents
}

// Stats reports the partition's state.
func (p *Partition) Stats() Stats {
	var s Stats
	for _, seg := range p.j.Segments() {
		s.JournalBytes += seg.Size
	}
	s.Extents = int64(p.m.Len())
	s.LastOp = p.lastOp()
	p.mu.Lock()
	for _, n := range p.mu.live {
		s.Allocated += n
	}
	p.mu.Unlock()
	if f := p.flushedOp.Load(); s.LastOp > f {
		s.FlushLag = s.LastOp - f
	}
	return s
}

// relocation is the aux payload of a KindMeta op: extents moved into shard
// seq. Layout (big-endian):
//
//	+-----------+---------+---------+----------------------------------------+
//	| type u8=1 | seq u64 | size u64| count u32 | count x moved extent (57 B) |
//	+-----------+---------+---------+----------------------------------------+
//	moved extent: start u64 | len u64 | where u8 | container u64 | coff u64 |
//	              op u64 | new coff u64
type relocation struct {
	seq   uint64
	size  int64
	moves []move
}

type move struct {
	old  metastore.Extent // as it was in the map
	coff int64            // its offset in the shard
}

const moveLen = 8*6 + 1

func (r *relocation) encode() []byte {
	b := make([]byte, 0, 21+len(r.moves)*moveLen)
	b = append(b, 1)
	b = binary.BigEndian.AppendUint64(b, r.seq)
	b = binary.BigEndian.AppendUint64(b, uint64(r.size))
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.moves)))
	for _, m := range r.moves {
		b = binary.BigEndian.AppendUint64(b, uint64(m.old.Start))
		b = binary.BigEndian.AppendUint64(b, uint64(m.old.Len))
		b = append(b, byte(m.old.Where))
		b = binary.BigEndian.AppendUint64(b, m.old.Container)
		b = binary.BigEndian.AppendUint64(b, uint64(m.old.COff))
		b = binary.BigEndian.AppendUint64(b, m.old.Op)
		b = binary.BigEndian.AppendUint64(b, uint64(m.coff))
	}
	return b
}

var errBadRelocation = errors.New("replica: bad relocation record")

func decodeRelocation(b []byte) (*relocation, error) {
	if len(b) < 21 || b[0] != 1 {
		return nil, errBadRelocation
	}
	r := &relocation{seq: binary.BigEndian.Uint64(b[1:]), size: int64(binary.BigEndian.Uint64(b[9:]))}
	n := int(binary.BigEndian.Uint32(b[17:]))
	b = b[21:]
	if len(b) != n*moveLen {
		return nil, errBadRelocation
	}
	r.moves = make([]move, n)
	for i := range r.moves {
		m := b[i*moveLen:]
		r.moves[i] = move{
			old: metastore.Extent{
				Start:     int64(binary.BigEndian.Uint64(m)),
				Len:       int64(binary.BigEndian.Uint64(m[8:])),
				Kind:      metastore.KindData,
				Where:     metastore.Where(m[16]),
				Container: binary.BigEndian.Uint64(m[17:]),
				COff:      int64(binary.BigEndian.Uint64(m[25:])),
				Op:        binary.BigEndian.Uint64(m[33:]),
			},
			coff: int64(binary.BigEndian.Uint64(m[41:])),
		}
	}
	return r, nil
}

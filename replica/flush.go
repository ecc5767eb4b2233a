package replica

import (
	"context"
	"errors"
	"fmt"
	"time"

	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
	"stor.dev/stor/target"
)

// maxShard bounds the bytes one flush writes into one shard.
const maxShard = 8 << 20

// reclaimEvery is how often a flush that moved nothing may reclaim dead
// segments and shards while the journal is within budget.
const reclaimEvery = 1 * time.Second

// FlushResult says what one Flush did.
type FlushResult struct {
	Moved          int64 // bytes moved into shards
	Shards         int   // shards written
	SegmentsFreed  int
	ShardsDeleted  int
	JournalRotated bool
}

// Flush is the partition's background work, run by one goroutine at a time.
//
// Policy: the journal is the fast tier, and data stays in it while there
// is room, so data overwritten soon is never copied. Flush moves the live
// data of sealed segments (oldest first) into new shards only while the
// journal holds more than Options.JournalBudget, down to three quarters of
// it; when the partition has been idle for Options.IdleFlush, or force is
// set, it seals the active segment and moves everything. Shards that are
// mostly dead are compacted in the same pass. The moves are recorded as
// ops; then everything is made durable and the segments and shards nothing
// points into are deleted.
func (p *Partition) Flush(ctx context.Context, force bool) (FlushResult, error) {
	var res FlushResult
	// The map's pending updates go to Pebble here, off the ops' path.
	if err := p.Persist(); err != nil {
		return res, mapErr(err)
	}
	// An idle partition's fragmented ranges move into shards in LBA order
	// first (defrag.go), so the moves below do not copy them again.
	if err := p.defragIdle(ctx, &shardBuilder{p: p, res: &res}); err != nil {
		return res, err
	}
	segs := p.j.Segments()
	all := force || time.Since(time.Unix(0, p.lastOpTime.Load())) >= p.opts.IdleFlush
	if all {
		// An idle partition keeps no removed journal files for reuse.
		if err := p.j.DropRecycled(); err != nil {
			return res, mapErr(fmt.Errorf("replica: partition %016x: %w", p.pkey, err))
		}
	}
	if n := len(segs); all && n > 0 && segs[n-1].Active && segs[n-1].Size > 0 {
		if _, err := p.j.Rotate(); err != nil {
			return res, fmt.Errorf("replica: partition %016x rotate: %w", p.pkey, err)
		}
		res.JournalRotated = true
		segs = p.j.Segments()
	}
	var total int64
	for _, s := range segs {
		total += s.Size
	}
	over := total > p.opts.JournalBudget
	keep := p.opts.JournalBudget * 3 / 4
	if !all && !over {
		keep = total
	}

	// Sealed journal segments, oldest first: walk their records (a
	// sequential read that brings the data along) and keep the pieces the
	// map still points at.
	b := &shardBuilder{p: p, res: &res}
	var es []metastore.Extent
	for _, s := range segs {
		if !all && total <= keep {
			break
		}
		p.mu.Lock()
		live := p.mu.live[container{metastore.InJournal, s.ID}]
		p.mu.Unlock()
		if s.Active {
			continue
		}
		total -= s.Size
		if live == 0 || s.Records == 0 {
			continue // reclaim frees it without a copy
		}
		err := p.j.Replay(s.FirstOp-1, func(r *journal.Record, pos journal.Pos) error {
			if r.OpNum > s.LastOp {
				return errStopReplay
			}
			if r.Kind != journal.KindWrite || pos.Seg != s.ID {
				return nil
			}
			es = p.m.Lookup(es[:0], r.Off, r.Len)
			for _, e := range es {
				if e.Kind != metastore.KindData || e.Where != metastore.InJournal || e.Container != s.ID || e.Op != r.OpNum {
					continue
				}
				if err := b.add(ctx, e, r.Data[e.COff-pos.Off:e.COff-pos.Off+e.Len]); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil && !errors.Is(err, errStopReplay) {
			return res, mapErr(fmt.Errorf("replica: partition %016x flush segment %d: %w", p.pkey, s.ID, err))
		}
	}

	// Shards that are mostly dead: rewrite their live pieces (rare; scans
	// the map).
	sparse := make(map[uint64]bool)
	p.mu.Lock()
	for seq, size := range p.mu.shardSz {
		if live := p.mu.live[container{metastore.InObject, seq}]; live > 0 && live*4 < size {
			sparse[seq] = true
		}
	}
	p.mu.Unlock()
	var everything []metastore.Extent
	if len(sparse) > 0 {
		everything = p.m.Lookup(nil, 0, 1<<62)
	}
	for _, e := range everything {
		if e.Kind != metastore.KindData || e.Where != metastore.InObject || !sparse[e.Container] {
			continue
		}
		data := make([]byte, e.Len)
		err := p.readExtent(ctx, data, e)
		if err == nil {
			err = b.add(ctx, e, data)
		}
		if err != nil {
			return res, mapErr(fmt.Errorf("replica: partition %016x compact shards: %w", p.pkey, err))
		}
	}
	if err := b.finish(ctx); err != nil {
		return res, err
	}
	// Reclaiming costs a journal fsync and a metastore flush: with nothing
	// moved, do it at most every reclaimEvery unless space is short.
	if res.Shards == 0 && !force && !(p.reclaimable() && (over || time.Since(p.lastReclaim) >= reclaimEvery)) {
		return res, nil
	}
	p.lastReclaim = time.Now()

	// Make the map and journal durable, then reclaim what is provably dead.
	// Only ops already applied count: one appended but not yet applied
	// may still point into a segment that looks empty.
	synced := p.applied()
	if err := p.m.Persist(&p.mu.Mutex); err != nil {
		return res, mapErr(err)
	}
	syncJournal := p.j.Sync
	if p.syncJournal != nil {
		syncJournal = p.syncJournal
	}
	if err := syncJournal(ctx); err != nil {
		return res, mapErr(err)
	}
	if err := p.meta.Sync(); err != nil {
		return res, mapErr(err)
	}
	if err := p.reclaim(ctx, synced, &res); err != nil {
		return res, err
	}
	return res, nil
}

var errStopReplay = errors.New("replica: stop replay")

// shardBuilder packs live extents into shards of at most maxShard bytes and
// records each shard's moves as one op.
type shardBuilder struct {
	p    *Partition
	res  *FlushResult
	data []byte
	rel  relocation
}

func (b *shardBuilder) add(ctx context.Context, e metastore.Extent, data []byte) error {
	if len(b.data) > 0 && int64(len(b.data))+e.Len > maxShard {
		if err := b.finish(ctx); err != nil {
			return err
		}
	}
	if b.data == nil {
		b.data = make([]byte, 0, maxShard)
	}
	b.rel.moves = append(b.rel.moves, move{old: e, coff: int64(len(b.data))})
	b.data = append(b.data, data...)
	return nil
}

// finish writes the shard built so far and records its moves.
func (b *shardBuilder) finish(ctx context.Context) error {
	if len(b.rel.moves) == 0 {
		return nil
	}
	p := b.p
	p.mu.Lock()
	b.rel.seq = p.mu.nextSeq
	p.mu.nextSeq++
	p.mu.Unlock()
	b.rel.size = int64(len(b.data))
	if err := p.store.Put(ctx, erasure.ShardID{PKey: p.pkey, Seq: b.rel.seq}, b.data); err != nil {
		return mapErr(fmt.Errorf("replica: partition %016x flush: %w", p.pkey, err))
	}
	if p.replicated {
		// Not an op: opnums are the Core's. The move is a change of where
		// bytes live, not of what they are, so the map after it is still
		// the map after the same prefix of the op stream; it is durable
		// with the map (Persist, then the metastore Sync below), and the
		// segments it empties are removed only after that.
		p.mu.Lock()
		u := p.m.Update()
		p.relocateLocked(u, &b.rel, p.mu.applied)
		err := u.Commit(p.mu.applied)
		p.mu.Unlock()
		if err != nil {
			err = fmt.Errorf("%w: partition %016x flush: %v", target.ErrIO, p.pkey, err)
			p.failed.Store(&err)
			return err
		}
	} else if err := p.op(&journal.Record{Kind: journal.KindMeta, Aux: b.rel.encode()}); err != nil {
		return err
	}
	b.res.Moved += b.rel.size
	b.res.Shards++
	b.data = b.data[:0]
	b.rel.moves = b.rel.moves[:0]
	return nil
}

// reclaimable reports whether reclaim may find something to delete: a
// sealed segment or a shard that nothing points into.
func (p *Partition) reclaimable() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.mu.deadAt {
		if c.where == metastore.InObject && p.mu.live[c] == 0 {
			return true
		}
	}
	for _, s := range p.j.Segments() {
		if !s.Active && p.mu.live[container{metastore.InJournal, s.ID}] == 0 {
			return true
		}
	}
	return false
}

// reclaim deletes sealed segments and shards that no extent points into,
// once the ops that emptied them are at or below synced (durable).
func (p *Partition) reclaim(ctx context.Context, synced uint64, res *FlushResult) error {
	p.gc.Lock()
	defer p.gc.Unlock()
	p.mu.Lock()
	var deadShards []uint64
	for c, op := range p.mu.deadAt {
		if c.where == metastore.InObject && op <= synced && p.mu.live[c] == 0 {
			deadShards = append(deadShards, c.id)
		}
	}
	var deadSegs []uint64
	flushed := synced
	for _, s := range p.j.Segments() {
		c := container{metastore.InJournal, s.ID}
		switch {
		case !s.Active && p.mu.live[c] == 0 && s.LastOp <= synced && s.LastOp <= p.keep.Load():
			deadSegs = append(deadSegs, s.ID)
		case s.Size > 0 && s.FirstOp > 0:
			flushed = min(flushed, s.FirstOp-1)
		}
	}
	p.mu.Unlock()

	for _, id := range deadSegs {
		if err := p.j.Remove(id); err != nil {
			return mapErr(fmt.Errorf("replica: partition %016x remove segment %d: %w", p.pkey, id, err))
		}
		res.SegmentsFreed++
		p.mu.Lock()
		delete(p.mu.deadAt, container{metastore.InJournal, id})
		p.mu.Unlock()
	}
	for _, seq := range deadShards {
		if err := p.store.Delete(ctx, erasure.ShardID{PKey: p.pkey, Seq: seq}); err != nil {
			return mapErr(err)
		}
		res.ShardsDeleted++
		p.mu.Lock()
		delete(p.mu.deadAt, container{metastore.InObject, seq})
		delete(p.mu.shardSz, seq)
		p.mu.Unlock()
	}
	p.flushedOp.Store(flushed)
	return nil
}

// Destroy deletes everything the partition stores: its shards, its extent
// map and its journal directory. The partition must be closed by the caller
// right after; no op may be in flight.
func (p *Partition) Destroy(ctx context.Context) error {
	p.gc.Lock()
	defer p.gc.Unlock()
	shards, err := p.store.List(ctx, p.pkey)
	if err != nil {
		return err
	}
	for _, s := range shards {
		if err := p.store.Delete(ctx, s); err != nil {
			return err
		}
	}
	if err := p.m.Drop(); err != nil {
		return err
	}
	for _, s := range p.j.Segments() {
		if !s.Active {
			if err := p.j.Remove(s.ID); err != nil {
				return err
			}
		}
	}
	return nil
}

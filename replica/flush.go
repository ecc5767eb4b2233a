package replica

import (
	"context"
	"errors"
	"fmt"
	"time"

	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
)

// maxShard bounds the bytes one flush writes into one shard.
const maxShard = 8 << 20

// FlushResult says what one Flush did.
type FlushResult struct {
	Moved          int64 // bytes moved into shards
	Shards         int   // shards written
	SegmentsFreed  int
	ShardsDeleted  int
	JournalRotated bool
}

// Flush is the partition's background work, run by one goroutine at a time:
// it seals the active journal segment when it is idle (or when force is
// set), moves the live data of sealed segments, and of shards that are
// mostly dead, into new shards, records the moves as an op, makes all of it
// durable, then deletes the segments and shards nothing points into.
func (p *Partition) Flush(ctx context.Context, force bool) (FlushResult, error) {
	var res FlushResult
	segs := p.j.Segments()
	if n := len(segs); n > 0 && segs[n-1].Active && segs[n-1].Size > 0 {
		idle := time.Since(time.Unix(0, p.lastOpTime.Load())) >= p.opts.IdleRotate
		if force || idle {
			if _, err := p.j.Rotate(); err != nil {
				return res, fmt.Errorf("replica: partition %016x rotate: %w", p.pkey, err)
			}
			res.JournalRotated = true
			segs = p.j.Segments()
		}
	}

	// Sealed journal segments: walk their records (a sequential read that
	// brings the data along) and keep the pieces the map still points at.
	b := &shardBuilder{p: p, res: &res}
	for _, s := range segs {
		p.mu.Lock()
		live := p.mu.live[container{metastore.InJournal, s.ID}]
		p.mu.Unlock()
		if s.Active || live == 0 || s.Records == 0 {
			continue
		}
		err := p.j.Replay(s.FirstOp-1, func(r *journal.Record, pos journal.Pos) error {
			if r.OpNum > s.LastOp {
				return errStopReplay
			}
			if r.Kind != journal.KindWrite || pos.Seg != s.ID {
				return nil
			}
			return p.meta.Lookup(p.pkey, r.Off, r.Len, func(e metastore.Extent) error {
				if e.Kind != metastore.KindData || e.Where != metastore.InJournal || e.Container != s.ID || e.Op != r.OpNum {
					return nil
				}
				return b.add(ctx, e, r.Data[e.COff-pos.Off:e.COff-pos.Off+e.Len])
			})
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
	if len(sparse) > 0 {
		err := p.meta.Scan(p.pkey, func(e metastore.Extent) error {
			if e.Kind != metastore.KindData || e.Where != metastore.InObject || !sparse[e.Container] {
				return nil
			}
			data := make([]byte, e.Len)
			p.gc.RLock()
			err := p.store.ReadAt(ctx, erasure.ShardID{PKey: p.pkey, Seq: e.Container}, data, e.COff)
			p.gc.RUnlock()
			if err != nil {
				return err
			}
			return b.add(ctx, e, data)
		})
		if err != nil {
			return res, mapErr(fmt.Errorf("replica: partition %016x compact shards: %w", p.pkey, err))
		}
	}
	if err := b.finish(ctx); err != nil {
		return res, err
	}

	// Make the map and journal durable, then reclaim what is provably dead.
	// Only ops already applied count: one appended but not yet applied
	// may still point into a segment that looks empty.
	synced := p.applied()
	if err := p.j.Sync(ctx); err != nil {
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
	if err := p.op(&journal.Record{Kind: journal.KindMeta, Aux: b.rel.encode()}); err != nil {
		return err
	}
	b.res.Moved += b.rel.size
	b.res.Shards++
	b.data = b.data[:0]
	b.rel.moves = b.rel.moves[:0]
	return nil
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
		case !s.Active && p.mu.live[c] == 0 && s.LastOp <= synced:
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
	if err := p.meta.DropPartition(p.pkey); err != nil {
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

package replica

import (
	"context"
	"fmt"
	"time"

	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
)

// maxShard bounds the bytes one flush writes into one shard.
const maxShard = 32 << 20

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

	// Which containers to empty.
	evacuate := make(map[container]bool)
	p.mu.Lock()
	for _, s := range segs {
		c := container{metastore.InJournal, s.ID}
		if !s.Active && p.mu.live[c] > 0 {
			evacuate[c] = true
		}
	}
	for seq, size := range p.mu.shardSz {
		c := container{metastore.InObject, seq}
		if live := p.mu.live[c]; live > 0 && live*4 < size {
			evacuate[c] = true
		}
	}
	p.mu.Unlock()

	if len(evacuate) > 0 {
		var batch []metastore.Extent
		var batchBytes int64
		err := p.meta.Scan(p.pkey, func(e metastore.Extent) error {
			if e.Kind != metastore.KindData || !evacuate[container{e.Where, e.Container}] {
				return nil
			}
			if batchBytes+e.Len > maxShard && len(batch) > 0 {
				if err := p.moveBatch(ctx, batch, batchBytes, &res); err != nil {
					return err
				}
				batch, batchBytes = batch[:0], 0
			}
			batch = append(batch, e)
			batchBytes += e.Len
			return nil
		})
		if err == nil && len(batch) > 0 {
			err = p.moveBatch(ctx, batch, batchBytes, &res)
		}
		if err != nil {
			return res, err
		}
	}

	// Make the map and journal durable, then reclaim what is provably dead.
	p.mu.Lock()
	synced := p.mu.next - 1
	p.mu.Unlock()
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

// moveBatch copies the extents into one new shard and records the move.
func (p *Partition) moveBatch(ctx context.Context, batch []metastore.Extent, size int64, res *FlushResult) error {
	data := make([]byte, size)
	rel := &relocation{size: size, moves: make([]move, len(batch))}
	var at int64
	p.gc.RLock()
	for i, e := range batch {
		dst := data[at : at+e.Len]
		var err error
		if e.Where == metastore.InJournal {
			err = p.j.ReadAt(dst, journal.Pos{Seg: e.Container, Off: e.COff})
		} else {
			err = p.store.ReadAt(ctx, erasure.ShardID{PKey: p.pkey, Seq: e.Container}, dst, e.COff)
		}
		if err != nil {
			p.gc.RUnlock()
			return mapErr(fmt.Errorf("replica: partition %016x flush read: %w", p.pkey, err))
		}
		rel.moves[i] = move{old: e, coff: at}
		at += e.Len
	}
	p.gc.RUnlock()

	p.mu.Lock()
	rel.seq = p.mu.nextSeq
	p.mu.nextSeq++
	p.mu.Unlock()
	if err := p.store.Put(ctx, erasure.ShardID{PKey: p.pkey, Seq: rel.seq}, data); err != nil {
		return mapErr(fmt.Errorf("replica: partition %016x flush: %w", p.pkey, err))
	}
	if err := p.op(&journal.Record{Kind: journal.KindMeta, Aux: rel.encode()}); err != nil {
		return err
	}
	res.Moved += size
	res.Shards++
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

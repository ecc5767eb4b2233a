package replica

import (
	"fmt"
	"time"

	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
	"stor.dev/stor/target"
)

// Defragmentation on read (Options.DefragPieces).
//
// Small random writes leave a range's data scattered over many journal
// records; a large read of it then costs one read call per piece (on the
// 2-core test machine about 4 µs each: a 1 MiB read of a range that 4 KiB
// random writes left in ~200 pieces costs ~0.9 ms of pread, against ~0.15 ms
// for one piece). When a read of at least defragMinRead bytes needed at
// least Options.DefragPieces read calls, the reader writes each run of
// adjacent pieces it just read back as one journal record, before it
// returns: the next read of the range finds it in one place and reads it in
// one call. The cost is one journal append of the bytes read (no fsync: the
// rewrite carries data that is already stored, and the records it replaces
// stay until the rewrite is durable, by the reclaim rules).
//
// The rewrite is done by the reader, not queued: a queue drained by one
// background goroutine fell behind 1 GB/s of large reads and dropped most
// candidates, so a range stayed scattered pass after pass.
//
// Rules: the bytes rewritten are exactly the bytes of the extents the read
// looked up (journal records and shards never change while the map holds
// an extent), and a rewrite happens only if every piece it covers is still
// in the map unchanged, checked with every earlier op applied and no later
// op admitted (p.seq and p.mu held), so a write that lands meanwhile wins.

const (
	defragMinRead   = 128 << 10
	defragMaxRecord = 1 << 20 // rewrite records are at most this long
)

// defragAfterRead rewrites the data pieces of es (as Lookup returned them
// for the read of buf at off) that the map holds whole: pieces clipped by
// the read's edges (the map holds more than the read saw) or overwritten
// since are left alone. It runs with p.gc not held.
func (p *Partition) defragAfterRead(es []metastore.Extent, buf []byte, off int64) {
	pieces := make([]metastore.Extent, 0, len(es))
	for _, e := range es {
		if e.Kind == metastore.KindData && p.m.Holds(e) {
			pieces = append(pieces, e)
		}
	}
	if len(pieces) < 2 {
		return
	}
	if _, err := p.rewrite(pieces, buf, off); err != nil {
		p.log.Warn("defragmentation failed", "err", err)
	}
}

// rewrite writes pieces (data extents in LBA order, within buf, which holds
// the partition's bytes from off) back as one journal record per run of
// adjacent pieces, if the map still holds every piece unchanged. It
// reports whether it did.
func (p *Partition) rewrite(pieces []metastore.Extent, buf []byte, off int64) (bool, error) {
	p.seq.Lock()
	defer p.seq.Unlock()
	p.mu.Lock() // every op before the next opnum is applied
	defer p.mu.Unlock()
	if err := p.failed.Load(); err != nil {
		return false, *err
	}
	for _, e := range pieces {
		if !p.m.Holds(e) {
			return false, nil
		}
	}
	for i := 0; i < len(pieces); {
		k := i + 1
		for k < len(pieces) && pieces[k].Start == pieces[k-1].End() {
			k++
		}
		run := k - i
		start, end := pieces[i].Start, pieces[k-1].End()
		i = k
		if run == 1 {
			continue // a lone piece is already in one place
		}
		for at := start; at < end; {
			n := min(end-at, defragMaxRecord)
			r := &journal.Record{Kind: journal.KindWrite, Off: at, Len: n, Data: buf[at-off : at+n-off],
				OpNum: p.seq.next, Epoch: 1}
			pos, err := p.j.Append(r)
			if err != nil {
				return false, mapErr(fmt.Errorf("replica: partition %016x rewrite at op %d: %w", p.pkey, r.OpNum, err))
			}
			p.seq.next++
			if err := p.applyLocked(r, pos); err != nil {
				err = fmt.Errorf("%w: partition %016x failed at op %d: %v", target.ErrIO, p.pkey, r.OpNum, err)
				p.failed.Store(&err)
				return false, err
			}
			at += n
		}
	}
	p.lastOpTime.Store(time.Now().UnixNano())
	return true, nil
}

package replica

import (
	"context"
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

// Defragmentation when idle (Options.DefragIdle).
//
// The rewrite on read above pays its cost in the reader's time. Flush does
// the same work off the I/O path instead: once the partition has seen no
// write for Options.DefragIdle, it walks the map in defragWindow windows,
// from where the previous pass stopped, and moves the data of every window
// that a read would need at least defragMinPieces read calls for into new
// shards, in LBA order. The pieces of such a window then lie side by side
// in one shard (two, at a shard's end) and a read of it is one or two
// calls.
//
// Rules: a move is a shardBuilder relocation like every flush move (a
// change of where bytes live, made only where the map still holds the
// piece unchanged, so a write that lands meanwhile wins); only pieces the
// map holds whole are moved (a piece crossing the window's edge stays);
// the bytes are read from the piece's container under p.gc, which no
// reclaim changes while the map points into it. A pass stops after
// defragPassTime or at the first write, and the next Flush goes on from
// there; a sweep of the whole map that saw no write is not repeated until
// a write comes.

const (
	defragWindow    = 1 << 20
	defragMinPieces = 16
	defragPassTime  = time.Second
)

// defragState is where the idle defragmentation stands.
type defragState struct {
	at        int64 // start of the next window
	sweepFrom int64 // lastWrite when the sweep in progress started
	swept     int64 // sweepFrom of the newest sweep that saw no write
}

// readCalls is the number of read calls ReadAt makes for es (Lookup's
// extents of one range): one per run of data pieces adjacent both in the
// partition and in one container.
func readCalls(es []metastore.Extent) int {
	n := 0
	for i, e := range es {
		if e.Kind != metastore.KindData {
			continue
		}
		if i == 0 || !contiguous(es[i-1], e) {
			n++
		}
	}
	return n
}

// contiguous reports whether data extent b follows data extent a both in
// the partition and in one container: ReadAt reads them in one call.
func contiguous(a, b metastore.Extent) bool {
	return a.Kind == metastore.KindData && b.Kind == metastore.KindData && a.End() == b.Start &&
		a.Where == b.Where && a.Container == b.Container && a.COff+a.Len == b.COff
}

// defragIdle runs one pass of idle defragmentation (see above); b's shards
// are finished before it returns.
func (p *Partition) defragIdle(ctx context.Context, b *shardBuilder) error {
	w := p.lastWrite.Load()
	d := &p.defrag
	if p.opts.DefragIdle < 0 || time.Since(time.Unix(0, w)) < p.opts.DefragIdle || d.swept == w {
		return nil
	}
	start := time.Now()
	end := p.m.End()
	var (
		es  []metastore.Extent
		buf []byte
	)
	for p.lastWrite.Load() == w && time.Since(start) < defragPassTime {
		if d.at == 0 {
			d.sweepFrom = w
		}
		if d.at >= end {
			d.at = 0
			if d.sweepFrom == w {
				d.swept = w
				break
			}
			continue
		}
		es = p.m.Lookup(es[:0], d.at, defragWindow)
		d.at += defragWindow
		if readCalls(es) < defragMinPieces {
			continue
		}
		if buf == nil {
			buf = make([]byte, defragWindow)
		}
		for _, e := range es {
			if e.Kind != metastore.KindData || !p.m.Holds(e) {
				continue
			}
			data := buf[:e.Len] // held whole: within the window
			err := p.readExtent(ctx, data, e)
			if err == nil {
				err = b.add(ctx, e, data)
			}
			if err != nil {
				return mapErr(fmt.Errorf("replica: partition %016x defragment [%d,+%d): %w", p.pkey, e.Start, e.Len, err))
			}
		}
	}
	return b.finish(ctx)
}

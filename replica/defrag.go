package replica

import (
	"fmt"
	"sync"
	"time"

	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
	"stor.dev/stor/target"
)

// Defragmentation on read (Options.DefragPieces; off by default).
//
// Small random writes leave a range's data scattered over many journal
// records; a large read of it then costs one read call per piece. When a
// read of at least defragMinRead bytes finds at least Options.DefragPieces
// pieces of data that cannot be read together, the partition copies what
// it just read, and a background goroutine writes each run of adjacent
// pieces back as one journal record (rewrite): a later read of the range
// finds it in one place and reads it in one call. The journal append is the
// whole cost (no fsync: the rewrite carries data that is already where it
// was, and the records it replaces stay until the rewrite is durable, by
// the reclaim rules).
//
// Rules: the copied bytes are exactly the bytes of the extents the read
// looked up (journal records and shards never change while a reader holds
// p.gc), and a rewrite happens only if every piece it covers is still in
// the map unchanged, checked with every earlier op applied and no later op
// admitted (p.seq and p.mu held), so a write that lands meanwhile wins.
// The queue is bounded (defragMaxQueued bytes); candidates beyond it, or for
// a range already queued, are dropped. Close stops the goroutine and waits
// for it.

const (
	defragMinRead   = 128 << 10
	defragMaxQueued = 32 << 20
)

type defragJob struct {
	key    int64              // offset of the read, in defragger.mu.pending
	pieces []metastore.Extent // data extents, in LBA order
	data   []byte             // their bytes, back to back
}

type defragger struct {
	p    *Partition
	wake chan struct{}
	stop chan struct{}
	done chan struct{}

	mu struct {
		sync.Mutex
		jobs    []defragJob
		bytes   int
		pending map[int64]bool // start of each queued read
		stopped bool
	}
}

func (p *Partition) startDefrag() {
	d := &defragger{p: p, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	d.mu.pending = make(map[int64]bool)
	p.defrag = d
	go d.run()
}

// stopDefrag stops the defragmenter and waits for it; queued work is
// dropped. Safe to call more than once.
func (p *Partition) stopDefrag() {
	d := p.defrag
	if d == nil {
		return
	}
	d.mu.Lock()
	if !d.mu.stopped {
		d.mu.stopped = true
		close(d.stop)
	}
	d.mu.Unlock()
	<-d.done
}

// offerDefrag queues the data pieces es of the read of buf at off (buf
// holds their bytes), unless the queue is full or the range is queued.
func (p *Partition) offerDefrag(es []metastore.Extent, buf []byte, off int64) {
	d := p.defrag
	if d == nil {
		return
	}
	job := defragJob{key: off}
	for _, e := range es {
		// Pieces clipped by the read's edges (the map holds more than
		// them) or overwritten since cannot move.
		if e.Kind == metastore.KindData && p.m.Holds(e) {
			job.pieces = append(job.pieces, e)
		}
	}
	if len(job.pieces) < 2 {
		return
	}
	size := 0
	for _, e := range job.pieces {
		size += int(e.Len)
	}
	d.mu.Lock()
	if d.mu.stopped || d.mu.pending[off] || d.mu.bytes+size > defragMaxQueued {
		d.mu.Unlock()
		return
	}
	d.mu.pending[off] = true
	d.mu.bytes += size
	d.mu.Unlock()
	job.data = make([]byte, 0, size)
	for _, e := range job.pieces {
		job.data = append(job.data, buf[e.Start-off:e.End()-off]...)
	}
	d.mu.Lock()
	d.mu.jobs = append(d.mu.jobs, job)
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

func (d *defragger) run() {
	defer close(d.done)
	for {
		select {
		case <-d.stop:
			return
		case <-d.wake:
		}
		for d.once() {
		}
	}
}

// once rewrites the oldest queued job. It reports whether to go on.
func (d *defragger) once() bool {
	d.mu.Lock()
	if len(d.mu.jobs) == 0 || d.mu.stopped {
		d.mu.Unlock()
		return false
	}
	j := d.mu.jobs[0]
	d.mu.jobs = d.mu.jobs[1:]
	d.mu.Unlock()
	if _, err := d.p.rewrite(j.pieces, j.data); err != nil {
		d.p.log.Warn("defragmentation failed", "err", err)
	}
	d.mu.Lock()
	d.mu.bytes -= len(j.data)
	delete(d.mu.pending, j.key)
	d.mu.Unlock()
	return true
}

// rewrite writes pieces (data extents in LBA order, their bytes back to
// back in data) back as one journal record per run of adjacent pieces, if
// the map still holds every piece unchanged. It reports whether it did.
func (p *Partition) rewrite(pieces []metastore.Extent, data []byte) (bool, error) {
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
	at := 0
	for i := 0; i < len(pieces); {
		k := i + 1
		for k < len(pieces) && pieces[k].Start == pieces[k-1].End() {
			k++
		}
		n := int(pieces[k-1].End() - pieces[i].Start)
		r := &journal.Record{Kind: journal.KindWrite, Off: pieces[i].Start, Len: int64(n), Data: data[at : at+n],
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
		i = k
	}
	p.lastOpTime.Store(time.Now().UnixNano())
	return true, nil
}

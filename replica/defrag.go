package replica

import (
	"context"
	"sync"

	"stor.dev/stor/metastore"
)

// Defragmentation on read (Options.DefragPieces; off by default).
//
// Small random writes leave a range's data scattered over many journal
// records; a large read of it then costs one read call per piece. When a
// read of at least defragMinRead bytes finds at least Options.DefragPieces
// pieces of data that cannot be read together, the partition copies what
// it just read, and a background goroutine writes the pieces, in LBA order,
// into a new shard and records the move as a relocation op (the same op a
// flush records). A later read of the range finds the pieces side by side
// in one shard and reads them in one call.
//
// Rules: the copied bytes are exactly the bytes of the extents the read
// looked up (journal records and shards never change while a reader holds
// p.gc), and the relocation moves an extent only if the map still holds it
// unchanged (Update.Replace), so a write that lands meanwhile wins. The
// queue is bounded (defragMaxQueued bytes); candidates beyond it, or for a
// range already queued, are dropped. Close stops the goroutine and waits
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

// once packs queued jobs into one shard (up to maxShard bytes) and records
// the moves. It reports whether it did anything.
func (d *defragger) once() bool {
	d.mu.Lock()
	var jobs []defragJob
	size := 0
	for len(d.mu.jobs) > 0 && (size == 0 || size+len(d.mu.jobs[0].data) <= maxShard) {
		jobs = append(jobs, d.mu.jobs[0])
		size += len(d.mu.jobs[0].data)
		d.mu.jobs = d.mu.jobs[1:]
	}
	d.mu.Unlock()
	if len(jobs) == 0 {
		return false
	}
	var res FlushResult
	b := &shardBuilder{p: d.p, res: &res}
	ctx := context.Background()
	var err error
	for _, j := range jobs {
		at := 0
		for _, e := range j.pieces {
			if err == nil {
				err = b.add(ctx, e, j.data[at:at+int(e.Len)])
			}
			at += int(e.Len)
		}
	}
	if err == nil {
		err = b.finish(ctx)
	}
	if err != nil {
		d.p.log.Warn("defragmentation failed", "err", err)
	}
	d.mu.Lock()
	for _, j := range jobs {
		d.mu.bytes -= len(j.data)
		delete(d.mu.pending, j.key)
	}
	stopped := d.mu.stopped
	d.mu.Unlock()
	return !stopped
}

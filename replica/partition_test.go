package replica

import (
	"bytes"
	"context"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
)

type rig struct {
	t     *testing.T
	fs    vfs.FS
	meta  *metastore.DB
	store *erasure.Local
	p     *Partition
}

// openRig opens partition (1, 0) on fs with 64 KiB segments and a 256 KiB
// journal budget, so background flushes move data, and defragmentation on
// read on; opts may change that.
func openRig(t *testing.T, fs vfs.FS, opts ...func(*Options)) *rig {
	t.Helper()
	r := &rig{t: t, fs: fs}
	var err error
	r.meta, err = metastore.Open("meta", metastore.Options{FS: fs, BeforeFlush: func() {
		if r.p != nil {
			r.p.Sync(context.Background())
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	r.store, err = erasure.OpenLocal(fs, "store")
	if err != nil {
		t.Fatal(err)
	}
	o := Options{FS: fs, Dir: "journal", SegmentSize: 64 << 10, JournalBudget: 256 << 10, DefragPieces: 8}
	for _, f := range opts {
		f(&o)
	}
	r.p, err = OpenPartition(context.Background(), metastore.PKey(1, 0), r.meta, r.store, o)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rig) close() {
	if err := r.p.Close(); err != nil {
		r.t.Fatal(err)
	}
	r.meta.Close()
	r.store.Close()
}

const (
	tbs     = 4096
	tblocks = 64
)

// model is a per-block oracle: each block holds a fill byte (0 = zeros).
type model [tblocks]byte

// write fills block b with fill, in the partition and in m.
func (r *rig) write(m *model, b int, fill byte) {
	r.t.Helper()
	if err := r.p.Write(context.Background(), bytes.Repeat([]byte{fill}, tbs), int64(b*tbs), false); err != nil {
		r.t.Fatal(err)
	}
	m[b] = fill
}

func (r *rig) check(m *model, what string) {
	r.t.Helper()
	buf := make([]byte, tblocks*tbs)
	if err := r.p.ReadAt(context.Background(), buf, 0); err != nil {
		r.t.Fatalf("%s: read: %v", what, err)
	}
	for b := 0; b < tblocks; b++ {
		want := bytes.Repeat([]byte{m[b]}, tbs)
		if !bytes.Equal(buf[b*tbs:(b+1)*tbs], want) {
			r.t.Fatalf("%s: block %d = %x..., want %x", what, b, buf[b*tbs:b*tbs+4], m[b])
		}
	}
}

// step applies one random op to the partition and the model.
func step(t *testing.T, rng *rand.Rand, p *Partition, m *model, fill byte) {
	ctx := context.Background()
	s := rng.Intn(tblocks)
	n := 1 + rng.Intn(min(8, tblocks-s))
	var err error
	switch rng.Intn(5) {
	case 0:
		err = p.Trim(ctx, int64(s*tbs), int64(n*tbs))
		fill = 0
	case 1:
		err = p.WriteZeroes(ctx, int64(s*tbs), int64(n*tbs), false)
		fill = 0
	default:
		err = p.Write(ctx, bytes.Repeat([]byte{fill}, n*tbs), int64(s*tbs), rng.Intn(10) == 0)
	}
	if err != nil {
		t.Fatal(err)
	}
	for b := s; b < s+n; b++ {
		m[b] = fill
	}
}

// TestPartitionOracle runs random ops with flushes and clean reopens, and
// compares every read with a per-block model.
func TestPartitionOracle(t *testing.T) {
	for seed := int64(1); seed <= 4; seed++ {
		fs := vfs.NewMem()
		r := openRig(t, fs)
		rng := rand.New(rand.NewSource(seed))
		var m model
		for i := 0; i < 1500; i++ {
			step(t, rng, r.p, &m, byte(1+rng.Intn(255)))
			switch {
			case i%200 == 199:
				if _, err := r.p.Flush(context.Background(), true); err != nil {
					t.Fatal(err)
				}
				r.check(&m, "after flush")
			case i%500 == 499:
				r.close()
				r = openRig(t, fs)
				r.check(&m, "after reopen")
			}
		}
		r.check(&m, "end")
		// Everything flushed: the journal holds nothing live, and shards
		// hold no more than the live data plus the mostly-dead tolerance.
		if _, err := r.p.Flush(context.Background(), true); err != nil {
			t.Fatal(err)
		}
		if _, err := r.p.Flush(context.Background(), true); err != nil {
			t.Fatal(err)
		}
		st := r.p.Stats()
		if st.FlushLag != 0 {
			t.Errorf("seed %d: flush lag %d after flush", seed, st.FlushLag)
		}
		var live int64
		for b := range m {
			if m[b] != 0 {
				live += tbs
			}
		}
		if st.Allocated > live {
			t.Errorf("seed %d: allocated %d > live %d", seed, st.Allocated, live)
		}
		r.check(&m, "final")
		r.close()
	}
}

// TestPartitionPowerLoss cuts power (StrictMem: unsynced writes vanish) at
// random points: every write before the last completed Sync must survive,
// and every block reads as one of the values written to it.
func TestPartitionPowerLoss(t *testing.T) {
	for seed := int64(1); seed <= 20; seed++ {
		fs := vfs.NewStrictMem()
		r := openRig(t, fs)
		rng := rand.New(rand.NewSource(seed))
		var durable, cur model
		var since [tblocks]map[byte]bool // values written after the last sync
		reset := func() {
			durable = cur
			for b := range since {
				since[b] = nil
			}
		}
		reset()
		steps := 100 + rng.Intn(600)
		for i := 0; i < steps; i++ {
			fill := byte(1 + rng.Intn(255))
			before := cur
			step(t, rng, r.p, &cur, fill)
			for b := range cur {
				if cur[b] != before[b] || cur[b] == fill {
					if since[b] == nil {
						since[b] = map[byte]bool{}
					}
					since[b][cur[b]] = true
				}
			}
			switch rng.Intn(40) {
			case 0:
				if err := r.p.Sync(context.Background()); err != nil {
					t.Fatal(err)
				}
				reset()
			case 1:
				force := rng.Intn(2) == 0
				if _, err := r.p.Flush(context.Background(), force); err != nil {
					t.Fatal(err)
				}
				if force {
					reset() // a forced Flush syncs the journal
				}
			}
		}
		fs.SetIgnoreSyncs(true)
		r.p.Close()
		r.meta.Close()
		r.store.Close()
		fs.ResetToSyncedState()
		fs.SetIgnoreSyncs(false)
		r = openRig(t, fs)
		buf := make([]byte, tbs)
		for b := 0; b < tblocks; b++ {
			if err := r.p.ReadAt(context.Background(), buf, int64(b*tbs)); err != nil {
				t.Fatal(err)
			}
			v := buf[0]
			if !bytes.Equal(buf, bytes.Repeat([]byte{v}, tbs)) {
				t.Fatalf("seed %d block %d torn", seed, b)
			}
			if v != durable[b] && !since[b][v] {
				t.Fatalf("seed %d block %d = %x: neither the synced %x nor a later write", seed, b, v, durable[b])
			}
		}
		r.close()
	}
}

// TestPartitionConcurrent: writers on disjoint blocks, readers, and a
// flusher running at once (-race), with idle defragmentation on at every
// gap between writes; every block ends as its last write.
func TestPartitionConcurrent(t *testing.T) {
	fs := vfs.NewMem()
	r := openRig(t, fs, func(o *Options) { o.DefragIdle = time.Nanosecond })
	ctx := context.Background()
	const writers = 4
	done := make(chan struct{})
	var wg sync.WaitGroup
	flushErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				flushErr <- nil
				return
			default:
			}
			if _, err := r.p.Flush(ctx, true); err != nil {
				flushErr <- err
				return
			}
		}
	}()
	var last [tblocks]byte
	var mu sync.Mutex
	var ww sync.WaitGroup
	for w := 0; w < writers; w++ {
		ww.Add(1)
		go func(w int) {
			defer ww.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			buf := make([]byte, tbs)
			for i := 0; i < 300; i++ {
				b := w + writers*rng.Intn(tblocks/writers)
				fill := byte(1 + rng.Intn(255))
				if err := r.p.Write(ctx, bytes.Repeat([]byte{fill}, tbs), int64(b*tbs), false); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				last[b] = fill
				mu.Unlock()
				if err := r.p.ReadAt(ctx, buf, int64(b*tbs)); err != nil || buf[0] != fill || buf[tbs-1] != fill {
					t.Errorf("read after write of block %d: %v", b, err)
					return
				}
			}
		}(w)
	}
	ww.Wait()
	close(done)
	wg.Wait()
	if err := <-flushErr; err != nil {
		t.Fatal(err)
	}
	m := model(last)
	r.check(&m, "after concurrent writes")
	r.close()
	r = openRig(t, fs)
	r.check(&m, "after reopen")
	r.close()
}

// TestFlushPolicy: a background Flush moves nothing while the journal is
// within budget, moves the oldest segments once it is over, reclaims
// segments whose data was all overwritten without copying them, and moves
// everything once the partition is idle.
func TestFlushPolicy(t *testing.T) {
	ctx := context.Background()
	journal := func(p *Partition) (total int64) {
		for _, s := range p.j.Segments() {
			total += s.Size
		}
		return total
	}
	r := openRig(t, vfs.NewMem(), func(o *Options) {
		o.JournalBudget = 512 << 10
		o.IdleFlush = time.Hour
	})
	defer r.close()
	var m model
	write := func(b int, fill byte) { r.write(&m, b, fill) }
	for b := 0; b < tblocks; b++ { // 256 KiB of data: within budget
		write(b, 1)
	}
	res, err := r.p.Flush(ctx, false)
	if err != nil || res.Moved != 0 || res.SegmentsFreed != 0 {
		t.Fatalf("within budget: flush = %+v, %v; want nothing done", res, err)
	}
	// Overwrite block 0 until the journal is over budget: the segments
	// full of dead copies are reclaimed, and what they hold live (the
	// first pass) is moved.
	for i := 0; journal(r.p) <= 600<<10; i++ {
		write(0, byte(2+i%200))
	}
	before := journal(r.p)
	res, err = r.p.Flush(ctx, false)
	if err != nil || res.SegmentsFreed == 0 || res.Moved == 0 || res.Moved > 256<<10 {
		t.Fatalf("over budget: flush = %+v, %v", res, err)
	}
	if after := journal(r.p); after > 512<<10*3/4+64<<10 || after >= before {
		t.Fatalf("over budget: journal %d -> %d bytes, want at most 3/4 of the budget plus a segment", before, after)
	}
	r.check(&m, "after budget flush")
	if res, err := r.p.Flush(ctx, false); err != nil || res.Moved != 0 {
		t.Fatalf("back within budget: flush = %+v, %v; want nothing moved", res, err)
	}
	// Idle: everything goes.
	r.p.opts.IdleFlush = time.Nanosecond
	if _, err := r.p.Flush(ctx, false); err != nil {
		t.Fatal(err)
	}
	// The flush's own relocation op is the one op left in the journal.
	if st := r.p.Stats(); st.FlushLag > 1 {
		t.Fatalf("idle flush left flush lag %d", st.FlushLag)
	}
	r.check(&m, "after idle flush")
}

// TestDefragOnRead: a large read of a range scattered over many journal
// records has it rewritten side by side in one journal record before it
// returns (a read whose edges cut pieces rewrites the whole pieces between);
// the data stays the same, and a write after that still wins.
func TestDefragOnRead(t *testing.T) {
	ctx := context.Background()
	r := openRig(t, vfs.NewMem(), func(o *Options) { o.DefragPieces = 2 })
	defer func() { r.close() }()
	var m model
	// Every other block in its own record, interleaved with writes
	// elsewhere so no two are adjacent in the journal.
	for b := 0; b < tblocks; b += 2 {
		for _, blk := range []int{b, (b + 1) % tblocks} {
			fill := byte(1 + (blk*7+b)%250)
			if err := r.p.Write(ctx, bytes.Repeat([]byte{fill}, tbs), int64(blk*tbs), false); err != nil {
				t.Fatal(err)
			}
			m[blk] = fill
		}
	}
	for b := 1; b < tblocks; b += 4 {
		if err := r.p.Write(ctx, bytes.Repeat([]byte{0xee}, tbs), int64(b*tbs), false); err != nil {
			t.Fatal(err)
		}
		m[b] = 0xee
	}
	pieces := func() (n int, containers map[uint64]bool) {
		containers = map[uint64]bool{}
		es := r.p.m.Lookup(nil, 0, tblocks*tbs)
		for i, e := range es {
			if i == 0 || e.Where != es[i-1].Where || e.Container != es[i-1].Container || e.COff != es[i-1].COff+es[i-1].Len {
				n++
			}
			containers[e.Container] = true
		}
		return n, containers
	}
	if n, _ := pieces(); n < 16 {
		t.Fatalf("setup: only %d separately stored pieces", n)
	}
	// A read whose edges cut pieces in two rewrites the pieces between.
	part := make([]byte, (tblocks-1)*tbs)
	if err := r.p.ReadAt(ctx, part, tbs/2); err != nil {
		t.Fatal(err)
	}
	if n, _ := pieces(); n != 3 {
		t.Fatalf("after a read from mid-block 0 to mid-block %d: %d separately stored pieces, want 3 (the two edge blocks apart)", tblocks-1, n)
	}
	r.check(&m, "fragmented") // one read of the whole range: rewrites it
	if n, cs := pieces(); n != 1 || len(cs) != 1 {
		t.Fatalf("range not defragmented: %d pieces in %d containers", n, len(cs))
	}
	r.check(&m, "defragmented")
	if err := r.p.Write(ctx, bytes.Repeat([]byte{0x11}, tbs), 5*tbs, false); err != nil {
		t.Fatal(err)
	}
	m[5] = 0x11
	r.check(&m, "overwritten after defrag")
	r.close()
	r = openRig(t, r.fs)
	r.check(&m, "reopened")
}

// TestDefragIdle: once the partition has seen no write for DefragIdle, Flush
// moves a range scattered over journal records and shards into one shard in
// LBA order, read in one call; a sweep that found everything in place is
// not repeated, and a write after it starts another.
func TestDefragIdle(t *testing.T) {
	ctx := context.Background()
	r := openRig(t, vfs.NewMem(), func(o *Options) {
		o.DefragPieces = 0
		o.DefragIdle = time.Hour
		o.IdleFlush = time.Hour
		o.JournalBudget = 64 << 20
	})
	defer func() { r.close() }()
	var m model
	write := func(b int, fill byte) { r.write(&m, b, fill) }
	// Blocks written in a scattered order, half of them moved to a shard
	// in that order, the other half overwritten in the journal.
	order := rand.New(rand.NewSource(1)).Perm(tblocks)
	for i, b := range order {
		write(b, byte(1+i))
	}
	if _, err := r.p.Flush(ctx, true); err != nil {
		t.Fatal(err)
	}
	for i, b := range order[:tblocks/2] {
		write(b, byte(101+i))
	}
	calls := func() int { return readCalls(r.p.m.Lookup(nil, 0, tblocks*tbs)) }
	if n := calls(); n < tblocks/2 {
		t.Fatalf("setup: a read of the range needs %d calls", n)
	}
	if res, err := r.p.Flush(ctx, false); err != nil || res.Moved != 0 {
		t.Fatalf("not idle yet: flush = %+v, %v; want nothing moved", res, err)
	}
	r.p.opts.DefragIdle = time.Nanosecond
	res, err := r.p.Flush(ctx, false)
	if err != nil || res.Moved != tblocks*tbs || res.Shards != 1 {
		t.Fatalf("idle: flush = %+v, %v; want the range moved into one shard", res, err)
	}
	if n := calls(); n != 1 {
		t.Fatalf("after defragmentation a read of the range needs %d calls, want 1", n)
	}
	r.check(&m, "defragmented")
	if res, err := r.p.Flush(ctx, false); err != nil || res.Moved != 0 || r.p.defrag.swept != r.p.lastWrite.Load() {
		t.Fatalf("swept: flush = %+v, %v (swept %d, last write %d); want nothing moved", res, err, r.p.defrag.swept, r.p.lastWrite.Load())
	}
	// Scatter it again: a write starts a new sweep.
	for i, b := range order {
		if i%3 == 0 {
			write(b, byte(200+i%50))
		}
	}
	if res, err := r.p.Flush(ctx, false); err != nil || res.Moved != tblocks*tbs {
		t.Fatalf("after writes: flush = %+v, %v; want the range moved again", res, err)
	}
	if n := calls(); n != 1 {
		t.Fatalf("after the second defragmentation: %d calls, want 1", n)
	}
	r.check(&m, "defragmented again")
	r.close()
	r = openRig(t, r.fs)
	r.check(&m, "reopened")
}

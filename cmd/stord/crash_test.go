package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/target/nbd/nbdtest"
)

// The crash test: writers stamp every 4 KiB block they write, keep exact
// books of which writes were acknowledged and which of those a completed
// FLUSH covered, and stord is SIGKILLed at a random moment. After the
// restart every block must read back as its latest flushed write or a
// write issued after it, and no block may be torn.
//
// Block stamp (one per 4 KiB block, every write covers whole blocks):
//
//	+-----+------+----------------------------------------------+
//	| off | size | field                                        |
//	+-----+------+----------------------------------------------+
//	|   0 |    8 | magic "stor-crs"                             |
//	|   8 |    8 | block index (LBA / 4096)                     |
//	|  16 |    4 | writer                                       |
//	|  20 |    4 | cycle (informational)                        |
//	|  24 |    8 | sequence number of the write (per writer)    |
//	|  32 | 4060 | filler, a function of (block, writer, seq)   |
//	|4092 |    4 | crc32c of bytes 0..4091                      |
//	+-----+------+----------------------------------------------+
//
// Model. Writer w owns the blocks [w*N/4, (w+1)*N/4) alone, so the order
// of its (QD1) requests is the order of versions of its blocks. A version
// is a sequence number plus "zero" for TRIM and WRITE_ZEROES. For every
// block the test keeps dur, the newest version known durable (acknowledged
// with FUA, or acknowledged before a FLUSH that completed), and cand, the
// versions issued after dur (acknowledged or still in flight when stord
// died). A fifth connection flushes too: by CAN_MULTI_CONN its FLUSH
// covers the writes every writer had acknowledged when it was sent. After a
// SIGKILL a block must read as dur or as one of cand: anything else is a
// lost flushed write; a stamp with a bad crc is torn. After a SIGTERM under
// load (stord drains, flushes and exits 0) a block must read as its newest
// acknowledged version or a later one. After checking, the test flushes,
// so what was read becomes dur.

const (
	crashBlock   = 4096
	crashVolume  = 64 << 20
	crashBlocks  = crashVolume / crashBlock
	crashWriters = 4
	crashMagic   = "stor-crs"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type bver struct {
	seq   uint64
	zero  bool
	acked bool // in cand: the server acknowledged it
}

type blockState struct {
	dur  bver
	cand []bver
}

// advance records that v is durable.
func (s *blockState) advance(v bver) {
	if v.seq <= s.dur.seq {
		return
	}
	s.dur = v
	i := 0
	for i < len(s.cand) && s.cand[i].seq <= v.seq {
		i++
	}
	s.cand = s.cand[i:]
}

// stamp fills b (one block) with the stamp of (block, writer, cycle, seq).
func stamp(b []byte, block uint64, writer, cycle uint32, seq uint64) {
	copy(b, crashMagic)
	binary.LittleEndian.PutUint64(b[8:], block)
	binary.LittleEndian.PutUint32(b[16:], writer)
	binary.LittleEndian.PutUint32(b[20:], cycle)
	binary.LittleEndian.PutUint64(b[24:], seq)
	x := block*0x9e3779b97f4a7c15 ^ seq*0xbf58476d1ce4e5b9 ^ uint64(writer)
	for i := 32; i+8 <= crashBlock-4; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	binary.LittleEndian.PutUint32(b[crashBlock-8:], uint32(x)) // last partial word
	binary.LittleEndian.PutUint32(b[crashBlock-4:], crc32.Checksum(b[:crashBlock-4], castagnoli))
}

// readStamp decodes a block: zero, or a valid stamp, or torn (bad crc or
// magic).
type readVersion struct {
	zero, torn    bool
	block, seq    uint64
	writer, cycle uint32
}

func parseStamp(b []byte) readVersion {
	allZero := true
	for _, c := range b {
		if c != 0 {
			allZero = false
			break
		}
	}
	if allZero {
		return readVersion{zero: true}
	}
	if string(b[:8]) != crashMagic || binary.LittleEndian.Uint32(b[crashBlock-4:]) != crc32.Checksum(b[:crashBlock-4], castagnoli) {
		return readVersion{torn: true}
	}
	return readVersion{
		block:  binary.LittleEndian.Uint64(b[8:]),
		writer: binary.LittleEndian.Uint32(b[16:]),
		cycle:  binary.LittleEndian.Uint32(b[20:]),
		seq:    binary.LittleEndian.Uint64(b[24:]),
	}
}

// crashWriter is one writer's books. The writer goroutine issues its
// requests alone; its books are shared with the flusher goroutine, which
// flushes on another connection (CAN_MULTI_CONN: a FLUSH covers the writes
// completed on every connection), so they live under mu.
type crashWriter struct {
	id     uint32
	lo, hi uint64 // owned blocks [lo, hi)
	seq    uint64 // owned by the writer goroutine

	mu struct {
		sync.Mutex
		blocks  []blockState // indexed by block - lo
		pending []ackRec     // acknowledged this cycle, in order
		flushed int          // pending[:flushed] are durable
		acked   int64        // writes acknowledged, all cycles
		flushes int64        // flushes completed by the writer, all cycles
	}
}

// ackRec is an acknowledged write, trim or zeroing of blocks [lo, lo+n).
type ackRec struct {
	lo, n uint64
	v     bver
}

// issue records v as sent to [lo, lo+n).
func (w *crashWriter) issue(lo, n uint64, v bver) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for b := lo; b < lo+n; b++ {
		s := &w.mu.blocks[b-w.lo]
		s.cand = append(s.cand, v)
	}
}

// ack records that the server acknowledged v; with fua it is durable.
func (w *crashWriter) ack(lo, n uint64, v bver, fua bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.mu.acked++
	for b := lo; b < lo+n; b++ {
		s := &w.mu.blocks[b-w.lo]
		s.cand[len(s.cand)-1].acked = true
		if fua {
			s.advance(v)
		}
	}
	if !fua {
		w.mu.pending = append(w.mu.pending, ackRec{lo, n, v})
	}
}

// flushMark is taken before a FLUSH is sent: what it will cover.
func (w *crashWriter) flushMark() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.mu.pending)
}

// flushDone records a completed FLUSH sent at mark.
func (w *crashWriter) flushDone(mark int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range w.mu.pending[min(w.mu.flushed, mark):mark] {
		for b := r.lo; b < r.lo+r.n; b++ {
			w.mu.blocks[b-w.lo].advance(r.v)
		}
	}
	w.mu.flushed = max(w.mu.flushed, mark)
}

// newCycle forgets the acknowledgements of the last cycle (they were
// checked against what the restarted stord holds).
func (w *crashWriter) newCycle() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.mu.pending, w.mu.flushed = nil, 0
}

type crashStats struct {
	kills, drains, flushes, checked, lost, torn, misplaced int64
	// Allowed outcomes, counted for the log: a write in flight at the kill
	// that did not land, an acknowledged but unflushed write rolled back.
	notLanded, rolledBack int64
}

// TestCrashSIGKILL runs at least 20 kill cycles (CRASH_CYCLES overrides),
// each about a second long.
func TestCrashSIGKILL(t *testing.T) {
	needBinaries(t)
	cycles := 24
	if testing.Short() {
		cycles = 5
	}
	if s := os.Getenv("CRASH_CYCLES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("CRASH_CYCLES=%q", s)
		}
		cycles = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (CRASH_SEED=%d reproduces the schedule, not the timing)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	// Small journal segments: partitions go past their journal budget, so
	// segments are sealed, flushed, removed and their files reused while
	// the kills land.
	d := startDaemon(t, "--no-default-volume", "--journal-segment-size", "1M")
	d.createVolume("crash", "--size", strconv.Itoa(crashVolume), "--block-size", "4096", "--partition-size", "8M")
	ws := make([]*crashWriter, crashWriters)
	for i := range ws {
		lo := uint64(i) * crashBlocks / crashWriters
		hi := uint64(i+1) * crashBlocks / crashWriters
		ws[i] = &crashWriter{id: uint32(i), lo: lo, hi: hi}
		ws[i].mu.blocks = make([]blockState, hi-lo)
		for j := range ws[i].mu.blocks {
			ws[i].mu.blocks[j].dur = bver{zero: true} // a new volume reads as zeros
		}
	}
	var st crashStats
	start := time.Now()
	budget := 10 * time.Minute
	for cycle := 1; cycle <= cycles; cycle++ {
		if time.Since(start) > budget {
			t.Fatalf("crash test over its %v budget after %d cycles", budget, cycle-1)
		}
		target := 200 + rng.IntN(3000)
		runWriters(t, d, ws, &st, uint32(cycle), rng.Uint64(), target, func() {
			// Kill at a moment a little after the target: some writes are
			// always in flight.
			time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
			d.kill()
			st.kills++
		})
		if d.werr == nil {
			t.Fatalf("cycle %d: stord exited cleanly before SIGKILL", cycle)
		}
		d.start()
		verifyCrash(t, d, ws, &st, false)
		if t.Failed() {
			t.Logf("cycle %d failed; daemon log:\n%s", cycle, d.tail())
			break
		}
	}
	// Clean stops: SIGTERM while the writers run must drain, flush and
	// exit 0, and then every acknowledged write is there, flushed or not.
	for cycle := cycles + 1; cycle <= cycles+3 && !t.Failed(); cycle++ {
		runWriters(t, d, ws, &st, uint32(cycle), rng.Uint64(), 200+rng.IntN(1000), func() {
			d.stopWith(syscall.SIGTERM)
			st.drains++
		})
		d.start()
		verifyCrash(t, d, ws, &st, true)
	}
	acked, flushes := int64(0), st.flushes
	for _, w := range ws {
		acked += w.mu.acked
		flushes += w.mu.flushes
	}
	t.Logf("kills %d, clean stops under load %d, writes acked %d, flushes %d (%d from the flusher connection), flushed blocks checked %d, lost %d, torn %d, misplaced %d; "+
		"allowed: blocks whose in-flight write did not land %d, whose acknowledged unflushed write was rolled back %d; %v",
		st.kills, st.drains, acked, flushes, st.flushes, st.checked, st.lost, st.torn, st.misplaced, st.notLanded, st.rolledBack,
		time.Since(start).Round(time.Millisecond))
	if st.kills < 20 && !testing.Short() && os.Getenv("CRASH_CYCLES") == "" {
		t.Errorf("only %d kill points, want at least 20", st.kills)
	}
}

// runWriters runs the writers and a flusher until together the writers
// have target acked writes, then calls kill (if not nil) while they run and
// waits for them to fail; with kill nil it stops them cleanly.
func runWriters(t *testing.T, d *daemon, ws []*crashWriter, st *crashStats, cycle uint32, seed uint64, target int, kill func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var (
		acks    atomic.Int64
		reached = make(chan struct{})
		once    sync.Once
		killed  atomic.Bool
		stop    atomic.Bool
		wg      sync.WaitGroup
	)
	errs := make([]error, len(ws)+1)
	for _, w := range ws {
		w.newCycle()
	}
	fc, err := nbdtest.Dial(ctx, d.nbdAddr, "crash")
	if err != nil {
		t.Fatalf("flusher: %v", err)
	}
	var flushes atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer fc.Close()
		rng := rand.New(rand.NewPCG(seed, 99))
		marks := make([]int, len(ws))
		for !stop.Load() {
			for i, w := range ws {
				marks[i] = w.flushMark()
			}
			if err := fc.Flush(ctx); err != nil {
				if !killed.Load() {
					errs[len(ws)] = fmt.Errorf("flusher: %w", err)
				}
				return
			}
			flushes.Add(1)
			for i, w := range ws {
				w.flushDone(marks[i])
			}
			// Pace the flusher: it is a load generator, not a wait.
			select {
			case <-time.After(time.Duration(1+rng.IntN(50)) * time.Millisecond):
			case <-fc.Done():
			}
		}
	}()
	for i, w := range ws {
		c, err := nbdtest.Dial(ctx, d.nbdAddr, "crash")
		if err != nil {
			t.Fatalf("writer %d: %v", i, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			err := w.run(ctx, c, rng, cycle, &stop, func() {
				if acks.Add(1) == int64(target) {
					once.Do(func() { close(reached) })
				}
			})
			if err != nil && !killed.Load() {
				errs[i] = err
			}
		}()
	}
	select {
	case <-reached:
	case <-ctx.Done():
		t.Errorf("writers reached %d of %d acknowledged writes before the deadline", acks.Load(), target)
	}
	if kill != nil {
		killed.Store(true)
		kill()
	}
	stop.Store(true)
	wg.Wait()
	st.flushes += flushes.Load()
	for i, err := range errs {
		if err != nil {
			t.Errorf("writer %d before the kill: %v", i, err)
		}
	}
}

// run issues writes, trims, zeroes and flushes at QD1 until stop is set
// or a request fails (stord was killed).
func (w *crashWriter) run(ctx context.Context, c *nbdtest.Client, rng *rand.Rand, cycle uint32, stop *atomic.Bool, acked func()) error {
	buf := make([]byte, 16*crashBlock)
	untilFlush := 1 + rng.IntN(40)
	for !stop.Load() {
		if untilFlush == 0 {
			mark := w.flushMark()
			if err := c.Flush(ctx); err != nil {
				return fmt.Errorf("flush: %w", err)
			}
			w.flushDone(mark)
			w.mu.Lock()
			w.mu.flushes++
			w.mu.Unlock()
			untilFlush = 1 + rng.IntN(40)
			continue
		}
		untilFlush--
		n := uint64(1 + rng.IntN(16))
		lo := w.lo + rng.Uint64N(w.hi-w.lo-n+1)
		w.seq++
		v := bver{seq: w.seq}
		op := rng.IntN(100)
		if op >= 85 {
			v.zero = true
		}
		w.issue(lo, n, v)
		var err error
		fua := false
		off, length := int64(lo*crashBlock), int64(n*crashBlock)
		switch {
		case op >= 93:
			err = c.Trim(ctx, off, length)
		case op >= 85:
			err = c.WriteZeroes(ctx, off, length, op%2 == 0)
		default:
			p := buf[:length]
			for i := uint64(0); i < n; i++ {
				stamp(p[i*crashBlock:(i+1)*crashBlock], lo+i, w.id, cycle, v.seq)
			}
			fua = op < 8
			err = c.WriteAt(ctx, p, off, fua)
		}
		if err != nil {
			return fmt.Errorf("seq %d at block %d+%d: %w", v.seq, lo, n, err)
		}
		w.ack(lo, n, v, fua)
		acked()
	}
	return nil
}

// verifyCrash reads the whole volume and checks every block against the
// books. After a SIGKILL a block must hold its durable version or one
// issued later; after a clean stop (SIGTERM drains and flushes) it must
// hold its newest acknowledged version or one issued later. It then
// flushes and makes what it read the durable state.
func verifyCrash(t *testing.T, d *daemon, ws []*crashWriter, st *crashStats, clean bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := nbdtest.Dial(ctx, d.nbdAddr, "crash")
	if err != nil {
		t.Fatalf("after restart: %v\n%s", err, d.tail())
	}
	defer c.Close()
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	reports := 0
	report := func(format string, args ...any) {
		if reports < 20 {
			t.Errorf(format, args...)
		}
		reports++
	}
	for off := int64(0); off < crashVolume; off += chunk {
		if err := c.ReadAt(ctx, buf, off); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		for i := 0; i < chunk/crashBlock; i++ {
			b := uint64(off/crashBlock) + uint64(i)
			w := ws[b*crashWriters/crashBlocks]
			s := &w.mu.blocks[b-w.lo] // the writers are joined
			r := parseStamp(buf[i*crashBlock : (i+1)*crashBlock])
			if !s.dur.zero || s.dur.seq > 0 {
				st.checked++
			}
			switch {
			case r.torn:
				st.torn++
				report("block %d (writer %d): torn or corrupt; durable seq %d, candidates %v", b, w.id, s.dur.seq, s.cand)
				continue
			case !r.zero && (r.block != b || r.writer != w.id):
				st.misplaced++
				report("block %d (writer %d): holds the stamp of block %d writer %d seq %d", b, w.id, r.block, r.writer, r.seq)
				continue
			}
			got := bver{seq: r.seq, zero: r.zero}
			// at: index in [dur, cand...] of the version read, -1 if none.
			at := -1
			if matches(s.dur, got) {
				at = 0
			}
			for j, v := range s.cand {
				if matches(v, got) {
					at = j + 1
				}
			}
			lastAcked := 0
			for j, v := range s.cand {
				if v.acked {
					lastAcked = j + 1
				}
			}
			if at < 0 || clean && at < lastAcked {
				st.lost++
				report("block %d (writer %d): read %+v; durable %+v, issued since %v", b, w.id, got, s.dur, s.cand)
				continue
			}
			if at < len(s.cand) {
				rolled := false
				for _, v := range s.cand[at:] {
					rolled = rolled || v.acked
				}
				if rolled {
					st.rolledBack++
				} else {
					st.notLanded++
				}
			}
			// Remember what is there; the flush below makes it durable.
			if got.zero {
				got.seq = 0
			}
			s.dur, s.cand = got, nil
		}
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("flush after recovery: %v", err)
	}
	if reports > 20 {
		t.Errorf("... %d more", reports-20)
	}
	if t.Failed() {
		t.FailNow()
	}
}

// matches reports whether a block read as got holds version v.
func matches(v, got bver) bool {
	if v.zero || got.zero {
		return v.zero == got.zero
	}
	return v.seq == got.seq
}

package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// truncFixture appends n random records (opnums 1..n) to a journal of
// small segments and returns them with their positions.
func truncFixture(t *testing.T, j *Journal, rng *rand.Rand, n int) ([]Record, []Pos) {
	t.Helper()
	var want []Record
	var poss []Pos
	for op := uint64(1); op <= uint64(n); op++ {
		r := randRecord(rng, op, 200)
		pos, err := j.Append(r)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, cloneRecord(r))
		poss = append(poss, pos)
	}
	return want, poss
}

// checkJournal checks that j holds exactly want (Replay, ReadAt at poss,
// LastOpNum) and that its segment table is well formed.
func checkJournal(t *testing.T, j *Journal, want []Record, poss []Pos) {
	t.Helper()
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got, want)
	var last uint64
	if n := len(want); n > 0 {
		last = want[n-1].OpNum
	}
	if j.LastOpNum() != last {
		t.Fatalf("LastOpNum %d, want %d", j.LastOpNum(), last)
	}
	for i, pos := range poss {
		if len(want[i].Data) == 0 {
			continue
		}
		b := make([]byte, len(want[i].Data))
		if err := j.ReadAt(b, pos); err != nil {
			t.Fatalf("op %d: ReadAt %v: %v", want[i].OpNum, pos, err)
		}
		if !bytes.Equal(b, want[i].Data) {
			t.Fatalf("op %d: ReadAt differs", want[i].OpNum)
		}
	}
	segs := j.Segments()
	for i, s := range segs {
		if i > 0 && s.ID <= segs[i-1].ID {
			t.Fatalf("segment ids not increasing: %+v", segs)
		}
		if s.Active != (i == len(segs)-1) {
			t.Fatalf("active segment is not the last: %+v", segs)
		}
	}
}

// TestTruncateFrom cuts a journal of many small segments at every kind of
// point (inside the active segment, inside a sealed one, at a segment's
// first record, everything, nothing), appends new records at the cut
// opnums, and checks the result live and after a reopen, on the in-memory
// FS (rewrite path) and on a real directory (truncate path).
func TestTruncateFrom(t *testing.T) {
	for _, disk := range []string{"mem", "os"} {
		for _, cut := range []uint64{1, 2, 7, 13, 29, 30, 31, 40, 100} {
			var fs vfs.FS = vfs.NewMem()
			dir := "j"
			if disk == "os" {
				fs, dir = vfs.Default, t.TempDir()
			}
			opts := Options{SegmentSize: 600}
			j := openT(t, fs, dir, opts)
			rng := rand.New(rand.NewPCG(uint64(cut), 9))
			want, poss := truncFixture(t, j, rng, 30)
			// Make the cut land on a segment's first record too.
			if cut == 13 {
				for _, s := range j.Segments() {
					if s.FirstOp > 5 {
						cut = s.FirstOp
						break
					}
				}
			}
			if err := j.TruncateFrom(cut); err != nil {
				t.Fatalf("%s cut %d: %v", disk, cut, err)
			}
			k := min(int(cut-1), len(want))
			want, poss = want[:k], poss[:k]
			checkJournal(t, j, want, poss)
			if j.SyncedOpNum() > j.LastOpNum() {
				t.Fatalf("%s cut %d: synced %d past last %d", disk, cut, j.SyncedOpNum(), j.LastOpNum())
			}
			// New records at the cut opnums, different from the old ones.
			for op := uint64(k + 1); op <= uint64(k+8); op++ {
				r := randRecord(rng, op, 200)
				r.Epoch = 99
				pos, err := j.Append(r)
				if err != nil {
					t.Fatal(err)
				}
				want, poss = append(want, cloneRecord(r)), append(poss, pos)
			}
			checkJournal(t, j, want, poss)
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			j = openT(t, fs, dir, opts)
			checkJournal(t, j, want, poss)
			j.Close()
		}
	}
}

// TestTruncateFromErrors: closed and poisoned journals refuse.
func TestTruncateFromErrors(t *testing.T) {
	j := openT(t, vfs.NewMem(), "j", Options{})
	if err := j.TruncateFrom(1); err != nil {
		t.Fatalf("empty journal: %v", err)
	}
	j.Close()
	if err := j.TruncateFrom(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("closed: %v", err)
	}
}

// TestTruncateFromPowerLoss loses power after every fsync inside TruncateFrom
// (and once after it, with new unsynced records at the cut opnums): after
// recovery the journal must hold every record before the cut and, past
// it, only a prefix of the old records (the cut did not finish) or only
// new ones (it did) — never old records after a completed cut, never a gap.
func TestTruncateFromPowerLoss(t *testing.T) {
	for _, cut := range []uint64{3, 11, 13, 22, 30} {
		for crashAt := 0; ; crashAt++ {
			mem := vfs.NewStrictMem()
			fs := &crashFS{MemFS: mem} // left 0: counts down past 0, never crashes
			opts := Options{SegmentSize: 600}
			j := openT(t, fs, "j", opts)
			rng := rand.New(rand.NewPCG(cut, 7))
			old, _ := truncFixture(t, j, rng, 30)
			if cut == 13 { // a segment's first record
				for _, s := range j.Segments() {
					if s.FirstOp > 5 {
						cut = s.FirstOp
						break
					}
				}
			}
			if err := j.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
			fs.left = crashAt // power lost right after the crashAt-th fsync
			if crashAt == 0 {
				mem.SetIgnoreSyncs(true)
			}
			err := j.TruncateFrom(cut)
			completed := fs.left > 0 // every fsync happened before the power loss
			if err != nil {
				t.Fatal(err) // ignored fsyncs do not fail
			}
			var fresh []Record
			if completed {
				// Unsynced new records at the cut opnums.
				for op := cut; op < cut+5; op++ {
					r := randRecord(rng, op, 200)
					r.Epoch = 99
					if _, err := j.Append(r); err != nil {
						t.Fatal(err)
					}
					fresh = append(fresh, cloneRecord(r))
				}
				mem.SetIgnoreSyncs(true)
			}
			j.Close()
			mem.ResetToSyncedState()
			mem.SetIgnoreSyncs(false)

			j = openT(t, fs, "j", opts)
			got, _ := replayAll(t, j, 0)
			j.Close()
			k := int(cut - 1)
			if len(got) < k {
				t.Fatalf("cut %d crash at fsync %d: %d records survive, want at least %d", cut, crashAt, len(got), k)
			}
			checkRecords(t, got[:k], old[:k])
			past := got[k:]
			switch {
			case completed:
				if len(past) > len(fresh) {
					t.Fatalf("cut %d crash at fsync %d: %d records past a completed cut, %d appended after it", cut, crashAt, len(past), len(fresh))
				}
				checkRecords(t, past, fresh[:len(past)])
			case len(past) > 0 && past[0].Epoch == 99:
				t.Fatalf("cut %d crash at fsync %d: new records before the cut completed", cut, crashAt)
			default:
				if len(past) > len(old)-k {
					t.Fatalf("cut %d crash at fsync %d: %d records past the cut", cut, crashAt, len(past))
				}
				checkRecords(t, past, old[k:k+len(past)])
			}
			if completed {
				break
			}
		}
	}
}

// TestTruncateFromConcurrent truncates and appends while other goroutines
// sync and read records that are never cut: the reads must succeed, and
// every Sync must return nil (-race checks the locking). Syncs and cuts
// are serialized by the caller, as TruncateFrom requires.
func TestTruncateFromConcurrent(t *testing.T) {
	j := openT(t, vfs.NewMem(), "j", Options{SegmentSize: 600})
	defer j.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	base, poss := truncFixture(t, j, rng, 10) // ops 1..10 are never cut
	stop := make(chan struct{})
	errc := make(chan error, 2)
	var cutMu sync.RWMutex // syncs share it; a cut takes it alone
	go func() {
		for {
			select {
			case <-stop:
				errc <- nil
				return
			default:
			}
			cutMu.RLock()
			err := j.Sync(context.Background())
			cutMu.RUnlock()
			if err != nil {
				errc <- err
				return
			}
		}
	}()
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				errc <- nil
				return
			default:
			}
			k := i % len(base)
			b := make([]byte, len(base[k].Data))
			if err := j.ReadAt(b, poss[k]); err != nil || !bytes.Equal(b, base[k].Data) {
				errc <- fmt.Errorf("read op %d: %v", base[k].OpNum, err)
				return
			}
		}
	}()
	last := uint64(10)
	for round := 0; round < 200; round++ {
		for n := rng.IntN(6); n > 0; n-- {
			last++
			if _, err := j.Append(randRecord(rng, last, 200)); err != nil {
				t.Fatal(err)
			}
		}
		cut := 11 + rng.Uint64N(last-9)
		cutMu.Lock()
		err := j.TruncateFrom(cut)
		cutMu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		last = min(last, cut-1)
		if j.LastOpNum() != last {
			t.Fatalf("round %d: last %d, want %d", round, j.LastOpNum(), last)
		}
	}
	close(stop)
	for range 2 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got[:10], base)
}

package journal

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// oracle is the naive model of a journal: the live records in order.
type oracle struct {
	recs []Record
	pos  []Pos
}

func (o *oracle) after(op uint64) []Record {
	for i := range o.recs {
		if o.recs[i].OpNum > op {
			return o.recs[i:]
		}
	}
	return nil
}

// keep drops records for which drop returns true.
func (o *oracle) keep(drop func(r *Record, p Pos) bool) {
	var recs []Record
	var pos []Pos
	for i := range o.recs {
		if !drop(&o.recs[i], o.pos[i]) {
			recs = append(recs, o.recs[i])
			pos = append(pos, o.pos[i])
		}
	}
	o.recs, o.pos = recs, pos
}

// TestRandomOracle drives a journal with a seeded random mix of appends,
// syncs, rotations, removals, reads, replays, clean reopens, process kills
// and power losses, and checks it against the naive model.
func TestRandomOracle(t *testing.T) {
	seeds := 12
	if testing.Short() {
		seeds = 3
	}
	for seed := range seeds {
		runOracle(t, uint64(seed), 400)
	}
}

func runOracle(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 77))
	opts := Options{SegmentSize: int64(2<<10 + rng.IntN(16<<10))}
	fs := vfs.NewStrictMem()
	j := openT(t, fs, "j", opts)
	defer func() { j.Close() }()
	var o oracle
	op := uint64(0)
	expLast := uint64(0) // LastOpNum as the model sees it
	// reopened sets expLast to the last live record: all Open can know.
	reopened := func() {
		expLast = 0
		if len(o.recs) > 0 {
			expLast = o.recs[len(o.recs)-1].OpNum
		}
	}
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d: "+format, append([]any{seed}, args...)...)
	}
	checkReplay := func(after uint64) {
		t.Helper()
		got, pos := replayAll(t, j, after)
		want := o.after(after)
		if len(got) != len(want) {
			fail("Replay(%d): %d records, want %d", after, len(got), len(want))
		}
		if j.LastOpNum() != expLast {
			fail("LastOpNum %d, want %d", j.LastOpNum(), expLast)
		}
		off := len(o.recs) - len(want)
		for i := range got {
			if !sameRecord(&got[i], &want[i]) || pos[i] != o.pos[off+i] {
				fail("Replay(%d) record %d: %s at %v, want %s at %v", after, i,
					fmtRecord(&got[i]), pos[i], fmtRecord(&want[i]), o.pos[off+i])
			}
		}
	}
	for step := range steps {
		switch k := rng.IntN(100); {
		case k < 50:
			op += 1 + uint64(rng.IntN(3))
			r := randRecord(rng, op, 3000)
			pos, err := j.Append(r)
			if err != nil {
				fail("step %d: Append: %v", step, err)
			}
			o.recs = append(o.recs, cloneRecord(r))
			o.pos = append(o.pos, pos)
			expLast = op
		case k < 60:
			if err := j.Sync(context.Background()); err != nil {
				fail("step %d: Sync: %v", step, err)
			}
			if j.SyncedOpNum() != j.LastOpNum() {
				fail("step %d: SyncedOpNum %d after Sync, LastOpNum %d", step, j.SyncedOpNum(), j.LastOpNum())
			}
		case k < 64:
			if _, err := j.Rotate(); err != nil {
				fail("step %d: Rotate: %v", step, err)
			}
		case k < 68:
			segs := j.Segments()
			if len(segs) < 2 {
				continue
			}
			victim := segs[rng.IntN(len(segs)-1)].ID
			if err := j.Remove(victim); err != nil {
				fail("step %d: Remove(%d): %v", step, victim, err)
			}
			o.keep(func(_ *Record, p Pos) bool { return p.Seg == victim })
		case k < 80:
			if len(o.recs) == 0 {
				continue
			}
			i := rng.IntN(len(o.recs))
			d := o.recs[i].Data
			if len(d) == 0 {
				continue
			}
			a := rng.IntN(len(d))
			b := a + 1 + rng.IntN(len(d)-a)
			got := make([]byte, b-a)
			if err := j.ReadAt(got, Pos{o.pos[i].Seg, o.pos[i].Off + int64(a)}); err != nil {
				fail("step %d: ReadAt: %v", step, err)
			}
			if !bytes.Equal(got, d[a:b]) {
				fail("step %d: ReadAt op %d [%d,%d) differs", step, o.recs[i].OpNum, a, b)
			}
		case k < 85:
			checkReplay(uint64(rng.IntN(int(op) + 2)))
		case k < 90:
			if err := j.Close(); err != nil {
				fail("step %d: Close: %v", step, err)
			}
			j = openT(t, fs, "j", opts)
			reopened()
			checkReplay(0)
		case k < 94:
			// Process kill: the page cache survives.
			killed := vfs.NewStrictMem()
			if _, err := vfs.Clone(fs, killed, "j", "j", vfs.CloneSync); err != nil {
				fail("step %d: clone: %v", step, err)
			}
			j.Close()
			fs = killed
			j = openT(t, fs, "j", opts)
			reopened()
			checkReplay(0)
		default:
			// Power loss: what was synced survives, as a prefix.
			synced := j.SyncedOpNum()
			powerLoss(t, fs, j)
			j = openT(t, fs, "j", opts)
			last := j.LastOpNum()
			var floor uint64 // the last live record known durable
			for i := range o.recs {
				if o.recs[i].OpNum <= synced {
					floor = o.recs[i].OpNum
				}
			}
			if last < floor || last > op {
				fail("step %d: after power loss LastOpNum %d, want in [%d, %d]", step, last, floor, op)
			}
			o.keep(func(r *Record, _ Pos) bool { return r.OpNum > last })
			reopened()
			checkReplay(0)
		}
	}
	// A final check, and ErrRemoved for everything removed.
	checkReplay(0)
	live := map[uint64]bool{}
	for _, s := range j.Segments() {
		live[s.ID] = true
	}
	for id := uint64(1); id < j.Segments()[len(j.Segments())-1].ID; id++ {
		if !live[id] {
			if err := j.ReadAt(make([]byte, 1), Pos{id, HeaderSize}); !errors.Is(err, ErrRemoved) {
				fail("ReadAt of removed segment %d: %v", id, err)
			}
		}
	}
}

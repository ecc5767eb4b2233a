package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// recycleRig appends killData records and removes old segments the way the
// engine does (sealed, and only once what replaced them is synced), so new
// segments reuse removed segments' files, stale records and all.
type recycleRig struct {
	t       *testing.T
	fs      vfs.FS
	opts    Options
	j       *Journal
	op      uint64 // last appended
	removed uint64 // every opnum <= removed may be gone
}

func (r *recycleRig) append(n int) {
	for range n {
		r.op++
		d := killData(r.op)
		if _, err := r.j.Append(&Record{Kind: KindWrite, Epoch: 1, OpNum: r.op, Len: int64(len(d)), Data: d}); err != nil {
			r.t.Fatal(err)
		}
	}
}

// removeOld removes every sealed segment but the newest keep whose records
// are all synced.
func (r *recycleRig) removeOld(keep int) {
	segs := r.j.Segments()
	synced := r.j.SyncedOpNum()
	for i, s := range segs {
		if s.Active || i >= len(segs)-1-keep || s.LastOp > synced {
			break
		}
		if err := r.j.Remove(s.ID); err != nil {
			r.t.Fatal(err)
		}
		r.removed = max(r.removed, s.LastOp)
	}
}

// check replays r.j and wants a gapless run of exact records that covers
// (removed, atLeast] and ends at r.j.LastOpNum().
func (r *recycleRig) check(atLeast uint64, what string) {
	r.t.Helper()
	var ops []uint64
	err := r.j.Replay(0, func(rec *Record, _ Pos) error {
		if !bytes.Equal(rec.Data, killData(rec.OpNum)) {
			return fmt.Errorf("record %d holds other data", rec.OpNum)
		}
		if n := len(ops); n > 0 && rec.OpNum != ops[n-1]+1 {
			return fmt.Errorf("record %d after %d", rec.OpNum, ops[n-1])
		}
		ops = append(ops, rec.OpNum)
		return nil
	})
	if err != nil {
		r.t.Fatalf("%s: replay: %v", what, err)
	}
	last := r.j.LastOpNum()
	if last < atLeast && atLeast > r.removed {
		r.t.Fatalf("%s: last opnum %d, want at least %d", what, last, atLeast)
	}
	if len(ops) > 0 && (ops[0] > r.removed+1 || ops[len(ops)-1] != last) {
		r.t.Fatalf("%s: records %d..%d, want from <= %d to %d", what, ops[0], ops[len(ops)-1], r.removed+1, last)
	}
	if len(ops) == 0 && last > r.removed {
		r.t.Fatalf("%s: no records, last opnum %d, removed up to %d", what, last, r.removed)
	}
}

// TestRecycledSegments: removed segments' files are reused by new
// segments (fewer files created), and what they held before never shows
// through: not after Close, not after a process kill (the page cache
// keeps everything), not after a power loss (only synced records are
// owed).
func TestRecycledSegments(t *testing.T) {
	fs := vfs.NewStrictMem()
	cfs := &countFS{FS: fs}
	r := &recycleRig{t: t, fs: cfs, opts: Options{SegmentSize: 8 << 10, Recycle: 4}}
	r.j = openT(t, cfs, "j", r.opts)
	rng := rand.New(rand.NewPCG(21, 22))
	for round := range 60 {
		for range 1 + rng.IntN(8) {
			r.append(1 + rng.IntN(40))
			if rng.IntN(3) == 0 {
				if err := r.j.Sync(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			r.removeOld(rng.IntN(3))
		}
		synced := r.j.SyncedOpNum()
		switch round % 3 {
		case 0: // clean close
			if err := r.j.Close(); err != nil {
				t.Fatal(err)
			}
			synced = r.op
		case 1: // process kill: the page cache survives
			killed := vfs.NewStrictMem()
			if _, err := vfs.Clone(fs, killed, "j", "j"); err != nil {
				t.Fatal(err)
			}
			r.j.Close()
			fs = killed
			cfs = &countFS{FS: fs}
			r.fs = cfs
			synced = r.op
		case 2: // power loss
			powerLoss(t, fs, r.j)
		}
		r.j = openT(t, r.fs, "j", r.opts)
		r.check(synced, fmt.Sprintf("round %d", round))
		r.op = max(r.j.LastOpNum(), r.removed) // all may be removed
	}
	r.j.Close()
	names, err := fs.List("j")
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(names, func(n string) bool { return strings.HasSuffix(n, freeSuffix) }) {
		t.Fatalf("Close left pooled files: %v", names)
	}
}

// TestRecycleReuses: after removals, new segments take the removed files
// instead of creating new ones, up to Options.Recycle files.
func TestRecycleReuses(t *testing.T) {
	cfs := &countFS{FS: vfs.NewMem()}
	r := &recycleRig{t: t, fs: cfs, opts: Options{SegmentSize: 4 << 10, Recycle: 3}}
	r.j = openT(t, cfs, "j", r.opts)
	defer r.j.Close()
	r.append(100)
	if err := r.j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.removeOld(0)
	before := cfs.creates.Load()
	segs := len(r.j.Segments())
	r.append(100) // as many rotations again
	if got := cfs.creates.Load() - before; got != int64(len(r.j.Segments())-segs-3) {
		t.Fatalf("%d files created for %d new segments, want 3 reused", got, len(r.j.Segments())-segs)
	}
	r.check(r.op, "after reuse")
	if err := r.j.DropRecycled(); err != nil {
		t.Fatal(err)
	}
}

// TestRecycleWaitsForReaders: a removed segment's file is not reused while
// a reader holds the segment; the reader keeps reading its records.
func TestRecycleWaitsForReaders(t *testing.T) {
	r := &recycleRig{t: t, fs: vfs.NewMem(), opts: Options{SegmentSize: 4 << 10, Recycle: 8}}
	r.j = openT(t, r.fs, "j", r.opts)
	defer r.j.Close()
	r.append(40)
	if err := r.j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	first := r.j.Segments()[0]
	want := first.FirstOp
	err := r.j.Replay(0, func(rec *Record, _ Pos) error {
		if rec.OpNum == first.FirstOp {
			// Remove the segment being read and make new segments that
			// would like its file.
			if err := r.j.Remove(first.ID); err != nil {
				return err
			}
			r.append(40)
		}
		if rec.OpNum != want || !bytes.Equal(rec.Data, killData(rec.OpNum)) {
			return fmt.Errorf("replay read record %d as %s", want, fmtRecord(rec))
		}
		want++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want != 41 {
		t.Fatalf("replay ended before %d", want)
	}
	r.removed = first.LastOp
	r.check(r.op, "after reuse")
}

// TestTornReusedSegment: a sealed segment in a reused file whose tail, after
// a power loss, holds the earlier use's records instead of its own last
// records and seal (the kernel wrote a newer segment's pages back first)
// is cut, and the newer segments are dropped: with the seal not on disk,
// no Sync finished after the rotation, so nothing in them was reported
// durable. With the seal there, the same damage is corruption.
func TestTornReusedSegment(t *testing.T) {
	enc := func(seg uint64, ops ...uint64) []byte {
		var b []byte
		for _, op := range ops {
			d := killData(op)
			rb := make([]byte, HeaderSize+len(d))
			encodeRecord(rb, &Record{Kind: KindWrite, OpNum: op, Len: int64(len(d)), Data: d}, segTag(seg))
			b = append(b, rb...)
		}
		return b
	}
	seal := make([]byte, HeaderSize)
	encodeHeader(seal, &Record{Kind: kindSeal}, segTag(1))
	for _, sealed := range []bool{false, true} {
		fs := vfs.NewMem()
		if err := fs.MkdirAll("j", 0o755); err != nil {
			t.Fatal(err)
		}
		mine := enc(1, 1, 2, 3, 4, 5)
		stale := enc(7, 50, 51, 52, 53, 54, 55, 56) // the file's earlier use
		seg1 := append(bytes.Clone(mine[:len(mine)/2]), stale[len(mine)/2:]...)
		if sealed {
			copy(seg1[len(seg1)-HeaderSize:], seal)
		}
		writeFile(t, fs, "j/"+segName(1), seg1)
		writeFile(t, fs, "j/"+segName(2), enc(2, 6, 7))
		j, err := Open(fs, "j", Options{})
		if sealed {
			var ce *CorruptError
			if !errors.As(err, &ce) || ce.Seg != 1 {
				t.Fatalf("sealed: Open = %v, want CorruptError in segment 1", err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		r := &recycleRig{t: t, fs: fs, j: j}
		r.check(0, "torn")
		if segs := j.Segments(); len(segs) != 1 || segs[0].ID != 1 || segs[0].LastOp >= 5 {
			t.Fatalf("segments %+v, want segment 1 alone, cut inside its records", segs)
		}
		if _, err := fs.Stat("j/" + segName(2)); err == nil {
			t.Fatal("the newer segment survived")
		}
		j.Close()
	}
}

// TestCutPastSegmentSize: the newest segment's records may end past
// SegmentSize (the record that crossed it); a torn tail cut after them, at
// Open, keeps them all (presize once shrank the file back to SegmentSize,
// and the reopened journal failed to replay: seen in the crash test with
// 1 MiB segments).
func TestCutPastSegmentSize(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 64 << 10}
	j := openT(t, vfs.Default, dir, opts)
	r := &recycleRig{t: t, fs: vfs.Default, j: j}
	for j.Segments()[0].Size <= opts.SegmentSize {
		r.append(1)
	}
	if n := len(j.Segments()); n != 1 {
		t.Fatalf("%d segments, want the first still active", n)
	}
	// A process kill: copy what the page cache holds, then tear the tail.
	killed := t.TempDir()
	if _, err := vfs.Clone(vfs.Default, vfs.Default, dir, killed); err != nil {
		t.Fatal(err)
	}
	end := j.Segments()[0].Size
	j.Close()
	name := vfs.Default.PathJoin(killed, segName(1))
	b := fileBytes(t, vfs.Default, name)
	b = append(b[:end], "torn"...)
	writeFile(t, vfs.Default, name, b)
	r.j = openT(t, vfs.Default, killed, opts)
	defer r.j.Close()
	r.check(r.op, "reopened")
	if r.j.LastOpNum() != r.op {
		t.Fatalf("last opnum %d, want %d", r.j.LastOpNum(), r.op)
	}
}

package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// powerLoss models a machine crash of a StrictMem FS under an open journal:
// nothing after this is synced, and everything not synced is lost.
func powerLoss(t testing.TB, fs *vfs.MemFS, j *Journal) {
	t.Helper()
	fs.SetIgnoreSyncs(true)
	j.Close() // releases the lock; its fsyncs are ignored
	fs.ResetToSyncedState()
	fs.SetIgnoreSyncs(false)
}

// tornFixture is a journal of one segment whose last record is a write.
type tornFixture struct {
	file      []byte // the segment's bytes
	lastStart int64  // file offset of the last record
	want      []Record
}

func makeTornFixture(t *testing.T) tornFixture {
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{})
	rng := rand.New(rand.NewPCG(5, 6))
	var fx tornFixture
	for op := uint64(1); op <= 5; op++ {
		r := randRecord(rng, op, 300)
		if op == 5 {
			r = &Record{Kind: KindWrite, Epoch: 2, OpNum: 5, Off: 4096, Len: 100, Data: bytes.Repeat([]byte{0xab}, 100), Aux: []byte("aux-bytes")}
		}
		pos, err := j.Append(r)
		if err != nil {
			t.Fatal(err)
		}
		if op == 5 {
			fx.lastStart = pos.Off - HeaderSize
		}
		fx.want = append(fx.want, cloneRecord(r))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	fx.file = fileBytes(t, fs, "j/"+segName(1))
	return fx
}

// checkRecovered opens a journal whose single segment holds b and checks that
// exactly want survives, that the tail was cut, and that appends follow.
func checkRecovered(t *testing.T, fs vfs.FS, dir string, b []byte, want []Record, validEnd int64) {
	t.Helper()
	if err := fs.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	name := fs.PathJoin(dir, segName(1))
	writeFile(t, fs, name, b)
	j := openT(t, fs, dir, Options{})
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got, want)
	if segs := j.Segments(); len(segs) != 1 || segs[0].Size != validEnd {
		t.Fatalf("segments after recovery: %+v, want one of %d bytes", segs, validEnd)
	}
	// Cut at validEnd; on a file system that can truncate, presized again
	// (zeros past the cut).
	st, err := fs.Stat(name)
	if err != nil || (st.Size() != validEnd && st.Size() != DefaultSegmentSize) {
		t.Fatalf("segment file not cut to %d bytes: %v %v", validEnd, st.Size(), err)
	}
	if st.Size() > validEnd {
		f, err := fs.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		tail := make([]byte, min(64<<10, st.Size()-validEnd))
		if _, err := f.ReadAt(tail, validEnd); err != nil {
			t.Fatal(err)
		}
		f.Close()
		if !bytes.Equal(tail, make([]byte, len(tail))) {
			t.Fatalf("bytes past the cut at %d survived", validEnd)
		}
	}
	next := &Record{Kind: KindMeta, OpNum: 100, Aux: []byte("after")}
	if _, err := j.Append(next); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, fs, dir, Options{})
	got, _ = replayAll(t, j, 0)
	checkRecords(t, got, append(append([]Record(nil), want...), *next))
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestTornTail cuts the last record at every byte offset, and flips every
// byte of it: Open keeps exactly the records before it.
func TestTornTail(t *testing.T) {
	fx := makeTornFixture(t)
	end := int64(len(fx.file))
	for cut := fx.lastStart; cut < end; cut++ {
		checkRecovered(t, vfs.NewMem(), "j", fx.file[:cut], fx.want[:4], fx.lastStart)
	}
	for i := fx.lastStart; i < end; i++ {
		for _, mask := range []byte{0x01, 0xff} {
			b := bytes.Clone(fx.file)
			b[i] ^= mask
			checkRecovered(t, vfs.NewMem(), "j", b, fx.want[:4], fx.lastStart)
		}
	}
	// Zeros past the end (a preallocated or extended file) are a torn tail.
	b := append(bytes.Clone(fx.file), make([]byte, 4096)...)
	checkRecovered(t, vfs.NewMem(), "j", b, fx.want, end)
	// The whole file intact.
	checkRecovered(t, vfs.NewMem(), "j", fx.file, fx.want, end)
}

// TestTornTailDisk runs the torn-tail cases on a real file system, where the
// cut is a truncate rather than a rewrite.
func TestTornTailDisk(t *testing.T) {
	fx := makeTornFixture(t)
	end := int64(len(fx.file))
	dir := t.TempDir()
	for i, cut := range []int64{fx.lastStart + 1, fx.lastStart + HeaderSize - 1, fx.lastStart + HeaderSize, end - 1} {
		checkRecovered(t, vfs.Default, filepath.Join(dir, "cut", string(rune('a'+i))), fx.file[:cut], fx.want[:4], fx.lastStart)
	}
	for i, at := range []int64{fx.lastStart, fx.lastStart + 20, fx.lastStart + HeaderSize + 50, end - 1} {
		b := bytes.Clone(fx.file)
		b[at] ^= 0x10
		checkRecovered(t, vfs.Default, filepath.Join(dir, "flip", string(rune('a'+i))), b, fx.want[:4], fx.lastStart)
	}
}

// TestCorruptNewestMiddle: an invalid record in the middle of the newest
// segment cuts everything after it (the spec treats it as a torn tail).
func TestCorruptNewestMiddle(t *testing.T) {
	fx := makeTornFixture(t)
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{})
	var starts []int64
	for _, r := range fx.want {
		pos, err := j.Append(&r)
		if err != nil {
			t.Fatal(err)
		}
		starts = append(starts, pos.Off-HeaderSize)
	}
	j.Close()
	b := fileBytes(t, fs, "j/"+segName(1))
	b[starts[2]+10] ^= 1
	checkRecovered(t, vfs.NewMem(), "j", b, fx.want[:2], starts[2])
}

// twoSegments writes records 1..n into segment 1 and n+1..2n into segment 2.
func twoSegments(t *testing.T, n int) (*vfs.MemFS, []Record, []int64) {
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{})
	rng := rand.New(rand.NewPCG(7, 8))
	var want []Record
	var starts []int64 // record offsets in segment 1
	for op := uint64(1); op <= uint64(2*n); op++ {
		if op == uint64(n+1) {
			if _, err := j.Rotate(); err != nil {
				t.Fatal(err)
			}
		}
		r := randRecord(rng, op, 200)
		pos, err := j.Append(r)
		if err != nil {
			t.Fatal(err)
		}
		if pos.Seg == 1 {
			starts = append(starts, pos.Off-HeaderSize)
		}
		want = append(want, cloneRecord(r))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	return fs, want, starts
}

func TestCorruptOlderSegment(t *testing.T) {
	fs, _, starts := twoSegments(t, 6)
	name := "j/" + segName(1)
	b := fileBytes(t, fs, name)
	b[starts[3]+HeaderSize-2] ^= 0x40 // the crc of record 4
	writeFile(t, fs, name, b)
	_, err := Open(fs, "j", Options{})
	var ce *CorruptError
	if !errors.Is(err, ErrCorrupt) || !errors.As(err, &ce) || ce.Seg != 1 || ce.Off != starts[3] {
		t.Fatalf("Open = %v, want CorruptError at segment 1 offset %d", err, starts[3])
	}
	// So is a damaged but complete last record of an older segment while the
	// newer one holds records: it may have been acknowledged (the seal
	// record after it says the segment was written to its end).
	fs, _, starts = twoSegments(t, 6)
	b = fileBytes(t, fs, name)
	seal := int64(len(b)) - HeaderSize
	b[seal-1] ^= 1
	writeFile(t, fs, name, b)
	if _, err := Open(fs, "j", Options{}); !errors.As(err, &ce) || ce.Seg != 1 || ce.Off != starts[5] {
		t.Fatalf("Open = %v, want CorruptError at segment 1 offset %d", err, starts[5])
	}
	// And so is a damaged seal record.
	fs, _, _ = twoSegments(t, 6)
	b = fileBytes(t, fs, name)
	b[len(b)-1] ^= 1
	writeFile(t, fs, name, b)
	if _, err := Open(fs, "j", Options{}); !errors.As(err, &ce) || ce.Seg != 1 || ce.Off != seal {
		t.Fatalf("Open = %v, want CorruptError at segment 1 offset %d", err, seal)
	}
}

// TestTornOlderSegment: a sealed segment whose tail looks torn by a crash
// (cut short, or zeros, with no seal record after it) is cut even though a
// newer segment holds records:
// Sync fsyncs sealed segments first, so none of those records was reported
// durable. The newer segments are dropped.
func TestTornOlderSegment(t *testing.T) {
	for _, tc := range []struct {
		name string
		tear func(b []byte, last int64) []byte
	}{
		{"short header", func(b []byte, last int64) []byte { return b[:last+10] }},
		{"record past the end", func(b []byte, last int64) []byte { return b[:len(b)-HeaderSize-1] }},
		{"zeros", func(b []byte, last int64) []byte { clear(b[last:]); return b }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs, want, starts := twoSegments(t, 6)
			name := "j/" + segName(1)
			writeFile(t, fs, name, tc.tear(fileBytes(t, fs, name), starts[5]))
			j := openT(t, fs, "j", Options{})
			defer j.Close()
			got, _ := replayAll(t, j, 0)
			checkRecords(t, got, want[:5])
			if segs := j.Segments(); len(segs) != 1 || !segs[0].Active || segs[0].Size != starts[5] {
				t.Fatalf("segments %+v", segs)
			}
			if _, err := fs.Stat("j/" + segName(2)); err == nil {
				t.Fatal("the newer segment survived")
			}
		})
	}
}

// TestTornTailAcrossRotation: a crash right after rotations leaves a torn
// older segment and empty or torn newer ones; Open cuts and drops them.
func TestTornTailAcrossRotation(t *testing.T) {
	fs, want, starts := twoSegments(t, 6)
	name1, name2 := "j/"+segName(1), "j/"+segName(2)
	b1 := fileBytes(t, fs, name1)
	b2 := fileBytes(t, fs, name2)
	writeFile(t, fs, name1, b1[:starts[5]+7])
	writeFile(t, fs, name2, b2[:HeaderSize-3]) // torn first record
	writeFile(t, fs, "j/"+segName(3), nil)     // created, never written
	j := openT(t, fs, "j", Options{})
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got, want[:5])
	segs := j.Segments()
	if len(segs) != 1 || segs[0].ID != 1 || !segs[0].Active || segs[0].Size != starts[5] {
		t.Fatalf("segments %+v", segs)
	}
	for _, n := range []string{name2, "j/" + segName(3)} {
		if _, err := fs.Stat(n); err == nil {
			t.Fatalf("%s survived the cut", n)
		}
	}
	if _, err := j.Append(&Record{Kind: KindMeta, OpNum: 6}); err != nil {
		t.Fatal(err)
	}
	if s, err := j.Rotate(); err != nil || s != 1 {
		t.Fatalf("Rotate = %d, %v", s, err)
	}
	j.Close()
}

func TestOpNumOrderOnDisk(t *testing.T) {
	fs := vfs.NewMem()
	if err := fs.MkdirAll("j", 0o755); err != nil {
		t.Fatal(err)
	}
	enc := func(seg uint64, ops ...uint64) []byte {
		var b []byte
		for _, op := range ops {
			r := &Record{Kind: KindMeta, OpNum: op}
			rb := make([]byte, HeaderSize)
			encodeRecord(rb, r, segTag(seg))
			b = append(b, rb...)
		}
		return b
	}
	writeFile(t, fs, "j/"+segName(1), enc(1, 1, 2, 3))
	writeFile(t, fs, "j/"+segName(2), enc(2, 3, 4))
	_, err := Open(fs, "j", Options{})
	var ce *CorruptError
	if !errors.As(err, &ce) || ce.Seg != 2 || ce.Off != 0 {
		t.Fatalf("Open = %v, want CorruptError at segment 2 offset 0", err)
	}
	writeFile(t, fs, "j/"+segName(2), enc(2, 4, 6, 5))
	if _, err := Open(fs, "j", Options{}); !errors.As(err, &ce) || ce.Seg != 2 || ce.Off != 2*HeaderSize {
		t.Fatalf("Open = %v, want CorruptError at segment 2 offset %d", err, 2*HeaderSize)
	}
	// Unrelated files and leftovers of an interrupted rewrite are handled.
	writeFile(t, fs, "j/"+segName(2), enc(2, 4, 6))
	writeFile(t, fs, "j/"+segName(2)+tmpSuffix, enc(2, 9))
	writeFile(t, fs, "j/notes.txt", []byte("hi"))
	j := openT(t, fs, "j", Options{})
	defer j.Close()
	if j.LastOpNum() != 6 {
		t.Fatalf("LastOpNum %d", j.LastOpNum())
	}
	if _, err := fs.Stat("j/" + segName(2) + tmpSuffix); err == nil {
		t.Fatal("leftover temporary file survived Open")
	}
}

// TestPowerLoss: records appended before a completed Sync survive a power
// loss; later ones may not; nothing is torn.
func TestPowerLoss(t *testing.T) {
	fs := vfs.NewStrictMem()
	j := openT(t, fs, "a/b/j", Options{SegmentSize: 4 << 10})
	rng := rand.New(rand.NewPCG(9, 10))
	var want []Record
	op := uint64(0)
	add := func(n int) {
		for range n {
			op++
			r := randRecord(rng, op, 1500)
			if _, err := j.Append(r); err != nil {
				t.Fatal(err)
			}
			want = append(want, cloneRecord(r))
		}
	}
	add(20)
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	synced := j.SyncedOpNum()
	if synced != op {
		t.Fatalf("SyncedOpNum %d, want %d", synced, op)
	}
	add(30) // rotates several times, never synced
	if len(j.Segments()) < 3 {
		t.Fatalf("expected rotations, have %v", j.Segments())
	}
	powerLoss(t, fs, j)

	j = openT(t, fs, "a/b/j", Options{SegmentSize: 4 << 10})
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got, want[:synced])
	if j.LastOpNum() != synced || j.SyncedOpNum() != synced {
		t.Fatalf("LastOpNum %d SyncedOpNum %d, want %d", j.LastOpNum(), j.SyncedOpNum(), synced)
	}
	// Sealed-but-unsynced segments are synced by the next Sync.
	want, op = want[:synced], synced
	add(30)
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	powerLoss(t, fs, j)
	j = openT(t, fs, "a/b/j", Options{SegmentSize: 4 << 10})
	defer j.Close()
	got, _ = replayAll(t, j, 0)
	checkRecords(t, got, want)
}

// TestProcessKill: a killed process loses nothing it appended (the page
// cache survives), even without Sync.
func TestProcessKill(t *testing.T) {
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{SegmentSize: 8 << 10})
	rng := rand.New(rand.NewPCG(11, 12))
	var want []Record
	for op := uint64(1); op <= 60; op++ {
		r := randRecord(rng, op, 1500)
		if _, err := j.Append(r); err != nil {
			t.Fatal(err)
		}
		want = append(want, cloneRecord(r))
	}
	killed := vfs.NewMem()
	if _, err := vfs.Clone(fs, killed, "j", "j"); err != nil {
		t.Fatal(err)
	}
	j.Close()
	j = openT(t, killed, "j", Options{SegmentSize: 8 << 10})
	defer j.Close()
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got, want)
}

// crashFS is a StrictMem FS that loses power right after its n-th fsync:
// later fsyncs are ignored, so ResetToSyncedState shows the disk as of then.
type crashFS struct {
	*vfs.MemFS
	left int
}

func (c *crashFS) wrap(f vfs.File, err error) (vfs.File, error) {
	if err != nil {
		return nil, err
	}
	return &crashFile{File: f, fs: c}, nil
}

func (c *crashFS) Create(name string) (vfs.File, error) { return c.wrap(c.MemFS.Create(name)) }
func (c *crashFS) Open(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	return c.wrap(c.MemFS.Open(name, opts...))
}
func (c *crashFS) OpenReadWrite(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	return c.wrap(c.MemFS.OpenReadWrite(name, opts...))
}
func (c *crashFS) OpenDir(name string) (vfs.File, error) { return c.wrap(c.MemFS.OpenDir(name)) }

type crashFile struct {
	vfs.File
	fs *crashFS
}

func (f *crashFile) Sync() error {
	err := f.File.Sync()
	if f.fs.left--; f.fs.left == 0 {
		f.fs.SetIgnoreSyncs(true)
	}
	return err
}

func (f *crashFile) SyncData() error { return f.Sync() }

// TestCrashDuringRecovery loses power after every fsync of an Open that cuts
// a torn sealed segment and drops the newer ones; the next Open must reach
// the same journal.
func TestCrashDuringRecovery(t *testing.T) {
	setup := func() (*vfs.MemFS, []Record) {
		mem, want, starts := twoSegments(t, 6)
		strict := vfs.NewStrictMem()
		if _, err := vfs.Clone(mem, strict, "j", "j", vfs.CloneSync); err != nil {
			t.Fatal(err)
		}
		b := fileBytes(t, strict, "j/"+segName(1))
		writeFile(t, strict, "j/"+segName(1), b[:starts[5]+HeaderSize+3])
		writeFile(t, strict, "j/"+segName(3), nil)
		if err := syncDir(strict, "j"); err != nil {
			t.Fatal(err)
		}
		return strict, want[:5]
	}
	for n := 1; ; n++ {
		mem, want := setup()
		cfs := &crashFS{MemFS: mem, left: n}
		j := openT(t, cfs, "j", Options{})
		done := cfs.left > 0 // Open finished before the power loss
		powerLoss(t, mem, j)
		j = openT(t, mem, "j", Options{})
		got, _ := replayAll(t, j, 0)
		checkRecords(t, got, want)
		if segs := j.Segments(); len(segs) != 1 || segs[0].ID != 1 {
			t.Fatalf("crash after fsync %d: segments %+v", n, segs)
		}
		if _, err := j.Append(&Record{Kind: KindMeta, OpNum: 99}); err != nil {
			t.Fatal(err)
		}
		j.Close()
		if done {
			t.Logf("Open of the torn journal does %d fsyncs", n-cfs.left)
			break
		}
	}
}

// TestConcurrentPowerLoss: appenders and syncers run across rotations while
// power fails at a random moment; every op whose Sync returned before the
// failure survives, and what survives is a gap-free prefix.
func TestConcurrentPowerLoss(t *testing.T) {
	for round := range 6 {
		fs := vfs.NewStrictMem()
		opts := Options{SegmentSize: 8 << 10}
		j := openT(t, fs, "j", opts)
		a := &appender{j: j}
		var mu sync.Mutex // orders acks against the power failure
		crashed := false
		var acked uint64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					a.mu.Lock()
					a.op++
					op := a.op
					d := killData(op)
					_, err := j.Append(&Record{Kind: KindWrite, OpNum: op, Len: int64(len(d)), Data: d})
					a.mu.Unlock()
					if err != nil {
						t.Error(err)
						return
					}
					if (i+w)%3 != 0 {
						continue
					}
					if err := j.Sync(context.Background()); err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					if !crashed {
						acked = max(acked, op)
					}
					mu.Unlock()
				}
			}()
		}
		waitFor(t, "appends", func() bool { return j.LastOpNum() >= uint64(200+100*round) })
		mu.Lock()
		crashed = true
		fs.SetIgnoreSyncs(true)
		mu.Unlock()
		close(stop)
		wg.Wait()
		j.Close()
		fs.ResetToSyncedState()
		fs.SetIgnoreSyncs(false)

		j = openT(t, fs, "j", opts)
		want := uint64(1)
		err := j.Replay(0, func(r *Record, _ Pos) error {
			if r.OpNum != want || !bytes.Equal(r.Data, killData(r.OpNum)) {
				return fmt.Errorf("record %d: %s", want, fmtRecord(r))
			}
			want++
			return nil
		})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if want-1 < acked {
			t.Fatalf("round %d: %d records survived, but op %d was acknowledged durable", round, want-1, acked)
		}
		t.Logf("round %d: acked %d, survived %d of %d, %d segments", round, acked, want-1, a.op, len(j.Segments()))
		j.Close()
	}
}

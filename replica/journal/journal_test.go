package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"
)

func TestRoundTrip(t *testing.T) {
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{})
	rng := rand.New(rand.NewPCG(1, 2))
	var want []Record
	var poss []Pos
	for op := uint64(1); op <= 200; op++ {
		r := randRecord(rng, op*3, 9000)
		pos, err := j.Append(r)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, cloneRecord(r))
		poss = append(poss, pos)
	}
	check := func(j *Journal) {
		t.Helper()
		for i, pos := range poss {
			w := &want[i]
			if len(w.Data) == 0 {
				continue
			}
			got := make([]byte, len(w.Data))
			if err := j.ReadAt(got, pos); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, w.Data) {
				t.Fatalf("op %d: ReadAt differs", w.OpNum)
			}
			// A sub-range.
			k := len(w.Data) / 3
			sub := make([]byte, len(w.Data)/2)
			if err := j.ReadAt(sub, Pos{pos.Seg, pos.Off + int64(k)}); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(sub, w.Data[k:k+len(sub)]) {
				t.Fatalf("op %d: sub-range ReadAt differs", w.OpNum)
			}
		}
		got, gotPos := replayAll(t, j, 0)
		checkRecords(t, got, want)
		for i := range gotPos {
			if gotPos[i] != poss[i] {
				t.Fatalf("record %d: Replay pos %v, Append pos %v", i, gotPos[i], poss[i])
			}
		}
		if j.LastOpNum() != 600 {
			t.Fatalf("LastOpNum %d", j.LastOpNum())
		}
	}
	check(j)
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if j.SyncedOpNum() != 600 {
		t.Fatalf("SyncedOpNum %d", j.SyncedOpNum())
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, fs, "j", Options{})
	defer j.Close()
	check(j)
	if j.SyncedOpNum() != 600 {
		t.Fatalf("after Open: SyncedOpNum %d", j.SyncedOpNum())
	}
	// Appends continue after the reopened tail.
	if _, err := j.Append(&Record{Kind: KindMeta, OpNum: 601, Aux: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	got, _ := replayAll(t, j, 600)
	if len(got) != 1 || string(got[0].Aux) != "x" {
		t.Fatalf("Replay(600) = %v", got)
	}
}

func TestAppendErrors(t *testing.T) {
	j := openT(t, vfs.NewMem(), "j", Options{})
	defer j.Close()
	if _, err := j.Append(&Record{Kind: KindTrim, OpNum: 5, Len: 4096}); err != nil {
		t.Fatal(err)
	}
	for _, op := range []uint64{5, 4, 0} {
		if _, err := j.Append(&Record{Kind: KindTrim, OpNum: op, Len: 4096}); !errors.Is(err, ErrOpNum) {
			t.Fatalf("opnum %d after 5: %v, want ErrOpNum", op, err)
		}
	}
	bad := []Record{
		{Kind: 0, OpNum: 9},
		{Kind: 5, OpNum: 9},
		{Kind: KindWrite, OpNum: 9, Len: 3, Data: []byte{1, 2}},
		{Kind: KindZero, OpNum: 9, Len: 3, Data: []byte{1, 2, 3}},
		{Kind: KindMeta, OpNum: 9, Data: []byte{1}},
		{Kind: KindTrim, OpNum: 9, Off: -1, Len: 1},
		{Kind: KindTrim, OpNum: 9, Len: 1 << 32},
		{Kind: KindMeta, OpNum: 9, Aux: make([]byte, MaxPayload+1)},
	}
	for i := range bad {
		if _, err := j.Append(&bad[i]); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", fmtRecord(&bad[i]), err)
		}
	}
	if j.LastOpNum() != 5 {
		t.Fatalf("LastOpNum %d after refused appends", j.LastOpNum())
	}
	// A large record (past the kept buffer) still works.
	big := &Record{Kind: KindWrite, OpNum: 6, Len: keepBufSize + 1, Data: make([]byte, keepBufSize+1)}
	big.Data[keepBufSize] = 7
	pos, err := j.Append(big)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if err := j.ReadAt(b, Pos{pos.Seg, pos.Off + keepBufSize}); err != nil || b[0] != 7 {
		t.Fatalf("ReadAt end of big record: %v %v", b, err)
	}
	if err := j.ReadAt(make([]byte, 2), Pos{pos.Seg, pos.Off + keepBufSize}); !errors.Is(err, ErrRange) {
		t.Fatalf("ReadAt past the end: %v, want ErrRange", err)
	}
	if err := j.ReadAt(b, Pos{pos.Seg, 0}); !errors.Is(err, ErrRange) {
		t.Fatalf("ReadAt of a header: %v, want ErrRange", err)
	}
}

func TestLock(t *testing.T) {
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{})
	if _, err := Open(fs, "j", Options{}); err == nil {
		t.Fatal("second Open of a locked journal succeeded")
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	for _, err := range []error{
		func() error { _, err := j.Append(&Record{Kind: KindMeta, OpNum: 1}); return err }(),
		j.Sync(context.Background()),
		j.ReadAt(make([]byte, 1), Pos{1, HeaderSize}),
		j.Replay(0, func(*Record, Pos) error { return nil }),
		func() error { _, err := j.Rotate(); return err }(),
		j.Remove(1),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("after Close: %v, want ErrClosed", err)
		}
	}
	j = openT(t, fs, "j", Options{})
	j.Close()
}

func TestRotateRemoveReplay(t *testing.T) {
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{SegmentSize: 10 << 10})
	rng := rand.New(rand.NewPCG(3, 4))
	var want []Record
	var poss []Pos
	for op := uint64(1); op <= 300; op++ {
		r := randRecord(rng, op, 2000)
		pos, err := j.Append(r)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, cloneRecord(r))
		poss = append(poss, pos)
	}
	segs := j.Segments()
	if len(segs) < 5 {
		t.Fatalf("only %d segments", len(segs))
	}
	var prevLast uint64
	for i, s := range segs {
		if s.Active != (i == len(segs)-1) {
			t.Fatalf("segment %d: Active %v", s.ID, s.Active)
		}
		if s.Records == 0 || s.FirstOp != prevLast+1 || s.LastOp < s.FirstOp {
			t.Fatalf("segment %+v after last op %d", s, prevLast)
		}
		if !s.Active && s.Size < 10<<10 {
			t.Fatalf("sealed segment %+v smaller than SegmentSize", s)
		}
		prevLast = s.LastOp
	}
	if err := j.Remove(segs[len(segs)-1].ID); !errors.Is(err, ErrActive) {
		t.Fatalf("Remove active: %v", err)
	}
	// Remove the first three sealed segments.
	for _, s := range segs[:3] {
		if err := j.Remove(s.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Remove(segs[0].ID); !errors.Is(err, ErrRemoved) {
		t.Fatalf("second Remove: %v", err)
	}
	if err := j.ReadAt(make([]byte, 1), poss[0]); !errors.Is(err, ErrRemoved) {
		t.Fatalf("ReadAt removed: %v", err)
	}
	firstLive := segs[3].FirstOp
	for _, after := range []uint64{0, firstLive - 1, firstLive, firstLive + 7, 299, 300} {
		got, _ := replayAll(t, j, after)
		from := max(after, firstLive-1)
		checkRecords(t, got, want[from:])
	}
	// Rotate seals a non-empty active segment, and nothing else.
	sealed, err := j.Rotate()
	if err != nil || sealed != segs[len(segs)-1].ID {
		t.Fatalf("Rotate = %d, %v; want %d", sealed, err, segs[len(segs)-1].ID)
	}
	if sealed, err := j.Rotate(); err != nil || sealed != 0 {
		t.Fatalf("Rotate of an empty segment = %d, %v", sealed, err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, fs, "j", Options{SegmentSize: 10 << 10})
	defer j.Close()
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got, want[firstLive-1:])
	segs2 := j.Segments()
	if last := segs2[len(segs2)-1]; !last.Active || last.Records != 0 || last.ID != sealed+1 {
		t.Fatalf("after reopen the active segment is %+v", last)
	}
	// Ids are not reused: the next segment follows the newest.
	if _, err := j.Append(&Record{Kind: KindMeta, OpNum: 301}); err != nil {
		t.Fatal(err)
	}
	if s, err := j.Rotate(); err != nil || s != sealed+1 {
		t.Fatalf("Rotate = %d, %v", s, err)
	}
}

func TestReplayStops(t *testing.T) {
	j := openT(t, vfs.NewMem(), "j", Options{})
	defer j.Close()
	for op := uint64(1); op <= 10; op++ {
		if _, err := j.Append(&Record{Kind: KindZero, OpNum: op, Len: 512}); err != nil {
			t.Fatal(err)
		}
	}
	stop := errors.New("stop")
	n := 0
	err := j.Replay(0, func(r *Record, _ Pos) error {
		n++
		if r.OpNum == 4 {
			return stop
		}
		return nil
	})
	if err != stop || n != 4 {
		t.Fatalf("Replay = %v after %d records", err, n)
	}
}

// TestConcurrent runs appenders, readers, syncers and a remover at once; run
// it with -race.
func TestConcurrent(t *testing.T) {
	fs := vfs.NewMem()
	j := openT(t, fs, "j", Options{SegmentSize: 64 << 10})
	a := &appender{j: j}
	type written struct {
		pos  Pos
		data []byte
	}
	var mu sync.Mutex
	var log []written
	poke := make(chan struct{}, 1)
	const writers, perWriter = 4, 300
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			for range perWriter {
				data := make([]byte, 512*(1+rng.IntN(8)))
				for i := range data {
					data[i] = byte(rng.Uint32())
				}
				pos, err := a.append(&Record{Kind: KindWrite, Len: int64(len(data)), Data: data})
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				log = append(log, written{pos, data})
				if len(log)%16 == 0 {
					select {
					case poke <- struct{}{}:
					default:
					}
				}
				mu.Unlock()
				if rng.IntN(10) == 0 {
					before := j.LastOpNum()
					if err := j.Sync(context.Background()); err != nil {
						t.Error(err)
						return
					}
					if s := j.SyncedOpNum(); s < before {
						t.Errorf("SyncedOpNum %d < %d after Sync", s, before)
					}
				}
			}
		}()
	}
	done := make(chan struct{})
	var rwg sync.WaitGroup
	for r := range 2 {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 10))
			for {
				select {
				case <-done:
					return
				default:
				}
				mu.Lock()
				if len(log) == 0 {
					mu.Unlock()
					continue
				}
				w := log[rng.IntN(len(log))]
				mu.Unlock()
				got := make([]byte, len(w.data))
				err := j.ReadAt(got, w.pos)
				if errors.Is(err, ErrRemoved) {
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, w.data) {
					t.Errorf("ReadAt %v differs", w.pos)
					return
				}
			}
		}()
	}
	// A replayer walks the journal while it grows and shrinks.
	rwg.Add(1)
	go func() {
		defer rwg.Done()
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Millisecond):
			}
			var prev uint64
			err := j.Replay(0, func(r *Record, _ Pos) error {
				if r.OpNum <= prev || r.Kind != KindWrite || int64(len(r.Data)) != r.Len {
					return fmt.Errorf("replay: %s after op %d", fmtRecord(r), prev)
				}
				prev = r.OpNum
				return nil
			})
			if err != nil {
				t.Error(err)
				return
			}
		}
	}()
	// A remover drops the oldest sealed segment now and then.
	rwg.Add(1)
	go func() {
		defer rwg.Done()
		for {
			select {
			case <-done:
				return
			case <-poke:
			}
			segs := j.Segments()
			if len(segs) > 4 {
				if err := j.Remove(segs[0].ID); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	wg.Wait()
	close(done)
	rwg.Wait()
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if j.SyncedOpNum() != writers*perWriter {
		t.Fatalf("SyncedOpNum %d", j.SyncedOpNum())
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestGroupCommit: many concurrent Sync callers share few fsyncs.
func TestGroupCommit(t *testing.T) {
	cfs := &countFS{FS: vfs.NewMem()}
	j := openT(t, cfs, "j", Options{})
	defer j.Close()
	// Model a disk whose fsync takes a while (MemFS fsyncs are free).
	cfs.gate = func() { time.Sleep(2 * time.Millisecond) }
	a := &appender{j: j}
	base := cfs.syncs.Load()
	const workers, rounds = 32, 20
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range rounds {
				if _, err := a.append(&Record{Kind: KindWrite, Len: 4096, Data: make([]byte, 4096)}); err != nil {
					t.Error(err)
					return
				}
				before := j.LastOpNum()
				if err := j.Sync(context.Background()); err != nil {
					t.Error(err)
					return
				}
				if j.SyncedOpNum() < before {
					t.Errorf("SyncedOpNum %d < %d", j.SyncedOpNum(), before)
				}
			}
		}()
	}
	wg.Wait()
	n := cfs.syncs.Load() - base
	t.Logf("%d Sync calls, %d fsyncs", workers*rounds, n)
	if n > workers*rounds/4 {
		t.Fatalf("%d fsyncs for %d Sync calls: group commit does not share", n, workers*rounds)
	}
}

// TestGroupCommitRounds: callers that arrive during an fsync all wait for,
// and share, the next one.
func TestGroupCommitRounds(t *testing.T) {
	gate := make(chan struct{})
	entered := make(chan struct{}, 10)
	cfs := &countFS{FS: vfs.NewMem()}
	j := openT(t, cfs, "j", Options{})
	defer j.Close()
	cfs.gate = func() {
		entered <- struct{}{}
		<-gate
	}
	a := &appender{j: j}
	if _, err := a.append(&Record{Kind: KindMeta}); err != nil {
		t.Fatal(err)
	}
	base := cfs.syncs.Load()
	errc := make(chan error, 11)
	go func() { errc <- j.Sync(context.Background()) }()
	<-entered // the first round is in its fsync
	const followers = 10
	for range followers {
		if _, err := a.append(&Record{Kind: KindMeta}); err != nil {
			t.Fatal(err)
		}
	}
	for range followers {
		go func() { errc <- j.Sync(context.Background()) }()
	}
	waitFor(t, "followers to wait", func() bool {
		j.commit.Lock()
		defer j.commit.Unlock()
		return j.commit.waiters == followers
	})
	// A caller whose ctx ends gives up; the round goes on.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := j.Sync(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sync with a cancelled ctx: %v", err)
	}
	gate <- struct{}{} // end round 1
	<-entered          // round 2 started: one leader for all followers
	gate <- struct{}{}
	for range followers + 1 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if n := cfs.syncs.Load() - base; n != 2 {
		t.Fatalf("%d fsyncs, want 2", n)
	}
	if j.SyncedOpNum() != followers+1 {
		t.Fatalf("SyncedOpNum %d", j.SyncedOpNum())
	}
	cfs.gate = nil
	// A cancelled caller does not start a round either.
	if _, err := a.append(&Record{Kind: KindMeta}); err != nil {
		t.Fatal(err)
	}
	if err := j.Sync(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sync with a cancelled ctx: %v", err)
	}
	if n := cfs.syncs.Load() - base; n != 2 {
		t.Fatalf("%d fsyncs after a cancelled Sync, want 2", n)
	}
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	base++
	// Nothing new appended: Sync needs no fsync.
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := cfs.syncs.Load() - base; n != 2 {
		t.Fatalf("%d fsyncs after an idle Sync, want 2", n)
	}
}

// TestSyncError: a failed fsync poisons the journal.
func TestSyncError(t *testing.T) {
	injected := errors.New("injected EIO")
	efs := &errFS{FS: vfs.NewMem()}
	j := openT(t, efs, "j", Options{})
	if _, err := j.Append(&Record{Kind: KindMeta, OpNum: 1}); err != nil {
		t.Fatal(err)
	}
	efs.fail = injected
	if err := j.Sync(context.Background()); !errors.Is(err, ErrFailed) || !errors.Is(err, injected) {
		t.Fatalf("Sync: %v", err)
	}
	efs.fail = nil
	if _, err := j.Append(&Record{Kind: KindMeta, OpNum: 2}); !errors.Is(err, ErrFailed) {
		t.Fatalf("Append after a failed fsync: %v", err)
	}
	if err := j.Sync(context.Background()); !errors.Is(err, ErrFailed) {
		t.Fatalf("Sync after a failed fsync: %v", err)
	}
	if j.SyncedOpNum() != 0 {
		t.Fatalf("SyncedOpNum %d", j.SyncedOpNum())
	}
	j.Close()
	j = openT(t, efs, "j", Options{})
	defer j.Close()
	if j.LastOpNum() != 1 {
		t.Fatalf("after reopen: LastOpNum %d", j.LastOpNum())
	}
}

// errFS fails file fsyncs while fail is set, and writes (after writing half
// the bytes) while failWrite is set.
type errFS struct {
	vfs.FS
	fail, failWrite error
}

func (e *errFS) wrap(f vfs.File, err error) (vfs.File, error) {
	if err != nil {
		return nil, err
	}
	ef := &errFile{File: f, fs: e}
	if _, ok := f.(truncater); ok {
		return errTruncFile{ef}, nil
	}
	return ef, nil
}

func (e *errFS) Create(name string) (vfs.File, error) { return e.wrap(e.FS.Create(name)) }
func (e *errFS) OpenReadWrite(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	return e.wrap(e.FS.OpenReadWrite(name, opts...))
}

type errFile struct {
	vfs.File
	fs *errFS
}

func (f *errFile) Sync() error {
	if f.fs.fail != nil {
		return f.fs.fail
	}
	return f.File.Sync()
}

func (f *errFile) SyncData() error { return f.Sync() }

func (f *errFile) WriteAt(b []byte, off int64) (int, error) {
	if f.fs.failWrite != nil {
		n, _ := f.File.WriteAt(b[:len(b)/2], off)
		return n, f.fs.failWrite
	}
	return f.File.WriteAt(b, off)
}

// errTruncFile is an errFile whose file can be truncated.
type errTruncFile struct{ *errFile }

func (f errTruncFile) Truncate(size int64) error { return f.File.(truncater).Truncate(size) }

// TestWriteError: a failed write appends nothing and, where the file can be
// cut back, leaves the journal usable.
func TestWriteError(t *testing.T) {
	for _, tc := range []struct {
		name   string
		fs     vfs.FS
		dir    string
		poison bool
	}{
		{"disk", vfs.Default, t.TempDir(), false},
		{"mem without truncate", vfs.NewMem(), "j", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			efs := &errFS{FS: tc.fs}
			j := openT(t, efs, tc.dir, Options{})
			w := func(op uint64) error {
				d := bytes.Repeat([]byte{byte(op)}, 1000)
				_, err := j.Append(&Record{Kind: KindWrite, OpNum: op, Len: 1000, Data: d})
				return err
			}
			if err := w(1); err != nil {
				t.Fatal(err)
			}
			efs.failWrite = syscall.ENOSPC
			if err := w(2); !errors.Is(err, syscall.ENOSPC) || errors.Is(err, ErrFailed) != tc.poison {
				t.Fatalf("Append with a failing write: %v", err)
			}
			efs.failWrite = nil
			if j.LastOpNum() != 1 || j.Segments()[0].Size != HeaderSize+1000 {
				t.Fatalf("failed Append left LastOpNum %d, segments %+v", j.LastOpNum(), j.Segments())
			}
			err := w(2)
			if tc.poison {
				if !errors.Is(err, ErrFailed) {
					t.Fatalf("Append after a write that could not be cut: %v", err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			j.Close()
			j = openT(t, efs, tc.dir, Options{})
			defer j.Close()
			got, _ := replayAll(t, j, 0)
			want := 2
			if tc.poison {
				want = 1
			}
			if len(got) != want {
				t.Fatalf("reopen found %d records, want %d", len(got), want)
			}
			for i := range got {
				if got[i].OpNum != uint64(i+1) || got[i].Data[999] != byte(i+1) {
					t.Fatalf("record %d: %s", i, fmtRecord(&got[i]))
				}
			}
		})
	}
}

// TestCloseWhileReading: reads racing Close finish or return ErrClosed.
func TestCloseWhileReading(t *testing.T) {
	j := openT(t, vfs.NewMem(), "j", Options{SegmentSize: 4 << 10})
	var poss []Pos
	for op := uint64(1); op <= 50; op++ {
		p, err := j.Append(&Record{Kind: KindWrite, OpNum: op, Len: 1024, Data: make([]byte, 1024)})
		if err != nil {
			t.Fatal(err)
		}
		poss = append(poss, p)
	}
	var wg sync.WaitGroup
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1024)
			for i := r; ; i++ {
				err := j.ReadAt(buf, poss[i%len(poss)])
				if errors.Is(err, ErrClosed) {
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				if i%7 == 0 {
					err := j.Replay(uint64(i%50), func(*Record, Pos) error { return nil })
					if errors.Is(err, ErrClosed) {
						return
					}
					if err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}

// TestPresizedSegments: on a real file system the active segment is
// presized to SegmentSize (sparse), a sealed segment keeps its size and
// ends in a seal record, Close leaves the active one exact, and reopening
// keeps every record.
func TestPresizedSegments(t *testing.T) {
	dir := t.TempDir()
	const segSize = 1 << 20
	size := func(id uint64) int64 {
		t.Helper()
		st, err := vfs.Default.Stat(vfs.Default.PathJoin(dir, segName(id)))
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	j := openT(t, vfs.Default, dir, Options{SegmentSize: segSize})
	var want []Record
	for i := 1; i <= 10; i++ {
		r := Record{Kind: KindWrite, OpNum: uint64(i), Off: int64(i) * 4096, Len: 4096, Data: bytes.Repeat([]byte{byte(i)}, 4096)}
		if _, err := j.Append(&r); err != nil {
			t.Fatal(err)
		}
		want = append(want, r)
	}
	if got := size(1); got != segSize {
		t.Fatalf("active segment is %d bytes, want presized to %d", got, segSize)
	}
	sealed, err := j.Rotate()
	if err != nil || sealed != 1 {
		t.Fatalf("rotate = %d, %v", sealed, err)
	}
	if got, end := size(1), j.Segments()[0].Size; got != segSize || end != 10*(HeaderSize+4096)+HeaderSize {
		t.Fatalf("sealed segment is %d bytes, its records and seal end at %d", got, end)
	}
	r := Record{Kind: KindMeta, OpNum: 11, Aux: []byte("x")}
	if _, err := j.Append(&r); err != nil {
		t.Fatal(err)
	}
	want = append(want, r)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if got := size(2); got != HeaderSize+1 {
		t.Fatalf("closed active segment is %d bytes, want %d", got, HeaderSize+1)
	}
	j = openT(t, vfs.Default, dir, Options{SegmentSize: segSize})
	got, _ := replayAll(t, j, 0)
	checkRecords(t, got, want)
	if got := size(2); got != segSize {
		t.Fatalf("reopened active segment is %d bytes, want presized to %d", got, segSize)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestAppendBatch: AppendBatch writes the same records at the same
// positions as Append one at a time (compared with a twin journal), across
// segment rotations and with records larger than one write buffer, and
// stops at a record Append would refuse, keeping the ones before it.
func TestAppendBatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	opts := Options{SegmentSize: 256 << 10}
	fsA, fsB := vfs.NewMem(), vfs.NewMem()
	a, b := openT(t, fsA, "j", opts), openT(t, fsB, "j", opts)
	var want []Record
	var posA, posB []Pos
	op := uint64(0)
	for round := 0; round < 60; round++ {
		var batch []*Record
		for n := rng.IntN(12); n >= 0; n-- {
			op += 1 + uint64(rng.IntN(2))
			max := 9000
			if rng.IntN(40) == 0 {
				max = keepBufSize + 300<<10 // past one write buffer
			}
			batch = append(batch, randRecord(rng, op, max))
		}
		for _, r := range batch {
			p, err := a.Append(r)
			if err != nil {
				t.Fatal(err)
			}
			posA = append(posA, p)
			want = append(want, cloneRecord(r))
		}
		var err error
		if posB, err = b.AppendBatch(batch, posB); err != nil {
			t.Fatal(err)
		}
	}
	for i := range posA {
		if posA[i] != posB[i] {
			t.Fatalf("record %d (op %d): AppendBatch pos %v, Append pos %v", i, want[i].OpNum, posB[i], posA[i])
		}
	}
	got, _ := replayAll(t, b, 0)
	checkRecords(t, got, want)
	if sa, sb := a.Segments(), b.Segments(); len(sa) < 3 || len(sa) != len(sb) {
		t.Fatalf("segments: %d one at a time, %d batched; want the same, at least 3", len(sa), len(sb))
	}
	// A record out of order stops the batch: the ones before it land.
	bad := []*Record{
		{Kind: KindMeta, OpNum: op + 1, Aux: []byte("a")},
		{Kind: KindMeta, OpNum: op + 2, Aux: []byte("b")},
		{Kind: KindMeta, OpNum: op + 2, Aux: []byte("c")},
		{Kind: KindMeta, OpNum: op + 3, Aux: []byte("d")},
	}
	n := len(posB)
	posB, err := b.AppendBatch(bad, posB)
	if !errors.Is(err, ErrOpNum) || len(posB) != n+2 || b.LastOpNum() != op+2 {
		t.Fatalf("batch with a repeated opnum: %v, %d positions, last op %d; want ErrOpNum, 2, %d", err, len(posB)-n, b.LastOpNum(), op+2)
	}
	for _, j := range []*Journal{a, b} {
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
	b = openT(t, fsB, "j", opts)
	defer b.Close()
	got, _ = replayAll(t, b, 0)
	want = append(want, *bad[0], *bad[1])
	checkRecords(t, got, want)
}

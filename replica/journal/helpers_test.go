package journal

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"
)

// countFS wraps a vfs.FS and counts fsyncs of files (not directories) and
// creates. If
// gate is set, every file fsync first calls it.
type countFS struct {
	vfs.FS
	syncs   atomic.Int64
	creates atomic.Int64 // files created
	gate    func()
}

func (c *countFS) wrap(f vfs.File, err error) (vfs.File, error) {
	if err != nil {
		return nil, err
	}
	return &countFile{File: f, fs: c}, nil
}

func (c *countFS) Create(name string) (vfs.File, error) {
	c.creates.Add(1)
	return c.wrap(c.FS.Create(name))
}
func (c *countFS) Open(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	return c.wrap(c.FS.Open(name, opts...))
}
func (c *countFS) OpenReadWrite(name string, opts ...vfs.OpenOption) (vfs.File, error) {
	return c.wrap(c.FS.OpenReadWrite(name, opts...))
}

type countFile struct {
	vfs.File
	fs *countFS
}

func (f *countFile) Sync() error {
	f.fs.syncs.Add(1)
	if f.fs.gate != nil {
		f.fs.gate()
	}
	return f.File.Sync()
}

func (f *countFile) SyncData() error { return f.Sync() }

func openT(t testing.TB, fs vfs.FS, dir string, opts Options) *Journal {
	t.Helper()
	j, err := Open(fs, dir, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return j
}

// randRecord makes a record of a random kind with opnum op.
func randRecord(rng *rand.Rand, op uint64, maxData int) *Record {
	r := &Record{Kind: Kind(1 + rng.IntN(4)), Flags: uint8(rng.IntN(256)), Epoch: 1 + op/50, OpNum: op,
		Off: int64(rng.IntN(1<<20)) * 512}
	switch r.Kind {
	case KindWrite:
		r.Len = int64(rng.IntN(maxData + 1))
		r.Data = make([]byte, r.Len)
		for i := range r.Data {
			r.Data[i] = byte(rng.Uint32())
		}
	case KindZero, KindTrim:
		r.Len = int64(rng.IntN(1<<20)) * 512
	}
	if rng.IntN(3) == 0 {
		r.Aux = make([]byte, rng.IntN(64))
		for i := range r.Aux {
			r.Aux[i] = byte(rng.Uint32())
		}
	}
	return r
}

func cloneRecord(r *Record) Record {
	c := *r
	c.Data = bytes.Clone(r.Data)
	c.Aux = bytes.Clone(r.Aux)
	return c
}

func sameRecord(a, b *Record) bool {
	return a.Kind == b.Kind && a.Flags == b.Flags && a.Epoch == b.Epoch && a.OpNum == b.OpNum &&
		a.Off == b.Off && a.Len == b.Len && bytes.Equal(a.Data, b.Data) && bytes.Equal(a.Aux, b.Aux)
}

func fmtRecord(r *Record) string {
	return fmt.Sprintf("{%v flags %d epoch %d op %d off %d len %d data %d aux %d}",
		r.Kind, r.Flags, r.Epoch, r.OpNum, r.Off, r.Len, len(r.Data), len(r.Aux))
}

// replayAll returns copies of every record with OpNum > after, and their positions.
func replayAll(t testing.TB, j *Journal, after uint64) ([]Record, []Pos) {
	t.Helper()
	var recs []Record
	var poss []Pos
	err := j.Replay(after, func(r *Record, pos Pos) error {
		recs = append(recs, cloneRecord(r))
		poss = append(poss, pos)
		return nil
	})
	if err != nil {
		t.Fatalf("Replay(%d): %v", after, err)
	}
	return recs, poss
}

// checkRecords fails unless got equals want.
func checkRecords(t testing.TB, got, want []Record) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d records, want %d", len(got), len(want))
	}
	for i := range got {
		if !sameRecord(&got[i], &want[i]) {
			t.Fatalf("record %d: got %s, want %s", i, fmtRecord(&got[i]), fmtRecord(&want[i]))
		}
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// fileBytes reads a whole file of fs.
func fileBytes(t testing.TB, fs vfs.FS, name string) []byte {
	t.Helper()
	f, err := fs.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, st.Size())
	if _, err := f.ReadAt(b, 0); err != nil && len(b) > 0 {
		t.Fatal(err)
	}
	return b
}

// writeFile replaces a file of fs with b, synced.
func writeFile(t testing.TB, fs vfs.FS, name string, b []byte) {
	t.Helper()
	f, err := fs.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	// vfs.File.Write may scribble on its argument (MemFS does with invariants
	// on, as under -race).
	if _, err := f.Write(bytes.Clone(b)); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// appender gives opnums in Append order from many goroutines, as the engine
// does: opnum assignment and Append under one lock.
type appender struct {
	mu sync.Mutex
	j  *Journal
	op uint64
}

func (a *appender) append(r *Record) (Pos, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.op++
	r.OpNum = a.op
	return a.j.Append(r)
}

package journal

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// benchJournal opens a journal on the real file system in a temp dir, with
// fsyncs counted.
func benchJournal(b *testing.B) (*Journal, *countFS) {
	cfs := &countFS{FS: vfs.Default}
	j := openT(b, cfs, b.TempDir(), Options{SegmentSize: 16 << 20})
	b.Cleanup(func() { j.Close() })
	return j, cfs
}

// trim removes sealed segments so a long run does not fill the disk.
func trim(b *testing.B, j *Journal) {
	for _, s := range j.Segments() {
		if !s.Active {
			if err := j.Remove(s.ID); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkAppend4K: one 4 KiB write record per op, no fsync.
func BenchmarkAppend4K(b *testing.B) {
	j, _ := benchJournal(b)
	r := &Record{Kind: KindWrite, Epoch: 1, Len: 4096, Data: make([]byte, 4096)}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		r.OpNum = uint64(i + 1)
		r.Off = int64(i%1024) * 4096
		if _, err := j.Append(r); err != nil {
			b.Fatal(err)
		}
		if i%4096 == 4095 {
			b.StopTimer()
			trim(b, j)
			b.StartTimer()
		}
	}
}

// BenchmarkAppendSync4K: each op appends a 4 KiB write record and waits for
// Sync, from 1 or 8 goroutines; fsyncs/op shows group commit at work.
func BenchmarkAppendSync4K(b *testing.B) {
	for _, g := range []int{1, 8} {
		b.Run(fmt.Sprintf("goroutines=%d", g), func(b *testing.B) {
			j, cfs := benchJournal(b)
			a := &appender{j: j}
			base := cfs.syncs.Load()
			b.SetBytes(4096)
			b.ReportAllocs()
			b.ResetTimer()
			var wg sync.WaitGroup
			for w := range g {
				n := b.N / g
				if w < b.N%g {
					n++
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := &Record{Kind: KindWrite, Epoch: 1, Len: 4096, Data: make([]byte, 4096)}
					for range n {
						if _, err := a.append(r); err != nil {
							b.Error(err)
							return
						}
						if err := j.Sync(context.Background()); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(cfs.syncs.Load()-base)/float64(b.N), "fsyncs/op")
		})
	}
}

// BenchmarkRawWriteSync4K is the baseline for BenchmarkAppendSync4K: the
// same bytes per op written to one file with pwrite, and an fdatasync per op
// (no journal, no group commit).
func BenchmarkRawWriteSync4K(b *testing.B) {
	for _, g := range []int{1, 8} {
		b.Run(fmt.Sprintf("goroutines=%d", g), func(b *testing.B) {
			f, err := vfs.Default.Create(b.TempDir() + "/raw")
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			var mu sync.Mutex
			var off int64
			b.SetBytes(4096)
			b.ResetTimer()
			var wg sync.WaitGroup
			for w := range g {
				n := b.N / g
				if w < b.N%g {
					n++
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, 4096+HeaderSize)
					for range n {
						mu.Lock()
						at := off
						off += int64(len(buf))
						_, err := f.WriteAt(buf, at)
						mu.Unlock()
						if err == nil {
							err = f.SyncData()
						}
						if err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}

// BenchmarkReadAt4K: pread of a 4 KiB record's data.
func BenchmarkReadAt4K(b *testing.B) {
	j, _ := benchJournal(b)
	var poss []Pos
	for i := range 1024 {
		p, err := j.Append(&Record{Kind: KindWrite, OpNum: uint64(i + 1), Len: 4096, Data: make([]byte, 4096)})
		if err != nil {
			b.Fatal(err)
		}
		poss = append(poss, p)
	}
	buf := make([]byte, 4096)
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if err := j.ReadAt(buf, poss[i%len(poss)]); err != nil {
			b.Fatal(err)
		}
	}
}

// TestAppendAllocs: the hot path allocates nothing.
func TestAppendAllocs(t *testing.T) {
	if invariants {
		t.Skip("the invariant checks allocate")
	}
	j := openT(t, vfs.Default, t.TempDir(), Options{}) // MemFS allocates as files grow
	defer j.Close()
	r := &Record{Kind: KindWrite, Len: 4096, Data: make([]byte, 4096), Aux: []byte("aux")}
	buf := make([]byte, 4096)
	op := uint64(0)
	var pos Pos
	appendOne := func() {
		op++
		r.OpNum = op
		var err error
		if pos, err = j.Append(r); err != nil {
			t.Fatal(err)
		}
	}
	appendOne()
	if n := testing.AllocsPerRun(100, appendOne); n != 0 {
		t.Errorf("Append: %v allocs per op", n)
	}
	if n := testing.AllocsPerRun(100, func() {
		if err := j.ReadAt(buf, pos); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("ReadAt: %v allocs per op", n)
	}
}

package journal

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/erasure/fileio"
)

// TestRawWrites: on vfs.Default, records of every size around rawMax,
// single and batched, across segment boundaries, read back and replay
// after a reopen exactly as written, whether the writes were raw or
// (after a slow one) ordinary.
func TestRawWrites(t *testing.T) {
	for _, slow := range []bool{false, true} {
		t.Run(map[bool]string{false: "raw", true: "after a slow write"}[slow], func(t *testing.T) {
			old, oldPerMiB := fileio.Slow, fileio.SlowPerMiB
			t.Cleanup(func() { fileio.Slow, fileio.SlowPerMiB = old, oldPerMiB })
			if slow {
				fileio.Slow, fileio.SlowPerMiB = -1, 0 // every raw write is slow: the Strikes-th turns them off
			} else {
				fileio.Slow = time.Minute // a loaded machine must not turn them off here
			}
			dir := t.TempDir()
			j := openT(t, vfs.Default, dir, Options{SegmentSize: 4 << 20})
			if !j.raw {
				t.Fatal("a journal on vfs.Default does not write raw")
			}
			rng := rand.New(rand.NewPCG(7, 7))
			var want []Record
			var poss []Pos
			op := uint64(0)
			for len(want) < 300 {
				n := 1 + rng.IntN(4)
				rs := make([]*Record, n)
				for i := range rs {
					op++
					max := []int{4096, rawMax - HeaderSize, rawMax + 1, 64 << 10}[rng.IntN(4)]
					rs[i] = randRecord(rng, op, max)
					want = append(want, cloneRecord(rs[i]))
				}
				var err error
				if n == 1 {
					var p Pos
					p, err = j.Append(rs[0])
					poss = append(poss, p)
				} else {
					poss, err = j.AppendBatch(rs, poss)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if got := !j.wv.On(); got != slow {
				t.Fatalf("raw writes off: %v, want %v", got, slow)
			}
			for i, r := range want {
				if len(r.Data) == 0 {
					continue
				}
				buf := make([]byte, len(r.Data))
				if err := j.ReadAt(buf, poss[i]); err != nil {
					t.Fatal(err)
				}
				if string(buf) != string(r.Data) {
					t.Fatalf("record %d reads back different data", i)
				}
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			j = openT(t, vfs.Default, dir, Options{SegmentSize: 4 << 20})
			defer j.Close()
			got, _ := replayAll(t, j, 0)
			checkRecords(t, got, want)
		})
	}
}

package journal

import (
	"context"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// TestPrezero: a journal synced often gets a zero-filled file in its pool
// and leaves its new (sparse) active segment for it at the next append;
// one that is not synced often never does; every record replays after a
// reopen; Close leaves no zero-filled or temporary file behind.
func TestPrezero(t *testing.T) {
	for _, synced := range []bool{true, false} {
		t.Run(map[bool]string{true: "synced often", false: "rarely synced"}[synced], func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{SegmentSize: 4 << 20, Prezero: true}
			j := openT(t, vfs.Default, dir, opts)
			var want []Record
			op := uint64(0)
			appendOne := func() {
				op++
				r := &Record{Kind: KindWrite, OpNum: op, Off: int64(op) * 4096, Len: 4096, Data: make([]byte, 4096)}
				r.Data[0] = byte(op)
				if _, err := j.Append(r); err != nil {
					t.Fatal(err)
				}
				want = append(want, cloneRecord(r))
			}
			appendOne()
			first := j.mu.active.id
			if !j.mu.active.sparse {
				t.Fatal("a new journal's first segment is not marked sparse")
			}
			n := 5
			if synced {
				n = 3 * heavySyncs
			}
			for range n {
				appendOne()
				if err := j.Sync(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			if synced {
				waitFor(t, "a zero-filled file in the pool", j.poolReady)
			}
			appendOne()
			j.mu.Lock()
			active := j.mu.active
			j.mu.Unlock()
			if moved := active.id != first; moved != synced {
				t.Fatalf("left the sparse segment early: %v, want %v", moved, synced)
			}
			if synced && active.sparse {
				t.Fatal("the segment after the sparse one is sparse too")
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			names, err := vfs.Default.List(dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, name := range names {
				if strings.HasSuffix(name, freeSuffix) || strings.HasSuffix(name, tmpSuffix) {
					t.Errorf("left behind: %s", name)
				}
			}
			j = openT(t, vfs.Default, dir, opts)
			defer j.Close()
			got, _ := replayAll(t, j, 0)
			checkRecords(t, got, want)
		})
	}
}

// TestPrezeroCloseWhileZeroing: Close while the zero-filled file is being
// written waits for it and removes it.
func TestPrezeroCloseWhileZeroing(t *testing.T) {
	for range 5 {
		dir := t.TempDir()
		j := openT(t, vfs.Default, dir, Options{SegmentSize: 64 << 20, Prezero: true})
		for op := uint64(1); op <= heavySyncs+1; op++ {
			if _, err := j.Append(&Record{Kind: KindWrite, OpNum: op, Len: 1, Data: []byte{1}}); err != nil {
				t.Fatal(err)
			}
			if err := j.Sync(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		if !j.zeroing.Load() && !j.poolReady() {
			t.Fatal("no zero-filled file on its way after heavy syncing")
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		names, _ := vfs.Default.List(dir)
		for _, name := range names {
			if strings.HasSuffix(name, freeSuffix) || strings.HasSuffix(name, tmpSuffix) {
				t.Fatalf("left behind: %s", name)
			}
		}
	}
}

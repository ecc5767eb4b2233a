package journal_test

import (
	"context"
	"fmt"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/replica/journal"
)

// The life of a partition's journal: append ops, group-commit them, read
// data back by position, replay after a restart, and reclaim sealed
// segments once their data lives elsewhere.
func Example() {
	fs := vfs.NewMem()
	j, err := journal.Open(fs, "p0", journal.Options{})
	if err != nil {
		panic(err)
	}
	data := []byte("four kib of data, in real life")
	pos, err := j.Append(&journal.Record{Kind: journal.KindWrite, Epoch: 1, OpNum: 1, Off: 8192, Len: int64(len(data)), Data: data})
	if err != nil {
		panic(err)
	}
	if _, err := j.Append(&journal.Record{Kind: journal.KindTrim, Epoch: 1, OpNum: 2, Off: 0, Len: 4096}); err != nil {
		panic(err)
	}
	// FLUSH: one fsync serves every Append that returned before.
	if err := j.Sync(context.Background()); err != nil {
		panic(err)
	}
	fmt.Println("synced through op", j.SyncedOpNum())

	// The extent map points at pos; a read of part of the write:
	buf := make([]byte, 4)
	if err := j.ReadAt(buf, journal.Pos{Seg: pos.Seg, Off: pos.Off + 5}); err != nil {
		panic(err)
	}
	fmt.Printf("bytes 5..9 of op 1: %q\n", buf)

	// Seal the segment; once its data is flushed elsewhere, remove it.
	sealed, err := j.Rotate()
	if err != nil {
		panic(err)
	}
	j.Close()

	// Restart: replay what the extent map has not applied (after op 1).
	j, err = journal.Open(fs, "p0", journal.Options{})
	if err != nil {
		panic(err)
	}
	defer j.Close()
	j.Replay(1, func(r *journal.Record, pos journal.Pos) error {
		fmt.Println("replay op", r.OpNum, r.Kind, r.Off, r.Len)
		return nil
	})
	if err := j.Remove(sealed); err != nil {
		panic(err)
	}
	fmt.Println("segments left:", len(j.Segments()))
	// Output:
	// synced through op 2
	// bytes 5..9 of op 1: "kib "
	// replay op 2 trim 0 4096
	// segments left: 1
}

package erasure

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

func TestLocalRoundTripAndChecksum(t *testing.T) {
	ctx := context.Background()
	fs := vfs.NewMem()
	l, err := OpenLocal(fs, "store")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(1))
	data := make([]byte, 3*crcBlock+123)
	rng.Read(data)
	id := ShardID{PKey: 5, Seq: 2}
	// The in-memory FS scribbles over written buffers under -race (pebble
	// invariants), so hand Put a copy.
	if err := l.Put(ctx, id, append([]byte(nil), data...)); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		off := rng.Intn(len(data))
		n := rng.Intn(len(data) - off + 1)
		p := make([]byte, n)
		if err := l.ReadAt(ctx, id, p, int64(off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, data[off:off+n]) {
			t.Fatalf("read [%d,+%d) differs", off, n)
		}
	}
	if err := l.ReadAt(ctx, id, make([]byte, 10), int64(len(data)-5)); err == nil {
		t.Fatal("read past end succeeded")
	}
	ids, _ := l.List(ctx, 5)
	if len(ids) != 1 || ids[0] != id {
		t.Fatalf("list = %v", ids)
	}
	// Flip a byte on disk: the read of that block fails, others still work.
	l.Close()
	f, _ := fs.OpenReadWrite(l.path(id))
	f.WriteAt([]byte{data[crcBlock+7] ^ 0xff}, crcBlock+7)
	f.Close()
	if err := l.ReadAt(ctx, id, make([]byte, 10), crcBlock); !errors.Is(err, ErrChecksum) {
		t.Fatalf("corrupt read err = %v", err)
	}
	if err := l.ReadAt(ctx, id, make([]byte, 10), 0); err != nil {
		t.Fatalf("clean block read: %v", err)
	}
	if err := l.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := l.ReadAt(ctx, id, make([]byte, 1), 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("read of deleted shard: %v", err)
	}
}

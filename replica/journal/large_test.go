package journal

import (
	"bytes"
	"context"
	"math/rand"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

// TestLargeRecord: records over the 1 MiB append buffer are written piece by
// piece; they round-trip, and a tear anywhere in one is cut on Open.
func TestLargeRecord(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	data := make([]byte, 3<<20)
	rng.Read(data)
	aux := []byte("aux-bytes")
	for _, cut := range []int64{-1, 10, HeaderSize + 1, HeaderSize + 1<<20, HeaderSize + int64(len(data)) + 3} {
		fs := vfs.NewMem()
		j := openT(t, fs, "j", Options{})
		small := bytes.Repeat([]byte{7}, 4096)
		if _, err := j.Append(&Record{Kind: KindWrite, OpNum: 1, Len: 4096, Data: small}); err != nil {
			t.Fatal(err)
		}
		pos, err := j.Append(&Record{Kind: KindWrite, OpNum: 2, Off: 8192, Len: int64(len(data)), Data: append([]byte(nil), data...), Aux: aux})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if err := j.ReadAt(got, pos); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read back: %v", err)
		}
		if err := j.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		seg := j.Segments()[0]
		j.Close()
		if cut >= 0 {
			// Tear the large record: keep the first record and cut bytes of
			// the second.
			name := "j/" + segName(seg.ID)
			f, err := fs.OpenReadWrite(name)
			if err != nil {
				t.Fatal(err)
			}
			whole := make([]byte, seg.Size)
			f.ReadAt(whole, 0)
			f.Close()
			keep := HeaderSize + 4096 + cut
			fs.Remove(name)
			g, _ := fs.Create(name)
			g.Write(whole[:keep])
			g.Sync()
			g.Close()
		}
		j = openT(t, fs, "j", Options{})
		var ops []uint64
		if err := j.Replay(0, func(r *Record, p Pos) error {
			ops = append(ops, r.OpNum)
			if r.OpNum == 2 && (!bytes.Equal(r.Data, data) || !bytes.Equal(r.Aux, aux)) {
				t.Fatalf("cut %d: large record differs after reopen", cut)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		want := 2
		if cut >= 0 {
			want = 1
		}
		if len(ops) != want {
			t.Fatalf("cut %d: replayed %v, want %d records", cut, ops, want)
		}
		j.Close()
	}
}

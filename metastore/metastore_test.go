package metastore

import (
	"math/rand"
	"testing"

	"github.com/cockroachdb/pebble/vfs"
)

func openMem(t *testing.T, fs vfs.FS) *DB {
	t.Helper()
	d, err := Open("meta", Options{FS: fs})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestExtentMapOracle applies random writes, zeroes and trims to the extent
// map and to a naive per-block oracle, and compares Lookup with the oracle.
func TestExtentMapOracle(t *testing.T) {
	for seed := int64(1); seed <= 5; seed++ {
		fs := vfs.NewMem()
		d := openMem(t, fs)
		rng := rand.New(rand.NewSource(seed))
		const blocks = 256
		const bs = 512
		pkey := PKey(7, 3)
		type cell struct {
			kind Kind
			cont uint64
			off  int64
		}
		var oracle [blocks]cell
		removedBytes := int64(0)
		liveBytes := int64(0)
		for op := uint64(1); op <= 2000; op++ {
			s := int64(rng.Intn(blocks))
			n := int64(1 + rng.Intn(min(32, blocks-int(s))))
			e := Extent{Start: s * bs, Len: n * bs, Op: op}
			switch rng.Intn(4) {
			case 0, 1:
				e.Kind, e.Where, e.Container, e.COff = KindData, InJournal, op, int64(rng.Intn(1000))*bs
				liveBytes += e.Len
			case 2:
				e.Kind = KindZero
			}
			u := d.NewUpdate(pkey)
			if err := u.Set(e, func(old Extent) {
				if old.Kind == KindData {
					removedBytes += old.Len
				}
			}); err != nil {
				t.Fatal(err)
			}
			if err := u.Commit(op); err != nil {
				t.Fatal(err)
			}
			for b := s; b < s+n; b++ {
				c := cell{kind: e.Kind}
				if e.Kind == KindData {
					c.cont, c.off = e.Container, e.COff+(b-s)*bs
				}
				oracle[b] = c
			}
			if op%97 == 0 || op == 2000 {
				var got [blocks]cell
				var dataBytes int64
				if err := d.Scan(pkey, func(x Extent) error {
					for b := x.Start / bs; b < x.End()/bs; b++ {
						c := cell{kind: x.Kind}
						if x.Kind == KindData {
							c.cont, c.off = x.Container, x.COff+(b-x.Start/bs)*bs
							dataBytes += bs
						}
						got[b] = c
					}
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				if got != oracle {
					t.Fatalf("seed %d op %d: extent map differs from oracle", seed, op)
				}
				if dataBytes != liveBytes-removedBytes {
					t.Fatalf("seed %d op %d: live accounting %d != %d", seed, op, dataBytes, liveBytes-removedBytes)
				}
				// A clipped lookup agrees too.
				ls, ln := int64(rng.Intn(blocks)), int64(0)
				ln = int64(1 + rng.Intn(blocks-int(ls)))
				if err := d.Lookup(pkey, ls*bs, ln*bs, func(x Extent) error {
					if x.Start < ls*bs || x.End() > (ls+ln)*bs {
						t.Fatalf("lookup returned %+v outside [%d,%d)", x, ls*bs, (ls+ln)*bs)
					}
					return nil
				}); err != nil {
					t.Fatal(err)
				}
			}
		}
		if a, _ := d.Applied(pkey); a != 2000 {
			t.Fatalf("applied = %d", a)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		// Reopen: state survives a clean close.
		d = openMem(t, fs)
		if a, _ := d.Applied(pkey); a != 2000 {
			t.Fatalf("applied after reopen = %d", a)
		}
		d.Close()
	}
}

func TestReplaceAndRecords(t *testing.T) {
	d := openMem(t, vfs.NewMem())
	defer d.Close()
	pk := PKey(1, 0)
	e := Extent{Start: 4096, Len: 4096, Kind: KindData, Where: InJournal, Container: 1, COff: 100, Op: 1}
	u := d.NewUpdate(pk)
	if err := u.Set(e, nil); err != nil {
		t.Fatal(err)
	}
	u.Commit(1)
	moved := e
	moved.Where, moved.Container, moved.COff = InObject, 9, 0
	u = d.NewUpdate(pk)
	if ok, err := u.Replace(e, moved); !ok || err != nil {
		t.Fatalf("replace = %v, %v", ok, err)
	}
	u.Commit(2)
	u = d.NewUpdate(pk)
	if ok, _ := u.Replace(e, moved); ok {
		t.Fatal("replace of a stale extent succeeded")
	}
	u.Close()
	if err := d.PutRecord("vol", "a", []byte("1")); err != nil {
		t.Fatal(err)
	}
	d.PutRecord("vol", "b", []byte("2"))
	d.PutRecord("volx", "c", []byte("3"))
	var keys []string
	d.Records("vol", func(k string, v []byte) error { keys = append(keys, k); return nil })
	if len(keys) != 2 || keys[0] != "a" || keys[1] != "b" {
		t.Fatalf("records = %v", keys)
	}
}

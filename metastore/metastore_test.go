package metastore

import (
	"math/rand"
	"sync"
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
		var updater sync.Mutex // the test's updates are serial; Persist wants the lock anyway
		// cellOf records block b of extent x the way the oracle does.
		cellOf := func(got *[blocks]cell, x Extent, b int64) {
			c := cell{kind: x.Kind}
			if x.Kind == KindData {
				c.cont, c.off = x.Container, x.COff+(b-x.Start/bs)*bs
			}
			got[b] = c
		}
		m, err := d.OpenMap(pkey)
		if err != nil {
			t.Fatal(err)
		}
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
			u := m.Update()
			u.Set(e, func(old Extent) {
				if old.Kind == KindData {
					removedBytes += old.Len
				}
			})
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
				checkOracle(t, m, cellOf, &oracle, liveBytes-removedBytes, bs)
				// A clipped lookup agrees too.
				ls := int64(rng.Intn(blocks))
				ln := int64(1 + rng.Intn(blocks-int(ls)))
				for _, x := range m.Lookup(nil, ls*bs, ln*bs) {
					if x.Start < ls*bs || x.End() > (ls+ln)*bs {
						t.Fatalf("lookup returned %+v outside [%d,%d)", x, ls*bs, (ls+ln)*bs)
					}
				}
			}
			if op == 1000 {
				// A reopen in the middle: what was pending is lost (the
				// journal replay's job); what was persisted loads.
				if err := m.Persist(&updater); err != nil {
					t.Fatal(err)
				}
				m2, err := d.OpenMap(pkey)
				if err != nil {
					t.Fatal(err)
				}
				if m2.Applied() != op || m2.Len() != m.Len() {
					t.Fatalf("reloaded map: applied %d len %d, want %d %d", m2.Applied(), m2.Len(), op, m.Len())
				}
				checkOracle(t, m2, cellOf, &oracle, liveBytes-removedBytes, bs)
			}
		}
		if a := m.Applied(); a != 2000 {
			t.Fatalf("applied = %d", a)
		}
		if err := m.Sync(&updater); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		// Reopen: state survives a clean close.
		d = openMem(t, fs)
		m, err = d.OpenMap(pkey)
		if err != nil {
			t.Fatal(err)
		}
		if a := m.Applied(); a != 2000 {
			t.Fatalf("applied after reopen = %d", a)
		}
		d.Close()
	}
}

// checkOracle compares the whole map, block by block, with want, and the
// bytes of data extents with live.
func checkOracle[C comparable, A ~[256]C](t *testing.T, m *Map, set func(*A, Extent, int64), want *A, live, bs int64) {
	t.Helper()
	var got A
	var dataBytes int64
	for _, x := range m.Lookup(nil, 0, 1<<62) {
		for b := x.Start / bs; b < x.End()/bs; b++ {
			set(&got, x, b)
			if x.Kind == KindData {
				dataBytes += bs
			}
		}
	}
	if got != *want {
		t.Fatalf("applied %d: extent map differs from oracle", m.Applied())
	}
	if dataBytes != live {
		t.Fatalf("applied %d: live accounting %d != %d", m.Applied(), dataBytes, live)
	}
}

func TestReplaceAndRecords(t *testing.T) {
	d := openMem(t, vfs.NewMem())
	defer d.Close()
	pk := PKey(1, 0)
	e := Extent{Start: 4096, Len: 4096, Kind: KindData, Where: InJournal, Container: 1, COff: 100, Op: 1}
	m, err := d.OpenMap(pk)
	if err != nil {
		t.Fatal(err)
	}
	u := m.Update()
	u.Set(e, nil)
	u.Commit(1)
	moved := e
	moved.Where, moved.Container, moved.COff = InObject, 9, 0
	u = m.Update()
	if ok := u.Replace(e, moved); !ok {
		t.Fatal("replace of the current extent failed")
	}
	u.Commit(2)
	u = m.Update()
	if ok := u.Replace(e, moved); ok {
		t.Fatal("replace of a stale extent succeeded")
	}
	u.Commit(3)
	if got := m.Lookup(nil, 0, 1<<20); len(got) != 1 || got[0] != moved {
		t.Fatalf("map = %+v, want %+v", got, moved)
	}
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

package metastore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/cockroachdb/pebble"
	"github.com/google/btree"
)

// ErrBroken: an update of the map was abandoned half done; the map in memory
// no longer matches any prefix of the op stream and must be reopened.
var ErrBroken = errors.New("metastore: extent map abandoned mid-update")

// PersistEvery is how many committed updates a Map holds in its pending
// Pebble batch before it commits the batch on its own.
const PersistEvery = 256

// Map is one partition's extent map. Every lookup is answered from memory
// (a B-tree keyed by extent start); Pebble is where the map is persisted.
//
// Updates go into the tree at once and into a pending Pebble batch that is
// committed every PersistEvery updates, on Persist, and on Sync, together
// with the applied opnum of its newest update: the persisted map is always
// the map after some prefix of the op stream, possibly older than the map in
// memory. That is safe because the journal is the log: recovery (OpenMap,
// then replay of the journal after Persisted) rebuilds what was pending.
//
// Concurrency: Lookup, Len, Applied and Persisted are safe for concurrent
// use with each other and with one updater. Update (until its Commit or
// Abort), Persist, Sync and Drop are the updater's: the caller serializes
// them (the partition applies ops under one lock).
//
// Memory: about 100 bytes per extent (the tree node and the Extent), so a
// partition fragmented into 4 KiB extents costs about 25 MiB per GiB.
type Map struct {
	d    *DB
	pkey uint64

	mu struct {
		sync.RWMutex
		tree    *btree.BTreeG[Extent]
		applied uint64
	}

	// Owned by the updater.
	b         *pebble.Batch // pending, not yet committed
	pend      int           // updates in b
	persisted uint64
	broken    bool
}

func lessStart(a, b Extent) bool { return a.Start < b.Start }

// OpenMap loads partition pkey's persisted map into memory. Applied and
// Persisted are the persisted applied opnum (0 for a new partition).
func (d *DB) OpenMap(pkey uint64) (*Map, error) {
	m := &Map{d: d, pkey: pkey}
	m.mu.tree = btree.NewG(32, lessStart)
	applied, err := d.applied(pkey)
	if err != nil {
		return nil, err
	}
	m.mu.applied, m.persisted = applied, applied
	it, err := d.partIter(pkey)
	if err != nil {
		return nil, err
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		e, err := decodeExtent(it.Key(), it.Value())
		if err != nil {
			return nil, err
		}
		m.mu.tree.ReplaceOrInsert(e)
	}
	if err := it.Error(); err != nil {
		return nil, fmt.Errorf("metastore: load map %016x: %w", pkey, err)
	}
	return m, nil
}

// Applied is the opnum of the newest committed update.
func (m *Map) Applied() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.mu.applied
}

// Persisted is the applied opnum of the map Pebble holds. Only the updater
// may call it.
func (m *Map) Persisted() uint64 { return m.persisted }

// Len is the number of extents.
func (m *Map) Len() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.mu.tree.Len()
}

// Lookup appends to dst every extent overlapping [start, start+n), in
// order, clipped to the range, as one consistent view, and returns dst.
func (m *Map) Lookup(dst []Extent, start, n int64) []Extent {
	end := start + n
	m.mu.RLock()
	defer m.mu.RUnlock()
	m.overlapsLocked(start, end, func(e Extent) {
		dst = append(dst, e.Slice(start, end))
	})
	return dst
}

// Holds reports whether the map holds exactly e (an extent Lookup returned
// unclipped, and not changed since).
func (m *Map) Holds(e Extent) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	cur, ok := m.mu.tree.Get(e)
	return ok && cur == e
}

// overlapsLocked calls fn for every extent overlapping [start, end), in
// order, unclipped.
// REQUIRES: m.mu (read or write)
func (m *Map) overlapsLocked(start, end int64, fn func(Extent)) {
	from := start
	// The extent starting at or before start may reach into the range.
	m.mu.tree.DescendLessOrEqual(Extent{Start: start}, func(e Extent) bool {
		from = e.Start
		return false
	})
	m.mu.tree.AscendGreaterOrEqual(Extent{Start: from}, func(e Extent) bool {
		if e.Start >= end {
			return false
		}
		if e.End() > start {
			fn(e)
		}
		return true
	})
}

// Update starts one op's change of the map. It holds the map's write lock
// until Commit or Abort; lookups wait meanwhile.
func (m *Map) Update() *Update {
	m.mu.Lock()
	if m.b == nil {
		m.b = m.d.db.NewBatch()
	}
	return &Update{m: m}
}

// Update is one op's change to a partition's map: Sets and Replaces, then
// Commit with the op's opnum. Changes show in the tree at once (readers wait
// for Commit, which releases the lock).
type Update struct {
	m    *Map
	kb   [17]byte
	vb   [extentValueLen]byte
	olds []Extent
	err  error

	// Delta is the change in the partition's extent count so far.
	Delta int
}

// Set makes [e.Start, e.End()) map to e (or, with e.Kind == 0, to a hole),
// splitting or dropping what was there. removed is called with every piece
// of an old extent that no longer maps (for space accounting).
func (u *Update) Set(e Extent, removed func(Extent)) {
	m := u.m
	start, end := e.Start, e.End()
	u.olds = u.olds[:0]
	m.overlapsLocked(start, end, func(old Extent) { u.olds = append(u.olds, old) })
	for _, old := range u.olds {
		m.mu.tree.Delete(old)
		u.del(old.Start)
		if old.Start < start {
			u.put(old.Slice(old.Start, start))
		}
		if old.End() > end {
			u.put(old.Slice(end, old.End()))
		}
		if removed != nil {
			removed(old.Slice(max(start, old.Start), min(end, old.End())))
		}
	}
	if e.Kind != 0 {
		u.put(e)
	}
}

// Replace overwrites the extent that starts at e.Start with e, if and only
// if the map holds exactly old there. It reports whether it did.
func (u *Update) Replace(old, e Extent) bool {
	cur, ok := u.m.mu.tree.Get(old)
	if !ok || cur != old {
		return false
	}
	u.Delta-- // put re-counts the replaced extent
	u.put(e)
	return true
}

func (u *Update) put(e Extent) {
	u.Delta++
	u.m.mu.tree.ReplaceOrInsert(e)
	if u.err == nil {
		u.err = u.m.b.Set(extentKey(u.kb[:0], u.m.pkey, e.Start), encodeExtent(u.vb[:0], &e), nil)
	}
}

func (u *Update) del(start int64) {
	u.Delta--
	if u.err == nil {
		u.err = u.m.b.Delete(extentKey(u.kb[:0], u.m.pkey, start), nil)
	}
}

// Commit ends the update with the partition's applied opnum set to op and
// releases the lock. Every PersistEvery updates it persists the pending
// batch (see Persist). An error leaves the map broken.
func (u *Update) Commit(op uint64) error {
	m := u.m
	var ab [8]byte
	binary.BigEndian.PutUint64(ab[:], op)
	if u.err == nil {
		u.err = m.b.Set(appliedKey(m.pkey), ab[:], nil)
	}
	m.mu.applied = op
	m.mu.Unlock()
	if u.err != nil {
		m.abandon()
		return fmt.Errorf("metastore: map %016x op %d: %w", m.pkey, op, u.err)
	}
	m.pend++
	if m.pend >= PersistEvery {
		return m.Persist()
	}
	return nil
}

// Abort abandons a half-done update: the map is broken from now on (Persist
// and Sync fail; the partition must be reopened, which replays its journal).
func (u *Update) Abort() {
	u.m.mu.Unlock()
	u.m.abandon()
}

func (m *Map) abandon() {
	m.broken = true
	if m.b != nil {
		m.b.Close()
		m.b = nil
	}
	m.pend = 0
}

// Persist commits the pending batch to Pebble (not yet durable: see Sync).
func (m *Map) Persist() error {
	if m.broken {
		return fmt.Errorf("%w: partition %016x", ErrBroken, m.pkey)
	}
	if m.pend == 0 {
		return nil
	}
	m.mu.RLock()
	applied := m.mu.applied
	m.mu.RUnlock()
	b := m.b
	m.b, m.pend = nil, 0
	err := b.Commit(pebble.NoSync)
	b.Close()
	if err != nil {
		m.broken = true
		return fmt.Errorf("metastore: persist map %016x: %w", m.pkey, err)
	}
	m.persisted = applied
	return nil
}

// Sync persists the pending batch and makes the persisted map durable (a
// Pebble flush, which syncs the journals first through BeforeFlush).
func (m *Map) Sync() error {
	if err := m.Persist(); err != nil {
		return err
	}
	return m.d.Sync()
}

// Drop deletes the partition's map, in memory and in Pebble.
func (m *Map) Drop() error {
	m.mu.Lock()
	m.mu.tree.Clear(false)
	m.mu.applied = 0
	m.mu.Unlock()
	if m.b != nil {
		m.b.Close()
		m.b, m.pend = nil, 0
	}
	m.persisted = 0
	return m.d.DropPartition(m.pkey)
}

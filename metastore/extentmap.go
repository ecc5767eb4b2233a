package metastore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cockroachdb/pebble"
	"github.com/google/btree"
)

// ErrBroken: an update of the map was abandoned half done; the map in memory
// no longer matches any prefix of the op stream and must be reopened.
var ErrBroken = errors.New("metastore: extent map abandoned mid-update")

// Map is one partition's extent map. Every lookup is answered from memory
// (a B-tree keyed by extent start); Pebble is where the map is persisted.
//
// Updates go into the tree at once and into a pending Pebble batch. Persist
// (the partition's background work calls it) commits the pending batch
// together with the applied opnum of its newest update, outside the
// updater's lock, so a Pebble commit that waits (for a memtable flush, say)
// never stalls the partition's ops: the persisted map is always the map
// after some prefix of the op stream, possibly older than the map in
// memory. That is safe because the journal is the log: recovery (OpenMap,
// then replay of the journal after Persisted) rebuilds what was pending.
//
// Concurrency: Lookup, Holds, Len and Applied are safe for concurrent use
// with everything. Update (until its Commit or Abort) is the updater's: the
// caller serializes updates under a lock of its own (the partition's apply
// lock), which it passes to Persist and Sync; Drop needs no update in
// flight.
//
// Memory: about 100 bytes per extent (the tree node and the Extent), so a
// partition fragmented into 4 KiB extents costs about 25 MiB per GiB; the
// pending batch about 60 bytes per update since the last Persist.
type Map struct {
	d    *DB
	pkey uint64

	mu struct {
		sync.RWMutex
		tree    *btree.BTreeG[Extent]
		applied uint64
	}

	// Owned by the updater.
	b      *pebble.Batch // pending, not yet committed
	broken atomic.Bool

	// persist serializes commits of detached batches, in detach order.
	persist struct {
		sync.Mutex
		persisted uint64
	}
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
	m.mu.applied, m.persist.persisted = applied, applied
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

// Persisted is the applied opnum of the map Pebble holds.
func (m *Map) Persisted() uint64 {
	m.persist.Lock()
	defer m.persist.Unlock()
	return m.persist.persisted
}

// Len is the number of extents.
func (m *Map) Len() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.mu.tree.Len()
}

// End is the end of the last extent (0 for an empty map).
func (m *Map) End() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	e, ok := m.mu.tree.Max()
	if !ok {
		return 0
	}
	return e.End()
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
	u.put(e)
	return true
}

func (u *Update) put(e Extent) {
	u.m.mu.tree.ReplaceOrInsert(e)
	if u.err == nil {
		u.err = u.m.b.Set(extentKey(u.kb[:0], u.m.pkey, e.Start), encodeExtent(u.vb[:0], &e), nil)
	}
}

func (u *Update) del(start int64) {
	if u.err == nil {
		u.err = u.m.b.Delete(extentKey(u.kb[:0], u.m.pkey, start), nil)
	}
}

// Commit ends the update with the partition's applied opnum set to op and
// releases the lock. An error leaves the map broken.
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
	return nil
}

// Abort abandons a half-done update: the map is broken from now on (Persist
// and Sync fail; the partition must be reopened, which replays its journal).
func (u *Update) Abort() {
	u.m.mu.Unlock()
	u.m.abandon()
}

// REQUIRES: the updater's lock, or no update in flight
func (m *Map) abandon() {
	m.broken.Store(true)
	if m.b != nil {
		m.b.Close()
		m.b = nil
	}
}

// Persist commits to Pebble (not yet durable: see Sync) every update
// committed before the call. updater is the caller's lock that serializes
// updates; Persist holds it only to take the pending batch, not while
// Pebble commits it. It must not be held by the caller.
func (m *Map) Persist(updater sync.Locker) error {
	m.persist.Lock()
	defer m.persist.Unlock()
	updater.Lock()
	b := m.b
	m.b = nil
	m.mu.RLock()
	applied := m.mu.applied
	m.mu.RUnlock()
	updater.Unlock()
	if m.broken.Load() {
		if b != nil {
			b.Close()
		}
		return fmt.Errorf("%w: partition %016x", ErrBroken, m.pkey)
	}
	if b == nil {
		return nil
	}
	err := b.Commit(pebble.NoSync)
	b.Close()
	if err != nil {
		m.broken.Store(true)
		return fmt.Errorf("metastore: persist map %016x: %w", m.pkey, err)
	}
	m.persist.persisted = applied
	return nil
}

// Sync persists (see Persist) and makes the persisted map durable (a
// Pebble flush, which syncs the journals first through BeforeFlush).
func (m *Map) Sync(updater sync.Locker) error {
	if err := m.Persist(updater); err != nil {
		return err
	}
	return m.d.Sync()
}

// Drop deletes the partition's map, in memory and in Pebble. No update may
// be in flight, and the updater's lock must not be held.
func (m *Map) Drop() error {
	m.persist.Lock()
	defer m.persist.Unlock()
	m.mu.Lock()
	m.mu.tree.Clear(false)
	m.mu.applied = 0
	m.mu.Unlock()
	if m.b != nil {
		m.b.Close()
		m.b = nil
	}
	m.persist.persisted = 0
	return m.d.DropPartition(m.pkey)
}

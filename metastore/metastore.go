// Package metastore keeps a head node's metadata in Pebble: the extent map of
// every partition it hosts, and small node records (the volume catalog,
// persistent reservations, CHAP secrets).
//
// # Extent map
//
// Per partition, an extent map says where each byte range of the partition
// lives: in the partition's journal, in a flushed object of the long-term
// store, or nowhere (zeros). Ranges never written or trimmed have no entry
// (holes); WRITE_ZEROES leaves a Zero extent that holds no data.
//
// Key layout (all integers big-endian so keys sort by partition, then LBA):
//
//	+-----+-------------+--------------+
//	| 'x' | pkey u64    | start u64    |  -> extent value (below)
//	+-----+-------------+--------------+
//	| 'a' | pkey u64    |                 -> applied opnum u64
//	+-----+-------------+
//	| 'm' | namespace/key bytes           -> small node record (opaque)
//	+-----+-------------------------------+
//
// pkey is (volume number << 32 | partition index); start is a byte offset
// within the partition. Extent value:
//
//	+------+-------+-------------+-----------+---------+---------+
//	| kind | where | container   | coff      | len     | opnum   |
//	| u8   | u8    | u64         | u64       | u64     | u64     |
//	+------+-------+-------------+-----------+---------+---------+
//
// kind is Data or Zero; where is Journal (container = segment id) or Object
// (container = object sequence number); coff is the offset of the extent's
// first byte in the container.
//
// # Rules
//
//   - Extents of one partition never overlap. An Update splits and trims
//     what a new extent covers.
//   - A partition's map lives in memory (Map, a B-tree that answers every
//     lookup) and is persisted to Pebble in batches, each with the applied
//     opnum of its newest op, so the persisted map is always the map after
//     some prefix of the op stream (see Map).
//   - Mutations of one partition are serialized by the caller (the partition
//     owner); lookups may run concurrently with them and see a consistent
//     view per call.
//   - Pebble's WAL is off: the partition journals are the log. Before Pebble
//     writes any memtable to disk it calls the BeforeFlush hook, which syncs
//     every journal, so persisted extent-map state is never ahead of the
//     synced journals. Recovery replays each journal after the partition's
//     applied opnum. Node records are made durable by Sync (a Pebble flush).
package metastore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"

	"github.com/cockroachdb/pebble"
	"github.com/cockroachdb/pebble/vfs"
)

// Errors.
var (
	ErrCorrupt = errors.New("metastore: corrupt record")
)

// Kind of an extent.
type Kind uint8

const (
	KindData Kind = 1 // bytes live in a container
	KindZero Kind = 2 // reads as zeros, no data
)

// Where an extent's bytes live.
type Where uint8

const (
	InNone    Where = 0 // Zero extents
	InJournal Where = 1 // container = journal segment id
	InObject  Where = 2 // container = object sequence number
)

// Extent is one run of a partition's extent map.
type Extent struct {
	Start     int64 // byte offset within the partition
	Len       int64
	Kind      Kind
	Where     Where
	Container uint64
	COff      int64 // offset of Start's byte within the container
	Op        uint64
}

// End is the first byte after the extent.
func (e Extent) End() int64 { return e.Start + e.Len }

// Slice returns the part of e in [start, end), which must overlap e.
func (e Extent) Slice(start, end int64) Extent {
	if start > e.Start {
		d := start - e.Start
		e.Start += d
		e.Len -= d
		if e.Kind == KindData {
			e.COff += d
		}
	}
	if end < e.End() {
		e.Len = end - e.Start
	}
	return e
}

// Options configure Open.
type Options struct {
	FS          vfs.FS // nil: the real disk
	CacheSize   int64  // block cache bytes; 0: 32 MiB
	BeforeFlush func() // called before Pebble persists memtables; must not call into the DB
	Logger      *slog.Logger
}

// DB is a node's metadata store. Safe for concurrent use within the rules of
// the package doc.
type DB struct {
	db *pebble.DB
}

// Open opens or creates the store in dir.
func Open(dir string, o Options) (*DB, error) {
	if o.FS == nil {
		o.FS = vfs.Default
	}
	if o.CacheSize == 0 {
		o.CacheSize = 128 << 20
	}
	cache := pebble.NewCache(o.CacheSize)
	el := &pebble.EventListener{}
	if o.BeforeFlush != nil {
		before := o.BeforeFlush
		el.FlushBegin = func(pebble.FlushInfo) { before() }
	}
	opts := &pebble.Options{
		FS:                          o.FS,
		Cache:                       cache,
		DisableWAL:                  true,
		MemTableSize:                16 << 20,
		MemTableStopWritesThreshold: 4,
		EventListener:               el,
		Logger:                      quietLogger{},
	}
	db, err := pebble.Open(dir, opts)
	cache.Unref()
	if err != nil {
		return nil, fmt.Errorf("metastore: open %s: %w", dir, err)
	}
	return &DB{db: db}, nil
}

// Close persists the memtables (calling BeforeFlush first) and closes.
func (d *DB) Close() error {
	ferr := d.db.Flush()
	cerr := d.db.Close()
	return errors.Join(ferr, cerr)
}

// Sync makes every completed mutation durable (a memtable flush, which calls
// BeforeFlush first).
func (d *DB) Sync() error { return d.db.Flush() }

// PKey is the key of a partition: volume number and partition index.
func PKey(volume uint32, part uint32) uint64 { return uint64(volume)<<32 | uint64(part) }

func extentKey(buf []byte, pkey uint64, start int64) []byte {
	buf = append(buf[:0], 'x')
	buf = binary.BigEndian.AppendUint64(buf, pkey)
	return binary.BigEndian.AppendUint64(buf, uint64(start))
}

func appliedKey(pkey uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte{'a'}, pkey)
}

const extentValueLen = 2 + 8*4

func encodeExtent(buf []byte, e *Extent) []byte {
	buf = append(buf[:0], byte(e.Kind), byte(e.Where))
	buf = binary.BigEndian.AppendUint64(buf, e.Container)
	buf = binary.BigEndian.AppendUint64(buf, uint64(e.COff))
	buf = binary.BigEndian.AppendUint64(buf, uint64(e.Len))
	return binary.BigEndian.AppendUint64(buf, e.Op)
}

func decodeExtent(key, val []byte) (Extent, error) {
	if len(key) != 17 || len(val) != extentValueLen {
		return Extent{}, fmt.Errorf("%w: extent key %x", ErrCorrupt, key)
	}
	return Extent{
		Start:     int64(binary.BigEndian.Uint64(key[9:])),
		Kind:      Kind(val[0]),
		Where:     Where(val[1]),
		Container: binary.BigEndian.Uint64(val[2:]),
		COff:      int64(binary.BigEndian.Uint64(val[10:])),
		Len:       int64(binary.BigEndian.Uint64(val[18:])),
		Op:        binary.BigEndian.Uint64(val[26:]),
	}, nil
}

func (d *DB) partIter(pkey uint64) (*pebble.Iterator, error) {
	lo := extentKey(nil, pkey, 0)
	hi := binary.BigEndian.AppendUint64([]byte{'x'}, pkey+1)
	return d.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
}

// applied is the persisted applied opnum of partition pkey.
func (d *DB) applied(pkey uint64) (uint64, error) {
	v, c, err := d.db.Get(appliedKey(pkey))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if len(v) != 8 {
		return 0, fmt.Errorf("%w: applied opnum of %x", ErrCorrupt, pkey)
	}
	return binary.BigEndian.Uint64(v), nil
}

// DropPartition deletes the partition's map and applied opnum.
func (d *DB) DropPartition(pkey uint64) error {
	b := d.db.NewBatch()
	defer b.Close()
	lo := extentKey(nil, pkey, 0)
	hi := binary.BigEndian.AppendUint64([]byte{'x'}, pkey+1)
	if err := b.DeleteRange(lo, hi, nil); err != nil {
		return err
	}
	if err := b.Delete(appliedKey(pkey), nil); err != nil {
		return err
	}
	return b.Commit(pebble.NoSync)
}

func metaKey(ns, key string) []byte {
	return append(append(append([]byte{'m'}, ns...), 0), key...)
}

// PutRecord stores a small node record under (ns, key); durable after Sync.
func (d *DB) PutRecord(ns, key string, val []byte) error {
	return d.db.Set(metaKey(ns, key), val, pebble.NoSync)
}

// DeleteRecord removes a node record; durable after Sync.
func (d *DB) DeleteRecord(ns, key string) error {
	return d.db.Delete(metaKey(ns, key), pebble.NoSync)
}

// Record returns the record under (ns, key), or nil, false.
func (d *DB) Record(ns, key string) ([]byte, bool, error) {
	v, c, err := d.db.Get(metaKey(ns, key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	defer c.Close()
	return append([]byte(nil), v...), true, nil
}

// Records calls fn for every record of namespace ns, in key order.
func (d *DB) Records(ns string, fn func(key string, val []byte) error) error {
	lo := metaKey(ns, "")
	hi := append(append([]byte{'m'}, ns...), 1)
	it, err := d.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return err
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		if err := fn(string(it.Key()[len(lo):]), it.Value()); err != nil {
			return err
		}
	}
	return it.Error()
}

// Metrics returns Pebble's own summary, for status pages.
func (d *DB) Metrics() string { return d.db.Metrics().String() }

type quietLogger struct{}

func (quietLogger) Infof(format string, args ...interface{}) {}
func (quietLogger) Errorf(format string, args ...interface{}) {
	slog.Error("pebble: " + fmt.Sprintf(format, args...))
}
func (quietLogger) Fatalf(format string, args ...interface{}) {
	panic(fmt.Sprintf("pebble: "+format, args...))
}

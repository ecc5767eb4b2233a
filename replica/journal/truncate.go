package journal

import (
	"fmt"
	"slices"
)

// TruncateFrom removes every record with OpNum >= op, durably: when it
// returns nil, no crash brings any of them back. Records before op are
// untouched and their positions stay valid; later Appends may use any
// opnum above the last record kept (so opnums >= op can be written again).
// This is how a replica drops notes that its primary's log replaced.
//
// How (every intermediate state on disk is a prefix of the records, so a
// crash in the middle loses only records at or past op, never one before):
//
//   - Let S be the oldest segment holding a record >= op. If S is not the
//     active segment, a new empty active segment is created first (ids
//     keep growing), then the segments after S are removed newest first,
//     each removal made durable (directory fsync) before the next.
//   - Then S is cut at its first record >= op: truncated and fsync'ed, or,
//     on a file system without truncate, its prefix is copied to a
//     temporary file that is fsync'ed and renamed over it. A sealed S that
//     keeps no record is removed instead. An active S is presized again
//     after the cut is durable (its zero tail is what Open expects).
//
// TruncateFrom runs as a round of the group commit: no Sync round runs
// meanwhile, so none can report removed records, or records appended
// after the cut, durable by mistake. But a Sync call must not overlap a
// TruncateFrom: Sync waits for the last opnum it read at its start, and if
// a cut removed that opnum it runs rounds of fsyncs until appends pass it
// again. The caller serializes them (a replica driver calls both from one
// goroutine, and its metastore flush hook takes the driver's lock). Readers holding a segment that is
// removed or cut finish their reads; later reads of removed records fail
// (ErrRemoved, ErrRange). A failure after the first change poisons the
// journal (ErrFailed): reopen it, and the disk holds a prefix.
func (j *Journal) TruncateFrom(op uint64) error {
	c := &j.commit
	c.Lock()
	for c.running {
		done := c.done
		c.waiters++
		c.Unlock()
		<-done
		c.Lock()
		c.waiters--
	}
	c.running = true
	c.Unlock()

	last, changed, err := j.truncateFrom(op)

	c.Lock()
	c.running = false
	if err != nil && changed {
		err = j.poison(fmt.Errorf("%w: truncate from opnum %d: %w", ErrFailed, op, err))
	} else if err == nil && c.synced > last {
		c.synced = last
		j.synced.Store(last)
	}
	if c.waiters > 0 {
		close(c.done)
		c.done = make(chan struct{})
	}
	c.Unlock()
	return err
}

// truncateFrom does TruncateFrom's work. It returns the opnum of the last
// record kept, and whether anything changed on disk.
// REQUIRES: the caller runs the commit round (j.commit.running).
func (j *Journal) truncateFrom(op uint64) (last uint64, changed bool, err error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.mu.closed {
		return 0, false, ErrClosed
	}
	if err := j.failed(); err != nil {
		return 0, false, err
	}
	if op > j.mu.last {
		return j.mu.last, false, nil
	}
	k := slices.IndexFunc(j.mu.segs, func(s *segment) bool { return s.records > 0 && s.lastOp >= op })
	if k < 0 {
		panic(fmt.Sprintf("journal: no segment holds opnum %d <= last %d", op, j.mu.last))
	}
	cut := j.mu.segs[k]
	off, kept, err := j.findCut(cut, op)
	if err != nil {
		return 0, false, err
	}
	// The last record kept: in cut, or in an older segment.
	last = kept.lastOp
	if kept.records == 0 {
		last = 0
		for _, s := range j.mu.segs[:k] {
			if s.records > 0 {
				last = s.lastOp
			}
		}
	}

	if cut != j.mu.active {
		ns, err := j.createSegment(j.mu.active.id + 1)
		if err != nil {
			return 0, false, err
		}
		changed = true
		j.tab.Lock()
		j.tab.m[ns.id] = ns
		j.tab.Unlock()
		j.mu.segs = append(j.mu.segs, ns)
		j.mu.active = ns
		for i := len(j.mu.segs) - 2; i > k; i-- {
			if err := j.dropSegmentLocked(i); err != nil {
				return 0, true, err
			}
		}
	}
	if off == 0 && cut != j.mu.active {
		if err := j.dropSegmentLocked(k); err != nil {
			return 0, true, err
		}
	} else {
		ns, err := j.cutLive(cut, off)
		if err != nil {
			return 0, true, err
		}
		changed = true
		ns.firstOp, ns.lastOp, ns.records = kept.firstOp, kept.lastOp, kept.records
		j.mu.segs[k] = ns
		if cut == j.mu.active {
			j.mu.active = ns
			j.presize(ns.f) // a zero tail past the records, as Open expects
		}
		j.mu.unsynced = slices.DeleteFunc(j.mu.unsynced, func(s *segment) bool { return s == cut })
		j.tab.Lock()
		j.tab.m[ns.id] = ns
		j.tab.Unlock()
		cut.release() // the table's reference; readers in flight keep theirs
	}
	j.mu.last = last
	j.last.Store(last)
	return last, true, nil
}

// keptRecords describes the records a cut segment keeps.
type keptRecords struct {
	firstOp, lastOp uint64
	records         int64
}

// findCut returns the file offset of the first record of s with an opnum
// >= op, and what s keeps before it.
// REQUIRES: j.mu
func (j *Journal) findCut(s *segment, op uint64) (int64, keptRecords, error) {
	var k keptRecords
	size := s.size.Load()
	sc := newScanner(s.f, segTag(s.id), size, nil)
	for off := int64(0); off < size; {
		var h header
		_, _, bad, err := sc.next(off, &h)
		if err != nil {
			return 0, k, fmt.Errorf("journal: read %s at %d: %w", s.path, off, err)
		}
		if bad != "" {
			return 0, k, &CorruptError{Seg: s.id, Off: off, Reason: bad}
		}
		if h.kind == kindSeal {
			break
		}
		if h.opnum >= op {
			return off, k, nil
		}
		if k.records == 0 {
			k.firstOp = h.opnum
		}
		k.lastOp = h.opnum
		k.records++
		off += HeaderSize + h.payloadLen()
	}
	return 0, k, fmt.Errorf("%w: segment %016x holds no opnum >= %d", ErrCorrupt, s.id, op)
}

// cutLive makes the file of live segment s end at off, durably, and returns
// a new segment for it (size off, writable, one reference: the table's).
// s itself is left as it is, for the readers that hold it.
// REQUIRES: j.mu
func (j *Journal) cutLive(s *segment, off int64) (*segment, error) {
	f, err := j.fs.OpenReadWrite(s.path)
	if err != nil {
		return nil, fmt.Errorf("journal: open %s: %w", s.path, err)
	}
	if t, ok := f.(truncater); ok {
		if err := t.Truncate(off); err != nil {
			f.Close()
			return nil, fmt.Errorf("journal: truncate %s to %d: %w", s.path, off, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, fmt.Errorf("journal: fsync %s: %w", s.path, err)
		}
	} else {
		// No truncate in this FS: the prefix goes to a temporary file that
		// is renamed over the segment. A crash leaves either file whole.
		err = j.rewritePrefix(f, s.path, off)
		f.Close()
		if err != nil {
			return nil, err
		}
		if f, err = j.fs.OpenReadWrite(s.path); err != nil {
			return nil, fmt.Errorf("journal: open %s: %w", s.path, err)
		}
	}
	ns := &segment{id: s.id, path: s.path, f: f}
	ns.refs.Store(1)
	ns.size.Store(off)
	return ns, nil
}

// dropSegmentLocked removes j.mu.segs[i], which is not active, from the
// table and the disk, durably (directory fsync).
// REQUIRES: j.mu
func (j *Journal) dropSegmentLocked(i int) error {
	s := j.mu.segs[i]
	if s == j.mu.active {
		panic("journal: dropping the active segment")
	}
	j.unlinkLocked(i)
	return j.deleteFile(s)
}

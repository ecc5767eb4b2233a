package replica

// This file is snapshot transfer: how a Replica that is primary sends a
// peer the partition's state at an opnum, and how a Replica installs one.
// It provisions a new secondary, and one that fell behind what its
// primary's log still holds (see Log compaction).
//
// # Protocol
//
//	primary                                          secondary
//	Core: Snapshot(Index N) in Ready.Messages
//	  sender goroutine: holds bgMu (no Background moves or deletes data
//	  meanwhile); view = the extent map now (a copy of its extents: the
//	  state at N or after, see Rules)
//	  sender goroutine:
//	SnapChunk(N, part 0, pieces...) -------------->  staged: each part's data
//	SnapChunk(N, part 1, ...)       -------------->  written as a new object
//	   ... at most snapWindow parts past the ack      of the store; pieces kept
//	              <-------------- SnapAck(N, next)   in memory (not yet in the map)
//	SnapChunk(N, part k, FlagLast)  -------------->
//	              <-------------- SnapAck(N, k+1)
//	Snapshot(N, seen ids)           -------------->  step: the Core takes it
//	                                                 (stepFinal: no longer staging;
//	                                                 a next transfer may start);
//	                                                 its Ready.Snapshot installs
//	                                                 it (below)
//
// Pieces are the view's extents in LBA order: data (split at snapPiece
// bytes) with its bytes, zeros as a length; holes are not sent. A part
// holds up to snapPart bytes of data. Parts go back-N: the secondary
// takes only the part it expects and acks the next one it wants; the
// sender resends from the ack after snapResend without progress and gives
// up after snapGiveUp (the Core asks again later). Sending is throttled to
// ReplicaConfig.SnapshotRate bytes per second, so the foreground keeps
// most of the disk.
//
// # Install (secondary, in Ready.Snapshot, once the whole transfer is staged)
//
//  1. INSTALL marker file in the journal directory, durable: from here to
//     step 5, a restart wipes the partition (OpenReplica: wipeIfMarked),
//     so a half-installed state never serves. A replica that needs a
//     snapshot is in no commit quorum (it has not acked the primary's
//     log), so coming back empty loses nothing acknowledged.
//  2. The journal is cut whole (TruncateFrom(1)).
//  3. One map update drops every extent and sets the staged ones, with
//     applied = N; then Persist and a metastore Sync make it durable.
//  4. A noop note at (PrevEpoch, N) is appended and synced, so a restart
//     knows the snapshot's epoch (recover).
//  5. The marker is removed; the objects the old state used are deleted.
//
// # Rules
//
//   - One transfer per peer at a time; a Snapshot the Core asks for while
//     one runs to that peer is dropped (the Core asks again if needed).
//   - Chunks are taken only from the primary the Core follows, at its
//     epoch; Appends are not stepped while a transfer is staged (their
//     rejects would only ask for another snapshot); a chunk of another
//     transfer (epoch or index) starts over and drops what was staged.
//   - The data a view points at stays readable for the transfer: the
//     sender holds bgMu, so no Background moves or deletes anything. The
//     view may be of a state past N (ops applied between the Ready and
//     the sender's start): installing it at N and then replaying the ops
//     after N gives the same state, since every op overwrites its range
//     whatever was there (writes, zeroes, trims), and the replica serves
//     no read until it has caught up and joined the in-sync set.
//   - Request ids of applied ops (Seen) ride in the final Snapshot message
//     as the Core sends them; an installed state's ids live in the Core
//     only (a restart right after an install forgets them).

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/journal"
	"stor.dev/stor/replica/wire"
)

// Transfer tuning (variables for tests).
var (
	snapPiece int64 = 1 << 20 // data bytes of one piece
	snapPart  int64 = 1 << 20 // data bytes of one part (message)
)

const (
	snapWindow  = 8 // parts sent past the ack
	snapResend  = time.Second
	snapGiveUp  = 30 * time.Second
	installFile = "INSTALL"

	// DefaultSnapshotRate is ReplicaConfig.SnapshotRate's default.
	DefaultSnapshotRate = 200 << 20
)

// snapSender is one running transfer to a peer. Owned by run, but for
// acks (a buffered channel the sender goroutine reads).
type snapSender struct {
	to    api.NodeID
	index api.OpNum
	acks  chan uint64
	done  chan struct{}
}

// startSnapshot begins sending the state at m.Index (the state now, as
// Ready has applied every op up to it) to m.To, unless a transfer to that
// peer runs.
func (r *Replica) startSnapshot(m *wire.Msg) {
	if s := r.senders[m.To]; s != nil {
		select {
		case <-s.done:
		default:
			return // one at a time
		}
	}
	if m.Index != r.applied {
		r.log.Error("snapshot asked at an opnum other than the applied one; not sent", "index", m.Index, "applied", r.applied)
		return
	}
	s := &snapSender{to: m.To, index: m.Index, acks: make(chan uint64, 64), done: make(chan struct{})}
	r.senders[m.To] = s
	final := *m
	final.Data = nil
	epoch := r.core.Epoch()
	r.replies.Add(1)
	go func() {
		defer r.replies.Done()
		defer close(s.done)
		// No Background while the view is read: it could move the data
		// the view points at and delete where it was.
		r.bgMu.Lock()
		defer r.bgMu.Unlock()
		view := r.p.m.Lookup(nil, 0, 1<<62)
		start := time.Now()
		n, err := r.sendSnapshot(s, epoch, view, &final)
		if err != nil {
			r.log.Warn("snapshot transfer abandoned", "to", s.to, "index", s.index, "bytes", n, "err", err)
			return
		}
		r.log.Info("snapshot sent", "to", s.to, "index", s.index, "bytes", n, "extents", len(view),
			"took", time.Since(start).Round(time.Millisecond))
	}()
}

var errSnapAbandoned = errors.New("replica: snapshot transfer abandoned")

// sendSnapshot runs on its own goroutine: the parts of view, then final.
func (r *Replica) sendSnapshot(s *snapSender, epoch api.Epoch, view []metastore.Extent, final *wire.Msg) (int64, error) {
	parts := snapParts(view)
	var sent int64 // bytes of data, for the rate
	rate := r.cfg.SnapshotRate
	start := time.Now()
	acked := uint64(0)
	next := uint64(0)
	lastProgress := time.Now()
	timer := time.NewTimer(snapResend)
	defer timer.Stop()
	for acked < uint64(len(parts)) {
		if st := r.status.Load(); st.Role != RolePrimary || st.Epoch != epoch {
			return sent, fmt.Errorf("%w: no longer primary at epoch %d", errSnapAbandoned, epoch)
		}
		for next < acked+snapWindow && next < uint64(len(parts)) {
			m, n, err := r.snapPart(s, epoch, parts, next)
			if err != nil {
				return sent, err
			}
			r.cfg.Send(m)
			sent += n
			next++
			if rate > 0 {
				if ahead := time.Duration(float64(sent)/float64(rate)*float64(time.Second)) - time.Since(start); ahead > 0 {
					select {
					case <-time.After(ahead):
					case <-r.stop:
						return sent, errSnapAbandoned
					}
				}
			}
		}
		timer.Reset(snapResend)
		select {
		case a := <-s.acks:
			if a > acked {
				acked, lastProgress = a, time.Now()
			}
			next = max(next, acked)
		case <-timer.C:
			if time.Since(lastProgress) > snapGiveUp {
				return sent, fmt.Errorf("%w: no ack from %s for %v", errSnapAbandoned, s.to, snapGiveUp)
			}
			next = acked // go back
		case <-r.stop:
			return sent, errSnapAbandoned
		}
	}
	r.cfg.Send(final)
	return sent, nil
}

// snapParts splits view into parts: runs of pieces, each part at most
// snapPart bytes of data and wire.MaxEntries pieces.
func snapParts(view []metastore.Extent) [][]metastore.Extent {
	var parts [][]metastore.Extent
	var cur []metastore.Extent
	var bytes int64
	flush := func() {
		if len(cur) > 0 {
			parts = append(parts, cur)
			cur, bytes = nil, 0
		}
	}
	for _, e := range view {
		for e.Len > 0 {
			piece := e
			if e.Kind == metastore.KindData {
				piece.Len = min(e.Len, snapPiece)
				if bytes+piece.Len > snapPart || len(cur) == wire.MaxEntries {
					flush()
				}
				bytes += piece.Len
			} else if len(cur) == wire.MaxEntries {
				flush()
			}
			cur = append(cur, piece)
			if e.Kind != metastore.KindData {
				break
			}
			e.Start, e.COff, e.Len = e.Start+piece.Len, e.COff+piece.Len, e.Len-piece.Len
		}
	}
	flush()
	if len(parts) == 0 {
		parts = append(parts, nil) // an empty state is one empty last part
	}
	return parts
}

// snapPart builds part i's message, reading its data.
func (r *Replica) snapPart(s *snapSender, epoch api.Epoch, parts [][]metastore.Extent, i uint64) (*wire.Msg, int64, error) {
	m := &wire.Msg{Type: wire.TypeSnapChunk, Epoch: epoch, Partition: r.cfg.Core.Partition, From: r.cfg.Core.ID, To: s.to,
		Index: s.index, ReqID: i}
	if i == uint64(len(parts))-1 {
		m.Flags = wire.FlagLast
	}
	var n int64
	for _, e := range parts[i] {
		en := wire.Entry{Kind: wire.KindZero, Off: e.Start, Len: e.Len}
		if e.Kind == metastore.KindData {
			en.Kind = wire.KindWrite
			en.Data = make([]byte, e.Len)
			if err := r.p.readExtent(context.Background(), en.Data, e); err != nil {
				return nil, 0, fmt.Errorf("snapshot for %s: %w", s.to, err)
			}
			n += e.Len
		}
		m.Entries = append(m.Entries, en)
	}
	return m, n, nil
}

// readExtent reads the data of extent e.
func (p *Partition) readExtent(ctx context.Context, dst []byte, e metastore.Extent) error {
	p.gc.RLock()
	defer p.gc.RUnlock()
	if e.Where == metastore.InJournal {
		return p.j.ReadAt(dst, journal.Pos{Seg: e.Container, Off: e.COff})
	}
	return p.store.ReadAt(ctx, erasure.ShardID{PKey: p.pkey, Seq: e.Container}, dst, e.COff)
}

// snapAck hands a SnapAck to its transfer.
func (r *Replica) snapAck(m *wire.Msg) {
	s := r.senders[m.From]
	if s == nil || s.index != m.Index || m.Epoch != r.core.Epoch() {
		return
	}
	select {
	case s.acks <- m.ReqID:
	default:
	}
}

// staged is a transfer being received.
type staged struct {
	epoch   api.Epoch
	index   api.OpNum
	next    uint64 // next part expected
	done    bool   // the last part is staged
	extents []metastore.Extent
	objects map[uint64]int64 // object seq -> size
}

// snapChunk stages one part of a transfer from the primary.
func (r *Replica) snapChunk(m *wire.Msg) {
	if m.Epoch != r.core.Epoch() || m.From != r.core.Primary() || r.core.Role() == RolePrimary {
		return
	}
	st := r.staged
	if st == nil || st.epoch != m.Epoch || st.index != m.Index {
		if m.ReqID != 0 {
			return // not the start of a transfer: the sender goes back to 0 after a timeout
		}
		r.dropStaged()
		st = &staged{epoch: m.Epoch, index: m.Index, objects: make(map[uint64]int64)}
		r.staged = st
		r.log.Info("receiving a snapshot", "from", m.From, "index", m.Index, "epoch", m.Epoch)
	}
	ack := func() {
		r.cfg.Send(&wire.Msg{Type: wire.TypeSnapAck, Epoch: m.Epoch, Partition: m.Partition, From: r.cfg.Core.ID, To: m.From,
			Index: m.Index, ReqID: st.next})
	}
	if m.ReqID != st.next || st.done {
		ack() // a resend or a gap: say where we are
		return
	}
	var data []byte
	for _, e := range m.Entries {
		if e.Off < 0 || e.Len <= 0 || (r.cfg.Size > 0 && e.Off+e.Len > r.cfg.Size) ||
			(e.Kind == wire.KindWrite) != (e.Data != nil) || (e.Kind == wire.KindWrite && int64(len(e.Data)) != e.Len) ||
			(e.Kind != wire.KindWrite && e.Kind != wire.KindZero) {
			r.log.Warn("snapshot part refused: a malformed piece", "from", m.From, "part", m.ReqID, "off", e.Off, "len", e.Len, "kind", e.Kind)
			r.dropStaged()
			return
		}
		data = append(data, e.Data...)
	}
	var seq uint64
	if len(data) > 0 {
		p := r.p
		p.mu.Lock()
		seq = p.mu.nextSeq
		p.mu.nextSeq++
		p.mu.Unlock()
		if err := p.store.Put(context.Background(), erasure.ShardID{PKey: p.pkey, Seq: seq}, data); err != nil {
			r.log.Warn("snapshot part not staged", "part", m.ReqID, "err", err)
			return // not acked: the sender resends
		}
		st.objects[seq] = int64(len(data))
	}
	var coff int64
	for _, e := range m.Entries {
		x := metastore.Extent{Start: e.Off, Len: e.Len, Kind: metastore.KindZero, Op: uint64(st.index)}
		if e.Kind == wire.KindWrite {
			x.Kind, x.Where, x.Container, x.COff = metastore.KindData, metastore.InObject, seq, coff
			coff += e.Len
		}
		st.extents = append(st.extents, x)
	}
	st.next++
	st.done = m.Flags&wire.FlagLast != 0
	ack()
}

// dropStaged abandons the transfer being staged and deletes its objects.
func (r *Replica) dropStaged() {
	r.dropObjects(r.staged)
	r.staged = nil
}

// stepFinal takes the staged transfer that the final Snapshot message
// (now stepped into the Core) ends out of staging: it waits for the
// Ready that installs it, while a next transfer may start staging.
func (r *Replica) stepFinal() {
	r.dropObjects(r.installing) // one the Core did not take
	r.installing, r.staged = r.staged, nil
}

// dropObjects deletes the objects st staged.
func (r *Replica) dropObjects(st *staged) {
	if st == nil {
		return
	}
	for seq := range st.objects {
		if err := r.p.store.Delete(context.Background(), erasure.ShardID{PKey: r.p.pkey, Seq: seq}); err != nil {
			r.log.Warn("deleting a staged snapshot object", "seq", seq, "err", err)
		}
	}
}

// snapshotReady reports whether the final Snapshot message m ends the
// staged transfer: only then may the Core step it.
func (r *Replica) snapshotReady(m *wire.Msg) bool {
	st := r.staged
	return st != nil && st.done && st.epoch == m.Epoch && st.index == m.Index
}

// install makes the staged state the partition's (see Install at the top
// of this file). An error leaves the marker: the Replica fails, and a
// reopen wipes the partition.
func (r *Replica) install(snap *Snapshot) error {
	st := r.installing
	if st == nil || !st.done || st.index != snap.Index {
		return fmt.Errorf("snapshot at %d: nothing staged for it", snap.Index)
	}
	r.bgMu.Lock()
	defer r.bgMu.Unlock()
	p := r.p
	fs, marker := p.opts.FS, p.opts.FS.PathJoin(p.opts.Dir, installFile)
	if err := replaceDurable(fs, p.opts.Dir, marker, []byte(fmt.Sprintf("%d %d\n", snap.Epoch, snap.Index))); err != nil {
		return fmt.Errorf("install marker: %w", err)
	}
	r.cutMu.Lock()
	err := p.j.TruncateFrom(1)
	r.cutMu.Unlock()
	if err != nil {
		return fmt.Errorf("install: cut the journal: %w", err)
	}
	old, err := p.store.List(context.Background(), p.pkey)
	if err != nil {
		return fmt.Errorf("install: list objects: %w", err)
	}
	p.mu.Lock()
	u := p.m.Update()
	u.Set(metastore.Extent{Start: 0, Len: 1 << 62}, nil)
	for _, e := range st.extents {
		u.Set(e, nil)
	}
	err = u.Commit(uint64(snap.Index))
	if err == nil {
		p.mu.applied = uint64(snap.Index)
		clear(p.mu.live)
		clear(p.mu.deadAt)
		clear(p.mu.shardSz)
		for seq, size := range st.objects {
			p.mu.shardSz[seq] = size
		}
		for _, e := range st.extents {
			if e.Kind == metastore.KindData {
				p.mu.live[container{e.Where, e.Container}] += e.Len
			}
		}
	}
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("install: extent map: %w", err)
	}
	if err := p.m.Sync(&p.mu.Mutex); err != nil {
		return fmt.Errorf("install: persist the extent map: %w", err)
	}
	r.scratch = appendNoteAux(r.scratch[:0], wire.KindNoop, 0)
	if _, err := p.j.Append(&journal.Record{Kind: journal.KindMeta, Epoch: uint64(snap.Epoch), OpNum: uint64(snap.Index), Aux: r.scratch}); err != nil {
		return fmt.Errorf("install: note the snapshot: %w", err)
	}
	if err := p.j.Sync(context.Background()); err != nil {
		return fmt.Errorf("install: journal sync: %w", err)
	}
	if err := fs.Remove(marker); err != nil {
		return fmt.Errorf("install: remove the marker: %w", err)
	}
	for _, o := range old {
		if _, ok := st.objects[o.Seq]; !ok {
			if err := p.store.Delete(context.Background(), erasure.ShardID{PKey: p.pkey, Seq: o.Seq}); err != nil {
				r.log.Warn("install: deleting an old object", "seq", o.Seq, "err", err)
			}
		}
	}
	r.installing = nil
	r.applied, r.base, r.pos = snap.Index, snap.Index+1, r.pos[:0]
	p.seq.Lock()
	p.seq.next = uint64(snap.Index) + 1
	p.seq.Unlock()
	r.log.Info("snapshot installed", "index", snap.Index, "epoch", snap.Epoch, "extents", len(st.extents), "objects", len(st.objects))
	return nil
}

// wipeIfMarked empties a partition whose install did not finish (the
// INSTALL marker is there): journal, extent map and objects.
func wipeIfMarked(p *Partition) (bool, error) {
	fs, marker := p.opts.FS, p.opts.FS.PathJoin(p.opts.Dir, installFile)
	if _, err := fs.Stat(marker); errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	if err := p.j.TruncateFrom(1); err != nil {
		return true, err
	}
	p.mu.Lock()
	u := p.m.Update()
	u.Set(metastore.Extent{Start: 0, Len: 1 << 62}, nil)
	err := u.Commit(0)
	if err == nil {
		p.mu.applied = 0
		clear(p.mu.live)
		clear(p.mu.deadAt)
		clear(p.mu.shardSz)
	}
	p.mu.Unlock()
	if err != nil {
		return true, err
	}
	if err := p.m.Sync(&p.mu.Mutex); err != nil {
		return true, err
	}
	objs, err := p.store.List(context.Background(), p.pkey)
	if err != nil {
		return true, err
	}
	for _, o := range objs {
		if err := p.store.Delete(context.Background(), erasure.ShardID{PKey: p.pkey, Seq: o.Seq}); err != nil {
			return true, err
		}
	}
	p.seq.Lock()
	p.seq.next = 1
	p.seq.Unlock()
	return true, fs.Remove(marker)
}

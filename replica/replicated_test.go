package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica/transport"
	"stor.dev/stor/replica/wire"
)

// The Replica tests run three real replicas (Pebble, local shard store and
// journal on the in-memory FS) over an in-test router that can cut a node
// off, and a fake control plane that promotes and grants. The router
// delivers to other endpoints too (remote clients), and can hand the
// replicas' messages to real TCP transports instead (see remote_test.go).

const ctlID api.NodeID = "ctl"

// rnode is one replica's host: its disk and what runs on it.
type rnode struct {
	id    api.NodeID
	fs    vfs.FS
	mem   *vfs.MemFS // the same FS, when it models power loss (StrictMem)
	meta  *metastore.DB
	store *erasure.Local
	p     atomic.Pointer[Partition]
	rep   atomic.Pointer[Replica]
}

// rcluster is the nodes, the router and the control plane.
type rcluster struct {
	t     *testing.T
	nodes []*rnode
	ctl   *fakeControl
	base  int // goroutines before the cluster

	mu struct {
		sync.Mutex
		cut  map[api.NodeID]bool
		ends map[api.NodeID]func(*wire.Msg) // endpoints other than replicas and control
		tcp  map[api.NodeID]*transport.TCP  // a node's transport, if on TCP
		// in counts the router's Deliver calls under way per node, and
		// watch (if set) sees every message sent with whether its sender
		// was inside a Deliver then (it served the message inline).
		in    map[api.NodeID]int
		watch func(m *wire.Msg, inDeliver bool)
	}
}

func newRCluster(t *testing.T, n int, strict bool) *rcluster {
	t.Helper()
	c := &rcluster{t: t, base: runtime.NumGoroutine()}
	c.mu.cut = make(map[api.NodeID]bool)
	c.mu.ends = make(map[api.NodeID]func(*wire.Msg))
	c.mu.tcp = make(map[api.NodeID]*transport.TCP)
	c.mu.in = make(map[api.NodeID]int)
	c.ctl = &fakeControl{c: c, inSync: make(map[api.NodeID]bool)}
	for i := range n {
		nd := &rnode{id: api.NodeID(fmt.Sprintf("n%d", i+1))}
		if strict {
			nd.mem = vfs.NewStrictMem()
		} else {
			nd.mem = vfs.NewMem()
		}
		nd.fs = nd.mem
		c.nodes = append(c.nodes, nd)
		c.ctl.inSync[nd.id] = true
		c.open(nd)
	}
	return c
}

func (c *rcluster) node(id api.NodeID) *rnode {
	for _, nd := range c.nodes {
		if nd.id == id {
			return nd
		}
	}
	c.t.Fatalf("no node %s", id)
	return nil
}

func (c *rcluster) rep(id api.NodeID) *Replica { return c.node(id).rep.Load() }

// open starts a node from its disk.
func (c *rcluster) open(nd *rnode) {
	t := c.t
	t.Helper()
	ctx := context.Background()
	var err error
	nd.meta, err = metastore.Open("meta", metastore.Options{FS: nd.fs, BeforeFlush: func() {
		if r := nd.rep.Load(); r != nil {
			r.SyncJournal(ctx)
		} else if p := nd.p.Load(); p != nil {
			p.Sync(ctx)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if nd.store, err = erasure.OpenLocal(nd.fs, "store"); err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.DiscardHandler)
	p, err := OpenReplicaPartition(ctx, metastore.PKey(1, 0), nd.meta, nd.store,
		Options{FS: nd.fs, Dir: "journal", SegmentSize: 64 << 10, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	nd.p.Store(p)
	r, err := OpenReplica(ctx, p, ReplicaConfig{
		Core:   CoreConfig{ID: nd.id, Partition: 1, Control: ctlID, PeerTimeoutTicks: 10, RetryTicks: 3},
		Send:   c.send,
		Tick:   5 * time.Millisecond,
		Size:   testPartSize,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("node", nd.id),
	})
	if err != nil {
		t.Fatal(err)
	}
	nd.rep.Store(r)
}

// stop closes a node; with powerLoss (StrictMem only) everything it did
// not fsync is lost.
func (c *rcluster) stop(nd *rnode, powerLoss bool) {
	t := c.t
	t.Helper()
	if powerLoss {
		nd.mem.SetIgnoreSyncs(true)
	}
	r := nd.rep.Load()
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	nd.rep.Store(nil)
	p := nd.p.Load()
	if err := p.Close(); err != nil && !powerLoss {
		t.Fatal(err)
	}
	nd.p.Store(nil)
	nd.meta.Close()
	nd.store.Close()
	if powerLoss {
		nd.mem.ResetToSyncedState()
		nd.mem.SetIgnoreSyncs(false)
	}
}

// close stops every node and checks that no goroutine is left.
func (c *rcluster) close() {
	c.t.Helper()
	for _, nd := range c.nodes {
		if nd.rep.Load() != nil {
			c.stop(nd, false)
		}
	}
	waitUntil(c.t, "no goroutine left", func() bool { return runtime.NumGoroutine() <= c.base })
}

func (c *rcluster) setCut(id api.NodeID, cut bool) {
	c.mu.Lock()
	c.mu.cut[id] = cut
	c.mu.Unlock()
}

// setEnd makes the router deliver messages to id (not a replica) to f.
func (c *rcluster) setEnd(id api.NodeID, f func(*wire.Msg)) {
	c.mu.Lock()
	c.mu.ends[id] = f
	c.mu.Unlock()
}

// send is every replica's transport: it encodes and decodes each message
// (no sharing of buffers, and the wire format on every hop) and delivers
// it unless an end is cut off. A message from a node on TCP (other than to
// the control plane) goes through that node's transport instead.
func (c *rcluster) send(m *wire.Msg) {
	c.mu.Lock()
	drop := c.mu.cut[m.From] || c.mu.cut[m.To]
	end, tcp := c.mu.ends[m.To], c.mu.tcp[m.From]
	if c.mu.watch != nil {
		c.mu.watch(m, c.mu.in[m.From] > 0)
	}
	c.mu.Unlock()
	if drop {
		return
	}
	if tcp != nil && m.To != ctlID {
		tcp.Send(m)
		return
	}
	d, err := wire.Decode(wire.Encode(m))
	if err != nil {
		panic(fmt.Sprintf("wire round trip of %v: %v", m, err))
	}
	if d.To == ctlID {
		c.ctl.handle(d)
		return
	}
	if end != nil {
		end(d)
		return
	}
	for _, nd := range c.nodes {
		if nd.id == d.To {
			if r := nd.rep.Load(); r != nil {
				c.mu.Lock()
				c.mu.in[d.To]++
				c.mu.Unlock()
				r.Deliver(d)
				c.mu.Lock()
				c.mu.in[d.To]--
				c.mu.Unlock()
			}
		}
	}
}

// fakeControl is the control plane of the one partition: promotions,
// grants for the in-sync set and solo blessings (as replicatest's).
type fakeControl struct {
	c  *rcluster
	mu sync.Mutex
	// Guarded by mu.
	epoch   api.Epoch
	primary api.NodeID
	inSync  map[api.NodeID]bool
	lastSeq uint64
	hold    bool        // leave control requests unanswered
	asked   []wire.Msg  // every control request received
	granted []wire.Kind // kinds granted, in order
}

func (f *fakeControl) setHold(h bool) {
	f.mu.Lock()
	f.hold = h
	f.mu.Unlock()
}

func (f *fakeControl) askedFor(kind wire.Kind, peer api.NodeID) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range f.asked {
		if m.Kind == kind && len(m.Peers) > 0 && m.Peers[0] == peer {
			return true
		}
	}
	return false
}

func (f *fakeControl) isInSync(id api.NodeID) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.inSync[id]
}

func (f *fakeControl) handle(m *wire.Msg) {
	f.mu.Lock()
	if m.Type != wire.TypeControl {
		f.mu.Unlock()
		return
	}
	f.asked = append(f.asked, *m)
	if m.Epoch < f.epoch {
		st := &wire.Msg{Type: wire.TypeStale, Epoch: f.epoch, Partition: 1, From: ctlID, To: m.From}
		f.mu.Unlock()
		f.c.send(st)
		return
	}
	if f.hold || m.Epoch != f.epoch || m.From != f.primary || m.ReqID <= f.lastSeq {
		f.mu.Unlock()
		return
	}
	f.lastSeq = m.ReqID
	g := &wire.Msg{Type: wire.TypeGrant, Epoch: f.epoch, Partition: 1, From: ctlID, To: m.From, Kind: m.Kind,
		ReqID: m.ReqID, Peers: m.Peers}
	switch m.Kind {
	case wire.CtlDropPeer:
		delete(f.inSync, m.Peers[0])
	case wire.CtlInSync:
		f.inSync[m.Peers[0]] = true
	case wire.CtlBless:
		if len(f.inSync) != 1 || !f.inSync[f.primary] {
			g.Flags = wire.FlagReject
		}
	}
	if g.Flags == 0 {
		f.granted = append(f.granted, m.Kind)
	}
	f.mu.Unlock()
	f.c.send(g)
}

// promote makes id primary at the next epoch, with in-sync peers as the
// control plane records them (less any in out), and waits until it serves.
func (c *rcluster) promote(id api.NodeID, out ...api.NodeID) api.Epoch {
	c.t.Helper()
	f := c.ctl
	f.mu.Lock()
	f.epoch++
	f.primary = id
	f.lastSeq = 0
	for _, o := range out {
		delete(f.inSync, o)
	}
	f.inSync[id] = true
	m := wire.Msg{Type: wire.TypePromote, Epoch: f.epoch, Partition: 1, From: ctlID, To: id}
	for _, nd := range c.nodes {
		if nd.id != id {
			m.Peers = append(m.Peers, nd.id)
			b := byte(0)
			if f.inSync[nd.id] {
				b = 1
			}
			m.Data = append(m.Data, b)
		}
	}
	epoch := f.epoch
	f.mu.Unlock()
	// Resend until it serves: a promotion may be dropped like any message.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.send(&m)
		until := time.Now().Add(50 * time.Millisecond)
		for time.Now().Before(until) {
			if s := c.rep(id).Status(); s.Role == RolePrimary && s.Epoch == epoch {
				return epoch
			}
			time.Sleep(time.Millisecond)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s not primary at epoch %d: %+v", id, epoch, c.rep(id).Status())
		}
	}
}

// testWriter sends log lines to the test's log (shown on failure or -v).
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimSuffix(b, []byte("\n"))))
	return len(b), nil
}

// waitUntil polls cond until it holds, failing after 10 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// quiesce waits until every node in ids applied everything the primary
// committed, and the primary committed its whole log.
func (c *rcluster) quiesce(primary api.NodeID, ids ...api.NodeID) {
	c.t.Helper()
	waitUntil(c.t, fmt.Sprintf("%v caught up with %s", ids, primary), func() bool {
		ps := c.rep(primary).Status()
		if ps.Commit != ps.Last || ps.Applied != ps.Commit {
			return false
		}
		for _, id := range ids {
			if s := c.rep(id).Status(); s.Applied != ps.Commit || s.Last != ps.Last {
				return false
			}
		}
		return true
	})
}

const (
	rbs     = 4096
	rblocks = 32
	// testPartSize is the partition size the test Replicas check remote
	// requests against.
	testPartSize = 8 << 20
)

// rmodel is the expected content: a fill byte per block (0 = zeros).
type rmodel [rblocks]byte

// checkPartition compares a node's partition (its committed state, read
// directly) with m.
func (c *rcluster) checkPartition(id api.NodeID, m *rmodel) {
	c.t.Helper()
	buf := make([]byte, rblocks*rbs)
	if err := c.node(id).p.Load().ReadAt(context.Background(), buf, 0); err != nil {
		c.t.Fatalf("%s: read: %v", id, err)
	}
	checkBlocks(c.t, string(id), buf, m)
}

func checkBlocks(t *testing.T, what string, buf []byte, m *rmodel) {
	t.Helper()
	for b := range rblocks {
		if want := bytes.Repeat([]byte{m[b]}, rbs); !bytes.Equal(buf[b*rbs:(b+1)*rbs], want) {
			t.Fatalf("%s: block %d = %x..., want %x", what, b, buf[b*rbs:b*rbs+4], m[b])
		}
	}
}

// writeBlocks writes fill to blocks [s, s+n) through r and the model.
func writeBlocks(t *testing.T, r *Replica, m *rmodel, s, n int, fill byte) {
	t.Helper()
	if err := r.Write(context.Background(), bytes.Repeat([]byte{fill}, n*rbs), int64(s*rbs), false); err != nil {
		t.Fatalf("write [%d,+%d) = %x: %v", s, n, fill, err)
	}
	for b := s; b < s+n; b++ {
		m[b] = fill
	}
}

// TestReplicaWritesCommitEverywhere: writes, zeroes and trims on the
// primary (some concurrent) commit, read back through the primary, and
// after quiescence every replica's partition holds the same bytes.
func TestReplicaWritesCommitEverywhere(t *testing.T) {
	c := newRCluster(t, 3, false)
	defer c.close()
	c.promote("n1")
	p := c.rep("n1")
	ctx := context.Background()
	rng := rand.New(rand.NewSource(1))
	var m rmodel
	for i := range 60 {
		s := rng.Intn(rblocks)
		n := 1 + rng.Intn(min(4, rblocks-s))
		switch rng.Intn(6) {
		case 0:
			if err := p.WriteZeroes(ctx, int64(s*rbs), int64(n*rbs), i%10 == 0); err != nil {
				t.Fatal(err)
			}
			for b := s; b < s+n; b++ {
				m[b] = 0
			}
		case 1:
			if err := p.Trim(ctx, int64(s*rbs), int64(n*rbs)); err != nil {
				t.Fatal(err)
			}
			for b := s; b < s+n; b++ {
				m[b] = 0
			}
		default:
			writeBlocks(t, p, &m, s, n, byte(1+rng.Intn(255)))
		}
	}
	// Concurrent writers on disjoint blocks.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range 10 {
				b := w*8 + k%8
				fill := byte(16*w + k + 1)
				if err := p.Write(ctx, bytes.Repeat([]byte{fill}, rbs), int64(b*rbs), k == 9); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for w := range 4 {
		for k := 2; k < 10; k++ {
			m[w*8+k%8] = byte(16*w + k + 1)
		}
	}
	buf := make([]byte, rblocks*rbs)
	if err := p.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, "read through the primary", buf, &m)
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	c.quiesce("n1", "n2", "n3")
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		c.checkPartition(id, &m)
	}
	waitUntil(t, "extent maps persisted", func() bool {
		for _, nd := range c.nodes {
			if api.OpNum(nd.p.Load().m.Persisted()) != nd.rep.Load().Status().Applied {
				return false
			}
		}
		return true
	})
	// A secondary refuses client ops.
	if err := c.rep("n2").Write(ctx, make([]byte, rbs), 0, false); !errors.Is(err, ErrNotPrimary) {
		t.Fatalf("write on a secondary: %v, want ErrNotPrimary", err)
	}
	if err := c.rep("n3").ReadAt(ctx, buf[:rbs], 0); !errors.Is(err, ErrNotPrimary) {
		t.Fatalf("read on a secondary: %v, want ErrNotPrimary", err)
	}
	// Its own mutators refuse too: ops go through the Replica.
	if err := c.node("n2").p.Load().Write(ctx, make([]byte, rbs), 0, false); !errors.Is(err, ErrReplicated) {
		t.Fatalf("Partition.Write under a Replica: %v, want ErrReplicated", err)
	}
}

// TestReplicaCutPeerWaitsForGrant: with a secondary cut off, a write does
// not complete while the control plane has not granted dropping it (the
// peer stays in the commit quorum); after the grant it completes, and the
// peer, healed, catches up and is in sync again.
func TestReplicaCutPeerWaitsForGrant(t *testing.T) {
	c := newRCluster(t, 3, false)
	defer c.close()
	c.promote("n1")
	p := c.rep("n1")
	ctx := context.Background()
	var m rmodel
	writeBlocks(t, p, &m, 0, 2, 0x11)
	c.quiesce("n1", "n2", "n3")

	c.ctl.setHold(true)
	c.setCut("n3", true)
	done := make(chan error, 1)
	go func() {
		done <- p.Write(ctx, bytes.Repeat([]byte{0x22}, rbs), 5*rbs, false)
	}()
	waitUntil(t, "n1 asks to drop n3", func() bool { return c.ctl.askedFor(wire.CtlDropPeer, "n3") })
	// The drop is asked but not granted: n3 still counts, nothing commits.
	select {
	case err := <-done:
		t.Fatalf("write completed (%v) before the control plane dropped the cut peer", err)
	case <-time.After(100 * time.Millisecond):
	}
	if s := p.Status(); s.Commit >= s.Last || !slices.Contains(s.InSync, "n3") {
		t.Fatalf("primary committed without the cut peer or its grant: %+v", s)
	}
	c.ctl.setHold(false)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	m[5] = 0x22
	if c.ctl.isInSync("n3") {
		t.Fatal("control plane still has n3 in sync")
	}
	c.quiesce("n1", "n2")
	c.checkPartition("n2", &m)
	var old rmodel
	old[0], old[1] = 0x11, 0x11
	c.checkPartition("n3", &old) // cut off: not there

	c.setCut("n3", false)
	writeBlocks(t, p, &m, 6, 1, 0x33)
	c.quiesce("n1", "n2", "n3")
	c.checkPartition("n3", &m)
	waitUntil(t, "n3 in sync again", func() bool { return c.ctl.isInSync("n3") })
}

// TestReplicaFailover: the primary is cut off with a write pending; a
// secondary is promoted at a higher epoch, has every acknowledged write
// and serves; healed, the old primary fails its pending write with
// ErrStepDown and new ones with ErrNotPrimary, drops its uncommitted note
// (journal truncation) and converges to the new primary's state. In the
// second run the old primary also restarts while cut off: it comes back
// as a secondary with the note still a note (not in its extent map).
func TestReplicaFailover(t *testing.T) {
	for _, restart := range []bool{false, true} {
		t.Run(fmt.Sprintf("restart=%v", restart), func(t *testing.T) { testFailover(t, restart) })
	}
}

func testFailover(t *testing.T, restart bool) {
	c := newRCluster(t, 3, false)
	defer c.close()
	c.promote("n1")
	old := c.rep("n1")
	ctx := context.Background()
	var m rmodel
	for i := range 10 {
		writeBlocks(t, old, &m, i, 1, byte(0x10+i))
	}
	c.setCut("n1", true)
	pending := make(chan error, 1)
	go func() {
		pending <- old.Write(ctx, bytes.Repeat([]byte{0xee}, 4*rbs), 20*rbs, false)
	}()
	// Ops 1..11 are the noop and the ten writes; the pending write is 12.
	waitUntil(t, "n1 notes the write", func() bool { s := old.Status(); return s.Last == 12 && s.Commit == 11 })
	if restart {
		c.stop(c.node("n1"), false)
		if err := <-pending; !errors.Is(err, ErrReplicaClosed) {
			t.Fatalf("pending write on a closed replica: %v, want ErrReplicaClosed", err)
		}
		c.open(c.node("n1"))
		old = c.rep("n1")
		s := old.Status()
		if s.Role != RoleSecondary || s.Last <= s.Applied {
			t.Fatalf("restarted old primary: %+v, want a secondary with a note past applied", s)
		}
		c.checkPartition("n1", &m) // the note is not in the map
	}

	c.promote("n2", "n1")
	np := c.rep("n2")
	buf := make([]byte, rblocks*rbs)
	if err := np.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, "new primary after failover", buf, &m)
	writeBlocks(t, np, &m, 10, 2, 0x55)

	c.setCut("n1", false)
	if !restart {
		if err := <-pending; !errors.Is(err, ErrStepDown) {
			t.Fatalf("old primary's pending write: %v, want ErrStepDown", err)
		}
	}
	waitUntil(t, "n1 at epoch 2", func() bool { return old.Status().Epoch == 2 })
	if err := old.Write(ctx, make([]byte, rbs), 0, false); !errors.Is(err, ErrNotPrimary) {
		t.Fatalf("write on the old primary: %v, want ErrNotPrimary", err)
	}
	writeBlocks(t, np, &m, 12, 1, 0x66)
	c.quiesce("n2", "n1", "n3")
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		c.checkPartition(id, &m) // block 20 was never committed: zeros
	}
	if a, b := c.node("n1").p.Load().j.LastOpNum(), c.node("n2").p.Load().j.LastOpNum(); a != b {
		t.Fatalf("journals end at %d (old primary) and %d (new primary)", a, b)
	}
	waitUntil(t, "n1 in sync", func() bool { return c.ctl.isInSync("n1") })
}

// TestReplicaRestartCatchesUp: a secondary is stopped (cleanly, then once
// more losing power), writes go on without it, and once reopened from its
// disk it comes back as a secondary at its epoch and catches up.
func TestReplicaRestartCatchesUp(t *testing.T) {
	c := newRCluster(t, 3, true)
	defer c.close()
	c.promote("n1")
	p := c.rep("n1")
	var m rmodel
	for i := range 8 {
		writeBlocks(t, p, &m, i, 1, byte(0x20+i))
	}
	for _, powerLoss := range []bool{false, true} {
		c.quiesce("n1", "n2", "n3")
		n3 := c.node("n3")
		c.stop(n3, powerLoss)
		for i := range 8 {
			writeBlocks(t, p, &m, 8+i, 1, byte(0x40+i))
		}
		c.open(n3)
		if s := n3.rep.Load().Status(); s.Role != RoleSecondary || s.Epoch != 1 {
			t.Fatalf("restarted n3: %+v, want a secondary at epoch 1", s)
		}
		writeBlocks(t, p, &m, 0, 1, 0x77)
		c.quiesce("n1", "n2", "n3")
		c.checkPartition("n3", &m)
		waitUntil(t, "n3 in sync", func() bool { return c.ctl.isInSync("n3") })
	}
}

// TestReplicaFlushSurvivesPowerLoss: a Flush completes only when the
// writes before it are fsynced on every in-sync replica, so after every
// node loses power and the control plane promotes another replica, all of
// them are there.
func TestReplicaFlushSurvivesPowerLoss(t *testing.T) {
	c := newRCluster(t, 3, true)
	defer c.close()
	c.promote("n1")
	p := c.rep("n1")
	ctx := context.Background()
	var m rmodel
	for i := range 12 {
		writeBlocks(t, p, &m, i, 1, byte(0x30+i))
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	flushed := p.Status().Commit
	for _, nd := range c.nodes {
		if got := api.OpNum(nd.p.Load().j.SyncedOpNum()); got < flushed {
			t.Errorf("%s: journal synced to %d after a flush at %d", nd.id, got, flushed)
		}
	}
	for _, nd := range c.nodes {
		c.stop(nd, true)
	}
	for _, nd := range c.nodes {
		c.open(nd)
	}
	c.promote("n2")
	buf := make([]byte, rblocks*rbs)
	if err := c.rep("n2").ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, "after power loss everywhere", buf, &m)
	c.quiesce("n2", "n1", "n3")
	for _, nd := range c.nodes {
		c.checkPartition(nd.id, &m)
	}
}

// TestReplicaDropsSnapshots: a Snapshot message that does not end a staged
// transfer (snapshot.go) is dropped before the Core sees it; the replica
// goes on working (it neither fails nor claims a state it does not have).
func TestReplicaDropsSnapshots(t *testing.T) {
	c := newRCluster(t, 3, false)
	defer c.close()
	c.promote("n1")
	var m rmodel
	writeBlocks(t, c.rep("n1"), &m, 0, 1, 0x42)
	c.quiesce("n1", "n2", "n3")
	c.rep("n3").Deliver(&wire.Msg{Type: wire.TypeSnapshot, Epoch: 1, Partition: 1, From: "n1", To: "n3",
		Index: 100, PrevEpoch: 1, Commit: 100, Data: []byte("state")})
	writeBlocks(t, c.rep("n1"), &m, 1, 1, 0x43)
	c.quiesce("n1", "n2", "n3")
	if s := c.rep("n3").Status(); s.Err != nil || s.Applied >= 100 {
		t.Fatalf("n3 after a snapshot message: %+v", s)
	}
	c.checkPartition("n3", &m)
}

// replies collects the Replies the router delivers to a client endpoint.
type replies struct{ ch chan *wire.Msg }

func newReplies(c *rcluster, id api.NodeID) *replies {
	r := &replies{ch: make(chan *wire.Msg, 64)}
	c.setEnd(id, func(m *wire.Msg) { r.ch <- m })
	return r
}

// next returns the next Reply to reqID, failing after 10 s.
func (r *replies) next(t *testing.T, reqID uint64) *wire.Msg {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case m := <-r.ch:
			if m.Type == wire.TypeReply && m.ReqID == reqID {
				return m
			}
		case <-deadline:
			t.Fatalf("no reply to request %d", reqID)
		}
	}
}

func wantReject(t *testing.T, m *wire.Msg, reason RejectReason, epoch api.Epoch, hint api.NodeID) {
	t.Helper()
	if !m.Reject() || len(m.Data) != 1 || RejectReason(m.Data[0]) != reason || m.Epoch != epoch {
		t.Fatalf("reply %v data %v: want a %v reject at epoch %d", m, m.Data, reason, epoch)
	}
	if hint != "" && (len(m.Peers) != 1 || m.Peers[0] != hint) {
		t.Fatalf("reply %v: want the hint %s", m, hint)
	}
}

// TestReplicaRemoteRequests: a Replica answers a remote client's Requests:
// a secondary and a primary asked at another epoch reject with the
// primary's id and epoch; malformed requests are rejected before the Core
// (the replica keeps working); a write is answered with its opnum, a retry
// of it with the same opnum (not applied twice), and a read with the data.
func TestReplicaRemoteRequests(t *testing.T) {
	c := newRCluster(t, 3, false)
	defer c.close()
	rs := newReplies(c, "c9")
	epoch := c.promote("n1")
	waitUntil(t, "n2 knows its primary", func() bool { return c.rep("n2").Status().Primary == "n1" })
	data := bytes.Repeat([]byte{0xab}, 2*rbs)
	req := func(to api.NodeID, id uint64, e api.Epoch, kind wire.Kind, off, n int64, d []byte) *wire.Msg {
		t.Helper()
		c.send(&wire.Msg{Type: wire.TypeRequest, Kind: kind, Epoch: e, Partition: 1, ReqID: id, From: "c9", To: to,
			Off: off, Len: n, Data: d})
		return rs.next(t, id)
	}

	wantReject(t, req("n2", 1, epoch, wire.KindWrite, 0, 2*rbs, data), RejectNotPrimary, epoch, "n1")
	wantReject(t, req("n1", 2, epoch-1, wire.KindWrite, 0, 2*rbs, data), RejectNotPrimary, epoch, "n1")
	for i, bad := range []wire.Msg{
		{Kind: wire.KindWrite, Off: 0, Len: 0},
		{Kind: wire.KindWrite, Off: 0, Len: rbs, Data: data},                      // data of another length
		{Kind: wire.KindZero, Off: 0, Len: rbs, Data: data[:rbs]},                 // data on a zero
		{Kind: wire.KindRead, Off: 1 << 62, Len: 1 << 62},                         // overflows
		{Kind: wire.KindRead, Off: 0, Len: wire.MaxData + 1},                      // too large
		{Kind: wire.KindNoop, Off: 0, Len: rbs},                                   // not a client op
		{Kind: wire.CtlBless, Off: 0, Len: rbs},                                   // not an op
		{Kind: wire.KindTrim, Off: 1 << 62, Len: 1 << 62},                         // overflows (the wire's largest)
		{Kind: wire.KindWrite, Off: testPartSize - rbs, Len: 2 * rbs, Data: data}, // past the partition
		{Kind: wire.KindRead, Off: testPartSize, Len: rbs},                        // past the partition
	} {
		id := uint64(100 + i)
		wantReject(t, req("n1", id, epoch, bad.Kind, bad.Off, bad.Len, bad.Data), RejectInvalid, epoch, "n1")
	}

	w := req("n1", 3, epoch, wire.KindWrite, 4*rbs, 2*rbs, data)
	if w.Reject() || w.Kind != wire.KindWrite || w.Index == 0 || w.From != "n1" || w.Epoch != epoch {
		t.Fatalf("write reply %v", w)
	}
	again := req("n1", 3, epoch, wire.KindWrite, 4*rbs, 2*rbs, data)
	if again.Reject() || again.Index != w.Index {
		t.Fatalf("retried write: reply %v, want opnum %d", again, w.Index)
	}
	r := req("n1", 4, epoch, wire.KindRead, 3*rbs, 4*rbs, nil)
	want := append(append(make([]byte, rbs), data...), make([]byte, rbs)...)
	if r.Reject() || r.Index != w.Index+1 || !bytes.Equal(r.Data, want) {
		t.Fatalf("read reply %v (after write %d): %d bytes, equal %v", r, w.Index, len(r.Data), bytes.Equal(r.Data, want))
	}
	f := req("n1", 5, epoch, wire.KindFlush, 0, 0, nil)
	if f.Reject() || f.Index <= r.Index {
		t.Fatalf("flush reply %v", f)
	}
	c.quiesce("n1", "n2", "n3")
	var m rmodel
	m[4], m[5] = 0xab, 0xab
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		c.checkPartition(id, &m)
		if err := c.rep(id).Err(); err != nil {
			t.Fatalf("%s: %v", id, err)
		}
	}
	if s := c.rep("n1").Status(); s.Last != f.Index {
		t.Fatalf("primary's log ends at %d, want %d: the retry or a refused request was logged", s.Last, f.Index)
	}
}

// TestFileHardStore: a saved hard state loads back; none loads as zero; a
// damaged file is an error, not a zero state.
func TestFileHardStore(t *testing.T) {
	fs := vfs.NewMem()
	if err := fs.MkdirAll("d", 0o755); err != nil {
		t.Fatal(err)
	}
	hs := FileHardStore(fs, "d")
	if h, err := hs.Load(); err != nil || h != (HardState{}) {
		t.Fatalf("no file: %+v %v", h, err)
	}
	for _, want := range []HardState{{Epoch: 7, Primary: "n2"}, {Epoch: 8}} {
		if err := hs.Save(want); err != nil {
			t.Fatal(err)
		}
		if h, err := hs.Load(); err != nil || h != want {
			t.Fatalf("load: %+v %v, want %+v", h, err, want)
		}
	}
	f, err := fs.OpenReadWrite("d/HARDSTATE")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{9}, 5); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := hs.Load(); !errors.Is(err, errBadHard) {
		t.Fatalf("damaged file: %v, want errBadHard", err)
	}
}

// TestReplicaDefragIdle: the idle defragmentation runs on a replicated
// partition (its moves go straight into the map, as Background's do), reads
// through the log do not count as writes that keep it from running, and
// the data stays the same on every replica.
func TestReplicaDefragIdle(t *testing.T) {
	c := newRCluster(t, 2, false)
	defer c.close()
	c.promote("n1")
	r := c.rep("n1")
	ctx := context.Background()
	var m rmodel
	for i, b := range rand.New(rand.NewSource(2)).Perm(rblocks) {
		writeBlocks(t, r, &m, b, 1, byte(1+i))
	}
	p := c.node("n1").p.Load()
	calls := func() int { return readCalls(p.m.Lookup(nil, 0, rblocks*rbs)) }
	if n := calls(); n < defragMinPieces {
		t.Fatalf("setup: a read of the range needs %d calls", n)
	}
	w := p.lastWrite.Load()
	buf := make([]byte, rblocks*rbs)
	if err := r.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, "read", buf, &m)
	if p.lastWrite.Load() != w {
		t.Fatal("a read through the log counted as a write")
	}
	p.opts.DefragIdle = time.Nanosecond
	if _, err := r.Background(ctx, false); err != nil {
		t.Fatal(err)
	}
	if n := calls(); n != 1 {
		t.Fatalf("after defragmentation a read of the range needs %d calls, want 1", n)
	}
	c.checkPartition("n1", &m)
	writeBlocks(t, r, &m, 3, 1, 0xee)
	if p.lastWrite.Load() == w {
		t.Fatal("a write did not count")
	}
	c.quiesce("n1", "n2")
	c.checkPartition("n1", &m)
	c.checkPartition("n2", &m)
}

func TestShallow(t *testing.T) {
	app := func(commit api.OpNum, ops ...api.OpNum) *wire.Msg {
		m := &wire.Msg{Type: wire.TypeAppend, Commit: commit}
		for _, op := range ops {
			m.Entries = append(m.Entries, wire.Entry{OpNum: op, Kind: wire.KindWrite})
		}
		return m
	}
	for _, c := range []struct {
		what    string
		m       *wire.Msg
		backlog uint64
		want    bool
	}{
		{"heartbeat", app(9), 5, true},
		{"queue depth 1: the op after the commit index", app(9, 10), 5, true},
		{"an op past the next one", app(9, 11), 0, false},
		{"two ops", app(9, 10, 11), 0, false},
		{"ack with nothing else uncommitted", &wire.Msg{Type: wire.TypeAppendResp}, 1, true},
		{"request on an idle log", &wire.Msg{Type: wire.TypeRequest}, 0, true},
		{"request behind a deep pipeline", &wire.Msg{Type: wire.TypeRequest}, 2, false},
	} {
		if got := shallow(c.m, c.backlog); got != c.want {
			t.Errorf("%s: shallow = %v, want %v", c.what, got, c.want)
		}
	}
}

// At queue depth 1 a secondary notes an Append and sends its ack on the
// goroutine that delivers it (serve inline), not on its run goroutine; a
// deeper pipeline's Appends go to run (shallow). Both commit everywhere.
func TestReplicaServesQueueDepth1Inline(t *testing.T) {
	c := newRCluster(t, 2, false)
	defer c.close()
	c.promote("n1")
	c.quiesce("n1", "n2")
	var acks, inline atomic.Int64
	c.mu.Lock()
	c.mu.watch = func(m *wire.Msg, inDeliver bool) {
		if m.From == "n2" && m.Type == wire.TypeAppendResp {
			acks.Add(1)
			if inDeliver {
				inline.Add(1)
			}
		}
	}
	c.mu.Unlock()
	p := c.rep("n1")
	var m rmodel
	for i := range 50 {
		writeBlocks(t, p, &m, i%rblocks, 1, byte(i+1))
	}
	// A tick of either replica may hold its loop at the wrong moment and
	// send one write's message through run; nearly all go inline.
	if a, n := acks.Load(), inline.Load(); a < 50 || n < a*9/10 {
		t.Errorf("n2 sent %d acks, %d of them inline on the delivering goroutine; want at least 50, nearly all inline", a, n)
	}
	// Concurrent writers: deep Appends go through run, and still commit.
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range 20 {
				if err := p.Write(context.Background(), bytes.Repeat([]byte{byte(w*20 + k + 1)}, rbs), int64((w*8+k%8)*rbs), false); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	c.quiesce("n1", "n2")
}

// Package head runs the replicated data path of one stord node in a
// cluster: the Replicas of the partitions the cluster map places on the
// node (the head role) and the volume clients its NBD and iSCSI servers
// use (the export role), over one replication transport.
//
// # Model
//
//	control plane (ctl/control's HTTP API, any control node)
//	   ^  GET volumes, nodes      ^ acquire, in-sync, bless
//	   |                          |
//	 reconcile goroutine        bridge goroutine <--- Replicas' Control messages
//	   |  every Config.Poll
//	   |  opens/closes Replicas, promotes them, sets Clients' routes
//	   v
//	Replica per held partition <--Deliver-- transport.TCP (Config.Listen) --Deliver--> Client per
//	                                                                                   exported partition
//	Catalog().Open(volume) -> remote.Device over the volume's Clients
//
// # Rules
//
//   - Names. A partition is known on the wire by its key: the volume's
//     number (the N of its id "vol-N") << 16 | the partition's index (a
//     volume has at most 1<<16 partitions). Its extent map is metastore
//     keyspace PKey(N, index) and its journal Dir/journals/N-index.
//   - Holding. The node holds a Replica for every partition whose primary
//     or secondary it is in the last map it read (reserves hold nothing).
//     A partition it no longer holds in a map it read (the volume was
//     deleted, or its replica was re-placed) is closed and its data
//     deleted. A Replica that failed (disk error) is closed and reopened
//     at the next poll, as a secondary.
//   - Promotion. A Replica serves as primary only at an epoch this process
//     acquired: holding the primary role at an epoch it did not acquire
//     (the process restarted: its journal may have lost notes it numbered
//     then), or with a replica set that changed since it was promoted, it
//     asks for a new epoch (acquire with the map's epoch, ctl/cluster) and
//     is promoted at that one with the map's secondaries as its peers, in
//     sync as the map records them.
//   - Failover. A partition without a primary (its node was declared dead,
//     or released the role) is claimed by its in-sync secondaries: the
//     control plane grants the first request (ctl/cluster's grant rules),
//     and the winner is promoted at the new epoch. The old primary, if it
//     still runs, is fenced by the epoch (see replica/core.go). A replica
//     on an isolating node (late heartbeats, low health) claims only when
//     no in-sync replica is on an active node and it has the best health
//     of those isolating (dual isolation: mayClaim); alone in sync, it
//     gets a solo blessing, and the replacement the map places on a
//     healthy node rebuilds from it.
//   - Solo blessing. A primary with no in-sync peer acknowledges nothing
//     until the control plane blesses it for its epoch (the bridge asks
//     on the Core's behalf); a peer back in sync releases the blessing.
//   - Drain. A primary on a draining node releases the role when another
//     replica is in sync; an in-sync secondary then claims it. Clients
//     retry their pending ops on the new primary (stall, not error).
//   - Bridge. A Replica's Control messages (DropPeer, InSync, Bless) become
//     control plane calls, handled one at a time, each partition's in
//     request-id order (older ids are ignored, as the Core expects); the
//     answer goes back to the Replica as a Grant, FlagReject when refused,
//     or as Stale when the map holds a higher epoch. An in-sync change is
//     computed against the map read fresh for it.
//   - Clients. The export role keeps one replica.Client per partition of
//     every volume a device was opened on, shared by every connection;
//     each poll tells it the map's route (SetRoute). Devices are remote
//     Devices (replica/volume/remote): a request stalls while no replica
//     of its partition serves, it does not fail.
//   - Background. A flusher goroutine runs every held Replica's
//     Background once a second (journal data into shards past twice the
//     partition's size or after 30 s idle; reclaim), never at the same
//     time as that Replica's close.
//   - Close stops the reconcile, bridge and flusher goroutines, closes the
//     transport, then every Replica and partition, then the metastore and
//     the shard store, in that order.
package head

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica"
	"stor.dev/stor/replica/transport"
	"stor.dev/stor/replica/wire"
)

// ErrConfig refuses a bad Config.
var ErrConfig = errors.New("head: bad config")

// ControlID is the control plane's address in replication messages.
const ControlID api.NodeID = "ctl"

// Defaults of Config.
const (
	DefaultPoll           = 200 * time.Millisecond
	DefaultAttemptTimeout = 500 * time.Millisecond
	DefaultPeerTimeout    = time.Second
	heartbeatEvery        = 50 * time.Millisecond // a primary's empty appends
)

// Control is what the node needs of the control plane (ctl/client's
// Client speaks it over HTTP; see HTTPControl).
type Control interface {
	ClusterVolumes(ctx context.Context) ([]cluster.Volume, error)
	ClusterVolume(ctx context.Context, name string) (cluster.Volume, error)
	Nodes(ctx context.Context) ([]cluster.Node, error)
	Acquire(ctx context.Context, req client.GrantRequest) (cluster.Grant, error)
	Release(ctx context.Context, req client.GrantRequest) (cluster.Grant, error)
	Bless(ctx context.Context, req client.GrantRequest) (cluster.Blessing, error)
	SetInSync(ctx context.Context, req client.InSyncRequest) (cluster.Volume, error)
}

// Config configures Open.
type Config struct {
	Self    api.NodeID
	Dir     string  // the replicas' data (created)
	Listen  string  // the replication listener, host:port
	Control Control // required
	Head    bool    // hold replicas (the head role)
	FS      vfs.FS  // nil: the real disk
	Logger  *slog.Logger
	// Poll is the period of map reads; 0: DefaultPoll.
	Poll time.Duration
	// Tick is the Replicas' tick; 0: replica.DefaultTick.
	Tick time.Duration
	// AttemptTimeout of the Clients; 0: DefaultAttemptTimeout.
	AttemptTimeout time.Duration
	// PeerTimeout: a primary that has not heard from an in-sync peer for
	// this long asks to drop it from the in-sync set (and then for a solo
	// blessing); 0: DefaultPeerTimeout. Writes stall for about this long
	// when a secondary dies; too short, and a pause (GC, a slow disk)
	// takes a healthy secondary out of sync.
	PeerTimeout time.Duration
	// SegmentSize of the journals; 0: the partition default.
	SegmentSize int64
}

// Node is the data path of one node. See the package doc.
type Node struct {
	cfg    Config
	log    *slog.Logger
	tr     *transport.TCP
	meta   *metastore.DB
	store  *erasure.Local
	cancel context.CancelFunc
	wg     sync.WaitGroup
	bridge *bridge

	mu struct {
		sync.Mutex
		vols     map[string]cluster.Volume // the last map read, by name
		addrs    map[api.NodeID]string     // peer addresses
		self     cluster.Node
		reps     map[uint32]*held
		clients  map[uint32]*replica.Client
		attached map[string]int // open devices by volume
		closed   bool
		polled   bool // a map was read at least once
	}
}

// held is one Replica the node holds.
type held struct {
	bg     sync.Mutex // the flusher's Background runs, and close
	closed bool       // guarded by bg
	key    uint32
	volume string
	index  api.PartitionID
	part   *replica.Partition
	rep    *replica.Replica
	// Promotion this process asked for (0: none).
	epoch api.Epoch
	peers []api.NodeID
}

// Key returns the wire key of partition index of the volume with id.
func Key(id api.VolumeID, index api.PartitionID) (uint32, error) {
	n, err := volumeNumber(id)
	if err != nil {
		return 0, err
	}
	if index >= 1<<16 {
		return 0, fmt.Errorf("%w: partition index %d", ErrConfig, index)
	}
	return n<<16 | uint32(index), nil
}

func volumeNumber(id api.VolumeID) (uint32, error) {
	s, ok := strings.CutPrefix(string(id), "vol-")
	n, err := strconv.ParseUint(s, 10, 32)
	if !ok || err != nil || n == 0 || n >= 1<<16 {
		return 0, fmt.Errorf("%w: volume id %q: want vol-N with 0 < N < 65536", ErrConfig, id)
	}
	return uint32(n), nil
}

// Open starts the node's data path: the transport, and (head role) the
// storage of its replicas; the Replicas open at the first poll.
func Open(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.Self == "" || cfg.Control == nil || cfg.Listen == "" || (cfg.Head && cfg.Dir == "") {
		return nil, fmt.Errorf("%w: need Self, Control, Listen (and Dir for the head role)", ErrConfig)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Poll <= 0 {
		cfg.Poll = DefaultPoll
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = DefaultAttemptTimeout
	}
	if cfg.PeerTimeout <= 0 {
		cfg.PeerTimeout = DefaultPeerTimeout
	}
	if cfg.Tick <= 0 {
		cfg.Tick = replica.DefaultTick
	}
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	n := &Node{cfg: cfg, log: cfg.Logger.With("node", string(cfg.Self))}
	n.mu.vols = make(map[string]cluster.Volume)
	n.mu.addrs = make(map[api.NodeID]string)
	n.mu.reps = make(map[uint32]*held)
	n.mu.clients = make(map[uint32]*replica.Client)
	n.mu.attached = make(map[string]int)
	if cfg.Head {
		if err := cfg.FS.MkdirAll(cfg.Dir, 0o755); err != nil {
			return nil, err
		}
		meta, err := metastore.Open(filepath.Join(cfg.Dir, "meta"), metastore.Options{FS: cfg.FS, BeforeFlush: n.syncJournals, Logger: cfg.Logger})
		if err != nil {
			return nil, err
		}
		n.meta = meta
		if n.store, err = erasure.OpenLocal(cfg.FS, filepath.Join(cfg.Dir, "store")); err != nil {
			meta.Close()
			return nil, err
		}
	}
	tr, err := transport.New(transport.Config{Self: cfg.Self, Listen: cfg.Listen, Resolve: n.resolve, Deliver: n.deliver, Logger: cfg.Logger})
	if err != nil {
		n.closeStorage()
		return nil, fmt.Errorf("replication listener: %w", err)
	}
	n.tr = tr
	ctx, n.cancel = context.WithCancel(context.WithoutCancel(ctx))
	n.bridge = newBridge(n)
	n.wg.Add(2)
	go n.bridge.run(ctx, &n.wg)
	go n.run(ctx)
	if cfg.Head {
		n.wg.Add(1)
		go n.flusher(ctx)
	}
	return n, nil
}

// Addr is the replication listener's address.
func (n *Node) Addr() net.Addr { return n.tr.Addr() }

// Close stops everything (see the package doc for the order).
func (n *Node) Close() error {
	n.mu.Lock()
	if n.mu.closed {
		n.mu.Unlock()
		return nil
	}
	n.mu.closed = true
	n.mu.Unlock()
	n.cancel()
	n.wg.Wait()
	err := n.tr.Close()
	n.mu.Lock()
	reps := n.mu.reps
	n.mu.reps = map[uint32]*held{}
	n.mu.Unlock()
	for _, h := range reps {
		err = errors.Join(err, h.close())
	}
	return errors.Join(err, n.closeStorage())
}

func (n *Node) closeStorage() error {
	var err error
	if n.meta != nil {
		err = n.meta.Close()
	}
	if n.store != nil {
		err = errors.Join(err, n.store.Close())
	}
	return err
}

func (h *held) close() error {
	h.bg.Lock()
	defer h.bg.Unlock()
	h.closed = true
	err := h.rep.Close()
	return errors.Join(err, h.part.Close())
}

// flushEvery is the period of the replicas' background work.
const flushEvery = time.Second

// flusher runs every held Replica's background work (Replica.Background:
// journal data into shards past the journal budget or when idle, then
// reclaim).
func (n *Node) flusher(ctx context.Context) {
	defer n.wg.Done()
	t := time.NewTicker(flushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		reps := n.heldList()
		for _, h := range reps {
			h.bg.Lock()
			if !h.closed {
				if res, err := h.rep.Background(ctx, false); err != nil {
					n.log.Warn("replica background work", "volume", h.volume, "partition", h.index, "err", err)
				} else if res.Shards > 0 || res.SegmentsFreed > 0 {
					n.log.Debug("replica flushed", "volume", h.volume, "partition", h.index, "moved", res.Moved,
						"segments_freed", res.SegmentsFreed, "shards_deleted", res.ShardsDeleted)
				}
			}
			h.bg.Unlock()
		}
	}
}

// heldList returns the Replicas the node holds now, to work on without
// the lock.
func (n *Node) heldList() []*held {
	n.mu.Lock()
	defer n.mu.Unlock()
	reps := make([]*held, 0, len(n.mu.reps))
	for _, h := range n.mu.reps {
		reps = append(reps, h)
	}
	return reps
}

// Status returns every Replica the node holds, by volume and partition.
func (n *Node) Status() []api.ReplicaStatus {
	reps := n.heldList()
	out := make([]api.ReplicaStatus, 0, len(reps))
	for _, h := range reps {
		st := h.rep.Status()
		rs := api.ReplicaStatus{Volume: h.volume, Partition: h.index, Role: st.Role.String(), Epoch: st.Epoch, Primary: st.Primary,
			Commit: st.Commit, Applied: st.Applied, Last: st.Last, Solo: st.Blessed}
		for _, p := range st.Peers {
			rs.Peers = append(rs.Peers, api.PeerStatus{Node: p.ID, Match: p.Match, InSync: p.InSync, NeedSnapshot: p.NeedSnap})
		}
		if st.Err != nil {
			rs.Error = st.Err.Error()
		}
		out = append(out, rs)
	}
	slices.SortFunc(out, func(a, b api.ReplicaStatus) int {
		if a.Volume != b.Volume {
			return strings.Compare(a.Volume, b.Volume)
		}
		return int(a.Partition) - int(b.Partition)
	})
	return out
}

// syncJournals is the metastore's BeforeFlush hook: every journal durable
// before the extent maps that point into it.
func (n *Node) syncJournals() {
	reps := n.heldList()
	for _, h := range reps {
		if err := h.rep.SyncJournal(context.Background()); err != nil && !errors.Is(err, replica.ErrReplicaClosed) {
			n.log.Error("journal sync before a metadata flush failed", "volume", h.volume, "partition", h.index, "err", err)
		}
	}
}

func (n *Node) resolve(id api.NodeID) (string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a, ok := n.mu.addrs[id]
	return a, ok && a != ""
}

// deliver routes a message from the transport: Replies to the Clients,
// the rest to the Replicas.
func (n *Node) deliver(m *wire.Msg) {
	n.mu.Lock()
	var rep *replica.Replica
	var cl *replica.Client
	if m.Type == wire.TypeReply {
		cl = n.mu.clients[uint32(m.Partition)]
	} else if h := n.mu.reps[uint32(m.Partition)]; h != nil {
		rep = h.rep
	}
	n.mu.Unlock()
	switch {
	case cl != nil:
		cl.Deliver(m)
	case rep != nil:
		rep.Deliver(m)
	}
}

// send is the Replicas' Send: control messages to the bridge, the rest
// to the transport.
func (n *Node) send(m *wire.Msg) {
	if m.To == ControlID {
		n.bridge.submit(m)
		return
	}
	n.tr.Send(m)
}

// toReplica hands a message from the control plane to the Replica of its
// partition, if the node holds it.
func (n *Node) toReplica(m *wire.Msg) {
	n.mu.Lock()
	h := n.mu.reps[uint32(m.Partition)]
	n.mu.Unlock()
	if h != nil {
		h.rep.Deliver(m)
	}
}

// run is the reconcile goroutine.
func (n *Node) run(ctx context.Context) {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.Poll)
	defer t.Stop()
	for {
		n.reconcile(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// reconcile reads the map and makes the node's part of it true.
func (n *Node) reconcile(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, 5*n.cfg.Poll+2*time.Second)
	defer cancel()
	vols, err := n.cfg.Control.ClusterVolumes(rctx)
	if err != nil {
		n.log.Debug("reading the cluster map", "err", err)
		return
	}
	nodes, err := n.cfg.Control.Nodes(rctx)
	if err != nil {
		n.log.Debug("reading the cluster's nodes", "err", err)
		return
	}
	n.mu.Lock()
	clear(n.mu.addrs)
	for _, nd := range nodes {
		n.mu.addrs[nd.ID] = nd.Addr.Peer
		if nd.ID == n.cfg.Self {
			n.mu.self = nd
		}
	}
	clear(n.mu.vols)
	for _, v := range vols {
		n.mu.vols[v.Name] = v
	}
	n.mu.polled = true
	for _, v := range vols {
		for _, p := range v.Partitions {
			if k, err := Key(v.ID, p.Index); err == nil {
				if cl := n.mu.clients[k]; cl != nil {
					cl.SetRoute(route(&p), p.Epoch)
				}
			}
		}
	}
	self := n.mu.self
	n.mu.Unlock()
	if !n.cfg.Head {
		return
	}
	byID := make(map[api.NodeID]cluster.Node, len(nodes))
	for _, nd := range nodes {
		byID[nd.ID] = nd
	}

	// Which partitions the node holds.
	type wanted struct {
		v *cluster.Volume
		p *cluster.Partition
	}
	want := make(map[uint32]wanted)
	for i := range vols {
		v := &vols[i]
		for j := range v.Partitions {
			p := &v.Partitions[j]
			if r := p.RoleOf(n.cfg.Self); r != cluster.RolePrimary && r != cluster.RoleSecondary {
				continue
			}
			k, err := Key(v.ID, p.Index)
			if err != nil {
				n.log.Error("cannot hold a partition", "volume", v.Name, "partition", p.Index, "err", err)
				continue
			}
			want[k] = wanted{v, p}
		}
	}
	n.mu.Lock()
	var drop []*held
	for k, h := range n.mu.reps {
		_, ok := want[k]
		if st := h.rep.Status(); !ok || st.Err != nil {
			drop = append(drop, h)
			delete(n.mu.reps, k)
			if st.Err != nil {
				n.log.Error("replica failed; reopening it", "volume", h.volume, "partition", h.index, "err", st.Err)
			}
		}
	}
	n.mu.Unlock()
	for _, h := range drop {
		if err := h.close(); err != nil {
			n.log.Warn("closing a replica", "volume", h.volume, "partition", h.index, "err", err)
		}
		if _, ok := want[h.key]; ok {
			continue // failed: reopened below
		}
		if err := n.destroy(ctx, h); err != nil {
			n.log.Error("deleting a replica no longer held", "volume", h.volume, "partition", h.index, "err", err)
		} else {
			n.log.Info("replica no longer held: deleted", "volume", h.volume, "partition", h.index)
		}
	}
	keys := make([]uint32, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if ctx.Err() != nil {
			return
		}
		w := want[k]
		h, err := n.hold(ctx, k, w.v, w.p)
		if err != nil {
			n.log.Error("cannot open a replica", "volume", w.v.Name, "partition", w.p.Index, "err", err)
			continue
		}
		n.drive(rctx, h, w.v, w.p, self, byID)
	}
}

// route is the partition's replicas, primary first.
func route(p *cluster.Partition) []api.NodeID {
	var r []api.NodeID
	if p.Primary != "" {
		r = append(r, p.Primary)
	}
	return append(r, p.Secondaries...)
}

// partSize is partition p's size in bytes.
func partSize(v *cluster.Volume, p api.PartitionID) int64 {
	return min(v.PartitionSize, v.Size-int64(p)*v.PartitionSize)
}

func (n *Node) journalDir(k uint32) string {
	return filepath.Join(n.cfg.Dir, "journals", fmt.Sprintf("%d-%d", k>>16, k&0xffff))
}

// hold returns the Replica of partition k, opening it if needed.
func (n *Node) hold(ctx context.Context, k uint32, v *cluster.Volume, p *cluster.Partition) (*held, error) {
	n.mu.Lock()
	h := n.mu.reps[k]
	n.mu.Unlock()
	if h != nil {
		return h, nil
	}
	part, err := replica.OpenReplicaPartition(ctx, metastore.PKey(k>>16, k&0xffff), n.meta, n.store, replica.Options{
		FS: n.cfg.FS, Dir: n.journalDir(k), SegmentSize: n.cfg.SegmentSize, Logger: n.cfg.Logger,
		JournalBudget: 2 * max(partSize(v, p.Index), 64<<20),
	})
	if err != nil {
		return nil, err
	}
	rep, err := replica.OpenReplica(ctx, part, replica.ReplicaConfig{
		Core: replica.CoreConfig{ID: n.cfg.Self, Partition: api.PartitionID(k), Control: ControlID,
			HeartbeatTicks:   max(1, int(heartbeatEvery/n.cfg.Tick)),
			PeerTimeoutTicks: max(2, int(n.cfg.PeerTimeout/n.cfg.Tick))},
		Send: n.send, Tick: n.cfg.Tick, Size: partSize(v, p.Index),
		Logger: n.log.With("volume", v.Name, "partition", p.Index),
	})
	if err != nil {
		part.Close()
		return nil, err
	}
	h = &held{key: k, volume: v.Name, index: p.Index, part: part, rep: rep}
	n.mu.Lock()
	n.mu.reps[k] = h
	n.mu.Unlock()
	n.log.Info("replica opened", "volume", v.Name, "partition", p.Index, "role", p.RoleOf(n.cfg.Self), "epoch", p.Epoch)
	return h, nil
}

// destroy deletes a closed replica's data.
func (n *Node) destroy(ctx context.Context, h *held) error {
	part, err := replica.OpenPartition(ctx, metastore.PKey(h.key>>16, h.key&0xffff), n.meta, n.store, replica.Options{
		FS: n.cfg.FS, Dir: n.journalDir(h.key), SegmentSize: n.cfg.SegmentSize, Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		return err
	}
	err = part.Destroy(ctx)
	err = errors.Join(err, part.Close())
	if rerr := n.cfg.FS.RemoveAll(n.journalDir(h.key)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return err
}

// mayClaim reports whether self, an in-sync replica of p, should claim
// p's free primary role: always from an active node; from an isolating
// one (late heartbeats or a low health score) only when no other in-sync
// replica is on an active node and none on an isolating node has a better
// health score (ties: the lower id) — dual isolation: both replicas'
// hosts isolating, the healthier one serves rather than none.
func mayClaim(p *cluster.Partition, self cluster.Node, nodes map[api.NodeID]cluster.Node) bool {
	switch self.State {
	case cluster.StateActive:
		return true
	case cluster.StateIsolating:
	default:
		return false
	}
	for _, id := range p.InSync {
		o, ok := nodes[id]
		if id == self.ID || !ok {
			continue
		}
		switch o.State {
		case cluster.StateActive:
			return false
		case cluster.StateIsolating:
			if o.Health > self.Health || o.Health == self.Health && o.ID < self.ID {
				return false
			}
		}
	}
	return true
}

// drive makes a held Replica's role what the map says (see Promotion,
// Failover and Drain in the package doc).
func (n *Node) drive(ctx context.Context, h *held, v *cluster.Volume, p *cluster.Partition, self cluster.Node, nodes map[api.NodeID]cluster.Node) {
	st := h.rep.Status()
	draining := self.State == cluster.StateDraining
	peers := slices.DeleteFunc(slices.Clone(p.Secondaries), func(id api.NodeID) bool { return id == n.cfg.Self })
	switch {
	case p.Primary == n.cfg.Self && draining:
		if slices.ContainsFunc(p.InSync, func(id api.NodeID) bool { return id != n.cfg.Self }) {
			_, err := n.cfg.Control.Release(ctx, client.GrantRequest{Volume: v.Name, Partition: p.Index, Role: cluster.RolePrimary, Node: n.cfg.Self})
			n.log.Info("draining: released the primary role", "volume", v.Name, "partition", p.Index, "epoch", p.Epoch, "err", err)
		}
		return
	case p.Primary == n.cfg.Self:
		if h.epoch != p.Epoch || !slices.Equal(h.peers, peers) {
			g, err := n.cfg.Control.Acquire(ctx, client.GrantRequest{Volume: v.Name, Partition: p.Index, Role: cluster.RolePrimary, Node: n.cfg.Self, Epoch: p.Epoch})
			if err != nil || g.Epoch <= p.Epoch {
				n.log.Warn("cannot take a new epoch as primary", "volume", v.Name, "partition", p.Index, "epoch", p.Epoch, "grant", g.Epoch, "err", err)
				return
			}
			h.epoch, h.peers = g.Epoch, peers
			n.log.Info("primary at a new epoch", "volume", v.Name, "partition", p.Index, "epoch", g.Epoch, "peers", peers)
		}
	case p.Primary == "" && !draining && slices.Contains(p.InSync, n.cfg.Self) && mayClaim(p, self, nodes):
		g, err := n.cfg.Control.Acquire(ctx, client.GrantRequest{Volume: v.Name, Partition: p.Index, Role: cluster.RolePrimary, Node: n.cfg.Self})
		if err != nil {
			n.log.Info("claiming the primary role", "volume", v.Name, "partition", p.Index, "err", err)
			return
		}
		h.epoch, h.peers = g.Epoch, peers
		n.log.Info("took over as primary", "volume", v.Name, "partition", p.Index, "epoch", g.Epoch, "peers", peers)
	default:
		return
	}
	if st.Role == replica.RolePrimary && st.Epoch == h.epoch {
		return
	}
	m := &wire.Msg{Type: wire.TypePromote, Epoch: h.epoch, Partition: api.PartitionID(h.key), From: ControlID, To: n.cfg.Self}
	for _, id := range h.peers {
		m.Peers = append(m.Peers, id)
		b := byte(0)
		if slices.Contains(p.InSync, id) {
			b = 1
		}
		m.Data = append(m.Data, b)
	}
	h.rep.Deliver(m)
}

package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// Raft wiring.
//
// A Node is one voter (or would-be voter) of the control plane's Raft group:
// hashicorp/raft with raft-boltdb/v2 as log and stable store and file
// snapshots, whose FSM is the cluster map. Layout of NodeConfig.Dir:
//
//	Dir/raft.db      bolt: raft log and stable store (term, vote)
//	Dir/snapshots/   raft file snapshots (JSON of cluster.Map), 2 kept
//
// Rules:
//   - Only the leader proposes. Propose on a follower returns a
//     *NotLeaderError (errors.Is ErrNotLeader) naming the leader's id, raft
//     address and, when the leader is a registered node, its API address.
//   - The proposer sets Command.Now from its clock when the caller left it
//     zero: Apply on the voters never reads a clock.
//   - The leader proposes a Tick every min(TickInterval, LeaseTimeout/4),
//     LeaseTimeout being the map's (at least minTickPeriod when the lease
//     sets it), with Since = the time it became leader, so a new leader
//     gives every node the suspect timeout to reach it (ctl/cluster's
//     tick) before judging its heartbeats. The period is read again after every
//     tick, and a configure proposed on this node restarts the wait at once:
//     lowering the lease shortens the ticks without a restart. Between
//     periodic ticks the leader also ticks just after the earliest
//     deadline the map holds (cluster.Map.NextJudgment): a node is
//     declared late or dead when its timeout runs out, not up to a tick
//     period later.
//   - Hand-off: a leader whose own node holds more partition primaries
//     than another voter's active node transfers leadership to the voter
//     holding the fewest (raft's leadership transfer), at most once per
//     HandoffQuiet, only once it has led for HandoffQuiet and the
//     suspect timeout (it has judged every node: a hand-off restarts
//     the new leader's grace), and never while a node is late or a
//     partition has no primary. A node
//     that is both the leader and a primary costs, when it dies, a raft
//     election plus the new leader's suspect grace before its partitions
//     can fail over; with the two apart, the surviving leader declares
//     the primary dead as soon as its lease runs out. The hand-off moves
//     no data and changes no epoch. NoHandoff turns it off.
//   - Refresh: when a voter answers the leader's heartbeats again after
//     more than refreshAfter without, the leader hands leadership to
//     another active voter (the fewest primaries first), under the same
//     limits as the hand-off, within refreshWindow of the return. raft
//     backs off its log replication to an unreachable voter up to 10 s
//     (heartbeats, apart, resume at once), so the returned voter may hold
//     an old log for that long, and should another voter die meanwhile,
//     nothing commits; a new leader replicates to every voter afresh.
//   - Read gives the local, possibly stale, map; ConsistentRead first makes
//     sure this node is the leader and has applied everything committed
//     before the call (a raft barrier).
//   - Close stops the ticker, shuts raft down and closes the stores; every
//     goroutine the Node started has returned when Close does.

// Errors of the Raft layer.
var (
	ErrNotLeader      = errors.New("control: not the leader")
	ErrLeadershipLost = errors.New("control: leadership lost; the command may or may not have been applied")
	ErrNoLeader       = errors.New("control: no leader")
	ErrClosed         = errors.New("control: node closed")
)

// NotLeaderError answers a write sent to a follower. Leader fields are empty
// when no leader is known.
type NotLeaderError struct {
	ID   api.NodeID // the leader's node id
	Raft string     // the leader's raft address
	API  string     // the leader's API address, if it is a registered node
}

func (e *NotLeaderError) Error() string {
	if e.ID == "" {
		return "control: not the leader, and no leader is known"
	}
	return fmt.Sprintf("control: not the leader; leader is %s (api %q, raft %s)", e.ID, e.API, e.Raft)
}

// Is makes errors.Is(err, ErrNotLeader) hold, and ErrNoLeader when no
// leader is known.
func (e *NotLeaderError) Is(target error) bool {
	return target == ErrNotLeader || (target == ErrNoLeader && e.ID == "")
}

// NodeConfig configures NewNode. Zero durations take the defaults noted.
type NodeConfig struct {
	ID       api.NodeID // required; the raft server id
	Dir      string     // required; raft.db and snapshots/ live here
	RaftAddr string     // host:port to listen on (TCP transport)
	// RaftAdvertise is the address peers dial; "": RaftAddr (which must
	// then not be a wildcard such as 0.0.0.0).
	RaftAdvertise string
	Bootstrap     bool         // form a new one-voter cluster if Dir holds no raft state
	Logger        *slog.Logger // nil: slog.Default()

	// NoSync skips fsync of the raft log: for tests only (a crash may then
	// lose committed entries on this voter).
	NoSync bool

	// Transport replaces the TCP transport (tests: raft.NewInmemTransport).
	// The Node closes it on Close.
	Transport raft.Transport

	HeartbeatTimeout   time.Duration    // 500ms
	ElectionTimeout    time.Duration    // 500ms
	LeaderLeaseTimeout time.Duration    // HeartbeatTimeout (a leader that heard no quorum that long steps down)
	CommitTimeout      time.Duration    // 10ms
	SnapshotThreshold  uint64           // entries between snapshots; 1024
	ApplyTimeout       time.Duration    // bound on one Propose when ctx has no deadline; 10s
	TickInterval       time.Duration    // longest Tick period of the leader (see the rules); 1s; negative: never
	HandoffQuiet       time.Duration    // least time between leadership hand-offs (see the rules); 1s
	NoHandoff          bool             // the leader never hands leadership off
	Now                func() time.Time // the proposer's clock; nil: time.Now
}

// Node is one member of the control plane's Raft group. Its methods are safe
// for concurrent use.
type Node struct {
	cfg    NodeConfig
	log    *slog.Logger
	fsm    *fsm
	raft   *raft.Raft
	trans  raft.Transport
	store  *raftboltdb.BoltStore
	cancel context.CancelFunc
	retick chan struct{} // capacity 1: the map's config changed, recompute the tick period
	obs    chan raft.Observation
	obsv   *raft.Observer // heartbeat failures and resumptions, read by the ticker
	wg     sync.WaitGroup // the ticker
	// gate is held shared by every call that submits a raft entry (all
	// entries of this leader come through this Node) and exclusively by
	// a leadership hand-off, from before its last barrier until this node
	// stopped leading: no entry may follow the TimeoutNow (see transfer).
	gate  sync.RWMutex
	waits sync.WaitGroup // goroutines waiting on raft futures; end at raft shutdown

	closeOnce sync.Once
	closeErr  error
}

// NewNode opens (or creates) the raft state in cfg.Dir and starts the node.
// With Bootstrap and no existing state it forms a one-voter cluster and
// becomes its leader; otherwise it waits to be joined or to hear from its
// peers.
func NewNode(cfg NodeConfig) (*Node, error) {
	if cfg.ID == "" || cfg.Dir == "" {
		return nil, fmt.Errorf("control: node needs an id and a directory")
	}
	if cfg.Transport == nil && cfg.RaftAddr == "" {
		return nil, fmt.Errorf("control: node %s needs a raft address", cfg.ID)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.HeartbeatTimeout == 0 {
		cfg.HeartbeatTimeout = 500 * time.Millisecond
	}
	if cfg.ElectionTimeout == 0 {
		cfg.ElectionTimeout = 500 * time.Millisecond
	}
	if cfg.LeaderLeaseTimeout == 0 {
		// Not shorter: with one voter of three down, every gap of this
		// long to the other (a loaded 2-core machine has them) made the
		// leader step down, many times a minute.
		cfg.LeaderLeaseTimeout = cfg.HeartbeatTimeout
	}
	if cfg.CommitTimeout == 0 {
		cfg.CommitTimeout = 10 * time.Millisecond
	}
	if cfg.SnapshotThreshold == 0 {
		cfg.SnapshotThreshold = 1024
	}
	if cfg.ApplyTimeout == 0 {
		cfg.ApplyTimeout = 10 * time.Second
	}
	if cfg.TickInterval == 0 {
		cfg.TickInterval = time.Second
	}
	if cfg.HandoffQuiet <= 0 {
		cfg.HandoffQuiet = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	log := cfg.Logger.With("node", string(cfg.ID))
	rlog := &raftLogWriter{log: log}

	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.Dir, "raft.db"), NoSync: cfg.NoSync})
	if err != nil {
		return nil, fmt.Errorf("control: open raft log %s: %w", cfg.Dir, err)
	}
	snaps, err := raft.NewFileSnapshotStore(filepath.Join(cfg.Dir, "snapshots"), 2, rlog)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("control: open snapshots: %w", err)
	}
	trans := cfg.Transport
	if trans == nil {
		advertise := cfg.RaftAdvertise
		if advertise == "" {
			advertise = cfg.RaftAddr
		}
		adv, err := net.ResolveTCPAddr("tcp", advertise)
		if err != nil {
			store.Close()
			return nil, fmt.Errorf("control: raft address %q: %w", advertise, err)
		}
		var advAddr net.Addr = adv
		if adv.Port == 0 {
			advAddr = nil // the listener's address, port chosen by the kernel
		}
		t, err := raft.NewTCPTransport(cfg.RaftAddr, advAddr, 3, 5*time.Second, rlog)
		if err != nil {
			store.Close()
			return nil, fmt.Errorf("control: raft listen %s: %w", cfg.RaftAddr, err)
		}
		trans = t
	}

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = cfg.CommitTimeout
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.LogOutput = rlog
	rc.LogLevel = "INFO"

	closeAll := func() {
		trans.(interface{ Close() error }).Close()
		store.Close()
	}
	f := newFSM()
	if cfg.Bootstrap {
		existing, err := raft.HasExistingState(store, store, snaps)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("control: %w", err)
		}
		if !existing {
			boot := raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: rc.LocalID, Address: trans.LocalAddr()}}}
			if err := raft.BootstrapCluster(rc, store, store, snaps, trans, boot); err != nil {
				closeAll()
				return nil, fmt.Errorf("control: bootstrap: %w", err)
			}
		}
	}
	r, err := raft.NewRaft(rc, f, store, store, snaps, trans)
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("control: start raft: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &Node{cfg: cfg, log: log, fsm: f, raft: r, trans: trans, store: store, cancel: cancel, retick: make(chan struct{}, 1)}
	if cfg.TickInterval > 0 {
		n.obs = make(chan raft.Observation, 64)
		n.obsv = raft.NewObserver(n.obs, false, func(o *raft.Observation) bool {
			switch o.Data.(type) {
			case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation:
				return true
			}
			return false
		})
		r.RegisterObserver(n.obsv)
		n.wg.Add(1)
		go n.ticker(ctx)
	}
	return n, nil
}

// Close stops the node. It is safe to call more than once.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		n.cancel()
		n.wg.Wait()
		if n.obsv != nil {
			n.raft.DeregisterObserver(n.obsv)
		}
		err := n.raft.Shutdown().Error()
		n.waits.Wait()
		if c, ok := n.trans.(interface{ Close() error }); ok {
			if cerr := c.Close(); err == nil {
				err = cerr
			}
		}
		if cerr := n.store.Close(); err == nil {
			err = cerr
		}
		n.closeErr = err
	})
	return n.closeErr
}

// ID is the node's id.
func (n *Node) ID() api.NodeID { return n.cfg.ID }

// RaftAddr is the address peers reach this node's raft transport at.
func (n *Node) RaftAddr() string { return string(n.trans.LocalAddr()) }

// IsLeader reports whether this node is the leader now.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the leader's id and raft address, both empty if unknown.
func (n *Node) Leader() (api.NodeID, string) {
	addr, id := n.raft.LeaderWithID()
	return api.NodeID(id), string(addr)
}

// notLeader builds the error a follower answers with.
func (n *Node) notLeader() *NotLeaderError {
	id, addr := n.Leader()
	e := &NotLeaderError{ID: id, Raft: addr}
	if id != "" {
		n.fsm.read(func(m *cluster.Map) {
			if nd, ok := m.Nodes[id]; ok {
				e.API = nd.Addr.API
			}
		})
	}
	return e
}

func (n *Node) timeout(ctx context.Context) time.Duration {
	t := n.cfg.ApplyTimeout
	if d, ok := ctx.Deadline(); ok {
		if left := time.Until(d); left < t {
			t = max(left, time.Millisecond)
		}
	}
	return t
}

// wait waits for a raft future, or for ctx. The goroutine it may leave
// behind returns when raft resolves the future, at the latest on Shutdown.
func (n *Node) wait(ctx context.Context, f raft.Future) error {
	if ctx.Done() == nil {
		return f.Error()
	}
	done := make(chan error, 1)
	n.waits.Add(1)
	go func() {
		defer n.waits.Done()
		done <- f.Error()
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// raftError maps raft's errors to this package's.
func (n *Node) raftError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, raft.ErrNotLeader):
		return n.notLeader()
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return fmt.Errorf("%w (%v)", ErrLeadershipLost, err)
	case errors.Is(err, raft.ErrRaftShutdown):
		return ErrClosed
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return fmt.Errorf("control: raft busy: %w", err)
	}
	return fmt.Errorf("control: raft: %w", err)
}

// Propose replicates c through raft and returns the result of applying it.
// Only the leader proposes; a follower returns a *NotLeaderError. A zero
// c.Now is set from the node's clock. The error of a refused command wraps
// the api sentinel cluster.Map.Apply gave.
func (n *Node) Propose(ctx context.Context, c cluster.Command) (cluster.Result, error) {
	if c.Now.IsZero() {
		c.Now = n.cfg.Now().UTC()
	}
	if n.raft.State() != raft.Leader {
		return cluster.Result{}, n.notLeader()
	}
	b, err := c.Encode()
	if err != nil {
		return cluster.Result{}, fmt.Errorf("%w: encode command: %v", api.ErrInvalid, err)
	}
	n.gate.RLock()
	f := n.raft.Apply(b, n.timeout(ctx))
	n.gate.RUnlock()
	if err := n.wait(ctx, f); err != nil {
		return cluster.Result{}, n.raftError(err)
	}
	resp, ok := f.Response().(fsmResponse)
	if !ok {
		return cluster.Result{}, fmt.Errorf("%w: unexpected fsm response %T", api.ErrInternal, f.Response())
	}
	if c.Op == cluster.OpConfigure && resp.err == nil {
		select {
		case n.retick <- struct{}{}:
		default: // one is pending already
		}
	}
	return resp.res, resp.err
}

// Read runs fn on this node's copy of the map, which may lag the leader's.
// fn must not keep or change the map.
func (n *Node) Read(fn func(*cluster.Map)) { n.fsm.read(fn) }

// Barrier returns once this node is the leader and has applied every entry
// committed before the call.
func (n *Node) Barrier(ctx context.Context) error {
	if n.raft.State() != raft.Leader {
		return n.notLeader()
	}
	n.gate.RLock()
	f := n.raft.Barrier(n.timeout(ctx))
	n.gate.RUnlock()
	return n.raftError(n.wait(ctx, f))
}

// ConsistentRead is Barrier then Read: fn sees every write committed before
// the call. On a follower it returns a *NotLeaderError.
func (n *Node) ConsistentRead(ctx context.Context, fn func(*cluster.Map)) error {
	if err := n.Barrier(ctx); err != nil {
		return err
	}
	n.Read(fn)
	return nil
}

// Voter is one server of the raft configuration.
type Voter struct {
	ID       api.NodeID `json:"id"`
	Raft     string     `json:"raft"`
	Suffrage string     `json:"suffrage"` // Voter, Nonvoter, Staging
	Leader   bool       `json:"leader"`
}

// Voters lists the servers of the latest raft configuration, by id.
func (n *Node) Voters() ([]Voter, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, n.raftError(err)
	}
	lid, _ := n.Leader()
	var out []Voter
	for _, s := range f.Configuration().Servers {
		out = append(out, Voter{ID: api.NodeID(s.ID), Raft: string(s.Address), Suffrage: s.Suffrage.String(), Leader: api.NodeID(s.ID) == lid})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Join adds node id at raftAddr as a voter. Only the leader joins; a
// follower returns a *NotLeaderError. Joining a voter again at the same
// address is a no-op; the same id at another address, another id at the
// same address, or an address other than the one the node registered in
// the map are refused (api.ErrInUse / api.ErrInvalid).
func (n *Node) Join(ctx context.Context, id api.NodeID, raftAddr string) error {
	if id == "" || raftAddr == "" {
		return fmt.Errorf("%w: join needs a node id and a raft address", api.ErrInvalid)
	}
	if _, _, err := net.SplitHostPort(raftAddr); err != nil {
		return fmt.Errorf("%w: raft address %q: want host:port", api.ErrInvalid, raftAddr)
	}
	if n.raft.State() != raft.Leader {
		return n.notLeader()
	}
	voters, err := n.Voters()
	if err != nil {
		return err
	}
	for _, v := range voters {
		switch {
		case v.ID == id && v.Raft == raftAddr && v.Suffrage == raft.Voter.String():
			return nil
		case v.ID == id && v.Raft != raftAddr:
			return fmt.Errorf("%w: node %s is a voter at raft address %s, not %s (remove it first)", api.ErrInUse, id, v.Raft, raftAddr)
		case v.ID != id && v.Raft == raftAddr:
			return fmt.Errorf("%w: raft address %s belongs to voter %s", api.ErrInUse, raftAddr, v.ID)
		}
	}
	var registered string
	n.Read(func(m *cluster.Map) {
		if nd, ok := m.Nodes[id]; ok {
			registered = nd.Addr.Raft
		}
	})
	if registered != "" && registered != raftAddr {
		return fmt.Errorf("%w: node %s registered raft address %s, not %s", api.ErrInvalid, id, registered, raftAddr)
	}
	n.gate.RLock()
	f := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, n.timeout(ctx))
	n.gate.RUnlock()
	if err := n.wait(ctx, f); err != nil {
		return n.raftError(err)
	}
	n.log.Info("control: voter joined", "voter", string(id), "raft", raftAddr)
	return nil
}

// Leave removes node id from the raft configuration (leader only).
// Removing a server that is not there is a no-op.
func (n *Node) Leave(ctx context.Context, id api.NodeID) error {
	if n.raft.State() != raft.Leader {
		return n.notLeader()
	}
	voters, err := n.Voters()
	if err != nil {
		return err
	}
	found := false
	for _, v := range voters {
		found = found || v.ID == id
	}
	if !found {
		return nil
	}
	n.gate.RLock()
	f := n.raft.RemoveServer(raft.ServerID(id), 0, n.timeout(ctx))
	n.gate.RUnlock()
	if err := n.wait(ctx, f); err != nil {
		return n.raftError(err)
	}
	n.log.Info("control: voter removed", "voter", string(id))
	return nil
}

// Stats is a summary of the node's raft state.
type Stats struct {
	ID           api.NodeID `json:"id"`
	State        string     `json:"state"` // Leader, Follower, Candidate, Shutdown
	Leader       api.NodeID `json:"leader"`
	LeaderRaft   string     `json:"leader_raft,omitempty"`
	Term         uint64     `json:"term"`
	CommitIndex  uint64     `json:"commit_index"`
	AppliedIndex uint64     `json:"applied_index"`
	LastIndex    uint64     `json:"last_index"`
	LastContact  string     `json:"last_contact,omitempty"` // follower: time since the leader was heard
	Voters       []Voter    `json:"voters"`
}

// Stats reports the node's raft state.
func (n *Node) Stats() Stats {
	s := n.raft.Stats()
	u := func(k string) uint64 { v, _ := strconv.ParseUint(s[k], 10, 64); return v }
	id, addr := n.Leader()
	st := Stats{
		ID: n.cfg.ID, State: n.raft.State().String(), Leader: id, LeaderRaft: addr,
		Term: u("term"), CommitIndex: u("commit_index"), AppliedIndex: n.raft.AppliedIndex(),
		LastIndex: u("last_log_index"), LastContact: s["last_contact"],
	}
	st.Voters, _ = n.Voters()
	return st
}

// minTickPeriod is the shortest tick period a short lease gives.
const minTickPeriod = 10 * time.Millisecond

// tickPeriod is min(TickInterval, LeaseTimeout/4) by this node's map, the
// lease's share no shorter than minTickPeriod.
func (n *Node) tickPeriod() time.Duration {
	p := n.cfg.TickInterval
	n.fsm.read(func(m *cluster.Map) {
		if q := max(m.Config.LeaseTimeout/4, minTickPeriod); q < p {
			p = q
		}
	})
	return p
}

// judgmentMargin is how long after a node's deadline the leader ticks: a
// tick judges a node late or dead only strictly after it.
const judgmentMargin = time.Millisecond

// ticker proposes a Tick every tickPeriod while this node leads, and just
// after the map's next deadline when that comes sooner. The period counts
// from one tick's start to the next; a tick that took longer than a period
// is followed by the next at once. After a tick, the leader may hand
// leadership off (see the rules).
func (n *Node) ticker(ctx context.Context) {
	defer n.wg.Done()
	t := time.NewTimer(n.tickPeriod())
	defer t.Stop()
	var since, handoff, cfgChanged time.Time
	var cfg cluster.Config
	out := map[api.NodeID]time.Time{}      // voters failing heartbeats: their last contact
	returned := map[api.NodeID]time.Time{} // voters back after refreshAfter: when
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.retick:
			t.Reset(n.nextTick(time.Now(), since))
			continue
		case o := <-n.obs:
			switch d := o.Data.(type) {
			case raft.FailedHeartbeatObservation:
				if _, ok := out[api.NodeID(d.PeerID)]; !ok {
					out[api.NodeID(d.PeerID)] = d.LastContact
				}
			case raft.ResumedHeartbeatObservation:
				id := api.NodeID(d.PeerID)
				if lc, ok := out[id]; ok && time.Since(lc) > refreshAfter {
					returned[id] = time.Now()
				}
				delete(out, id)
			}
			continue
		case <-t.C:
		}
		start := time.Now()
		n.tick(ctx, &since)
		if since.IsZero() {
			clear(out)
			clear(returned)
		}
		n.fsm.read(func(m *cluster.Map) {
			if m.Config != cfg {
				cfg, cfgChanged = m.Config, time.Now()
			}
		})
		n.maybeRefresh(ctx, since, cfgChanged, &handoff, returned)
		n.maybeHandoff(ctx, since, cfgChanged, &handoff)
		t.Reset(n.nextTick(start, since))
	}
}

// Refresh limits (see the rules).
const (
	refreshAfter  = time.Second
	refreshWindow = 11 * time.Second // raft's longest replication backoff, 10.24s, and some
)

// maybeRefresh hands leadership to an active voter other than the ones in
// returned (voters back from an outage, by when; entries are dropped once
// acted on or past refreshWindow), if this node leads and mayHandoff
// (*last, set here).
func (n *Node) maybeRefresh(ctx context.Context, since, cfgChanged time.Time, last *time.Time, returned map[api.NodeID]time.Time) {
	for id, at := range returned {
		if time.Since(at) > refreshWindow {
			delete(returned, id)
		}
	}
	if len(returned) == 0 {
		return
	}
	now := n.cfg.Now()
	voters, ok := n.handoffVoters(since, cfgChanged, *last)
	if !ok {
		return
	}
	exclude := []api.NodeID{n.cfg.ID}
	for id := range returned {
		exclude = append(exclude, id)
	}
	var to Voter
	n.fsm.read(func(m *cluster.Map) {
		if !failoverUnderway(m) {
			to, _ = fewestPrimaries(m, primaryCounts(m), voters, exclude)
		}
	})
	if to.ID == "" {
		return
	}
	clear(returned)
	*last = now
	n.log.Info("control: a voter is back; handing leadership off so that every voter is replicated to afresh",
		"to", string(to.ID), "back", exclude[1:])
	n.transfer(ctx, to)
}

// nextTick is how long to wait for the next tick after one that started at
// start: the rest of the period, or until just after the map's next
// deadline if this node leads (since set) and it comes sooner. A deadline
// already past (the tick failed) waits minTickPeriod, not 0.
func (n *Node) nextTick(start, since time.Time) time.Duration {
	wait := max(0, time.Until(start.Add(n.tickPeriod())))
	if since.IsZero() {
		return wait
	}
	var next time.Time
	n.fsm.read(func(m *cluster.Map) { next = m.NextJudgment(n.cfg.ID, since) })
	if next.IsZero() {
		return wait
	}
	return min(wait, max(minTickPeriod, next.Sub(n.cfg.Now())+judgmentMargin))
}

// maybeHandoff transfers leadership to the voter handoffTarget names, if
// mayHandoff (since: when this node began to lead; *last: its last
// hand-off, set here).
func (n *Node) maybeHandoff(ctx context.Context, since, cfgChanged time.Time, last *time.Time) {
	now := n.cfg.Now()
	voters, ok := n.handoffVoters(since, cfgChanged, *last)
	if !ok {
		return
	}
	var to Voter
	var mine, theirs int
	n.fsm.read(func(m *cluster.Map) { to, mine, theirs = handoffTarget(m, n.cfg.ID, voters) })
	if to.ID == "" {
		return
	}
	*last = now
	n.log.Info("control: handing leadership off to the voter holding the fewest primaries",
		"to", string(to.ID), "primaries_here", mine, "primaries_there", theirs)
	n.transfer(ctx, to)
}

// handoffVoters returns the raft voters if this node leads (since set),
// hand-offs are on and mayHandoff allows one now; ok is false otherwise.
func (n *Node) handoffVoters(since, cfgChanged, last time.Time) (voters []Voter, ok bool) {
	if n.cfg.NoHandoff || since.IsZero() || n.raft.State() != raft.Leader || !n.mayHandoff(since, cfgChanged, last) {
		return nil, false
	}
	voters, err := n.Voters()
	return voters, err == nil
}

// configSettle is how long after a change of the cluster's config (seen
// by this leader at cfgChanged) it hands nothing off: the agents learn
// the new suspect timeout, and with it their heartbeat period, within
// relearnEvery and a heartbeat period (at most maxHeartbeatPeriod). A
// new leader judges every node after the suspect timeout; until then an
// agent may still heartbeat at the old, longer period, and a hand-off
// could have a live node declared dead.
// The cluster map judges nodes by the old timeouts for as long
// (cluster.ConfigSettle), which TestConfigSettleCoversTheAgents checks.
const configSettle = cluster.ConfigSettle

// mayHandoff reports whether a leader since since, whose last hand-off
// was at last, may hand leadership off now: it has led for HandoffQuiet
// and the map's suspect timeout, handed nothing off for HandoffQuiet, and
// the config has not changed for configSettle.
func (n *Node) mayHandoff(since, cfgChanged, last time.Time) bool {
	var suspect time.Duration
	n.fsm.read(func(m *cluster.Map) { suspect = m.Config.SuspectTimeout })
	now := n.cfg.Now()
	return now.Sub(since) >= max(n.cfg.HandoffQuiet, suspect) && now.Sub(last) >= n.cfg.HandoffQuiet &&
		now.Sub(cfgChanged) >= configSettle
}

// transfer hands leadership to voter to (raft's leadership transfer).
//
// raft (v1.6) sends the target TimeoutNow once it holds the leader's last
// entry, then takes entries again at once; one appended before the
// target's vote request arrives makes the old leader's log the longer, the
// vote is refused, and the group has no leader until a heartbeat timeout
// (one hand-off in ten on a loaded machine, with the heads' map reads and
// heartbeats as the entries). So the hand-off holds the gate: it waits for
// the entries already submitted (a barrier), transfers, and lets no new
// entry in until this node stopped leading (or ElectionTimeout passed).
func (n *Node) transfer(ctx context.Context, to Voter) {
	hctx, cancel := context.WithTimeout(ctx, n.cfg.ElectionTimeout+time.Second)
	defer cancel()
	n.gate.Lock()
	defer n.gate.Unlock()
	if err := n.wait(hctx, n.raft.Barrier(n.timeout(hctx))); err != nil {
		n.log.Warn("control: leadership hand-off: barrier", "to", string(to.ID), "err", n.raftError(err))
		return
	}
	if err := n.wait(hctx, n.raft.LeadershipTransferToServer(raft.ServerID(to.ID), raft.ServerAddress(to.Raft))); err != nil {
		n.log.Warn("control: leadership hand-off", "to", string(to.ID), "err", err)
		return
	}
	for deadline := time.Now().Add(n.cfg.ElectionTimeout); n.raft.State() == raft.Leader && time.Now().Before(deadline); {
		select {
		case <-hctx.Done():
			return
		case <-time.After(time.Millisecond):
		}
	}
}

// failoverUnderway reports whether a non-dead node is late or a partition
// has no primary: a new leader would then judge no node for its suspect
// grace, so leadership stays put.
func failoverUnderway(m *cluster.Map) bool {
	for _, v := range m.Volumes {
		for i := range v.Partitions {
			if v.Partitions[i].Primary == "" {
				return true
			}
		}
	}
	for _, nd := range m.Nodes {
		if nd.Late && nd.State != cluster.StateDead {
			return true
		}
	}
	return false
}

// primaryCounts is the number of partition primaries each node holds.
func primaryCounts(m *cluster.Map) map[api.NodeID]int {
	primaries := map[api.NodeID]int{}
	for _, v := range m.Volumes {
		for i := range v.Partitions {
			if p := v.Partitions[i].Primary; p != "" {
				primaries[p]++
			}
		}
	}
	return primaries
}

// fewestPrimaries returns the voter, not in exclude, whose active node
// holds the fewest primaries (ties: the lower id), and that count; a zero
// Voter if there is none.
func fewestPrimaries(m *cluster.Map, primaries map[api.NodeID]int, voters []Voter, exclude []api.NodeID) (to Voter, count int) {
	for _, v := range voters { // sorted by id: the lower id wins a tie
		nd, ok := m.Nodes[v.ID]
		if slices.Contains(exclude, v.ID) || v.Suffrage != raft.Voter.String() || !ok || nd.State != cluster.StateActive {
			continue
		}
		if c := primaries[v.ID]; to.ID == "" || c < count {
			to, count = v, c
		}
	}
	return to, count
}

// handoffTarget picks the voter a leader (self) should hand leadership to:
// the voter whose active node holds the fewest partition primaries (ties:
// the lower id), if that is fewer than self holds. None (a zero Voter)
// while a non-dead node is late or a partition has no primary: a failover
// is under way, and a new leader would judge no node for its suspect
// grace. It returns the two primary counts too.
func handoffTarget(m *cluster.Map, self api.NodeID, voters []Voter) (to Voter, mine, theirs int) {
	if failoverUnderway(m) {
		return Voter{}, 0, 0
	}
	primaries := primaryCounts(m)
	mine = primaries[self]
	to, theirs = fewestPrimaries(m, primaries, voters, []api.NodeID{self})
	if to.ID == "" || theirs >= mine {
		return Voter{}, mine, mine
	}
	return to, mine, theirs
}

// tick proposes one Tick if this node leads; *since is when it became
// leader, zero while it does not lead.
func (n *Node) tick(ctx context.Context, since *time.Time) {
	if n.raft.State() != raft.Leader {
		*since = time.Time{}
		return
	}
	now := n.cfg.Now().UTC()
	if since.IsZero() {
		*since = now
	}
	tctx, cancel := context.WithTimeout(ctx, n.cfg.TickInterval)
	res, err := n.Propose(tctx, cluster.Command{Op: cluster.OpTick, Now: now, Since: *since, Node: n.cfg.ID})
	cancel()
	switch {
	case err != nil:
		n.log.Debug("control: tick", "err", err)
	case len(res.Dead) > 0:
		n.log.Warn("control: nodes declared dead", "nodes", res.Dead, "work", len(res.Work))
	}
}

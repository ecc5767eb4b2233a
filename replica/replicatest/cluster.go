package replicatest

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica"
	"stor.dev/stor/replica/wire"
)

// ControlID is the control plane's address.
const ControlID api.NodeID = "ctl"

// Disk is a replica's durable storage, modelling power loss: Log[:Synced]
// survives any crash; the rest may be lost. Hard state and snapshots are
// written durably at once.
type Disk struct {
	Hard      replica.HardState
	SnapIndex api.OpNum
	SnapEpoch api.Epoch
	SnapState map[int64]uint64
	SnapSeen  map[uint64]api.OpNum
	Log       []wire.Entry
	Synced    int
}

// Node is one replica: a Core, its disk, and the state it applied.
type Node struct {
	ID      api.NodeID
	Core    *replica.Core
	Disk    Disk
	State   map[int64]uint64 // block -> value, the applied state
	Applied api.OpNum
	Up      bool
}

// Control is a mini control plane for one partition.
type Control struct {
	Epoch   api.Epoch
	Primary api.NodeID
	InSync  map[api.NodeID]bool
	Blessed api.Epoch
	lastSeq uint64
	sentAt  int
}

// Cluster is N replicas of one partition, a control plane and clients on
// one Network.
type Cluster struct {
	Net     *Network
	Nodes   []*Node
	CP      Control
	Clients []*Client
	rng     *rand.Rand
	cfg     replica.CoreConfig
	clock   int64 // event counter: history timestamps

	// PowerLoss: crashes may lose unsynced entries; the checks that assume
	// acknowledged ops survive any single crash are off.
	PowerLoss bool
	// Trace, if set, gets one line per event.
	Trace func(string)

	committed map[api.OpNum]wire.Entry // first entry committed at each opnum
	ackedBy   map[api.Epoch]api.NodeID // which node acknowledged ops in each epoch
	promoted  map[api.Epoch]api.NodeID // promotions
	errs      []string
	lossAt    []int64 // clock of each crash with power loss
}

// NewCluster returns a cluster of n replicas (n1..nN), n1 promoted at
// epoch 1 with all in sync.
func NewCluster(rng *rand.Rand, n int, f Faults, cfg replica.CoreConfig) *Cluster {
	cl := &Cluster{Net: NewNetwork(rng, f), rng: rng, cfg: cfg,
		committed: make(map[api.OpNum]wire.Entry), ackedBy: make(map[api.Epoch]api.NodeID), promoted: make(map[api.Epoch]api.NodeID)}
	cl.CP.InSync = make(map[api.NodeID]bool)
	for i := range n {
		nd := &Node{ID: api.NodeID(fmt.Sprintf("n%d", i+1)), Up: true, State: map[int64]uint64{}}
		nd.Disk.SnapState = map[int64]uint64{}
		cl.Nodes = append(cl.Nodes, nd)
		cl.start(nd)
		cl.CP.InSync[nd.ID] = true
	}
	cl.promote(cl.Nodes[0].ID)
	return cl
}

func (cl *Cluster) tracef(format string, args ...any) {
	if cl.Trace != nil {
		cl.Trace(fmt.Sprintf("%5d ", cl.Net.Now()) + fmt.Sprintf(format, args...))
	}
}

func (cl *Cluster) failf(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	cl.tracef("INVARIANT: %s", s)
	if len(cl.errs) < 10 {
		cl.errs = append(cl.errs, s)
	}
}

// Err returns the invariant violations seen so far, or nil.
func (cl *Cluster) Err() error {
	if len(cl.errs) == 0 {
		return nil
	}
	return fmt.Errorf("replicatest: %s", strings.Join(cl.errs, "; "))
}

// Node returns the node with id, or nil.
func (cl *Cluster) Node(id api.NodeID) *Node {
	for _, n := range cl.Nodes {
		if n.ID == id {
			return n
		}
	}
	return nil
}

func (cl *Cluster) start(nd *Node) {
	cfg := cl.cfg
	cfg.ID, cfg.Control = nd.ID, ControlID
	nd.Core = replica.NewCore(cfg, replica.Storage{Hard: nd.Disk.Hard, SnapIndex: nd.Disk.SnapIndex,
		SnapEpoch: nd.Disk.SnapEpoch, Entries: slices.Clone(nd.Disk.Log), Seen: nd.Disk.SnapSeen})
	nd.State = maps(nd.Disk.SnapState)
	nd.Applied = nd.Disk.SnapIndex
}

func maps(m map[int64]uint64) map[int64]uint64 {
	c := make(map[int64]uint64, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// Crash stops a node: its memory is lost and, with powerLoss, a random
// part of what it appended but did not fsync.
func (cl *Cluster) Crash(id api.NodeID, powerLoss bool) {
	nd := cl.Node(id)
	if !nd.Up {
		return
	}
	nd.Up = false
	cl.Net.SetDown(id, true)
	cl.Net.DropTo(id)
	if powerLoss {
		cl.lossAt = append(cl.lossAt, cl.clock)
		d := &nd.Disk
		keep := d.Synced + cl.rng.IntN(len(d.Log)-d.Synced+1)
		d.Log = d.Log[:keep]
		d.Synced = keep
	}
	cl.tracef("crash %s powerloss=%v (log %d..%d)", id, powerLoss, nd.Disk.SnapIndex, nd.Disk.SnapIndex+api.OpNum(len(nd.Disk.Log)))
}

// Restart starts a crashed node from its disk.
func (cl *Cluster) Restart(id api.NodeID) {
	nd := cl.Node(id)
	if nd.Up {
		return
	}
	nd.Up = true
	cl.Net.SetDown(id, false)
	d := &nd.Disk
	d.Synced = len(d.Log) // what survived is on disk
	cl.start(nd)
	cl.tracef("restart %s epoch %d log %d..%d", id, d.Hard.Epoch, d.SnapIndex, d.SnapIndex+api.OpNum(len(d.Log)))
}

// promote makes id the primary at a new epoch.
func (cl *Cluster) promote(id api.NodeID) {
	cl.CP.Epoch++
	cl.CP.Primary = id
	cl.CP.lastSeq = 0
	cl.promoted[cl.CP.Epoch] = id
	cl.tracef("promote %s epoch %d in-sync %v", id, cl.CP.Epoch, cl.inSyncList())
	cl.sendPromote()
}

func (cl *Cluster) inSyncList() []api.NodeID {
	var s []api.NodeID
	for _, n := range cl.Nodes {
		if cl.CP.InSync[n.ID] {
			s = append(s, n.ID)
		}
	}
	return s
}

func (cl *Cluster) sendPromote() {
	m := wire.Msg{Type: wire.TypePromote, Epoch: cl.CP.Epoch, Partition: cl.cfg.Partition, From: ControlID, To: cl.CP.Primary}
	for _, n := range cl.Nodes {
		if n.ID == cl.CP.Primary {
			continue
		}
		m.Peers = append(m.Peers, n.ID)
		b := byte(0)
		if cl.CP.InSync[n.ID] {
			b = 1
		}
		m.Data = append(m.Data, b)
	}
	cl.CP.sentAt = cl.Net.Now()
	cl.Net.Send(m)
}

// Failover promotes an in-sync replica other than the primary that is up
// and reaches the control plane, if any; it reports whether it did.
func (cl *Cluster) Failover() bool {
	var cands []api.NodeID
	for _, n := range cl.Nodes {
		primaryServing := n.ID == cl.CP.Primary && n.Core.Role() == replica.RolePrimary && n.Core.Epoch() == cl.CP.Epoch
		if cl.CP.InSync[n.ID] && n.Up && !cl.Net.IsCut(n.ID, ControlID) && !primaryServing {
			cands = append(cands, n.ID)
		}
	}
	if len(cands) == 0 {
		return false
	}
	cl.promote(cands[cl.rng.IntN(len(cands))])
	return true
}

// PrimaryDown reports whether the control plane would see its primary as
// failed: down, cut off from it, or restarted (no longer primary).
func (cl *Cluster) PrimaryDown() bool {
	p := cl.Node(cl.CP.Primary)
	return !p.Up || cl.Net.IsCut(p.ID, ControlID) || (p.Core.Epoch() >= cl.CP.Epoch && p.Core.Role() != replica.RolePrimary)
}

// control handles a message to the control plane.
func (cl *Cluster) control(m wire.Msg) {
	cp := &cl.CP
	if m.Type != wire.TypeControl {
		return
	}
	if m.Epoch < cp.Epoch {
		cl.Net.Send(wire.Msg{Type: wire.TypeStale, Epoch: cp.Epoch, Partition: cl.cfg.Partition, From: ControlID, To: m.From})
		return
	}
	if m.Epoch > cp.Epoch || m.From != cp.Primary {
		cl.failf("control request %v from a non-primary (cp epoch %d primary %s)", m, cp.Epoch, cp.Primary)
		return
	}
	if m.ReqID <= cp.lastSeq {
		return // older than one already handled
	}
	cp.lastSeq = m.ReqID
	g := wire.Msg{Type: wire.TypeGrant, Epoch: cp.Epoch, Partition: cl.cfg.Partition, From: ControlID, To: m.From, Kind: m.Kind, ReqID: m.ReqID, Peers: m.Peers}
	switch m.Kind {
	case wire.CtlDropPeer:
		delete(cp.InSync, m.Peers[0])
	case wire.CtlInSync:
		cp.InSync[m.Peers[0]] = true
		cp.Blessed = 0
	case wire.CtlBless:
		if len(cp.InSync) == 1 && cp.InSync[cp.Primary] {
			cp.Blessed = cp.Epoch
		} else {
			g.Flags = wire.FlagReject
		}
	}
	cl.tracef("control %s %v -> in-sync %v blessed %d", m.Kind, m.Peers, cl.inSyncList(), cp.Blessed)
	cl.Net.Send(g)
}

// drain runs a node's Ready loop the way a real driver must.
func (cl *Cluster) drain(nd *Node) {
	for i := 0; nd.Up && nd.Core.HasReady(); i++ {
		if i == 1000 {
			cl.failf("%s: Ready loops: %v", nd.ID, nd.Core)
			nd.Up = false
			return
		}
		epoch, role := nd.Core.Epoch(), nd.Core.Role()
		rd := nd.Core.Ready()
		d := &nd.Disk
		if rd.Hard != nil {
			d.Hard = *rd.Hard
		}
		if s := rd.Snapshot; s != nil {
			d.SnapIndex, d.SnapEpoch = s.Index, s.Epoch
			d.SnapState = decodeState(s.Data)
			d.SnapSeen = s.Seen
			d.Log, d.Synced = nil, 0
			nd.State = maps(d.SnapState)
			nd.Applied = s.Index
			cl.tracef("%s installs snapshot at %d", nd.ID, s.Index)
		}
		if t := rd.TruncateFrom; t != 0 {
			cl.tracef("%s truncates from %d (log %d..%d)", nd.ID, t, d.SnapIndex, d.SnapIndex+api.OpNum(len(d.Log)))
			k := int(t - d.SnapIndex - 1)
			d.Log = d.Log[:k]
			d.Synced = min(d.Synced, k)
		}
		for _, e := range rd.Entries {
			if want := d.SnapIndex + api.OpNum(len(d.Log)) + 1; e.OpNum != want {
				cl.failf("%s: appending opnum %d, journal ends before %d", nd.ID, e.OpNum, want)
				return
			}
			d.Log = append(d.Log, e)
		}
		if rd.Sync {
			d.Synced = len(d.Log)
		}
		for _, e := range rd.Committed {
			cl.apply(nd, e)
		}
		for _, c := range rd.Done {
			cl.reply(nd, epoch, role, c)
		}
		for _, m := range rd.Messages {
			if m.Type == wire.TypeSnapshot {
				if m.Index != nd.Applied {
					cl.failf("%s: snapshot at %d, state at %d", nd.ID, m.Index, nd.Applied)
				}
				m.Data = encodeState(nd.State)
			}
			if m.To == ControlID || strings.HasPrefix(string(m.To), "n") || strings.HasPrefix(string(m.To), "c") {
				cl.Net.Send(m)
			}
		}
		nd.Core.Advance(rd)
	}
}

func (cl *Cluster) apply(nd *Node, e wire.Entry) {
	if e.OpNum != nd.Applied+1 {
		cl.failf("%s: applying opnum %d after %d", nd.ID, e.OpNum, nd.Applied)
	}
	nd.Applied = e.OpNum
	if !cl.PowerLoss {
		if prev, ok := cl.committed[e.OpNum]; ok && (prev.Epoch != e.Epoch || prev.ReqID != e.ReqID || prev.Kind != e.Kind) {
			cl.failf("%s: committed op %d is e%d/%s/req %d; another replica committed e%d/%s/req %d",
				nd.ID, e.OpNum, e.Epoch, e.Kind, e.ReqID, prev.Epoch, prev.Kind, prev.ReqID)
		} else if !ok {
			cl.committed[e.OpNum] = wire.Entry{Epoch: e.Epoch, OpNum: e.OpNum, Kind: e.Kind, ReqID: e.ReqID}
		}
	}
	switch e.Kind {
	case wire.KindWrite:
		nd.State[e.Off] = binary.LittleEndian.Uint64(e.Data)
	case wire.KindZero, wire.KindTrim:
		delete(nd.State, e.Off)
	}
}

func (cl *Cluster) reply(nd *Node, epoch api.Epoch, role replica.Role, c replica.Completion) {
	m := wire.Msg{Type: wire.TypeReply, Epoch: epoch, Partition: cl.cfg.Partition, From: nd.ID, To: c.Client,
		ReqID: c.ReqID, Kind: c.Kind, Index: c.OpNum}
	if c.Err != nil {
		m.Flags = wire.FlagReject
	} else {
		if role != replica.RolePrimary {
			cl.failf("%s: a secondary completed req %d", nd.ID, c.ReqID)
		}
		if by, ok := cl.ackedBy[epoch]; ok && by != nd.ID {
			cl.failf("epoch %d: both %s and %s acknowledged ops", epoch, by, nd.ID)
		}
		cl.ackedBy[epoch] = nd.ID
		if c.Kind == wire.KindRead {
			m.Data = binary.LittleEndian.AppendUint64(nil, nd.State[c.Off])
		}
		cl.tracef("%s acks %s req %d at op %d", nd.ID, c.Kind, c.ReqID, c.OpNum)
	}
	cl.Net.Send(m)
}

func encodeState(s map[int64]uint64) []byte {
	ks := make([]int64, 0, len(s))
	for k := range s {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	var b []byte
	for _, k := range ks {
		b = binary.AppendUvarint(b, uint64(k))
		b = binary.AppendUvarint(b, s[k])
	}
	return b
}

func decodeState(b []byte) map[int64]uint64 {
	s := map[int64]uint64{}
	for len(b) > 0 {
		k, n := binary.Uvarint(b)
		b = b[n:]
		v, m := binary.Uvarint(b)
		b = b[m:]
		s[int64(k)] = v
	}
	return s
}

// DeliverOne delivers one due message; it reports whether there was one.
func (cl *Cluster) DeliverOne() bool {
	m, ok := cl.Net.Deliver()
	if !ok {
		return false
	}
	cl.clock++
	switch {
	case m.To == ControlID:
		cl.control(m)
	case strings.HasPrefix(string(m.To), "c"):
		for _, c := range cl.Clients {
			if c.ID == m.To {
				c.receive(cl, m)
			}
		}
	default:
		nd := cl.Node(m.To)
		if nd == nil || !nd.Up {
			return true
		}
		if err := nd.Core.Step(m); err != nil {
			cl.failf("%s: step %v: %v", nd.ID, m, err)
		}
		cl.drain(nd)
	}
	return true
}

// Tick advances time by one tick for everyone.
func (cl *Cluster) Tick() {
	cl.clock++
	cl.Net.Tick()
	for _, nd := range cl.Nodes {
		if nd.Up {
			nd.Core.Tick()
			cl.drain(nd)
		}
	}
	for _, c := range cl.Clients {
		c.tick(cl)
	}
	// The control plane resends a promotion until the primary serves.
	if p := cl.Node(cl.CP.Primary); p.Up && cl.Net.Now()-cl.CP.sentAt >= 5 &&
		(p.Core.Epoch() < cl.CP.Epoch || p.Core.Role() != replica.RolePrimary) {
		cl.sendPromote()
	}
}

// Compact makes a node checkpoint its state at its applied opnum and
// forget the log before it.
func (cl *Cluster) Compact(id api.NodeID) {
	nd := cl.Node(id)
	if !nd.Up {
		return
	}
	d := &nd.Disk
	n := nd.Applied
	if n <= d.SnapIndex || int(n-d.SnapIndex) > d.Synced {
		return // only a durable prefix is checkpointed
	}
	nd.Core.Compact(n)
	k := int(n - d.SnapIndex)
	d.SnapEpoch = d.Log[k-1].Epoch
	d.SnapIndex = n
	d.SnapState = maps(nd.State)
	d.SnapSeen = nd.Core.Seen()
	d.Log = slices.Clone(d.Log[k:])
	d.Synced -= k
	cl.tracef("%s compacts to %d", id, n)
}

package replicatest

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica"
	"stor.dev/stor/replica/wire"
)

// SimOptions configure one simulated run.
type SimOptions struct {
	Seed      uint64
	Nodes     int // 2 or 3
	Clients   int
	Blocks    int // distinct blocks written and read
	Ops       int // ops per client
	PowerLoss bool
	Trace     func(string)
}

// SimResult are a run's figures.
type SimResult struct {
	Ops, Acked, Failovers, Crashes, Cuts, Compactions int
	Ticks, Delivered, Dropped                         int
	MaxEpoch                                          api.Epoch
}

// Simulate runs one seeded simulation: clients issue ops while faults hit
// the network and the nodes; then everything is healed (after, with
// PowerLoss, a power loss of every node), every block is read, and the
// invariants are checked. It returns an error describing the first
// violations.
func Simulate(o SimOptions) (SimResult, error) {
	rng := rand.New(rand.NewPCG(o.Seed, o.Seed^0x5eed))
	f := Faults{Drop: rng.Float64() * 0.2, Dup: rng.Float64() * 0.1, MaxDelay: rng.IntN(4)}
	cfg := replica.CoreConfig{Partition: 3, HeartbeatTicks: 1 + rng.IntN(2), PeerTimeoutTicks: 6 + rng.IntN(10), RetryTicks: 3,
		MaxAppend: 1 + rng.IntN(8), MaxInflight: 4 + rng.IntN(64)}
	cl := NewCluster(rng, o.Nodes, f, cfg)
	cl.PowerLoss = o.PowerLoss
	cl.Trace = o.Trace
	cl.AddClients(o.Clients)
	var res SimResult
	faultRate := 0.005 + rng.Float64()*0.03
	compactRate := rng.Float64() * 0.02
	issued := 0
	var nextValue uint64
	down := map[api.NodeID]int{} // crashed node -> tick
	lastFailover := 0
	healed := false

	issue := func(c *Client, kinds []wire.Kind) {
		nextValue++
		k := kinds[rng.IntN(len(kinds))]
		c.Issue(cl, k, int64(rng.IntN(o.Blocks)), nextValue)
		issued++
	}
	step := func(faults bool) {
		r := rng.Float64()
		switch {
		case r < 0.55:
			if !cl.DeliverOne() {
				cl.Tick()
			}
		case r < 0.75:
			cl.Tick()
			// The control plane fails over a primary it sees as failed.
			if cl.PrimaryDown() && cl.Net.Now()-lastFailover > 10 && cl.Failover() {
				res.Failovers++
				lastFailover = cl.Net.Now()
			}
		case r < 0.75+compactRate:
			cl.Compact(cl.Nodes[rng.IntN(len(cl.Nodes))].ID)
			res.Compactions++
		case faults && r > 1-faultRate:
			nd := cl.Nodes[rng.IntN(len(cl.Nodes))]
			switch x := rng.IntN(10); {
			case x < 3:
				if nd.Up && len(down) < len(cl.Nodes)-1 {
					cl.Crash(nd.ID, o.PowerLoss && rng.IntN(2) == 0)
					down[nd.ID] = cl.Net.Now()
					res.Crashes++
				} else if !nd.Up {
					cl.Restart(nd.ID)
					delete(down, nd.ID)
				}
			case x < 6:
				peers := append([]api.NodeID{ControlID}, nodeIDs(cl)...)
				a, b := peers[rng.IntN(len(peers))], nd.ID
				if a != b {
					cl.Net.Cut(a, b)
					cl.tracef("cut %s %s", a, b)
					res.Cuts++
				}
			case x < 8:
				cl.Net.HealAll()
				cl.tracef("heal")
			default:
				// A planned move of the primary (drain).
				if cl.Failover() {
					res.Failovers++
					lastFailover = cl.Net.Now()
				}
			}
		}
	}

	// Phase 1: load under faults.
	for steps := 0; steps < 200000; steps++ {
		for _, c := range cl.Clients {
			if c.Idle() && issued < o.Ops*o.Clients && rng.IntN(4) == 0 {
				issue(c, []wire.Kind{wire.KindWrite, wire.KindWrite, wire.KindRead, wire.KindRead, wire.KindFlush})
			}
		}
		if issued >= o.Ops*o.Clients && allIdle(cl) {
			break
		}
		step(cl.Net.Now() < 400)
		if cl.Net.Now() >= 400 && !healed {
			healed = true
			for _, nd := range cl.Nodes {
				cl.Restart(nd.ID)
			}
			clear(down)
			cl.Net.HealAll()
		}
	}
	// Phase 2: with PowerLoss, every node loses power at once.
	if o.PowerLoss {
		for _, nd := range cl.Nodes {
			cl.Crash(nd.ID, true)
		}
		for _, nd := range cl.Nodes {
			cl.Restart(nd.ID)
		}
		for _, c := range cl.Clients {
			c.cur = nil // answers of the old incarnation are gone
		}
	}
	// Phase 3: heal, quiesce, read every block.
	cl.Net.HealAll()
	for _, nd := range cl.Nodes {
		cl.Restart(nd.ID)
	}
	cl.Net.SetFaults(Faults{})
	readStart := int64(0)
	for b := range o.Blocks {
		for steps := 0; !cl.Clients[0].Idle() && steps < 20000; steps++ {
			step(false)
		}
		if b == 0 {
			readStart = cl.clock + 1
		}
		cl.Clients[0].Issue(cl, wire.KindRead, int64(b), 0)
	}
	quiet := 0
	for steps := 0; steps < 100000 && quiet < 10; steps++ {
		if steps%64 == 63 || !cl.DeliverOne() {
			cl.Tick()
			if cl.PrimaryDown() && cl.Net.Now()-lastFailover > 10 && cl.Failover() {
				res.Failovers++
				lastFailover = cl.Net.Now()
			}
			if allIdle(cl) && cl.CheckEqual() == nil {
				quiet++
			} else {
				quiet = 0
			}
		}
	}
	res.Ticks, res.Delivered, res.Dropped = cl.Net.Now(), cl.Net.Delivered, cl.Net.Dropped
	res.MaxEpoch = cl.CP.Epoch
	cl.tracef("sent by type %v", cl.Net.ByType)
	var hist []*Op
	for _, c := range cl.Clients {
		hist = append(hist, c.History...)
	}
	res.Ops = len(hist)
	for _, op := range hist {
		if op.Return != 0 {
			res.Acked++
		}
	}
	if err := cl.Err(); err != nil {
		return res, err
	}
	if !allIdle(cl) {
		return res, fmt.Errorf("replicatest: no quiescence: clients still waiting after healing (cp epoch %d primary %s in-sync %v)\n%s",
			cl.CP.Epoch, cl.CP.Primary, cl.inSyncList(), cl.Dump())
	}
	if err := cl.CheckEqual(); err != nil {
		return res, fmt.Errorf("%w\n%s", err, cl.Dump())
	}
	if o.PowerLoss {
		return res, checkFlushed(hist, readStart, cl.lossAt)
	}
	return res, checkLinearizable(hist)
}

func nodeIDs(cl *Cluster) []api.NodeID {
	var s []api.NodeID
	for _, n := range cl.Nodes {
		s = append(s, n.ID)
	}
	return s
}

func allIdle(cl *Cluster) bool {
	for _, c := range cl.Clients {
		if !c.Idle() {
			return false
		}
	}
	return true
}

// CheckEqual checks that every replica is in sync, committed everything,
// and holds the same state.
func (cl *Cluster) CheckEqual() error {
	p := cl.Node(cl.CP.Primary)
	if p.Core.Role() != replica.RolePrimary || p.Core.Epoch() != cl.CP.Epoch {
		return fmt.Errorf("replicatest: after quiescence %s is not the primary of epoch %d", p.ID, cl.CP.Epoch)
	}
	for _, nd := range cl.Nodes {
		if !cl.CP.InSync[nd.ID] {
			return fmt.Errorf("replicatest: after quiescence %s is not in sync", nd.ID)
		}
		if nd.Core.Commit() != p.Core.LastIndex() || nd.Core.LastIndex() != p.Core.LastIndex() || nd.Applied != nd.Core.Commit() {
			return fmt.Errorf("replicatest: after quiescence %s has commit %d last %d applied %d; primary %s last %d",
				nd.ID, nd.Core.Commit(), nd.Core.LastIndex(), nd.Applied, p.ID, p.Core.LastIndex())
		}
		if a, b := encodeState(nd.State), encodeState(p.State); string(a) != string(b) {
			return fmt.Errorf("replicatest: after quiescence %s state %v differs from primary %s state %v", nd.ID, nd.State, p.ID, p.State)
		}
	}
	return nil
}

type kvInput struct {
	write bool
	block int64
	value uint64
}

// checkLinearizable checks reads and writes with porcupine: a register
// per block. An op never answered may have happened at any time after it
// was issued.
func checkLinearizable(hist []*Op) error {
	var ops []porcupine.Operation
	for _, op := range hist {
		if op.Kind != wire.KindWrite && op.Kind != wire.KindRead {
			continue
		}
		ret := op.Return
		if ret == 0 {
			if op.Kind == wire.KindRead {
				continue
			}
			ret = 1 << 62
		}
		ops = append(ops, porcupine.Operation{ClientId: op.Client, Call: op.Call, Return: ret,
			Input: kvInput{write: op.Kind == wire.KindWrite, block: op.Block, value: op.Value}, Output: op.Value})
	}
	model := porcupine.Model{
		Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
			by := map[int64][]porcupine.Operation{}
			var keys []int64
			for _, o := range h {
				b := o.Input.(kvInput).block
				if _, ok := by[b]; !ok {
					keys = append(keys, b)
				}
				by[b] = append(by[b], o)
			}
			var out [][]porcupine.Operation
			for _, k := range keys {
				out = append(out, by[k])
			}
			return out
		},
		Init: func() any { return uint64(0) },
		Step: func(state, input, output any) (bool, any) {
			in := input.(kvInput)
			if in.write {
				return true, in.value
			}
			return output.(uint64) == state.(uint64), state
		},
	}
	res, _ := porcupine.CheckOperationsVerbose(model, ops, 10*time.Second)
	if res != porcupine.Ok {
		var b strings.Builder
		for _, op := range hist {
			if op.Kind == wire.KindWrite || op.Kind == wire.KindRead {
				fmt.Fprintf(&b, "\n  block %d c%d %s %d [%d, %d] epoch %d req %d", op.Block, op.Client+1, op.Kind, op.Value, op.Call, op.Return, op.Epoch, op.ReqID)
			}
		}
		return fmt.Errorf("replicatest: history not linearizable (%s, %d ops)%s", res, len(ops), b.String())
	}
	return nil
}

// checkFlushed checks, after a power loss of every node, the final reads
// (issued from readStart on): every block reads a value no older than any
// write acknowledged before a flush that completed.
//
// A write lost to a power loss before the flush completed is not covered:
// the flush cannot know about it (a known gap: the volume client should
// fail such a flush, as Linux fails fsync after a lost writeback).
func checkFlushed(hist []*Op, readStart int64, lossAt []int64) error {
	writes := map[uint64]*Op{}
	for _, op := range hist {
		if op.Kind == wire.KindWrite {
			writes[op.Value] = op
		}
	}
	final := map[int64]*Op{}
	for _, op := range hist {
		if op.Kind == wire.KindRead && op.Call >= readStart {
			final[op.Block] = op
		}
	}
	for _, f := range hist {
		if f.Kind != wire.KindFlush || f.Return == 0 {
			continue
		}
		for _, w := range hist {
			if w.Kind != wire.KindWrite || w.Return == 0 || w.Return > f.Call {
				continue
			}
			lost := false
			for _, t := range lossAt {
				if t > w.Call && t < f.Return {
					lost = true
				}
			}
			if lost {
				continue
			}
			r := final[w.Block]
			if r == nil || r.Return == 0 {
				return fmt.Errorf("replicatest: final read of block %d missing", w.Block)
			}
			got := writes[r.Value]
			if r.Value == 0 || got == nil || got.Return != 0 && got.Return < w.Call {
				return fmt.Errorf("replicatest: block %d reads %d after power loss; write of %d (%+v) was acknowledged before a completed flush (%+v)",
					w.Block, r.Value, w.Value, *w, *f)
			}
		}
	}
	return nil
}

// Dump describes every node and client.
func (cl *Cluster) Dump() string {
	var b strings.Builder
	for _, nd := range cl.Nodes {
		fmt.Fprintf(&b, "  up=%v %v\n", nd.Up, nd.Core)
	}
	for _, c := range cl.Clients {
		if c.cur != nil {
			fmt.Fprintf(&b, "  %s waits for %+v\n", c.ID, *c.cur)
		}
	}
	return b.String()
}

package replica_test

import (
	"math/rand/v2"
	"testing"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica"
	"stor.dev/stor/replica/replicatest"
	"stor.dev/stor/replica/wire"
)

// Transcript tests: short scripted runs of the protocol on the
// deterministic network, no random faults.

func newCluster(t *testing.T, n int) *replicatest.Cluster {
	t.Helper()
	cl := replicatest.NewCluster(rand.New(rand.NewPCG(1, 2)), n, replicatest.Faults{},
		replica.CoreConfig{Partition: 1, PeerTimeoutTicks: 5, RetryTicks: 2})
	cl.AddClients(1)
	cl.Trace = func(s string) { t.Log(s) }
	return cl
}

// runUntil delivers messages and ticks until cond holds, failing after
// maxTicks ticks.
func runUntil(t *testing.T, cl *replicatest.Cluster, maxTicks int, what string, cond func() bool) {
	t.Helper()
	for range maxTicks {
		for cl.DeliverOne() {
		}
		if cond() {
			return
		}
		cl.Tick()
	}
	t.Fatalf("%s: not within %d ticks\n%s", what, maxTicks, cl.Dump())
}

func check(t *testing.T, cl *replicatest.Cluster) {
	t.Helper()
	if err := cl.Err(); err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, cl *replicatest.Cluster, block int64, v uint64) {
	t.Helper()
	c := cl.Clients[0]
	c.Issue(cl, wire.KindWrite, block, v)
	runUntil(t, cl, 200, "write acknowledged", c.Idle)
}

func read(t *testing.T, cl *replicatest.Cluster, block int64) uint64 {
	t.Helper()
	c := cl.Clients[0]
	c.Issue(cl, wire.KindRead, block, 0)
	runUntil(t, cl, 200, "read answered", c.Idle)
	return c.History[len(c.History)-1].Value
}

// TestWriteCommitsOnEveryReplica: write, deliver; the ack comes after
// both replicas have the note, and both apply it.
func TestWriteCommitsOnEveryReplica(t *testing.T) {
	cl := newCluster(t, 2)
	write(t, cl, 0, 7)
	if got := read(t, cl, 0); got != 7 {
		t.Fatalf("read %d, want 7", got)
	}
	runUntil(t, cl, 50, "replicas equal", func() bool { return cl.CheckEqual() == nil })
	for _, n := range cl.Nodes {
		if n.State[0] != 7 {
			t.Fatalf("%s: block 0 = %d", n.ID, n.State[0])
		}
	}
	check(t, cl)
}

// TestPeerLossNeedsBlessing: cut the secondary off; the primary
// acknowledges nothing until the control plane dropped the peer and
// blessed it solo; when the link heals, the peer catches up, rejoins the
// in-sync set, and the blessing is released.
func TestPeerLossNeedsBlessing(t *testing.T) {
	cl := newCluster(t, 2)
	write(t, cl, 0, 1)
	cl.Net.Cut("n1", "n2")
	c := cl.Clients[0]
	c.Issue(cl, wire.KindWrite, 1, 2)
	runUntil(t, cl, 200, "write acknowledged solo", func() bool {
		if c.Idle() && (cl.CP.InSync["n2"] || cl.CP.Blessed != cl.CP.Epoch) {
			t.Fatalf("acknowledged with in-sync %v blessed %d", cl.CP.InSync, cl.CP.Blessed)
		}
		return c.Idle()
	})
	cl.Net.Heal("n1", "n2")
	runUntil(t, cl, 200, "peer back in sync", func() bool { return cl.CheckEqual() == nil })
	if cl.CP.Blessed != 0 || cl.Node("n1").Core.Blessed() {
		t.Fatalf("blessing not released")
	}
	if got := cl.Node("n2").State[1]; got != 2 {
		t.Fatalf("n2 block 1 = %d after catch-up", got)
	}
	check(t, cl)
}

// TestFailoverFencesOldPrimary: the primary is cut off from everyone; the
// control plane promotes the secondary at a higher epoch; it serves once
// the old primary is dropped; the old primary, healed, cannot get a write
// acknowledged: it learns the new epoch and steps down, then catches up.
func TestFailoverFencesOldPrimary(t *testing.T) {
	cl := newCluster(t, 2)
	write(t, cl, 0, 1)
	for _, p := range []api.NodeID{"n2", replicatest.ControlID, "c1"} {
		cl.Net.Cut("n1", p)
	}
	if !cl.Failover() {
		t.Fatal("no failover")
	}
	write(t, cl, 0, 2)
	if cl.CP.Primary != "n2" || cl.CP.Epoch != 2 {
		t.Fatalf("primary %s epoch %d", cl.CP.Primary, cl.CP.Epoch)
	}
	// The old primary still thinks it is primary of epoch 1.
	if n1 := cl.Node("n1").Core; n1.Role() != replica.RolePrimary || n1.Epoch() != 1 {
		t.Fatalf("n1: %v", n1)
	}
	cl.Net.HealAll()
	runUntil(t, cl, 200, "old primary fenced and caught up", func() bool { return cl.CheckEqual() == nil })
	if n1 := cl.Node("n1").Core; n1.Role() != replica.RoleSecondary || n1.Epoch() != 2 {
		t.Fatalf("n1: %v", n1)
	}
	if got := read(t, cl, 0); got != 2 {
		t.Fatalf("read %d, want 2", got)
	}
	check(t, cl)
}

// TestCrashRestartCatchUp: crash the secondary, keep writing (after the
// drop and the blessing), compact the primary's log so the restarted
// secondary needs a snapshot, restart it; it rejoins with equal state.
func TestCrashRestartCatchUp(t *testing.T) {
	cl := newCluster(t, 3)
	write(t, cl, 0, 1)
	cl.Crash("n3", false)
	for i := range 5 {
		write(t, cl, int64(i%3), uint64(10+i))
	}
	cl.Compact("n1")
	cl.Crash("n2", false)
	write(t, cl, 2, 99)
	cl.Restart("n3")
	cl.Restart("n2")
	runUntil(t, cl, 300, "all back in sync", func() bool { return cl.CheckEqual() == nil })
	for _, n := range cl.Nodes {
		if n.State[2] != 99 {
			t.Fatalf("%s: block 2 = %d", n.ID, n.State[2])
		}
	}
	check(t, cl)
}

// TestPromoteAdoptsUncommittedNotes: the secondary holds a note the
// primary never committed; promoted, it adopts and commits it; the
// client's retry of that request finds it and is not applied twice.
func TestPromoteAdoptsUncommittedNotes(t *testing.T) {
	cl := newCluster(t, 2)
	write(t, cl, 0, 1)
	c := cl.Clients[0]
	c.Issue(cl, wire.KindWrite, 0, 5)
	// Deliver the request and the note to n2, then cut n2's ack.
	for i := 0; i < 2 && cl.DeliverOne(); i++ {
	}
	cl.Net.Cut("n1", "n2")
	for cl.DeliverOne() {
	}
	if c.Idle() {
		t.Fatal("acknowledged without the secondary's ack")
	}
	cl.Crash("n1", false)
	if !cl.Failover() {
		t.Fatal("no failover")
	}
	runUntil(t, cl, 300, "retry acknowledged by the new primary", c.Idle)
	if got := read(t, cl, 0); got != 5 {
		t.Fatalf("read %d, want 5", got)
	}
	writes := 0
	for _, e := range cl.Node("n2").Disk.Log {
		if e.Kind == wire.KindWrite && len(e.Data) == 8 && e.Data[0] == 5 {
			writes++
		}
	}
	if writes != 1 {
		t.Fatalf("write of 5 is in n2's log %d times", writes)
	}
	check(t, cl)
}

// TestPrimaryPowerLossKeepsFlushedWrites: the primary loses power, and
// with it two writes it had committed but not synced, which the secondary
// holds and knows committed. Promoted again, it must not send the
// secondary a snapshot of its state before its noop commits (its commit
// index is 0 after the restart): that would empty a replica the control
// plane still counts in sync, flushed write included. It drops the peer,
// commits solo, and the peer catches up from there.
func TestPrimaryPowerLossKeepsFlushedWrites(t *testing.T) {
	cl := newCluster(t, 2)
	cl.PowerLoss = true // ops 5 and 6 get committed twice, differently
	write(t, cl, 0, 1)
	c := cl.Clients[0]
	c.Issue(cl, wire.KindFlush, 0, 0)
	runUntil(t, cl, 200, "flush acknowledged", c.Idle)
	write(t, cl, 1, 2)
	write(t, cl, 1, 3)
	n1, n2 := cl.Node("n1"), cl.Node("n2")
	runUntil(t, cl, 50, "n2 knows the commit index", func() bool { return n2.Core.Commit() == n1.Core.LastIndex() })
	cl.Crash("n1", false)
	n1.Disk.Log = n1.Disk.Log[:n1.Disk.Synced] // the power loss: the unsynced tail is gone
	if len(n1.Disk.Log) >= int(n2.Core.LastIndex()) {
		t.Fatalf("n1 kept %d ops, n2 has %d: nothing lost", len(n1.Disk.Log), n2.Core.LastIndex())
	}
	cl.Restart("n1")
	cl.Net.Cut("n2", replicatest.ControlID) // so that n1 is the one promoted
	if !cl.Failover() || cl.CP.Primary != "n1" {
		t.Fatalf("no failover to n1: primary %s", cl.CP.Primary)
	}
	runUntil(t, cl, 300, "n1 serves and n2 is back in sync", func() bool {
		if cl.CP.InSync["n2"] && n2.State[0] != 1 {
			t.Fatalf("n2 counts as in sync but block 0 = %d: the flushed write is gone\n%s", n2.State[0], cl.Dump())
		}
		return cl.CheckEqual() == nil
	})
	cl.Net.HealAll()
	if got := read(t, cl, 0); got != 1 {
		t.Fatalf("block 0 reads %d, want 1", got)
	}
	check(t, cl)
}

// TestSnapshotKeepsAckedOps: a secondary that acked ops 1..3 gets a
// snapshot at 2 (a primary sends one when a reject sent earlier arrives
// late): it keeps op 3, whose ack the primary may already have counted
// toward a commit, and only moves its commit index.
func TestSnapshotKeepsAckedOps(t *testing.T) {
	c := replica.NewCore(replica.CoreConfig{ID: "b", Partition: 1, Control: "ctl"}, replica.Storage{})
	ents := []wire.Entry{{OpNum: 1, Epoch: 1, Kind: wire.KindNoop}}
	for i := range 2 {
		ents = append(ents, wire.Entry{OpNum: api.OpNum(2 + i), Epoch: 1, Kind: wire.KindWrite, ReqID: uint64(10 + i), Len: 8, Data: make([]byte, 8)})
	}
	ack := func() api.OpNum {
		t.Helper()
		rd := c.Ready()
		if rd.Snapshot != nil {
			t.Fatalf("snapshot at %d installed over acked ops", rd.Snapshot.Index)
		}
		var idx api.OpNum
		for _, m := range rd.Messages {
			if m.Type == wire.TypeAppendResp && !m.Reject() {
				idx = m.Index
			}
		}
		c.Advance(rd)
		return idx
	}
	if err := c.Step(wire.Msg{Type: wire.TypeAppend, Epoch: 1, From: "a", To: "b", Partition: 1, Entries: ents, Commit: 1}); err != nil {
		t.Fatal(err)
	}
	if got := ack(); got != 3 {
		t.Fatalf("acked %d, want 3", got)
	}
	if err := c.Step(wire.Msg{Type: wire.TypeSnapshot, Epoch: 1, From: "a", To: "b", Partition: 1, Index: 2, PrevEpoch: 1, Commit: 2}); err != nil {
		t.Fatal(err)
	}
	if got := ack(); got != 3 {
		t.Fatalf("acked %d after the snapshot, want 3", got)
	}
	if c.LastIndex() != 3 || c.Commit() != 2 {
		t.Fatalf("last %d commit %d, want 3 and 2: %v", c.LastIndex(), c.Commit(), c)
	}
}

// TestAppendBoundedInBytes: 40 pipelined 1 MiB writes leave the primary in
// Appends of at most maxAppendBytes of write data each (a larger frame
// would be refused by the wire every time), and every entry is sent.
func TestAppendBoundedInBytes(t *testing.T) {
	c := replica.NewCore(replica.CoreConfig{ID: "a", Partition: 1, Control: "ctl"}, replica.Storage{})
	c.Step(wire.Msg{Type: wire.TypePromote, Epoch: 1, To: "a", From: "ctl", Partition: 1, Peers: []api.NodeID{"a", "b"}, Data: []byte{1, 1}})
	for i := range 40 {
		c.Step(wire.Msg{Type: wire.TypeRequest, Kind: wire.KindWrite, Epoch: 1, To: "a", From: "client", Partition: 1,
			ReqID: uint64(100 + i), Off: int64(i) << 20, Len: 1 << 20})
	}
	sent := map[api.OpNum]bool{}
	for range 10 {
		if !c.HasReady() {
			break
		}
		rd := c.Ready()
		for _, m := range rd.Messages {
			if m.Type != wire.TypeAppend || m.To != "b" {
				continue
			}
			var bytes int64
			for _, e := range m.Entries {
				sent[e.OpNum] = true
				if e.Kind == wire.KindWrite {
					bytes += e.Len
				}
			}
			if bytes > 16<<20 {
				t.Fatalf("an Append carries %d bytes of writes", bytes)
			}
		}
		c.Advance(rd)
	}
	if len(sent) != 41 { // the noop and 40 writes
		t.Fatalf("%d entries sent to the peer, want 41", len(sent))
	}
}

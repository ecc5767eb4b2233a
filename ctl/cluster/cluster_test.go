package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math/rand"
	"slices"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

const mib = 1 << 20

func spec(i int, domain string) *NodeSpec {
	return &NodeSpec{
		Addr: Addresses{
			API:  fmt.Sprintf("127.0.0.%d:7480", 10+i),
			Peer: fmt.Sprintf("127.0.0.%d:7481", 10+i),
			Raft: fmt.Sprintf("127.0.0.%d:7482", 10+i),
		},
		FailureDomain: domain,
	}
}

func nid(i int) api.NodeID { return api.NodeID(fmt.Sprintf("n%d", i)) }

// newMap returns a map with nodes n1..nN; domains[i-1] is node i's domain
// (missing: none).
func newMap(t testing.TB, n int, domains ...string) *Map {
	t.Helper()
	m := New()
	for i := 1; i <= n; i++ {
		d := ""
		if i-1 < len(domains) {
			d = domains[i-1]
		}
		mustApply(t, m, Command{Op: OpRegister, Now: t0, Node: nid(i), Spec: spec(i, d)})
	}
	return m
}

func mustApply(t testing.TB, m *Map, c Command) Result {
	t.Helper()
	r, err := m.Apply(c)
	if err != nil {
		t.Fatalf("apply %+v: %v", c, err)
	}
	return r
}

func encode(t testing.TB, m *Map) []byte {
	t.Helper()
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// applyFail applies c, wants an error matching want, and checks that the
// map did not change.
func applyFail(t testing.TB, m *Map, c Command, want error) error {
	t.Helper()
	before := encode(t, m)
	_, err := m.Apply(c)
	if err == nil {
		t.Fatalf("apply %s: no error, want %v", c.Op, want)
	}
	if !errors.Is(err, want) {
		t.Fatalf("apply %s: error %v, want %v", c.Op, err, want)
	}
	if after := encode(t, m); !bytes.Equal(before, after) {
		t.Fatalf("apply %s failed (%v) but changed the map:\n%s\n%s", c.Op, err, before, after)
	}
	return err
}

func roundTrip(t testing.TB, m *Map) {
	t.Helper()
	b := encode(t, m)
	r, err := Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	if b2 := encode(t, r); !bytes.Equal(b, b2) {
		t.Fatalf("snapshot round trip differs:\n%s\n%s", b, b2)
	}
}

func vol(name string, size int64, replicas int) Command {
	return Command{Op: OpCreateVolume, Now: t0, Create: &VolumeSpec{Name: name, Size: size, PartitionSize: mib, Replicas: replicas}}
}

// TestEveryCommand applies each command once successfully and in its
// failing forms, checking that failures leave the map alone and that every
// state survives a snapshot round trip.
func TestEveryCommand(t *testing.T) {
	m := newMap(t, 4, "a", "b", "c", "c")
	cfg := DefaultConfig()
	cfg.LeaseTimeout = 10 * time.Second
	cfg.SuspectTimeout = 3 * time.Second
	later := func(d time.Duration) time.Time { return t0.Add(d) }
	steps := []struct {
		c    Command
		want error // nil: must succeed
	}{
		{Command{Op: "bogus"}, api.ErrInvalid},
		{Command{Op: OpConfigure, Config: &cfg}, nil},
		{Command{Op: OpConfigure, Config: &Config{LeaseTimeout: time.Second, SuspectTimeout: 2 * time.Second, DefaultPartitionSize: mib, DefaultReplicas: 1}}, api.ErrInvalid},
		{Command{Op: OpConfigure}, api.ErrInvalid},
		{Command{Op: OpRegister, Now: t0, Node: "n5", Spec: spec(5, "d")}, nil},
		{Command{Op: OpRegister, Node: "n6", Spec: spec(6, "d")}, api.ErrInvalid}, // no time
		{Command{Op: OpRegister, Now: t0, Node: "n5", Spec: spec(5, "d")}, api.ErrExists},
		{Command{Op: OpRegister, Now: t0, Node: "n5", Spec: spec(6, "d")}, api.ErrInUse},
		{Command{Op: OpRegister, Now: t0, Node: "n7", Spec: spec(5, "d")}, api.ErrInUse},
		{Command{Op: OpRegister, Now: t0, Node: "bad id!", Spec: spec(8, "")}, api.ErrInvalid},
		{Command{Op: OpRegister, Now: t0, Node: "n8", Spec: &NodeSpec{Addr: Addresses{API: "nohost"}}}, api.ErrInvalid},
		{Command{Op: OpRegister, Now: t0, Node: "n8", Spec: &NodeSpec{Addr: Addresses{API: "h:1"}, Roles: []string{"cook"}}}, api.ErrInvalid},
		{Command{Op: OpRegister, Now: t0, Node: "n8"}, api.ErrInvalid},
		{Command{Op: OpHeartbeat, Now: later(time.Second), Node: "n1", Health: 90}, nil},
		{Command{Op: OpHeartbeat, Now: later(time.Second), Node: "nope", Health: 90}, api.ErrNotFound},
		{Command{Op: OpHeartbeat, Now: later(time.Second), Node: "n1", Health: 101}, api.ErrInvalid},
		{Command{Op: OpSetSled, Node: "n1", Devices: []Device{{Path: "/d1", Capacity: 100 * mib}, {Path: "/d0", Capacity: 100 * mib}}}, nil},
		{Command{Op: OpSetSled, Node: "n1", Devices: []Device{{Path: "/d1"}, {Path: "/d1"}}}, api.ErrInvalid},
		{Command{Op: OpSetSled, Node: "n1", Devices: []Device{{Path: "/d1", Capacity: 1, Used: 2}}}, api.ErrInvalid},
		{Command{Op: OpSetSled, Node: "zz"}, api.ErrNotFound},
		{vol("v1", 3*mib, 3), nil},
		{vol("v1", 3*mib, 3), api.ErrExists},
		{vol("Bad Name", 3*mib, 3), api.ErrInvalid},
		{vol("v2", 3*mib+1, 3), api.ErrInvalid},
		{vol("v2", 3*mib, 6), api.ErrNoSpace},
		{vol("v2", 3*mib, 9), api.ErrInvalid},
		{Command{Op: OpCreateVolume, Create: &VolumeSpec{Name: "v2", Size: 1 << 40, PartitionSize: mib}}, api.ErrInvalid}, // too many partitions
		{Command{Op: OpCreateVolume, Create: &VolumeSpec{Name: "v2", Size: mib, BlockSize: 1000}}, api.ErrInvalid},
		{Command{Op: OpCreateVolume}, api.ErrInvalid},
		{Command{Op: OpResizeVolume, Volume: "v1", Size: 5 * mib}, nil},
		{Command{Op: OpResizeVolume, Volume: "v1", Size: mib}, api.ErrInvalid},
		{Command{Op: OpResizeVolume, Volume: "zz", Size: mib}, api.ErrNotFound},
		{Command{Op: OpCreateSnapshot, Now: t0, Volume: "v1", Snapshot: "s1"}, nil},
		{Command{Op: OpCreateSnapshot, Now: t0, Volume: "v1", Snapshot: "s1"}, api.ErrExists},
		{Command{Op: OpCreateSnapshot, Now: t0, Volume: "zz", Snapshot: "s2"}, api.ErrNotFound},
		{Command{Op: OpDeleteVolume, Volume: "v1"}, api.ErrInUse}, // has a snapshot
		{Command{Op: OpDeleteSnapshot, Snapshot: "s1"}, nil},
		{Command{Op: OpDeleteSnapshot, Snapshot: "s1"}, api.ErrNotFound},
		{Command{Op: OpAcquire, Volume: "v1", Partition: 0, Role: "boss", Node: "n1"}, api.ErrInvalid},
		{Command{Op: OpAcquire, Volume: "v1", Partition: 9, Role: RolePrimary, Node: "n1"}, api.ErrNotFound},
		{Command{Op: OpAcquire, Volume: "v1", Partition: 0, Role: RolePrimary, Node: "zz"}, api.ErrNotFound},
		{Command{Op: OpRelease, Volume: "v1", Partition: 0, Role: RoleReserve, Node: "n1"}, api.ErrNotFound},
		{Command{Op: OpSetInSync, Volume: "v1", Partition: 0, Node: "zz", Epoch: 1}, api.ErrInvalid},
		{Command{Op: OpBless, Volume: "v1", Partition: 0, Node: "zz", Epoch: 1}, api.ErrInvalid},
		{Command{Op: OpUnbless, Volume: "v1", Partition: 0, Node: "n1"}, api.ErrNotFound},
		{Command{Op: OpFinishWork, Work: 999}, api.ErrNotFound},
		{Command{Op: OpDrain, Node: "n4"}, nil},
		{Command{Op: OpDrain, Node: "zz"}, api.ErrNotFound},
		{Command{Op: OpUndrain, Node: "n4"}, nil},
		{Command{Op: OpTick, Now: later(5 * time.Second)}, nil},
		{Command{Op: OpTick}, api.ErrInvalid},
		{Command{Op: OpRemoveNode, Node: "n1"}, api.ErrInUse},
		{Command{Op: OpRemoveNode, Node: "zz"}, api.ErrNotFound},
		{Command{Op: OpRegister, Now: t0, Node: "n9", Spec: spec(9, "")}, nil},
		{Command{Op: OpRemoveNode, Node: "n9"}, nil},
		{Command{Op: OpDeleteVolume, Volume: "v1"}, nil},
		{Command{Op: OpDeleteVolume, Volume: "v1"}, api.ErrNotFound},
	}
	for i, s := range steps {
		if s.want == nil {
			if _, err := m.Apply(s.c); err != nil {
				t.Fatalf("step %d %s: %v", i, s.c.Op, err)
			}
		} else {
			applyFail(t, m, s.c, s.want)
		}
		roundTrip(t, m)
	}
}

func TestCommandEncoding(t *testing.T) {
	c := Command{Op: OpAcquire, Now: t0, Volume: "v", Partition: 3, Role: RolePrimary, Node: "n1", Epoch: 7, Nodes: []api.NodeID{"n1"}}
	b, err := c.Encode()
	if err != nil {
		t.Fatal(err)
	}
	d, err := DecodeCommand(b)
	if err != nil {
		t.Fatal(err)
	}
	b2, _ := d.Encode()
	if !bytes.Equal(b, b2) || !d.Now.Equal(t0) {
		t.Fatalf("round trip: %s vs %s", b, b2)
	}
	if _, err := DecodeCommand([]byte("{")); !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("bad json: %v", err)
	}
}

func TestMembershipLease(t *testing.T) {
	m := newMap(t, 4)
	mustApply(t, m, vol("v", 2*mib, 2))
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	// Everyone but n1 heartbeats at 5s.
	for i := 2; i <= 4; i++ {
		mustApply(t, m, Command{Op: OpHeartbeat, Now: at(5 * time.Second), Node: nid(i), Health: 90})
	}
	r := mustApply(t, m, Command{Op: OpTick, Now: at(6 * time.Second)})
	if n, _ := m.Node("n1"); n.State != StateIsolating || len(r.Dead) != 0 {
		t.Fatalf("n1 after 6s: %s, dead %v; want isolating", n.State, r.Dead)
	}
	if n, _ := m.Node("n2"); n.State != StateActive {
		t.Fatalf("n2: %s", n.State)
	}
	// A new leader since 9s gives every node the suspect timeout (4s) to
	// reach it before judging heartbeats: n1 (last heard at 0) is not dead
	// at 11s, though past its lease.
	r = mustApply(t, m, Command{Op: OpTick, Now: at(11 * time.Second), Since: at(9 * time.Second)})
	if len(r.Dead) != 0 {
		t.Fatalf("dead %v within the new leader's grace", r.Dead)
	}
	// Nor late: the suspect clock starts with the leader too.
	if n, _ := m.Node("n2"); n.State != StateActive {
		t.Fatalf("n2 (heard at 5s) under a leader since 9s, at 11s: %s; want active", n.State)
	}
	held := m.Grants("n1")
	if len(held) == 0 {
		t.Fatal("n1 holds nothing; placement should have used every node")
	}
	for i := 2; i <= 4; i++ {
		mustApply(t, m, Command{Op: OpHeartbeat, Now: at(11 * time.Second), Node: nid(i), Health: 90})
	}
	r = mustApply(t, m, Command{Op: OpTick, Now: at(12 * time.Second)})
	if !slices.Equal(r.Dead, []api.NodeID{"n1"}) {
		t.Fatalf("dead %v, want [n1]", r.Dead)
	}
	if g := m.Grants("n1"); len(g) != 0 {
		t.Fatalf("dead n1 still holds %v", g)
	}
	if len(r.Work) == 0 {
		t.Fatal("no re-placement work recorded")
	}
	for _, v := range m.VolumeList() {
		for _, p := range v.Partitions {
			if len(p.Members()) != 2 && p.Primary != "" {
				t.Fatalf("partition %d not re-placed: %+v", p.Index, p)
			}
			if slices.Contains(p.Members(), "n1") {
				t.Fatalf("partition %d still on n1", p.Index)
			}
		}
	}
	for _, w := range r.Work {
		if w.Kind == WorkReplace && (w.Target == "" || w.Target == "n1") {
			t.Fatalf("bad replace work %+v", w)
		}
	}
	// An elected primary: in-sync secondary takes over, epoch rises.
	for _, w := range r.Work {
		if w.Kind != WorkElect {
			continue
		}
		v, _ := m.Volume(w.Volume)
		p := v.Partitions[w.Partition]
		g := mustApply(t, m, Command{Op: OpAcquire, Volume: w.Volume, Partition: w.Partition, Role: RolePrimary, Node: p.InSync[0]})
		if g.Grant.Epoch != p.Epoch+1 {
			t.Fatalf("epoch %d after %d", g.Grant.Epoch, p.Epoch)
		}
	}
	// Heartbeat revives n1 (with no roles).
	r = mustApply(t, m, Command{Op: OpHeartbeat, Now: at(13 * time.Second), Node: "n1", Health: 80})
	if r.Node.State != StateActive {
		t.Fatalf("revived n1: %s", r.Node.State)
	}
	// Low health isolates; drain overrides; undrain returns.
	r = mustApply(t, m, Command{Op: OpHeartbeat, Now: at(14 * time.Second), Node: "n1", Health: 5})
	if r.Node.State != StateIsolating {
		t.Fatalf("unhealthy n1: %s", r.Node.State)
	}
	r = mustApply(t, m, Command{Op: OpDrain, Node: "n1"})
	if r.Node.State != StateDraining {
		t.Fatalf("drained n1: %s", r.Node.State)
	}
	mustApply(t, m, Command{Op: OpHeartbeat, Now: at(15 * time.Second), Node: "n1", Health: 90})
	r = mustApply(t, m, Command{Op: OpUndrain, Node: "n1"})
	if r.Node.State != StateActive {
		t.Fatalf("undrained n1: %s", r.Node.State)
	}
	roundTrip(t, m)
}

// TestInSyncReplicasDieTogether: the primary and its only in-sync
// secondary die in one tick. Neither is evicted (they alone may hold every
// acknowledged write): the partition keeps its primary and in-sync set and
// waits, and no other node may take it. When the secondary comes back, the
// next tick frees the dead primary's role for it.
func TestInSyncReplicasDieTogether(t *testing.T) {
	m := newMap(t, 3)
	mustApply(t, m, vol("v", mib, 2))
	v, _ := m.Volume("v")
	p := v.Partitions[0]
	pri, sec := p.Primary, p.Secondaries[0]
	var third api.NodeID
	for i := 1; i <= 3; i++ {
		if id := nid(i); id != pri && id != sec {
			third = id
		}
	}
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(20 * time.Second), Node: third, Health: 100})
	r := mustApply(t, m, Command{Op: OpTick, Now: t0.Add(20 * time.Second)})
	if len(r.Dead) != 2 {
		t.Fatalf("tick: dead %v, want the primary and the secondary", r.Dead)
	}
	v, _ = m.Volume("v")
	q := v.Partitions[0]
	if q.Primary != pri || !slices.Equal(q.Secondaries, []api.NodeID{sec}) || len(q.InSync) != 2 {
		t.Fatalf("partition after both died: %+v", q)
	}
	if len(r.Work) != 1 || r.Work[0].Kind != WorkStuck {
		t.Fatalf("work: %+v", r.Work)
	}
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: third}, api.ErrInUse)
	r = mustApply(t, m, Command{Op: OpTick, Now: t0.Add(21 * time.Second)})
	if len(r.Work) != 0 {
		t.Fatalf("a second tick recorded more work: %+v", r.Work)
	}
	// The secondary comes back: the next tick frees the role for it.
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(22 * time.Second), Node: sec, Health: 100})
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(22 * time.Second), Node: third, Health: 100})
	mustApply(t, m, Command{Op: OpTick, Now: t0.Add(22 * time.Second)})
	v, _ = m.Volume("v")
	if q := v.Partitions[0]; q.Primary != "" || !slices.Equal(q.InSync, []api.NodeID{sec}) {
		t.Fatalf("after the secondary's return: %+v", q)
	}
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: third}, ErrNotInSync)
	g := mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: sec})
	if g.Grant.Epoch != p.Epoch+1 {
		t.Fatalf("grant %+v", g.Grant)
	}
	roundTrip(t, m)
}

// TestLateSecondaryKeepsPlacement: the primary dies while its only
// in-sync secondary is late (its heartbeats stopped too, a tick later): the
// partition is not torn down around the late secondary; when it turns
// out alive, the next tick frees the role for it.
func TestLateSecondaryKeepsPlacement(t *testing.T) {
	m := newMap(t, 3)
	mustApply(t, m, vol("v", mib, 2))
	v, _ := m.Volume("v")
	p := v.Partitions[0]
	pri, sec := p.Primary, p.Secondaries[0]
	var third api.NodeID
	for i := 1; i <= 3; i++ {
		if id := nid(i); id != pri && id != sec {
			third = id
		}
	}
	// sec last heard at 7s: late (> 4s) but not dead (< 10s) at 12s.
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(7 * time.Second), Node: sec, Health: 100})
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(12 * time.Second), Node: third, Health: 100})
	r := mustApply(t, m, Command{Op: OpTick, Now: t0.Add(12 * time.Second)})
	if !slices.Equal(r.Dead, []api.NodeID{pri}) {
		t.Fatalf("dead %v, want [%s]", r.Dead, pri)
	}
	v, _ = m.Volume("v")
	if q := v.Partitions[0]; q.Primary != pri || len(q.InSync) != 2 {
		t.Fatalf("placement torn down around a late secondary: %+v", q)
	}
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(13 * time.Second), Node: sec, Health: 100})
	mustApply(t, m, Command{Op: OpTick, Now: t0.Add(13 * time.Second)})
	v, _ = m.Volume("v")
	if q := v.Partitions[0]; q.Primary != "" || !slices.Equal(q.InSync, []api.NodeID{sec}) {
		t.Fatalf("after the secondary heartbeats: %+v", q)
	}
}

// TestLeaderIsNotDeclaredDead: the tick's proposer is alive by definition.
func TestLeaderIsNotDeclaredDead(t *testing.T) {
	m := newMap(t, 2)
	r := mustApply(t, m, Command{Op: OpTick, Now: t0.Add(time.Minute), Node: "n1"})
	if !slices.Equal(r.Dead, []api.NodeID{"n2"}) {
		t.Fatalf("dead %v, want [n2]", r.Dead)
	}
}

func TestStuckPrimaryWaits(t *testing.T) {
	m := newMap(t, 2)
	mustApply(t, m, vol("v", mib, 2))
	v, _ := m.Volume("v")
	p := v.Partitions[0]
	sec := p.Secondaries[0]
	// The primary reports its peer out of sync and runs solo.
	mustApply(t, m, Command{Op: OpSetInSync, Volume: "v", Node: p.Primary, Epoch: p.Epoch})
	mustApply(t, m, Command{Op: OpBless, Volume: "v", Node: p.Primary, Epoch: p.Epoch})
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(20 * time.Second), Node: sec, Health: 100})
	r := mustApply(t, m, Command{Op: OpTick, Now: t0.Add(20 * time.Second)})
	if !slices.Equal(r.Dead, []api.NodeID{p.Primary}) || len(r.Work) != 1 || r.Work[0].Kind != WorkStuck {
		t.Fatalf("tick: %+v", r)
	}
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: sec}, api.ErrInUse)
	// The primary comes back and still holds its role.
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0.Add(21 * time.Second), Node: p.Primary, Health: 100})
	v, _ = m.Volume("v")
	if v.Partitions[0].Primary != p.Primary || len(m.Work) != 0 {
		t.Fatalf("after revival: %+v work %+v", v.Partitions[0], m.Work)
	}
}

func TestGrantFirstWins(t *testing.T) {
	m := newMap(t, 4)
	mustApply(t, m, vol("v", mib, 2))
	v, _ := m.Volume("v")
	p := v.Partitions[0]
	primary, sec := p.Primary, p.Secondaries[0]
	var others []api.NodeID
	for i := 1; i <= 4; i++ {
		if id := nid(i); id != primary && id != sec {
			others = append(others, id)
		}
	}
	// The holder asks again: same grant, same epoch.
	r := mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: primary})
	if r.Grant.Epoch != 1 || r.Grant.Node != primary {
		t.Fatalf("re-acquire: %+v", r.Grant)
	}
	// The holder giving its current epoch gets a new one, once: asked
	// again with the old epoch it is answered with the new grant.
	r = mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: primary, Epoch: 1})
	if r.Grant.Epoch != 2 || r.Grant.Node != primary {
		t.Fatalf("bump: %+v", r.Grant)
	}
	r = mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: primary, Epoch: 1})
	if r.Grant.Epoch != 2 {
		t.Fatalf("repeated bump: %+v", r.Grant)
	}
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: sec, Epoch: 2}, api.ErrInUse)
	err := applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: sec}, api.ErrInUse)
	var held *HeldError
	if !errors.As(err, &held) || !slices.Equal(held.Holders, []api.NodeID{primary}) {
		t.Fatalf("refusal does not name the holder: %v", err)
	}
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RoleSecondary, Node: others[0]}, api.ErrInUse)
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RoleSecondary, Node: primary}, api.ErrInUse)
	applyFail(t, m, Command{Op: OpRelease, Volume: "v", Role: RoleSecondary, Node: primary}, api.ErrNotFound)
	// Release the primary: the in-sync secondary may take it, not the outsider.
	mustApply(t, m, Command{Op: OpRelease, Volume: "v", Role: RolePrimary, Node: primary})
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: others[0]}, ErrNotInSync)
	r = mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: sec})
	if r.Grant.Epoch != 3 {
		t.Fatalf("epoch %d, want 3", r.Grant.Epoch)
	}
	// Its old secondary slot is free: first requester wins it.
	mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RoleSecondary, Node: others[1]})
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RoleSecondary, Node: others[0]}, api.ErrInUse)
	// The new primary is alone in sync: it cannot release without force.
	applyFail(t, m, Command{Op: OpRelease, Volume: "v", Role: RolePrimary, Node: sec}, api.ErrInUse)
	// A dead or draining node gets nothing.
	mustApply(t, m, Command{Op: OpRelease, Volume: "v", Role: RoleSecondary, Node: others[1]})
	mustApply(t, m, Command{Op: OpDrain, Node: others[0]})
	applyFail(t, m, Command{Op: OpAcquire, Volume: "v", Role: RoleSecondary, Node: others[0]}, api.ErrInvalid)
	roundTrip(t, m)
}

func TestReserves(t *testing.T) {
	m := newMap(t, 4)
	mustApply(t, m, Command{Op: OpCreateVolume, Create: &VolumeSpec{Name: "v", Size: mib, PartitionSize: mib, Replicas: 2, Reserves: 2}})
	v, _ := m.Volume("v")
	p := v.Partitions[0]
	if len(p.Reserves) != 2 || len(p.Members()) != 4 {
		t.Fatalf("placement %+v", p)
	}
	applyFail(t, m, Command{Op: OpSetInSync, Volume: "v", Node: p.Primary, Epoch: 1, Nodes: p.Reserves[:1]}, api.ErrInvalid)
	// A reserve is promoted to secondary when a slot frees up.
	mustApply(t, m, Command{Op: OpRelease, Volume: "v", Role: RoleSecondary, Node: p.Secondaries[0]})
	mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RoleSecondary, Node: p.Reserves[0]})
	v, _ = m.Volume("v")
	if q := v.Partitions[0]; len(q.Reserves) != 1 || q.Secondaries[0] != p.Reserves[0] {
		t.Fatalf("after promotion %+v", q)
	}
}

// TestGrantRace has many goroutines ask for the same free primary role
// through one mutex-serialized Apply: exactly one wins, the rest are told
// who holds it.
func TestGrantRace(t *testing.T) {
	const nodes = 16
	for round := 0; round < 20; round++ {
		m := newMap(t, nodes)
		mustApply(t, m, vol("v", mib, MaxReplicas))
		v, _ := m.Volume("v")
		primary := v.Partitions[0].Primary
		mustApply(t, m, Command{Op: OpRelease, Volume: "v", Role: RolePrimary, Node: primary})
		var mu sync.Mutex
		var wg sync.WaitGroup
		winners := make(chan api.NodeID, nodes)
		refusals := make(chan *HeldError, nodes)
		for i := 1; i <= nodes; i++ {
			wg.Add(1)
			go func(id api.NodeID) {
				defer wg.Done()
				mu.Lock()
				r, err := m.Apply(Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: id})
				mu.Unlock()
				var held *HeldError
				switch {
				case err == nil:
					winners <- r.Grant.Node
				case errors.As(err, &held):
					refusals <- held
				case errors.Is(err, ErrNotInSync):
					refusals <- nil // the released primary is out of sync
				default:
					t.Errorf("node %s: %v", id, err)
				}
			}(nid(i))
		}
		wg.Wait()
		close(winners)
		close(refusals)
		var won []api.NodeID
		for w := range winners {
			won = append(won, w)
		}
		if len(won) != 1 {
			t.Fatalf("round %d: %d winners %v", round, len(won), won)
		}
		for h := range refusals {
			if h != nil && !slices.Equal(h.Holders, won) {
				t.Fatalf("refusal names %v, winner %v", h.Holders, won)
			}
		}
		v, _ = m.Volume("v")
		if v.Partitions[0].Primary != won[0] || v.Partitions[0].Epoch != 2 {
			t.Fatalf("map: %+v", v.Partitions[0])
		}
	}
}

// checkInvariants checks the rules of the package doc on every partition.
func checkInvariants(t testing.TB, m *Map, prevEpochs map[string]api.Epoch) {
	t.Helper()
	for _, v := range m.VolumeList() {
		for _, p := range v.Partitions {
			key := fmt.Sprintf("%s/%d", v.Name, p.Index)
			mem := p.Members()
			seen := map[api.NodeID]bool{}
			for _, id := range mem {
				if seen[id] {
					t.Fatalf("%s: node %s holds two roles: %+v", key, id, p)
				}
				seen[id] = true
				if _, ok := m.Nodes[id]; !ok {
					t.Fatalf("%s: unknown member %s", key, id)
				}
			}
			if len(p.Secondaries) > v.Replicas-1 || len(p.Reserves) > v.Reserves {
				t.Fatalf("%s: too many holders: %+v", key, p)
			}
			for _, id := range p.InSync {
				if r := p.RoleOf(id); r != RolePrimary && r != RoleSecondary {
					t.Fatalf("%s: in-sync %s is %q", key, id, r)
				}
			}
			if p.Primary != "" && !slices.Contains(p.InSync, p.Primary) {
				t.Fatalf("%s: primary %s not in sync %v", key, p.Primary, p.InSync)
			}
			if p.Solo != nil {
				if p.Solo.Node != p.Primary || p.Solo.Epoch != p.Epoch || len(p.InSync) > 1 {
					t.Fatalf("%s: bad blessing %+v in %+v", key, p.Solo, p)
				}
			}
			if p.Epoch < prevEpochs[key] {
				t.Fatalf("%s: epoch fell from %d to %d", key, prevEpochs[key], p.Epoch)
			}
			prevEpochs[key] = p.Epoch
		}
	}
}

// TestGrantProperty drives random commands from random nodes against the
// map and checks after each one that a role has at most one holder, the
// in-sync set and blessings follow the rules, epochs never fall, and a
// replica restored from a snapshot midway stays identical.
func TestGrantProperty(t *testing.T) {
	for seed := int64(1); seed <= 4; seed++ {
		rng := rand.New(rand.NewSource(seed))
		const nodes = 6
		m := newMap(t, nodes, "a", "a", "b", "b", "c", "c")
		mustApply(t, m, Command{Op: OpCreateVolume, Create: &VolumeSpec{Name: "v", Size: 4 * mib, PartitionSize: mib, Replicas: 3, Reserves: 1}})
		var twin *Map
		epochs := map[string]api.Epoch{}
		now := t0
		roles := []Role{RolePrimary, RoleSecondary, RoleReserve}
		ok := map[Op]int{}
		for step := 0; step < 1200; step++ {
			if step == 500 {
				twin = m.Clone()
			}
			now = now.Add(time.Duration(rng.Intn(800)) * time.Millisecond)
			node := nid(1 + rng.Intn(nodes))
			part := api.PartitionID(rng.Intn(4))
			v := m.Volumes["v"]
			p := v.Partitions[part]
			var c Command
			switch k := rng.Intn(10); k {
			case 0, 1, 2:
				c = Command{Op: OpAcquire, Volume: "v", Partition: part, Role: roles[rng.Intn(3)], Node: node, Now: now}
			case 3:
				c = Command{Op: OpRelease, Volume: "v", Partition: part, Role: roles[rng.Intn(3)], Node: node, Now: now, Force: rng.Intn(4) == 0}
			case 4:
				var set []api.NodeID
				for _, id := range p.Members() {
					if rng.Intn(2) == 0 {
						set = append(set, id)
					}
				}
				c = Command{Op: OpSetInSync, Volume: "v", Partition: part, Node: p.Primary, Epoch: p.Epoch - api.Epoch(rng.Intn(2)), Nodes: set, Now: now}
			case 5:
				c = Command{Op: OpBless, Volume: "v", Partition: part, Node: p.Primary, Epoch: p.Epoch, Now: now}
			case 6, 7:
				c = Command{Op: OpHeartbeat, Node: node, Health: rng.Intn(101), Now: now}
			case 8:
				c = Command{Op: OpTick, Now: now}
			case 9:
				c = Command{Op: []Op{OpDrain, OpUndrain, OpUnbless}[rng.Intn(3)], Volume: "v", Partition: part, Node: node, Now: now}
			}
			before := encode(t, m)
			if _, err := m.Apply(c); err == nil {
				ok[c.Op]++
			} else {
				if after := encode(t, m); !bytes.Equal(before, after) {
					t.Fatalf("seed %d step %d: failed %s changed the map", seed, step, c.Op)
				}
			}
			if twin != nil {
				twin.Apply(c)
			}
			checkInvariants(t, m, epochs)
		}
		if !bytes.Equal(encode(t, m), encode(t, twin)) {
			t.Fatalf("seed %d: restored replica diverged", seed)
		}
		if ok[OpAcquire] < 20 || ok[OpRelease] < 5 || ok[OpSetInSync] < 10 || ok[OpBless] < 2 {
			t.Fatalf("seed %d: too few successful commands to mean much: %v", seed, ok)
		}
		t.Logf("seed %d: successful commands %v, final epochs %v", seed, ok, epochs)
	}
}

func TestBlessingRules(t *testing.T) {
	m := newMap(t, 3)
	mustApply(t, m, vol("v", mib, 3))
	v, _ := m.Volume("v")
	p := v.Partitions[0]
	pr := p.Primary
	// Peers are in sync: no blessing.
	applyFail(t, m, Command{Op: OpBless, Volume: "v", Node: pr, Epoch: 1}, api.ErrInUse)
	// Only the primary, only at its epoch.
	applyFail(t, m, Command{Op: OpSetInSync, Volume: "v", Node: p.Secondaries[0], Epoch: 1}, ErrNotHolder)
	applyFail(t, m, Command{Op: OpSetInSync, Volume: "v", Node: pr, Epoch: 0}, ErrStaleEpoch)
	mustApply(t, m, Command{Op: OpSetInSync, Volume: "v", Node: pr, Epoch: 1})
	applyFail(t, m, Command{Op: OpBless, Volume: "v", Node: p.Secondaries[0], Epoch: 1}, ErrNotHolder)
	applyFail(t, m, Command{Op: OpBless, Volume: "v", Node: pr, Epoch: 2}, ErrStaleEpoch)
	r := mustApply(t, m, Command{Op: OpBless, Volume: "v", Node: pr, Epoch: 1, Now: t0})
	if r.Blessing == nil || r.Blessing.Epoch != 1 || !m.Blessed("v", 0, pr) {
		t.Fatalf("bless: %+v", r)
	}
	mustApply(t, m, Command{Op: OpBless, Volume: "v", Node: pr, Epoch: 1}) // idempotent
	// A peer back in sync revokes it.
	mustApply(t, m, Command{Op: OpSetInSync, Volume: "v", Node: pr, Epoch: 1, Nodes: p.Secondaries[:1]})
	if m.Blessed("v", 0, pr) {
		t.Fatal("blessing survived a peer in sync")
	}
	// The epoch moving revokes it.
	mustApply(t, m, Command{Op: OpSetInSync, Volume: "v", Node: pr, Epoch: 1})
	mustApply(t, m, Command{Op: OpBless, Volume: "v", Node: pr, Epoch: 1})
	mustApply(t, m, Command{Op: OpRelease, Volume: "v", Role: RolePrimary, Node: pr, Force: true})
	if m.Volumes["v"].Partitions[0].Solo != nil {
		t.Fatal("blessing survived the primary's release")
	}
	mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Role: RolePrimary, Node: p.Secondaries[1]})
	if m.Blessed("v", 0, pr) || m.Blessed("v", 0, p.Secondaries[1]) {
		t.Fatal("blessing after the epoch moved")
	}
	// Unbless.
	q := m.Volumes["v"].Partitions[0]
	mustApply(t, m, Command{Op: OpSetInSync, Volume: "v", Node: q.Primary, Epoch: q.Epoch})
	mustApply(t, m, Command{Op: OpBless, Volume: "v", Node: q.Primary, Epoch: q.Epoch})
	mustApply(t, m, Command{Op: OpUnbless, Volume: "v", Node: q.Primary})
	if m.Blessed("v", 0, q.Primary) {
		t.Fatal("unbless")
	}
}

func TestPlacementDomains(t *testing.T) {
	// Three domains, two nodes each: three replicas in three domains.
	m := newMap(t, 6, "a", "a", "b", "b", "c", "c")
	mustApply(t, m, vol("v", 30*mib, 3))
	primaries := map[api.NodeID]int{}
	count := map[api.NodeID]int{}
	for _, p := range m.Volumes["v"].Partitions {
		doms := map[string]bool{}
		for _, id := range p.Members() {
			doms[m.Nodes[id].FailureDomain] = true
			count[id]++
		}
		if len(doms) != 3 {
			t.Fatalf("partition %d in domains %v", p.Index, doms)
		}
		primaries[p.Primary]++
	}
	for i := 1; i <= 6; i++ {
		if c := count[nid(i)]; c != 15 {
			t.Fatalf("node %d holds %d replicas, want 15 (balanced): %v", i, c, count)
		}
		if c := primaries[nid(i)]; c != 5 {
			t.Fatalf("node %d holds %d primaries, want 5: %v", i, c, primaries)
		}
	}
	// Two domains, four replicas: distinct nodes, both domains used.
	m = newMap(t, 4, "a", "a", "a", "b")
	mustApply(t, m, vol("w", 4*mib, 4))
	for _, p := range m.Volumes["w"].Partitions {
		if len(p.Members()) != 4 {
			t.Fatalf("partition %+v", p)
		}
	}
	m = newMap(t, 3, "a", "a", "b")
	mustApply(t, m, vol("w", 4*mib, 2))
	for _, p := range m.Volumes["w"].Partitions {
		if m.Nodes[p.Primary].FailureDomain == m.Nodes[p.Secondaries[0]].FailureDomain {
			t.Fatalf("partition %d in one domain though two exist: %+v", p.Index, p)
		}
	}
}

func TestPlacementCapacityAndState(t *testing.T) {
	m := New()
	caps := []int64{10 * mib, 10 * mib, 40 * mib}
	for i, c := range caps {
		s := spec(i+1, "")
		s.Capacity = c
		mustApply(t, m, Command{Op: OpRegister, Now: t0, Node: nid(i + 1), Spec: s})
	}
	mustApply(t, m, vol("a", 20*mib, 1))
	count := map[api.NodeID]int{}
	for _, p := range m.Volumes["a"].Partitions {
		count[p.Primary]++
	}
	// By capacity fraction: n3 (4x larger) takes about two thirds.
	if count["n3"] < 12 || count["n1"] > 4 || count["n2"] > 4 {
		t.Fatalf("unbalanced by capacity: %v", count)
	}
	// The cluster has 60 MiB: 41 more MiB do not fit.
	applyFail(t, m, vol("b", 41*mib, 1), api.ErrNoSpace)
	mustApply(t, m, vol("b", 40*mib, 1))
	applyFail(t, m, vol("c", mib, 1), api.ErrNoSpace)

	// Draining, isolating and dead nodes get no new replicas; nodes
	// without the head role neither.
	m = newMap(t, 5)
	mustApply(t, m, Command{Op: OpDrain, Node: "n1"})
	mustApply(t, m, Command{Op: OpHeartbeat, Now: t0, Node: "n2", Health: 1})
	s := spec(9, "")
	s.Roles = []string{NodeRoleSled, NodeRoleControl}
	mustApply(t, m, Command{Op: OpRegister, Now: t0, Node: "n9", Spec: s})
	applyFail(t, m, vol("v", mib, 4), api.ErrNoSpace)
	mustApply(t, m, vol("v", 10*mib, 3))
	for _, p := range m.Volumes["v"].Partitions {
		for _, id := range p.Members() {
			if id == "n1" || id == "n2" || id == "n9" {
				t.Fatalf("placed on %s: %+v", id, p)
			}
		}
	}
	// Default replica count follows the cluster size.
	one := newMap(t, 1)
	r := mustApply(t, one, Command{Op: OpCreateVolume, Create: &VolumeSpec{Name: "x", Size: mib}})
	if r.Volume.Replicas != 1 || r.Volume.PartitionSize != api.DefaultPartitionSize {
		t.Fatalf("defaults: %+v", r.Volume)
	}
}

func TestResizePlacesNewPartitions(t *testing.T) {
	m := newMap(t, 3)
	mustApply(t, m, vol("v", 2*mib, 2))
	r := mustApply(t, m, Command{Op: OpResizeVolume, Volume: "v", Size: 5*mib + 512})
	if len(r.Volume.Partitions) != 6 {
		t.Fatalf("%d partitions", len(r.Volume.Partitions))
	}
	for _, p := range r.Volume.Partitions {
		if len(p.Members()) != 2 || p.Epoch != 1 {
			t.Fatalf("partition %+v", p)
		}
	}
	if a := r.Volume.API(); a.Partitions != 6 || a.IQN != api.IQN("v") {
		t.Fatalf("api view %+v", a)
	}
}

func TestDrainRecordsShedWork(t *testing.T) {
	m := newMap(t, 2)
	mustApply(t, m, vol("v", 2*mib, 2))
	r := mustApply(t, m, Command{Op: OpDrain, Node: "n1"})
	if len(r.Work) != 1 || r.Work[0].Kind != WorkShed {
		t.Fatalf("work %+v", r.Work)
	}
	p := m.Volumes["v"].Partitions[r.Work[0].Partition]
	mustApply(t, m, Command{Op: OpRelease, Volume: "v", Partition: p.Index, Role: RolePrimary, Node: "n1"})
	mustApply(t, m, Command{Op: OpAcquire, Volume: "v", Partition: p.Index, Role: RolePrimary, Node: "n2"})
	for _, w := range m.Work {
		if w.Kind == WorkShed || w.Kind == WorkElect {
			t.Fatalf("left over %+v", w)
		}
	}
	// finish-work removes an item.
	if len(m.Work) > 0 {
		mustApply(t, m, Command{Op: OpFinishWork, Work: m.Work[0].ID})
	}
}

// TestNextJudgment checks the deadline a leader ticks at against Tick
// itself: a tick at the deadline changes no node's state, a tick just
// after it marks one late or dead; and the deadlines follow the lease, the
// suspect timeout and a new leader's grace.
func TestNextJudgment(t *testing.T) {
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	states := func(m *Map) map[api.NodeID]State {
		out := map[api.NodeID]State{}
		for _, n := range m.NodeList() {
			out[n.ID] = n.State
		}
		return out
	}
	m := newMap(t, 3) // registered at t0: lease 10s, suspect 4s
	if got := m.NextJudgment("n1", t0); !got.Equal(at(4 * time.Second)) {
		t.Fatalf("next judgment %v, want n2's suspect deadline at t0+4s", got.Sub(t0))
	}
	mustApply(t, m, Command{Op: OpHeartbeat, Now: at(3 * time.Second), Node: "n2", Health: 100})
	// n3 (heard at 0) turns late at 4s, then dead at 10s; n2 late at 7s.
	want := []time.Duration{4 * time.Second, 7 * time.Second, 10 * time.Second}
	for i, w := range want {
		next := m.NextJudgment("n1", t0)
		if !next.Equal(at(w)) {
			t.Fatalf("judgment %d at %v, want %v", i, next.Sub(t0), w)
		}
		before := states(m)
		c := m.Clone()
		mustApply(t, c, Command{Op: OpTick, Now: next, Node: "n1", Since: t0})
		if got := states(c); !maps.Equal(got, before) {
			t.Fatalf("a tick at the deadline %v changed %v to %v", w, before, got)
		}
		mustApply(t, m, Command{Op: OpTick, Now: next.Add(time.Millisecond), Node: "n1", Since: t0})
		if got := states(m); maps.Equal(got, before) {
			t.Fatalf("a tick just after the deadline %v changed nothing: %v", w, got)
		}
	}
	if s := states(m); s["n3"] != StateDead || s["n2"] != StateIsolating {
		t.Fatalf("states %v", s)
	}
	// Only n2 is left to judge: dead at 3s+10s.
	if got := m.NextJudgment("n1", t0); !got.Equal(at(13 * time.Second)) {
		t.Fatalf("next judgment %v, want 13s", got.Sub(t0))
	}
	// A new leader n2 since 20s gives n1 (heard at 0) the suspect timeout:
	// late and dead at 24s, not at once.
	if got := m.NextJudgment("n2", at(20*time.Second)); !got.Equal(at(24 * time.Second)) {
		t.Fatalf("under a new leader: %v, want 24s", got.Sub(t0))
	}
	r := mustApply(t, m, Command{Op: OpTick, Now: at(24*time.Second + time.Millisecond), Node: "n2", Since: at(20 * time.Second)})
	if !slices.Equal(r.Dead, []api.NodeID{"n1"}) {
		t.Fatalf("dead %v, want [n1]", r.Dead)
	}
	if got := m.NextJudgment("n2", at(20*time.Second)); !got.IsZero() {
		t.Fatalf("every other node is dead, next judgment %v", got)
	}
}

// TestConfigureSettles: a configure that shortens the lease and suspect
// timeouts judges nodes by the old ones for ConfigSettle (their agents
// still heartbeat at the old period until they learn the new config), then
// by the new; one that lengthens them applies at once.
func TestConfigureSettles(t *testing.T) {
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	m := newMap(t, 2) // lease 10s, suspect 4s; registered at t0
	mustApply(t, m, Command{Op: OpHeartbeat, Now: at(20 * time.Second), Node: "n2", Health: 100})
	short := m.Config
	short.LeaseTimeout, short.SuspectTimeout = 2*time.Second, time.Second
	mustApply(t, m, Command{Op: OpConfigure, Now: at(21 * time.Second), Config: &short})
	// n2 heard 2.5s ago: past the new lease, not the old suspect timeout.
	r := mustApply(t, m, Command{Op: OpTick, Now: at(22500 * time.Millisecond), Node: "n1", Since: t0})
	if n, _ := m.Node("n2"); len(r.Dead) != 0 || n.State != StateActive {
		t.Fatalf("within the settle: dead %v, n2 %s", r.Dead, n.State)
	}
	if got := m.NextJudgment("n1", t0); !got.Equal(at(21*time.Second + ConfigSettle)) {
		t.Fatalf("next judgment %v, want the settle's end", got.Sub(t0))
	}
	r = mustApply(t, m, Command{Op: OpTick, Now: at(21*time.Second + ConfigSettle), Node: "n1", Since: t0})
	if !slices.Equal(r.Dead, []api.NodeID{"n2"}) || m.Settling != nil {
		t.Fatalf("after the settle: dead %v, settling %v", r.Dead, m.Settling)
	}
	// Longer timeouts: no settle.
	long := m.Config
	long.LeaseTimeout = time.Minute
	mustApply(t, m, Command{Op: OpConfigure, Now: at(30 * time.Second), Config: &long})
	if m.Settling != nil {
		t.Fatalf("a longer lease settles: %+v", m.Settling)
	}
	roundTrip(t, m)
}

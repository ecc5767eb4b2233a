package control

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// Raft timings for tests: short, but long enough that a shared 2-core
// machine under -race does not hold spurious elections.
// STOR_RAFT_TIMEOUT (a duration) sets all three, for measuring failover.
var (
	testHeartbeat = envDuration("STOR_RAFT_TIMEOUT", 150*time.Millisecond)
	testElection  = testHeartbeat
	testLease     = testHeartbeat
)

func envDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil && d > 0 {
		return d
	}
	return def
}

// raftCluster runs control nodes in one process over raft's in-memory
// transport. Killing a node disconnects its transport both ways and closes
// it; its directory stays for a restart.
type raftCluster struct {
	t     *testing.T
	base  string
	nodes map[api.NodeID]*Node
	trans map[api.NodeID]*raft.InmemTransport
	tick  time.Duration
	// handoff is the nodes' HandoffQuiet (0: the default); hand-offs
	// happen only with the ticker on.
	handoff time.Duration
	apis    map[api.NodeID]string // API addresses to register; default 127.0.0.(10+i):7480
}

func testLogger() *slog.Logger {
	if os.Getenv("STOR_TEST_RAFT_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func raftAddrOf(id api.NodeID) string {
	n, _ := strconv.Atoi(string(id[1:]))
	return fmt.Sprintf("127.0.0.%d:7482", 10+n)
}

func newRaftCluster(t *testing.T) *raftCluster {
	c := &raftCluster{t: t, base: t.TempDir(), nodes: map[api.NodeID]*Node{}, trans: map[api.NodeID]*raft.InmemTransport{}, tick: -1}
	t.Cleanup(func() {
		for _, id := range c.running() {
			c.nodes[id].Close()
		}
	})
	return c
}

// start starts node id from its directory.
func (c *raftCluster) start(id api.NodeID, bootstrap bool) *Node {
	c.t.Helper()
	addr := raft.ServerAddress(raftAddrOf(id))
	_, tr := raft.NewInmemTransport(addr)
	for oid, ot := range c.trans {
		tr.Connect(raft.ServerAddress(raftAddrOf(oid)), ot)
		ot.Connect(addr, tr)
	}
	n, err := NewNode(NodeConfig{
		ID: id, Dir: filepath.Join(c.base, string(id)), Transport: tr, Bootstrap: bootstrap,
		Logger: testLogger(), HeartbeatTimeout: testHeartbeat, ElectionTimeout: testElection,
		LeaderLeaseTimeout: testLease, CommitTimeout: 5 * time.Millisecond, TickInterval: c.tick, HandoffQuiet: c.handoff,
		ApplyTimeout: 5 * time.Second, NoSync: true,
	})
	if err != nil {
		c.t.Fatalf("start %s: %v", id, err)
	}
	c.nodes[id] = n
	c.trans[id] = tr
	return n
}

// cut disconnects id's transport from every other, both ways.
func (c *raftCluster) cut(id api.NodeID) {
	addr := raft.ServerAddress(raftAddrOf(id))
	c.trans[id].DisconnectAll()
	for oid, ot := range c.trans {
		if oid != id {
			ot.Disconnect(addr)
		}
	}
}

// heal reconnects id to every running node.
func (c *raftCluster) heal(id api.NodeID) {
	addr := raft.ServerAddress(raftAddrOf(id))
	for oid, ot := range c.trans {
		if oid != id {
			ot.Connect(addr, c.trans[id])
			c.trans[id].Connect(raft.ServerAddress(raftAddrOf(oid)), ot)
		}
	}
}

func (c *raftCluster) kill(id api.NodeID) {
	c.t.Helper()
	c.cut(id)
	if err := c.nodes[id].Close(); err != nil {
		c.t.Fatalf("close %s: %v", id, err)
	}
	delete(c.nodes, id)
	delete(c.trans, id)
}

func (c *raftCluster) running() []api.NodeID {
	var ids []api.NodeID
	for id := range c.nodes {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// form bootstraps n1, joins n2..nN and registers them all in the map.
func (c *raftCluster) form(n int) *Node {
	c.t.Helper()
	c.start("n1", true)
	leader := c.waitLeader(c.running(), 5*time.Second)
	for i := 2; i <= n; i++ {
		id := api.NodeID(fmt.Sprintf("n%d", i))
		c.start(id, false)
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := leader.Join(context.Background(), id, raftAddrOf(id))
			if err == nil {
				break
			}
			if time.Now().After(deadline) || !(errors.Is(err, ErrLeadershipLost) || errors.Is(err, ErrNotLeader)) {
				c.t.Fatalf("join %s: %v", id, err)
			}
			leader = c.waitLeader(c.running(), 5*time.Second)
		}
	}
	for i := 1; i <= n; i++ {
		id := api.NodeID(fmt.Sprintf("n%d", i))
		cmd := registerCmd(id)
		if a, ok := c.apis[id]; ok {
			cmd.Spec.Addr.API = a
		}
		_, leader = c.propose(cmd)
	}
	return leader
}

// waitLeader polls until one of ids leads and has committed a barrier.
func (c *raftCluster) waitLeader(ids []api.NodeID, limit time.Duration) *Node {
	c.t.Helper()
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		for _, id := range ids {
			n := c.nodes[id]
			if n == nil || !n.IsLeader() {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			err := n.Barrier(ctx)
			cancel()
			if err == nil {
				return n
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	c.t.Fatalf("no leader among %v within %v", ids, limit)
	return nil
}

// propose proposes cmd on whichever of ids (all running nodes if none)
// leads, retrying while leadership moves (a loaded machine holds spurious
// elections). A register that meets ErrExists after a retry had succeeded.
func (c *raftCluster) propose(cmd cluster.Command, ids ...api.NodeID) (cluster.Result, *Node) {
	c.t.Helper()
	if len(ids) == 0 {
		ids = c.running()
	}
	deadline := time.Now().Add(15 * time.Second)
	for try := 0; ; try++ {
		leader := c.waitLeader(ids, 10*time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r, err := leader.Propose(ctx, cmd)
		cancel()
		switch {
		case err == nil:
			return r, leader
		case try > 0 && cmd.Op == cluster.OpRegister && errors.Is(err, api.ErrExists):
			return r, leader
		case time.Now().Before(deadline) && (errors.Is(err, ErrLeadershipLost) || errors.Is(err, ErrNotLeader)):
			continue
		}
		c.t.Fatalf("propose %s on %s: %v", cmd.Op, leader.ID(), err)
	}
}

func propose(t *testing.T, n *Node, cmd cluster.Command) cluster.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := n.Propose(ctx, cmd)
	if err != nil {
		t.Fatalf("propose %s on %s: %v", cmd.Op, n.ID(), err)
	}
	return r
}

func registerCmd(id api.NodeID) cluster.Command {
	n, _ := strconv.Atoi(string(id[1:]))
	return cluster.Command{Op: cluster.OpRegister, Node: id, Spec: &cluster.NodeSpec{Addr: cluster.Addresses{
		API: fmt.Sprintf("127.0.0.%d:7480", 10+n), Raft: raftAddrOf(id),
	}}}
}

func volumeCmd(name string) cluster.Command {
	return cluster.Command{Op: cluster.OpCreateVolume, Create: &cluster.VolumeSpec{Name: name, Size: 1 << 20, PartitionSize: 1 << 20, Replicas: 1}}
}

func volumeNames(n *Node) []string {
	var out []string
	n.Read(func(m *cluster.Map) {
		for _, v := range m.VolumeList() {
			out = append(out, v.Name)
		}
	})
	return out
}

// waitConverged polls until every running node has applied the leader's
// commit index, then checks that every node holds the same map.
func (c *raftCluster) waitConverged(leader *Node) {
	c.t.Helper()
	// A follower learns a commit index from the next append: barriers
	// nudge it when no write follows.
	want := leader.Stats().CommitIndex
	deadline := time.Now().Add(15 * time.Second)
	for _, id := range c.running() {
		for i := 0; c.nodes[id].raft.AppliedIndex() < want; i++ {
			if time.Now().After(deadline) {
				c.t.Fatalf("%s applied %d, leader committed %d", id, c.nodes[id].raft.AppliedIndex(), want)
			}
			if i%50 == 49 {
				leader.Barrier(context.Background())
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	// raft counts an entry applied when it hands it to the FSM goroutine:
	// poll the maps themselves.
	for {
		var ref []byte
		same := true
		for _, id := range c.running() {
			var b []byte
			c.nodes[id].Read(func(m *cluster.Map) { b, _ = m.Marshal() })
			if ref == nil {
				ref = b
			} else if string(b) != string(ref) {
				same = false
			}
		}
		if same {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("maps of %v differ", c.running())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestRaftSingleNode(t *testing.T) {
	c := newRaftCluster(t)
	n := c.form(1)
	n.Read(func(m *cluster.Map) {
		if nd, ok := m.Node("n1"); !ok || nd.Registered.IsZero() {
			t.Errorf("register: %+v (the proposer sets the time)", nd)
		}
	})
	// The map's refusal comes back as the error, with its api sentinel.
	_, err := n.Propose(context.Background(), registerCmd("n1"))
	if !errors.Is(err, api.ErrExists) {
		t.Fatalf("double registration: %v", err)
	}
	propose(t, n, volumeCmd("a"))
	st := n.Stats()
	if st.State != "Leader" || st.Leader != "n1" || st.Term == 0 || st.CommitIndex == 0 || len(st.Voters) != 1 || !st.Voters[0].Leader {
		t.Fatalf("stats %+v", st)
	}
	if err := n.ConsistentRead(context.Background(), func(m *cluster.Map) {
		if _, ok := m.Volume("a"); !ok {
			t.Error("volume a missing")
		}
	}); err != nil {
		t.Fatal(err)
	}
	// Snapshot, write more, restart: snapshot + log tail restore it all.
	if err := n.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	propose(t, n, volumeCmd("b"))
	c.kill("n1")
	n = c.start("n1", true) // Bootstrap on existing state is a no-op
	n = c.waitLeader([]api.NodeID{"n1"}, 5*time.Second)
	if got := volumeNames(n); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("after restart: %v", got)
	}
}

func TestRaftFollowerAnswersWithLeader(t *testing.T) {
	c := newRaftCluster(t)
	leader := c.form(3)
	c.waitConverged(leader)
	leader = c.waitLeader(c.running(), 5*time.Second)
	var follower *Node
	for _, id := range c.running() {
		if id != leader.ID() {
			follower = c.nodes[id]
			break
		}
	}
	_, err := follower.Propose(context.Background(), volumeCmd("x"))
	var nl *NotLeaderError
	if !errors.As(err, &nl) || !errors.Is(err, ErrNotLeader) {
		t.Fatalf("follower propose: %v", err)
	}
	lid := leader.ID()
	if nl.ID != lid || nl.Raft != raftAddrOf(lid) || nl.API == "" {
		t.Fatalf("not-leader error %+v, leader %s", nl, lid)
	}
	if err := follower.Join(context.Background(), "n9", "127.0.0.1:1"); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("follower join: %v", err)
	}
	if err := follower.Barrier(context.Background()); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("follower barrier: %v", err)
	}
}

func TestRaftJoinChecks(t *testing.T) {
	c := newRaftCluster(t)
	leader := c.form(2)
	ctx := context.Background()
	if err := leader.Join(ctx, "n2", raftAddrOf("n2")); err != nil {
		t.Fatalf("repeated join: %v", err)
	}
	if err := leader.Join(ctx, "n2", "127.0.0.99:7482"); !errors.Is(err, api.ErrInUse) {
		t.Fatalf("same id, other address: %v", err)
	}
	if err := leader.Join(ctx, "n7", raftAddrOf("n2")); !errors.Is(err, api.ErrInUse) {
		t.Fatalf("other id, same address: %v", err)
	}
	if err := leader.Join(ctx, "n7", "nonsense"); !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("bad address: %v", err)
	}
	propose(t, leader, registerCmd("n3"))
	if err := leader.Join(ctx, "n3", "127.0.0.98:7482"); !errors.Is(err, api.ErrInvalid) {
		t.Fatalf("join at an address other than the registered one: %v", err)
	}
	vs, _ := leader.Voters()
	if len(vs) != 2 {
		t.Fatalf("voters changed by refused joins: %+v", vs)
	}
	if err := leader.Leave(ctx, "n2"); err != nil {
		t.Fatal(err)
	}
	if err := leader.Leave(ctx, "n2"); err != nil {
		t.Fatal(err)
	}
	if vs, _ := leader.Voters(); len(vs) != 1 {
		t.Fatalf("after leave: %+v", vs)
	}
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[int(p*float64(len(s)-1)+0.5)]
}

// TestRaftLeaderFailover kills the leader of three voters again and again,
// measures the time until a new leader commits a write, checks that no
// committed write is lost, then restarts every voter from its directory.
func TestRaftLeaderFailover(t *testing.T) {
	kills := 10
	if s := os.Getenv("STOR_FAILOVER_KILLS"); s != "" {
		kills, _ = strconv.Atoi(s)
	}
	c := newRaftCluster(t)
	leader := c.form(3)
	var committed []string
	var took []time.Duration
	for k := 0; k < kills; k++ {
		for j := 0; j < 3; j++ {
			name := fmt.Sprintf("v%02d-%d", k, j)
			_, leader = c.propose(volumeCmd(name))
			committed = append(committed, name)
		}
		// The leader vanishes from the network at start (it is closed
		// once a successor serves, so its shutdown is not measured).
		old := leader.ID()
		c.cut(old)
		start := time.Now()
		leader = nil
		deadline := start.Add(5 * time.Second)
		name := fmt.Sprintf("after-kill-%02d", k)
		for leader == nil && time.Now().Before(deadline) {
			for _, id := range c.running() {
				n := c.nodes[id]
				if id == old || !n.IsLeader() {
					continue
				}
				ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
				_, err := n.Propose(ctx, volumeCmd(name))
				cancel()
				if err == nil {
					leader = n
					break
				}
			}
			if leader == nil {
				time.Sleep(time.Millisecond)
			}
		}
		if leader == nil {
			t.Fatalf("kill %d: no leader served within 5s", k)
		}
		took = append(took, time.Since(start))
		committed = append(committed, name)
		c.kill(old)
		if err := leader.ConsistentRead(context.Background(), func(m *cluster.Map) {
			for _, v := range committed {
				if _, ok := m.Volume(v); !ok {
					t.Errorf("kill %d: committed volume %s lost", k, v)
				}
			}
		}); err != nil {
			t.Fatal(err)
		}
		c.start(old, false) // rejoins as a follower from its directory
		c.waitConverged(leader)
	}
	med, mx := percentile(took, 0.5), slices.Max(took)
	t.Logf("leader failover over %d kills (heartbeat %v, election %v): median %v, max %v, all %v",
		kills, testHeartbeat, testElection, med.Round(time.Millisecond), mx.Round(time.Millisecond), took)
	if limit := testElection + testHeartbeat*2 + 2*time.Second; mx > limit {
		t.Errorf("failover took %v, over the election timeout plus margin (%v)", mx, limit)
	}

	// Restart every voter from its directory: nothing committed is lost.
	for _, id := range c.running() {
		c.kill(id)
	}
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		c.start(id, false)
	}
	leader = c.waitLeader(c.running(), 10*time.Second)
	c.waitConverged(leader)
	got := volumeNames(leader)
	for _, v := range committed {
		if !slices.Contains(got, v) {
			t.Fatalf("after full restart, volume %s is lost", v)
		}
	}
}

func TestRaftFiveVotersTwoDown(t *testing.T) {
	c := newRaftCluster(t)
	c.form(5)
	_, leader := c.propose(volumeCmd("before"))
	// Take down the leader and one follower.
	down := []api.NodeID{leader.ID()}
	for _, id := range c.running() {
		if id != leader.ID() {
			down = append(down, id)
			break
		}
	}
	for _, id := range down {
		c.kill(id)
	}
	_, leader = c.propose(volumeCmd("after"))
	c.waitConverged(leader)
	if got := volumeNames(leader); !slices.Equal(got, []string{"after", "before"}) {
		t.Fatalf("volumes %v", got)
	}
}

// TestRaftPartitionedLeaderCannotCommit cuts the leader off: its writes
// fail, the majority elects a new leader and commits, and after healing the
// old leader follows and holds none of its refused writes.
func TestRaftPartitionedLeaderCannotCommit(t *testing.T) {
	c := newRaftCluster(t)
	c.form(3)
	_, old := c.propose(volumeCmd("before"))
	c.waitConverged(old)
	c.cut(old.ID())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	start := time.Now()
	_, err := old.Propose(ctx, volumeCmd("lost"))
	cancel()
	if err == nil {
		t.Fatal("a partitioned leader committed a write")
	}
	if !errors.Is(err, ErrLeadershipLost) && !errors.Is(err, ErrNotLeader) {
		t.Fatalf("partitioned propose: %v", err)
	}
	t.Logf("partitioned leader gave up after %v: %v", time.Since(start).Round(time.Millisecond), err)
	var rest []api.NodeID
	for _, id := range c.running() {
		if id != old.ID() {
			rest = append(rest, id)
		}
	}
	_, leader := c.propose(volumeCmd("majority"), rest...)
	if _, err := old.Propose(context.Background(), volumeCmd("lost2")); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("cut-off old leader: %v", err)
	}
	c.heal(old.ID())
	c.waitConverged(leader)
	if got := volumeNames(old); !slices.Equal(got, []string{"before", "majority"}) {
		t.Fatalf("old leader after heal: %v", got)
	}
}

// TestRaftTickerDeclaresDead runs the leader's ticker with a short lease: a
// node that never heartbeats is declared dead, one that does stays active.
func TestRaftTickerDeclaresDead(t *testing.T) {
	c := newRaftCluster(t)
	c.tick = 20 * time.Millisecond
	leader := c.form(1)
	cfg := cluster.DefaultConfig()
	// Timeouts well above one propose's latency on a loaded machine under
	// -race, so the heartbeating n1 never looks isolating.
	cfg.LeaseTimeout = 3 * time.Second
	cfg.SuspectTimeout = 2 * time.Second
	propose(t, leader, cluster.Command{Op: cluster.OpConfigure, Config: &cfg})
	propose(t, leader, registerCmd("n2"))
	deadline := time.Now().Add(30 * time.Second)
	for {
		propose(t, leader, cluster.Command{Op: cluster.OpHeartbeat, Node: "n1", Health: 100})
		var s1, s2 cluster.State
		leader.Read(func(m *cluster.Map) {
			a, _ := m.Node("n1")
			b, _ := m.Node("n2")
			s1, s2 = a.State, b.State
		})
		if s2 == cluster.StateDead {
			if s1 != cluster.StateActive {
				t.Fatalf("heartbeating n1 is %s", s1)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("n2 never declared dead: %s", s2)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTickerTicksAtTheNextDeadline: between its periodic ticks the leader
// ticks just after the map's next deadline (a node turning late or dead),
// not up to a period later; a deadline already past waits minTickPeriod,
// and a node that does not lead keeps the period.
func TestTickerTicksAtTheNextDeadline(t *testing.T) {
	c := newRaftCluster(t)
	c.tick = time.Hour
	leader := c.form(1)
	cfg := cluster.DefaultConfig()
	cfg.LeaseTimeout = 40 * time.Second // tick period: lease/4 = 10s
	cfg.SuspectTimeout = 2 * time.Second
	// Configured a minute ago, and a tick since: its settle is over.
	propose(t, leader, cluster.Command{Op: cluster.OpConfigure, Config: &cfg, Now: time.Now().Add(-time.Minute).UTC()})
	propose(t, leader, cluster.Command{Op: cluster.OpTick, Node: leader.ID()})
	if p := leader.tickPeriod(); p != 10*time.Second {
		t.Fatalf("tick period %v, want 10s", p)
	}
	now := time.Now()
	propose(t, leader, cluster.Command{Op: cluster.OpRegister, Node: "n2", Now: now.UTC(), Spec: registerCmd("n2").Spec})
	since := now.Add(-time.Minute) // leading for a minute
	// n2 (and n1, registered by form) turn late 2s after they were heard.
	if d := leader.nextTick(time.Now(), since); d < 1500*time.Millisecond || d > 2*time.Second+judgmentMargin {
		t.Fatalf("next tick in %v, want just after n2's suspect deadline (2s)", d)
	}
	if d := leader.nextTick(time.Now(), time.Time{}); d < 9*time.Second {
		t.Fatalf("not leading: next tick in %v, want the period (10s)", d)
	}
	// A node whose deadline is past (a tick failed to judge it): soon, not at once.
	propose(t, leader, cluster.Command{Op: cluster.OpRegister, Node: "n3", Now: now.Add(-time.Hour).UTC(), Spec: registerCmd("n3").Spec})
	if d := leader.nextTick(time.Now(), since); d != minTickPeriod {
		t.Fatalf("past deadline: next tick in %v, want %v", d, minTickPeriod)
	}
}

// TestHandoffTarget: the leader hands off to the active voter holding the
// fewest primaries, only if it holds more itself, and not while a node is
// late or a partition has no primary.
func TestHandoffTarget(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	m := cluster.New()
	apply := func(c cluster.Command) cluster.Result {
		t.Helper()
		if c.Now.IsZero() {
			c.Now = now
		}
		r, err := m.Apply(c)
		if err != nil {
			t.Fatalf("apply %s: %v", c.Op, err)
		}
		return r
	}
	var voters []Voter
	for i := 1; i <= 3; i++ {
		id := api.NodeID(fmt.Sprintf("n%d", i))
		apply(registerCmd(id))
		voters = append(voters, Voter{ID: id, Raft: raftAddrOf(id), Suffrage: raft.Voter.String()})
	}
	primary := func(name string) api.NodeID {
		v, _ := m.Volume(name)
		return v.Partitions[0].Primary
	}
	if to, _, _ := handoffTarget(m, "n1", voters); to.ID != "" {
		t.Fatalf("no primaries anywhere: hand-off to %s", to.ID)
	}
	apply(volumeCmd("a"))
	apply(volumeCmd("b"))
	held := map[api.NodeID]bool{primary("a"): true, primary("b"): true}
	var free api.NodeID
	for _, v := range voters {
		if !held[v.ID] {
			free = v.ID
		}
	}
	if len(held) != 2 || free == "" {
		t.Fatalf("primaries on %v: want two nodes", held)
	}
	lead := primary("a")
	to, mine, theirs := handoffTarget(m, lead, voters)
	if to.ID != free || to.Raft != raftAddrOf(free) || mine != 1 || theirs != 0 {
		t.Fatalf("leader %s (1 primary): hand-off to %q (%d, %d), want %s", lead, to.ID, mine, theirs, free)
	}
	if to, _, _ := handoffTarget(m, free, voters); to.ID != "" {
		t.Fatalf("leader %s holds no primary: hand-off to %s", free, to.ID)
	}
	// Not to a non-voter, nor to a node that is not active.
	nonvoter := slices.Clone(voters)
	for i := range nonvoter {
		if nonvoter[i].ID == free {
			nonvoter[i].Suffrage = raft.Nonvoter.String()
		}
	}
	if to, _, _ := handoffTarget(m, lead, nonvoter); to.ID != "" {
		t.Fatalf("hand-off to non-voter %s", to.ID)
	}
	apply(cluster.Command{Op: cluster.OpDrain, Node: free})
	if to, _, _ := handoffTarget(m, lead, voters); to.ID != "" {
		t.Fatalf("hand-off to draining %s", to.ID)
	}
	apply(cluster.Command{Op: cluster.OpUndrain, Node: free})
	// A late node: a failover may be under way.
	cfg := m.Config
	apply(cluster.Command{Op: cluster.OpTick, Node: lead, Now: now.Add(cfg.SuspectTimeout + time.Second), Since: now})
	if to, _, _ := handoffTarget(m, lead, voters); to.ID != "" {
		t.Fatalf("hand-off to %s while nodes are late", to.ID)
	}
	// Everyone heartbeats: the hand-off is back. Then a partition without
	// a primary (released) stops it again.
	for _, v := range voters {
		apply(cluster.Command{Op: cluster.OpHeartbeat, Node: v.ID, Health: 100, Now: now.Add(cfg.SuspectTimeout + 2*time.Second)})
	}
	if to, _, _ := handoffTarget(m, lead, voters); to.ID != free {
		t.Fatalf("after heartbeats: hand-off to %q, want %s", to.ID, free)
	}
	apply(cluster.Command{Op: cluster.OpRelease, Volume: "b", Partition: 0, Role: cluster.RolePrimary, Node: primary("b"), Force: true})
	if to, _, _ := handoffTarget(m, lead, voters); to.ID != "" {
		t.Fatalf("hand-off to %s while a partition has no primary", to.ID)
	}
}

// TestMayHandoff: a leader hands off only once it has led for HandoffQuiet
// and the suspect timeout (its grace over), and HandoffQuiet after its
// last hand-off.
func TestMayHandoff(t *testing.T) {
	c := newRaftCluster(t)
	c.handoff = time.Second
	leader := c.form(1)
	cfg := cluster.DefaultConfig()
	cfg.SuspectTimeout = 5 * time.Second
	propose(t, leader, cluster.Command{Op: cluster.OpConfigure, Config: &cfg})
	now := time.Now()
	for _, tc := range []struct {
		led, sinceLast, sinceConfig time.Duration
		want                        bool
	}{
		{2 * time.Second, time.Hour, time.Hour, false},              // past the quiet, within the grace
		{6 * time.Second, time.Hour, time.Hour, true},               // past both
		{6 * time.Second, 500 * time.Millisecond, time.Hour, false}, // a hand-off just now
		{6 * time.Second, 2 * time.Second, time.Hour, true},
		{6 * time.Second, time.Hour, configSettle / 2, false}, // agents may not know the config yet
		{6 * time.Second, time.Hour, configSettle, true},
	} {
		if got := leader.mayHandoff(now.Add(-tc.led), now.Add(-tc.sinceConfig), now.Add(-tc.sinceLast)); got != tc.want {
			t.Errorf("led %v, last hand-off %v ago, config changed %v ago: %v, want %v", tc.led, tc.sinceLast, tc.sinceConfig, got, tc.want)
		}
	}
}

// TestRaftHandoffUnderLoad hands leadership back and forth while another
// goroutine proposes as fast as it can: every hand-off ends with the
// target leading (raft v1.6 takes entries again right after TimeoutNow,
// and one that lands before the target's vote request loses it the vote;
// the gate keeps them out).
func TestRaftHandoffUnderLoad(t *testing.T) {
	c := newRaftCluster(t)
	leader := c.form(3)
	nodes := map[api.NodeID]*Node{}
	for _, id := range c.running() {
		nodes[id] = c.nodes[id]
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				for _, n := range nodes {
					if n.IsLeader() {
						ctx, cancel := context.WithTimeout(context.Background(), time.Second)
						n.Propose(ctx, cluster.Command{Op: cluster.OpHeartbeat, Node: "n1", Health: 100})
						cancel()
					}
				}
			}
		}()
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()
	failed := 0
	for i := 0; i < 20; i++ {
		var to api.NodeID
		for _, id := range c.running() {
			if id != leader.ID() && (to == "" || i%2 == 1) {
				to = id
			}
		}
		leader.transfer(context.Background(), Voter{ID: to, Raft: raftAddrOf(to), Suffrage: raft.Voter.String()})
		next := c.waitLeader(c.running(), 10*time.Second)
		if next.ID() != to {
			failed++
			t.Logf("hand-off %d from %s to %s: %s leads", i, leader.ID(), to, next.ID())
		}
		leader = next
	}
	if failed > 0 {
		t.Fatalf("%d of 20 hand-offs did not end with the target leading", failed)
	}
}

// TestRaftLeaderHandsOff: a leader whose node holds a primary hands
// leadership to the voter holding none; that one keeps it.
func TestRaftLeaderHandsOff(t *testing.T) {
	c := newRaftCluster(t)
	c.tick = 20 * time.Millisecond
	c.handoff = 100 * time.Millisecond
	leader := c.form(3)
	cfg := cluster.DefaultConfig()
	cfg.LeaseTimeout = time.Minute
	cfg.SuspectTimeout = 500 * time.Millisecond // a leader hands off after leading this long
	c.propose(cluster.Command{Op: cluster.OpConfigure, Config: &cfg})
	c.propose(volumeCmd("a"))
	_, leader = c.propose(volumeCmd("b"))
	primaries := map[api.NodeID]int{}
	leader.Read(func(m *cluster.Map) {
		for _, v := range m.VolumeList() {
			primaries[v.Partitions[0].Primary]++
		}
	})
	var free api.NodeID
	for _, id := range c.running() {
		if primaries[id] == 0 {
			free = id
		}
	}
	if free == "" {
		t.Fatalf("primaries %v: want a node without one", primaries)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c.heartbeatAll() // no node late
		l := c.waitLeader(c.running(), 10*time.Second)
		if l.ID() == free {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("leader %s (primaries %v), want %s, the node holding none", l.ID(), primaries, free)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// It stays there: no voter holds fewer.
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		c.heartbeatAll()
		time.Sleep(20 * time.Millisecond)
	}
	if l := c.waitLeader(c.running(), 10*time.Second); l.ID() != free {
		t.Fatalf("leadership moved on to %s", l.ID())
	}
}

// heartbeatAll proposes a heartbeat of every running node.
func (c *raftCluster) heartbeatAll() {
	c.t.Helper()
	for _, id := range c.running() {
		c.propose(cluster.Command{Op: cluster.OpHeartbeat, Node: id, Health: 100})
	}
}

// TestRaftLeaderRefreshesAfterAVoterReturns: a voter whose heartbeats
// failed for longer than refreshAfter answers again (the observations
// raft makes are fed to the ticker here): the leader hands leadership to
// the other voter, not to the returned one, and does nothing after a
// short outage.
func TestRaftLeaderRefreshesAfterAVoterReturns(t *testing.T) {
	c := newRaftCluster(t)
	c.tick = 20 * time.Millisecond
	c.handoff = 100 * time.Millisecond
	leader := c.form(3)
	cfg := cluster.DefaultConfig()
	cfg.LeaseTimeout = time.Minute
	cfg.SuspectTimeout = 500 * time.Millisecond // a leader hands off after leading this long
	_, leader = c.propose(cluster.Command{Op: cluster.OpConfigure, Config: &cfg})
	var back, other api.NodeID
	for _, id := range c.running() {
		if id != leader.ID() {
			if back == "" {
				back = id
			} else {
				other = id
			}
		}
	}
	observe := func(outage time.Duration) {
		leader.obs <- raft.Observation{Data: raft.FailedHeartbeatObservation{PeerID: raft.ServerID(back), LastContact: time.Now().Add(-outage)}}
		leader.obs <- raft.Observation{Data: raft.ResumedHeartbeatObservation{PeerID: raft.ServerID(back)}}
	}
	beatFor := func(d time.Duration) {
		for end := time.Now().Add(d); time.Now().Before(end); {
			c.heartbeatAll() // no node late
			time.Sleep(20 * time.Millisecond)
		}
	}
	beatFor(time.Second) // past the quiet period of its election
	observe(refreshAfter / 2)
	beatFor(500 * time.Millisecond)
	if !leader.IsLeader() {
		t.Fatalf("leadership left %s after a short outage of %s", leader.ID(), back)
	}
	observe(2 * refreshAfter)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.heartbeatAll()
		l := c.waitLeader(c.running(), 10*time.Second)
		if l.ID() == other {
			break
		}
		if l.ID() == back || time.Now().After(deadline) {
			t.Fatalf("leader %s after %s came back, want %s", l.ID(), back, other)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestFSMSnapshotRestore(t *testing.T) {
	f := newFSM()
	cmds := []cluster.Command{registerCmd("n1"), volumeCmd("a"), volumeCmd("a")}
	for i, c := range cmds {
		c.Now = time.Date(2026, 1, 1, 0, 0, i, 0, time.UTC)
		b, _ := c.Encode()
		f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: b})
	}
	if r := f.Apply(&raft.Log{Index: 4, Type: raft.LogCommand, Data: []byte("junk")}).(fsmResponse); !errors.Is(r.err, api.ErrInvalid) {
		t.Fatalf("junk entry: %v", r.err)
	}
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	g := newFSM()
	if err := g.Restore(io.NopCloser(&sink.Buffer)); err != nil {
		t.Fatal(err)
	}
	var a, b []byte
	f.read(func(m *cluster.Map) { a, _ = m.Marshal() })
	g.read(func(m *cluster.Map) { b, _ = m.Marshal() })
	if string(a) != string(b) {
		t.Fatalf("restore differs:\n%s\n%s", a, b)
	}
}

type memSink struct{ bytes.Buffer }

func (s *memSink) Close() error  { return nil }
func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { return nil }

// TestNodeCloseLeavesNoGoroutines starts and closes a three-voter group
// (ticker on, a proposal cancelled mid-flight) and polls until the
// goroutine count is back where it started.
func TestNodeCloseLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	func() {
		c := newRaftCluster(t)
		c.tick = 10 * time.Millisecond
		leader := c.form(3)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		leader.Propose(ctx, volumeCmd("x"))
		for _, id := range c.running() {
			c.kill(id)
		}
	}()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRaftTCP runs two voters over the production TCP transport on
// loopback.
func TestRaftTCP(t *testing.T) {
	base := t.TempDir()
	mk := func(id api.NodeID, boot bool) *Node {
		n, err := NewNode(NodeConfig{ID: id, Dir: filepath.Join(base, string(id)), RaftAddr: "127.0.0.1:0", Bootstrap: boot,
			Logger: testLogger(), HeartbeatTimeout: testHeartbeat, ElectionTimeout: testElection, LeaderLeaseTimeout: testLease,
			TickInterval: -1, NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	a := mk("n1", true)
	b := mk("n2", false)
	c := &raftCluster{t: t, nodes: map[api.NodeID]*Node{"n1": a, "n2": b}}
	leader := c.waitLeader([]api.NodeID{"n1"}, 5*time.Second)
	if err := leader.Join(context.Background(), "n2", b.RaftAddr()); err != nil {
		t.Fatal(err)
	}
	reg := registerCmd("n1")
	reg.Spec.Addr.Raft = a.RaftAddr()
	propose(t, leader, reg)
	propose(t, leader, volumeCmd("x"))
	c.waitConverged(leader)
	if got := volumeNames(b); !slices.Equal(got, []string{"x"}) {
		t.Fatalf("follower over TCP: %v", got)
	}
	if _, err := NewNode(NodeConfig{ID: "n3", Dir: filepath.Join(base, "n3"), RaftAddr: a.RaftAddr(), Logger: testLogger()}); err == nil {
		t.Fatal("a second node listened on a taken raft address")
	}
}

package control

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// apiCluster is a raftCluster whose nodes each serve the cluster API and
// the volume API on a loopback HTTP server.
type apiCluster struct {
	*raftCluster
	srv    map[api.NodeID]*httptest.Server
	leader *Node
}

func newAPICluster(t *testing.T, n int) *apiCluster {
	c := &apiCluster{raftCluster: newRaftCluster(t), srv: map[api.NodeID]*httptest.Server{}}
	c.apis = map[api.NodeID]string{}
	for i := 1; i <= n; i++ {
		id := api.NodeID(fmt.Sprintf("n%d", i))
		s := httptest.NewUnstartedServer(nil)
		c.srv[id] = s
		c.apis[id] = s.Listener.Addr().String()
		t.Cleanup(s.Close)
	}
	c.leader = c.form(n)
	for id, s := range c.srv {
		node := c.nodes[id]
		cfg := ClusterHandlerConfig{Logger: testLogger()}
		mux := http.NewServeMux()
		MountCluster(mux, NewClusterHandler(node, cfg))
		mux.Handle("/", LeaderOnly(node, NewHandler(HandlerConfig{Volumes: ClusterVolumes{Node: node}, Logger: testLogger()}), cfg))
		s.Config.Handler = mux
		s.Start()
	}
	c.waitConverged(c.leader)
	return c
}

func (c *apiCluster) follower() api.NodeID {
	for _, id := range c.running() {
		if id != c.leader.ID() {
			return id
		}
	}
	c.t.Fatal("no follower")
	return ""
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

func (a answer) decode(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(a.body, v); err != nil {
		t.Fatalf("decode %s: %v", a.body, err)
	}
}

func (c *apiCluster) do(t *testing.T, on api.NodeID, method, path, body string, hdr ...string) answer {
	t.Helper()
	req, err := http.NewRequest(method, c.srv[on].URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s on %s: %v", method, path, on, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header, b}
}

func (c *apiCluster) want(t *testing.T, on api.NodeID, method, path, body string, status int) answer {
	t.Helper()
	a := c.do(t, on, method, path, body)
	// A loaded machine may hold a spurious election: like a client, retry
	// while the cluster answers "unavailable".
	for deadline := time.Now().Add(5 * time.Second); a.status == 503 && status != 503 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		a = c.do(t, on, method, path, body)
	}
	if a.status != status {
		t.Fatalf("%s %s on %s: %d %s, want %d", method, path, on, a.status, a.body, status)
	}
	return a
}

func TestClusterAPIStatus(t *testing.T) {
	c := newAPICluster(t, 3)
	for _, id := range c.running() {
		c.leader = c.waitLeader(c.running(), 5*time.Second)
		var st ClusterStatus
		c.want(t, id, "GET", "/v1/cluster/status", "", 200).decode(t, &st)
		if st.Leader != c.leader.ID() || st.Node != id || len(st.Voters) != 3 || !st.Healthy || st.Term == 0 || st.CommitIndex == 0 {
			t.Fatalf("status on %s: %+v", id, st)
		}
		if st.LeaderAPI != c.apis[c.leader.ID()] || st.Nodes["active"] != 3 {
			t.Fatalf("status on %s: %+v", id, st)
		}
		var raw map[string]any
		c.want(t, id, "GET", "/v1/cluster/status", "", 200).decode(t, &raw)
		if raw["leader"] != string(c.leader.ID()) {
			t.Fatalf("top-level leader %v", raw["leader"])
		}
	}
}

func TestClusterAPIFollowerForwards(t *testing.T) {
	c := newAPICluster(t, 3)
	f := c.follower()
	// A write to a follower reaches the leader.
	a := c.want(t, f, "POST", "/v1/nodes", `{"id":"n7","addresses":{"api":"127.0.0.17:7480","raft":"127.0.0.17:7482"},"failure_domain":"rack2"}`, 201)
	if a.header.Get(HeaderLeader) == "" {
		t.Fatalf("forwarded answer names leader %q", a.header.Get(HeaderLeader))
	}
	var n cluster.Node
	a.decode(t, &n)
	if n.ID != "n7" || n.State != cluster.StateActive || n.FailureDomain != "rack2" {
		t.Fatalf("registered %+v", n)
	}
	// Reads through a follower are the leader's, current.
	var nodes []cluster.Node
	c.want(t, f, "GET", "/v1/nodes", "", 200).decode(t, &nodes)
	if len(nodes) != 4 {
		t.Fatalf("%d nodes", len(nodes))
	}
	// The volume API too: create on a follower, placement visible.
	c.want(t, f, "POST", "/v1/volumes", `{"name":"vol1","size":4194304,"partition_size":1048576,"replicas":2}`, 201)
	var v cluster.Volume
	c.want(t, f, "GET", "/v1/cluster/volumes/vol1", "", 200).decode(t, &v)
	if len(v.Partitions) != 4 || len(v.Partitions[0].Members()) != 2 {
		t.Fatalf("placement %+v", v)
	}
	var vols []api.Volume
	c.want(t, f, "GET", "/v1/volumes", "", 200).decode(t, &vols)
	if len(vols) != 1 || vols[0].Partitions != 4 {
		t.Fatalf("volumes %+v", vols)
	}
	// The node's own status is not forwarded: it reads the follower's own
	// map, which applies the committed create a moment after the leader.
	var st api.Status
	for deadline := time.Now().Add(10 * time.Second); ; {
		a = c.want(t, f, "GET", "/v1/status", "", 200)
		a.decode(t, &st)
		if st.Volumes == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("local status %+v, headers %v", st, a.header)
		}
		time.Sleep(10 * time.Millisecond) // poll: the follower's FSM catches up
	}
	// A request that already made its hops is not forwarded again.
	a = c.do(t, f, "GET", "/v1/nodes", "", HeaderHops, "2")
	if a.status != 503 || !strings.Contains(string(a.body), "unavailable") || a.header.Get(HeaderLeaderAPI) != c.apis[c.leader.ID()] {
		t.Fatalf("hop limit: %d %s %v", a.status, a.body, a.header)
	}
}

func TestClusterAPINodesAndGrants(t *testing.T) {
	c := newAPICluster(t, 3)
	l := c.leader.ID()
	f := c.follower()
	c.want(t, f, "POST", "/v1/volumes", `{"name":"v","size":1048576,"partition_size":1048576,"replicas":2}`, 201)
	var v cluster.Volume
	c.want(t, f, "GET", "/v1/cluster/volumes/v", "", 200).decode(t, &v)
	p := v.Partitions[0]
	var outsider api.NodeID
	for _, id := range c.running() {
		if p.RoleOf(id) == "" {
			outsider = id
		}
	}
	// Grants: the holder is named in the refusal.
	a := c.want(t, f, "POST", "/v1/grants", fmt.Sprintf(`{"volume":"v","partition":0,"role":"primary","node":%q}`, p.Secondaries[0]), 409)
	if !strings.Contains(string(a.body), string(p.Primary)) || !strings.Contains(string(a.body), `"in_use"`) {
		t.Fatalf("refusal %s does not name holder %s", a.body, p.Primary)
	}
	var g cluster.Grant
	c.want(t, f, "POST", "/v1/grants", fmt.Sprintf(`{"volume":"v","partition":0,"role":"primary","node":%q}`, p.Primary), 200).decode(t, &g)
	if g.Node != p.Primary || g.Epoch != 1 {
		t.Fatalf("grant %+v", g)
	}
	var grants []cluster.Grant
	c.want(t, l, "GET", "/v1/grants?volume=v", "", 200).decode(t, &grants)
	if len(grants) != 2 {
		t.Fatalf("grants %+v", grants)
	}
	c.want(t, l, "GET", "/v1/grants?node="+string(outsider), "", 200).decode(t, &grants)
	if len(grants) != 0 {
		t.Fatalf("outsider grants %+v", grants)
	}
	// In-sync and blessing.
	c.want(t, f, "POST", "/v1/grants/bless", fmt.Sprintf(`{"volume":"v","partition":0,"node":%q,"epoch":1}`, p.Primary), 409)
	c.want(t, f, "POST", "/v1/grants/in-sync", fmt.Sprintf(`{"volume":"v","partition":0,"node":%q,"epoch":1,"in_sync":[]}`, p.Primary), 200)
	var b cluster.Blessing
	c.want(t, f, "POST", "/v1/grants/bless", fmt.Sprintf(`{"volume":"v","partition":0,"node":%q,"epoch":1}`, p.Primary), 200).decode(t, &b)
	if b.Node != p.Primary || b.Epoch != 1 {
		t.Fatalf("blessing %+v", b)
	}
	c.want(t, f, "POST", "/v1/grants/in-sync", fmt.Sprintf(`{"volume":"v","partition":0,"node":%q,"epoch":0}`, p.Primary), 400)
	c.want(t, f, "POST", "/v1/grants/unbless", fmt.Sprintf(`{"volume":"v","partition":0,"node":%q}`, p.Primary), 200)
	c.want(t, f, "POST", "/v1/grants/release", fmt.Sprintf(`{"volume":"v","partition":0,"role":"secondary","node":%q}`, p.Secondaries[0]), 200)
	c.want(t, f, "POST", "/v1/grants/release", fmt.Sprintf(`{"volume":"v","partition":0,"role":"secondary","node":%q}`, p.Secondaries[0]), 404)

	// Nodes: heartbeat, drain, undrain, show, sled, bad input.
	var n cluster.Node
	c.want(t, f, "POST", "/v1/nodes/"+string(outsider)+"/heartbeat", `{"health":55}`, 200).decode(t, &n)
	if n.Health != 55 {
		t.Fatalf("heartbeat %+v", n)
	}
	c.want(t, f, "POST", "/v1/nodes/"+string(outsider)+"/drain", "", 200).decode(t, &n)
	if n.State != cluster.StateDraining {
		t.Fatalf("drain %+v", n)
	}
	c.want(t, f, "POST", "/v1/nodes/"+string(outsider)+"/undrain", "", 200).decode(t, &n)
	if n.State != cluster.StateActive {
		t.Fatalf("undrain %+v", n)
	}
	c.want(t, f, "POST", "/v1/nodes/"+string(outsider)+"/sled", `{"devices":[{"path":"/d0","capacity":1000}]}`, 200)
	var view NodeView
	c.want(t, f, "GET", "/v1/nodes/"+string(p.Primary), "", 200).decode(t, &view)
	if len(view.Grants) != 1 || view.Voter == nil || view.Grants[0].Role != cluster.RolePrimary {
		t.Fatalf("view %+v", view)
	}
	c.want(t, f, "GET", "/v1/nodes/"+string(outsider), "", 200).decode(t, &view)
	if view.Sled == nil || len(view.Sled.Devices) != 1 {
		t.Fatalf("sled view %+v", view)
	}
	c.want(t, f, "GET", "/v1/nodes/nope", "", 404)
	c.want(t, f, "POST", "/v1/nodes/nope/heartbeat", `{"health":5}`, 404)
	c.want(t, f, "POST", "/v1/nodes", `{"id":"n1","addresses":{"api":"127.0.0.99:1"}}`, 409) // id reused, other address
	c.want(t, f, "POST", "/v1/nodes", `{"id":"n8"`, 400)
	c.want(t, f, "POST", "/v1/nodes", `{"id":"n8","bogus":1}`, 400)
	c.want(t, f, "POST", "/v1/nodes", ``, 400)
	c.want(t, f, "POST", "/v1/cluster/join", `{"id":"n2","raft":"127.0.0.99:7482"}`, 409) // wrong address
	c.want(t, f, "POST", "/v1/cluster/join", `{"id":"n9"}`, 400)
	c.want(t, f, "GET", "/v1/nowhere", "", 404)
	// Remove: refused while it holds roles; the outsider goes.
	c.want(t, f, "DELETE", "/v1/nodes/"+string(p.Primary), "", 409)
	c.want(t, f, "DELETE", "/v1/nodes/"+string(outsider), "", 204)
	var voters []Voter
	st := c.leader.Status()
	for _, vt := range st.Voters {
		voters = append(voters, vt.Voter)
	}
	if len(voters) != 2 {
		t.Fatalf("voters after remove %+v", voters)
	}
}

func TestClusterAPINoLeader(t *testing.T) {
	c := newAPICluster(t, 3)
	f := c.follower()
	for _, id := range c.running() {
		if id != f {
			c.kill(id)
		}
	}
	// The survivor loses its leader: writes answer 503, status still works.
	deadline := time.Now().Add(5 * time.Second)
	for {
		a := c.do(t, f, "POST", "/v1/nodes/n1/heartbeat", `{"health":1}`)
		if a.status == 503 && strings.Contains(string(a.body), `"unavailable"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("write without a quorum: %d %s", a.status, a.body)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for {
		var st ClusterStatus
		c.want(t, f, "GET", "/v1/cluster/status", "", 200).decode(t, &st)
		if !st.Healthy && len(st.Errors) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status without a quorum: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// flakyTransport fails every request while down is set.
type flakyTransport struct {
	mu   sync.Mutex
	down bool
}

func (f *flakyTransport) set(down bool) { f.mu.Lock(); f.down = down; f.mu.Unlock() }

func (f *flakyTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	f.mu.Lock()
	down := f.down
	f.mu.Unlock()
	if down {
		return nil, errors.New("cut off")
	}
	return http.DefaultTransport.RoundTrip(r)
}

func TestAgentRegistersJoinsHeartbeats(t *testing.T) {
	c := newAPICluster(t, 3)
	f := c.follower()
	c.start("n4", false)
	ft := &flakyTransport{}
	ag, err := StartAgent(AgentConfig{
		ID:       "n4",
		Spec:     cluster.NodeSpec{Addr: cluster.Addresses{API: "127.0.0.14:7480", Raft: raftAddrOf("n4")}},
		Join:     []string{"http://127.0.0.1:1", c.srv[f].URL}, // the first is down
		Voter:    true,
		Interval: 20 * time.Millisecond,
		Suspect:  300 * time.Millisecond,
		Health:   func() int { return 77 },
		Client:   &http.Client{Transport: ft, Timeout: 2 * time.Second},
		Logger:   testLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ag.Close()
	poll := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: agent error %v", what, ag.Err())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	poll("active", func() bool { return ag.State() == cluster.StateActive })
	vs, _ := c.leader.Voters()
	if len(vs) != 4 {
		t.Fatalf("voters %+v", vs)
	}
	var n cluster.Node
	c.want(t, f, "GET", "/v1/nodes/n4", "", 200).decode(t, &n)
	if n.Health != 77 {
		t.Fatalf("node %+v", n)
	}
	// An operator drains it: the agent learns it.
	c.want(t, f, "POST", "/v1/nodes/n4/drain", "", 200)
	poll("draining", func() bool { return ag.State() == cluster.StateDraining })
	c.want(t, f, "POST", "/v1/nodes/n4/undrain", "", 200)
	poll("active again", func() bool { return ag.State() == cluster.StateActive })
	// Cut off from the control plane, it knows it is isolating.
	ft.set(true)
	poll("isolating", func() bool { return ag.State() == cluster.StateIsolating })
	ft.set(false)
	poll("back", func() bool { return ag.State() == cluster.StateActive })
}

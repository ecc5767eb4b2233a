package control

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// TestClusterAPIConfigure: POST /v1/cluster/config, sent to a follower,
// changes the fields it names and keeps the rest; every voter's map and
// status then hold the new config; bad values are 400 and change nothing.
func TestClusterAPIConfigure(t *testing.T) {
	c := newAPICluster(t, 3)
	f := c.follower()
	def := cluster.DefaultConfig()

	var got cluster.Config
	a := c.want(t, f, "POST", "/v1/cluster/config", `{"lease_timeout":"1.5s","suspect_timeout":"750ms"}`, 200)
	a.decode(t, &got)
	want := def
	want.LeaseTimeout, want.SuspectTimeout = 1500*time.Millisecond, 750*time.Millisecond
	if got != want {
		t.Fatalf("configure timeouts: got %+v, want %+v", got, want)
	}
	if a.header.Get(HeaderLeader) == "" || a.header.Get(HeaderLeader) == string(f) {
		t.Fatalf("answer from %q, want the leader's (forwarded by %s)", a.header.Get(HeaderLeader), f)
	}
	// The next configure merges over the map's config, not the defaults;
	// 0 is a value, not "unset".
	c.want(t, f, "POST", "/v1/cluster/config", `{"min_health":0,"lease_timeout":null}`, 200).decode(t, &got)
	want.MinHealth = 0
	if got != want {
		t.Fatalf("configure min health: got %+v, want %+v", got, want)
	}
	c.want(t, f, "POST", "/v1/cluster/config", `{"default_replicas":2,"default_partition_size":1073741824}`, 200).decode(t, &got)
	want.DefaultReplicas, want.DefaultPartitionSize = 2, 1<<30
	if got != want {
		t.Fatalf("configure defaults: got %+v, want %+v", got, want)
	}

	// Refusals: 400 with a JSON error, and the config stays.
	for _, bad := range []struct{ body, says string }{
		{`{"suspect_timeout":"3s"}`, "exceeds lease timeout"},
		{`{"lease_timeout":"0s"}`, "positive"},
		{`{"lease_timeout":"soon"}`, `lease_timeout "soon"`},
		{`{"suspect_timeout":""}`, `suspect_timeout ""`},
		{`{"lease_timeout":1500000000}`, "request body"},
		{`{"min_health":101}`, "min health"},
		{`{"default_replicas":0}`, "default replicas"},
		{`{"default_partition_size":4096}`, "partition size"},
		{`{}`, "names no setting"},
		{`{"lease":"1s"}`, "unknown field"},
		{``, "empty request body"},
	} {
		a := c.want(t, f, "POST", "/v1/cluster/config", bad.body, 400)
		var e api.Error
		a.decode(t, &e)
		if e.Code != "invalid" || !strings.Contains(e.Error, bad.says) {
			t.Errorf("configure %s: %+v, want code invalid saying %q", bad.body, e, bad.says)
		}
	}

	// Two configures at once, each naming one field: both land.
	leader := c.waitLeader(c.running(), 5*time.Second)
	c.leader = leader
	var wg sync.WaitGroup
	codes := make([]int, 2)
	for i, body := range []string{`{"min_health":33}`, `{"default_replicas":3}`} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Like a client, retry while a spurious election makes it 503.
			for deadline := time.Now().Add(5 * time.Second); codes[i] == 0 || codes[i] == 503 && time.Now().Before(deadline); {
				resp, err := http.Post(c.srv[leader.ID()].URL+"/v1/cluster/config", "application/json", strings.NewReader(body))
				if err != nil {
					return
				}
				resp.Body.Close()
				codes[i] = resp.StatusCode
			}
		}()
	}
	wg.Wait()
	if codes[0] != 200 || codes[1] != 200 {
		t.Fatalf("concurrent configures answered %v", codes)
	}
	want.MinHealth, want.DefaultReplicas = 33, 3

	// Every voter applies it; status shows it in nanoseconds.
	c.waitConverged(leader)
	for _, id := range c.running() {
		c.nodes[id].Read(func(m *cluster.Map) { got = m.Config })
		if got != want {
			t.Errorf("%s's map config %+v, want %+v", id, got, want)
		}
	}
	var raw struct {
		Config map[string]any `json:"config"`
	}
	c.want(t, f, "GET", "/v1/cluster/status", "", 200).decode(t, &raw)
	if raw.Config["lease_timeout"] != float64(1.5e9) || raw.Config["suspect_timeout"] != float64(7.5e8) || raw.Config["min_health"] != float64(33) {
		t.Errorf("status config %v", raw.Config)
	}
}

// TestRaftTickFollowsLease: the leader ticks every min(TickInterval,
// LeaseTimeout/4). With TickInterval 3s and a lease of 600ms, a node that
// never heartbeats is declared dead within the lease plus a tick and some
// slack, well before a 3s tick could come.
func TestRaftTickFollowsLease(t *testing.T) {
	c := newRaftCluster(t)
	c.tick = 3 * time.Second
	leader := c.form(1)
	if p := leader.tickPeriod(); p != cluster.DefaultConfig().LeaseTimeout/4 {
		t.Fatalf("tick period %v with the default 10s lease, want 2.5s", p)
	}
	configure := func(lease, suspect time.Duration) {
		t.Helper()
		cfg := cluster.DefaultConfig()
		cfg.LeaseTimeout, cfg.SuspectTimeout = lease, suspect
		// Configured a minute ago, and a tick since: the settle of a
		// shorter lease (cluster.ConfigSettle) is over.
		_, leader = c.propose(cluster.Command{Op: cluster.OpConfigure, Config: &cfg, Now: time.Now().Add(-time.Minute).UTC()})
		_, leader = c.propose(cluster.Command{Op: cluster.OpTick, Node: leader.ID()})
	}
	configure(600*time.Millisecond, 300*time.Millisecond)
	if p := leader.tickPeriod(); p != 150*time.Millisecond {
		t.Fatalf("tick period %v with a 600ms lease, want 150ms", p)
	}

	start := time.Now()
	_, leader = c.propose(registerCmd("n2"))
	const slack = time.Second
	limit := 600*time.Millisecond + 150*time.Millisecond + slack
	for {
		var s cluster.State
		leader.Read(func(m *cluster.Map) {
			n, _ := m.Node("n2")
			s = n.State
		})
		if s == cluster.StateDead {
			break
		}
		if time.Since(start) > limit {
			t.Fatalf("n2 is %s %v after it registered, want dead within %v", s, time.Since(start).Round(time.Millisecond), limit)
		}
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(start)
	if took < 600*time.Millisecond {
		t.Fatalf("n2 declared dead after %v, before its 600ms lease", took)
	}
	t.Logf("a silent node was declared dead %v after registering (lease 600ms, tick 150ms)", took.Round(time.Millisecond))

	// A lease so short that a quarter is below the floor ticks at the floor;
	// a long one falls back to TickInterval.
	configure(20*time.Millisecond, 10*time.Millisecond)
	if p := leader.tickPeriod(); p != minTickPeriod {
		t.Fatalf("tick period %v with a 20ms lease, want %v", p, minTickPeriod)
	}
	configure(time.Minute, 4*time.Second)
	if p := leader.tickPeriod(); p != 3*time.Second {
		t.Fatalf("tick period %v with a 1m lease, want the 3s TickInterval", p)
	}
}

func TestHeartbeatPeriod(t *testing.T) {
	for _, tc := range []struct{ explicit, suspect, want time.Duration }{
		{0, 4 * time.Second, time.Second}, // the default config: 1s as before
		{0, 3 * time.Second, time.Second},
		{0, 750 * time.Millisecond, 250 * time.Millisecond},
		{0, 15 * time.Millisecond, minHeartbeatPeriod},
		{20 * time.Millisecond, 750 * time.Millisecond, 20 * time.Millisecond},
		{5 * time.Second, 750 * time.Millisecond, 5 * time.Second}, // explicit wins, even if slow
	} {
		if got := heartbeatPeriod(tc.explicit, tc.suspect); got != tc.want {
			t.Errorf("heartbeatPeriod(%v, %v) = %v, want %v", tc.explicit, tc.suspect, got, tc.want)
		}
	}
}

// beatCounter counts the heartbeat requests it carries, by path.
type beatCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func (b *beatCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	if strings.HasSuffix(r.URL.Path, "/heartbeat") {
		b.mu.Lock()
		b.n[r.URL.Path]++
		b.mu.Unlock()
	}
	return http.DefaultTransport.RoundTrip(r)
}

func (b *beatCounter) count(id api.NodeID) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n["/v1/nodes/"+string(id)+"/heartbeat"]
}

// TestAgentHeartbeatFollowsSuspect: an agent with no Interval heartbeats
// every min(1s, suspect/3) of the cluster's config, and follows a later
// configure; one with an Interval keeps it.
func TestAgentHeartbeatFollowsSuspect(t *testing.T) {
	c := newAPICluster(t, 1)
	l := c.leader.ID()
	c.want(t, l, "POST", "/v1/cluster/config", `{"lease_timeout":"3s","suspect_timeout":"300ms"}`, 200)
	beats := &beatCounter{n: map[string]int{}}
	start := func(id api.NodeID, api string, interval time.Duration) *Agent {
		t.Helper()
		ag, err := StartAgent(AgentConfig{
			ID: id, Spec: cluster.NodeSpec{Addr: cluster.Addresses{API: api}}, Join: []string{c.srv[l].URL},
			Interval: interval, Client: &http.Client{Transport: beats, Timeout: 2 * time.Second}, Logger: testLogger(),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ag.Close)
		return ag
	}
	auto := start("n4", "127.0.0.14:7480", 0)
	fixed := start("n5", "127.0.0.15:7480", 400*time.Millisecond)
	poll := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: auto agent: interval %v, error %v; fixed agent: interval %v, error %v",
					what, auto.interval(), auto.Err(), fixed.interval(), fixed.Err())
			}
		}
	}
	learned := func(a *Agent, d time.Duration) func() bool {
		return func() bool {
			a.mu.Lock()
			defer a.mu.Unlock()
			return a.mu.learned == d && a.mu.suspect == d
		}
	}
	poll("auto learns 300ms", learned(auto, 300*time.Millisecond))
	poll("fixed learns 300ms", learned(fixed, 300*time.Millisecond))
	if got := auto.interval(); got != 100*time.Millisecond {
		t.Fatalf("auto agent's interval %v, want 100ms", got)
	}
	if got := fixed.interval(); got != 400*time.Millisecond {
		t.Fatalf("fixed agent's interval %v, want its own 400ms", got)
	}
	poll("auto active", func() bool { return auto.State() == cluster.StateActive })

	// The heartbeats come that often: 10 within 4s, where a 1s period
	// would send 5.
	mark := beats.count("n4")
	deadline := time.Now().Add(4 * time.Second)
	for beats.count("n4")-mark < 10 {
		if time.Now().After(deadline) {
			t.Fatalf("%d heartbeats in 4s at a 100ms period", beats.count("n4")-mark)
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A configure reaches the running agents within a few heartbeats.
	c.want(t, l, "POST", "/v1/cluster/config", `{"suspect_timeout":"900ms"}`, 200)
	poll("auto learns 900ms", learned(auto, 900*time.Millisecond))
	if got := auto.interval(); got != 300*time.Millisecond {
		t.Fatalf("auto agent's interval %v after the configure, want 300ms", got)
	}
	poll("fixed learns 900ms", learned(fixed, 900*time.Millisecond))
	if got := fixed.interval(); got != 400*time.Millisecond {
		t.Fatalf("fixed agent's interval %v after the configure, want its own 400ms", got)
	}
}

// TestAgentLearnsAConfigureSoon: an agent heartbeating at the default 1s
// period (suspect 4s) learns a shorter suspect timeout within about a
// second and a heartbeat, not ten heartbeats later: until it does, a new
// leader's grace (the new suspect timeout) may be shorter than its period.
func TestAgentLearnsAConfigureSoon(t *testing.T) {
	c := newAPICluster(t, 1)
	l := c.leader.ID()
	ag := startAgentN4(t, c.srv[l].URL)
	waitActive(t, ag, 10*time.Second)
	if got := ag.interval(); got != maxHeartbeatPeriod {
		t.Fatalf("interval %v before the configure, want %v", got, maxHeartbeatPeriod)
	}
	c.want(t, l, "POST", "/v1/cluster/config", `{"lease_timeout":"3s","suspect_timeout":"300ms"}`, 200)
	start := time.Now()
	for ag.interval() != 100*time.Millisecond {
		if time.Since(start) > 4*time.Second { // ten 1s heartbeats took ~10s
			t.Fatalf("agent still at %v after %v", ag.interval(), time.Since(start))
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("learned the configure in %v", time.Since(start).Round(time.Millisecond))
}

// TestConfigSettleCoversTheAgents: after a configure the map judges nodes by
// the old timeouts for cluster.ConfigSettle, and the leader hands nothing
// off for as long; an agent must learn the config and heartbeat at the new
// period within it.
func TestConfigSettleCoversTheAgents(t *testing.T) {
	if need := relearnEvery + 2*maxHeartbeatPeriod; need > cluster.ConfigSettle || configSettle != cluster.ConfigSettle {
		t.Fatalf("agents take up to %v to heartbeat at a new period; the map settles for %v, hand-offs wait %v",
			need, cluster.ConfigSettle, configSettle)
	}
}

// TestAgentLearnsTheLeadersConfig: the node an agent asks first answers
// its status from a stale map (a follower that restarted and has not
// applied the configure yet); the agent learns the config from the
// leader that status names instead.
func TestAgentLearnsTheLeadersConfig(t *testing.T) {
	c := newAPICluster(t, 1)
	l := c.leader.ID()
	c.want(t, l, "POST", "/v1/cluster/config", `{"lease_timeout":"3s","suspect_timeout":"300ms"}`, 200)
	ag := startAgentN4(t, staleStatus(t, c.srv[l].URL, func(leaderAPI string) ClusterStatus {
		return ClusterStatus{Leader: l, LeaderAPI: leaderAPI, State: "Follower", Config: cluster.DefaultConfig()}
	}))
	for deadline := time.Now().Add(5 * time.Second); ag.interval() != 100*time.Millisecond; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("interval %v, want 100ms (the leader's suspect timeout 300ms / 3); err %v", ag.interval(), ag.Err())
		}
	}
}

// TestAgentUntrustedConfigHeartbeatsOften: while no status names a
// leader (the node asked knows none yet), the agent does not trust the
// config it read and heartbeats at most every untrustedPeriod, not at the
// 1s the stale default would give.
func TestAgentUntrustedConfigHeartbeatsOften(t *testing.T) {
	c := newAPICluster(t, 1)
	l := c.leader.ID()
	ag := startAgentN4(t, staleStatus(t, c.srv[l].URL, func(string) ClusterStatus {
		return ClusterStatus{State: "Follower", Config: cluster.DefaultConfig()}
	}))
	waitActive(t, ag, 5*time.Second)
	if got := ag.interval(); got != untrustedPeriod {
		t.Fatalf("interval %v with a config from no leader, want %v", got, untrustedPeriod)
	}
}

// startAgentN4 starts agent n4 (API 127.0.0.14:7480) joining through join,
// closed at cleanup.
func startAgentN4(t *testing.T, join string) *Agent {
	t.Helper()
	ag, err := StartAgent(AgentConfig{
		ID: "n4", Spec: cluster.NodeSpec{Addr: cluster.Addresses{API: "127.0.0.14:7480"}}, Join: []string{join},
		Client: &http.Client{Timeout: 2 * time.Second}, Logger: testLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ag.Close)
	return ag
}

// waitActive fails t unless ag becomes active within d.
func waitActive(t *testing.T, ag *Agent, d time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(d); ag.State() != cluster.StateActive; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("agent not active: %v", ag.Err())
		}
	}
}

// staleStatus serves the API at leaderURL, except that its cluster status
// is status(the leader's API host): a node answering from a stale map. It
// returns the server's URL; the server stops at cleanup.
func staleStatus(t *testing.T, leaderURL string, status func(leaderAPI string) ClusterStatus) string {
	t.Helper()
	lu, err := url.Parse(leaderURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(lu)
	stale := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/cluster/status" {
			proxy.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(status(lu.Host))
	}))
	t.Cleanup(stale.Close)
	return stale.URL
}

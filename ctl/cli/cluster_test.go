package cli

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/ctl/control"
)

// clusterEnv is a one-voter control plane (real raft on loopback TCP)
// behind the API a `stord run` control node serves, with nodes n1 (the
// voter), n2 and n3 registered and volume v1 placed on them.
var quiet = slog.New(slog.DiscardHandler)

func clusterEnv(t *testing.T) *env {
	t.Helper()
	node, err := control.NewNode(control.NodeConfig{
		ID: "n1", Dir: t.TempDir(), RaftAddr: "127.0.0.1:0", Bootstrap: true, NoSync: true, TickInterval: -1, Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	mux := http.NewServeMux()
	control.MountCluster(mux, control.NewClusterHandler(node, control.ClusterHandlerConfig{Logger: quiet}))
	mux.Handle("/", control.LeaderOnly(node, control.NewHandler(control.HandlerConfig{Volumes: control.ClusterVolumes{Node: node}, Logger: quiet}), control.ClusterHandlerConfig{Logger: quiet}))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	deadline := time.Now().Add(10 * time.Second)
	for !node.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("the bootstrapped node did not become leader")
		}
		time.Sleep(10 * time.Millisecond)
	}
	c := client.New(srv.URL, nil)
	apiAddr := strings.TrimPrefix(srv.URL, "http://")
	for _, n := range []struct {
		id, api, raft, domain string
	}{{"n1", apiAddr, node.RaftAddr(), "a"}, {"n2", "127.0.0.2:7480", "", "b"}, {"n3", "127.0.0.3:7480", "", "c"}} {
		spec := cluster.NodeSpec{Addr: cluster.Addresses{API: n.api, Raft: n.raft}, FailureDomain: n.domain}
		if _, err := c.RegisterNode(t.Context(), client.RegisterNode{ID: api.NodeID(n.id), NodeSpec: spec, Health: 100}); err != nil {
			t.Fatalf("register %s: %v", n.id, err)
		}
	}
	if _, err := c.CreateVolume(t.Context(), api.CreateVolume{Name: "v1", Size: 4 << 20, PartitionSize: 2 << 20, Replicas: 2}); err != nil {
		t.Fatal(err)
	}
	// n4 comes after the volume: it holds no role and may be removed.
	spec := cluster.NodeSpec{Addr: cluster.Addresses{API: "127.0.0.4:7480"}}
	if _, err := c.RegisterNode(t.Context(), client.RegisterNode{ID: "n4", NodeSpec: spec, Health: 100}); err != nil {
		t.Fatal(err)
	}
	return &env{url: srv.URL}
}

func TestClusterCommands(t *testing.T) {
	e := clusterEnv(t)
	tests := []struct {
		name string
		args []string
		code int
		want []string // in stdout (exit 0) or stderr
		json any      // if set, stdout decodes into it
	}{
		{name: "cluster status", args: []string{"cluster", "status"}, want: []string{"Leader:", "n1 (api 127.0.0.1:", "Asked:", "n1 (Leader)",
			"Healthy:", "yes", "Nodes:", "Volumes:", "1", "4 active", "VOTER  SUFFRAGE  LEADER  STATE   RAFT", "n1     Voter     yes     active"}},
		{name: "cluster status/json", args: []string{"cluster", "status", "-o", "json"}, want: []string{`"leader": "n1"`}, json: &client.ClusterStatus{}},
		{name: "node list", args: []string{"node", "list"}, want: []string{"ID  STATE   HEALTH  ROLES  DOMAIN  API", "n2  active  100     all    b       127.0.0.2:7480   -  "}},
		{name: "node list/json", args: []string{"node", "ls", "-o", "json"}, want: []string{`"id": "n3"`}, json: &[]cluster.Node{}},
		{name: "node show", args: []string{"node", "show", "n1"}, want: []string{"ID:", "n1", "Failure domain:", "a", "Voter:", "Voter, leader: yes", "VOLUME  PARTITION  ROLE"}},
		{name: "node show/json", args: []string{"node", "show", "n2", "-o", "json"}, want: []string{`"grants": [`}, json: &client.NodeView{}},
		{name: "node show unknown", args: []string{"node", "show", "nX"}, code: 1, want: []string{"storctl: node show: ", "nX is not registered"}},
		{name: "node show no id", args: []string{"node", "show"}, code: 2, want: []string{"missing node ID"}},
		{name: "node show bad id", args: []string{"node", "show", "a/b"}, code: 2, want: []string{`invalid node ID "a/b"`}},
		{name: "node drain unknown", args: []string{"node", "drain", "nX"}, code: 1, want: []string{"nX"}},
		{name: "grant list", args: []string{"grant", "list"}, want: []string{"VOLUME  PARTITION  ROLE", "v1      0          primary"}},
		{name: "grant list/json", args: []string{"grant", "list", "--volume", "v1", "-o", "json"}, want: []string{`"role": "primary"`}, json: &[]cluster.Grant{}},
		{name: "grant list bad volume", args: []string{"grant", "list", "--volume", "Bad!"}, code: 2, want: []string{"invalid --volume"}},
		{name: "volume show placement", args: []string{"volume", "show", "v1"}, want: []string{"Replication:", "in-sync replica", "PARTITION  EPOCH  PRIMARY  SECONDARIES", "0          1"}},
		{name: "unknown subcommand", args: []string{"node", "frob"}, code: 2, want: []string{`unknown command "frob"`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := e.storctl(t, tc.args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, stdout, stderr)
			}
			out := stdout
			if tc.code != 0 {
				out = stderr
				if strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
					t.Errorf("stderr is more than one line:\n%s", stderr)
				}
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			if tc.json != nil {
				if err := json.Unmarshal([]byte(stdout), tc.json); err != nil {
					t.Errorf("not JSON: %v\n%s", err, stdout)
				}
			}
		})
	}

	// volume show -o json carries the partitions (placement) next to the API's fields.
	_, stdout, _ := e.storctl(t, "volume", "show", "v1", "-o", "json")
	var pv placedVolume
	if err := json.Unmarshal([]byte(stdout), &pv); err != nil || pv.Name != "v1" || len(pv.Placement) != 2 || len(pv.Placement[0].Members()) != 2 ||
		!strings.Contains(stdout, `"partitions": [`) || !strings.Contains(stdout, `"secondaries": [`) {
		t.Errorf("volume show -o json: %v %+v\n%s", err, pv, stdout)
	}

	// drain, undrain, remove change the map.
	for _, step := range []struct {
		args []string
		want string
	}{
		{[]string{"node", "drain", "n3"}, "node n3 is draining"},
		{[]string{"node", "undrain", "n3"}, "node n3 is active"},
		{[]string{"node", "remove", "n4"}, "removed node n4"},
	} {
		code, stdout, stderr := e.storctl(t, step.args...)
		if code != 0 || !strings.Contains(stdout, step.want) {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want %q", strings.Join(step.args, " "), code, stdout, stderr, step.want)
		}
	}
	if code, _, stderr := e.storctl(t, "node", "show", "n4"); code != 1 || !strings.Contains(stderr, "not registered") {
		t.Errorf("node show n4 after remove: exit %d, %s", code, stderr)
	}
	// A node that holds roles is not removed.
	if code, _, stderr := e.storctl(t, "node", "remove", "n3"); code != 1 || !strings.Contains(stderr, "drain it first") {
		t.Errorf("node remove n3 (holds roles): exit %d, %s", code, stderr)
	}
}

func TestClusterConfigure(t *testing.T) {
	e := clusterEnv(t)
	tests := []struct {
		name string
		args []string
		code int
		want []string // in stdout (exit 0) or stderr
	}{
		{name: "timeouts", args: []string{"--lease-timeout", "1.5s", "--suspect-timeout", "750ms"}, want: []string{
			"Lease timeout:           1.5s", "Suspect timeout:         750ms", "Min health:              20",
			"Default replicas:        3", "Default partition size:  1GiB"}},
		// Later changes keep the earlier ones.
		{name: "defaults", args: []string{"--default-replicas", "2", "--default-partition-size", "2G"}, want: []string{
			"Lease timeout:           1.5s", "Default replicas:        2", "Default partition size:  2GiB"}},
		{name: "min health 0", args: []string{"--min-health", "0"}, want: []string{"Min health:              0", "Suspect timeout:         750ms"}},
		{name: "no flag", code: 2, want: []string{"storctl: cluster configure: nothing to change: give one or more of --lease-timeout"}},
		{name: "zero lease", args: []string{"--lease-timeout", "0"}, code: 2, want: []string{"invalid --lease-timeout 0s: want more than 0"}},
		{name: "negative suspect", args: []string{"--suspect-timeout", "-1s"}, code: 2, want: []string{"invalid --suspect-timeout -1s"}},
		{name: "bad duration", args: []string{"--lease-timeout", "soon"}, code: 2, want: []string{`invalid value "soon" for --lease-timeout`}},
		{name: "bad health", args: []string{"--min-health", "101"}, code: 2, want: []string{"invalid --min-health 101: want 0 to 100"}},
		{name: "bad replicas", args: []string{"--default-replicas", "0"}, code: 2, want: []string{"invalid --default-replicas 0: want 1 to 7"}},
		{name: "bad size", args: []string{"--default-partition-size", "lots"}, code: 2, want: []string{"invalid default partition size"}},
		{name: "argument", args: []string{"fast"}, code: 2, want: []string{`unexpected argument "fast"`}},
		// The cluster's own rules: refused by the server, one line, exit 1.
		{name: "suspect over lease", args: []string{"--suspect-timeout", "20s"}, code: 1, want: []string{
			"storctl: cluster configure: ", "suspect timeout 20s exceeds lease timeout 1.5s"}},
		{name: "small partitions", args: []string{"--default-partition-size", "4K"}, code: 1, want: []string{"default partition size 4096 below"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := e.storctl(t, append([]string{"cluster", "configure"}, tc.args...)...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, stdout, stderr)
			}
			out := stdout
			if tc.code != 0 {
				out = stderr
				if strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
					t.Errorf("stderr is more than one line:\n%s", stderr)
				}
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}

	// --output json prints the cluster's config as the API answers it
	// (durations in nanoseconds), and cluster status shows the same.
	code, stdout, stderr := e.storctl(t, "cluster", "configure", "--lease-timeout", "2s", "-o", "json")
	var cfg cluster.Config
	if err := json.Unmarshal([]byte(stdout), &cfg); code != 0 || err != nil {
		t.Fatalf("configure -o json: exit %d, %v\n%s%s", code, err, stdout, stderr)
	}
	want := cluster.Config{LeaseTimeout: 2 * time.Second, SuspectTimeout: 750 * time.Millisecond, MinHealth: 0, DefaultPartitionSize: 2 << 30, DefaultReplicas: 2}
	if cfg != want || !strings.Contains(stdout, `"lease_timeout": 2000000000`) {
		t.Errorf("configure -o json: %+v, want %+v\n%s", cfg, want, stdout)
	}
	_, stdout, _ = e.storctl(t, "cluster", "status", "-o", "json")
	var st client.ClusterStatus
	if err := json.Unmarshal([]byte(stdout), &st); err != nil || st.Config != want {
		t.Errorf("status after configure: %v %+v, want %+v", err, st.Config, want)
	}
}

// TestClusterCommandsOnDev: against an API without the cluster routes
// (stord dev), the cluster commands fail with one line and volume show
// prints the volume alone.
func TestClusterCommandsOnDev(t *testing.T) {
	e := newEnv(t)
	code, _, stderr := e.storctl(t, "cluster", "status")
	if code != 1 || !strings.Contains(stderr, "storctl: cluster status:") {
		t.Errorf("cluster status on dev: exit %d, stderr %q", code, stderr)
	}
	code, _, stderr = e.storctl(t, "cluster", "configure", "--lease-timeout", "2s")
	if code != 1 || !strings.Contains(stderr, "storctl: cluster configure:") {
		t.Errorf("cluster configure on dev: exit %d, stderr %q", code, stderr)
	}
	code, stdout, stderr := e.storctl(t, "volume", "show", "vol0")
	if code != 0 || strings.Contains(stdout, "PARTITION") || !strings.Contains(stdout, "vol0") {
		t.Errorf("volume show on dev: exit %d\n%s%s", code, stdout, stderr)
	}
}

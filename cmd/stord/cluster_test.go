package main

// Multi-process tests of `stord run`: scripts/cluster-up starts three real
// nodes, storctl drives them, the leader is SIGKILLed, and
// scripts/cluster-down must leave no process behind. The binaries are
// harness_test.go's (TestMain builds them once).

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
)

// testCluster is a cluster started by scripts/cluster-up in its own dir, on
// its own 127.P.Q.0/24 addresses.
type testCluster struct {
	t      *testing.T
	dir    string
	prefix string // first three octets
	n      int
}

// clusters counts the clusters this process started: each gets its own
// addresses, free of a previous one's lingering sockets.
var clusters int

func startCluster(t *testing.T, n int) *testCluster {
	t.Helper()
	needBinaries(t)
	// An address block of our own, so that a developer's cluster on
	// 127.0.0.11.. and a parallel run do not collide.
	pid := os.Getpid()
	clusters++
	c := &testCluster{t: t, dir: t.TempDir(), prefix: fmt.Sprintf("127.%d.%d", 100+pid%100, (pid/100+clusters)%250+1), n: n}
	t.Cleanup(c.down)
	out := c.up()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if want := "export STOR_API=" + c.api(1); lines[len(lines)-1] != want {
		t.Fatalf("cluster-up's last line is %q, want %q", lines[len(lines)-1], want)
	}
	return c
}

func (c *testCluster) script(name string, args ...string) result {
	c.t.Helper()
	cmd := exec.Command(filepath.Join("..", "..", "scripts", name), args...)
	cmd.Env = append(os.Environ(), "STORD="+stordBin, "STORCTL="+storctlBin, "CLUSTER_IP_PREFIX="+c.prefix,
		"CLUSTER_UP_TIMEOUT=90")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(toolTimeout):
		cmd.Process.Kill()
		err = fmt.Errorf("%s timed out: %w", name, <-done)
	}
	r := result{stdout: out.String(), stderr: errb.String(), err: err}
	if err != nil {
		r.code = -1
		if ee, ok := err.(*exec.ExitError); ok {
			r.code = ee.ExitCode()
		}
	}
	return r
}

// up runs cluster-up and returns its stdout.
func (c *testCluster) up() string {
	c.t.Helper()
	r := c.script("cluster-up", strconv.Itoa(c.n), c.dir)
	if r.err != nil {
		c.t.Fatalf("cluster-up: %v\n%s\n%s\n%s", r.err, r.stdout, r.stderr, c.logs())
	}
	return r.stdout
}

// down runs cluster-down and checks that no node process is left.
func (c *testCluster) down() {
	c.t.Helper()
	pids := c.pids()
	r := c.script("cluster-down", c.dir)
	if r.err != nil {
		c.t.Errorf("cluster-down: %v\n%s\n%s", r.err, r.stdout, r.stderr)
	}
	for node, pid := range pids {
		if processAlive(pid) {
			c.t.Errorf("%s (pid %d) is still running after cluster-down", node, pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(c.dir, "n*.pid")); len(m) > 0 {
		c.t.Errorf("cluster-down left pid files: %v", m)
	}
	for i := 1; i <= c.n; i++ {
		data, _ := os.ReadFile(filepath.Join(c.dir, fmt.Sprintf("n%d.log", i)))
		for _, bad := range []string{"WARNING: DATA RACE", "panic:", "fatal error:"} {
			if j := bytes.Index(data, []byte(bad)); j >= 0 {
				c.t.Errorf("n%d.log has %q:\n%s", i, bad, data[j:min(len(data), j+4000)])
			}
		}
	}
}

// pids reads the pid files.
func (c *testCluster) pids() map[string]int {
	out := map[string]int{}
	for i := 1; i <= c.n; i++ {
		b, err := os.ReadFile(filepath.Join(c.dir, fmt.Sprintf("n%d.pid", i)))
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			out[fmt.Sprintf("n%d", i)] = pid
		}
	}
	return out
}

// processAlive reports whether pid runs (a zombie does not).
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}

func (c *testCluster) ip(i int) string  { return fmt.Sprintf("%s.%d", c.prefix, 10+i) }
func (c *testCluster) api(i int) string { return "http://" + c.ip(i) + ":7480" }

// storctl runs storctl against node i.
func (c *testCluster) storctl(i int, args ...string) result {
	c.t.Helper()
	return runCmd(c.t, storctlBin, append([]string{"--api", c.api(i), "--timeout", "5s"}, args...)...)
}

// mustJSON runs storctl -o json against node i and decodes its answer.
func (c *testCluster) mustJSON(i int, out any, args ...string) {
	c.t.Helper()
	r := c.storctl(i, append([]string{"-o", "json"}, args...)...)
	if r.err != nil {
		c.t.Fatalf("storctl %s: %v\n%s%s\n%s", strings.Join(args, " "), r.err, r.stdout, r.stderr, c.logs())
	}
	if err := json.Unmarshal([]byte(r.stdout), out); err != nil {
		c.t.Fatalf("storctl %s: %v\n%s", strings.Join(args, " "), err, r.stdout)
	}
}

// logs is the end of every node's log, for failure messages.
func (c *testCluster) logs() string {
	var b strings.Builder
	for i := 1; i <= c.n; i++ {
		data, _ := os.ReadFile(filepath.Join(c.dir, fmt.Sprintf("n%d.log", i)))
		if len(data) > 3000 {
			data = data[len(data)-3000:]
		}
		fmt.Fprintf(&b, "--- n%d.log\n%s\n", i, data)
	}
	return b.String()
}

// TestClusterFailover: three nodes by cluster-up; storctl sees the leader,
// three voters and three active nodes and creates volumes; after SIGKILL
// of the leader, volume create works again within seconds through a
// survivor; cluster-up restarts the killed node, which rejoins; after
// cluster-down and cluster-up every volume is still there.
func TestClusterFailover(t *testing.T) {
	c := startCluster(t, 3)

	var st client.ClusterStatus
	c.mustJSON(2, &st, "cluster", "status")
	if st.Leader == "" || len(st.Voters) != 3 || !st.Healthy {
		t.Fatalf("cluster status: leader %q, %d voters, healthy %v; want a leader, 3 voters, healthy", st.Leader, len(st.Voters), st.Healthy)
	}
	checkNodes(t, c, 1, 3)

	var v struct {
		api.Volume
		Placement []cluster.Partition `json:"partitions"`
	}
	c.mustJSON(3, &v, "volume", "create", "v1", "--size", "8M", "--partition-size", "4M", "--replicas", "3")
	c.mustJSON(1, &v, "volume", "show", "v1")
	if v.Name != "v1" || v.Partitions != 2 || len(v.Placement) != 2 {
		t.Fatalf("volume show v1: %+v", v)
	}
	for _, p := range v.Placement {
		if len(p.Members()) != 3 || p.Epoch == 0 {
			t.Errorf("partition %d placed on %v at epoch %d: want 3 distinct nodes, epoch > 0", p.Index, p.Members(), p.Epoch)
		}
	}
	var vols []api.Volume
	c.mustJSON(2, &vols, "volume", "list")
	if len(vols) != 1 || vols[0].Name != "v1" {
		t.Fatalf("volume list: %+v", vols)
	}

	// SIGKILL the leader; a survivor must create a volume within seconds.
	leader := string(st.Leader)
	li, _ := strconv.Atoi(strings.TrimPrefix(leader, "n"))
	survivor := li%3 + 1
	pid := c.pids()[leader]
	if pid == 0 {
		t.Fatalf("no pid file for the leader %s", leader)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	const bound = 15 * time.Second
	for {
		r := c.storctl(survivor, "volume", "create", "v2", "--size", "1M", "--replicas", "2")
		if r.err == nil {
			break
		}
		if time.Since(start) > bound {
			t.Fatalf("volume create through n%d still failing %v after SIGKILL of leader %s: %s\n%s", survivor, bound, leader, r.stderr, c.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
	took := time.Since(start)
	t.Logf("leader %s SIGKILLed: volume create through n%d worked again after %v", leader, survivor, took.Round(time.Millisecond))
	c.mustJSON(survivor, &st, "cluster", "status")
	if st.Leader == "" || string(st.Leader) == leader {
		t.Errorf("after the kill the leader is %q, want another node than %s", st.Leader, leader)
	}

	// cluster-up restarts only the killed node, which rejoins.
	before := c.pids()
	c.up()
	after := c.pids()
	for node, p := range before {
		if node != leader && after[node] != p {
			t.Errorf("cluster-up restarted %s (pid %d -> %d), which was running", node, p, after[node])
		}
	}
	if after[leader] == pid {
		t.Errorf("cluster-up did not restart %s", leader)
	}
	c.mustJSON(li, &st, "cluster", "status")
	if len(st.Voters) != 3 || !st.Healthy {
		t.Errorf("after the restart: %d voters, healthy %v; want 3, true", len(st.Voters), st.Healthy)
	}
	checkNodes(t, c, survivor, 3)
	c.mustJSON(li, &vols, "volume", "list")
	if len(vols) != 2 {
		t.Errorf("after the restart: %d volumes, want 2 (v1, v2): %+v", len(vols), vols)
	}

	// Every node stopped and started again: nothing committed is lost.
	c.down()
	c.up()
	checkNodes(t, c, 2, 3)
	c.mustJSON(3, &vols, "volume", "list")
	if len(vols) != 2 || vols[0].Name != "v1" || vols[1].Name != "v2" {
		t.Errorf("after a full restart: %+v, want v1 and v2", vols)
	}
}

// checkNodes requires n active nodes n1..nN as node i sees them.
func checkNodes(t *testing.T, c *testCluster, i, n int) {
	t.Helper()
	var nodes []cluster.Node
	c.mustJSON(i, &nodes, "node", "list")
	if len(nodes) != n {
		t.Fatalf("node list: %d nodes, want %d: %+v", len(nodes), n, nodes)
	}
	for k, nd := range nodes {
		if want := fmt.Sprintf("n%d", k+1); string(nd.ID) != want || nd.State != cluster.StateActive || nd.Addr.API != c.ip(k+1)+":7480" {
			t.Errorf("node %d: %s %s at %s; want %s active at %s:7480", k, nd.ID, nd.State, nd.Addr.API, want, c.ip(k+1))
		}
	}
}

// TestClusterBadInput: an unknown node id, a join to an address where no
// control plane answers, and a node id reused with other addresses get
// clear errors and leave the map as it was.
func TestClusterBadInput(t *testing.T) {
	c := startCluster(t, 3)

	r := c.storctl(1, "node", "show", "nX")
	if r.code != 1 || !strings.Contains(r.stderr, "nX") || !strings.Contains(r.stderr, "not registered") {
		t.Errorf("node show nX: exit %d, stderr %q; want exit 1 naming nX as not registered", r.code, r.stderr)
	}
	for _, verb := range []string{"drain", "undrain", "remove"} {
		if r := c.storctl(2, "node", verb, "nX"); r.code != 1 || !strings.Contains(r.stderr, "nX") {
			t.Errorf("node %s nX: exit %d, stderr %q; want exit 1 naming nX", verb, r.code, r.stderr)
		}
	}

	// A join to a wrong address.
	start := time.Now()
	r = runCmd(t, stordBin, "run", "--node-id", "n9", "--data", filepath.Join(t.TempDir(), "n9"),
		"--api-listen", c.ip(9)+":7480", "--join", "http://127.0.0.1:1", "--join-timeout", "2s")
	if r.code == 0 || !strings.Contains(r.stderr, "cannot join") || !strings.Contains(r.stderr, "127.0.0.1:1") {
		t.Errorf("stord run --join http://127.0.0.1:1: exit %d, stderr:\n%s\nwant a failure naming the join address", r.code, r.stderr)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("a join to a wrong address took %v to fail", d)
	}

	// n2 again, from another address and a fresh data dir.
	r = runCmd(t, stordBin, "run", "--node-id", "n2", "--data", filepath.Join(t.TempDir(), "n2"),
		"--api-listen", c.ip(8)+":7480", "--join", c.api(1), "--join-timeout", "20s")
	if r.code == 0 || !strings.Contains(r.stderr, "n2") || !strings.Contains(r.stderr, "in use") {
		t.Errorf("stord run --node-id n2 from %s: exit %d, stderr:\n%s\nwant a failure saying n2 is in use", c.ip(8), r.code, r.stderr)
	}

	// The map is as it was: n1..n3 active at their addresses, 3 voters.
	checkNodes(t, c, 3, 3)
	var st client.ClusterStatus
	c.mustJSON(1, &st, "cluster", "status")
	if len(st.Voters) != 3 || !st.Healthy {
		t.Errorf("cluster status after bad input: %d voters, healthy %v", len(st.Voters), st.Healthy)
	}
	for _, v := range st.Voters {
		if i, _ := strconv.Atoi(strings.TrimPrefix(string(v.ID), "n")); v.Raft != fmt.Sprintf("%s:7481", c.ip(i)) {
			t.Errorf("voter %s at %s, want %s:7481", v.ID, v.Raft, c.ip(i))
		}
	}
}

// TestClusterNonVoter: a node without the control role registers through
// --join, heartbeats, answers /v1/status itself, and does not vote.
func TestClusterNonVoter(t *testing.T) {
	c := startCluster(t, 3)
	cmd := exec.Command(stordBin, "run", "--node-id", "n4", "--roles", "sled", "--data", filepath.Join(t.TempDir(), "n4"),
		"--api-listen", c.ip(4)+":7480", "--join", c.api(1)+","+c.api(2))
	var errb lockedBuffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("n4 exited with %v after SIGTERM:\n%s", err, errb.String())
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Errorf("n4 did not stop within 30s of SIGTERM:\n%s", errb.String())
		}
	}()

	waitFor(t, "n4 active", 30*time.Second, func() bool {
		r := c.storctl(2, "-o", "json", "node", "show", "n4")
		var v client.NodeView
		return r.err == nil && json.Unmarshal([]byte(r.stdout), &v) == nil && v.State == cluster.StateActive
	})
	var v client.NodeView
	c.mustJSON(3, &v, "node", "show", "n4")
	if v.Voter != nil || len(v.Roles) != 1 || v.Roles[0] != "sled" || v.Addr.Raft != "" {
		t.Errorf("node show n4: voter %v, roles %v, raft %q; want no voter, roles [sled], no raft address", v.Voter, v.Roles, v.Addr.Raft)
	}
	// Healthy once its heartbeat was acknowledged.
	var st api.Status
	waitFor(t, "n4 healthy in its own status", 30*time.Second, func() bool {
		r := runCmd(t, storctlBin, "--api", "http://"+c.ip(4)+":7480", "-o", "json", "status")
		return json.Unmarshal([]byte(r.stdout), &st) == nil && st.Node == "n4" && st.Healthy
	})
	if r := runCmd(t, storctlBin, "--api", "http://"+c.ip(4)+":7480", "volume", "list"); r.code != 1 || !strings.Contains(r.stderr, "no control role") {
		t.Errorf("volume list on n4: exit %d, %s; want a clear refusal", r.code, r.stderr)
	}
	var cs client.ClusterStatus
	c.mustJSON(1, &cs, "cluster", "status")
	if len(cs.Voters) != 3 {
		t.Errorf("%d voters with n4 in, want 3", len(cs.Voters))
	}
}

// TestRunFlags: `stord run` refuses a wrong command line with one clear
// error before it starts anything.
func TestRunFlags(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "bad.json")
	os.WriteFile(cfg, []byte(`{"node-id": "n1", "colour": "red"}`), 0o644)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--data", dir, "--bootstrap"}, "--node-id is required"},
		{[]string{"run", "--node-id", "n1", "--bootstrap"}, "--data is required"},
		{[]string{"run", "--node-id", "n1", "--data", dir}, "give --bootstrap"},
		{[]string{"run", "--node-id", "n1", "--data", dir, "--bootstrap", "--roles", "head,disk"}, `unknown role "disk"`},
		{[]string{"run", "--node-id", "n1", "--data", dir, "--bootstrap", "--roles", "head"}, "--bootstrap needs the control role"},
		{[]string{"run", "--node-id", "n1", "--data", dir, "--bootstrap", "--api-listen", "0.0.0.0:7480"}, "not a wildcard"},
		{[]string{"run", "--node-id", "n1", "--data", dir, "--join", "nohost"}, "want http://HOST:PORT"},
		{[]string{"run", "--node-id", "a/b", "--data", dir, "--bootstrap"}, "--node-id"},
		{[]string{"run", "--config", cfg, "--data", dir, "--bootstrap"}, `unknown key "colour"`},
		{[]string{"run", "--config", filepath.Join(dir, "none.json")}, "--config"},
	} {
		var out, errb bytes.Buffer
		code := run(tc.args, &out, &errb)
		if code == 0 || !strings.Contains(errb.String(), tc.want) || strings.Count(strings.TrimSpace(errb.String()), "\n") > 0 {
			t.Errorf("stord %s: exit %d, stderr %q; want one line containing %q", strings.Join(tc.args, " "), code, errb.String(), tc.want)
		}
	}
}

// TestRunConfigFile: keys of --config set the flags the command line left
// alone.
func TestRunConfigFile(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "n1.json")
	os.WriteFile(cfg, []byte(`{"node-id": "n1", "roles": ["control", "head"], "bootstrap": true, "join-timeout": "3s", "api-listen": "127.0.0.5:1"}`), 0o644)
	cmd := runCommand(&bytes.Buffer{}, &bytes.Buffer{})
	fs := cmd.Flags()
	if err := fs.Parse([]string{"--api-listen", "127.0.0.9:7480"}); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(fs, cfg); err != nil {
		t.Fatal(err)
	}
	get := func(name string) string { return fs.Lookup(name).Value.String() }
	for name, want := range map[string]string{
		"node-id": "n1", "roles": "[control,head]", "bootstrap": "true", "join-timeout": "3s",
		"api-listen": "127.0.0.9:7480", // the command line wins
	} {
		if got := get(name); got != want {
			t.Errorf("--%s = %q, want %q", name, got, want)
		}
	}
}

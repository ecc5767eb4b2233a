package client

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/ctl/control"
)

// TestClusterTypesMirrorControl: control's answers, with every field set,
// decode into this package's mirrors with no unknown field and encode back
// to the same JSON.
func TestClusterTypesMirrorControl(t *testing.T) {
	voter := control.Voter{ID: "n1", Raft: "127.0.0.11:7481", Suffrage: "Voter", Leader: true}
	status := control.ClusterStatus{
		Leader: "n1", LeaderAPI: "127.0.0.11:7480", Node: "n2", State: "Follower", Term: 3,
		CommitIndex: 10, AppliedIndex: 9, LastContact: "1ms",
		Voters:  []control.StatusVoter{{Voter: voter, API: "127.0.0.11:7480", State: cluster.StateActive}},
		Healthy: true, Nodes: map[string]int{"active": 3}, Volumes: 2, Work: 1,
		Config: cluster.DefaultConfig(), Time: time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC), Errors: []string{"x"},
	}
	view := control.NodeView{
		Node: cluster.Node{ID: "n1", NodeSpec: cluster.NodeSpec{Addr: cluster.Addresses{API: "a", Raft: "r", NBD: "n", Peer: "p", ISCSI: "i"},
			Roles: []string{"control"}, FailureDomain: "rack1", Capacity: 5}, State: cluster.StateActive, Drained: true, Late: true, Health: 90},
		Sled:   &cluster.Sled{Node: "n1", Devices: []cluster.Device{{Path: "/d", Capacity: 1, Used: 1}}},
		Grants: []cluster.Grant{{Volume: "v", Partition: 1, Role: cluster.RolePrimary, Node: "n1", Epoch: 2, InSync: true}},
		Voter:  &voter,
	}
	for _, c := range []struct {
		from any
		into any
	}{{status, &ClusterStatus{}}, {view, &NodeView{}},
		{control.GrantRequest{Volume: "v", Partition: 2, Role: cluster.RolePrimary, Node: "n1", Epoch: 3, Force: true}, &GrantRequest{}},
		{control.InSyncRequest{Volume: "v", Partition: 2, Node: "n1", Epoch: 3, InSync: []api.NodeID{"n1", "n2"}}, &InSyncRequest{}},
		{control.ConfigureRequest{LeaseTimeout: ptr("1.5s"), SuspectTimeout: ptr("750ms"), MinHealth: ptr(0),
			DefaultPartitionSize: ptr(int64(1 << 30)), DefaultReplicas: ptr(2)}, &ConfigureCluster{}}} {
		want, err := json.Marshal(c.from)
		if err != nil {
			t.Fatal(err)
		}
		dec := json.NewDecoder(bytes.NewReader(want))
		dec.DisallowUnknownFields()
		if err := dec.Decode(c.into); err != nil {
			t.Fatalf("%T into %T: %v", c.from, c.into, err)
		}
		got, err := json.Marshal(reflect.ValueOf(c.into).Elem().Interface())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%T round trip:\n got %s\nwant %s", c.from, got, want)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// TestConfigureClusterEncoding: zero fields are left out (the cluster keeps
// them), min_health 0 is sent, durations are Go duration strings.
func TestConfigureClusterEncoding(t *testing.T) {
	for _, c := range []struct {
		req  ConfigureCluster
		want string
	}{
		{ConfigureCluster{}, `{}`},
		{ConfigureCluster{LeaseTimeout: Duration(1500 * time.Millisecond)}, `{"lease_timeout":"1.5s"}`},
		{ConfigureCluster{SuspectTimeout: Duration(750 * time.Millisecond), MinHealth: ptr(0)}, `{"suspect_timeout":"750ms","min_health":0}`},
		{ConfigureCluster{DefaultPartitionSize: 1 << 30, DefaultReplicas: 2}, `{"default_partition_size":1073741824,"default_replicas":2}`},
	} {
		got, err := json.Marshal(c.req)
		if err != nil || string(got) != c.want {
			t.Errorf("%+v: %s %v, want %s", c.req, got, err, c.want)
		}
	}
	var d Duration
	if err := json.Unmarshal([]byte(`"2m30s"`), &d); err != nil || time.Duration(d) != 150*time.Second {
		t.Errorf("unmarshal 2m30s: %v %v", time.Duration(d), err)
	}
	for _, bad := range []string{`1500000000`, `"soon"`, `""`} {
		if err := json.Unmarshal([]byte(bad), &d); err == nil {
			t.Errorf("unmarshal %s: no error", bad)
		}
	}
}

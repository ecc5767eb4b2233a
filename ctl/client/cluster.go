package client

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// Cluster routes (ctl/control's Cluster API table). The answer types below
// mirror ctl/control's JSON field for field, so that this package (and
// storctl) need not link the Raft wiring; a test in this package checks that
// they decode control's answers with no unknown field.

// ClusterStatus is the answer of GET /v1/cluster/status: the view of the
// node asked.
type ClusterStatus struct {
	Leader       api.NodeID     `json:"leader"` // "" when no leader is known
	LeaderAPI    string         `json:"leader_api,omitempty"`
	Node         api.NodeID     `json:"node"`  // the node answering
	State        string         `json:"state"` // its raft state: Leader, Follower, Candidate
	Term         uint64         `json:"term"`
	CommitIndex  uint64         `json:"commit_index"`
	AppliedIndex uint64         `json:"applied_index"`
	LastContact  string         `json:"last_contact,omitempty"`
	Voters       []Voter        `json:"voters"`
	Healthy      bool           `json:"healthy"`
	Nodes        map[string]int `json:"nodes"` // registered nodes by state
	Volumes      int            `json:"volumes"`
	Work         int            `json:"work"`
	Config       cluster.Config `json:"config"`
	Time         time.Time      `json:"time"`
	Errors       []string       `json:"errors,omitempty"`
}

// Voter is one server of the raft configuration, with its map state when
// the answer carries it.
type Voter struct {
	ID       api.NodeID    `json:"id"`
	Raft     string        `json:"raft"`
	Suffrage string        `json:"suffrage"` // Voter, Nonvoter, Staging
	Leader   bool          `json:"leader"`
	API      string        `json:"api,omitempty"`
	State    cluster.State `json:"node_state,omitempty"`
}

// NodeView is the answer of GET /v1/nodes/{id}.
type NodeView struct {
	cluster.Node
	Sled   *cluster.Sled   `json:"sled,omitempty"`
	Grants []cluster.Grant `json:"grants"`
	Voter  *Voter          `json:"voter,omitempty"`
}

// RegisterNode is the body of POST /v1/nodes.
type RegisterNode struct {
	ID api.NodeID `json:"id"`
	cluster.NodeSpec
	Health int `json:"health,omitempty"`
}

// ClusterStatus answers GET /v1/cluster/status.
func (c *Client) ClusterStatus(ctx context.Context) (ClusterStatus, error) {
	var st ClusterStatus
	err := c.do(ctx, http.MethodGet, "/v1/cluster/status", nil, &st)
	return st, err
}

// Nodes answers GET /v1/nodes.
func (c *Client) Nodes(ctx context.Context) ([]cluster.Node, error) {
	out := []cluster.Node{}
	if err := c.do(ctx, http.MethodGet, "/v1/nodes", nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Node answers GET /v1/nodes/{id}.
func (c *Client) Node(ctx context.Context, id api.NodeID) (NodeView, error) {
	var v NodeView
	err := c.do(ctx, http.MethodGet, nodePath(id), nil, &v)
	return v, err
}

// RegisterNode calls POST /v1/nodes. Registering again with the same
// addresses wraps api.ErrExists; the same id with other addresses wraps
// api.ErrInUse.
func (c *Client) RegisterNode(ctx context.Context, req RegisterNode) (cluster.Node, error) {
	var n cluster.Node
	err := c.do(ctx, http.MethodPost, "/v1/nodes", req, &n)
	return n, err
}

// DrainNode calls POST /v1/nodes/{id}/drain.
func (c *Client) DrainNode(ctx context.Context, id api.NodeID) (cluster.Node, error) {
	var n cluster.Node
	err := c.do(ctx, http.MethodPost, nodePath(id)+"/drain", nil, &n)
	return n, err
}

// UndrainNode calls POST /v1/nodes/{id}/undrain.
func (c *Client) UndrainNode(ctx context.Context, id api.NodeID) (cluster.Node, error) {
	var n cluster.Node
	err := c.do(ctx, http.MethodPost, nodePath(id)+"/undrain", nil, &n)
	return n, err
}

// RemoveNode calls DELETE /v1/nodes/{id}: the node leaves the map and the
// raft group.
func (c *Client) RemoveNode(ctx context.Context, id api.NodeID) error {
	return c.do(ctx, http.MethodDelete, nodePath(id), nil, nil)
}

// Grants answers GET /v1/grants, filtered by node and volume when set.
func (c *Client) Grants(ctx context.Context, node api.NodeID, volume string) ([]cluster.Grant, error) {
	q := url.Values{}
	if node != "" {
		q.Set("node", string(node))
	}
	if volume != "" {
		q.Set("volume", volume)
	}
	p := "/v1/grants"
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	out := []cluster.Grant{}
	if err := c.do(ctx, http.MethodGet, p, nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// ClusterVolume answers GET /v1/cluster/volumes/{name}: the volume with the
// placement of its partitions.
func (c *Client) ClusterVolume(ctx context.Context, name string) (cluster.Volume, error) {
	var v cluster.Volume
	err := c.do(ctx, http.MethodGet, "/v1/cluster/volumes/"+url.PathEscape(name), nil, &v)
	return v, err
}

// ClusterVolumes answers GET /v1/cluster/volumes: every volume with the
// placement of its partitions, sorted by name.
func (c *Client) ClusterVolumes(ctx context.Context) ([]cluster.Volume, error) {
	out := []cluster.Volume{}
	if err := c.do(ctx, http.MethodGet, "/v1/cluster/volumes", nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// GrantRequest is the body of POST /v1/grants (acquire), /v1/grants/release,
// /v1/grants/bless and /v1/grants/unbless (mirrors ctl/control's).
type GrantRequest struct {
	Volume    string          `json:"volume"`
	Partition api.PartitionID `json:"partition"`
	Role      cluster.Role    `json:"role,omitempty"`
	Node      api.NodeID      `json:"node"`
	Epoch     api.Epoch       `json:"epoch,omitempty"` // bless; acquire by the primary: leave this epoch
	Force     bool            `json:"force,omitempty"` // release
}

// InSyncRequest is the body of POST /v1/grants/in-sync (mirrors ctl/control's).
type InSyncRequest struct {
	Volume    string          `json:"volume"`
	Partition api.PartitionID `json:"partition"`
	Node      api.NodeID      `json:"node"` // the primary
	Epoch     api.Epoch       `json:"epoch"`
	InSync    []api.NodeID    `json:"in_sync"`
}

// Acquire calls POST /v1/grants: the role for req.Node (see ctl/cluster's
// grant rules; a refusal because another node holds it wraps api.ErrInUse).
func (c *Client) Acquire(ctx context.Context, req GrantRequest) (cluster.Grant, error) {
	var g cluster.Grant
	err := c.do(ctx, http.MethodPost, "/v1/grants", req, &g)
	return g, err
}

// Release calls POST /v1/grants/release.
func (c *Client) Release(ctx context.Context, req GrantRequest) (cluster.Grant, error) {
	var g cluster.Grant
	err := c.do(ctx, http.MethodPost, "/v1/grants/release", req, &g)
	return g, err
}

// Bless calls POST /v1/grants/bless: a solo blessing for the primary
// req.Node at req.Epoch.
func (c *Client) Bless(ctx context.Context, req GrantRequest) (cluster.Blessing, error) {
	var b cluster.Blessing
	err := c.do(ctx, http.MethodPost, "/v1/grants/bless", req, &b)
	return b, err
}

// SetInSync calls POST /v1/grants/in-sync: the primary reports its in-sync
// set for its epoch. It answers the volume as changed.
func (c *Client) SetInSync(ctx context.Context, req InSyncRequest) (cluster.Volume, error) {
	var v cluster.Volume
	err := c.do(ctx, http.MethodPost, "/v1/grants/in-sync", req, &v)
	return v, err
}

// ConfigureCluster is the body of POST /v1/cluster/config (mirrors
// ctl/control's ConfigureRequest): the settings to change. A zero field
// keeps the cluster's value (zero is no valid value for any of them); so
// does a nil MinHealth, for which 0 is a value.
type ConfigureCluster struct {
	LeaseTimeout         Duration `json:"lease_timeout,omitempty"`   // a node is dead after this long without a heartbeat
	SuspectTimeout       Duration `json:"suspect_timeout,omitempty"` // isolating after this long
	MinHealth            *int     `json:"min_health,omitempty"`      // isolating below this score, 0..100
	DefaultPartitionSize int64    `json:"default_partition_size,omitempty"`
	DefaultReplicas      int      `json:"default_replicas,omitempty"`
}

// Duration is a time.Duration whose JSON is a Go duration string ("1.5s"),
// as POST /v1/cluster/config takes it.
type Duration time.Duration

// MarshalJSON encodes d as its time.Duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON decodes a Go duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("client: duration: want a string such as \"1.5s\", got %s", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("client: duration: %w", err)
	}
	*d = Duration(v)
	return nil
}

// ConfigureCluster calls POST /v1/cluster/config: the leader merges req
// into the cluster's config and answers the new one. A value the cluster
// refuses (a timeout not positive, the suspect timeout over the lease, ...)
// wraps api.ErrInvalid.
func (c *Client) ConfigureCluster(ctx context.Context, req ConfigureCluster) (cluster.Config, error) {
	var cfg cluster.Config
	err := c.do(ctx, http.MethodPost, "/v1/cluster/config", req, &cfg)
	return cfg, err
}

func nodePath(id api.NodeID) string { return "/v1/nodes/" + url.PathEscape(string(id)) }

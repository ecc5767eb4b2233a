// Package cluster is the cluster map of stor and the commands that change it:
// a pure, deterministic state machine. It does no I/O and reads no clock;
// time enters as a field of each command, set by whoever proposes it (the
// Raft leader). ctl/control replicates commands through Raft and applies
// them here on every voter, so every voter holds the same Map.
//
// # Model
//
// The Map holds nodes, sleds and their devices, volumes with their
// partitions and replica sets, re-placement work, and snapshots:
//
//	Map
//	 ├─ Config      lease and suspect timeouts, minimum health, defaults
//	 ├─ Nodes[id]   addresses, roles, failure domain, capacity, state, health
//	 ├─ Sleds[id]   devices (path, capacity, used)
//	 ├─ Volumes[name]
//	 │    └─ Partitions[i]  epoch, primary, secondaries, reserves,
//	 │                      in-sync set, solo blessing
//	 ├─ Work        re-placement work recorded for the replication layer
//	 └─ Snapshots[name]
//
// # Rules
//
//   - Apply validates every command before it changes anything: a command that
//     fails leaves the Map exactly as it was. Errors wrap api.ErrInvalid,
//     api.ErrExists, api.ErrNotFound, api.ErrInUse or api.ErrNoSpace.
//   - Apply is deterministic: the same Map and the same command give the same
//     result on every voter (Go map order never decides anything).
//   - Grants. The replica set of a partition is its grant table: the holder of
//     the primary role, Replicas-1 secondary slots, Reserves reserve slots.
//     The first request for a free role wins; later requests are refused with
//     a *HeldError naming the holder, until the holder releases it or is
//     declared dead. A repeated request by the holder is answered again
//     (idempotent). The epoch rises every time the primary role is given to
//     a node; it never falls.
//   - A node may take the primary role only if it is in the partition's
//     in-sync set (when that set is not empty): a replica that may lack
//     acknowledged writes never serves. When a primary dies and no other
//     replica is in sync, it keeps the role (the partition waits for it).
//   - The in-sync set is reported by the primary, for its current epoch, and
//     is always a subset of the replica set that includes the primary.
//   - Solo blessing: granted to the primary for its current epoch only when no
//     other replica is in sync; revoked when a peer is reported in sync again
//     or the epoch moves.
//   - Membership: a node registers once (a second registration of the same id
//     and addresses is ErrExists; the same id with other addresses is
//     ErrInUse), then heartbeats with its health score. Tick(now) marks a node
//     isolating when it missed heartbeats for SuspectTimeout, dead after
//     LeaseTimeout (a configure that shortens them judges by the old ones
//     for ConfigSettle); a dead node's roles are released and its replicas are
//     re-placed (recorded as Work). A heartbeat revives a node. Drain/undrain
//     set the operator's draining state. State, in order of precedence:
//     dead > draining > isolating (late heartbeat or health below MinHealth)
//     > active.
//   - Placement puts a partition's replicas on distinct active head nodes, in
//     distinct failure domains while there are enough, preferring the least
//     used node (by capacity fraction, then bytes placed, then id), and makes
//     the chosen node with the fewest primaries the primary.
//
// Snapshot and restore of the Map are its JSON encoding (Marshal/Unmarshal).
package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"regexp"
	"slices"
	"time"

	"stor.dev/stor/ctl/api"
)

// Errors of this package beyond the api sentinels; each is wrapped together
// with the api sentinel that gives its HTTP status.
var (
	ErrStaleEpoch = errors.New("cluster: stale epoch")
	ErrNotHolder  = errors.New("cluster: not the holder")
)

// State of a node.
type State string

// Node states; see the package doc for their precedence.
const (
	StateActive    State = "active"
	StateIsolating State = "isolating"
	StateDraining  State = "draining"
	StateDead      State = "dead"
)

// Role of a replica in a partition's replica set.
type Role string

// Replica roles.
const (
	RolePrimary   Role = "primary"
	RoleSecondary Role = "secondary"
	RoleReserve   Role = "reserve"
)

// Node roles (processes a node runs).
const (
	NodeRoleControl = "control"
	NodeRoleHead    = "head"
	NodeRoleSled    = "sled"
	NodeRoleExport  = "export"
)

var nodeRoles = []string{NodeRoleControl, NodeRoleHead, NodeRoleSled, NodeRoleExport}

// Addresses a node serves on, each host:port; API is required.
type Addresses struct {
	API   string `json:"api"`
	Peer  string `json:"peer,omitempty"`
	NBD   string `json:"nbd,omitempty"`
	ISCSI string `json:"iscsi,omitempty"`
	Raft  string `json:"raft,omitempty"`
}

func (a Addresses) fields() [5]struct{ name, v string } {
	return [5]struct{ name, v string }{{"api", a.API}, {"peer", a.Peer}, {"nbd", a.NBD}, {"iscsi", a.ISCSI}, {"raft", a.Raft}}
}

// NodeSpec is what a node declares when it registers.
type NodeSpec struct {
	Addr          Addresses `json:"addresses"`
	Roles         []string  `json:"roles,omitempty"` // empty: every role
	FailureDomain string    `json:"failure_domain,omitempty"`
	Capacity      int64     `json:"capacity,omitempty"` // bytes for replicas; 0: unknown
}

// Node is a member of the cluster.
type Node struct {
	ID api.NodeID `json:"id"`
	NodeSpec
	State         State     `json:"state"`
	Drained       bool      `json:"drained,omitempty"` // by an operator
	Late          bool      `json:"late,omitempty"`    // missed heartbeats past SuspectTimeout
	Health        int       `json:"health"`            // 0..100, reported by the node
	Registered    time.Time `json:"registered"`
	LastHeartbeat time.Time `json:"last_heartbeat"`
}

// HasRole reports whether the node runs role r (nodes with no roles run all).
func (n *Node) HasRole(r string) bool {
	return len(n.Roles) == 0 || slices.Contains(n.Roles, r)
}

// Device is one directory of a sled.
type Device struct {
	Path     string `json:"path"`
	Capacity int64  `json:"capacity"`
	Used     int64  `json:"used"`
}

// Sled is the storage of one node.
type Sled struct {
	Node    api.NodeID `json:"node"`
	Devices []Device   `json:"devices"`
}

// Capacity is the sum of the sled's device capacities.
func (s *Sled) Capacity() (c int64) {
	for _, d := range s.Devices {
		c += d.Capacity
	}
	return c
}

// Blessing is a solo blessing: the primary may acknowledge writes with no
// in-sync peer during Epoch.
type Blessing struct {
	Node  api.NodeID `json:"node"`
	Epoch api.Epoch  `json:"epoch"`
	Since time.Time  `json:"since"`
}

// Partition is one replicated LBA range of a volume.
type Partition struct {
	Index       api.PartitionID `json:"index"`
	Epoch       api.Epoch       `json:"epoch"`
	Primary     api.NodeID      `json:"primary,omitempty"`
	Secondaries []api.NodeID    `json:"secondaries,omitempty"`
	Reserves    []api.NodeID    `json:"reserves,omitempty"`
	InSync      []api.NodeID    `json:"in_sync,omitempty"`
	Solo        *Blessing       `json:"solo,omitempty"`
}

// Members lists the primary, secondaries and reserves, in that order.
func (p *Partition) Members() []api.NodeID {
	var m []api.NodeID
	if p.Primary != "" {
		m = append(m, p.Primary)
	}
	m = append(m, p.Secondaries...)
	return append(m, p.Reserves...)
}

// RoleOf returns the role node holds in p, or "".
func (p *Partition) RoleOf(node api.NodeID) Role {
	switch {
	case node == "":
		return ""
	case p.Primary == node:
		return RolePrimary
	case slices.Contains(p.Secondaries, node):
		return RoleSecondary
	case slices.Contains(p.Reserves, node):
		return RoleReserve
	}
	return ""
}

// Volume is a virtual disk and its placement.
type Volume struct {
	Name          string       `json:"name"`
	ID            api.VolumeID `json:"id"`
	Size          int64        `json:"size"`
	BlockSize     int          `json:"block_size"`
	PartitionSize int64        `json:"partition_size"`
	Replicas      int          `json:"replicas"`
	Reserves      int          `json:"reserves,omitempty"`
	Created       time.Time    `json:"created"`
	Partitions    []Partition  `json:"partitions"`
}

// API returns the volume as the HTTP API shows it (without the per-node
// fields: connections, allocated, export addresses).
func (v *Volume) API() api.Volume {
	return api.Volume{
		Name: v.Name, ID: v.ID, Size: v.Size, BlockSize: v.BlockSize,
		PartitionSize: v.PartitionSize, Partitions: len(v.Partitions),
		Replicas: v.Replicas, Created: v.Created, IQN: api.IQN(v.Name),
	}
}

// VolumeSpec is the body of a create-volume command; zero fields take
// defaults (see Config and the package doc).
type VolumeSpec struct {
	Name          string `json:"name"`
	Size          int64  `json:"size"`
	BlockSize     int    `json:"block_size,omitempty"`
	PartitionSize int64  `json:"partition_size,omitempty"`
	Replicas      int    `json:"replicas,omitempty"`
	Reserves      int    `json:"reserves,omitempty"`
}

// Grant is one role held in one partition (derived from replica sets).
type Grant struct {
	Volume    string          `json:"volume"`
	Partition api.PartitionID `json:"partition"`
	Role      Role            `json:"role"`
	Node      api.NodeID      `json:"node"`
	Epoch     api.Epoch       `json:"epoch"`
	InSync    bool            `json:"in_sync"`
}

// Work kinds.
const (
	WorkElect   = "elect"   // the primary is gone: an in-sync replica should take the role
	WorkReplace = "replace" // a replica is gone: Target (if set) was placed to replace it
	WorkShed    = "shed"    // the primary's node is draining: hand the role over
	WorkStuck   = "stuck"   // the primary is dead and no other replica is in sync
)

// Work is re-placement work the control plane recorded for the replication
// layer to carry out.
type Work struct {
	ID        uint64          `json:"id"`
	Kind      string          `json:"kind"`
	Volume    string          `json:"volume"`
	Partition api.PartitionID `json:"partition"`
	Role      Role            `json:"role,omitempty"`
	Lost      api.NodeID      `json:"lost,omitempty"`   // the node that left
	Target    api.NodeID      `json:"target,omitempty"` // the node placed instead
	Created   time.Time       `json:"created"`
}

// Snapshot of a volume (room for the snapshot issue: name and time only).
type Snapshot struct {
	Name    string    `json:"name"`
	Volume  string    `json:"volume"`
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
}

// Config holds the cluster-wide settings.
type Config struct {
	LeaseTimeout         time.Duration `json:"lease_timeout"`   // dead after this long without a heartbeat
	SuspectTimeout       time.Duration `json:"suspect_timeout"` // isolating after this long
	MinHealth            int           `json:"min_health"`      // isolating below this score
	DefaultPartitionSize int64         `json:"default_partition_size"`
	DefaultReplicas      int           `json:"default_replicas"`
}

// DefaultConfig is the Config of a new Map.
func DefaultConfig() Config {
	return Config{
		LeaseTimeout:         10 * time.Second,
		SuspectTimeout:       4 * time.Second,
		MinHealth:            20,
		DefaultPartitionSize: api.DefaultPartitionSize,
		DefaultReplicas:      3,
	}
}

func (c Config) validate() error {
	switch {
	case c.LeaseTimeout <= 0 || c.SuspectTimeout <= 0:
		return fmt.Errorf("%w: timeouts must be positive", api.ErrInvalid)
	case c.SuspectTimeout > c.LeaseTimeout:
		return fmt.Errorf("%w: suspect timeout %v exceeds lease timeout %v", api.ErrInvalid, c.SuspectTimeout, c.LeaseTimeout)
	case c.MinHealth < 0 || c.MinHealth > 100:
		return fmt.Errorf("%w: min health %d not in 0..100", api.ErrInvalid, c.MinHealth)
	case c.DefaultPartitionSize < api.MinPartitionSize:
		return fmt.Errorf("%w: default partition size %d below %d", api.ErrInvalid, c.DefaultPartitionSize, api.MinPartitionSize)
	case c.DefaultReplicas < 1 || c.DefaultReplicas > MaxReplicas:
		return fmt.Errorf("%w: default replicas %d not in 1..%d", api.ErrInvalid, c.DefaultReplicas, MaxReplicas)
	}
	return nil
}

// ConfigSettle is how long after a configure that shortens the lease or
// suspect timeout ticks still judge nodes by the longer, old one: every
// node's agent learns the config within a second and then heartbeats at the
// new period, but until then it may heartbeat at the old one (up to 1s), and
// a live node would be declared late or dead (and lose its replicas) for
// heartbeats it was never told to send faster.
const ConfigSettle = 3 * time.Second

// Limits.
const (
	MaxReplicas   = 7
	MaxReserves   = 4
	MaxPartitions = 1 << 16
)

// Map is the cluster map. Its fields are exported for JSON (snapshots and
// the API); change it only through Apply. A Map is not safe for concurrent
// use: ctl/control serializes Apply and reads.
type Map struct {
	Config    Config               `json:"config"`
	Nodes     map[api.NodeID]*Node `json:"nodes"`
	Sleds     map[api.NodeID]*Sled `json:"sleds"`
	Volumes   map[string]*Volume   `json:"volumes"`
	Snapshots map[string]*Snapshot `json:"snapshots"`
	Work      []Work               `json:"work"`
	Seq       uint64               `json:"seq"` // last id given to a volume, snapshot or work item
	Now       time.Time            `json:"now"` // latest time a command carried
	// Settling is the config before a configure that shortened a
	// timeout, Configured that configure's time: for ConfigSettle after
	// it, ticks judge nodes by the longer of the two (see ConfigSettle).
	Settling   *Config   `json:"settling,omitempty"`
	Configured time.Time `json:"configured,omitempty"`
	Version    uint64    `json:"version"` // successful commands applied
}

// New returns an empty Map with DefaultConfig.
func New() *Map {
	m := &Map{Config: DefaultConfig()}
	m.init()
	return m
}

func (m *Map) init() {
	if m.Nodes == nil {
		m.Nodes = map[api.NodeID]*Node{}
	}
	if m.Sleds == nil {
		m.Sleds = map[api.NodeID]*Sled{}
	}
	if m.Volumes == nil {
		m.Volumes = map[string]*Volume{}
	}
	if m.Snapshots == nil {
		m.Snapshots = map[string]*Snapshot{}
	}
}

// Marshal encodes the Map (the FSM snapshot).
func (m *Map) Marshal() ([]byte, error) { return json.Marshal(m) }

// Unmarshal decodes a Map encoded by Marshal.
func Unmarshal(b []byte) (*Map, error) {
	m := &Map{}
	if err := json.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("cluster: decode map: %w", err)
	}
	m.init()
	return m, nil
}

// Clone returns a deep copy.
func (m *Map) Clone() *Map {
	b, err := m.Marshal()
	if err != nil {
		panic(fmt.Sprintf("cluster: encode map: %v", err)) // plain data: cannot fail
	}
	c, err := Unmarshal(b)
	if err != nil {
		panic(err)
	}
	return c
}

var nodeIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

func checkNodeID(id api.NodeID) error {
	if !nodeIDRE.MatchString(string(id)) {
		return fmt.Errorf("%w: node id %q: use 1-63 of A-Z a-z 0-9 . _ - starting with a letter or digit", api.ErrInvalid, id)
	}
	return nil
}

func checkAddr(name, a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil || port == "" {
		return fmt.Errorf("%w: %s address %q: want host:port", api.ErrInvalid, name, a)
	}
	_ = host
	return nil
}

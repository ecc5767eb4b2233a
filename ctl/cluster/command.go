package cluster

import (
	"encoding/json"
	"fmt"
	"time"

	"stor.dev/stor/ctl/api"
)

// Op names a command.
type Op string

// Commands. The table says which fields of Command each one reads
// (Now is required where marked *).
//
//	op                 fields
//	-----------------  ------------------------------------------------
//	configure          Config
//	register*          Node, Spec
//	heartbeat*         Node, Health
//	tick*              Since (when the proposer became leader), Node (the proposer)
//	drain / undrain    Node
//	remove-node        Node
//	set-sled           Node, Devices
//	create-volume      Create
//	resize-volume      Volume, Size
//	delete-volume      Volume, Force
//	acquire            Volume, Partition, Role, Node, Epoch (primary: the
//	                   holder giving Epoch, the current one, gets a new epoch)
//	release            Volume, Partition, Role, Node, Force
//	set-in-sync        Volume, Partition, Node (the primary), Epoch, Nodes
//	bless              Volume, Partition, Node (the primary), Epoch
//	unbless            Volume, Partition, Node
//	finish-work        Work
//	create-snapshot    Volume, Snapshot
//	delete-snapshot    Snapshot
const (
	OpConfigure      Op = "configure"
	OpRegister       Op = "register"
	OpHeartbeat      Op = "heartbeat"
	OpTick           Op = "tick"
	OpDrain          Op = "drain"
	OpUndrain        Op = "undrain"
	OpRemoveNode     Op = "remove-node"
	OpSetSled        Op = "set-sled"
	OpCreateVolume   Op = "create-volume"
	OpResizeVolume   Op = "resize-volume"
	OpDeleteVolume   Op = "delete-volume"
	OpAcquire        Op = "acquire"
	OpRelease        Op = "release"
	OpSetInSync      Op = "set-in-sync"
	OpBless          Op = "bless"
	OpUnbless        Op = "unbless"
	OpFinishWork     Op = "finish-work"
	OpCreateSnapshot Op = "create-snapshot"
	OpDeleteSnapshot Op = "delete-snapshot"
)

// Command is one change to the Map, JSON-encoded into the Raft log.
type Command struct {
	Op        Op              `json:"op"`
	Now       time.Time       `json:"now,omitzero"`
	Since     time.Time       `json:"since,omitzero"`
	Node      api.NodeID      `json:"node,omitempty"`
	Spec      *NodeSpec       `json:"spec,omitempty"`
	Health    int             `json:"health,omitempty"`
	Devices   []Device        `json:"devices,omitempty"`
	Config    *Config         `json:"config,omitempty"`
	Create    *VolumeSpec     `json:"create,omitempty"`
	Volume    string          `json:"volume,omitempty"`
	Size      int64           `json:"size,omitempty"`
	Partition api.PartitionID `json:"partition,omitempty"`
	Role      Role            `json:"role,omitempty"`
	Epoch     api.Epoch       `json:"epoch,omitempty"`
	Nodes     []api.NodeID    `json:"nodes,omitempty"`
	Work      uint64          `json:"work,omitempty"`
	Snapshot  string          `json:"snapshot,omitempty"`
	Force     bool            `json:"force,omitempty"`
}

// Encode returns the JSON encoding of c.
func (c Command) Encode() ([]byte, error) { return json.Marshal(c) }

// DecodeCommand decodes a Command encoded by Encode.
func DecodeCommand(b []byte) (Command, error) {
	var c Command
	if err := json.Unmarshal(b, &c); err != nil {
		return Command{}, fmt.Errorf("%w: decode command: %v", api.ErrInvalid, err)
	}
	return c, nil
}

// Result is what a command returns; only the fields that apply are set.
// Every pointer is a copy, safe to keep.
type Result struct {
	Node     *Node        `json:"node,omitempty"`
	Volume   *Volume      `json:"volume,omitempty"`
	Grant    *Grant       `json:"grant,omitempty"`
	Blessing *Blessing    `json:"blessing,omitempty"`
	Snapshot *Snapshot    `json:"snapshot,omitempty"`
	Dead     []api.NodeID `json:"dead,omitempty"` // tick: nodes declared dead now
	Work     []Work       `json:"work,omitempty"` // work recorded by this command
}

// HeldError refuses a grant: the role is held by another node.
type HeldError struct {
	Volume    string
	Partition api.PartitionID
	Role      Role
	Holders   []api.NodeID
	Epoch     api.Epoch
}

func (e *HeldError) Error() string {
	return fmt.Sprintf("in use: %s partition %d: %s role held by %v at epoch %d", e.Volume, e.Partition, e.Role, e.Holders, e.Epoch)
}

// Is makes errors.Is(err, api.ErrInUse) hold.
func (e *HeldError) Is(target error) bool { return target == api.ErrInUse }

// Apply applies c to m. On error m is unchanged. Apply must be called by one
// goroutine at a time.
func (m *Map) Apply(c Command) (Result, error) {
	m.init()
	res, err := m.apply(c)
	if err != nil {
		return Result{}, fmt.Errorf("cluster: %s: %w", c.Op, err)
	}
	if c.Now.After(m.Now) {
		m.Now = c.Now
	}
	m.Version++
	return res, nil
}

func (m *Map) apply(c Command) (Result, error) {
	switch c.Op {
	case OpRegister, OpHeartbeat, OpTick:
		if c.Now.IsZero() {
			return Result{}, fmt.Errorf("%w: command carries no time", api.ErrInvalid)
		}
	}
	switch c.Op {
	case OpConfigure:
		return m.configure(c)
	case OpRegister:
		return m.register(c)
	case OpHeartbeat:
		return m.heartbeat(c)
	case OpTick:
		return m.tick(c)
	case OpDrain:
		return m.drain(c, true)
	case OpUndrain:
		return m.drain(c, false)
	case OpRemoveNode:
		return m.removeNode(c)
	case OpSetSled:
		return m.setSled(c)
	case OpCreateVolume:
		return m.createVolume(c)
	case OpResizeVolume:
		return m.resizeVolume(c)
	case OpDeleteVolume:
		return m.deleteVolume(c)
	case OpAcquire:
		return m.acquire(c)
	case OpRelease:
		return m.release(c)
	case OpSetInSync:
		return m.setInSync(c)
	case OpBless:
		return m.bless(c)
	case OpUnbless:
		return m.unbless(c)
	case OpFinishWork:
		return m.finishWork(c)
	case OpCreateSnapshot:
		return m.createSnapshot(c)
	case OpDeleteSnapshot:
		return m.deleteSnapshot(c)
	}
	return Result{}, fmt.Errorf("%w: unknown op %q", api.ErrInvalid, c.Op)
}

func (m *Map) configure(c Command) (Result, error) {
	if c.Config == nil {
		return Result{}, fmt.Errorf("%w: no config", api.ErrInvalid)
	}
	if err := c.Config.validate(); err != nil {
		return Result{}, err
	}
	old := m.Config
	if s := m.Settling; s != nil {
		old.LeaseTimeout, old.SuspectTimeout = max(old.LeaseTimeout, s.LeaseTimeout), max(old.SuspectTimeout, s.SuspectTimeout)
	}
	m.Config = *c.Config
	if m.Config.LeaseTimeout < old.LeaseTimeout || m.Config.SuspectTimeout < old.SuspectTimeout {
		m.Settling, m.Configured = &old, c.Now
	}
	for _, id := range m.nodeIDs() {
		m.Nodes[id].refresh(m.Config)
	}
	return Result{}, nil
}

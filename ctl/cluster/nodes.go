package cluster

import (
	"fmt"
	"slices"
	"sort"
	"time"

	"stor.dev/stor/ctl/api"
)

// refresh recomputes n.State from its flags; dead stays dead until a
// heartbeat clears it.
func (n *Node) refresh(cfg Config) {
	switch {
	case n.State == StateDead:
	case n.Drained:
		n.State = StateDraining
	case n.Late || n.Health < cfg.MinHealth:
		n.State = StateIsolating
	default:
		n.State = StateActive
	}
}

func (n *Node) clone() *Node {
	c := *n
	c.Roles = slices.Clone(n.Roles)
	return &c
}

func (m *Map) nodeIDs() []api.NodeID {
	ids := make([]api.NodeID, 0, len(m.Nodes))
	for id := range m.Nodes {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

func (m *Map) node(id api.NodeID) (*Node, error) {
	if id == "" {
		return nil, fmt.Errorf("%w: no node id", api.ErrInvalid)
	}
	n, ok := m.Nodes[id]
	if !ok {
		return nil, fmt.Errorf("%w: node %s is not registered", api.ErrNotFound, id)
	}
	return n, nil
}

func (m *Map) register(c Command) (Result, error) {
	if err := checkNodeID(c.Node); err != nil {
		return Result{}, err
	}
	if c.Spec == nil {
		return Result{}, fmt.Errorf("%w: node %s: no node spec", api.ErrInvalid, c.Node)
	}
	s := *c.Spec
	if s.Addr.API == "" {
		return Result{}, fmt.Errorf("%w: node %s: no api address", api.ErrInvalid, c.Node)
	}
	for _, f := range s.Addr.fields() {
		if f.v == "" {
			continue
		}
		if err := checkAddr(f.name, f.v); err != nil {
			return Result{}, fmt.Errorf("node %s: %w", c.Node, err)
		}
	}
	for _, r := range s.Roles {
		if !slices.Contains(nodeRoles, r) {
			return Result{}, fmt.Errorf("%w: node %s: unknown role %q (want %v)", api.ErrInvalid, c.Node, r, nodeRoles)
		}
	}
	if s.Capacity < 0 {
		return Result{}, fmt.Errorf("%w: node %s: negative capacity", api.ErrInvalid, c.Node)
	}
	if old, ok := m.Nodes[c.Node]; ok {
		if old.Addr == s.Addr {
			return Result{}, fmt.Errorf("%w: node %s is already registered", api.ErrExists, c.Node)
		}
		return Result{}, fmt.Errorf("%w: node id %s is registered with addresses %+v, not %+v", api.ErrInUse, c.Node, old.Addr, s.Addr)
	}
	for _, id := range m.nodeIDs() {
		o := m.Nodes[id]
		of, nf := o.Addr.fields(), s.Addr.fields()
		for i := range nf {
			if nf[i].v != "" && nf[i].v == of[i].v {
				return Result{}, fmt.Errorf("%w: node %s: %s address %s is node %s's", api.ErrInUse, c.Node, nf[i].name, nf[i].v, id)
			}
		}
	}
	s.Roles = slices.Clone(s.Roles)
	slices.Sort(s.Roles)
	n := &Node{ID: c.Node, NodeSpec: s, Health: 100, Registered: c.Now, LastHeartbeat: c.Now}
	if c.Health > 0 {
		n.Health = min(c.Health, 100)
	}
	n.refresh(m.Config)
	m.Nodes[c.Node] = n
	return Result{Node: n.clone()}, nil
}

func (m *Map) heartbeat(c Command) (Result, error) {
	n, err := m.node(c.Node)
	if err != nil {
		return Result{}, err
	}
	if c.Health < 0 || c.Health > 100 {
		return Result{}, fmt.Errorf("%w: node %s: health %d not in 0..100", api.ErrInvalid, c.Node, c.Health)
	}
	if c.Now.After(n.LastHeartbeat) {
		n.LastHeartbeat = c.Now
	}
	n.Health = c.Health
	n.Late = false
	if n.State == StateDead {
		n.State = StateActive
		m.dropWork(func(w *Work) bool { return w.Kind == WorkStuck && w.Lost == n.ID })
	}
	n.refresh(m.Config)
	return Result{Node: n.clone()}, nil
}

// tick marks late and dead nodes. A node is judged by the age of its last
// heartbeat, but a new leader (c.Since: the time the proposer became
// leader) first gives every node the suspect timeout to reach it: heartbeats
// sent during the election went nowhere. So a node whose heartbeat is older
// than the lease is declared dead once the leader has led for the suspect
// timeout, not a whole lease after the election (which doubled failover
// when the dead node was the leader too).
func (m *Map) tick(c Command) (Result, error) {
	var res Result
	if m.Settling != nil && !c.Now.Before(m.Configured.Add(ConfigSettle)) {
		m.Settling = nil
	}
	for _, id := range m.nodeIDs() {
		n := m.Nodes[id]
		if n.State == StateDead || n.ID == c.Node {
			continue // the proposer (the leader) is alive by definition
		}
		lateAt, deadAt := m.deadlines(n, c.Since)
		if c.Now.After(deadAt) {
			n.State = StateDead
			n.Late = true
			res.Dead = append(res.Dead, id)
			continue
		}
		n.Late = c.Now.After(lateAt)
		n.refresh(m.Config)
	}
	pl := m.newPlacer()
	res.Work = append(res.Work, m.evictDead(pl, c.Now)...)
	res.Work = append(res.Work, m.placePending(pl)...)
	return res, nil
}

// deadlines returns when node n turns late and dead in the eyes of a
// leader leading since since: a Tick whose Now is after lateAt marks it
// late, after deadAt dead. Both clocks start no earlier than the
// leader's own: dead past the lease once the leader has led for the
// suspect timeout, late past the suspect timeout counted from the
// leader's start.
func (m *Map) deadlines(n *Node, since time.Time) (lateAt, deadAt time.Time) {
	lease, suspect := m.judgedBy()
	dead, late := n.LastHeartbeat, n.LastHeartbeat
	if g := since.Add(suspect - lease); g.After(dead) {
		dead = g
	}
	if since.After(late) {
		late = since
	}
	return late.Add(suspect), dead.Add(lease)
}

// judgedBy returns the lease and suspect timeouts ticks judge nodes by:
// the config's, or while a configure that shortened one settles (until the
// first tick ConfigSettle after it), the longer of the old and the new.
func (m *Map) judgedBy() (lease, suspect time.Duration) {
	lease, suspect = m.Config.LeaseTimeout, m.Config.SuspectTimeout
	if s := m.Settling; s != nil {
		lease, suspect = max(lease, s.LeaseTimeout), max(suspect, s.SuspectTimeout)
	}
	return lease, suspect
}

// NextJudgment returns the earliest deadline at which a Tick proposed by
// leader (leading since since) would mark a node late or dead that it has
// not marked yet, or a settling configure would end (see ConfigSettle): the proposer can tick just after it instead of waiting
// for its next periodic tick, so a dead node is declared dead when its
// lease runs out, not up to a tick period later. The zero time when no
// node has a pending deadline (none registered, or all dead). A deadline
// at or before the time of asking means a tick is due now. A heartbeat
// moves the deadlines later; the proposer asks again after every tick.
func (m *Map) NextJudgment(leader api.NodeID, since time.Time) time.Time {
	var next time.Time
	earlier := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	if m.Settling != nil {
		earlier(m.Configured.Add(ConfigSettle)) // the shorter timeouts apply from then
	}
	for _, id := range m.nodeIDs() {
		n := m.Nodes[id]
		if n.State == StateDead || id == leader {
			continue
		}
		lateAt, deadAt := m.deadlines(n, since)
		if !n.Late {
			earlier(lateAt)
		}
		earlier(deadAt)
	}
	return next
}

// evictDead releases the roles dead nodes hold and records the work, in
// every partition that keeps a live in-sync replica: a dead primary's role
// is freed for one of them (elect work), dead secondaries and reserves are
// replaced, and the dead leave the in-sync set. A partition whose in-sync
// replicas are all dead or late (several nodes died or were cut off at
// once, perhaps a tick apart, or the primary alone was in sync) is left as
// it is, primary and in-sync set included: only
// those replicas may hold every acknowledged write, so it waits for one of
// them (stuck work, recorded once); when one comes back, a later tick
// evicts the others around it. Run at every tick, so a revived in-sync
// secondary frees its dead primary's role.
func (m *Map) evictDead(pl *placer, now time.Time) []Work {
	dead := func(id api.NodeID) bool {
		n, ok := m.Nodes[id]
		return !ok || n.State == StateDead
	}
	// A late node (missed heartbeats, not dead yet) may be cut off like
	// the dead one and die at the next tick: it does not count as the
	// live in-sync replica that lets the dead be evicted.
	gone := func(id api.NodeID) bool { return dead(id) || m.Nodes[id].Late }
	var out []Work
	for _, name := range m.volumeNames() {
		v := m.Volumes[name]
		for i := range v.Partitions {
			p := &v.Partitions[i]
			if !slices.ContainsFunc(p.Members(), dead) {
				continue
			}
			live := slices.DeleteFunc(slices.Clone(p.InSync), dead)
			if len(p.InSync) > 0 && !slices.ContainsFunc(live, func(id api.NodeID) bool { return !gone(id) }) {
				lost := p.Primary
				if lost == "" {
					lost = p.InSync[0]
				}
				stuck := slices.ContainsFunc(m.Work, func(w Work) bool {
					return w.Kind == WorkStuck && w.Volume == name && w.Partition == p.Index
				})
				if !stuck {
					out = append(out, m.addWork(Work{Kind: WorkStuck, Volume: name, Partition: p.Index, Role: RolePrimary, Lost: lost, Created: now}))
				}
				continue
			}
			if id := p.Primary; id != "" && dead(id) {
				p.Primary = ""
				if p.Solo != nil && p.Solo.Node == id {
					p.Solo = nil
				}
				m.dropWork(func(w *Work) bool {
					return (w.Kind == WorkShed || w.Kind == WorkStuck) && w.Volume == name && w.Partition == p.Index
				})
				out = append(out, m.addWork(Work{Kind: WorkElect, Volume: name, Partition: p.Index, Role: RolePrimary, Lost: id, Created: now}))
			}
			for _, id := range append(slices.Clone(p.Secondaries), p.Reserves...) {
				if !dead(id) {
					continue
				}
				role := p.RoleOf(id)
				p.removeMember(id)
				w := Work{Kind: WorkReplace, Volume: name, Partition: p.Index, Role: role, Lost: id, Created: now}
				if t, err := pl.placeOne(v, p); err == nil {
					p.addMember(role, t)
					w.Target = t
				}
				out = append(out, m.addWork(w))
			}
			if len(p.InSync) > 0 {
				p.InSync = live
			}
		}
	}
	return out
}

// placePending places replacements for replace work that has no target yet;
// work whose slot was filled meanwhile is dropped.
func (m *Map) placePending(pl *placer) []Work {
	var out []Work
	keep := m.Work[:0:0]
	for _, w := range m.Work {
		if w.Kind != WorkReplace || w.Target != "" {
			keep = append(keep, w)
			continue
		}
		v, ok := m.Volumes[w.Volume]
		if !ok || int(w.Partition) >= len(v.Partitions) {
			continue
		}
		p := &v.Partitions[w.Partition]
		if p.free(v, w.Role) <= 0 {
			continue
		}
		if t, err := pl.placeOne(v, p); err == nil {
			p.addMember(w.Role, t)
			w.Target = t
			out = append(out, w)
		}
		keep = append(keep, w)
	}
	m.Work = keep
	return out
}

func (m *Map) addWork(w Work) Work {
	m.Seq++
	w.ID = m.Seq
	m.Work = append(m.Work, w)
	return w
}

func (m *Map) dropWork(drop func(*Work) bool) {
	m.Work = slices.DeleteFunc(m.Work, func(w Work) bool { return drop(&w) })
}

func (m *Map) drain(c Command, on bool) (Result, error) {
	n, err := m.node(c.Node)
	if err != nil {
		return Result{}, err
	}
	var res Result
	n.Drained = on
	n.refresh(m.Config)
	if on {
		for _, name := range m.volumeNames() {
			v := m.Volumes[name]
			for i := range v.Partitions {
				p := &v.Partitions[i]
				if p.Primary == n.ID && !m.hasWork(WorkShed, name, p.Index) {
					res.Work = append(res.Work, m.addWork(Work{Kind: WorkShed, Volume: name, Partition: p.Index, Role: RolePrimary, Lost: n.ID, Created: c.Now}))
				}
			}
		}
	} else {
		m.dropWork(func(w *Work) bool { return w.Kind == WorkShed && w.Lost == n.ID })
	}
	res.Node = n.clone()
	return res, nil
}

func (m *Map) hasWork(kind, volume string, p api.PartitionID) bool {
	return slices.ContainsFunc(m.Work, func(w Work) bool { return w.Kind == kind && w.Volume == volume && w.Partition == p })
}

func (m *Map) removeNode(c Command) (Result, error) {
	n, err := m.node(c.Node)
	if err != nil {
		return Result{}, err
	}
	if held := len(m.Grants(n.ID)); held > 0 {
		return Result{}, fmt.Errorf("%w: node %s holds %d replica roles: drain it first", api.ErrInUse, n.ID, held)
	}
	delete(m.Nodes, n.ID)
	delete(m.Sleds, n.ID)
	return Result{Node: n.clone()}, nil
}

func (m *Map) setSled(c Command) (Result, error) {
	n, err := m.node(c.Node)
	if err != nil {
		return Result{}, err
	}
	if !n.HasRole(NodeRoleSled) {
		return Result{}, fmt.Errorf("%w: node %s does not run the sled role", api.ErrInvalid, n.ID)
	}
	seen := map[string]bool{}
	for _, d := range c.Devices {
		switch {
		case d.Path == "":
			return Result{}, fmt.Errorf("%w: node %s: device with no path", api.ErrInvalid, n.ID)
		case seen[d.Path]:
			return Result{}, fmt.Errorf("%w: node %s: device %s listed twice", api.ErrInvalid, n.ID, d.Path)
		case d.Capacity < 0 || d.Used < 0 || d.Used > d.Capacity:
			return Result{}, fmt.Errorf("%w: node %s: device %s: capacity %d, used %d", api.ErrInvalid, n.ID, d.Path, d.Capacity, d.Used)
		}
		seen[d.Path] = true
	}
	devs := slices.Clone(c.Devices)
	sort.Slice(devs, func(i, j int) bool { return devs[i].Path < devs[j].Path })
	m.Sleds[n.ID] = &Sled{Node: n.ID, Devices: devs}
	return Result{Node: n.clone()}, nil
}

// NodeList returns copies of every node, sorted by id.
func (m *Map) NodeList() []Node {
	out := make([]Node, 0, len(m.Nodes))
	for _, id := range m.nodeIDs() {
		out = append(out, *m.Nodes[id].clone())
	}
	return out
}

// Node returns a copy of node id.
func (m *Map) Node(id api.NodeID) (Node, bool) {
	n, ok := m.Nodes[id]
	if !ok {
		return Node{}, false
	}
	return *n.clone(), true
}

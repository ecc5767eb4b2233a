package cluster

import (
	"errors"
	"fmt"
	"slices"

	"stor.dev/stor/ctl/api"
)

// ErrNotInSync refuses the primary role to a replica that may lack
// acknowledged writes (wrapped with api.ErrInvalid).
var ErrNotInSync = errors.New("cluster: replica not in sync")

func (p *Partition) removeMember(id api.NodeID) {
	if p.Primary == id {
		p.Primary = ""
	}
	del := func(x api.NodeID) bool { return x == id }
	p.Secondaries = slices.DeleteFunc(p.Secondaries, del)
	p.Reserves = slices.DeleteFunc(p.Reserves, del)
	p.InSync = slices.DeleteFunc(p.InSync, del)
	if p.Solo != nil && p.Solo.Node == id {
		p.Solo = nil
	}
}

func (p *Partition) addMember(r Role, id api.NodeID) {
	switch r {
	case RolePrimary:
		p.Primary = id
	case RoleSecondary:
		p.Secondaries = append(p.Secondaries, id)
	case RoleReserve:
		p.Reserves = append(p.Reserves, id)
	}
}

// free is the number of free slots for role r.
func (p *Partition) free(v *Volume, r Role) int {
	switch r {
	case RolePrimary:
		if p.Primary == "" {
			return 1
		}
		return 0
	case RoleSecondary:
		return v.Replicas - 1 - len(p.Secondaries)
	case RoleReserve:
		return v.Reserves - len(p.Reserves)
	}
	return 0
}

func (p *Partition) holders(r Role) []api.NodeID {
	switch r {
	case RolePrimary:
		return []api.NodeID{p.Primary}
	case RoleSecondary:
		return slices.Clone(p.Secondaries)
	}
	return slices.Clone(p.Reserves)
}

func (p *Partition) grant(v *Volume, r Role, id api.NodeID) *Grant {
	return &Grant{Volume: v.Name, Partition: p.Index, Role: r, Node: id, Epoch: p.Epoch, InSync: slices.Contains(p.InSync, id)}
}

func checkRole(r Role) error {
	switch r {
	case RolePrimary, RoleSecondary, RoleReserve:
		return nil
	}
	return fmt.Errorf("%w: role %q: want primary, secondary or reserve", api.ErrInvalid, r)
}

func (m *Map) acquire(c Command) (Result, error) {
	if err := checkRole(c.Role); err != nil {
		return Result{}, err
	}
	v, p, err := m.partition(c.Volume, c.Partition)
	if err != nil {
		return Result{}, err
	}
	n, err := m.node(c.Node)
	if err != nil {
		return Result{}, err
	}
	cur := p.RoleOf(n.ID)
	if cur == c.Role && c.Role == RolePrimary && c.Epoch != 0 && c.Epoch == p.Epoch && n.State != StateDead {
		// The holder leaves its epoch for a new one: a restarted primary
		// (it must not serve again at an epoch it may have lost notes
		// of) or one whose replica set changed. Asked again with the old
		// epoch, it is answered below without a second rise.
		p.Epoch++
		p.Solo = nil
		return Result{Grant: p.grant(v, RolePrimary, n.ID)}, nil
	}
	if cur == c.Role {
		return Result{Grant: p.grant(v, c.Role, n.ID)}, nil // the holder asks again
	}
	switch {
	case n.State == StateDead:
		return Result{}, fmt.Errorf("%w: node %s is dead", api.ErrInvalid, n.ID)
	case n.State == StateDraining:
		return Result{}, fmt.Errorf("%w: node %s is draining", api.ErrInvalid, n.ID)
	case !n.HasRole(NodeRoleHead):
		return Result{}, fmt.Errorf("%w: node %s does not run the head role", api.ErrInvalid, n.ID)
	case p.free(v, c.Role) <= 0:
		return Result{}, &HeldError{Volume: v.Name, Partition: p.Index, Role: c.Role, Holders: p.holders(c.Role), Epoch: p.Epoch}
	}
	switch c.Role {
	case RolePrimary:
		if len(p.InSync) > 0 && !slices.Contains(p.InSync, n.ID) {
			return Result{}, fmt.Errorf("%w: %w: %s partition %d: node %s is not in the in-sync set %v", api.ErrInvalid, ErrNotInSync, v.Name, p.Index, n.ID, p.InSync)
		}
		p.removeMember(n.ID)
		if len(p.InSync) == 0 || !slices.Contains(p.InSync, n.ID) {
			p.InSync = append(p.InSync, n.ID)
			slices.Sort(p.InSync)
		}
		p.Primary = n.ID
		p.Epoch++
		p.Solo = nil
		var res Result
		var lost []api.NodeID
		for _, w := range m.Work {
			if w.Volume == v.Name && w.Partition == p.Index && w.Kind == WorkElect {
				lost = append(lost, w.Lost)
			}
		}
		m.dropWork(func(w *Work) bool {
			return w.Volume == v.Name && w.Partition == p.Index && (w.Kind == WorkElect || w.Kind == WorkShed)
		})
		// The promoted secondary left its slot: re-place it at the next tick.
		for _, l := range lost {
			if cur == RoleSecondary && p.free(v, RoleSecondary) > 0 {
				res.Work = append(res.Work, m.addWork(Work{Kind: WorkReplace, Volume: v.Name, Partition: p.Index, Role: RoleSecondary, Lost: l, Created: c.Now}))
			}
		}
		res.Grant = p.grant(v, RolePrimary, n.ID)
		return res, nil
	default:
		if cur != "" && !(cur == RoleReserve && c.Role == RoleSecondary) {
			return Result{}, fmt.Errorf("%w: node %s already holds the %s role of %s partition %d: release it first", api.ErrInUse, n.ID, cur, v.Name, p.Index)
		}
		p.removeMember(n.ID)
		p.addMember(c.Role, n.ID)
		return Result{Grant: p.grant(v, c.Role, n.ID)}, nil
	}
}

func (m *Map) release(c Command) (Result, error) {
	if err := checkRole(c.Role); err != nil {
		return Result{}, err
	}
	v, p, err := m.partition(c.Volume, c.Partition)
	if err != nil {
		return Result{}, err
	}
	if _, err := m.node(c.Node); err != nil {
		return Result{}, err
	}
	if p.RoleOf(c.Node) != c.Role {
		return Result{}, fmt.Errorf("%w: %w: node %s holds no %s grant on %s partition %d", api.ErrNotFound, ErrNotHolder, c.Node, c.Role, v.Name, p.Index)
	}
	var res Result
	if c.Role == RolePrimary {
		others := slices.DeleteFunc(slices.Clone(p.InSync), func(x api.NodeID) bool { return x == c.Node })
		if len(others) == 0 && !c.Force {
			return Result{}, fmt.Errorf("%w: node %s is the only in-sync replica of %s partition %d (force releases anyway)", api.ErrInUse, c.Node, v.Name, p.Index)
		}
		m.dropWork(func(w *Work) bool {
			return w.Volume == v.Name && w.Partition == p.Index && (w.Kind == WorkShed || w.Kind == WorkStuck)
		})
		if len(others) > 0 {
			res.Work = append(res.Work, m.addWork(Work{Kind: WorkElect, Volume: v.Name, Partition: p.Index, Role: RolePrimary, Lost: c.Node, Created: c.Now}))
		}
	}
	g := p.grant(v, c.Role, c.Node)
	p.removeMember(c.Node)
	res.Grant = g
	return res, nil
}

// checkPrimary checks that node is p's primary at epoch.
func checkPrimary(v *Volume, p *Partition, node api.NodeID, epoch api.Epoch) error {
	if node == "" || p.Primary != node {
		return fmt.Errorf("%w: %w: node %s is not the primary of %s partition %d (primary %q)", api.ErrInvalid, ErrNotHolder, node, v.Name, p.Index, p.Primary)
	}
	if epoch != p.Epoch {
		return fmt.Errorf("%w: %w: %s partition %d is at epoch %d, not %d", api.ErrInvalid, ErrStaleEpoch, v.Name, p.Index, p.Epoch, epoch)
	}
	return nil
}

func (m *Map) setInSync(c Command) (Result, error) {
	v, p, err := m.partition(c.Volume, c.Partition)
	if err != nil {
		return Result{}, err
	}
	if err := checkPrimary(v, p, c.Node, c.Epoch); err != nil {
		return Result{}, err
	}
	set := []api.NodeID{p.Primary}
	for _, id := range c.Nodes {
		switch p.RoleOf(id) {
		case RolePrimary, RoleSecondary:
		case RoleReserve:
			return Result{}, fmt.Errorf("%w: %s partition %d: reserve %s holds no journal and cannot be in sync", api.ErrInvalid, v.Name, p.Index, id)
		default:
			return Result{}, fmt.Errorf("%w: %s partition %d: node %s is not a replica", api.ErrInvalid, v.Name, p.Index, id)
		}
		if !slices.Contains(set, id) {
			set = append(set, id)
		}
	}
	slices.Sort(set)
	p.InSync = set
	if len(set) > 1 {
		p.Solo = nil
	}
	m.dropWork(func(w *Work) bool {
		return w.Kind == WorkReplace && w.Volume == v.Name && w.Partition == p.Index && w.Target != "" && slices.Contains(set, w.Target)
	})
	return Result{Volume: v.clone()}, nil
}

func (m *Map) bless(c Command) (Result, error) {
	v, p, err := m.partition(c.Volume, c.Partition)
	if err != nil {
		return Result{}, err
	}
	if err := checkPrimary(v, p, c.Node, c.Epoch); err != nil {
		return Result{}, err
	}
	if others := slices.DeleteFunc(slices.Clone(p.InSync), func(x api.NodeID) bool { return x == c.Node }); len(others) > 0 {
		return Result{}, fmt.Errorf("%w: %s partition %d: replicas %v are in sync: no solo blessing while a peer is", api.ErrInUse, v.Name, p.Index, others)
	}
	if p.Solo == nil || p.Solo.Node != c.Node || p.Solo.Epoch != p.Epoch {
		p.Solo = &Blessing{Node: c.Node, Epoch: p.Epoch, Since: c.Now}
	}
	b := *p.Solo
	return Result{Blessing: &b}, nil
}

func (m *Map) unbless(c Command) (Result, error) {
	v, p, err := m.partition(c.Volume, c.Partition)
	if err != nil {
		return Result{}, err
	}
	if p.Solo == nil || p.Solo.Node != c.Node {
		return Result{}, fmt.Errorf("%w: %w: node %s holds no solo blessing on %s partition %d", api.ErrNotFound, ErrNotHolder, c.Node, v.Name, p.Index)
	}
	b := *p.Solo
	p.Solo = nil
	return Result{Blessing: &b}, nil
}

func (m *Map) finishWork(c Command) (Result, error) {
	i := slices.IndexFunc(m.Work, func(w Work) bool { return w.ID == c.Work })
	if i < 0 {
		return Result{}, fmt.Errorf("%w: work %d", api.ErrNotFound, c.Work)
	}
	w := m.Work[i]
	m.Work = slices.Delete(m.Work, i, i+1)
	return Result{Work: []Work{w}}, nil
}

// Grants lists the roles held, by node (every node if node is ""), sorted by
// volume, partition, then primary, secondaries, reserves.
func (m *Map) Grants(node api.NodeID) []Grant {
	var out []Grant
	for _, name := range m.volumeNames() {
		v := m.Volumes[name]
		for i := range v.Partitions {
			p := &v.Partitions[i]
			for _, id := range p.Members() {
				if node == "" || id == node {
					out = append(out, *p.grant(v, p.RoleOf(id), id))
				}
			}
		}
	}
	return out
}

// Blessed reports whether node holds a solo blessing on the partition at its
// current epoch.
func (m *Map) Blessed(volume string, i api.PartitionID, node api.NodeID) bool {
	v, ok := m.Volumes[volume]
	if !ok || int(i) >= len(v.Partitions) {
		return false
	}
	p := &v.Partitions[i]
	return p.Solo != nil && p.Solo.Node == node && p.Solo.Epoch == p.Epoch && p.Primary == node
}

package cluster

import (
	"fmt"
	"slices"

	"stor.dev/stor/ctl/api"
)

func (m *Map) volumeNames() []string {
	names := make([]string, 0, len(m.Volumes))
	for n := range m.Volumes {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (v *Volume) clone() *Volume {
	c := *v
	c.Partitions = make([]Partition, len(v.Partitions))
	for i, p := range v.Partitions {
		c.Partitions[i] = p.clone()
	}
	return &c
}

func (p Partition) clone() Partition {
	p.Secondaries = slices.Clone(p.Secondaries)
	p.Reserves = slices.Clone(p.Reserves)
	p.InSync = slices.Clone(p.InSync)
	if p.Solo != nil {
		s := *p.Solo
		p.Solo = &s
	}
	return p
}

// VolumeList returns copies of every volume, sorted by name.
func (m *Map) VolumeList() []Volume {
	out := make([]Volume, 0, len(m.Volumes))
	for _, n := range m.volumeNames() {
		out = append(out, *m.Volumes[n].clone())
	}
	return out
}

// Volume returns a copy of the volume called name.
func (m *Map) Volume(name string) (Volume, bool) {
	v, ok := m.Volumes[name]
	if !ok {
		return Volume{}, false
	}
	return *v.clone(), true
}

func (m *Map) volume(name string) (*Volume, error) {
	v, ok := m.Volumes[name]
	if !ok {
		return nil, fmt.Errorf("%w: volume %q", api.ErrNotFound, name)
	}
	return v, nil
}

func (m *Map) partition(name string, i api.PartitionID) (*Volume, *Partition, error) {
	v, err := m.volume(name)
	if err != nil {
		return nil, nil, err
	}
	if int(i) >= len(v.Partitions) {
		return nil, nil, fmt.Errorf("%w: volume %q has %d partitions, no partition %d", api.ErrNotFound, name, len(v.Partitions), i)
	}
	return v, &v.Partitions[i], nil
}

func partitionCount(size, psize int64) int64 { return (size + psize - 1) / psize }

func (m *Map) createVolume(c Command) (Result, error) {
	if c.Create == nil {
		return Result{}, fmt.Errorf("%w: no volume spec", api.ErrInvalid)
	}
	s := *c.Create
	if err := api.CheckName(s.Name); err != nil {
		return Result{}, err
	}
	if _, ok := m.Volumes[s.Name]; ok {
		return Result{}, fmt.Errorf("%w: volume %q", api.ErrExists, s.Name)
	}
	if s.BlockSize == 0 {
		s.BlockSize = 512
	}
	if s.BlockSize != 512 && s.BlockSize != 4096 {
		return Result{}, fmt.Errorf("%w: block size %d: want 512 or 4096", api.ErrInvalid, s.BlockSize)
	}
	if s.PartitionSize == 0 {
		s.PartitionSize = m.Config.DefaultPartitionSize
	}
	if s.PartitionSize < api.MinPartitionSize || s.PartitionSize%int64(s.BlockSize) != 0 {
		return Result{}, fmt.Errorf("%w: partition size %d: want a multiple of the block size, at least %d", api.ErrInvalid, s.PartitionSize, api.MinPartitionSize)
	}
	if err := checkSize(s.Size, s.BlockSize, s.PartitionSize); err != nil {
		return Result{}, err
	}
	if s.Replicas < 0 || s.Replicas > MaxReplicas || s.Reserves < 0 || s.Reserves > MaxReserves {
		return Result{}, fmt.Errorf("%w: replicas %d (1..%d), reserves %d (0..%d)", api.ErrInvalid, s.Replicas, MaxReplicas, s.Reserves, MaxReserves)
	}
	pl := m.newPlacer()
	eligible := pl.eligible()
	if s.Replicas == 0 {
		s.Replicas = max(1, min(m.Config.DefaultReplicas, eligible))
	}
	if need := s.Replicas + s.Reserves; need > eligible {
		return Result{}, fmt.Errorf("%w: volume %q needs %d active head nodes, the cluster has %d", api.ErrNoSpace, s.Name, need, eligible)
	}
	v := &Volume{
		Name: s.Name, ID: api.VolumeID(fmt.Sprintf("vol-%06d", m.Seq+1)), Size: s.Size,
		BlockSize: s.BlockSize, PartitionSize: s.PartitionSize, Replicas: s.Replicas,
		Reserves: s.Reserves, Created: c.Now,
	}
	if err := m.placePartitions(pl, v, int(partitionCount(s.Size, s.PartitionSize))); err != nil {
		return Result{}, err
	}
	m.Seq++
	m.Volumes[v.Name] = v
	return Result{Volume: v.clone()}, nil
}

func checkSize(size int64, bs int, psize int64) error {
	if size <= 0 || size%int64(bs) != 0 || size > api.MaxVolumeSize {
		return fmt.Errorf("%w: size %d: want a positive multiple of %d, at most %s", api.ErrInvalid, size, bs, api.FormatSize(api.MaxVolumeSize))
	}
	if partitionCount(size, psize) > MaxPartitions {
		return fmt.Errorf("%w: size %s in partitions of %s makes more than %d partitions: use larger partitions", api.ErrInvalid, api.FormatSize(size), api.FormatSize(psize), MaxPartitions)
	}
	return nil
}

// placePartitions appends partitions to v up to count; v is not yet in
// the map or is changed only on success.
func (m *Map) placePartitions(pl *placer, v *Volume, count int) error {
	var parts []Partition
	for i := len(v.Partitions); i < count; i++ {
		chosen, err := pl.choose(v.Replicas+v.Reserves, v.PartitionSize, nil)
		if err != nil {
			return fmt.Errorf("volume %q partition %d: %w", v.Name, i, err)
		}
		reps := chosen[:v.Replicas]
		pi := 0
		for j, id := range reps {
			if pl.primaries[id] < pl.primaries[reps[pi]] {
				pi = j
			}
		}
		p := Partition{Index: api.PartitionID(i), Epoch: 1, Primary: reps[pi]}
		for j, id := range reps {
			if j != pi {
				p.Secondaries = append(p.Secondaries, id)
			}
		}
		p.Reserves = slices.Clone(chosen[v.Replicas:])
		p.InSync = slices.Clone(reps)
		slices.Sort(p.InSync)
		pl.primaries[p.Primary]++
		for _, id := range chosen {
			pl.add(id, v.PartitionSize)
		}
		parts = append(parts, p)
	}
	v.Partitions = append(v.Partitions, parts...)
	return nil
}

func (m *Map) resizeVolume(c Command) (Result, error) {
	v, err := m.volume(c.Volume)
	if err != nil {
		return Result{}, err
	}
	if c.Size < v.Size {
		return Result{}, fmt.Errorf("%w: volume %q: shrinking from %d to %d is not supported", api.ErrInvalid, v.Name, v.Size, c.Size)
	}
	if err := checkSize(c.Size, v.BlockSize, v.PartitionSize); err != nil {
		return Result{}, err
	}
	nv := v.clone()
	nv.Size = c.Size
	if err := m.placePartitions(m.newPlacer(), nv, int(partitionCount(c.Size, v.PartitionSize))); err != nil {
		return Result{}, err
	}
	m.Volumes[v.Name] = nv
	return Result{Volume: nv.clone()}, nil
}

func (m *Map) deleteVolume(c Command) (Result, error) {
	v, err := m.volume(c.Volume)
	if err != nil {
		return Result{}, err
	}
	var snaps []string
	for _, s := range m.Snapshots {
		if s.Volume == v.Name {
			snaps = append(snaps, s.Name)
		}
	}
	slices.Sort(snaps)
	if len(snaps) > 0 && !c.Force {
		return Result{}, fmt.Errorf("%w: volume %q has snapshots %v (force deletes them too)", api.ErrInUse, v.Name, snaps)
	}
	for _, s := range snaps {
		delete(m.Snapshots, s)
	}
	delete(m.Volumes, v.Name)
	m.dropWork(func(w *Work) bool { return w.Volume == v.Name })
	return Result{Volume: v.clone()}, nil
}

func (m *Map) createSnapshot(c Command) (Result, error) {
	v, err := m.volume(c.Volume)
	if err != nil {
		return Result{}, err
	}
	if err := api.CheckName(c.Snapshot); err != nil {
		return Result{}, fmt.Errorf("snapshot: %w", err)
	}
	if _, ok := m.Snapshots[c.Snapshot]; ok {
		return Result{}, fmt.Errorf("%w: snapshot %q", api.ErrExists, c.Snapshot)
	}
	m.Seq++
	s := &Snapshot{Name: c.Snapshot, Volume: v.Name, ID: fmt.Sprintf("snap-%06d", m.Seq), Created: c.Now}
	m.Snapshots[s.Name] = s
	cp := *s
	return Result{Snapshot: &cp}, nil
}

func (m *Map) deleteSnapshot(c Command) (Result, error) {
	s, ok := m.Snapshots[c.Snapshot]
	if !ok {
		return Result{}, fmt.Errorf("%w: snapshot %q", api.ErrNotFound, c.Snapshot)
	}
	delete(m.Snapshots, s.Name)
	cp := *s
	return Result{Snapshot: &cp}, nil
}

// placer chooses nodes for replicas. It is built from the map for one
// command and tracks what that command placed so far.
type placer struct {
	m         *Map
	ids       []api.NodeID // active head nodes, sorted
	load      map[api.NodeID]int64
	count     map[api.NodeID]int
	primaries map[api.NodeID]int
}

func (m *Map) newPlacer() *placer {
	pl := &placer{m: m, load: map[api.NodeID]int64{}, count: map[api.NodeID]int{}, primaries: map[api.NodeID]int{}}
	for _, id := range m.nodeIDs() {
		n := m.Nodes[id]
		if n.State == StateActive && n.HasRole(NodeRoleHead) {
			pl.ids = append(pl.ids, id)
		}
	}
	for _, v := range m.Volumes {
		for i := range v.Partitions {
			p := &v.Partitions[i]
			for _, id := range p.Members() {
				pl.add(id, v.PartitionSize)
			}
			if p.Primary != "" {
				pl.primaries[p.Primary]++
			}
		}
	}
	return pl
}

func (pl *placer) eligible() int { return len(pl.ids) }

func (pl *placer) add(id api.NodeID, bytes int64) {
	pl.load[id] += bytes
	pl.count[id]++
}

func (pl *placer) capacity(id api.NodeID) int64 {
	if c := pl.m.Nodes[id].Capacity; c > 0 {
		return c
	}
	if s, ok := pl.m.Sleds[id]; ok {
		return s.Capacity()
	}
	return 0
}

func (pl *placer) domain(id api.NodeID) string {
	if n, ok := pl.m.Nodes[id]; ok && n.FailureDomain != "" {
		return "d:" + n.FailureDomain
	}
	return "n:" + string(id)
}

// less orders candidates: lower capacity fraction, then fewer bytes placed,
// then fewer replicas, then id. Nodes of unknown capacity count as empty.
func (pl *placer) less(a, b api.NodeID) bool {
	fa, fb := pl.fraction(a), pl.fraction(b)
	if fa != fb {
		return fa < fb
	}
	if pl.load[a] != pl.load[b] {
		return pl.load[a] < pl.load[b]
	}
	if pl.count[a] != pl.count[b] {
		return pl.count[a] < pl.count[b]
	}
	return a < b
}

func (pl *placer) fraction(id api.NodeID) float64 {
	c := pl.capacity(id)
	if c <= 0 {
		return 0
	}
	return float64(pl.load[id]) / float64(c)
}

// choose picks n distinct nodes not in members, each with room for psize
// bytes, in distinct failure domains (also distinct from the members')
// while there are enough.
func (pl *placer) choose(n int, psize int64, members []api.NodeID) ([]api.NodeID, error) {
	used := map[string]bool{}
	for _, id := range members {
		used[pl.domain(id)] = true
	}
	var chosen []api.NodeID
	for len(chosen) < n {
		best, bestFresh := api.NodeID(""), false
		for _, id := range pl.ids {
			if slices.Contains(members, id) || slices.Contains(chosen, id) {
				continue
			}
			if c := pl.capacity(id); c > 0 && pl.load[id]+psize > c {
				continue
			}
			fresh := !used[pl.domain(id)]
			if best == "" || (fresh && !bestFresh) || (fresh == bestFresh && pl.less(id, best)) {
				best, bestFresh = id, fresh
			}
		}
		if best == "" {
			return nil, fmt.Errorf("%w: %d of %d replicas placed: no other active head node has room for %s", api.ErrNoSpace, len(chosen), n, api.FormatSize(psize))
		}
		chosen = append(chosen, best)
		used[pl.domain(best)] = true
	}
	return chosen, nil
}

// placeOne chooses one new replica for p and counts it in pl.
func (pl *placer) placeOne(v *Volume, p *Partition) (api.NodeID, error) {
	c, err := pl.choose(1, v.PartitionSize, p.Members())
	if err != nil {
		return "", err
	}
	pl.add(c[0], v.PartitionSize)
	return c[0], nil
}

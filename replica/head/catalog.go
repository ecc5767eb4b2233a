package head

// The export role's catalog: the cluster map's volumes as remote Devices
// (see Clients in the package doc).

import (
	"context"
	"fmt"
	"sort"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica"
	"stor.dev/stor/replica/volume/remote"
	"stor.dev/stor/target"
)

// Catalog returns the volumes of the map as exports (target.Catalog).
func (n *Node) Catalog() target.Catalog { return catalog{n} }

// Attached returns the number of devices open on volume name.
func (n *Node) Attached(name string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mu.attached[name]
}

// Connections returns the number of devices open on every volume.
func (n *Node) Connections() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, a := range n.mu.attached {
		c += a
	}
	return c
}

type catalog struct{ n *Node }

func (c catalog) List(ctx context.Context) ([]target.Export, error) {
	c.n.mu.Lock()
	defer c.n.mu.Unlock()
	out := make([]target.Export, 0, len(c.n.mu.vols))
	for _, v := range c.n.mu.vols {
		out = append(out, target.Export{Name: v.Name, ID: string(v.ID),
			Description: fmt.Sprintf("stor volume %s (%s, %d replicas)", v.Name, api.FormatSize(v.Size), v.Replicas)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (c catalog) Open(ctx context.Context, name string) (target.Device, error) {
	n := c.n
	n.mu.Lock()
	_, known := n.mu.vols[name]
	n.mu.Unlock()
	if !known {
		// Created since the last poll, perhaps: ask the control plane.
		if cv, err := n.cfg.Control.ClusterVolume(ctx, name); err == nil {
			n.mu.Lock()
			if _, ok := n.mu.vols[name]; !ok {
				n.mu.vols[name] = cv
			}
			n.mu.Unlock()
		}
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	v, ok := n.mu.vols[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s", target.ErrNotFound, name)
	}
	clients := make([]*replica.Client, len(v.Partitions))
	for i := range v.Partitions {
		p := &v.Partitions[i]
		k, err := Key(v.ID, p.Index)
		if err != nil {
			return nil, fmt.Errorf("%w: volume %s: %v", target.ErrIO, name, err)
		}
		cl := n.mu.clients[k]
		if cl == nil {
			r := route(p)
			if len(r) == 0 {
				return nil, fmt.Errorf("%w: volume %s partition %d has no replica placed yet", target.ErrIO, name, p.Index)
			}
			cl, err = replica.NewClient(replica.ClientConfig{Self: n.cfg.Self, Partition: api.PartitionID(k), Replicas: r,
				Send: n.tr.Send, AttemptTimeout: n.cfg.AttemptTimeout, Logger: n.log.With("volume", name, "partition", p.Index)})
			if err != nil {
				return nil, fmt.Errorf("%w: volume %s: %v", target.ErrIO, name, err)
			}
			cl.SetRoute(r, p.Epoch)
			n.mu.clients[k] = cl
		}
		clients[i] = cl
	}
	n.mu.attached[name]++
	geo := target.Geometry{Size: v.Size, BlockSize: v.BlockSize}
	return &device{Device: remote.NewDevice(geo, v.PartitionSize, clients), n: n, name: name,
		info: target.Export{Name: name, ID: string(v.ID), Description: fmt.Sprintf("stor volume %s", name)}}, nil
}

// device is an open export: a remote Device counted in attached.
type device struct {
	*remote.Device
	n      *Node
	name   string
	info   target.Export
	closed bool
}

func (d *device) Info() target.Export { return d.info }

func (d *device) Close() error {
	d.n.mu.Lock()
	defer d.n.mu.Unlock()
	if !d.closed {
		d.closed = true
		d.n.mu.attached[d.name]--
	}
	return nil
}

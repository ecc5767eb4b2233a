package control

import (
	"context"
	"errors"
	"fmt"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// ClusterVolumes is the Volumes backend of a multi-node cluster: volumes
// live in the cluster map, created with placement of every partition. It
// answers only the map's facts; per-node fields (connections, allocated
// bytes, export addresses) are for a wrapper to fill in.
//
// Writes are proposed through the Node and so must run on the leader (wrap
// the handler with LeaderOnly). Reads are consistent on the leader and fall
// back to the local map on a follower.
type ClusterVolumes struct {
	Node *Node
}

var _ Volumes = ClusterVolumes{}

// CreateVolume proposes create-volume.
func (c ClusterVolumes) CreateVolume(ctx context.Context, req api.CreateVolume) (api.Volume, error) {
	res, err := c.Node.Propose(ctx, cluster.Command{Op: cluster.OpCreateVolume, Create: &cluster.VolumeSpec{
		Name: req.Name, Size: req.Size, BlockSize: req.BlockSize, PartitionSize: req.PartitionSize, Replicas: req.Replicas,
	}})
	if err != nil {
		return api.Volume{}, volumeError(err)
	}
	return res.Volume.API(), nil
}

// Volumes lists the volumes of the map.
func (c ClusterVolumes) Volumes(ctx context.Context) ([]api.Volume, error) {
	out := []api.Volume{}
	err := c.read(ctx, func(m *cluster.Map) {
		for _, v := range m.VolumeList() {
			out = append(out, v.API())
		}
	})
	return out, err
}

// Volume describes one volume.
func (c ClusterVolumes) Volume(ctx context.Context, name string) (api.Volume, error) {
	var v cluster.Volume
	var ok bool
	if err := c.read(ctx, func(m *cluster.Map) { v, ok = m.Volume(name) }); err != nil {
		return api.Volume{}, err
	}
	if !ok {
		return api.Volume{}, fmt.Errorf("%w: volume %q", api.ErrNotFound, name)
	}
	return v.API(), nil
}

// ResizeVolume proposes resize-volume.
func (c ClusterVolumes) ResizeVolume(ctx context.Context, name string, size int64) (api.Volume, error) {
	res, err := c.Node.Propose(ctx, cluster.Command{Op: cluster.OpResizeVolume, Volume: name, Size: size})
	if err != nil {
		return api.Volume{}, volumeError(err)
	}
	return res.Volume.API(), nil
}

// DeleteVolume proposes delete-volume; force also deletes its snapshots.
func (c ClusterVolumes) DeleteVolume(ctx context.Context, name string, force bool) error {
	_, err := c.Node.Propose(ctx, cluster.Command{Op: cluster.OpDeleteVolume, Volume: name, Force: force})
	return volumeError(err)
}

func (c ClusterVolumes) read(ctx context.Context, fn func(*cluster.Map)) error {
	err := c.Node.ConsistentRead(ctx, fn)
	if errors.Is(err, ErrNotLeader) {
		c.Node.Read(fn)
		return nil
	}
	return volumeError(err)
}

// volumeError gives raft-layer errors an api sentinel so the volume API
// answers them as internal errors with a clear message.
func volumeError(err error) error {
	if err == nil {
		return nil
	}
	for _, c := range api.Codes {
		if errors.Is(err, c.Err) {
			return err
		}
	}
	return fmt.Errorf("%w: %w", api.ErrInternal, err)
}

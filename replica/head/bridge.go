package head

// The bridge: Replicas' Control messages to control plane calls, and the
// answers back as Grant or Stale messages (see Bridge in the package doc).

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/replica/wire"
)

// bridgeQueue bounds the Control messages waiting: past it submit drops
// (the Core resends a pending request every few ticks).
const bridgeQueue = 256

type bridge struct {
	n  *Node
	in chan *wire.Msg
	// Owned by run: the last request id handled per partition and epoch.
	last map[uint32]seen
}

type seen struct {
	epoch api.Epoch
	req   uint64
}

func newBridge(n *Node) *bridge {
	return &bridge{n: n, in: make(chan *wire.Msg, bridgeQueue), last: make(map[uint32]seen)}
}

// submit queues m without blocking.
func (b *bridge) submit(m *wire.Msg) {
	if m.Type != wire.TypeControl {
		return // Stale answers to the control plane's messages: nothing to do
	}
	select {
	case b.in <- m:
	default:
	}
}

func (b *bridge) run(ctx context.Context, wg *sync.WaitGroup) {
	defer wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-b.in:
			b.handle(ctx, m)
		}
	}
}

func (b *bridge) handle(ctx context.Context, m *wire.Msg) {
	k := uint32(m.Partition)
	if s, ok := b.last[k]; ok && s.epoch == m.Epoch && m.ReqID <= s.req {
		return // older than one handled: the Core ignores its answer
	}
	b.n.mu.Lock()
	h := b.n.mu.reps[k]
	b.n.mu.Unlock()
	if h == nil || len(m.Peers) == 0 && m.Kind != wire.CtlBless {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	v, err := b.n.cfg.Control.ClusterVolume(ctx, h.volume)
	if err != nil || int(h.index) >= len(v.Partitions) {
		b.n.log.Debug("bridge: reading the partition", "volume", h.volume, "partition", h.index, "err", err)
		return // the Core asks again
	}
	p := v.Partitions[h.index]
	if p.Epoch > m.Epoch {
		b.n.toReplica(&wire.Msg{Type: wire.TypeStale, Epoch: p.Epoch, Partition: m.Partition, From: ControlID, To: m.From})
		return
	}
	g := &wire.Msg{Type: wire.TypeGrant, Epoch: m.Epoch, Partition: m.Partition, From: ControlID, To: m.From,
		Kind: m.Kind, ReqID: m.ReqID, Peers: m.Peers}
	switch m.Kind {
	case wire.CtlInSync, wire.CtlDropPeer:
		set := slices.Clone(p.InSync)
		peer := m.Peers[0]
		if m.Kind == wire.CtlInSync {
			if !slices.Contains(set, peer) {
				set = append(set, peer)
			}
		} else {
			set = slices.DeleteFunc(set, func(id api.NodeID) bool { return id == peer })
		}
		_, err = b.n.cfg.Control.SetInSync(ctx, client.InSyncRequest{Volume: h.volume, Partition: h.index, Node: m.From, Epoch: m.Epoch, InSync: set})
	case wire.CtlBless:
		_, err = b.n.cfg.Control.Bless(ctx, client.GrantRequest{Volume: h.volume, Partition: h.index, Node: m.From, Epoch: m.Epoch})
	default:
		return
	}
	switch {
	case err == nil:
	case errors.Is(err, api.ErrInvalid), errors.Is(err, api.ErrInUse), errors.Is(err, api.ErrNotFound),
		errors.Is(err, cluster.ErrStaleEpoch):
		g.Flags = wire.FlagReject // refused: the map says no
	default:
		b.n.log.Debug("bridge: control plane call", "volume", h.volume, "partition", h.index, "kind", m.Kind, "err", err)
		return // unanswered: the Core asks again
	}
	b.last[k] = seen{m.Epoch, m.ReqID}
	b.n.log.Info("control request answered", "volume", h.volume, "partition", h.index, "kind", m.Kind, "peers", m.Peers,
		"epoch", m.Epoch, "refused", g.Flags&wire.FlagReject != 0, "err", err)
	b.n.toReplica(g)
}

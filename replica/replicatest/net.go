// Package replicatest holds a deterministic in-memory network and a
// simulation harness for stor's replication protocol (replica.Core).
//
// # Model
//
// Everything runs on one goroutine and one seeded random source: the same
// seed gives the same run, message for message. Time is a counter
// advanced by Tick; no clock is read.
//
//   - Network: every message is encoded with package wire and decoded on
//     delivery. Send never blocks and may drop (Faults.Drop), duplicate
//     (Faults.Dup) or delay (up to Faults.MaxDelay ticks) a message;
//     delivery picks any due message at random, so messages are reordered.
//     Cut(a, b) drops everything between a and b until Heal.
//   - Cluster: N replicas of one partition, each a replica.Core driven the
//     way a real driver must drive it (STYLE.md: persist, append, fsync,
//     apply, then send), over a Disk that models power loss: what was
//     appended but not fsynced may vanish. A mini control plane raises
//     epochs, promotes in-sync replicas, grants drops, in-sync joins and
//     solo blessings. Clients issue writes, reads and flushes of a few
//     blocks and retry on the current primary until answered.
//   - Checks (Cluster.Err, Sim): no two entries committed at one opnum, no
//     two primaries acknowledging ops in one epoch, replicas equal after
//     quiescence, the client history linearizable (porcupine), and after a
//     power loss of every node, every write acknowledged before a completed
//     flush still readable (or overwritten by a write not older than it).
package replicatest

import (
	"fmt"
	"math/rand/v2"
	"slices"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica/wire"
)

// Faults are the network's fault rates.
type Faults struct {
	Drop     float64 // probability that a message is lost
	Dup      float64 // probability that a message is delivered twice
	MaxDelay int     // ticks a message may wait before it is due
}

type envelope struct {
	from, to api.NodeID
	frame    []byte
	due      int
}

// Network is a deterministic in-memory network. Not safe for concurrent
// use.
type Network struct {
	rng    *rand.Rand
	faults Faults
	now    int
	queue  []envelope
	cut    map[[2]api.NodeID]bool
	down   map[api.NodeID]bool

	Sent, Dropped, Delivered int
	ByType                   [16]int
}

// NewNetwork returns a network drawing its faults from rng.
func NewNetwork(rng *rand.Rand, f Faults) *Network {
	return &Network{rng: rng, faults: f, cut: make(map[[2]api.NodeID]bool), down: make(map[api.NodeID]bool)}
}

// SetFaults changes the fault rates.
func (n *Network) SetFaults(f Faults) { n.faults = f }

func link(a, b api.NodeID) [2]api.NodeID {
	if a > b {
		a, b = b, a
	}
	return [2]api.NodeID{a, b}
}

// Send queues m. It never blocks and may drop.
func (n *Network) Send(m wire.Msg) {
	n.Sent++
	n.ByType[m.Type&15]++
	if n.rng.Float64() < n.faults.Drop {
		n.Dropped++
		return
	}
	f := wire.Encode(&m)
	copies := 1
	if n.rng.Float64() < n.faults.Dup {
		copies = 2
	}
	for range copies {
		d := 0
		if n.faults.MaxDelay > 0 {
			d = n.rng.IntN(n.faults.MaxDelay + 1)
		}
		n.queue = append(n.queue, envelope{from: m.From, to: m.To, frame: f, due: n.now + d})
	}
}

// Cut drops all messages between a and b, in both directions, until Heal.
func (n *Network) Cut(a, b api.NodeID) { n.cut[link(a, b)] = true }

// Heal undoes Cut(a, b).
func (n *Network) Heal(a, b api.NodeID) { delete(n.cut, link(a, b)) }

// HealAll undoes every Cut.
func (n *Network) HealAll() { clear(n.cut) }

// Cuts returns the cut links.
func (n *Network) Cuts() [][2]api.NodeID {
	var s [][2]api.NodeID
	for l := range n.cut {
		s = append(s, l)
	}
	slices.SortFunc(s, func(a, b [2]api.NodeID) int {
		if a[0] != b[0] {
			return cmpString(a[0], b[0])
		}
		return cmpString(a[1], b[1])
	})
	return s
}

func cmpString(a, b api.NodeID) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Cut reports whether the link between a and b is cut.
func (n *Network) IsCut(a, b api.NodeID) bool { return n.cut[link(a, b)] }

// SetDown marks a node down (crashed): messages to it are lost.
func (n *Network) SetDown(id api.NodeID, down bool) {
	if down {
		n.down[id] = true
	} else {
		delete(n.down, id)
	}
}

// Tick advances the network's clock.
func (n *Network) Tick() { n.now++ }

// Now returns the network's clock.
func (n *Network) Now() int { return n.now }

// Pending returns the number of messages in flight.
func (n *Network) Pending() int { return len(n.queue) }

// Deliver removes one due message, picked at random, and returns it
// decoded. ok is false if no message is due. A message over a cut link or
// to a down node is lost instead (and Deliver tries another).
func (n *Network) Deliver() (m wire.Msg, ok bool) {
	for {
		if len(n.queue) == 0 {
			return wire.Msg{}, false
		}
		i := n.rng.IntN(len(n.queue))
		if n.queue[i].due > n.now {
			// Pick the k-th due message instead.
			due := 0
			for _, e := range n.queue {
				if e.due <= n.now {
					due++
				}
			}
			if due == 0 {
				return wire.Msg{}, false
			}
			k := n.rng.IntN(due)
			for j, e := range n.queue {
				if e.due <= n.now {
					if k == 0 {
						i = j
						break
					}
					k--
				}
			}
		}
		e := n.queue[i]
		last := len(n.queue) - 1
		n.queue[i] = n.queue[last]
		n.queue[last] = envelope{}
		n.queue = n.queue[:last]
		if n.cut[link(e.from, e.to)] || n.down[e.to] {
			n.Dropped++
			continue
		}
		d, err := wire.Decode(e.frame)
		if err != nil {
			panic(fmt.Sprintf("replicatest: frame does not decode: %v", err))
		}
		n.Delivered++
		return *d, true
	}
}

// DropTo discards every message in flight to id (a crash loses them).
func (n *Network) DropTo(id api.NodeID) {
	n.queue = slices.DeleteFunc(n.queue, func(e envelope) bool { return e.to == id })
}

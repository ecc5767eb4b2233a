package replicatest

import (
	"encoding/binary"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica/wire"
)

// Op is one client op of the history.
type Op struct {
	Client int
	ReqID  uint64
	Kind   wire.Kind // write, read or flush
	Block  int64
	Value  uint64 // written, or read
	Call   int64
	Return int64 // 0: never answered
	Epoch  api.Epoch
}

// Client issues one op at a time to the primary the control plane names,
// and retries it (same request id) until it is answered.
type Client struct {
	ID      api.NodeID
	idx     int
	seq     uint64
	cur     *Op
	sentAt  int
	resend  bool
	History []*Op
}

// RetryTicks: a client resends an unanswered op after this many ticks.
const RetryTicks = 8

// Idle reports whether the client has no op outstanding.
func (c *Client) Idle() bool { return c.cur == nil }

// Issue starts an op; the client must be idle.
func (c *Client) Issue(cl *Cluster, kind wire.Kind, block int64, value uint64) {
	c.seq++
	cl.clock++
	c.cur = &Op{Client: c.idx, ReqID: uint64(c.idx+1)<<32 | c.seq, Kind: kind, Block: block, Value: value, Call: cl.clock}
	c.History = append(c.History, c.cur)
	c.send(cl)
}

func (c *Client) send(cl *Cluster) {
	op := c.cur
	m := wire.Msg{Type: wire.TypeRequest, Epoch: cl.CP.Epoch, Partition: cl.cfg.Partition, From: c.ID, To: cl.CP.Primary, ReqID: op.ReqID,
		Kind: op.Kind, Off: op.Block, Len: 1}
	if op.Kind == wire.KindWrite {
		m.Data = binary.LittleEndian.AppendUint64(nil, op.Value)
	}
	c.sentAt = cl.Net.Now()
	c.resend = false
	cl.Net.Send(m)
}

func (c *Client) tick(cl *Cluster) {
	if c.cur != nil && (c.resend || cl.Net.Now()-c.sentAt >= RetryTicks) {
		c.send(cl)
	}
}

func (c *Client) receive(cl *Cluster, m wire.Msg) {
	op := c.cur
	if op == nil || m.ReqID != op.ReqID {
		return // a duplicate or a late answer
	}
	if m.Reject() {
		c.resend = true // on the next tick, to the current primary
		return
	}
	if op.Kind == wire.KindRead {
		if len(m.Data) == 8 {
			op.Value = binary.LittleEndian.Uint64(m.Data)
		}
	}
	op.Return = cl.clock
	op.Epoch = m.Epoch
	c.cur = nil
}

// AddClients adds n clients (c1..cN).
func (cl *Cluster) AddClients(n int) {
	for i := range n {
		cl.Clients = append(cl.Clients, &Client{ID: api.NodeID("c" + string(rune('1'+i))), idx: i})
	}
}

package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand"
	"net"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/erasure"
	"stor.dev/stor/metastore"
	"stor.dev/stor/replica"
	"stor.dev/stor/replica/transport"
	"stor.dev/stor/replica/wire"
	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
	"stor.dev/stor/target/nbd"
	"stor.dev/stor/target/nbd/nbdtest"
)

// The tests run a volume of two partitions on three nodes, each node
// hosting a replica of both partitions (one Pebble, one shard store, one
// journal directory per partition), every node and the volume client on a
// real TCP transport on 127.0.0.1, and a fake control plane per partition
// that promotes and grants (the pattern of replica's remote_test.go, for
// several partitions). A (node, partition) can be cut off: every message
// its replica sends is dropped, while the node's other partition goes on.

const (
	ctlID  api.NodeID = "ctl"
	client api.NodeID = "c1"
	bs4k              = 4096
)

// cutKey is one replica: a node's replica of a partition.
type cutKey struct {
	node api.NodeID
	part api.PartitionID
}

// node is one host: its disk, its transport and its replicas.
type node struct {
	id    api.NodeID
	fs    vfs.FS
	meta  *metastore.DB
	store *erasure.Local
	tr    *transport.TCP
	parts []*replica.Partition
	reps  []atomic.Pointer[replica.Replica] // by partition index
}

// cluster is the nodes, the volume client's endpoints and the control
// planes.
type cluster struct {
	t       *testing.T
	nodes   []*node
	ctls    []*fakeControl // by partition index
	ctr     *transport.TCP // the volume client's transport
	clients []*replica.Client
	base    int // goroutines before the cluster

	mu struct {
		sync.Mutex
		addrs map[api.NodeID]string
		cut   map[cutKey]bool
	}
}

// newCluster starts nodes n1..n3 with a replica of each of parts
// partitions, promotes n1 in every partition, and makes the Clients of the
// volume client; Cleanup stops it all and checks no goroutine is left.
func newCluster(t *testing.T, parts int) *cluster {
	t.Helper()
	c := &cluster{t: t, base: runtime.NumGoroutine()}
	c.mu.addrs = make(map[api.NodeID]string)
	c.mu.cut = make(map[cutKey]bool)
	ids := []api.NodeID{"n1", "n2", "n3"}
	for p := range parts {
		f := &fakeControl{c: c, part: api.PartitionID(p), inSync: make(map[api.NodeID]bool)}
		for _, id := range ids {
			f.inSync[id] = true
		}
		c.ctls = append(c.ctls, f)
	}
	t.Cleanup(c.close)
	for _, id := range ids {
		nd := &node{id: id, fs: vfs.NewMem(), reps: make([]atomic.Pointer[replica.Replica], parts)}
		c.nodes = append(c.nodes, nd)
		nd.tr = c.listen(id, func(m *wire.Msg) {
			if int(m.Partition) < parts {
				if r := nd.reps[m.Partition].Load(); r != nil {
					r.Deliver(m)
				}
			}
		})
		c.open(nd, parts)
	}
	cls := make([]atomic.Pointer[replica.Client], parts) // the transport's readers see them
	c.ctr = c.listen(client, func(m *wire.Msg) {
		if int(m.Partition) < parts {
			if cl := cls[m.Partition].Load(); cl != nil {
				cl.Deliver(m)
			}
		}
	})
	for p := range parts {
		cl, err := replica.NewClient(replica.ClientConfig{Self: client, Partition: api.PartitionID(p), Replicas: ids,
			Send: c.ctr.Send, AttemptTimeout: 300 * time.Millisecond,
			Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("node", client)})
		if err != nil {
			t.Fatal(err)
		}
		cls[p].Store(cl)
		c.clients = append(c.clients, cl)
	}
	for p := range parts {
		c.promote(api.PartitionID(p), "n1")
	}
	return c
}

// listen starts a transport for id on 127.0.0.1.
func (c *cluster) listen(id api.NodeID, deliver func(*wire.Msg)) *transport.TCP {
	c.t.Helper()
	tr, err := transport.New(transport.Config{Self: id, Listen: "127.0.0.1:0", Resolve: c.resolve, Deliver: deliver,
		Logger: slog.New(slog.NewTextHandler(testWriter{c.t}, nil)).With("transport", id)})
	if err != nil {
		c.t.Fatal(err)
	}
	c.mu.Lock()
	c.mu.addrs[id] = tr.Addr().String()
	c.mu.Unlock()
	return tr
}

func (c *cluster) resolve(id api.NodeID) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.mu.addrs[id]
	return a, ok
}

// open starts a node's replicas from its disk.
func (c *cluster) open(nd *node, parts int) {
	t := c.t
	t.Helper()
	ctx := context.Background()
	var err error
	nd.meta, err = metastore.Open("meta", metastore.Options{FS: nd.fs, BeforeFlush: func() {
		for i := range nd.reps {
			if r := nd.reps[i].Load(); r != nil {
				r.SyncJournal(ctx)
			}
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if nd.store, err = erasure.OpenLocal(nd.fs, "store"); err != nil {
		t.Fatal(err)
	}
	for i := range parts {
		part := api.PartitionID(i)
		p, err := replica.OpenReplicaPartition(ctx, metastore.PKey(1, uint32(i)), nd.meta, nd.store,
			replica.Options{FS: nd.fs, Dir: fmt.Sprintf("journal-%d", i), SegmentSize: 4 << 20, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		nd.parts = append(nd.parts, p)
		r, err := replica.OpenReplica(ctx, p, replica.ReplicaConfig{
			Core:   replica.CoreConfig{ID: nd.id, Partition: part, Control: ctlID, PeerTimeoutTicks: 10, RetryTicks: 3},
			Send:   func(m *wire.Msg) { c.send(nd, m) },
			Tick:   5 * time.Millisecond,
			Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("node", nd.id, "partition", i),
		})
		if err != nil {
			t.Fatal(err)
		}
		nd.reps[i].Store(r)
	}
}

// close stops the client's transport, the nodes' transports and every
// replica, and waits until no goroutine of theirs is left.
func (c *cluster) close() {
	t := c.t
	t.Helper()
	if c.ctr != nil {
		if err := c.ctr.Close(); err != nil {
			t.Error(err)
		}
	}
	for _, nd := range c.nodes {
		if err := nd.tr.Close(); err != nil {
			t.Error(err)
		}
	}
	for _, nd := range c.nodes {
		for i := range nd.reps {
			if r := nd.reps[i].Load(); r != nil {
				if err := r.Close(); err != nil {
					t.Error(err)
				}
				nd.reps[i].Store(nil)
			}
		}
		for _, p := range nd.parts {
			if err := p.Close(); err != nil {
				t.Error(err)
			}
		}
		if nd.meta != nil {
			nd.meta.Close()
		}
		if nd.store != nil {
			nd.store.Close()
		}
	}
	waitUntil(t, "no goroutine left", func() bool { return runtime.NumGoroutine() <= c.base })
}

func (c *cluster) node(id api.NodeID) *node {
	for _, nd := range c.nodes {
		if nd.id == id {
			return nd
		}
	}
	c.t.Fatalf("no node %s", id)
	return nil
}

func (c *cluster) setCut(id api.NodeID, p api.PartitionID, cut bool) {
	c.mu.Lock()
	c.mu.cut[cutKey{id, p}] = cut
	c.mu.Unlock()
}

// send is every replica's transport (from is its node): a message from or
// to a cut-off replica is dropped; one to the control plane goes to the
// partition's fake, through a wire round trip; the rest go by TCP.
func (c *cluster) send(from *node, m *wire.Msg) {
	c.mu.Lock()
	drop := c.mu.cut[cutKey{m.From, m.Partition}] || c.mu.cut[cutKey{m.To, m.Partition}]
	c.mu.Unlock()
	if drop {
		return
	}
	if m.To != ctlID {
		from.tr.Send(m)
		return
	}
	d, err := wire.Decode(wire.Encode(m))
	if err != nil {
		panic(fmt.Sprintf("wire round trip of %v: %v", m, err))
	}
	if int(d.Partition) < len(c.ctls) {
		c.ctls[d.Partition].handle(d)
	}
}

// fromControl delivers a control plane's message to its replica, through
// a wire round trip, unless that replica is cut off.
func (c *cluster) fromControl(m *wire.Msg) {
	c.mu.Lock()
	drop := c.mu.cut[cutKey{m.To, m.Partition}]
	c.mu.Unlock()
	if drop {
		return
	}
	d, err := wire.Decode(wire.Encode(m))
	if err != nil {
		panic(fmt.Sprintf("wire round trip of %v: %v", m, err))
	}
	for _, nd := range c.nodes {
		if nd.id == d.To {
			if r := nd.reps[d.Partition].Load(); r != nil {
				r.Deliver(d)
			}
		}
	}
}

// fakeControl is the control plane of one partition: promotions, grants
// for the in-sync set and solo blessings (as replica's tests have it).
type fakeControl struct {
	c    *cluster
	part api.PartitionID
	mu   sync.Mutex
	// Guarded by mu.
	epoch   api.Epoch
	primary api.NodeID
	inSync  map[api.NodeID]bool
	lastSeq uint64
}

func (f *fakeControl) handle(m *wire.Msg) {
	f.mu.Lock()
	if m.Type != wire.TypeControl {
		f.mu.Unlock()
		return
	}
	if m.Epoch < f.epoch {
		st := &wire.Msg{Type: wire.TypeStale, Epoch: f.epoch, Partition: f.part, From: ctlID, To: m.From}
		f.mu.Unlock()
		f.c.fromControl(st)
		return
	}
	if m.Epoch != f.epoch || m.From != f.primary || m.ReqID <= f.lastSeq {
		f.mu.Unlock()
		return
	}
	f.lastSeq = m.ReqID
	g := &wire.Msg{Type: wire.TypeGrant, Epoch: f.epoch, Partition: f.part, From: ctlID, To: m.From, Kind: m.Kind,
		ReqID: m.ReqID, Peers: m.Peers}
	switch m.Kind {
	case wire.CtlDropPeer:
		delete(f.inSync, m.Peers[0])
	case wire.CtlInSync:
		f.inSync[m.Peers[0]] = true
	case wire.CtlBless:
		if len(f.inSync) != 1 || !f.inSync[f.primary] {
			g.Flags = wire.FlagReject
		}
	}
	f.mu.Unlock()
	f.c.fromControl(g)
}

// promote makes id primary of partition p at the next epoch, with in-sync
// peers as the control plane records them (less any in out), and waits
// until it serves.
func (c *cluster) promote(p api.PartitionID, id api.NodeID, out ...api.NodeID) api.Epoch {
	c.t.Helper()
	f := c.ctls[p]
	f.mu.Lock()
	f.epoch++
	f.primary = id
	f.lastSeq = 0
	for _, o := range out {
		delete(f.inSync, o)
	}
	f.inSync[id] = true
	m := wire.Msg{Type: wire.TypePromote, Epoch: f.epoch, Partition: p, From: ctlID, To: id}
	for _, nd := range c.nodes {
		if nd.id != id {
			m.Peers = append(m.Peers, nd.id)
			b := byte(0)
			if f.inSync[nd.id] {
				b = 1
			}
			m.Data = append(m.Data, b)
		}
	}
	epoch := f.epoch
	f.mu.Unlock()
	rep := c.node(id).reps[p].Load()
	// Resend until it serves: a promotion may be dropped like any message.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.fromControl(&m)
		until := time.Now().Add(50 * time.Millisecond)
		for time.Now().Before(until) {
			if s := rep.Status(); s.Role == replica.RolePrimary && s.Epoch == epoch {
				return epoch
			}
			time.Sleep(time.Millisecond)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s not primary of partition %d at epoch %d: %+v", id, p, epoch, rep.Status())
		}
	}
}

// testWriter sends log lines to the test's log (shown on failure or -v).
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimSuffix(b, []byte("\n"))))
	return len(b), nil
}

// waitUntil polls cond until it holds, failing after 10 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestDeviceSplitsAtPartitions: the geometry checks come first and send
// nothing; a request is cut at partition boundaries with offsets relative
// to the partition, and a short last partition is addressed.
func TestDeviceSplitsAtPartitions(t *testing.T) {
	cl, err := replica.NewClient(replica.ClientConfig{Self: client, Replicas: []api.NodeID{"n1"},
		Send: func(*wire.Msg) { t.Error("a request was sent") }})
	if err != nil {
		t.Fatal(err)
	}
	geo := target.Geometry{Size: 5 * bs4k * 2, BlockSize: 512} // 10 units in partitions of 4: 4+4+2
	d := NewDevice(geo, 4*bs4k, []*replica.Client{cl, cl, cl})
	ps, err := d.split(3*bs4k+512, 6*bs4k)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(ps), fmt.Sprint([]piece{
		{part: 0, poff: 3*bs4k + 512, roff: 0, n: bs4k - 512},
		{part: 1, poff: 0, roff: bs4k - 512, n: 4 * bs4k},
		{part: 2, poff: 0, roff: 5*bs4k - 512, n: bs4k + 512},
	}); got != want {
		t.Fatalf("pieces %s, want %s", got, want)
	}
	if ps, err := d.split(geo.Size-512, 512); err != nil || len(ps) != 1 || ps[0].part != 2 || ps[0].poff != 2*bs4k-512 {
		t.Fatalf("last block: %v %v", ps, err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		off, n int64
		want   error
	}{{geo.Size - 512, 1024, target.ErrOutOfRange}, {geo.Size, 512, target.ErrOutOfRange}, {1, 512, target.ErrInvalid},
		{-512, 512, target.ErrInvalid}, {0, 100, target.ErrInvalid}} {
		if err := d.WriteZeroes(ctx, tc.off, tc.n, false); !errors.Is(err, tc.want) {
			t.Errorf("WriteZeroes(%d, %d): %v, want %v", tc.off, tc.n, err, tc.want)
		}
		if err := d.ReadAt(ctx, make([]byte, max(tc.n, 0)), tc.off); !errors.Is(err, tc.want) {
			t.Errorf("ReadAt(%d, %d): %v, want %v", tc.off, tc.n, err, tc.want)
		}
		if tc.n >= 0 {
			if err := writeAsync(ctx, d, make([]byte, tc.n), tc.off); !errors.Is(err, tc.want) {
				t.Errorf("WriteAtAsync(%d, %d): %v, want %v", tc.off, tc.n, err, tc.want)
			}
		}
	}
	if err := writeAsync(ctx, d, nil, 0); err != nil {
		t.Errorf("empty asynchronous write: %v", err)
	}
	if err := d.Trim(ctx, 0, 0); err != nil {
		t.Errorf("empty trim: %v", err)
	}
	ro := geo
	ro.ReadOnly = true
	if err := NewDevice(ro, 4*bs4k, []*replica.Client{cl, cl, cl}).WriteAt(ctx, make([]byte, 512), 1, false); !errors.Is(err, target.ErrReadOnly) {
		t.Errorf("write to a read-only device: %v", err)
	}
	if err := writeAsync(ctx, NewDevice(ro, 4*bs4k, []*replica.Client{cl, cl, cl}), make([]byte, 512), 1); !errors.Is(err, target.ErrReadOnly) {
		t.Errorf("asynchronous write to a read-only device: %v", err)
	}
	for name, f := range map[string]func(){
		"a partition size not a multiple of 4 KiB": func() { NewDevice(geo, 4*bs4k+512, []*replica.Client{cl, cl, cl}) },
		"too few clients":                          func() { NewDevice(geo, 4*bs4k, []*replica.Client{cl, cl}) },
		"too many clients":                         func() { NewDevice(geo, 8*bs4k, []*replica.Client{cl, cl, cl}) },
		"a nil client":                             func() { NewDevice(geo, 4*bs4k, []*replica.Client{cl, nil, cl}) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewDevice with %s did not panic", name)
				}
			}()
			f()
		}()
	}
}

// writeAsync is d.WriteAtAsync, waited for.
func writeAsync(ctx context.Context, d *Device, p []byte, off int64) error {
	ch := make(chan error, 2)
	d.WriteAtAsync(ctx, p, off, false, func(err error) { ch <- err })
	return <-ch
}

// TestDeviceWriteAtAsync: asynchronous writes within a partition and
// across the boundary, many at once, land on the replicas and read back.
func TestDeviceWriteAtAsync(t *testing.T) {
	c := newCluster(t, 2)
	const psize = 1 << 20
	d := NewDevice(target.Geometry{Size: 2 * psize, BlockSize: 512}, psize, c.clients)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rng := rand.New(rand.NewSource(7))
	want := make([]byte, 2*psize)
	type w struct {
		off int64
		p   []byte
	}
	var ws []w
	for i := range 64 {
		n := int64(4096 * (1 + rng.Intn(4)))
		off := int64(i) * 32 << 10 // 32 KiB apart: disjoint
		switch i {
		case 31:
			off, n = psize-8192, 16384 // across the boundary
		case 32:
			off = psize + 8192
		}
		p := make([]byte, n)
		rng.Read(p)
		ws = append(ws, w{off, p})
	}
	errs := make(chan error, len(ws))
	for _, x := range ws {
		copy(want[x.off:], x.p)
		d.WriteAtAsync(ctx, x.p, x.off, false, func(err error) { errs <- err })
	}
	for range ws {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	got := make([]byte, 2*psize)
	if err := d.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the device does not read back what the asynchronous writes wrote")
	}
}

// scriptedPart is one partition's replica set played by a test: every
// Request its Client sends lands on reqs, to be answered (or not) by hand.
type scriptedPart struct {
	cl   *replica.Client
	reqs chan *wire.Msg
}

func newScriptedPart(t *testing.T, p api.PartitionID) *scriptedPart {
	s := &scriptedPart{reqs: make(chan *wire.Msg, 16)}
	cl, err := replica.NewClient(replica.ClientConfig{Self: client, Partition: p, Replicas: []api.NodeID{"n1"},
		Send: func(m *wire.Msg) {
			c := *m
			c.Data = bytes.Clone(m.Data) // Send must be done with Data on return
			select {
			case s.reqs <- &c:
			default:
				t.Errorf("partition %d: request %v dropped", p, m)
			}
		},
		AttemptTimeout: time.Minute, // no retries in these tests
		Logger:         slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	s.cl = cl
	return s
}

// recv returns the next Request, which must be of kind k.
func (s *scriptedPart) recv(t *testing.T, k wire.Kind) *wire.Msg {
	t.Helper()
	select {
	case m := <-s.reqs:
		if m.Kind != k {
			t.Fatalf("partition %d: got %v, want a %v", m.Partition, m, k)
		}
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("no %v request", k)
		return nil
	}
}

// answer replies to m as the primary at epoch 1: accepted, with data for
// a read, or rejected for reason.
func (s *scriptedPart) answer(m *wire.Msg, reason replica.RejectReason) {
	r := &wire.Msg{Type: wire.TypeReply, Kind: m.Kind, Epoch: 1, Partition: m.Partition, ReqID: m.ReqID, From: m.To, To: m.From}
	switch {
	case reason != 0:
		r.Flags, r.Data = wire.FlagReject, []byte{byte(reason)}
	case m.Kind == wire.KindRead:
		r.Data = bytes.Repeat([]byte{byte(m.Partition) + 1}, int(m.Len))
	}
	s.cl.Deliver(r)
}

// TestDevicePiecesRunConcurrently: the pieces of a request that straddles
// a partition boundary are all sent before any is answered, with offsets
// relative to their partitions; a FUA write is flushed on each partition
// it touched; a piece that fails cancels the others (the call returns its
// error, not a stall); Flush reaches every partition.
func TestDevicePiecesRunConcurrently(t *testing.T) {
	const psize = 1 << 20
	ps := []*scriptedPart{newScriptedPart(t, 0), newScriptedPart(t, 1)}
	dev := NewDevice(target.Geometry{Size: 2 * psize, BlockSize: 512}, psize, []*replica.Client{ps[0].cl, ps[1].cl})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	result := func() error {
		t.Helper()
		select {
		case err := <-errc:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("the call did not return")
			return nil
		}
	}

	data := make([]byte, 3*bs4k)
	rand.New(rand.NewSource(3)).Read(data)
	go func() { errc <- dev.WriteAt(ctx, data, psize-bs4k, true) }()
	w0, w1 := ps[0].recv(t, wire.KindWrite), ps[1].recv(t, wire.KindWrite)
	if w0.Off != psize-bs4k || w0.Len != bs4k || !bytes.Equal(w0.Data, data[:bs4k]) {
		t.Errorf("partition 0 piece [%d,+%d)", w0.Off, w0.Len)
	}
	if w1.Off != 0 || w1.Len != 2*bs4k || !bytes.Equal(w1.Data, data[bs4k:]) {
		t.Errorf("partition 1 piece [%d,+%d)", w1.Off, w1.Len)
	}
	ps[1].answer(w1, 0)
	ps[0].answer(w0, 0)
	ps[0].answer(ps[0].recv(t, wire.KindFlush), 0) // FUA, per piece
	ps[1].answer(ps[1].recv(t, wire.KindFlush), 0)
	if err := result(); err != nil {
		t.Fatalf("FUA write across the boundary: %v", err)
	}

	buf := make([]byte, 2*bs4k)
	go func() { errc <- dev.ReadAt(ctx, buf, psize-bs4k) }()
	r0, r1 := ps[0].recv(t, wire.KindRead), ps[1].recv(t, wire.KindRead)
	ps[0].answer(r0, 0)
	ps[1].answer(r1, 0)
	if err := result(); err != nil {
		t.Fatal(err)
	}
	if want := append(bytes.Repeat([]byte{1}, bs4k), bytes.Repeat([]byte{2}, bs4k)...); !bytes.Equal(buf, want) {
		t.Fatal("a read across the boundary did not put each piece in its place")
	}

	go func() { errc <- dev.ReadAt(ctx, buf, psize-bs4k) }()
	r0, _ = ps[0].recv(t, wire.KindRead), ps[1].recv(t, wire.KindRead) // partition 1 never answers
	ps[0].answer(r0, replica.RejectInvalid)
	if err := result(); !errors.Is(err, target.ErrInvalid) || ctx.Err() != nil {
		t.Fatalf("a read with a piece refused: %v, want ErrInvalid at once", err)
	}

	go func() { errc <- dev.Flush(ctx) }()
	ps[1].answer(ps[1].recv(t, wire.KindFlush), 0)
	ps[0].answer(ps[0].recv(t, wire.KindFlush), 0)
	if err := result(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// TestDeviceConformance: the BlockDevice conformance suite on a Device
// over two partitions of three replicas each, on TCP; the device's middle
// is a partition boundary, so the suite's ranges often straddle it.
func TestDeviceConformance(t *testing.T) {
	// The suite moves about 200 MiB through 3 replicas; under -race the
	// collector freeing those message buffers (every free clears race
	// shadow memory) took a third of the time. The heap stays small.
	defer debug.SetGCPercent(debug.SetGCPercent(400))
	blockdevtest.Run(t, func(t *testing.T, geo target.Geometry) target.BlockDevice {
		c := newCluster(t, 2)
		return NewDevice(geo, geo.Size/2, c.clients)
	})
}

// catalog offers one Device as the export "vol".
type catalog struct{ dev *Device }

type openDevice struct{ *Device }

func (openDevice) Info() target.Export { return target.Export{Name: "vol", ID: "vol-1"} }
func (openDevice) Close() error        { return nil }

func (c catalog) List(ctx context.Context) ([]target.Export, error) {
	return []target.Export{openDevice{}.Info()}, nil
}

func (c catalog) Open(ctx context.Context, name string) (target.Device, error) {
	if name != "vol" {
		return nil, target.ErrNotFound
	}
	return openDevice{c.dev}, nil
}

// serveNBD serves dev over NBD on 127.0.0.1 and returns a connected
// nbdtest client; Cleanup closes both.
func serveNBD(t *testing.T, dev *Device) *nbdtest.Client {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Catalog: catalog{dev}})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, err := nbdtest.Dial(ctx, ln.Addr().String(), "vol")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	if nc.Size != dev.Geometry().Size {
		t.Fatalf("export size %d, want %d", nc.Size, dev.Geometry().Size)
	}
	return nc
}

// TestNBDFailover: a Device over two partitions, served over NBD and
// driven by nbdtest. 300 random 4 KiB blocks across both partitions are
// written from 4 goroutines (after one write straddling the partition
// boundary) and read back; then, while 2 goroutines keep writing,
// partition 0 fails over: n2 is promoted at a higher epoch and n1, its
// primary, is cut off (partition 1 stays on n1). Every NBD reply has
// error 0; afterwards every acknowledged block reads back exactly through
// NBD, block by block and in one read, and a FLUSH succeeds.
func TestNBDFailover(t *testing.T) {
	const (
		psize  = 1 << 20
		blocks = 2 * psize / bs4k
	)
	c := newCluster(t, 2)
	dev := NewDevice(target.Geometry{Size: 2 * psize, BlockSize: 512}, psize, c.clients)
	nc := serveNBD(t, dev)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	var (
		mu    sync.Mutex // guards model and errs
		model = make(map[int64][]byte)
		errs  []error
	)
	rng := rand.New(rand.NewSource(1))
	block := func(rng *rand.Rand) []byte {
		d := make([]byte, bs4k)
		rng.Read(d)
		return d
	}
	// One write across the boundary: blocks [blocks/2-8, blocks/2+8).
	span := make([]byte, 16*bs4k)
	rng.Read(span)
	if err := nc.WriteAt(ctx, span, (blocks/2-8)*bs4k, true); err != nil {
		t.Fatalf("write across the partition boundary: %v", err)
	}
	for i := range int64(16) {
		model[blocks/2-8+i] = span[i*bs4k : (i+1)*bs4k]
	}
	// writer writes random blocks b with b%of == w until n are acked or
	// stop is closed, recording each acked one in the model.
	writer := func(w, of int64, seed int64, n int, stop <-chan struct{}, acked, acked0 *atomic.Int64) {
		wr := rand.New(rand.NewSource(seed))
		for i := 0; n < 0 || i < n; i++ {
			select {
			case <-stop:
				return
			default:
			}
			b := wr.Int63n(blocks/of)*of + w
			d := block(wr)
			err := nc.WriteAt(ctx, d, b*bs4k, i%16 == 15)
			mu.Lock()
			if err != nil {
				errs = append(errs, fmt.Errorf("writer %d: write block %d: %w", w, b, err))
			} else {
				model[b] = d
			}
			mu.Unlock()
			if err != nil {
				return
			}
			if acked != nil {
				acked.Add(1)
				if b < blocks/2 {
					acked0.Add(1)
				}
			}
		}
	}
	const writers = 4
	var wg sync.WaitGroup
	for w := range int64(writers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			writer(w, writers, 100+w, 300/writers, nil, nil, nil)
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatal(errors.Join(errs...))
	}
	checkNBD(t, ctx, nc, model, blocks)

	// Failover of partition 0 while 2 goroutines write.
	var (
		stop           = make(chan struct{})
		acked, acked0  atomic.Int64
		stopped        bool
		before0        = c.clients[0].Stats()
		primary1, ep1  = c.clients[1].Route()
		failoverWriter = func() {
			for w := range int64(2) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					writer(w, 2, 200+w, -1, stop, &acked, &acked0)
				}()
			}
		}
	)
	failoverWriter()
	defer func() {
		if !stopped { // failing: end the writers' calls at once
			cancel()
			close(stop)
			wg.Wait()
		}
	}()
	waitUntil(t, "writes before the failover", func() bool { return acked.Load() >= 20 })
	c.setCut("n1", 0, true)
	epoch := c.promote(0, "n2", "n1")
	mark, mark0 := acked.Load(), acked0.Load()
	waitUntil(t, "writes after the failover", func() bool {
		p, e := c.clients[0].Route()
		mu.Lock()
		failed := len(errs) > 0
		mu.Unlock()
		return failed || (acked.Load() >= mark+20 && acked0.Load() >= mark0+10 && p == "n2" && e == epoch)
	})
	close(stop)
	stopped = true
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("an NBD write failed across the failover: %v", errors.Join(errs...))
	}
	if st := c.clients[0].Stats(); st.Timeouts == before0.Timeouts {
		t.Errorf("partition 0 client stats %+v (before %+v): no attempt timed out on the cut-off primary", st, before0)
	}
	if p, e := c.clients[1].Route(); p != primary1 || e != ep1 || p != "n1" {
		t.Errorf("partition 1 route %s@%d, want it unchanged at n1@%d", p, e, ep1)
	}
	t.Logf("%d writes during the failover, %d on partition 0 after it; partition 0 client %+v",
		acked.Load(), acked0.Load()-mark0, c.clients[0].Stats())

	if err := nc.Flush(ctx); err != nil {
		t.Fatalf("FLUSH: %v", err)
	}
	checkNBD(t, ctx, nc, model, blocks)
	if p, _ := c.clients[0].Route(); p != "n2" {
		t.Fatalf("partition 0 reads went to %s", p)
	}
}

// checkNBD reads every block of model through nc, one by one, and the
// whole device in one read, and compares.
func checkNBD(t *testing.T, ctx context.Context, nc *nbdtest.Client, model map[int64][]byte, blocks int64) {
	t.Helper()
	buf := make([]byte, bs4k)
	for b, d := range model {
		if err := nc.ReadAt(ctx, buf, b*bs4k); err != nil {
			t.Fatalf("NBD read of block %d: %v", b, err)
		}
		if !bytes.Equal(buf, d) {
			t.Fatalf("block %d reads %x..., want %x...", b, buf[:8], d[:8])
		}
	}
	all := make([]byte, blocks*bs4k)
	if err := nc.ReadAt(ctx, all, 0); err != nil {
		t.Fatalf("NBD read of the device: %v", err)
	}
	zero := make([]byte, bs4k)
	for b := range blocks {
		want, ok := model[b]
		if !ok {
			want = zero
		}
		if got := all[b*bs4k : (b+1)*bs4k]; !bytes.Equal(got, want) {
			t.Fatalf("one read of the device: block %d = %x..., want %x...", b, got[:8], want[:8])
		}
	}
}

package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica/transport"
	"stor.dev/stor/replica/wire"
	"stor.dev/stor/target"
)

// The Client tests: a Client against scripted replicas, and against three
// Replicas over real TCP transports through a failover. (A Replica's
// answers to remote Requests: TestReplicaRemoteRequests.)

// scripted is a replica set played by a test: Send hands each Request to
// answer, which may Deliver a Reply at once or not at all.
type scripted struct {
	mu   sync.Mutex
	sent []wire.Msg
	cl   *Client
	// answer returns the Reply to a Request, or nil to drop it.
	answer func(m *wire.Msg, nth int) *wire.Msg
}

func (s *scripted) send(m *wire.Msg) {
	s.mu.Lock()
	s.sent = append(s.sent, *m)
	n := len(s.sent)
	s.mu.Unlock()
	if r := s.answer(m, n); r != nil {
		r.Type, r.Partition, r.ReqID, r.From, r.To = wire.TypeReply, m.Partition, m.ReqID, m.To, m.From
		if r.Kind == 0 {
			r.Kind = m.Kind
		}
		s.cl.Deliver(r)
	}
}

func (s *scripted) attempts() []wire.Msg {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]wire.Msg(nil), s.sent...)
}

func newScripted(t *testing.T, answer func(m *wire.Msg, nth int) *wire.Msg) *scripted {
	s := &scripted{answer: answer}
	cl, err := NewClient(ClientConfig{Self: "c1", Partition: 7, Replicas: []api.NodeID{"a", "b", "c"}, Send: s.send,
		AttemptTimeout: 50 * time.Millisecond, Backoff: time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	s.cl = cl
	return s
}

// TestRemoteClientRetriesSameRequest: a Client follows a reject's hint at
// once, retries a timed-out attempt on the next replica, comes back round
// the set to the hinted primary, and sends every attempt with the same
// request id and the learned epoch; the next op gets a new id of the same
// client prefix.
func TestRemoteClientRetriesSameRequest(t *testing.T) {
	s := newScripted(t, func(m *wire.Msg, nth int) *wire.Msg {
		switch {
		case m.To != "b":
			return &wire.Msg{Flags: wire.FlagReject, Epoch: 3, Data: []byte{byte(RejectNotPrimary)}, Peers: []api.NodeID{"b"}}
		case nth == 2:
			return nil // lost
		case m.Epoch != 3:
			return &wire.Msg{Flags: wire.FlagReject, Epoch: 3, Data: []byte{byte(RejectNotPrimary)}, Peers: []api.NodeID{"b"}}
		case m.Kind == wire.KindRead:
			return &wire.Msg{Epoch: 3, Index: 12, Data: bytes.Repeat([]byte{7}, int(m.Len))}
		}
		return &wire.Msg{Epoch: 3, Index: 11}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.cl.Write(ctx, []byte("data"), 4096, false); err != nil {
		t.Fatal(err)
	}
	at := s.attempts()
	var route []string
	for _, m := range at {
		route = append(route, fmt.Sprintf("%s@%d", m.To, m.Epoch))
		if m.ReqID != at[0].ReqID || m.Kind != wire.KindWrite || m.Off != 4096 || string(m.Data) != "data" || m.From != "c1" {
			t.Fatalf("attempt %v differs from the first %v", m, at[0])
		}
	}
	if got, want := fmt.Sprint(route), "[a@0 b@3 c@3 a@3 b@3]"; got != want {
		t.Fatalf("attempts went to %s, want %s", got, want)
	}
	if p, e := s.cl.Route(); p != "b" || e != 3 {
		t.Fatalf("route %s@%d, want b@3", p, e)
	}
	if st := s.cl.Stats(); st.Requests != 1 || st.Attempts != 5 || st.Timeouts != 1 || st.Rejects != 3 {
		t.Fatalf("stats %+v", st)
	}
	buf := make([]byte, 5)
	if err := s.cl.ReadAt(ctx, buf, 0); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{7}, 5)) {
		t.Fatalf("read: %v %v", buf, err)
	}
	at = s.attempts()
	if r := at[len(at)-1]; len(at) != 6 || r.To != "b" || r.ReqID == at[0].ReqID || r.ReqID>>32 != at[0].ReqID>>32 {
		t.Fatalf("read attempts %v after the write's %v", at[5:], at[0])
	}
}

// TestRemoteClientErrors: a call stalls (never fails) while no replica
// answers, until its context ends; a request a replica calls invalid, and
// a read the primary could not read, fail at once; a read reply of the
// wrong length is ErrBadReply; bad arguments never reach the wire.
func TestRemoteClientErrors(t *testing.T) {
	var reason atomic.Uint32
	s := newScripted(t, func(m *wire.Msg, _ int) *wire.Msg {
		switch r := RejectReason(reason.Load()); r {
		case 0:
			return nil
		case 255:
			return &wire.Msg{Epoch: 1, Data: []byte{1, 2}} // a short read
		default:
			return &wire.Msg{Flags: wire.FlagReject, Epoch: 1, Data: []byte{byte(r)}}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := s.cl.Flush(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("flush with no replica answering: %v", err)
	}
	if st := s.cl.Stats(); st.Timeouts < 3 {
		t.Fatalf("stats %+v: want attempts on every replica", st)
	}
	ctx = context.Background()
	for _, tc := range []struct {
		reason RejectReason
		want   error
	}{{RejectInvalid, target.ErrInvalid}, {RejectIO, target.ErrIO}, {255, ErrBadReply}} {
		reason.Store(uint32(tc.reason))
		before := len(s.attempts())
		if err := s.cl.ReadAt(ctx, make([]byte, 4), 0); !errors.Is(err, tc.want) {
			t.Fatalf("%v: %v, want %v", tc.reason, err, tc.want)
		}
		if n := len(s.attempts()) - before; n != 1 {
			t.Fatalf("%v: %d attempts, want 1", tc.reason, n)
		}
	}
	before := len(s.attempts())
	if err := s.cl.Write(ctx, make([]byte, 4), -4096, false); !errors.Is(err, target.ErrInvalid) {
		t.Fatalf("write at a negative offset: %v", err)
	}
	if err := s.cl.Write(ctx, nil, 0, false); err != nil {
		t.Fatalf("empty write: %v", err)
	}
	if n := len(s.attempts()) - before; n != 0 {
		t.Fatalf("%d requests sent for calls that need none", n)
	}
}

// TestRemoteClientWriteAsync: WriteAsync retries as Write does, under one
// request id, and calls done exactly once: on the delivering goroutine when
// the first attempt is accepted, after retries, or with the error (an
// invalid request, a reply of the wrong kind, ctx ending, which ends the
// call at once even while the attempt has long to go); a flush (fua) or a
// write over MaxRequest takes the Write path.
func TestRemoteClientWriteAsync(t *testing.T) {
	var mode atomic.Uint32 // 0: the retry script; 1 accept; 2 invalid; 3 wrong kind; 4 silence
	s := newScripted(t, func(m *wire.Msg, nth int) *wire.Msg {
		switch mode.Load() {
		case 1:
			return &wire.Msg{Epoch: 3, Index: api.OpNum(nth)}
		case 2:
			return &wire.Msg{Flags: wire.FlagReject, Epoch: 3, Data: []byte{byte(RejectInvalid)}}
		case 3:
			return &wire.Msg{Epoch: 3, Kind: wire.KindTrim}
		case 4:
			return nil
		}
		switch {
		case m.To != "b" || m.Epoch != 3:
			return &wire.Msg{Flags: wire.FlagReject, Epoch: 3, Data: []byte{byte(RejectNotPrimary)}, Peers: []api.NodeID{"b"}}
		case nth == 2:
			return nil // lost
		}
		return &wire.Msg{Epoch: 3, Index: 11}
	})
	var calls atomic.Int32
	async := func(ctx context.Context, data []byte, off int64, fua bool) (err error, inline bool) {
		ch := make(chan error, 2)
		returned := false
		var inl bool
		var mu sync.Mutex
		s.cl.WriteAsync(ctx, data, off, fua, func(err error) {
			calls.Add(1)
			mu.Lock()
			inl = !returned
			mu.Unlock()
			ch <- err
		})
		mu.Lock()
		returned = true
		mu.Unlock()
		err = <-ch
		mu.Lock()
		defer mu.Unlock()
		return err, inl
	}
	ctx := context.Background()
	if err, _ := async(ctx, []byte("data"), 4096, false); err != nil {
		t.Fatal(err)
	}
	at := s.attempts()
	var route []string
	for _, m := range at {
		route = append(route, fmt.Sprintf("%s@%d", m.To, m.Epoch))
		if m.ReqID != at[0].ReqID || string(m.Data) != "data" {
			t.Fatalf("attempt %v differs from the first %v", m, at[0])
		}
	}
	if got, want := fmt.Sprint(route), "[a@0 b@3 c@3 a@3 b@3]"; got != want {
		t.Fatalf("attempts went to %s, want %s", got, want)
	}

	mode.Store(1)
	if err, inline := async(ctx, []byte("more"), 0, false); err != nil || !inline {
		t.Fatalf("accepted at once: err %v, done on the delivering goroutine %v", err, inline)
	}
	before := len(s.attempts())
	if err, _ := async(ctx, []byte("flushed"), 0, true); err != nil {
		t.Fatal(err)
	}
	if err, _ := async(ctx, make([]byte, MaxRequest+4096), 0, false); err != nil {
		t.Fatal(err)
	}
	at = s.attempts()[before:]
	if len(at) != 4 || at[0].Kind != wire.KindWrite || at[1].Kind != wire.KindFlush || at[2].Len != MaxRequest || at[3].Len != 4096 {
		t.Fatalf("fua and split writes sent %v", at)
	}
	if err, _ := async(ctx, nil, 0, false); err != nil {
		t.Fatalf("empty write: %v", err)
	}
	if err, _ := async(ctx, []byte("x"), -4096, false); !errors.Is(err, target.ErrInvalid) {
		t.Fatalf("negative offset: %v", err)
	}

	mode.Store(2)
	if err, _ := async(ctx, []byte("data"), 0, false); !errors.Is(err, target.ErrInvalid) {
		t.Fatalf("refused as invalid: %v", err)
	}
	mode.Store(3)
	if err, _ := async(ctx, []byte("data"), 0, false); !errors.Is(err, ErrBadReply) {
		t.Fatalf("a trim's reply: %v", err)
	}

	// No answer: the attempt would time out in 50 ms, the call never
	// ends but with ctx, which ends it at once (a minute-long attempt).
	mode.Store(4)
	slow, err := NewClient(ClientConfig{Self: "c1", Partition: 7, Replicas: []api.NodeID{"a"}, Send: s.send, AttemptTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	s.cl = slow
	cctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(20*time.Millisecond, cancel)
	start := time.Now()
	if err, _ := async(cctx, []byte("data"), 0, false); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the cancelled call took %v", d)
	}
	time.Sleep(200 * time.Millisecond) // anything late would call done again
	if n := calls.Load(); n != 9 {
		t.Fatalf("done called %d times for 9 calls", n)
	}
}

// tcpNet is the replicas of an rcluster, and client endpoints, on real TCP
// transports on 127.0.0.1.
type tcpNet struct {
	t     *testing.T
	mu    sync.Mutex
	addrs map[api.NodeID]string
	trs   map[api.NodeID]*transport.TCP
}

// listenTCP puts every node of c on its own transport (delivering to the
// node's Replica), and each of ends on one delivering to its function.
func (c *rcluster) listenTCP(ends map[api.NodeID]func(*wire.Msg)) *tcpNet {
	t := c.t
	t.Helper()
	n := &tcpNet{t: t, addrs: make(map[api.NodeID]string), trs: make(map[api.NodeID]*transport.TCP)}
	start := func(id api.NodeID, deliver func(*wire.Msg)) {
		tr, err := transport.New(transport.Config{Self: id, Listen: "127.0.0.1:0", Resolve: n.resolve, Deliver: deliver,
			Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("transport", id)})
		if err != nil {
			t.Fatal(err)
		}
		n.mu.Lock()
		n.addrs[id], n.trs[id] = tr.Addr().String(), tr
		n.mu.Unlock()
	}
	for _, nd := range c.nodes {
		start(nd.id, func(m *wire.Msg) {
			if r := nd.rep.Load(); r != nil {
				r.Deliver(m)
			}
		})
	}
	for id, f := range ends {
		start(id, f)
	}
	c.mu.Lock()
	for _, nd := range c.nodes {
		c.mu.tcp[nd.id] = n.trs[nd.id]
	}
	c.mu.Unlock()
	return n
}

func (n *tcpNet) resolve(id api.NodeID) (string, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a, ok := n.addrs[id]
	return a, ok
}

func (n *tcpNet) tr(id api.NodeID) *transport.TCP {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.trs[id]
}

// close closes every transport; the cluster's nodes then send nothing.
func (n *tcpNet) close(c *rcluster) {
	c.mu.Lock()
	clear(c.mu.tcp)
	c.mu.Unlock()
	for _, tr := range n.trs {
		if err := tr.Close(); err != nil {
			n.t.Error(err)
		}
	}
}

// TestRemoteClientFailover: three Replicas and a Client on a fourth node,
// all on TCP. The Client writes 200 random 4 KiB blocks (from 4
// goroutines at once) and reads them back; then, while it keeps writing from a goroutine, another replica is
// promoted at a higher epoch, the old primary either cut off (its
// attempts time out) or still connected (it steps down and rejects). No
// client call fails; every acknowledged write reads back through the
// Client from the new primary, and is on its in-sync secondary; a Flush
// through the Client completes.
func TestRemoteClientFailover(t *testing.T) {
	for _, cut := range []bool{false, true} {
		t.Run(fmt.Sprintf("cut=%v", cut), func(t *testing.T) { testRemoteFailover(t, cut) })
	}
}

func testRemoteFailover(t *testing.T, cut bool) {
	c := newRCluster(t, 3, false)
	defer c.close()
	var clp atomic.Pointer[Client]
	tn := c.listenTCP(map[api.NodeID]func(*wire.Msg){"c1": func(m *wire.Msg) {
		if cl := clp.Load(); cl != nil {
			cl.Deliver(m)
		}
	}})
	defer tn.close(c)
	c.promote("n1")
	cl, err := NewClient(ClientConfig{Self: "c1", Partition: 1, Replicas: []api.NodeID{"n1", "n2", "n3"},
		Send: tn.tr("c1").Send, AttemptTimeout: 300 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("node", "c1")})
	if err != nil {
		t.Fatal(err)
	}
	clp.Store(cl)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()

	const blocks = 512 // 2 MiB of the partition
	model := make(map[int64][]byte)
	rng := rand.New(rand.NewSource(42))
	block := func(rng *rand.Rand) (int64, []byte) {
		d := make([]byte, rbs)
		rng.Read(d)
		return rng.Int63n(blocks), d
	}
	// 200 writes from 4 goroutines at once, each on its own blocks (b%4).
	const writers = 4
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		errs  []error
		seeds = rng.Perm(writers)
	)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wr := rand.New(rand.NewSource(int64(seeds[w])))
			for range 200 / writers {
				b, d := block(wr)
				b = b - b%writers + int64(w)
				write := cl.Write
				if w%2 == 1 {
					write = writeAsync(cl)
				}
				err := write(ctx, d, b*rbs, false)
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("write block %d: %w", b, err))
				} else {
					model[b] = d
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatal(errors.Join(errs...))
	}
	checkRemoteBlocks(t, ctx, cl, model, blocks)
	if p, e := cl.Route(); p != "n1" || e != 1 {
		t.Fatalf("client route %s@%d, want n1@1", p, e)
	}

	// Failover while the client writes.
	type write struct {
		b int64
		d []byte
	}
	var (
		acked   []write // in order; owned by the writer until done
		nacked  atomic.Int64
		stop    = make(chan struct{})
		done    = make(chan error, 1)
		wrng    = rand.New(rand.NewSource(43))
		stopped = false
	)
	go func() {
		for {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			b, d := block(wrng)
			wr := cl.Write // and every other write asynchronous
			if len(acked)%2 == 1 {
				wr = writeAsync(cl)
			}
			if err := wr(ctx, d, b*rbs, false); err != nil {
				done <- fmt.Errorf("write block %d: %w", b, err)
				return
			}
			acked = append(acked, write{b, d})
			nacked.Add(1)
		}
	}()
	defer func() {
		if !stopped { // failing: end the writer's call at once
			cancel()
			close(stop)
			<-done
		}
	}()
	waitUntil(t, "writes before the failover", func() bool { return nacked.Load() >= 20 })
	var out []api.NodeID
	if cut {
		c.setCut("n1", true)
		out = append(out, "n1")
	}
	before := cl.Stats()
	epoch := c.promote("n2", out...)
	mark := nacked.Load()
	waitUntil(t, "writes after the failover", func() bool {
		p, e := cl.Route()
		return nacked.Load() >= mark+20 && p == "n2" && e == epoch
	})
	close(stop)
	stopped = true
	if err := <-done; err != nil {
		t.Fatalf("client call failed across the failover: %v", err)
	}
	after := cl.Stats()
	if cut && after.Timeouts == before.Timeouts {
		t.Errorf("stats %+v (before %+v): no attempt timed out on the cut-off primary", after, before)
	}
	if !cut && after.Rejects == before.Rejects {
		t.Errorf("stats %+v (before %+v): the old primary rejected nothing", after, before)
	}
	for _, w := range acked {
		model[w.b] = w.d
	}
	t.Logf("%d writes before the failover, %d in all during it; stats %+v", mark, len(acked), after)

	if err := cl.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	checkRemoteBlocks(t, ctx, cl, model, blocks)
	if p, _ := cl.Route(); p != "n2" {
		t.Fatalf("reads went to %s", p)
	}
	// The in-sync secondary has every acknowledged write too.
	c.quiesce("n2", "n3")
	buf := make([]byte, blocks*rbs)
	if err := c.node("n3").p.Load().ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkImage(t, "n3's partition", buf, model)
}

// writeAsync returns cl's WriteAsync as a call that waits for done.
func writeAsync(cl *Client) func(ctx context.Context, data []byte, off int64, fua bool) error {
	return func(ctx context.Context, data []byte, off int64, fua bool) error {
		ch := make(chan error, 2)
		cl.WriteAsync(ctx, data, off, fua, func(err error) { ch <- err })
		return <-ch
	}
}

// checkRemoteBlocks reads every block of model through cl, one by one, and
// the whole range [0, blocks) in one call, and compares.
func checkRemoteBlocks(t *testing.T, ctx context.Context, cl *Client, model map[int64][]byte, blocks int64) {
	t.Helper()
	buf := make([]byte, rbs)
	for b, d := range model {
		if err := cl.ReadAt(ctx, buf, b*rbs); err != nil {
			t.Fatalf("read block %d: %v", b, err)
		}
		if !bytes.Equal(buf, d) {
			t.Fatalf("block %d reads %x..., want %x...", b, buf[:8], d[:8])
		}
	}
	all := make([]byte, blocks*rbs)
	if err := cl.ReadAt(ctx, all, 0); err != nil {
		t.Fatalf("read [0,%d): %v", blocks*rbs, err)
	}
	checkImage(t, "one read of the range", all, model)
}

func checkImage(t *testing.T, what string, buf []byte, model map[int64][]byte) {
	t.Helper()
	zero := make([]byte, rbs)
	for b := range int64(len(buf) / rbs) {
		want, ok := model[b]
		if !ok {
			want = zero
		}
		if got := buf[b*rbs : (b+1)*rbs]; !bytes.Equal(got, want) {
			t.Fatalf("%s: block %d = %x..., want %x...", what, b, got[:8], want[:8])
		}
	}
}

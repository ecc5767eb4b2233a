package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica/wire"
)

// directory is the tests' Resolve: node id -> address.
type directory struct {
	mu    sync.Mutex
	addrs map[api.NodeID]string
}

func newDirectory() *directory { return &directory{addrs: make(map[api.NodeID]string)} }

func (d *directory) set(id api.NodeID, addr string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.addrs[id] = addr
}

func (d *directory) resolve(id api.NodeID) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	a, ok := d.addrs[id]
	return a, ok
}

// warnCounter is a slog.Handler counting Warn records whose message has
// a prefix.
type warnCounter struct {
	prefix string
	n      atomic.Int64
}

func (h *warnCounter) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (h *warnCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Level == slog.LevelWarn && strings.HasPrefix(r.Message, h.prefix) {
		h.n.Add(1)
	}
	return nil
}
func (h *warnCounter) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *warnCounter) WithGroup(string) slog.Handler      { return h }

// start starts node id listening on listen ("" = none), registers it in
// dir, and returns it with the channel its messages are delivered to.
func start(tb testing.TB, dir *directory, id api.NodeID, listen string, mod func(*Config)) (*TCP, chan *wire.Msg) {
	tb.Helper()
	ch := make(chan *wire.Msg, 1<<15)
	cfg := Config{Self: id, Listen: listen, Resolve: dir.resolve, Deliver: func(m *wire.Msg) { ch <- m }}
	if mod != nil {
		mod(&cfg)
	}
	tr, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := closeWithin(tr); err != nil {
			tb.Error(err)
		}
	})
	if tr.Addr() != nil {
		dir.set(id, tr.Addr().String())
	}
	return tr, ch
}

// closeWithin closes tr, or gives up (leaking the call) with every
// goroutine's stack if Close does not return within a deadline.
func closeWithin(tr *TCP) error {
	closed := make(chan error, 1)
	go func() { closed <- tr.Close() }()
	select {
	case err := <-closed:
		return err
	case <-time.After(10 * time.Second):
		buf := make([]byte, 1<<20)
		return fmt.Errorf("Close did not return:\n%s", buf[:runtime.Stack(buf, true)])
	}
}

// payload is n deterministic bytes that depend on seed; nil for n == 0.
func payload(seed, n int) []byte {
	if n == 0 {
		return nil
	}
	b := make([]byte, n)
	x := uint64(seed)*0x9e3779b97f4a7c15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

// msg is the i-th test message from -> to: an Append with data in the
// message and in its entry.
func msg(i int, from, to api.NodeID) *wire.Msg {
	return &wire.Msg{
		Type: wire.TypeAppend, Epoch: api.Epoch(i/100 + 1), Partition: api.PartitionID(i % 7), ReqID: uint64(i),
		From: from, To: to, PrevEpoch: api.Epoch(i / 100), PrevOp: api.OpNum(i), Commit: api.OpNum(i / 2),
		Data: payload(i, i%3000),
		Entries: []wire.Entry{{Epoch: api.Epoch(i/100 + 1), OpNum: api.OpNum(i + 1), Kind: wire.KindWrite,
			ReqID: uint64(i) << 8, Off: int64(i) * 4096, Len: int64((i * 7) % 500), Data: payload(-i, (i*7)%500)}},
	}
}

// recv receives n messages from ch within a deadline.
func recv(tb testing.TB, ch <-chan *wire.Msg, n int) []*wire.Msg {
	tb.Helper()
	out := make([]*wire.Msg, 0, n)
	timeout := time.After(20 * time.Second)
	for len(out) < n {
		select {
		case m := <-ch:
			out = append(out, m)
		case <-timeout:
			tb.Fatalf("received %d of %d messages before the deadline", len(out), n)
		}
	}
	return out
}

// waitFor polls cond until it holds or a deadline passes.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		<-time.After(time.Millisecond)
	}
}

func TestExchangeInOrder(t *testing.T) {
	const n = 10000
	dir := newDirectory()
	big := func(c *Config) { c.QueueLen = 2 * n } // room for a whole burst: no drop is allowed here
	a, ach := start(t, dir, "a", "127.0.0.1:0", big)
	b, bch := start(t, dir, "b", "127.0.0.1:0", big)

	for i := range n {
		a.Send(msg(i, "a", "b"))
		b.Send(msg(i, "b", "a"))
	}
	for _, c := range []struct {
		to   string
		ch   chan *wire.Msg
		from api.NodeID
	}{{"b", bch, "a"}, {"a", ach, "b"}} {
		for i, m := range recv(t, c.ch, n) {
			if want := msg(i, c.from, api.NodeID(c.to)); !reflect.DeepEqual(m, want) {
				t.Fatalf("%s: message %d is %v (data %d bytes), want %v (data %d bytes)", c.to, i, m, len(m.Data), want, len(want.Data))
			}
		}
	}
	for name, tr := range map[string]*TCP{"a": a, "b": b} {
		s := tr.Stats()
		if s.Sent != n || s.Received != n || s.Dropped != 0 || s.BadFrames != 0 || s.Dials != 1 || s.DialErrors != 0 {
			t.Errorf("%s: stats %+v, want %d sent and received on one dial, nothing dropped", name, s, n)
		}
	}
}

func TestDeliverToSelf(t *testing.T) {
	dir := newDirectory()
	a, ach := start(t, dir, "a", "", nil)
	if a.Addr() != nil {
		t.Fatalf("Addr() = %v without a listener", a.Addr())
	}
	const n = 1000
	for i := range n {
		m := msg(i, "a", "a")
		a.Send(m)
		clear(m.Data) // Send encoded m: the caller may reuse it
	}
	for i, m := range recv(t, ach, n) {
		if want := msg(i, "a", "a"); !reflect.DeepEqual(m, want) {
			t.Fatalf("message %d is %v, want %v", i, m, want)
		}
	}
	if s := a.Stats(); s.Sent != n || s.Received != n || s.Dials != 0 {
		t.Errorf("stats %+v, want %d sent and received locally, no dial", s, n)
	}
}

func TestReconnectAfterPeerRestart(t *testing.T) {
	dir := newDirectory()
	a, _ := start(t, dir, "a", "", nil)
	b, bch := start(t, dir, "b", "127.0.0.1:0", nil)
	addr := b.Addr().String()

	// deliveredAfter sends a message every few milliseconds until one
	// reaches ch, with a deadline.
	deliveredAfter := func(ch chan *wire.Msg) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for i := 0; ; i++ {
			a.Send(msg(i, "a", "b"))
			select {
			case <-ch:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("nothing delivered to b at %s before the deadline; a: %+v", addr, a.Stats())
			}
		}
	}
	deliveredAfter(bch)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b2, b2ch := start(t, dir, "b", addr, nil)
	if got := b2.Addr().String(); got != addr {
		t.Fatalf("restarted b listens on %s, want %s", got, addr)
	}
	deliveredAfter(b2ch)
	if s := a.Stats(); s.Dials < 2 {
		t.Errorf("a dialed %d times, want a redial after b restarted: %+v", s.Dials, s)
	}
}

// stalledPeer listens and accepts but never reads: a writer to it blocks
// once the socket buffers are full.
func stalledPeer(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

func TestSendNeverBlocks(t *testing.T) {
	dir := newDirectory()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dir.set("dead", ln.Addr().String()) // nobody listens there once closed
	ln.Close()
	dir.set("stalled", stalledPeer(t))
	a, _ := start(t, dir, "a", "", nil) // the default WriteTimeout: a writer to stalled stays stuck

	const n = 10000
	sends := func(to api.NodeID, size int) {
		t.Helper()
		m := msg(1, "a", to)
		m.Data = payload(1, size)
		began := time.Now()
		for range n {
			a.Send(m)
		}
		if d := time.Since(began); d > time.Second {
			t.Fatalf("%d Sends to %s took %v", n, to, d)
		}
	}
	sends("ghost", 1024) // unknown to Resolve
	sends("dead", 1024)
	waitFor(t, "every message to ghost and dead dropped", func() bool { return a.Stats().Dropped == 2*n })
	if s := a.Stats(); s.Sent != 0 || s.DialErrors == 0 || s.DialErrors != s.Dials {
		t.Errorf("stats %+v, want nothing sent and every dial failed", s)
	}
	sends("stalled", 4096) // 40 MB: more than the socket buffers hold
	if s := a.Stats(); s.Dropped == 2*n {
		t.Errorf("stats %+v, want some messages to stalled dropped on a full queue", s)
	}
	if err := a.Close(); err != nil { // must unblock the writer stuck on stalled
		t.Fatal(err)
	}
	before := a.Stats().Dropped
	a.Send(msg(1, "a", "dead"))
	if got := a.Stats().Dropped; got != before+1 {
		t.Errorf("Send after Close: %d dropped, want %d", got, before+1)
	}
}

func TestBadFrameClosesOnlyItsConnection(t *testing.T) {
	dir := newDirectory()
	warns := &warnCounter{prefix: "transport: bad frame"}
	b, bch := start(t, dir, "b", "127.0.0.1:0", func(c *Config) { c.Logger = slog.New(warns) })
	a, _ := start(t, dir, "a", "", nil)

	good := wire.Encode(msg(7, "raw", "b"))
	corrupt := func(f func(frame []byte)) []byte {
		frame := wire.Encode(msg(8, "raw", "b"))
		f(frame)
		return frame
	}
	cases := []struct {
		name string
		bad  []byte
	}{
		{"garbage", []byte(strings.Repeat("this is not a replication frame! ", 4))},
		{"checksum", corrupt(func(f []byte) { f[len(f)-1] ^= 1 })},
		{"magic", corrupt(func(f []byte) { f[0] ^= 0xff })},
		{"version", corrupt(func(f []byte) { f[4] = 99 })},
		{"length", corrupt(func(f []byte) { binary.LittleEndian.PutUint32(f[28:], wire.MaxBody+1) })},
	}
	sent := 0 // messages a sent to b
	sendA := func(k int) {
		for range k {
			a.Send(msg(sent, "a", "b"))
			sent++
		}
	}
	var fromA, fromRaw []*wire.Msg
	collect := func(n int) {
		for _, m := range recv(t, bch, n) {
			if m.From == "a" {
				fromA = append(fromA, m)
			} else {
				fromRaw = append(fromRaw, m)
			}
		}
	}

	sendA(100)
	collect(100)
	for i, c := range cases {
		raw, err := net.Dial("tcp", b.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := raw.Write(append(append([]byte{}, good...), c.bad...)); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		sendA(100)
		collect(101) // the raw connection's good frame is delivered, and a's keep coming
		raw.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := raw.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("%s: the raw connection reads %v, want it closed by b", c.name, err)
		}
		raw.Close()
		if got := b.Stats().BadFrames; got != uint64(i+1) {
			t.Errorf("%s: %d bad frames counted, want %d", c.name, got, i+1)
		}
		if got := warns.n.Load(); got != int64(i+1) {
			t.Errorf("%s: %d warnings logged, want %d", c.name, got, i+1)
		}
	}
	huge := msg(0, "a", "b")
	huge.Data = make([]byte, wire.MaxData+1) // b would refuse it: Send must drop it, not cost the connection
	a.Send(huge)
	sendA(100)
	collect(100)
	if s := a.Stats(); s.Dropped != 1 {
		t.Errorf("a dropped %d messages, want the one too big", s.Dropped)
	}
	for i, m := range fromA {
		if want := msg(i, "a", "b"); !reflect.DeepEqual(m, want) {
			t.Fatalf("a's message %d is %v, want %v", i, m, want)
		}
	}
	if len(fromRaw) != len(cases) {
		t.Errorf("%d good raw frames delivered, want %d", len(fromRaw), len(cases))
	}
	if s := a.Stats(); s.Dials != 1 {
		t.Errorf("a dialed %d times: its connection should have survived every bad one", s.Dials)
	}
}

func TestLyingLengthAllocatesLittle(t *testing.T) {
	dir := newDirectory()
	b, bch := start(t, dir, "b", "127.0.0.1:0", nil)
	raw, err := net.Dial("tcp", b.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	lie := wire.Encode(msg(1, "raw", "b"))
	binary.LittleEndian.PutUint32(lie[28:], wire.MaxBody) // a valid length, but only a few bytes follow
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, err := raw.Write(append(wire.Encode(msg(0, "raw", "b")), lie...)); err != nil {
		t.Fatal(err)
	}
	// Once the first frame is delivered, the reader holds the lying header
	// in its buffer; Close joins it, so it has read all it will.
	recv(t, bch, 1)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > 16<<20 {
		t.Errorf("a %d-byte frame claiming a %d-byte body cost %d bytes of allocation", len(lie), wire.MaxBody, d)
	}
}

// settledGoroutines returns the number of goroutines once it has stopped
// falling (goroutines of earlier tests may be on their way out).
func settledGoroutines() int {
	n := runtime.NumGoroutine()
	for same := 0; same < 5; {
		<-time.After(2 * time.Millisecond)
		if m := runtime.NumGoroutine(); m < n {
			n, same = m, 0
		} else {
			same++
		}
	}
	return n
}

func TestCloseJoinsGoroutines(t *testing.T) {
	baseline := settledGoroutines()
	dir := newDirectory()
	dir.set("dead", "127.0.0.1:1")
	a, ach := start(t, dir, "a", "127.0.0.1:0", nil)
	b, bch := start(t, dir, "b", "127.0.0.1:0", nil)
	for i := range 100 {
		a.Send(msg(i, "a", "b"))
		b.Send(msg(i, "b", "a"))
		a.Send(msg(i, "a", "a"))
		a.Send(msg(i, "a", "dead"))
	}
	recv(t, bch, 100)
	recv(t, ach, 200)
	// acceptors, writers a->b, b->a, a->dead, the local one, readers: all running.
	if g := runtime.NumGoroutine(); g < baseline+8 {
		t.Fatalf("%d goroutines, want at least %d running", g, baseline+8)
	}
	for _, tr := range []*TCP{a, b} {
		if err := closeWithin(tr); err != nil {
			t.Fatal(err)
		}
		if err := tr.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	}
	a.Send(msg(0, "a", "b")) // must not start a goroutine
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > baseline {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after Close, want %d:\n%s", runtime.NumGoroutine(), baseline, buf[:runtime.Stack(buf, true)])
		}
		<-time.After(time.Millisecond)
	}
}

func TestNewNeedsDeliver(t *testing.T) {
	if _, err := New(Config{Self: "a"}); !errors.Is(err, ErrConfig) {
		t.Fatalf("New without Deliver: %v, want ErrConfig", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := New(Config{Self: "a", Listen: ln.Addr().String(), Deliver: func(*wire.Msg) {}}); err == nil {
		t.Fatal("New listening on a taken address succeeded")
	}
}

func BenchmarkSend4K(b *testing.B) {
	dir := newDirectory()
	const window = 1024 // frames in flight: well under the queue, so nothing drops
	tokens := make(chan struct{}, window)
	var received atomic.Int64
	a, _ := start(b, dir, "a", "", nil)
	rx, _ := start(b, dir, "b", "127.0.0.1:0", func(c *Config) {
		c.Deliver = func(m *wire.Msg) {
			if len(m.Entries) != 1 || len(m.Entries[0].Data) != 4096 {
				panic(fmt.Sprintf("bad message %v", m))
			}
			received.Add(1)
			<-tokens
		}
	})
	m := &wire.Msg{Type: wire.TypeAppend, Epoch: 3, Partition: 1, From: "a", To: "b", PrevEpoch: 3, PrevOp: 99, Commit: 98,
		Entries: []wire.Entry{{Epoch: 3, OpNum: 100, Kind: wire.KindWrite, ReqID: 1, Off: 1 << 20, Len: 4096, Data: bytes.Repeat([]byte{0xab}, 4096)}}}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tokens <- struct{}{}
		m.Entries[0].OpNum = api.OpNum(100 + i)
		a.Send(m)
	}
	waitFor(b, "every message received", func() bool { return received.Load() == int64(b.N) })
	b.StopTimer()
	if s := a.Stats(); s.Dropped != 0 {
		b.Fatalf("%d dropped", s.Dropped)
	}
	_ = rx
}

// A Send to a peer whose socket is full writes what fits and leaves the
// rest of the frame to the writer, which writes it before the frames
// queued behind it: the peer gets every frame whole and in order.
func TestDirectSendKeepsOrderWhenTheSocketFills(t *testing.T) {
	const n = 3000 // of ~16 KiB: far more than the socket buffers hold
	dir := newDirectory()
	big := func(c *Config) { c.QueueLen = 2 * n }
	a, _ := start(t, dir, "a", "", big)
	gate := make(chan struct{})
	got := make(chan *wire.Msg, n)
	var first sync.Once
	start(t, dir, "b", "127.0.0.1:0", func(c *Config) {
		c.QueueLen = 2 * n
		c.Deliver = func(m *wire.Msg) {
			first.Do(func() { <-gate }) // b's reader stops reading: the socket fills
			got <- m
		}
	})
	mk := func(i int) *wire.Msg {
		m := msg(i, "a", "b")
		m.Data = payload(i, 16<<10+i%4096)
		return m
	}
	for i := range n {
		a.Send(mk(i))
	}
	close(gate)
	for i, m := range recv(t, got, n) {
		if want := mk(i); !reflect.DeepEqual(m, want) {
			t.Fatalf("message %d is %v (data %d bytes), want %v (data %d bytes)", i, m, len(m.Data), want, len(want.Data))
		}
	}
	if s := a.Stats(); s.Sent != n || s.Dropped != 0 {
		t.Errorf("stats %+v, want %d sent, none dropped", s, n)
	}
}

// A Send to Self with nothing queued delivers before it returns; a Send to
// Self from inside Deliver is queued (no deadlock) and delivered after it,
// in order.
func TestDeliverToSelfInline(t *testing.T) {
	dir := newDirectory()
	var (
		mu  sync.Mutex
		got []uint64
		tr  *TCP
	)
	tr, _ = start(t, dir, "a", "", func(c *Config) {
		c.Deliver = func(m *wire.Msg) {
			if m.ReqID%2 == 0 {
				tr.Send(msg(int(m.ReqID)+1, "a", "a")) // nested: queued behind this one
			}
			mu.Lock()
			got = append(got, m.ReqID)
			mu.Unlock()
		}
	})
	const n = 100
	for i := 0; i < n; i += 2 {
		tr.Send(msg(i, "a", "a"))
		mu.Lock()
		inline := len(got) > 0 && got[len(got)-1] == uint64(i) || len(got) > 1 && got[len(got)-2] == uint64(i)
		mu.Unlock()
		if !inline {
			t.Fatalf("Send of %d returned before its Deliver ran", i)
		}
		waitFor(t, "the nested message delivered", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(got) == i+2
		})
	}
	for i, id := range got {
		if id != uint64(i) {
			t.Fatalf("delivery %d is message %d: %v", i, id, got)
		}
	}
}

// A Reply to Self is delivered on the sender's goroutine before Send
// returns, also from inside another local delivery (where any other
// message is queued), as a copy: the sender may reuse its Data at once.
func TestReplyToSelfInline(t *testing.T) {
	dir := newDirectory()
	var (
		mu  sync.Mutex
		got []string
		tr  *TCP
	)
	tr, _ = start(t, dir, "a", "", func(c *Config) {
		c.Deliver = func(m *wire.Msg) {
			mu.Lock()
			got = append(got, fmt.Sprintf("%s %d %s", m.Type, m.ReqID, m.Data))
			mu.Unlock()
			if m.Type != wire.TypeReply {
				data := []byte("answer")
				tr.Send(&wire.Msg{Type: wire.TypeReply, Partition: 1, ReqID: m.ReqID, From: "a", To: "a", Data: data})
				copy(data, "reused")
				mu.Lock()
				last := got[len(got)-1]
				mu.Unlock()
				if want := fmt.Sprintf("%s %d answer", wire.TypeReply, m.ReqID); last != want {
					t.Errorf("after the nested Send of a Reply: last delivery %q, want %q", last, want)
				}
			}
		}
	})
	for i := range 3 {
		tr.Send(msg(i, "a", "a"))
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 6 {
		t.Fatalf("deliveries %q", got)
	}
}

// Package transport carries the frames of stor's replication protocol
// (package wire) between nodes over TCP. One TCP transport serves every
// partition of a node and the volume clients on it; the Partition of each
// message routes it on the receiving side, which is the Deliver
// callback's business, not this package's.
//
// # Model
//
//	Send(m) -encode-> peer queue -writer goroutine-> bufio -> TCP conn (one-way)
//	                                                             |
//	Deliver(m) <-decode- reader goroutine (one per inbound conn) <+
//
// In detail:
//
//   - Send encodes m at once (the caller may reuse m and its buffers when
//     Send returns) and puts the frame on the bounded queue of its
//     destination peer. It never blocks: a frame is dropped, and counted
//     in Stats.Dropped, when the queue is full, the peer is unknown to
//     Config.Resolve, the message breaks a wire limit, or the transport is
//     closed. The protocol retransmits; the transport does not.
//   - Direct sends: when the peer is connected, nothing it was sent waits
//     unwritten and its writer is idle, Send writes the frame to the
//     socket itself, without waiting (a non-blocking write, so a peer that
//     does not read cannot stall the caller); whatever the socket does not
//     take at once goes to the writer as the peer's rest, which it writes
//     before any queued frame. A message at queue depth 1 so crosses no
//     goroutine on its way out.
//   - Each peer has one writer goroutine, started by the first Send to it.
//     It dials lazily, resolving the peer's address at every dial, and
//     writes frames through a bufio.Writer, flushing when its queue is
//     empty (or after maxBatch frames): many frames per syscall. After a
//     dial or write failure the peer is down for a backoff that doubles
//     from minBackoff to maxBackoff; frames that reach the front of the
//     queue while it is down are dropped, not held. A successful flush
//     resets the backoff.
//   - Connections are one-way: the dialer only writes, the acceptor only
//     reads. Each inbound connection has one reader goroutine: it reads a
//     header, checks it with wire.BodyLen, reads the body (growing its
//     buffer as bytes arrive, so a lying header costs at most what was
//     really sent, and never more than wire.MaxBody), decodes it with
//     wire.Decode and calls Deliver. A malformed frame, a bad checksum or
//     a wrong magic or version closes that connection only, logged once
//     at Warn and counted in Stats.BadFrames. Reads and writes on the
//     connections are raw system calls (package target/sockio).
//   - A message to Config.Self is delivered locally, without TCP: by Send
//     itself when nothing queued for Self waits and no local delivery
//     runs (so a Send to Self may call Deliver on the caller's
//     goroutine), else through the same kind of queue and goroutine, so
//     a Send to Self from inside Deliver never waits for Deliver. Replies
//     (wire.TypeReply) to Self are the exception: Send delivers them at
//     once, on the caller's goroutine, even from inside another local
//     delivery. They answer requests by id and their receivers (volume
//     clients) take them in any order without blocking, and a local
//     primary's answer then reaches its client with no goroutine hand-off.
//
// # Rules
//
//   - Ownership: the TCP owns every goroutine it starts (the acceptor,
//     one writer per peer, one reader per inbound connection) and Close
//     joins them all. The writer owns its outbound connection; a reader
//     owns its inbound one; Close only closes them to unblock their
//     owners.
//   - Deliver is called from reader goroutines (and the local one, and
//     Send to Self), concurrently across connections, in order within one
//     connection and among the messages to Self (Replies to Self
//     excepted: see above).
//     The message and its Data are the callee's to keep. Deliver must not
//     block for long (it stalls that connection) and must not call Close.
//   - Ordering: frames from one transport to another arrive in Send order
//     (FIFO) while their connection lives, and each at most once. Nothing
//     is promised across a reconnect: frames around a failure may be lost,
//     and the receiver may still be delivering the old connection's frames
//     when the new one's arrive.
//   - Send and Stats are safe for concurrent use. Send after Close drops.
package transport

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica/wire"
	"stor.dev/stor/target/sockio"
)

// Errors.
var (
	ErrConfig      = errors.New("transport: bad config")
	ErrClosed      = errors.New("transport: closed")
	ErrUnknownPeer = errors.New("transport: unknown peer")
)

// Defaults for zero Config fields.
const (
	DefaultQueueLen     = 4096
	DefaultDialTimeout  = 2 * time.Second
	DefaultWriteTimeout = 5 * time.Second
)

const (
	minBackoff = 20 * time.Millisecond
	maxBackoff = time.Second
	maxBatch   = 256      // frames written between two flushes at most
	bufSize    = 64 << 10 // bufio buffer of each connection
	readChunk  = 1 << 20  // a body buffer grows by at most this much ahead of the bytes read
)

// Config configures a TCP transport.
type Config struct {
	Self    api.NodeID
	Listen  string                                  // host:port to accept on; "" = no listener
	Resolve func(api.NodeID) (addr string, ok bool) // a peer's address; called at Send (until known) and at every dial
	Deliver func(m *wire.Msg)                       // required; see the package rules
	Logger  *slog.Logger                            // nil: discard

	QueueLen     int           // frames queued per peer; 0: DefaultQueueLen
	DialTimeout  time.Duration // 0: DefaultDialTimeout
	WriteTimeout time.Duration // per batch of frames; 0: DefaultWriteTimeout
}

// Stats are the transport's counters since New.
type Stats struct {
	Sent       uint64 // frames flushed to a connection or delivered locally
	Dropped    uint64 // frames given to Send that were never (known to be) sent
	Received   uint64 // frames decoded and delivered
	BadFrames  uint64 // malformed inbound frames (each closed its connection)
	Dials      uint64 // dial attempts
	DialErrors uint64 // dial attempts that failed
}

type counters struct {
	sent, dropped, received, badFrames, dials, dialErrors atomic.Uint64
}

// TCP is a transport over TCP. See the package doc.
type TCP struct {
	cfg    Config
	log    *slog.Logger
	ln     net.Listener       // nil without Config.Listen
	ctx    context.Context    // cancelled by Close: stops dials, backoffs and every loop
	cancel context.CancelFunc //
	wg     sync.WaitGroup     // every goroutine the TCP started
	stats  counters

	mu struct {
		sync.Mutex
		closed bool
		peers  map[api.NodeID]*peer
		conns  map[net.Conn]struct{} // open connections, both ways; Close closes them
	}
}

// peer is one destination: its queue and the goroutine that drains it.
//
// Frames reach the socket in Send order: wmu is held around every write
// to oc; a direct send happens only with queued == 0 and rest == nil, so
// every frame of an earlier Send is on the socket already; the writer
// writes rest before anything it dequeues. For Self, wmu is held around
// every Deliver instead, by the same rule.
type peer struct {
	id     api.NodeID
	q      chan []byte   // encoded frames: Send writes, the peer's goroutine reads
	wake   chan struct{} // capacity 1: rest was set
	queued atomic.Int64  // frames put on q and not yet written or dropped by the writer

	wmu  sync.Mutex
	oc   *outConn // REQUIRES: wmu; set and cleared by the writer goroutine
	rest []byte   // REQUIRES: wmu; the unwritten tail of a direct send
	// deadline is the write deadline last set on oc (REQUIRES: wmu). A
	// direct write never waits, but Go refuses any write once the
	// deadline has passed, so direct extends it when it runs low.
	deadline time.Time
}

// outConn is a writer's connection.
type outConn struct {
	c  net.Conn
	sc *sockio.Conn // for direct sends
	w  *bufio.Writer
}

// New returns a transport, listening on cfg.Listen if set.
func New(cfg Config) (*TCP, error) {
	if cfg.Deliver == nil {
		return nil, fmt.Errorf("%w: no Deliver", ErrConfig)
	}
	if cfg.Resolve == nil {
		cfg.Resolve = func(api.NodeID) (string, bool) { return "", false }
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.QueueLen <= 0 {
		cfg.QueueLen = DefaultQueueLen
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	t := &TCP{cfg: cfg, log: cfg.Logger.With("node", cfg.Self)}
	t.mu.peers = make(map[api.NodeID]*peer)
	t.mu.conns = make(map[net.Conn]struct{})
	t.ctx, t.cancel = context.WithCancel(context.Background())
	if cfg.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			t.cancel()
			return nil, fmt.Errorf("transport: listen %s: %w", cfg.Listen, err)
		}
		t.ln = ln
		t.wg.Add(1)
		go t.runAccept()
	}
	return t, nil
}

// Addr returns the listener's address, or nil without one.
func (t *TCP) Addr() net.Addr {
	if t.ln == nil {
		return nil
	}
	return t.ln.Addr()
}

// Stats returns the counters.
func (t *TCP) Stats() Stats {
	s := &t.stats
	return Stats{Sent: s.sent.Load(), Dropped: s.dropped.Load(), Received: s.received.Load(),
		BadFrames: s.badFrames.Load(), Dials: s.dials.Load(), DialErrors: s.dialErrors.Load()}
}

// Send queues m for m.To. It never blocks; it may drop (see the package
// doc). m is encoded before Send returns.
func (t *TCP) Send(m *wire.Msg) {
	if err := fits(m); err != nil {
		t.stats.dropped.Add(1)
		t.log.Warn("transport: dropping a message the wire format refuses", "msg", m.String(), "err", err)
		return
	}
	p := t.peer(m.To)
	if p == nil {
		t.stats.dropped.Add(1)
		return
	}
	if len(p.q) == cap(p.q) { // full: don't bother encoding
		t.stats.dropped.Add(1)
		return
	}
	f := wire.Encode(m)
	switch {
	case p.id == t.cfg.Self && m.Type == wire.TypeReply:
		t.deliverLocal(f) // see the package doc: Replies to Self
		return
	case p.id == t.cfg.Self && t.directLocal(p, f) || p.id != t.cfg.Self && t.direct(p, f):
		return
	}
	p.queued.Add(1)
	select {
	case p.q <- f:
	default:
		p.queued.Add(-1)
		t.stats.dropped.Add(1)
	}
}

// directLocal delivers f (to Self) on the caller's goroutine if that keeps
// the messages to Self in order (see peer) and no local delivery runs; it
// reports whether it did.
func (t *TCP) directLocal(p *peer, f []byte) bool {
	if !p.lockIdle() {
		return false
	}
	defer p.wmu.Unlock()
	t.deliverLocal(f)
	return true
}

// lockIdle takes p.wmu if it is free and nothing sent to p waits on q (see
// peer: the condition for a direct send or delivery), and reports whether
// it did.
func (p *peer) lockIdle() bool {
	if p.queued.Load() != 0 || !p.wmu.TryLock() {
		return false
	}
	if p.queued.Load() != 0 {
		p.wmu.Unlock()
		return false
	}
	return true
}

// deliverLocal decodes a frame to Self and delivers it.
func (t *TCP) deliverLocal(f []byte) {
	m, err := wire.Decode(f)
	if err != nil {
		t.stats.badFrames.Add(1)
		t.stats.dropped.Add(1)
		t.log.Warn("transport: local message does not decode", "err", err)
		return
	}
	t.stats.sent.Add(1)
	t.stats.received.Add(1)
	t.cfg.Deliver(m)
}

// direct writes f to p's socket from the caller's goroutine if that keeps
// the frames in order and the writer is idle (see peer). It reports
// whether it took f: written whole, or its unwritten tail handed to the
// writer as p.rest (a full socket buffer, or an error the writer will meet
// and handle as its own).
func (t *TCP) direct(p *peer, f []byte) bool {
	if !p.lockIdle() {
		return false
	}
	defer p.wmu.Unlock()
	oc := p.oc
	if oc == nil || p.rest != nil {
		return false
	}
	if now := time.Now(); now.After(p.deadline.Add(-t.cfg.WriteTimeout / 2)) {
		p.deadline = now.Add(t.cfg.WriteTimeout)
		if err := oc.c.SetWriteDeadline(p.deadline); err != nil {
			return false // the writer meets it
		}
	}
	n, err := oc.sc.TryWrite(f)
	if errors.Is(err, sockio.ErrNoRaw) {
		return false
	}
	if n == len(f) && err == nil {
		t.stats.sent.Add(1)
		return true
	}
	// A full socket, or an error the writer will meet and handle.
	p.rest = f[n:]
	select {
	case p.wake <- struct{}{}:
	default:
	}
	return true
}

// fits checks the limits a decoder enforces that a caller could break, so
// that one bad message does not cost the connection every frame behind it.
func fits(m *wire.Msg) error {
	if len(m.Data) > wire.MaxData || len(m.Entries) > wire.MaxEntries || len(m.Peers) > wire.MaxPeers ||
		len(m.From) > wire.MaxString || len(m.To) > wire.MaxString {
		return fmt.Errorf("%w: field past a wire limit", wire.ErrFormat)
	}
	for _, p := range m.Peers {
		if len(p) > wire.MaxString {
			return fmt.Errorf("%w: peer id of %d bytes", wire.ErrFormat, len(p))
		}
	}
	body := len(m.Data)
	for i := range m.Entries {
		n := len(m.Entries[i].Data)
		if n > wire.MaxData {
			return fmt.Errorf("%w: entry %d data of %d bytes", wire.ErrFormat, i, n)
		}
		body += n
	}
	if body > wire.MaxBody-1<<20 { // leave room for the fixed fields
		return fmt.Errorf("%w: body of over %d bytes", wire.ErrFormat, body)
	}
	return nil
}

// peer returns the destination id, starting its goroutine on first use,
// or nil if the transport is closed or id is unknown.
func (t *TCP) peer(id api.NodeID) *peer {
	t.mu.Lock()
	p, closed := t.mu.peers[id], t.mu.closed
	t.mu.Unlock()
	if closed {
		return nil
	}
	if p != nil {
		return p
	}
	if id != t.cfg.Self {
		if _, ok := t.cfg.Resolve(id); !ok { // outside mu: Resolve is the caller's code
			return nil
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.mu.closed {
		return nil
	}
	if p := t.mu.peers[id]; p != nil {
		return p
	}
	p = &peer{id: id, q: make(chan []byte, t.cfg.QueueLen), wake: make(chan struct{}, 1)}
	t.mu.peers[id] = p
	t.wg.Add(1)
	if id == t.cfg.Self {
		go t.runLocal(p)
	} else {
		go t.runPeer(p)
	}
	return p
}

// Close closes the listener and every connection and joins every
// goroutine. Later calls do nothing.
func (t *TCP) Close() error {
	t.mu.Lock()
	if t.mu.closed {
		t.mu.Unlock()
		return nil
	}
	t.mu.closed = true
	t.cancel()
	var err error
	if t.ln != nil {
		if cerr := t.ln.Close(); cerr != nil {
			err = fmt.Errorf("transport: close listener: %w", cerr)
		}
	}
	for c := range t.mu.conns {
		c.Close() // unblocks its owner, which untracks it
	}
	t.mu.Unlock()
	t.wg.Wait()
	for _, p := range t.mu.peers { // read-only once closed
		t.stats.dropped.Add(drain(p.q))
	}
	return err
}

// track registers c so that Close closes it; false if already closed.
func (t *TCP) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.mu.closed {
		return false
	}
	t.mu.conns[c] = struct{}{}
	return true
}

// untrack closes c and forgets it.
func (t *TCP) untrack(c net.Conn) {
	t.mu.Lock()
	delete(t.mu.conns, c)
	t.mu.Unlock()
	c.Close()
}

// runLocal delivers frames sent to Self.
func (t *TCP) runLocal(p *peer) {
	defer t.wg.Done()
	for {
		select {
		case <-t.ctx.Done():
			return
		case f := <-p.q:
			p.wmu.Lock()
			t.deliverLocal(f)
			p.queued.Add(-1)
			p.wmu.Unlock()
		}
	}
}

// runPeer is the writer goroutine of p. It holds p.wmu while it handles
// what it took (a frame from q, or the rest of a direct send).
func (t *TCP) runPeer(p *peer) {
	defer t.wg.Done()
	var (
		backoff time.Duration
		retryAt time.Time // before it, the peer is down: drop
		down    bool      // a failure was logged since the last success
	)
	defer func() {
		p.wmu.Lock()
		if p.oc != nil {
			t.untrack(p.oc.c)
			p.oc = nil
		}
		p.wmu.Unlock()
	}()
	fail := func() {
		backoff = min(max(2*backoff, minBackoff), maxBackoff)
		retryAt = time.Now().Add(backoff)
		down = true
	}
	for {
		var f []byte
		took := 0 // frames taken from q
		select {
		case <-t.ctx.Done():
			return
		case f = <-p.q:
			took = 1
		case <-p.wake:
		}
		p.wmu.Lock()
		if p.oc == nil && (p.rest != nil || took > 0) {
			if time.Now().Before(retryAt) {
				t.stats.dropped.Add(uint64(took))
				t.dropRest(p)
				p.queued.Add(int64(-took))
				p.wmu.Unlock()
				continue
			}
			var err error
			if p.oc, err = t.dial(p.id); err != nil {
				n := drain(p.q)
				t.stats.dropped.Add(uint64(took) + n)
				t.dropRest(p)
				p.queued.Add(-int64(uint64(took) + n))
				p.wmu.Unlock()
				if !down && t.ctx.Err() == nil {
					t.log.Warn("transport: peer unreachable", "peer", p.id, "err", err)
				}
				fail()
				continue
			}
		}
		if p.oc == nil {
			p.wmu.Unlock()
			continue
		}
		n, err := t.writeBatch(p, f, took)
		p.queued.Add(-int64(n))
		if err != nil {
			oc := p.oc
			p.oc = nil
			p.wmu.Unlock()
			if !down && t.ctx.Err() == nil {
				t.log.Warn("transport: connection lost", "peer", p.id, "err", err)
			}
			t.untrack(oc.c)
			fail()
			continue
		}
		addr := p.oc.c.RemoteAddr()
		p.wmu.Unlock()
		if down {
			t.log.Info("transport: peer reachable", "peer", p.id, "addr", addr)
		}
		backoff, down = 0, false
	}
}

// dropRest drops p's rest, if any. REQUIRES: p.wmu.
func (t *TCP) dropRest(p *peer) {
	if p.rest != nil {
		p.rest = nil
		t.stats.dropped.Add(1)
	}
}

// drain drops every frame queued on q now and returns how many.
func drain(q <-chan []byte) uint64 {
	var n uint64
	for {
		select {
		case <-q:
			n++
		default:
			return n
		}
	}
}

// dial connects to peer id at its current address.
func (t *TCP) dial(id api.NodeID) (*outConn, error) {
	addr, ok := t.cfg.Resolve(id)
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownPeer, id)
	}
	t.stats.dials.Add(1)
	ctx, cancel := context.WithTimeout(t.ctx, t.cfg.DialTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.stats.dialErrors.Add(1)
		return nil, fmt.Errorf("transport: dial %s at %s: %w", id, addr, err)
	}
	if !t.track(c) {
		c.Close()
		return nil, ErrClosed
	}
	sc := sockio.New(c)
	oc := &outConn{c: c, sc: sc, w: bufio.NewWriterSize(rawWriter{sc}, bufSize)}
	return oc, nil
}

// writeBatch writes p.rest (if any), then f (if took is 1), then whatever
// else is queued (up to maxBatch frames), and flushes. It returns how many
// frames it took from p.q, written or dropped. REQUIRES: p.wmu, p.oc.
func (t *TCP) writeBatch(p *peer, f []byte, took int) (int, error) {
	oc := p.oc
	rest := p.rest
	p.rest = nil
	frames := uint64(0) // frames in the buffer, rest included
	if rest != nil {
		frames++
	}
	p.deadline = time.Now().Add(t.cfg.WriteTimeout)
	if err := oc.c.SetWriteDeadline(p.deadline); err != nil {
		t.stats.dropped.Add(frames + uint64(took))
		return took, err
	}
	if rest != nil {
		if _, err := oc.w.Write(rest); err != nil {
			t.stats.dropped.Add(frames + uint64(took))
			return took, err
		}
	}
	for more := took > 0; more; {
		if _, err := oc.w.Write(f); err != nil {
			t.stats.dropped.Add(frames + 1)
			return took, err
		}
		frames++
		more = false
		if took < maxBatch {
			select {
			case f = <-p.q:
				took++
				more = true
			default:
			}
		}
	}
	if err := oc.w.Flush(); err != nil {
		t.stats.dropped.Add(frames)
		return took, err
	}
	t.stats.sent.Add(frames)
	return took, nil
}

// runAccept accepts inbound connections and starts their readers.
func (t *TCP) runAccept() {
	defer t.wg.Done()
	var delay time.Duration
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if t.ctx.Err() != nil {
				return
			}
			// Out of file descriptors and the like: back off, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			t.log.Warn("transport: accept", "err", err, "retry_in", delay)
			select {
			case <-t.ctx.Done():
				return
			case <-time.After(delay):
			}
			continue
		}
		delay = 0
		t.mu.Lock()
		if t.mu.closed {
			t.mu.Unlock()
			c.Close()
			return
		}
		t.mu.conns[c] = struct{}{}
		t.wg.Add(1)
		t.mu.Unlock()
		go t.runReader(c)
	}
}

// runReader reads frames from inbound connection c and delivers them.
func (t *TCP) runReader(c net.Conn) {
	defer t.wg.Done()
	defer t.untrack(c)
	r := bufio.NewReaderSize(rawReader{sockio.New(c)}, bufSize)
	var hdr [wire.HeaderSize]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			t.ended(c, err)
			return
		}
		n, err := wire.BodyLen(hdr[:])
		if err != nil {
			t.bad(c, err)
			return
		}
		frame, err := readFrame(r, hdr[:], n)
		if err != nil {
			t.ended(c, err)
			return
		}
		m, err := wire.Decode(frame)
		if err != nil {
			t.bad(c, err)
			return
		}
		t.stats.received.Add(1)
		t.cfg.Deliver(m)
	}
}

// rawReader reads a connection with raw system calls (see package sockio).
type rawReader struct{ sc *sockio.Conn }

func (r rawReader) Read(p []byte) (int, error) { return r.sc.Read(p, 0, nil) }

// rawWriter writes a connection with raw system calls (see package sockio).
type rawWriter struct{ sc *sockio.Conn }

func (w rawWriter) Write(b []byte) (int, error) {
	if err := w.sc.Write(b); err != nil {
		return 0, err
	}
	return len(b), nil
}

func (t *TCP) bad(c net.Conn, err error) {
	t.stats.badFrames.Add(1)
	t.log.Warn("transport: bad frame, closing connection", "remote", c.RemoteAddr(), "err", err)
}

func (t *TCP) ended(c net.Conn, err error) {
	if t.ctx.Err() == nil && !errors.Is(err, io.EOF) {
		t.log.Debug("transport: inbound connection ended", "remote", c.RemoteAddr(), "err", err)
	}
}

// readFrame reads the n-byte body after hdr and returns the whole frame.
// The buffer grows only as bytes arrive: a header that lies about its
// length costs what the peer really sent, not n.
func readFrame(r io.Reader, hdr []byte, n int) ([]byte, error) {
	size := wire.HeaderSize + n
	frame := make([]byte, wire.HeaderSize, min(size, wire.HeaderSize+readChunk))
	copy(frame, hdr)
	for len(frame) < size {
		if len(frame) == cap(frame) {
			grown := make([]byte, len(frame), min(size, 2*cap(frame)))
			copy(grown, frame)
			frame = grown
		}
		k, err := io.ReadFull(r, frame[len(frame):cap(frame)])
		frame = frame[:len(frame)+k]
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return frame, nil
}

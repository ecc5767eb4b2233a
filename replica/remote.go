package replica

// This file is the volume client's side of one partition: Client sends a
// caller's ops as wire Requests to the partition's primary and hides
// failover from the caller by retrying them, under the same request id, on
// whichever replica is primary.
//
// # Model
//
//	Write/WriteZeroes/Trim/Flush/ReadAt (caller's goroutine)
//	   |  one request id per op (chunk), for every attempt
//	   v
//	attempt: Send(Request{To: target, Epoch: epoch, ReqID}) --> a replica
//	   |                                                            |
//	   |<-- calls[ReqID] <-- Deliver(Reply) <-- transport <---------+
//	   v
//	Reply ok: done. Reject or no Reply within AttemptTimeout: next attempt.
//
// Each call runs in its caller's goroutine and waits on its own channel,
// which Deliver (called by the transport) fills without blocking. WriteAsync
// is the exception: it sends its first attempt and returns, and the
// accepted Reply ends it inside Deliver, so the acknowledgement crosses no
// goroutine; anything else (a Reject, a timeout, ctx ending) goes on on a
// goroutine started then, exactly as a Write would. A Client needs no
// Close.
//
// # Protocol (wire.TypeRequest / wire.TypeReply)
//
//	Request  From=Self To=target Epoch=believed epoch Partition ReqID
//	         Kind Off Len, Data = write data
//	Reply    From=replica To=Self Epoch=replica's epoch ReqID Kind
//	         Index = the op's opnum, Data = read data          (accepted)
//	         FlagReject, Data[0] = RejectReason,
//	         Peers[0] = the primary the replica knows, if any  (refused)
//
// A replica serves a Request only as the primary of the Request's epoch
// (see Core); it answers once the op is committed (a flush: durable on
// every in-sync replica; a read: read after it was applied). Any other
// replica, or a primary of another epoch, answers RejectNotPrimary with
// its epoch and the primary it knows; a primary that learns of a higher
// epoch with the op pending answers RejectStepDown.
//
// # Rules
//
//   - Idempotent retries. Every attempt of one op carries the same request
//     id, so a replica applies it at most once (Core dedupes by request
//     id, and a new primary inherits the ids of its log). Ids are unique
//     per Client: a random 32-bit prefix, then a 32-bit counter.
//   - Routing. The Client believes one (primary, epoch), learned from
//     replies: an accepted Reply names its sender at its epoch; a Reject
//     with a hint names Peers[0] at the Reply's epoch. A belief is replaced
//     only by one of an equal or higher epoch. An attempt goes to the
//     believed primary; when that gives nothing new (the same target and
//     epoch as the attempt that failed, or a replica that timed out at an
//     epoch no higher than the hint's), it goes to the next replica of
//     Replicas in order, round the set. SetRoute (the control plane's
//     view) replaces the set, and the belief when its epoch is higher.
//   - Stall, not error. A Reject of kind NotPrimary, StepDown or
//     Unavailable, and an attempt with no Reply within AttemptTimeout, are
//     retried after a backoff (none for a redirect to a new primary or
//     epoch; else Backoff, doubling to MaxRetryBackoff) until ctx ends:
//     while some replica can become primary the caller waits, it never
//     sees an error. The errors a caller sees are ctx's (the op may or may
//     not have been applied), target.ErrInvalid for a request no replica
//     would serve (RejectInvalid, or refused before sending),
//     target.ErrIO for a read the primary could not read (RejectIO), and
//     ErrBadReply.
//   - Any accepted Reply for the op's request id ends the call, from any
//     replica and any attempt: only a primary that committed the op
//     accepts it. Rejects count only from the current attempt's target
//     (an older attempt's late Reject still teaches the route).
//   - Large ops are split into requests of at most MaxRequest bytes, each
//     with its own id, one after the other; a split write is not atomic
//     as a whole (each 4 KiB aligned block of it is).
//   - Send must not block and may drop; it must be done with the message
//     and its Data (the caller's buffer, sent again by a retry) when it
//     returns, as transport.TCP.Send is. Deliver never blocks.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/replica/wire"
	"stor.dev/stor/target"
)

// ErrBadReply: a Reply that does not answer its Request (a read's data of
// the wrong length, another op kind).
var ErrBadReply = errors.New("replica: bad reply")

// Defaults of ClientConfig, and limits.
const (
	DefaultAttemptTimeout = 2 * time.Second
	DefaultRetryBackoff   = 5 * time.Millisecond
	MaxRetryBackoff       = 200 * time.Millisecond
	// MaxRequest is the most bytes one Request reads or writes; a Client
	// splits larger calls. (A Replica refuses reads and writes past
	// wire.MaxData.)
	MaxRequest = 4 << 20
)

// ClientConfig configures a Client.
type ClientConfig struct {
	Self      api.NodeID // this node: Requests' From, Replies' To
	Partition api.PartitionID
	// Replicas of the partition, in the order to try them when the
	// primary is unknown; the first is the primary believed at start.
	Replicas []api.NodeID
	// Send sends a message (the transport): see the rules in the file doc.
	Send func(*wire.Msg)
	// AttemptTimeout: an attempt with no Reply for this long is retried;
	// 0: DefaultAttemptTimeout.
	AttemptTimeout time.Duration
	// Backoff is the first wait before a retry that is not a redirect; it
	// doubles up to MaxRetryBackoff. 0: DefaultRetryBackoff.
	Backoff time.Duration
	Logger  *slog.Logger // nil: discard
}

// ClientStats are a Client's counters since NewClient.
type ClientStats struct {
	Requests uint64 // requests (ops, or chunks of a split op) started
	Attempts uint64 // Requests sent (every attempt)
	Rejects  uint64 // Rejects from an attempt's target
	Timeouts uint64 // attempts that got no Reply in time
}

// Client is a volume client's handle on one partition's replica set. See
// the comment at the top of this file. Safe for concurrent use.
type Client struct {
	cfg    ClientConfig
	log    *slog.Logger
	prefix uint64        // random, nonzero, in the high 32 bits
	seq    atomic.Uint32 // low 32 bits of request ids

	requests, attempts, rejects, timeouts atomic.Uint64

	mu struct {
		sync.Mutex
		primary  api.NodeID // believed primary ("" unknown)
		epoch    api.Epoch  // its epoch
		replicas []api.NodeID
		calls    map[uint64]*call
	}
}

// replyBuffer is the Replies one call can hold before Deliver drops: more
// arrive only from duplicate attempts, and a dropped one is retried.
const replyBuffer = 4

// NewClient returns a Client for a partition's replica set.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Self == "" || len(cfg.Replicas) == 0 || cfg.Send == nil {
		return nil, fmt.Errorf("replica: NewClient needs Self, Replicas and Send")
	}
	if slices.Contains(cfg.Replicas, "") {
		return nil, fmt.Errorf("replica: NewClient: an empty replica id in %v", cfg.Replicas)
	}
	cfg.Replicas = slices.Clone(cfg.Replicas)
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = DefaultAttemptTimeout
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = DefaultRetryBackoff
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{cfg: cfg, log: cfg.Logger.With("client", cfg.Self, "partition", cfg.Partition)}
	c.prefix = uint64(max(rand.Uint32(), 1)) << 32
	c.mu.primary = cfg.Replicas[0]
	c.mu.replicas = cfg.Replicas
	c.mu.calls = make(map[uint64]*call)
	return c, nil
}

// Route returns the primary the Client believes in and its epoch (0 until a
// replica told it).
func (c *Client) Route() (api.NodeID, api.Epoch) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.primary, c.mu.epoch
}

// SetRoute tells the Client what the control plane says: the partition's
// replicas (primary first) and the primary's epoch. It replaces the
// replica set tried round the set, and the believed primary only if epoch
// is higher than the one believed (replies remain the better teacher: a
// route from the map may be old).
func (c *Client) SetRoute(replicas []api.NodeID, epoch api.Epoch) {
	if len(replicas) == 0 || slices.Contains(replicas, "") {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mu.replicas = slices.Clone(replicas)
	if epoch > c.mu.epoch {
		c.mu.primary, c.mu.epoch = replicas[0], epoch
	}
}

// Stats returns the counters.
func (c *Client) Stats() ClientStats {
	return ClientStats{Requests: c.requests.Load(), Attempts: c.attempts.Load(), Rejects: c.rejects.Load(),
		Timeouts: c.timeouts.Load()}
}

// Deliver hands the Client a message from the transport: a Reply to one of
// its calls (anything else is ignored). It never blocks; the message
// becomes the Client's. An accepted Reply to a WriteAsync call still in
// its first attempt ends the call here: its done runs on this goroutine.
func (c *Client) Deliver(m *wire.Msg) {
	if m.Type != wire.TypeReply || m.Partition != c.cfg.Partition || m.From == "" {
		return
	}
	c.mu.Lock()
	c.learnLocked(m)
	cl := c.mu.calls[m.ReqID]
	fast := cl != nil && cl.done != nil && cl.claim()
	if fast && !m.Reject() {
		delete(c.mu.calls, m.ReqID)
	}
	c.mu.Unlock()
	switch {
	case cl == nil:
		// a late or duplicate Reply
	case fast:
		cl.stop()
		if !m.Reject() {
			cl.done(c.accepted(cl, m))
			return
		}
		go c.finishAsync(cl, m, false) // a Reject: retry as do does
	default:
		select {
		case cl.ch <- m:
		default:
		}
	}
}

// learnLocked updates the believed route from a Reply.
// REQUIRES: c.mu
func (c *Client) learnLocked(m *wire.Msg) {
	p := m.From
	if m.Reject() {
		p = ""
		if len(m.Peers) > 0 {
			p = m.Peers[0]
		}
	}
	switch {
	case m.Epoch < c.mu.epoch:
	case p != "":
		c.mu.primary, c.mu.epoch = p, m.Epoch
	case m.Epoch > c.mu.epoch:
		c.mu.primary, c.mu.epoch = "", m.Epoch // a newer epoch whose primary is unknown here
	}
}

// Write writes data at off (bytes within the partition); with fua it then
// flushes. An empty write does nothing.
func (c *Client) Write(ctx context.Context, data []byte, off int64, fua bool) error {
	for len(data) > 0 {
		n := min(len(data), MaxRequest)
		if _, err := c.do(ctx, wire.KindWrite, off, int64(n), data[:n]); err != nil {
			return err
		}
		data, off = data[n:], off+int64(n)
	}
	if fua {
		return c.Flush(ctx)
	}
	return nil
}

// WriteAsync is Write that does not wait: it sends the write and returns,
// and done gets Write's result once, on any goroutine, perhaps before
// WriteAsync returns. data must stay unchanged until then (a retry sends
// it again). done must not block: it may run on the transport's delivery
// path, under the local Replica's loop. A write that needs more than one
// Request, or a flush (fua), runs Write on a goroutine of its own.
//
// What the asynchronous call saves is a goroutine hand-off: the accepted
// Reply of its first attempt ends it on the goroutine that delivers the
// Reply (see Deliver). Everything else (a Reject, no Reply within
// AttemptTimeout, ctx ending) moves it to a goroutine that goes on as Write
// does, under the same request id.
func (c *Client) WriteAsync(ctx context.Context, data []byte, off int64, fua bool, done func(error)) {
	if len(data) > MaxRequest || fua {
		go func() { done(c.Write(ctx, data, off, fua)) }()
		return
	}
	if len(data) == 0 {
		done(nil)
		return
	}
	cl, err := c.begin(ctx, wire.KindWrite, off, int64(len(data)), data, func(_ *wire.Msg, err error) { done(err) })
	if err != nil {
		done(err)
		return
	}
	// The first attempt's timeout and ctx watch are set, and its Request
	// made, under cl.mu: whoever claims the call takes cl.mu (stop) before
	// it touches the call, so it waits for both and comes after the
	// Request read the attempt's fields (a Reply that crossed TCP shows
	// the race detector no such order).
	cl.mu.Lock()
	cl.timer = time.AfterFunc(c.cfg.AttemptTimeout, func() {
		if cl.claim() {
			cl.stop()
			c.timeouts.Add(1)
			c.finishAsync(cl, nil, true)
		}
	})
	cl.stopCtx = context.AfterFunc(ctx, func() {
		if cl.claim() {
			cl.stop()
			c.forget(cl)
			cl.done(nil, cl.fail(ctx.Err()))
		}
	})
	m := c.request(cl)
	cl.mu.Unlock()
	c.attempts.Add(1)
	c.cfg.Send(m)
}

// WriteZeroes makes [off, off+n) read as zeros; with fua it then flushes.
func (c *Client) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if n > 0 {
		if _, err := c.do(ctx, wire.KindZero, off, n, nil); err != nil {
			return err
		}
	}
	if fua {
		return c.Flush(ctx)
	}
	return nil
}

// Trim discards [off, off+n) (it reads as zeros after).
func (c *Client) Trim(ctx context.Context, off, n int64) error {
	if n <= 0 {
		return nil
	}
	_, err := c.do(ctx, wire.KindTrim, off, n, nil)
	return err
}

// Flush returns once every op acknowledged before it is durable on every
// in-sync replica.
func (c *Client) Flush(ctx context.Context) error {
	_, err := c.do(ctx, wire.KindFlush, 0, 0, nil)
	return err
}

// ReadAt fills buf from off with the partition's committed state, read by
// the primary after a read op went through its log (linearizable).
func (c *Client) ReadAt(ctx context.Context, buf []byte, off int64) error {
	for len(buf) > 0 {
		n := min(len(buf), MaxRequest)
		m, err := c.do(ctx, wire.KindRead, off, int64(n), nil)
		if err != nil {
			return err
		}
		if len(m.Data) != n {
			return fmt.Errorf("%w: read [%d,+%d) from %s returned %d bytes", ErrBadReply, off, n, m.From, len(m.Data))
		}
		copy(buf, m.Data)
		buf, off = buf[n:], off+int64(n)
	}
	return nil
}

// call is one Request in flight, from begin to forget: its id and op, and
// the attempt under way. The attempt fields are owned by whoever runs the
// call (do's goroutine; for an asynchronous call, whoever claimed it).
type call struct {
	id      uint64
	ctx     context.Context
	kind    wire.Kind
	off, n  int64
	data    []byte
	ch      chan *wire.Msg // Replies, for whoever runs the call
	cli     *Client
	backoff time.Duration

	to        api.NodeID // the current attempt's target
	epoch     api.Epoch  // and the epoch it was sent at
	dead      api.NodeID // the last target that timed out
	deadEpoch api.Epoch  // at this epoch

	// An asynchronous call (WriteAsync): done ends it. Until claimed,
	// its first attempt waits for Deliver, timer or the ctx watch; the
	// first of them to claim it runs it from there.
	done    func(*wire.Msg, error)
	claimed atomic.Bool
	mu      sync.Mutex // held by WriteAsync while it sets timer and stopCtx (see there)
	timer   *time.Timer
	stopCtx func() bool
}

// claim reports whether the caller is the first to claim the call.
func (cl *call) claim() bool { return cl.claimed.CompareAndSwap(false, true) }

// stop stops the first attempt's timer and ctx watch (either may be the
// caller).
func (cl *call) stop() {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	cl.timer.Stop()
	cl.stopCtx()
}

func (cl *call) fail(err error) error {
	return fmt.Errorf("replica: client %s partition %d %s [%d,+%d) request %016x: %w",
		cl.cli.cfg.Self, cl.cli.cfg.Partition, cl.kind, cl.off, cl.n, cl.id, err)
}

// begin checks a Request and registers its call, addressed to the
// believed primary; the caller sends it. done is nil but for WriteAsync.
func (c *Client) begin(ctx context.Context, kind wire.Kind, off, n int64, data []byte, done func(*wire.Msg, error)) (*call, error) {
	if off < 0 || (kind != wire.KindFlush && n <= 0) {
		return nil, fmt.Errorf("%w: %s [%d,+%d)", target.ErrInvalid, kind, off, n)
	}
	c.requests.Add(1)
	cl := &call{id: c.prefix | uint64(c.seq.Add(1)), ctx: ctx, kind: kind, off: off, n: n, data: data,
		ch: make(chan *wire.Msg, replyBuffer), cli: c, backoff: c.cfg.Backoff, done: done}
	c.mu.Lock()
	c.mu.calls[cl.id] = cl
	cl.to, cl.epoch = c.mu.primary, c.mu.epoch
	c.mu.Unlock()
	if cl.to == "" {
		cl.to = c.after("")
	}
	return cl, nil
}

// forget unregisters a call: later Replies to it are dropped.
func (c *Client) forget(cl *call) {
	c.mu.Lock()
	delete(c.mu.calls, cl.id)
	c.mu.Unlock()
}

// send sends the call's current attempt.
func (c *Client) send(cl *call) {
	c.attempts.Add(1)
	c.cfg.Send(c.request(cl))
}

// request is the Request of the call's current attempt.
func (c *Client) request(cl *call) *wire.Msg {
	return &wire.Msg{Type: wire.TypeRequest, Kind: cl.kind, Epoch: cl.epoch, Partition: c.cfg.Partition,
		ReqID: cl.id, From: c.cfg.Self, To: cl.to, Off: cl.off, Len: cl.n, Data: cl.data}
}

// do runs one Request to completion: it returns the accepted Reply, or an
// error (see the rules in the file doc).
func (c *Client) do(ctx context.Context, kind wire.Kind, off, n int64, data []byte) (*wire.Msg, error) {
	cl, err := c.begin(ctx, kind, off, n, data, nil)
	if err != nil {
		return nil, err
	}
	defer c.forget(cl)
	c.send(cl)
	return c.run(cl, nil, false)
}

// finishAsync runs an asynchronous call that was claimed with m (a Reject)
// or with its first attempt timed out, to its end, and calls done.
func (c *Client) finishAsync(cl *call, m *wire.Msg, timedOut bool) {
	res, err := c.run(cl, m, timedOut)
	c.forget(cl)
	cl.done(res, err)
}

// accepted is the call's result for an accepted Reply m.
func (c *Client) accepted(cl *call, m *wire.Msg) (*wire.Msg, error) {
	if m.Kind != cl.kind {
		return nil, cl.fail(fmt.Errorf("%w: a %s reply from %s", ErrBadReply, m.Kind, m.From))
	}
	return m, nil
}

// run waits for the outcome of the call's attempt under way, which has
// been sent, and retries until the call ends: it returns the accepted
// Reply or an error (see the rules in the file doc). The attempt's first
// event may be given: a Reply m, or that it timed out.
func (c *Client) run(cl *call, m *wire.Msg, timedOut bool) (*wire.Msg, error) {
	ctx := cl.ctx
	timer := time.NewTimer(c.cfg.AttemptTimeout)
	defer timer.Stop()
	for {
		if m == nil && !timedOut {
			select {
			case m = <-cl.ch:
			case <-timer.C:
				c.timeouts.Add(1)
				timedOut = true
			case <-ctx.Done():
				return nil, cl.fail(ctx.Err())
			}
		}
		if m != nil {
			r := m
			m = nil
			if !r.Reject() {
				return c.accepted(cl, r)
			}
			if r.From != cl.to {
				continue // an older attempt's
			}
			c.rejects.Add(1)
			var reason RejectReason
			if len(r.Data) > 0 {
				reason = RejectReason(r.Data[0])
			}
			switch reason {
			case RejectInvalid:
				return nil, cl.fail(fmt.Errorf("%w: refused by %s", target.ErrInvalid, r.From))
			case RejectIO:
				return nil, cl.fail(fmt.Errorf("%w: primary %s could not read", target.ErrIO, r.From))
			}
			c.log.Debug("request rejected", "req", cl.id, "by", r.From, "reason", reason, "epoch", r.Epoch, "peers", r.Peers)
		} else {
			c.log.Debug("request timed out", "req", cl.id, "to", cl.to, "epoch", cl.epoch)
			cl.dead, cl.deadEpoch = cl.to, cl.epoch
			timedOut = false
		}
		// Next attempt: the believed primary if it is news, else the next
		// replica round the set.
		p, e := c.Route()
		if p != "" && (p != cl.to || e != cl.epoch) && (p != cl.dead || e > cl.deadEpoch) {
			cl.to, cl.epoch = p, e
		} else {
			cl.to, cl.epoch = c.after(cl.to), e
			t := time.NewTimer(cl.backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil, cl.fail(ctx.Err())
			}
			cl.backoff = min(2*cl.backoff, MaxRetryBackoff)
		}
		c.send(cl)
		timer.Reset(c.cfg.AttemptTimeout)
	}
}

// after returns the replica after id in the replica set (the first if id
// is none of them).
func (c *Client) after(id api.NodeID) api.NodeID {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := slices.Index(c.mu.replicas, id)
	return c.mu.replicas[(i+1)%len(c.mu.replicas)]
}

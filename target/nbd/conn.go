package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"stor.dev/stor/target"
	"stor.dev/stor/target/sockio"
)

const (
	// readBufSize is the connection's read buffer: a few pipelined 4 KiB
	// writes arrive in one read syscall.
	readBufSize = 128 << 10
	// keepBuf is the largest request buffer a slot keeps between requests;
	// larger ones (up to MaxPayload) are dropped after use, bounding a
	// connection's idle memory to MaxInFlight*keepBuf.
	keepBuf = hdrRoom + 1<<20
	// bigRequest is the payload length above which a READ or WRITE counts
	// against maxBigInFlight.
	bigRequest     = keepBuf - hdrRoom
	maxBigInFlight = 64 << 20
	// maxCoalesce is the largest reply copied into the queue of a busy
	// connection; larger replies wait to be written on their own.
	// maxPending bounds the queue: a client that stops reading its replies
	// stalls the workers, then the reader, instead of growing the queue.
	maxCoalesce = 32 << 10
	maxPending  = 1 << 20
	// maxMapLen bounds the range one BLOCK_STATUS asks the device about;
	// the spec lets the server answer a prefix.
	maxMapLen = 1 << 30
	// largeRead is the READ length from which Config.InlineLargeReadsBelow
	// applies instead of Config.InlineBelow.
	largeRead = 256 << 10
	// aloneFactor scales Config.InlineBelow for a request that is alone
	// on its connection (see fast).
	aloneFactor = 25
	// aloneFlushFactor scales Config.InlineBelow for a FLUSH alone on
	// its connection (see fast).
	aloneFlushFactor = 100
)

// conn is one client connection.
//
// Ownership: the serve goroutine owns negotiation and reading; each request
// is owned by one slot, which a worker owns while executing it (an
// asynchronous write's: the device, until its completion has sent the
// reply and put the slot back). Replies are
// written under wmu, each whole in one write call (possibly with others).
// A client that does not read its replies blocks the workers, then the
// reader: memory stays bounded.
type conn struct {
	s      *Server
	nc     net.Conn
	sc     *sockio.Conn // nc's raw reads and writes (transmission)
	remote string
	// ctx is the context of the connection's catalog and device calls. It
	// is cancelled Config.DrainTimeout after shutdown, so a device that never
	// answers cannot hold Close forever, and when the connection ends.
	ctx    context.Context
	cancel context.CancelFunc

	// Set once the handshake ends; read-only afterwards.
	sess   *session
	mapper target.Mapper
	aw     target.AsyncWriter // nil: every write runs on the reader or a worker

	broken atomic.Bool // a reply write failed: the client is gone

	// wmu serialises reply writes on nc; see send.
	wmu struct {
		sync.Mutex
		idle    sync.Cond // signalled when writing ends or pending is taken
		writing bool      // a worker is in nc.Write
		pending []byte    // replies queued behind the current write
		spare   []byte    // the other pending buffer, reused
	}

	// lat holds the recent latency (ns, moving average) of READs,
	// WRITEs and FLUSHes, and of large READs per MiB (latKind), which
	// decides whether they run inline on the reader.
	lat [4]atomic.Int64

	free    chan *slot   // idle slots; a slot is a request buffer plus a worker's turn
	work    chan *slot   // read requests waiting for a worker
	queued  atomic.Int32 // requests handed to c.work or c.aw and not yet finished
	nslots  int          // slots made so far; owned by the reader
	workers sync.WaitGroup
	// async counts asynchronous writes not yet answered, and writers
	// finishing their replies in the background (see writeLoop).
	async sync.WaitGroup

	// big bounds the memory of large requests in flight: small ones are
	// bounded by MaxInFlight*keepBuf, but 64 pipelined 32 MiB writes
	// would be 2 GiB.
	big struct {
		sync.Mutex
		freed sync.Cond
		bytes int64 // REQUIRES: c.big
	}

	mu struct {
		sync.Mutex
		closing bool
	}
}

// slot carries one request from the reader to a worker and back.
type slot struct {
	req request
	pre uint32 // error value the reader already decided on (writes)
	big int64  // bytes of c.big this request holds
	// cork: the reader runs this request inline with more requests
	// already received, so its reply may wait in wmu.pending to leave
	// with theirs (the reader flushes before it can block).
	cork bool
	// async: a write handed to c.aw, answered from its completion, which
	// must not block (see send).
	async bool
	buf   []byte // hdrRoom bytes of reply header room, then the payload
	msg   [256]byte
}

// payload returns buf resized for n payload bytes after the header room.
func (sl *slot) payload(n int) []byte {
	if cap(sl.buf) < hdrRoom+n {
		sl.buf = make([]byte, hdrRoom+n)
	}
	sl.buf = sl.buf[:hdrRoom+n]
	return sl.buf[hdrRoom:]
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{s: s, nc: nc, sc: sockio.New(nc), remote: nc.RemoteAddr().String()}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	for i := range c.lat {
		// Start on the workers; go inline once requests prove fast.
		c.lat[i].Store(int64(time.Second))
	}
	c.wmu.idle.L = &c.wmu.Mutex
	c.big.freed.L = &c.big.Mutex
	return c
}

// shutdown makes the connection stop reading requests: the reader sees a
// deadline error, drains the requests already read, and hangs up.
func (c *conn) shutdown() {
	c.mu.Lock()
	c.mu.closing = true
	c.mu.Unlock()
	c.nc.SetReadDeadline(time.Unix(1, 0))
	// Replies to calls cancelled at DrainTimeout still get a grace of
	// their own to be written.
	c.nc.SetWriteDeadline(time.Now().Add(2 * c.s.cfg.DrainTimeout))
	time.AfterFunc(c.s.cfg.DrainTimeout, c.cancel)
}

func (c *conn) closing() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.closing
}

// setDeadline sets the read and write deadlines unless shutdown already set
// them.
func (c *conn) setDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.mu.closing {
		c.nc.SetDeadline(t)
	}
}

// serve runs the connection to its end: handshake, transmission, close.
func (c *conn) serve() {
	start := time.Now()
	log := c.s.log.With("remote", c.remote)
	defer c.cancel()
	defer c.nc.Close()

	c.setDeadline(start.Add(c.s.cfg.HandshakeTimeout))
	br := bufio.NewReaderSize(c.nc, readBufSize)
	sess, err := c.negotiate(br, bufio.NewWriterSize(c.nc, 4096))
	if err != nil {
		switch {
		case errors.Is(err, errAbort):
			log.Info("nbd: client aborted negotiation")
		case c.closing():
			log.Info("nbd: negotiation cut short by server shutdown")
		default:
			c.s.metrics.handshakeFailures.Inc()
			log.Warn("nbd: negotiation failed", "err", err, "elapsed", time.Since(start))
		}
		return
	}
	c.setDeadline(time.Time{})
	c.sess = sess
	c.mapper, _ = sess.dev.(target.Mapper)
	c.aw, _ = sess.dev.(target.AsyncWriter)
	log = log.With("export", sess.name)
	log.Info("nbd: export attached", "size", sess.geo.Size, "block_size", sess.geo.BlockSize,
		"read_only", sess.geo.ReadOnly, "structured", sess.structured, "base_allocation", sess.meta)

	br.Reset(&spinReader{sc: c.sc, spin: c.s.cfg.SpinRead, idle: func() bool { return c.queued.Load() == 0 }})
	reason := c.transmit(br)
	if err := sess.dev.Close(); err != nil {
		log.Warn("nbd: closing device", "err", err)
	}
	switch {
	case reason == nil:
		log.Info("nbd: client disconnected", "elapsed", time.Since(start))
	case c.closing():
		log.Info("nbd: connection closed by server shutdown", "elapsed", time.Since(start))
	case errors.Is(reason, io.EOF) || errors.Is(reason, net.ErrClosed) || c.broken.Load():
		log.Info("nbd: client hung up", "elapsed", time.Since(start))
	default:
		log.Warn("nbd: connection dropped", "err", reason, "elapsed", time.Since(start))
	}
}

// transmit reads requests until NBD_CMD_DISC (nil), a read error or a
// protocol violation, handing each to a worker; it returns after every
// request it read has been answered ("Transmission").
func (c *conn) transmit(br *bufio.Reader) (reason error) {
	max := c.s.cfg.MaxInFlight
	c.free = make(chan *slot, max)
	c.work = make(chan *slot, max)
	defer func() {
		close(c.work)
		c.workers.Wait()
		c.async.Wait()
		c.flush()
	}()
	var hdr [requestSize]byte
	for {
		if br.Buffered() < requestSize {
			c.flush()
		}
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return err
		}
		req, err := parseRequest(hdr[:])
		if err != nil {
			return err
		}
		if req.Type == cmdDisc {
			// "NBD_CMD_DISC": handle all outstanding requests, then close.
			return nil
		}
		if req.Type == cmdWrite && req.Length > MaxPayload {
			// Over the advertised maximum payload: the spec lets the
			// server hang up rather than read it ("Size constraints").
			return fmt.Errorf("%w: write payload of %d bytes", ErrProtocol, req.Length)
		}
		sl := c.slot()
		sl.req, sl.pre = req, 0
		if (req.Type == cmdRead || req.Type == cmdWrite) && req.Length > bigRequest && req.Length <= MaxPayload {
			sl.big = int64(req.Length)
			c.acquireBig(sl.big)
		}
		if req.Type == cmdWrite {
			// Judge the write before taking its payload: a refused
			// payload is skipped, not buffered.
			if br.Buffered() < int(req.Length) {
				c.flush()
			}
			if sl.pre = c.check(&sl.req, cmdFlagFUA, classWrite, true); sl.pre != 0 {
				_, err = br.Discard(int(req.Length))
			} else {
				_, err = io.ReadFull(br, sl.payload(int(req.Length)))
			}
			if err != nil {
				c.releaseBig(sl)
				c.free <- sl
				return err
			}
		}
		if c.aw != nil && sl.req.Type == cmdWrite && sl.pre == 0 && sl.big == 0 && sl.req.Flags&cmdFlagFUA == 0 {
			c.writeAsync(sl)
			continue
		}
		more := br.Buffered() >= requestSize
		if c.fast(&sl.req, !more && c.queued.Load() == 0) {
			sl.cork = more
			c.run(sl) // see Config.InlineBelow
			continue
		}
		sl.cork = false
		c.queued.Add(1)
		c.work <- sl
	}
}

// writeAsync hands a plain WRITE (no FUA, at most bigRequest bytes, checked)
// to the device's AsyncWriter: its completion sends the reply and frees the
// slot, so no worker waits for it.
//
// Completions queue their replies without bound (see sendNow), so the
// reader waits here, as send would, while the queue is past maxPending: a
// client that stops reading its replies stalls the reader, and memory stays
// bounded by maxPending plus MaxInFlight small replies.
func (c *conn) writeAsync(sl *slot) {
	c.wmu.Lock()
	for c.wmu.writing && !c.broken.Load() && len(c.wmu.pending) > maxPending {
		c.wmu.idle.Wait()
	}
	c.wmu.Unlock()
	sl.cork, sl.async = false, true
	c.queued.Add(1)
	c.async.Add(1)
	r := &sl.req
	c.aw.WriteAtAsync(c.ctx, sl.buf[hdrRoom:hdrRoom+int(r.Length)], int64(r.Offset), false, func(err error) {
		c.reply(sl, classWrite, err)
		sl.async = false
		c.free <- sl // never blocks: there are at most cap(c.free) slots
		c.queued.Add(-1)
		c.async.Done()
	})
}

// latKind is the index in c.lat of requests whose latency is tracked, or
// -1: plain READs and WRITEs up to 1 MiB, READs of largeRead bytes or more
// apart (latLargeRead, per MiB), FLUSHes (latFlush). FUA writes (durable,
// so slow on real storage) and larger transfers are neither tracked nor
// run inline.
func latKind(r *request) int {
	if r.Flags&cmdFlagFUA != 0 || r.Length > bigRequest {
		return -1
	}
	switch {
	case r.Type == cmdRead && r.Length >= largeRead:
		return latLargeRead
	case r.Type == cmdRead:
		return 0
	case r.Type == cmdWrite:
		return 1
	case r.Type == cmdFlush:
		return latFlush
	}
	return -1
}

const (
	latLargeRead = 2
	latFlush     = 3
)

// fast reports whether r should run on the reader: recent requests of its
// kind took less than Config.InlineBelow, or, when r is alone (no other
// request received and none on the workers: queue depth 1), less than
// aloneFactor times that, since there is nothing to overlap it with; for a
// large READ, recent ones took less than Config.InlineLargeReadsBelow per
// MiB. A FLUSH runs on the reader only alone, and while recent ones took
// less than aloneFlushFactor times Config.InlineBelow (2 ms by default):
// a client that waits for its flush (write, flush, write, ... at queue
// depth 1) then saves the hand-off to a worker, tens of microseconds on a
// VM, and a request that arrives during such a flush waits at most that
// long to be read.
func (c *conn) fast(r *request, alone bool) bool {
	k := latKind(r)
	switch k {
	case latLargeRead:
		lim := c.s.cfg.InlineLargeReadsBelow
		return lim > 0 && time.Duration(c.lat[k].Load()) < lim
	case latFlush:
		lim := c.s.cfg.InlineBelow * aloneFlushFactor
		return alone && lim > 0 && time.Duration(c.lat[k].Load()) < lim
	}
	lim := c.s.cfg.InlineBelow
	if alone {
		lim *= aloneFactor
	}
	return k >= 0 && lim > 0 && time.Duration(c.lat[k].Load()) < lim
}

// run executes a request, tracks its latency and frees its slot.
func (c *conn) run(sl *slot) {
	k := latKind(&sl.req)
	var start time.Time
	if k >= 0 {
		start = time.Now()
	}
	c.handle(sl)
	if k >= 0 {
		// An exponentially weighted moving average, weight 1/8. Racing
		// updates may lose a sample; it is a hint.
		d := int64(time.Since(start))
		if k == latLargeRead {
			d = d * (1 << 20) / int64(sl.req.Length)
		}
		old := c.lat[k].Load()
		c.lat[k].Store(old + (d-old)/8)
	}
	if cap(sl.buf) > keepBuf {
		sl.buf = nil
	}
	c.releaseBig(sl)
	c.free <- sl
}

// slot returns an idle slot, making one (and its worker) while fewer than
// MaxInFlight exist, else waiting for one.
func (c *conn) slot() *slot {
	select {
	case sl := <-c.free:
		return sl
	default:
	}
	if c.nslots < cap(c.free) {
		c.nslots++
		c.workers.Add(1)
		go c.worker()
		return &slot{}
	}
	c.flush()
	return <-c.free
}

func (c *conn) worker() {
	defer c.workers.Done()
	for sl := range c.work {
		c.run(sl)
		c.queued.Add(-1)
	}
}

// acquireBig waits until n more bytes of large request buffers fit in
// maxBigInFlight (a lone request always fits), then takes them. Called by
// the reader only.
func (c *conn) acquireBig(n int64) {
	c.big.Lock()
	if c.big.bytes > 0 && c.big.bytes+n > maxBigInFlight {
		c.big.Unlock()
		c.flush()
		c.big.Lock()
	}
	for c.big.bytes > 0 && c.big.bytes+n > maxBigInFlight {
		c.big.freed.Wait()
	}
	c.big.bytes += n
	c.big.Unlock()
}

// releaseBig returns the large-buffer bytes a slot held, if any.
func (c *conn) releaseBig(sl *slot) {
	if sl.big == 0 {
		return
	}
	c.big.Lock()
	c.big.bytes -= sl.big
	c.big.freed.Signal()
	c.big.Unlock()
	sl.big = 0
}

// send writes one whole reply b for the request in sl. Replies coalesce:
// while one worker is in a write call, others append their replies to
// wmu.pending and the writing worker sends them all in its next call, and
// a reply corked by the reader (sl.cork) waits in pending for the replies
// of the requests already received behind it. At queue depth 1 a reply
// goes straight out without a copy. Replies larger than maxCoalesce wait
// for their turn instead of being copied. A failed write means the client
// is gone: the connection is closed so the reader stops too.
func (c *conn) send(sl *slot, b []byte) {
	if sl.async {
		c.sendNow(b)
		return
	}
	c.wmu.Lock()
	for c.wmu.writing && !c.broken.Load() &&
		(len(b) > maxCoalesce || len(c.wmu.pending)+len(b) > maxPending) {
		c.wmu.idle.Wait()
	}
	if c.broken.Load() {
		c.wmu.Unlock()
		return
	}
	if c.wmu.writing || (sl.cork && len(b) <= maxCoalesce && len(c.wmu.pending)+len(b) <= maxPending) {
		c.wmu.pending = append(c.wmu.pending, b...)
		c.wmu.Unlock()
		return
	}
	c.wmu.writing = true
	c.wmu.Unlock()
	c.writeLoop(b, false, false) // then whatever is pending, corked replies included
}

// sendNow is send for an asynchronous write's completion, which must not
// block: b joins the queue of a writer at work, or is written (with what is
// queued) as far as the socket takes it at once; a goroutine writes the
// rest. The queue is not bounded here but by the reader, which starts no
// asynchronous write while it is past maxPending (see writeAsync).
func (c *conn) sendNow(b []byte) {
	c.wmu.Lock()
	if c.broken.Load() {
		c.wmu.Unlock()
		return
	}
	if c.wmu.writing {
		c.wmu.pending = append(c.wmu.pending, b...)
		c.wmu.Unlock()
		return
	}
	c.wmu.writing = true
	owned := false
	if len(c.wmu.pending) > 0 { // corked replies: they go first
		b = append(c.wmu.pending, b...)
		c.wmu.pending, c.wmu.spare = c.wmu.spare, nil
		owned = true
	}
	c.wmu.Unlock()
	c.writeLoop(b, owned, true)
}

// flush writes the replies corked in wmu.pending, unless a writer is at it
// already (it will take them). The reader calls it before anything that
// may block.
func (c *conn) flush() {
	c.wmu.Lock()
	if c.wmu.writing || len(c.wmu.pending) == 0 || c.broken.Load() {
		c.wmu.Unlock()
		return
	}
	c.wmu.writing = true
	b := c.wmu.pending
	c.wmu.pending, c.wmu.spare = c.wmu.spare, nil
	c.wmu.Unlock()
	c.writeLoop(b, true, false)
}

// writeLoop writes b, then the replies queued meanwhile, until none are
// left. owned says b is a pending buffer (to recycle), not a caller's.
// With now it never waits for the socket: what the socket does not take
// at once is left to a goroutine that goes on as writeLoop without now.
// REQUIRES: the caller set c.wmu.writing.
func (c *conn) writeLoop(b []byte, owned, now bool) {
	for {
		var err error
		if now {
			var n int
			n, err = c.sc.TryWrite(b)
			if err == nil && n < len(b) || errors.Is(err, sockio.ErrNoRaw) {
				rest := b[n:]
				if !owned {
					rest = bytes.Clone(rest) // the caller's: gone when we return
				}
				c.async.Add(1)
				go func() {
					defer c.async.Done()
					c.writeLoop(rest, owned, false)
				}()
				return
			}
		} else {
			err = c.sc.Write(b)
		}
		c.wmu.Lock()
		if err != nil {
			if !c.broken.Swap(true) {
				c.nc.Close()
			}
			c.wmu.pending = c.wmu.pending[:0]
		}
		if owned {
			c.wmu.spare = b[:0]
		}
		if len(c.wmu.pending) == 0 {
			c.wmu.writing = false
			c.wmu.idle.Broadcast()
			c.wmu.Unlock()
			return
		}
		b, c.wmu.pending, c.wmu.spare = c.wmu.pending, c.wmu.spare, nil
		owned = true
		c.wmu.idle.Broadcast() // the queue has room again
		c.wmu.Unlock()
	}
}

// handle executes one request and sends its reply ("Request types").
func (c *conn) handle(sl *slot) {
	r := &sl.req
	s := c.sess
	switch r.Type {
	case cmdRead:
		c.read(sl)
	case cmdWrite:
		if sl.pre != 0 {
			c.replyErr(sl, sl.pre, nil)
			return
		}
		err := s.dev.WriteAt(c.ctx, sl.buf[hdrRoom:hdrRoom+int(r.Length)], int64(r.Offset), r.Flags&cmdFlagFUA != 0)
		c.reply(sl, classWrite, err)
	case cmdFlush:
		if r.Flags&^cmdFlagFUA != 0 {
			c.replyErr(sl, errnoInval, nil)
			return
		}
		c.reply(sl, classRead, s.dev.Flush(c.ctx))
	case cmdTrim:
		if e := c.check(r, cmdFlagFUA, classRead, true); e != 0 {
			c.replyErr(sl, e, nil)
			return
		}
		var err error
		if r.Length > 0 {
			err = s.dev.Trim(c.ctx, int64(r.Offset), int64(r.Length))
			if err == nil && r.Flags&cmdFlagFUA != 0 {
				err = s.dev.Flush(c.ctx)
			}
		}
		c.reply(sl, classRead, err)
	case cmdCache:
		// A hint; the device has no cache to warm. Success after checks.
		if e := c.check(r, cmdFlagFUA, classRead, false); e != 0 {
			c.replyErr(sl, e, nil)
			return
		}
		c.reply(sl, classRead, nil)
	case cmdWriteZeroes:
		c.writeZeroes(sl)
	case cmdBlockStatus:
		c.blockStatus(sl)
	default:
		c.replyErr(sl, errnoInval, fmt.Errorf("unknown command %d", r.Type))
	}
}

// check validates flags and range of r: EINVAL for unknown or misplaced
// flags, misalignment and (for the read class) a range past the end,
// ENOSPC for a write past the end, EPERM for a write to a read-only export
// ("Error values").
func (c *conn) check(r *request, allowed uint16, class cmdClass, writes bool) uint32 {
	if r.Flags&^allowed != 0 {
		return errnoInval
	}
	geo := c.sess.geo
	if writes && geo.ReadOnly {
		return errnoPerm
	}
	if r.Offset > math.MaxInt64 {
		return errno(target.ErrOutOfRange, class)
	}
	return errno(geo.Check(int64(r.Offset), int64(r.Length)), class)
}

func (c *conn) read(sl *slot) {
	r := &sl.req
	allowed := cmdFlagFUA
	if c.sess.structured {
		allowed |= cmdFlagDF
	}
	if r.Length > MaxPayload {
		c.replyErr(sl, errnoInval, errors.New("read longer than the maximum payload"))
		return
	}
	if e := c.check(r, allowed, classRead, false); e != 0 {
		c.replyErr(sl, e, nil)
		return
	}
	n := int(r.Length)
	data := sl.payload(n)
	if n > 0 {
		if err := c.sess.dev.ReadAt(c.ctx, data, int64(r.Offset)); err != nil {
			c.replyErr(sl, errno(err, classRead), err)
			return
		}
	}
	if !c.sess.structured {
		putSimpleReply(sl.buf[hdrRoom-simpleReplySize:], 0, r.Cookie)
		c.send(sl, sl.buf[hdrRoom-simpleReplySize:])
		return
	}
	if n == 0 {
		// Never a simple reply to a READ once structured replies are on.
		b := sl.msg[:structuredReplySize]
		putChunk(b, replyFlagDone, replyNone, r.Cookie, 0)
		c.send(sl, b)
		return
	}
	// One OFFSET_DATA chunk, final: the data is in hand, no error can
	// follow ("NBD_REPLY_TYPE_OFFSET_DATA").
	h := sl.buf[hdrRoom-structuredReplySize-8:]
	putChunk(h, replyFlagDone, replyOffsetData, r.Cookie, uint32(8+n))
	binary.BigEndian.PutUint64(h[structuredReplySize:], r.Offset)
	c.send(sl, h)
}

func (c *conn) writeZeroes(sl *slot) {
	r := &sl.req
	if e := c.check(r, cmdFlagFUA|cmdFlagNoHole|cmdFlagFastZero, classWrite, true); e != 0 {
		c.replyErr(sl, e, nil)
		return
	}
	if r.Length == 0 {
		c.reply(sl, classWrite, nil)
		return
	}
	// WriteZeroes is metadata only, so it is fast and FAST_ZERO is
	// honoured; it never leaves a hole, so NO_HOLE is honoured too.
	fua := r.Flags&cmdFlagFUA != 0
	err := c.sess.dev.WriteZeroes(c.ctx, int64(r.Offset), int64(r.Length), fua)
	if errors.Is(err, target.ErrNotSupported) && r.Flags&cmdFlagFastZero == 0 {
		// Without FAST_ZERO the server MUST NOT fail with ENOTSUP:
		// write the zeros out.
		err = c.writeZeroBuffers(int64(r.Offset), int64(r.Length), fua)
	}
	c.reply(sl, classWrite, err)
}

func (c *conn) writeZeroBuffers(off, n int64, fua bool) error {
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if err := c.sess.dev.WriteAt(c.ctx, zero[:k], off, fua); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(sl *slot) {
	r := &sl.req
	if !c.sess.meta {
		c.replyErr(sl, errnoInval, errors.New("no metadata context selected"))
		return
	}
	// The length is only a hint ("Metadata querying"): an unaligned one
	// is rounded down to whole blocks rather than refused.
	if bs := uint32(c.sess.geo.BlockSize); r.Length > bs {
		r.Length -= r.Length % bs
	}
	if e := c.check(r, cmdFlagFUA|cmdFlagReqOne, classRead, false); e != 0 {
		c.replyErr(sl, e, nil)
		return
	}
	if r.Length == 0 {
		c.replyErr(sl, errnoInval, errors.New("zero-length block status"))
		return
	}
	off, n := int64(r.Offset), min(int64(r.Length), maxMapLen)
	var ext []target.Extent
	if c.mapper != nil {
		var err error
		ext, err = c.mapper.Map(c.ctx, off, n)
		if errors.Is(err, target.ErrNotSupported) {
			ext, err = nil, nil // no map after all: report status 0
		}
		if err != nil {
			c.replyErr(sl, errno(err, classRead), err)
			return
		}
	}
	if r.Flags&cmdFlagReqOne != 0 && len(ext) > 1 {
		ext = ext[:1]
	}
	if len(ext) > maxExtents {
		ext = ext[:maxExtents]
	}
	if len(ext) == 0 {
		// No map: "a server MAY always safely report a status of 0".
		ext = append(ext, target.Extent{Off: off, Len: n, Kind: target.ExtentData})
	}
	p := sl.payload(structuredReplySize + 4 + 8*len(ext))
	binary.BigEndian.PutUint32(p[structuredReplySize:], metaAllocationID)
	d, end := p[structuredReplySize+4:], off+n
	count := 0
	for _, e := range ext {
		l := min(e.Len, end-e.Off)
		if e.Off != off || l <= 0 {
			break // a device answered out of order: stop at what is sound
		}
		var f uint32
		switch e.Kind {
		case target.ExtentHole:
			f = stateHole | stateZero
		case target.ExtentZero:
			f = stateZero
		}
		binary.BigEndian.PutUint32(d[8*count:], uint32(l))
		binary.BigEndian.PutUint32(d[8*count+4:], f)
		count++
		off += l
	}
	if count == 0 {
		binary.BigEndian.PutUint32(d, uint32(n))
		binary.BigEndian.PutUint32(d[4:], 0)
		count = 1
	}
	p = p[:structuredReplySize+4+8*count]
	putChunk(p, replyFlagDone, replyBlockStatus, r.Cookie, uint32(4+8*count))
	c.send(sl, p)
}

// reply answers a request without payload: success, or err mapped for class.
func (c *conn) reply(sl *slot, class cmdClass, err error) {
	if err != nil {
		c.replyErr(sl, errno(err, class), err)
		return
	}
	// A simple reply is allowed for any payload-free success, structured
	// replies or not ("Simple reply message").
	b := sl.msg[:simpleReplySize]
	putSimpleReply(b, 0, sl.req.Cookie)
	c.send(sl, b)
}

// replyErr answers with error value e, as a simple reply or, when
// structured replies were negotiated, as an NBD_REPLY_TYPE_ERROR chunk
// carrying a short message.
func (c *conn) replyErr(sl *slot, e uint32, err error) {
	if !c.sess.structured {
		b := sl.msg[:simpleReplySize]
		putSimpleReply(b, e, sl.req.Cookie)
		c.send(sl, b)
		return
	}
	const fixed = structuredReplySize + 6
	msg := ""
	if err != nil {
		msg = err.Error()
	} else {
		msg = errnoName(e)
	}
	msg = msg[:min(len(msg), len(sl.msg)-fixed)]
	b := sl.msg[:fixed+len(msg)]
	putChunk(b, replyFlagDone, replyError, sl.req.Cookie, uint32(6+len(msg)))
	binary.BigEndian.PutUint32(b[structuredReplySize:], e)
	binary.BigEndian.PutUint16(b[structuredReplySize+4:], uint16(len(msg)))
	copy(b[fixed:], msg)
	c.send(sl, b)
}

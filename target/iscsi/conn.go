package iscsi

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"stor.dev/stor/target/scsi"
)

// maxEDTL bounds the data a single command may move; maxCollecting bounds
// the write buffers of one connection's commands still waiting for their
// data, so that a flood of large writes without data cannot exhaust memory
// (such commands get TASK SET FULL).
const (
	maxEDTL       = 64 << 20
	maxCollecting = 256 << 20
)

// conn is one TCP connection of a session.
type conn struct {
	srv  *Server
	nc   net.Conn
	rd   pduReader
	cid  uint16
	sess *session
	p    params

	wg sync.WaitGroup // running tasks and TMFs

	// Write side. REQUIRES: wmu for every field below and every write.
	wmu    sync.Mutex
	bw     *bufio.Writer
	wbuf   []byte
	statSN uint32
	whdr   bhs
	dig    [4]byte

	mu struct {
		sync.Mutex
		tasks      map[uint32]*task // by ITT
		collecting int64            // bytes of write buffers of tasks awaiting data
		nextTTT    uint32
		text       []byte // Text response not yet sent (continuation)
		textTTT    uint32
	}
}

// task is one SCSI command in flight on a connection.
type task struct {
	itt     uint32
	lun     uint64
	cdb     [16]byte
	cdbExt  []byte // CDB longer than 16 bytes (extended CDB AHS)
	cdbLen  int
	edtl    uint32
	read    bool
	write   bool
	buf     *[]byte // data-out, then data-in; from the server's pool
	got     uint32  // data-out bytes received
	running bool    // all data in: executing
	charged bool    // edtl counted in conn.mu.collecting

	// Unsolicited data-out (RFC 7143 4.2.5.2).
	unsolNext, unsolEnd, unsolSN uint32
	// Solicited data-out.
	nextR2TOff uint32
	r2tSN      uint32
	r2ts       []r2t

	aborted atomic.Bool
	done    sync.WaitGroup
	st      scsi.Task
}

// r2t is an outstanding R2T: the initiator owes [off, off+n).
type r2t struct {
	ttt, off, n, next, dataSN uint32
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{srv: s, nc: nc}
	c.rd.r = bufio.NewReaderSize(nc, 64<<10)
	c.bw = bufio.NewWriterSize(nc, 64<<10)
	c.mu.tasks = map[uint32]*task{}
	return c
}

// serve runs the connection: login, then the full feature phase, then
// cleanup. It returns when the connection is closed.
func (c *conn) serve() {
	defer c.nc.Close()
	if !c.login() {
		return
	}
	defer c.cleanup()
	var p pdu
	for {
		err := c.rd.read(&p)
		if errors.Is(err, errDataDigest) {
			// ERL 0: reject, then drop the connection (RFC 7143 7.8).
			c.reject(&p.hdr, rejectDataDigest)
			return
		}
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.srv.log.Debug("iscsi: connection read", "err", err)
			}
			return
		}
		c.srv.metrics.pdus.Inc()
		if !c.handle(&p) {
			return
		}
	}
}

// cleanup runs after the reader stops: wait for running tasks, drop the
// ones still collecting data, and leave the session.
func (c *conn) cleanup() {
	c.nc.Close()
	c.wg.Wait()
	c.mu.Lock()
	for itt, t := range c.mu.tasks {
		delete(c.mu.tasks, itt)
		c.unchargeLocked(t)
		c.srv.bufs.put(t.buf)
		t.buf = nil
	}
	c.mu.Unlock()
	c.sess.removeConn(c)
}

// handle dispatches one full-feature-phase PDU. It returns false to close
// the connection.
func (c *conn) handle(p *pdu) bool {
	h := &p.hdr
	if c.sess.discovery {
		switch h.opcode() {
		case opTextReq, opLogoutReq, opNopOut:
		default:
			c.reject(h, rejectProtocol)
			return true
		}
	}
	switch h.opcode() {
	case opSCSICmd:
		return c.scsiCommand(p)
	case opDataOut:
		return c.dataOut(p)
	case opNopOut:
		return c.nopOut(p)
	case opTaskMgmt:
		return c.taskMgmt(p)
	case opTextReq:
		return c.textRequest(p)
	case opLogoutReq:
		return c.logout(p)
	case opSNACK:
		c.reject(h, rejectSNACK)
		return true
	case opLoginReq:
		c.reject(h, rejectProtocol)
		return true
	default:
		c.reject(h, rejectUnsupported)
		return true
	}
}

// cdbLength is the CDB length implied by the operation code group
// (SPC-4 4.2.5.1).
func cdbLength(op byte) int {
	switch op >> 5 {
	case 0:
		return 6
	case 1, 2:
		return 10
	case 4:
		return 16
	case 5:
		return 12
	}
	return 16
}

// scsiCommand handles a SCSI Command PDU (RFC 7143 11.3).
func (c *conn) scsiCommand(p *pdu) bool {
	h := &p.hdr
	if !c.sess.admit(h.u32(24), h.immediate()) {
		return true
	}
	c.srv.metrics.commands.Inc()
	t := &task{
		itt:   h.itt(),
		lun:   decodeLUN(h.lunField()),
		edtl:  h.u32(20),
		read:  h[1]&0x40 != 0,
		write: h[1]&0x20 != 0,
	}
	copy(t.cdb[:], h[32:48])
	t.cdbLen = cdbLength(t.cdb[0])
	// Extended CDB AHS (RFC 7143 11.2.2.3): length(2) type=1(1) rsvd(1) CDB.
	for a := p.ahs; len(a) >= 4; {
		n := int(binary.BigEndian.Uint16(a))
		if 3+n > len(a) {
			break
		}
		if a[2] == 1 && n > 1 {
			t.cdbExt = append(append([]byte(nil), t.cdb[:]...), a[4:3+n]...)
		}
		a = a[pad4(3+n):]
	}
	if t.edtl > maxEDTL || t.read && t.write {
		c.refuse(t, scsi.StatusCheckCondition)
		return true
	}
	if t.write && t.edtl > 0 {
		c.mu.Lock()
		full := c.mu.collecting+int64(t.edtl) > maxCollecting
		if !full {
			c.mu.collecting += int64(t.edtl)
			t.charged = true
		}
		c.mu.Unlock()
		if full {
			c.refuse(t, scsi.StatusTaskSetFull)
			return true
		}
	}
	imm := p.data
	if !t.write {
		imm = nil
	}
	if t.write && t.edtl > 0 {
		t.buf = c.srv.bufs.get(int(t.edtl))
		if len(imm) > int(t.edtl) {
			imm = imm[:t.edtl]
		}
		t.got = uint32(copy(*t.buf, imm))
		c.srv.metrics.writeBytes.Add(float64(len(imm)))
		t.unsolNext, t.unsolEnd = t.got, t.got
		if !h.final() {
			t.unsolEnd = min(uint32(c.p.firstBurst), t.edtl)
		}
		t.nextR2TOff = t.unsolEnd
	}
	c.mu.Lock()
	if _, dup := c.mu.tasks[t.itt]; dup {
		c.unchargeLocked(t)
		c.mu.Unlock()
		c.srv.bufs.put(t.buf)
		c.reject(h, rejectTaskInProg)
		return true
	}
	c.mu.tasks[t.itt] = t
	var r2ts []r2t
	if t.write && t.got < t.edtl {
		r2ts = c.issueR2TsLocked(t)
	} else {
		c.startLocked(t)
	}
	c.mu.Unlock()
	for i := range r2ts {
		c.sendR2T(t, r2ts[i])
	}
	return true
}

// issueR2TsLocked opens R2Ts up to MaxOutstandingR2T and returns them for
// sending. REQUIRES: c.mu.
func (c *conn) issueR2TsLocked(t *task) []r2t {
	var out []r2t
	for len(t.r2ts) < c.p.maxOutstandingR2T && t.nextR2TOff < t.edtl {
		n := min(t.edtl-t.nextR2TOff, uint32(c.p.maxBurst))
		c.mu.nextTTT++
		if c.mu.nextTTT == reservedTT {
			c.mu.nextTTT = 1
		}
		r := r2t{ttt: c.mu.nextTTT, off: t.nextR2TOff, n: n, next: t.nextR2TOff}
		t.nextR2TOff += n
		t.r2ts = append(t.r2ts, r)
		out = append(out, r)
	}
	for i := range out {
		out[i].dataSN = t.r2tSN // reuse field: R2TSN to send
		t.r2tSN++
	}
	return out
}

// refuse answers t at once with status (CHECK CONDITION: INVALID FIELD IN
// CDB) without transferring data.
func (c *conn) refuse(t *task, st scsi.Status) {
	c.wg.Add(1)
	t.done.Add(1)
	go func() {
		defer c.wg.Done()
		defer t.done.Done()
		t.st.Status = st
		if st == scsi.StatusCheckCondition {
			t.st.SenseLen = copy(t.st.Sense[:], []byte{0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0})
		}
		c.respond(t)
	}()
}

// unchargeLocked returns t's write buffer to the connection's budget.
// REQUIRES: c.mu.
func (c *conn) unchargeLocked(t *task) {
	if t.charged {
		c.mu.collecting -= int64(t.edtl)
		t.charged = false
	}
}

// startLocked marks t running and executes it. REQUIRES: c.mu.
func (c *conn) startLocked(t *task) {
	c.unchargeLocked(t)
	t.running = true
	c.wg.Add(1)
	t.done.Add(1)
	go c.execute(t)
}

// dataOut handles a SCSI Data-Out PDU (RFC 7143 11.7). A DataSN, offset or
// TTT error ends the task (no within-command recovery at ERL 0): it is
// answered CHECK CONDITION, ABORTED COMMAND, DATA PHASE ERROR, and its
// remaining Data-Out PDUs are discarded.
func (c *conn) dataOut(p *pdu) bool {
	h := &p.hdr
	itt, ttt, dataSN, off := h.itt(), h.u32(20), h.u32(36), h.u32(40)
	n := uint32(len(p.data))
	c.mu.Lock()
	t := c.mu.tasks[itt]
	if t == nil || t.running || !t.write {
		c.mu.Unlock()
		return true // aborted or unknown: discard
	}
	var more []r2t
	if ttt == reservedTT {
		if off != t.unsolNext || dataSN != t.unsolSN || off+n > t.unsolEnd || off+n < off {
			c.srv.log.Info("iscsi: bad unsolicited Data-Out", "itt", itt, "datasn", dataSN, "want", t.unsolSN, "offset", off)
			c.dataPhaseErrorLocked(t)
			return true
		}
		t.unsolNext += n
		t.unsolSN++
	} else {
		i := 0
		for i < len(t.r2ts) && t.r2ts[i].ttt != ttt {
			i++
		}
		if i == len(t.r2ts) {
			c.srv.log.Info("iscsi: Data-Out for unknown TTT", "itt", itt, "ttt", ttt)
			c.dataPhaseErrorLocked(t)
			return true
		}
		r := &t.r2ts[i]
		if off != r.next || dataSN != r.dataSN || off+n > r.off+r.n || off+n < off {
			c.srv.log.Info("iscsi: bad Data-Out", "itt", itt, "datasn", dataSN, "want", r.dataSN, "offset", off, "next", r.next)
			c.dataPhaseErrorLocked(t)
			return true
		}
		r.next += n
		r.dataSN++
		if r.next == r.off+r.n {
			t.r2ts = append(t.r2ts[:i], t.r2ts[i+1:]...)
			more = c.issueR2TsLocked(t)
		}
	}
	copy((*t.buf)[off:], p.data)
	t.got += n
	c.srv.metrics.writeBytes.Add(float64(n))
	if t.got == t.edtl {
		c.startLocked(t)
	}
	c.mu.Unlock()
	for i := range more {
		c.sendR2T(t, more[i])
	}
	return true
}

// execute runs a task's command and sends its response.
func (c *conn) execute(t *task) {
	defer c.wg.Done()
	defer t.done.Done()
	ss := c.sess
	st := &t.st
	st.LUN = t.lun
	st.CDB = t.cdb[:t.cdbLen]
	if t.cdbExt != nil {
		st.CDB = t.cdbExt
	}
	st.Nexus = ss.nexus
	st.DataOut, st.DataIn = nil, nil
	if t.write && t.buf != nil {
		st.DataOut = (*t.buf)[:t.got]
	}
	if t.read && t.edtl > 0 {
		if t.buf == nil || cap(*t.buf) < int(t.edtl) {
			c.srv.bufs.put(t.buf)
			t.buf = c.srv.bufs.get(int(t.edtl))
		}
		st.DataIn = (*t.buf)[:t.edtl]
	}
	ss.lu.Execute(c.srv.ctx, ss.dev, st)
	if !t.aborted.Load() {
		c.respond(t)
	}
	c.mu.Lock()
	if c.mu.tasks[t.itt] == t {
		delete(c.mu.tasks, t.itt)
	}
	c.mu.Unlock()
	c.srv.bufs.put(t.buf)
	t.buf = nil
}

// respond sends Data-In (status in the last PDU when the command succeeded)
// and/or a SCSI Response (RFC 7143 11.4, 11.7).
func (c *conn) respond(t *task) {
	st := &t.st
	var flags byte
	var resid uint32
	want := uint32(st.Want)
	switch {
	case want > t.edtl:
		flags, resid = 0x04, want-t.edtl // overflow
	case want < t.edtl:
		flags, resid = 0x02, t.edtl-want // underflow
	}
	in := 0
	if t.read {
		in = st.InLen
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	exp, maxSN := c.sess.window()
	seg := c.p.maxRecvDSL
	dataSN := uint32(0)
	withStatus := st.Status == scsi.StatusGood && st.SenseLen == 0
	for off := 0; off < in; off += seg {
		n := min(seg, in-off)
		last := off+n == in
		h := &c.whdr
		*h = bhs{}
		h[0] = opDataIn
		if last {
			h[1] = 0x80
		}
		copy(h[8:16], lunBytes(t.lun))
		h.setU32(16, t.itt)
		h.setU32(20, reservedTT)
		if last && withStatus {
			h[1] |= 0x01 | flags
			h[3] = byte(st.Status)
			h.setU32(24, c.statSN)
			c.statSN++
			h.setU32(44, resid)
		}
		h.setU32(28, exp)
		h.setU32(32, maxSN)
		h.setU32(36, dataSN)
		h.setU32(40, uint32(off))
		dataSN++
		if c.writeLocked(h, (*t.buf)[off:off+n]) != nil {
			return
		}
	}
	c.srv.metrics.readBytes.Add(float64(in))
	if in > 0 && withStatus {
		c.flushLocked()
		return
	}
	h := &c.whdr
	*h = bhs{}
	h[0] = opSCSIResp
	h[1] = 0x80 | flags
	h[3] = byte(st.Status)
	h.setU32(16, t.itt)
	h.setU32(24, c.statSN)
	c.statSN++
	h.setU32(28, exp)
	h.setU32(32, maxSN)
	if t.read {
		h.setU32(36, dataSN)
	} else {
		h.setU32(36, t.r2tSN)
	}
	h.setU32(44, resid)
	var data []byte
	if st.SenseLen > 0 {
		var sb [2 + 64]byte
		binary.BigEndian.PutUint16(sb[:], uint16(st.SenseLen))
		n := copy(sb[2:], st.Sense[:st.SenseLen])
		data = sb[:2+n]
	}
	if c.writeLocked(h, data) == nil {
		c.flushLocked()
	}
}

func lunBytes(lun uint64) []byte {
	var b [8]byte
	if lun < 256 {
		b[1] = byte(lun)
	} else {
		b[0], b[1] = 0x40|byte(lun>>8), byte(lun)
	}
	return b[:]
}

// sendR2T sends one R2T (RFC 7143 11.8). r.dataSN carries the R2TSN.
func (c *conn) sendR2T(t *task, r r2t) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	exp, maxSN := c.sess.window()
	h := &c.whdr
	*h = bhs{}
	h[0] = opR2T
	h[1] = 0x80
	copy(h[8:16], lunBytes(t.lun))
	h.setU32(16, t.itt)
	h.setU32(20, r.ttt)
	h.setU32(24, c.statSN)
	h.setU32(28, exp)
	h.setU32(32, maxSN)
	h.setU32(36, r.dataSN)
	h.setU32(40, r.off)
	h.setU32(44, r.n)
	if c.writeLocked(h, nil) == nil {
		c.flushLocked()
	}
}

// writeLocked writes one PDU into the buffered writer. REQUIRES: c.wmu.
func (c *conn) writeLocked(h *bhs, data []byte) error {
	h.setDataLen(len(data))
	if _, err := c.bw.Write(h[:]); err != nil {
		c.nc.Close()
		return err
	}
	if c.p.headerDigest {
		binary.LittleEndian.PutUint32(c.dig[:], crc32c(h[:]))
		c.bw.Write(c.dig[:])
	}
	if len(data) == 0 {
		return nil
	}
	pad := zeroPad[:pad4(len(data))-len(data)]
	c.bw.Write(data)
	c.bw.Write(pad)
	if c.p.dataDigest {
		binary.LittleEndian.PutUint32(c.dig[:], crc32c(data, pad))
		_, err := c.bw.Write(c.dig[:])
		if err != nil {
			c.nc.Close()
			return err
		}
	}
	return nil
}

// flushLocked flushes the writer. REQUIRES: c.wmu.
func (c *conn) flushLocked() {
	if err := c.bw.Flush(); err != nil {
		c.nc.Close()
	}
}

// reject sends a Reject PDU carrying the offending header (RFC 7143 11.17).
func (c *conn) reject(bad *bhs, reason byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	exp, maxSN := uint32(0), uint32(0)
	if c.sess != nil {
		exp, maxSN = c.sess.window()
	}
	var h bhs
	h[0] = opReject
	h[1] = 0x80
	h[2] = reason
	h.setU32(16, reservedTT)
	h.setU32(24, c.statSN)
	c.statSN++
	h.setU32(28, exp)
	h.setU32(32, maxSN)
	var copyHdr bhs = *bad
	if c.writeLocked(&h, copyHdr[:]) == nil {
		c.flushLocked()
	}
}

// nopOut answers a NOP-Out ping with a NOP-In echoing its data (RFC 7143
// 11.18-11.19); a NOP-Out answering our ping (ITT 0xffffffff) needs nothing.
func (c *conn) nopOut(p *pdu) bool {
	h := &p.hdr
	if !c.sess.admit(h.u32(24), h.immediate()) {
		return true
	}
	if h.itt() == reservedTT {
		return true
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	exp, maxSN := c.sess.window()
	r := &c.whdr
	*r = bhs{}
	r[0] = opNopIn
	r[1] = 0x80
	copy(r[8:16], h[8:16])
	r.setU32(16, h.itt())
	r.setU32(20, reservedTT)
	r.setU32(24, c.statSN)
	c.statSN++
	r.setU32(28, exp)
	r.setU32(32, maxSN)
	data := p.data
	if len(data) > c.p.maxRecvDSL {
		data = data[:c.p.maxRecvDSL]
	}
	if c.writeLocked(r, data) == nil {
		c.flushLocked()
	}
	return true
}

// dataPhaseErrorLocked ends a task whose Data-Out sequence broke: it leaves
// the task table and is answered ABORTED COMMAND / DATA PHASE ERROR (SAM-5
// 5.3). REQUIRES: c.mu; releases it.
func (c *conn) dataPhaseErrorLocked(t *task) {
	delete(c.mu.tasks, t.itt)
	c.unchargeLocked(t)
	c.srv.bufs.put(t.buf)
	t.buf = nil
	t.write = false
	c.mu.Unlock()
	t.st.Status = scsi.StatusCheckCondition
	t.st.Want = int(t.edtl)
	t.st.SenseLen = copy(t.st.Sense[:], []byte{0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4b, 0x00, 0, 0, 0, 0})
	c.respond(t)
}

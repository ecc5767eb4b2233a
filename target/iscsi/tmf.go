package iscsi

import "stor.dev/stor/target/scsi"

// Task management functions and responses (RFC 7143 11.5-11.6).
const (
	tmfAbortTask    = 1
	tmfAbortTaskSet = 2
	tmfClearACA     = 3
	tmfClearTaskSet = 4
	tmfLUNReset     = 5
	tmfWarmReset    = 6
	tmfColdReset    = 7
	tmfTaskReassign = 8

	tmfComplete       = 0
	tmfNoTask         = 1
	tmfNoLUN          = 2
	tmfReassignUnsupp = 4
	tmfUnsupported    = 5
)

// taskMgmt handles a Task Management Function Request. The function runs
// in its own goroutine so that the reader keeps reading while aborted
// tasks finish.
func (c *conn) taskMgmt(p *pdu) bool {
	h := p.hdr
	if !c.sess.admit(h.u32(24), h.immediate()) {
		return true
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		fn := h[1] & 0x7f
		lun := decodeLUN(h.lunField())
		resp := byte(tmfComplete)
		cold := false
		switch fn {
		case tmfAbortTask:
			if !c.sess.abort(func(t *task) bool { return t.itt == h.u32(20) }) {
				resp = tmfNoTask
			}
		case tmfAbortTaskSet, tmfClearTaskSet:
			if lun != 0 {
				resp = tmfNoLUN
				break
			}
			c.sess.abort(func(t *task) bool { return true })
		case tmfLUNReset:
			if lun != 0 {
				resp = tmfNoLUN
				break
			}
			c.srv.resetLU(c.sess.volume, scsi.UALUNReset)
		case tmfWarmReset, tmfColdReset:
			c.srv.resetLU(c.sess.volume, scsi.UATargetReset)
			cold = fn == tmfColdReset
		case tmfTaskReassign:
			resp = tmfReassignUnsupp
		default:
			resp = tmfUnsupported
		}
		c.wmu.Lock()
		exp, maxSN := c.sess.window()
		r := &c.whdr
		*r = bhs{}
		r[0] = opTaskMgmtRsp
		r[1] = 0x80
		r[2] = resp
		r.setU32(16, h.itt())
		r.setU32(24, c.statSN)
		c.statSN++
		r.setU32(28, exp)
		r.setU32(32, maxSN)
		if c.writeLocked(r, nil) == nil {
			c.flushLocked()
		}
		c.wmu.Unlock()
		if cold {
			// RFC 7143 11.5.1: a cold reset ends every session of the
			// target (here: of this volume's IQN).
			c.srv.closeTarget(c.sess.volume)
		}
	}()
	return true
}

// abort aborts the session's tasks that match: collecting tasks are
// dropped, running ones lose their response and are waited for. It
// reports whether any matched.
func (ss *session) abort(match func(*task) bool) bool {
	var wait []*task
	found := false
	for _, c := range ss.conns() {
		c.mu.Lock()
		for itt, t := range c.mu.tasks {
			if !match(t) {
				continue
			}
			found = true
			t.aborted.Store(true)
			if t.running {
				wait = append(wait, t)
				continue
			}
			delete(c.mu.tasks, itt)
			c.unchargeLocked(t)
			c.srv.bufs.put(t.buf)
			t.buf = nil
		}
		c.mu.Unlock()
	}
	for _, t := range wait {
		t.done.Wait()
	}
	return found
}

// resetLU performs a LOGICAL UNIT RESET of volume: every session's tasks
// on it are aborted and the LU's reset state cleared (SAM-5 6.4).
func (s *Server) resetLU(volume string, ua uint16) {
	s.mu.Lock()
	var ss []*session
	for _, x := range s.mu.sessions {
		if !x.discovery && x.volume == volume {
			ss = append(ss, x)
		}
	}
	lu := s.mu.lus[volume]
	s.mu.Unlock()
	for _, x := range ss {
		x.abort(func(*task) bool { return true })
	}
	if lu != nil {
		lu.lu.Reset(ua)
	}
}

// textRequest handles a Text Request (RFC 7143 11.10): SendTargets, with
// continuation when the answer exceeds the initiator's segment length.
func (c *conn) textRequest(p *pdu) bool {
	h := &p.hdr
	if !c.sess.admit(h.u32(24), h.immediate()) {
		return true
	}
	var body []byte
	c.mu.Lock()
	if ttt := h.u32(20); ttt != reservedTT && ttt == c.mu.textTTT && len(c.mu.text) > 0 {
		body = c.mu.text
		c.mu.text = nil
	}
	c.mu.Unlock()
	if body == nil {
		for _, k := range parseText(p.data) {
			switch k.k {
			case "SendTargets":
				body = append(body, c.sendTargets(k.v)...)
			case "":
				c.reject(h, rejectProtocol)
				return true
			default:
				body = appendText(body, k.k, "NotUnderstood")
			}
		}
	}
	more := len(body) > c.p.maxRecvDSL
	var rest []byte
	if more {
		rest = body[c.p.maxRecvDSL:]
		body = body[:c.p.maxRecvDSL]
	}
	ttt := uint32(reservedTT)
	if more {
		c.mu.Lock()
		c.mu.nextTTT++
		if c.mu.nextTTT == reservedTT {
			c.mu.nextTTT = 1
		}
		ttt = c.mu.nextTTT
		c.mu.text, c.mu.textTTT = rest, ttt
		c.mu.Unlock()
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	exp, maxSN := c.sess.window()
	r := &c.whdr
	*r = bhs{}
	r[0] = opTextResp
	if more {
		r[1] = 0x40
	} else {
		r[1] = 0x80
	}
	copy(r[8:16], h[8:16])
	r.setU32(16, h.itt())
	r.setU32(20, ttt)
	r.setU32(24, c.statSN)
	c.statSN++
	r.setU32(28, exp)
	r.setU32(32, maxSN)
	if c.writeLocked(r, body) == nil {
		c.flushLocked()
	}
	return true
}

// sendTargets lists targets (RFC 7143 12.3): All in a discovery session,
// else the session's own target.
func (c *conn) sendTargets(v string) []byte {
	portal := c.srv.cfg.Portal
	if portal == "" {
		portal = c.nc.LocalAddr().String()
	}
	var out []byte
	list, err := c.srv.cfg.Catalog.List(c.srv.ctx)
	if err != nil {
		return nil
	}
	for _, e := range list {
		iqn := IQNPrefix + e.Name
		switch {
		case v == "All" && c.sess.discovery:
		case v == "" && !c.sess.discovery && e.Name == c.sess.volume:
		case v == iqn:
		case v == "All" && e.Name == c.sess.volume:
		default:
			continue
		}
		out = appendText(out, "TargetName", iqn)
		out = appendText(out, "TargetAddress", portal+",1")
	}
	return out
}

// logout handles a Logout Request (RFC 7143 11.14): close the session or
// the connection once its running tasks are done.
func (c *conn) logout(p *pdu) bool {
	h := &p.hdr
	if !c.sess.admit(h.u32(24), h.immediate()) {
		return true
	}
	reason := h[1] & 0x7f
	resp := byte(0)
	switch reason {
	case 0, 1:
	case 2:
		resp = 2 // connection recovery not supported
	default:
		c.reject(h, rejectInvalidField)
		return true
	}
	if reason == 1 && h.u16(20) != c.cid {
		resp = 1 // CID not found on this connection; we only close our own
		for _, o := range c.sess.conns() {
			if o.cid == h.u16(20) {
				resp = 0
				o.nc.Close()
			}
		}
	}
	c.wg.Wait()
	c.wmu.Lock()
	exp, maxSN := c.sess.window()
	r := &c.whdr
	*r = bhs{}
	r[0] = opLogoutResp
	r[1] = 0x80
	r[2] = resp
	r.setU32(16, h.itt())
	r.setU32(24, c.statSN)
	c.statSN++
	r.setU32(28, exp)
	r.setU32(32, maxSN)
	if c.writeLocked(r, nil) == nil {
		c.flushLocked()
	}
	c.wmu.Unlock()
	if resp != 0 {
		return true
	}
	if reason == 0 {
		c.sess.closeAll()
	}
	return reason == 1 && h.u16(20) != c.cid
}

// closeTarget closes every connection of every session on volume.
func (s *Server) closeTarget(volume string) {
	s.mu.Lock()
	var ss []*session
	for _, x := range s.mu.sessions {
		if !x.discovery && x.volume == volume {
			ss = append(ss, x)
		}
	}
	s.mu.Unlock()
	for _, x := range ss {
		x.closeAll()
	}
}

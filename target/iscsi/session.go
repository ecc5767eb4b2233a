package iscsi

import (
	"context"
	"encoding/hex"
	"sync"
	"sync/atomic"

	"stor.dev/stor/target"
	"stor.dev/stor/target/scsi"
)

// session is an iSCSI session: its connections, CmdSN window and, for a
// normal session, the opened device and its LU.
type session struct {
	srv       *Server
	tsih      uint16
	isid      [6]byte
	initiator string
	volume    string // "" for discovery
	discovery bool
	dev       target.Device
	lu        *scsi.LU
	nexus     scsi.Nexus
	maxConns  int

	expCmdSN atomic.Uint32 // mirror of mu.expCmdSN for lock-free reads

	mu struct {
		sync.Mutex
		expCmdSN uint32
		ahead    map[uint32]bool // admitted CmdSNs past a gap (MC/S)
		conns    map[uint16]*conn
		ended    bool
	}
}

func initiatorPort(name string, isid [6]byte) string {
	return name + ",i,0x" + hex.EncodeToString(isid[:])
}

// window returns ExpCmdSN and MaxCmdSN for a response.
func (ss *session) window() (uint32, uint32) {
	e := ss.expCmdSN.Load()
	return e, e + cmdWindow - 1
}

// admit applies the CmdSN rules (RFC 7143 4.2.2.1) to a command and
// reports whether to execute it. Immediate commands do not advance
// ExpCmdSN; a CmdSN outside the window or already seen is dropped.
func (ss *session) admit(sn uint32, immediate bool) bool {
	if immediate {
		return true
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	exp := ss.mu.expCmdSN
	if snLess(sn, exp) || snLess(exp+cmdWindow-1, sn) {
		return false
	}
	if sn != exp {
		if ss.mu.ahead == nil {
			ss.mu.ahead = map[uint32]bool{}
		}
		if ss.mu.ahead[sn] {
			return false
		}
		ss.mu.ahead[sn] = true
		return true
	}
	exp++
	for ss.mu.ahead[exp] {
		delete(ss.mu.ahead, exp)
		exp++
	}
	ss.mu.expCmdSN = exp
	ss.expCmdSN.Store(exp)
	return true
}

// addConn adds c under cid, replacing (and closing) a connection with the
// same CID (connection reinstatement). It fails when the session ended or
// is full.
func (ss *session) addConn(c *conn) (ok bool, full bool) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.mu.ended {
		return false, false
	}
	if old, dup := ss.mu.conns[c.cid]; dup {
		old.nc.Close()
	} else if len(ss.mu.conns) >= max(ss.maxConns, 1) {
		return false, true
	}
	ss.mu.conns[c.cid] = c
	return true, false
}

// conns returns the session's connections.
func (ss *session) conns() []*conn {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	out := make([]*conn, 0, len(ss.mu.conns))
	for _, c := range ss.mu.conns {
		out = append(out, c)
	}
	return out
}

// closeAll closes every connection of the session; each ends the session
// part it holds as its reader exits.
func (ss *session) closeAll() {
	for _, c := range ss.conns() {
		c.nc.Close()
	}
}

// removeConn drops c; the last connection out ends the session: the device
// is closed and the LU released.
func (ss *session) removeConn(c *conn) {
	ss.mu.Lock()
	if cur, ok := ss.mu.conns[c.cid]; ok && cur == c {
		delete(ss.mu.conns, c.cid)
	}
	last := len(ss.mu.conns) == 0 && !ss.mu.ended
	if last {
		ss.mu.ended = true
	}
	ss.mu.Unlock()
	if !last {
		return
	}
	s := ss.srv
	s.mu.Lock()
	if cur, ok := s.mu.sessions[ss.tsih]; ok && cur == ss {
		delete(s.mu.sessions, ss.tsih)
	}
	s.mu.Unlock()
	s.metrics.sessions.Dec()
	if ss.lu != nil {
		ss.lu.NexusLost(ss.nexus)
		s.releaseLU(ss.volume)
	}
	if ss.dev != nil {
		if err := ss.dev.Close(); err != nil {
			s.log.Warn("iscsi: device close", "volume", ss.volume, "err", err)
		}
	}
	s.log.Debug("iscsi: session ended", "initiator", ss.initiator, "volume", ss.volume, "tsih", ss.tsih)
}

// newSession creates and registers a session; for a normal session it
// opens the device and acquires the LU. An existing session of the same
// initiator port on the same target is reinstated (closed) first.
func (s *Server) newSession(ctx context.Context, ls *loginState) (*session, uint16, error) {
	ss := &session{
		srv:       s,
		isid:      ls.isid,
		initiator: ls.initiatorName,
		volume:    ls.volume,
		discovery: ls.discovery,
		maxConns:  ls.p.maxConnections,
	}
	ss.nexus = scsi.Nexus{Initiator: initiatorPort(ls.initiatorName, ls.isid), Port: 1}
	ss.mu.conns = map[uint16]*conn{}
	ss.mu.expCmdSN = ls.cmdSN
	ss.expCmdSN.Store(ls.cmdSN)

	// Reinstatement (RFC 7143 6.3.5): same initiator name, ISID and target.
	s.mu.Lock()
	var old []*session
	for tsih, o := range s.mu.sessions {
		if o.initiator == ss.initiator && o.isid == ss.isid && o.volume == ss.volume && o.discovery == ss.discovery {
			old = append(old, o)
			delete(s.mu.sessions, tsih)
		}
	}
	s.mu.Unlock()
	for _, o := range old {
		o.closeAll()
	}

	if !ss.discovery {
		dev, err := s.cfg.Catalog.Open(ctx, ss.volume)
		if err != nil {
			return nil, 0, err
		}
		lu, err := s.acquireLU(ctx, dev.Info())
		if err != nil {
			dev.Close()
			return nil, 0, err
		}
		ss.dev, ss.lu = dev, lu
		lu.Attach(ss.nexus)
	}
	s.mu.Lock()
	for {
		s.mu.nextTSIH++
		if s.mu.nextTSIH == 0 {
			continue
		}
		if _, used := s.mu.sessions[s.mu.nextTSIH]; !used {
			break
		}
	}
	ss.tsih = s.mu.nextTSIH
	s.mu.sessions[ss.tsih] = ss
	s.mu.Unlock()
	s.metrics.sessions.Inc()
	return ss, ss.tsih, nil
}

// lookupSession finds the session a login with a nonzero TSIH joins.
func (s *Server) lookupSession(tsih uint16) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.sessions[tsih]
}

package iscsi

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"stor.dev/stor/target"
)

// Login status class and detail (RFC 7143 11.13.5).
const (
	loginSuccess        = 0x0000
	loginAuthFailure    = 0x0201
	loginForbidden      = 0x0202
	loginNotFound       = 0x0203
	loginUnsupportedVer = 0x0205
	loginTooManyConns   = 0x0206
	loginMissingParam   = 0x0207
	loginNoSessionType  = 0x0209
	loginNoSession      = 0x020a
	loginInvalidDuring  = 0x020b
	loginInitiatorError = 0x0200
	loginTargetError    = 0x0300
	loginOutOfResources = 0x0302
)

// Login stages (CSG/NSG, RFC 7143 11.12.3).
const (
	stageSecurity    = 0
	stageOperational = 1
	stageFullFeature = 3
)

// loginState is what a connection learns during login (RFC 7143 6).
type loginState struct {
	initiatorName string
	targetName    string
	volume        string
	discovery     bool
	isid          [6]byte
	tsih          uint16
	cid           uint16
	cmdSN         uint32
	first         bool

	chap      *CHAP
	authDone  bool
	chapStage int // 0: AuthMethod, 1: CHAP_A, 2: CHAP_N/CHAP_R
	chapID    byte
	chapChal  []byte
	p         params
	partial   []byte // text of PDUs with the C bit
}

// loginError ends a login with a status.
type loginError struct {
	status uint16
	err    error
}

func (e *loginError) Error() string { return "iscsi: login refused: " + e.err.Error() }

func refuse(status uint16, msg string) *loginError {
	if status == loginAuthFailure {
		return &loginError{status: status, err: fmt.Errorf("%w: %s", ErrAuth, msg)}
	}
	return &loginError{status: status, err: errors.New(msg)}
}

func (e *loginError) Unwrap() error { return e.err }

// login runs the login phase on c (RFC 7143 6.3). It returns true when the
// connection entered the full feature phase.
func (c *conn) login() bool {
	ls := &loginState{first: true, p: defaultParams()}
	var p pdu
	c.rd.maxData = 65536
	for {
		if err := c.rd.read(&p); err != nil {
			return false
		}
		h := &p.hdr
		if h.opcode() != opLoginReq {
			c.loginRespond(h, ls, nil, refuse(loginInvalidDuring, "non-login PDU during login"), false, 0)
			return false
		}
		if ls.first {
			copy(ls.isid[:], h[8:14])
			ls.tsih = h.u16(14)
			ls.cid = h.u16(20)
			ls.cmdSN = h.u32(24)
			c.statSN = h.u32(28)
			c.cid = ls.cid
			if h[3] > 0 { // Version-min
				c.loginRespond(h, ls, nil, refuse(loginUnsupportedVer, "version"), false, 0)
				return false
			}
		}
		csg, nsg, transit := int(h[1]>>2)&3, int(h[1])&3, h[1]&0x80 != 0
		if h[1]&0x40 != 0 { // C: more text follows
			ls.partial = append(ls.partial, p.data...)
			c.loginRespond(h, ls, nil, nil, false, csg)
			continue
		}
		text := p.data
		if len(ls.partial) > 0 {
			text = append(ls.partial, p.data...)
			ls.partial = nil
		}
		resp, done, lerr := c.loginStep(ls, csg, nsg, transit, parseText(text))
		if lerr != nil {
			c.srv.metrics.loginFails.Inc()
			c.srv.log.Info("iscsi: login refused", "initiator", ls.initiatorName, "target", ls.targetName, "status", lerr.status, "err", lerr.err)
			c.loginRespond(h, ls, resp, lerr, false, csg)
			return false
		}
		if !c.loginRespond(h, ls, resp, nil, transit && done >= 0, csg) {
			return false
		}
		if done == stageFullFeature {
			c.p = ls.p
			c.rd.hdigest, c.rd.ddigest = c.p.headerDigest, c.p.dataDigest
			c.rd.maxData = ourMaxRecvDSL
			return true
		}
	}
}

// loginStep handles one login request's keys in stage csg. done is the
// stage entered when transit is granted (-1: stay).
func (c *conn) loginStep(ls *loginState, csg, nsg int, transit bool, keys []kv) (resp []byte, done int, lerr *loginError) {
	ctx := c.srv.ctx
	done = -1
	if ls.first {
		ls.first = false
		sessionType := "Normal"
		for _, k := range keys {
			switch k.k {
			case "InitiatorName":
				ls.initiatorName = k.v
			case "TargetName":
				ls.targetName = k.v
			case "SessionType":
				sessionType = k.v
			}
		}
		if ls.initiatorName == "" {
			return nil, -1, refuse(loginMissingParam, "no InitiatorName")
		}
		switch sessionType {
		case "Discovery":
			ls.discovery = true
		case "Normal":
			if ls.targetName == "" {
				return nil, -1, refuse(loginMissingParam, "no TargetName")
			}
			vol, ok := volumeOf(ls.targetName)
			if !ok || !c.srv.exists(ctx, vol) {
				return nil, -1, refuse(loginNotFound, "no target "+ls.targetName)
			}
			ls.volume = vol
		default:
			return nil, -1, refuse(loginNoSessionType, "session type "+sessionType)
		}
		if a := c.srv.cfg.Auth; a != nil {
			cfg, ok, err := a.CHAPFor(ctx, ls.volume)
			if err != nil {
				return nil, -1, &loginError{status: loginTargetError, err: err}
			}
			if ok {
				ls.chap = &cfg
			}
		}
		if ls.tsih != 0 {
			ss := c.srv.lookupSession(ls.tsih)
			if ss == nil || ss.initiator != ls.initiatorName || ss.isid != ls.isid {
				return nil, -1, refuse(loginNoSession, "no session to join")
			}
		}
		if !ls.discovery {
			resp = appendText(resp, "TargetPortalGroupTag", "1")
		}
	}
	switch csg {
	case stageSecurity:
		r, lerr := c.security(ls, keys)
		resp = append(resp, r...)
		if lerr != nil {
			return resp, -1, lerr
		}
		if transit {
			if !ls.authDone {
				if ls.chap != nil && ls.chapStage < 2 {
					// Still negotiating: refuse the transit, keep going.
					return resp, -1, nil
				}
				return resp, -1, refuse(loginAuthFailure, "authentication not completed")
			}
			done = nsg
		}
	case stageOperational:
		if ls.chap != nil && !ls.authDone {
			return resp, -1, refuse(loginAuthFailure, "CHAP required")
		}
		ls.authDone = true
		for _, k := range keys {
			if k.k == "" {
				return resp, -1, refuse(loginInitiatorError, "malformed key")
			}
			if isSecurityKey(k.k) {
				return resp, -1, refuse(loginInitiatorError, "security key in operational stage")
			}
			if ans := ls.p.negotiate(k.k, k.v); ans != "" {
				resp = appendText(resp, k.k, ans)
			}
		}
		resp = appendText(resp, "MaxRecvDataSegmentLength", strconv.Itoa(ourMaxRecvDSL))
		if transit {
			done = nsg
		}
	default:
		return resp, -1, refuse(loginInitiatorError, "bad CSG")
	}
	if done == stageFullFeature {
		if lerr := c.enterSession(ctx, ls); lerr != nil {
			return resp, -1, lerr
		}
	} else if done >= 0 && done != stageOperational {
		return resp, -1, refuse(loginInitiatorError, "bad NSG")
	}
	return resp, done, nil
}

func isSecurityKey(k string) bool {
	return k == "AuthMethod" || strings.HasPrefix(k, "CHAP_")
}

func (s *Server) exists(ctx context.Context, vol string) bool {
	list, err := s.cfg.Catalog.List(ctx)
	if err != nil {
		return false
	}
	for _, e := range list {
		if e.Name == vol {
			return true
		}
	}
	return false
}

// security handles the security stage: AuthMethod, then CHAP (RFC 7143
// 12.1.3): CHAP_A, then CHAP_N/CHAP_R and, for mutual CHAP, CHAP_I/CHAP_C.
func (c *conn) security(ls *loginState, keys []kv) ([]byte, *loginError) {
	var resp []byte
	var chapN, chapR, chapI, chapC string
	var hasR, hasI, hasC bool
	for _, k := range keys {
		switch k.k {
		case "InitiatorName", "TargetName", "SessionType", "InitiatorAlias":
		case "AuthMethod":
			choice := ""
			for _, m := range strings.Split(k.v, ",") {
				if ls.chap != nil && m == "CHAP" || ls.chap == nil && m == "None" {
					choice = m
					break
				}
			}
			if choice == "" {
				return appendText(resp, "AuthMethod", "Reject"), refuse(loginAuthFailure, "no acceptable AuthMethod in "+k.v)
			}
			resp = appendText(resp, "AuthMethod", choice)
			if choice == "None" {
				ls.authDone = true
			} else {
				ls.chapStage = 1
			}
		case "CHAP_A":
			if ls.chap == nil || ls.chapStage != 1 {
				return resp, refuse(loginInitiatorError, "unexpected CHAP_A")
			}
			ok := false
			for _, a := range strings.Split(k.v, ",") {
				ok = ok || a == "5"
			}
			if !ok {
				return appendText(resp, "CHAP_A", "Reject"), refuse(loginAuthFailure, "CHAP algorithm not MD5")
			}
			var b [17]byte
			_, _ = rand.Read(b[:])
			ls.chapID, ls.chapChal = b[0], b[1:]
			resp = appendText(resp, "CHAP_A", "5")
			resp = appendText(resp, "CHAP_I", strconv.Itoa(int(ls.chapID)))
			resp = appendText(resp, "CHAP_C", "0x"+hex.EncodeToString(ls.chapChal))
			ls.chapStage = 2
		case "CHAP_N":
			chapN = k.v
		case "CHAP_R":
			chapR, hasR = k.v, true
		case "CHAP_I":
			chapI, hasI = k.v, true
		case "CHAP_C":
			chapC, hasC = k.v, true
		default:
			if strings.HasPrefix(k.k, "X-") || strings.HasPrefix(k.k, "X#") {
				resp = appendText(resp, k.k, "NotUnderstood")
				continue
			}
			if k.k == "" {
				return resp, refuse(loginInitiatorError, "malformed key")
			}
			// Operational keys may ride along in the security stage.
			if ans := ls.p.negotiate(k.k, k.v); ans != "" {
				resp = appendText(resp, k.k, ans)
			}
		}
	}
	if !hasR {
		return resp, nil
	}
	if ls.chap == nil || ls.chapStage != 2 {
		return resp, refuse(loginInitiatorError, "unexpected CHAP_R")
	}
	got, err := decodeCHAP(chapR)
	if err != nil {
		return resp, refuse(loginAuthFailure, "malformed CHAP_R")
	}
	want := chapResponse(ls.chapID, ls.chap.Secret, ls.chapChal)
	if chapN != ls.chap.User || subtle.ConstantTimeCompare(got, want[:]) != 1 {
		return resp, refuse(loginAuthFailure, "CHAP response for user "+chapN+" wrong")
	}
	if hasI != hasC {
		return resp, refuse(loginAuthFailure, "mutual CHAP needs CHAP_I and CHAP_C")
	}
	if hasI {
		if ls.chap.MutualUser == "" {
			return resp, refuse(loginAuthFailure, "mutual CHAP not configured")
		}
		id, err := strconv.Atoi(chapI)
		if err != nil || id < 0 || id > 255 {
			return resp, refuse(loginAuthFailure, "malformed CHAP_I")
		}
		chal, err := decodeCHAP(chapC)
		if err != nil || len(chal) == 0 || subtle.ConstantTimeCompare(chal, ls.chapChal) == 1 {
			return resp, refuse(loginAuthFailure, "malformed or reflected CHAP_C")
		}
		r := chapResponse(byte(id), ls.chap.MutualSecret, chal)
		resp = appendText(resp, "CHAP_N", ls.chap.MutualUser)
		resp = appendText(resp, "CHAP_R", "0x"+hex.EncodeToString(r[:]))
	} else if ls.chap.MutualUser != "" {
		return resp, refuse(loginAuthFailure, "mutual CHAP required")
	}
	ls.authDone = true
	ls.chapStage = 3
	return resp, nil
}

// chapResponse is MD5(id || secret || challenge) (RFC 1994 4.1).
func chapResponse(id byte, secret string, chal []byte) [16]byte {
	h := md5.New()
	h.Write([]byte{id})
	h.Write([]byte(secret))
	h.Write(chal)
	var out [16]byte
	copy(out[:], h.Sum(nil))
	return out
}

// decodeCHAP decodes a CHAP binary value: 0x-hex or 0b-base64 (RFC 7143 6.1).
func decodeCHAP(v string) ([]byte, error) {
	switch {
	case strings.HasPrefix(v, "0x") || strings.HasPrefix(v, "0X"):
		s := v[2:]
		if len(s)%2 == 1 {
			s = "0" + s
		}
		return hex.DecodeString(s)
	case strings.HasPrefix(v, "0b") || strings.HasPrefix(v, "0B"):
		return base64.StdEncoding.DecodeString(v[2:])
	}
	return nil, errors.New("iscsi: bad binary value")
}

// enterSession creates or joins the session as the login completes.
func (c *conn) enterSession(ctx context.Context, ls *loginState) *loginError {
	s := c.srv
	var ss *session
	if ls.tsih == 0 {
		var err error
		ss, _, err = s.newSession(ctx, ls)
		if err != nil {
			if errors.Is(err, target.ErrNotFound) {
				return &loginError{status: loginNotFound, err: err}
			}
			return &loginError{status: loginTargetError, err: err}
		}
	} else {
		ss = s.lookupSession(ls.tsih)
		if ss == nil || ss.initiator != ls.initiatorName || ss.isid != ls.isid {
			return refuse(loginNoSession, "session gone")
		}
	}
	ok, full := ss.addConn(c)
	if full {
		return refuse(loginTooManyConns, "too many connections")
	}
	if !ok {
		return refuse(loginNoSession, "session ended")
	}
	c.sess = ss
	ls.tsih = ss.tsih
	return nil
}

// loginRespond sends a Login Response (RFC 7143 11.13). It reports whether
// the write succeeded.
func (c *conn) loginRespond(req *bhs, ls *loginState, text []byte, lerr *loginError, transit bool, csg int) bool {
	var h bhs
	h[0] = opLoginResp
	nsg := int(req[1]) & 3
	if transit {
		h[1] = 0x80 | byte(csg)<<2 | byte(nsg)
	} else {
		h[1] = byte(csg) << 2
	}
	h[2], h[3] = 0, 0 // Version-max, Version-active
	copy(h[8:14], ls.isid[:])
	h[14], h[15] = byte(ls.tsih>>8), byte(ls.tsih)
	h.setU32(16, req.itt())
	h.setU32(24, c.statSN)
	c.statSN++
	exp := ls.cmdSN
	if c.sess != nil {
		exp, _ = c.sess.window()
	}
	h.setU32(28, exp)
	h.setU32(32, exp+cmdWindow-1)
	if lerr != nil {
		h[1] = 0
		h[36], h[37] = byte(lerr.status>>8), byte(lerr.status)
		text = nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf = appendPDU(c.wbuf[:0], &h, text, false, false)
	_, err := c.nc.Write(c.wbuf)
	return err == nil
}

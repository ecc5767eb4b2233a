package scsi

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
)

// Persistent reservation types (SPC-4 6.15.2 table 169).
const (
	prWriteExclusive    = 1
	prExclusiveAccess   = 3
	prWriteExclusiveRO  = 5
	prExclusiveAccessRO = 6
	prWriteExclusiveAR  = 7
	prExclusiveAccessAR = 8
	ascInvalidPRRelease = 0x2604
	prStateVersion      = 1
)

// prState is the persistent reservation state of one LU (SPC-4 5.12). It
// is saved through PRStore as JSON after every change.
type prState struct {
	Version int     `json:"v"`
	Gen     uint32  `json:"gen"`
	Regs    []prReg `json:"regs"`
	Holder  *Nexus  `json:"holder,omitempty"` // nil: no reservation
	Type    byte    `json:"type,omitempty"`
}

type prReg struct {
	Nexus Nexus  `json:"nexus"`
	Key   uint64 `json:"key"`
}

func (s *prState) init() { s.Version = prStateVersion }

func (s *prState) decode(b []byte) error {
	var n prState
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("%w: %v", ErrBadPRState, err)
	}
	if n.Version != prStateVersion {
		return fmt.Errorf("%w: version %d", ErrBadPRState, n.Version)
	}
	*s = n
	return nil
}

func (s *prState) key(n Nexus) (uint64, bool) {
	for _, r := range s.Regs {
		if r.Nexus == n {
			return r.Key, true
		}
	}
	return 0, false
}

func allRegistrants(typ byte) bool { return typ == prWriteExclusiveAR || typ == prExclusiveAccessAR }

func registrantsOnly(typ byte) bool {
	return typ == prWriteExclusiveRO || typ == prExclusiveAccessRO || allRegistrants(typ)
}

func exclusiveAccess(typ byte) bool {
	return typ == prExclusiveAccess || typ == prExclusiveAccessRO || typ == prExclusiveAccessAR
}

// holds reports whether n is a reservation holder.
func (s *prState) holds(n Nexus) bool {
	if s.Holder == nil {
		return false
	}
	if allRegistrants(s.Type) {
		_, ok := s.key(n)
		return ok
	}
	return *s.Holder == n
}

// conflict decides whether t's command is refused by a reservation held by
// another nexus (SPC-4 5.12.1 table 58, SPC-2 5.5.1).
func (l *LU) conflict(t *Task, op byte) bool {
	c := cmdTable[op].class
	if c == classAlways || c == classPR {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if r := l.mu.reserved; r != nil && *r != t.Nexus {
		return true
	}
	s := &l.mu.pr
	if s.Holder == nil || s.holds(t.Nexus) {
		return false
	}
	if registrantsOnly(s.Type) {
		if _, ok := s.key(t.Nexus); ok {
			return false
		}
	}
	if c == classWrite {
		return true
	}
	return exclusiveAccess(s.Type)
}

// reserve6 implements RESERVE (6) (SPC-2 7.21).
func (l *LU) reserve6(t *Task) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.mu.pr.Regs) > 0 || l.mu.pr.Holder != nil {
		t.Status = StatusReservationConflict
		return
	}
	if r := l.mu.reserved; r != nil && *r != t.Nexus {
		t.Status = StatusReservationConflict
		return
	}
	n := t.Nexus
	l.mu.reserved = &n
}

// release6 implements RELEASE (6) (SPC-2 7.17): releasing a reservation one
// does not hold is not an error.
func (l *LU) release6(t *Task) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.mu.pr.Regs) > 0 || l.mu.pr.Holder != nil {
		t.Status = StatusReservationConflict
		return
	}
	if r := l.mu.reserved; r != nil && *r == t.Nexus {
		l.mu.reserved = nil
	}
}

// prIn implements PERSISTENT RESERVE IN (SPC-4 6.14).
func (l *LU) prIn(t *Task) {
	alloc := alloc16(t, 7)
	l.mu.Lock()
	if l.mu.reserved != nil && *l.mu.reserved != t.Nexus {
		l.mu.Unlock()
		t.Status = StatusReservationConflict
		return
	}
	s := &l.mu.pr
	var out []byte
	switch t.CDB[1] & 0x1f {
	case 0: // READ KEYS
		out = make([]byte, 8, 8+8*len(s.Regs))
		binary.BigEndian.PutUint32(out, s.Gen)
		for _, r := range s.Regs {
			out = binary.BigEndian.AppendUint64(out, r.Key)
		}
		binary.BigEndian.PutUint32(out[4:], uint32(len(out)-8))
	case 1: // READ RESERVATION
		out = make([]byte, 8)
		binary.BigEndian.PutUint32(out, s.Gen)
		if s.Holder != nil {
			d := make([]byte, 16)
			if !allRegistrants(s.Type) {
				k, _ := s.key(*s.Holder)
				binary.BigEndian.PutUint64(d, k)
			}
			d[13] = s.Type
			out = append(out, d...)
			binary.BigEndian.PutUint32(out[4:], 16)
		}
	case 2: // REPORT CAPABILITIES
		out = make([]byte, 8)
		binary.BigEndian.PutUint16(out, 8)
		out[2] = 0x01        // PTPL_C
		out[3] = 0x80 | 0x01 // TMV, PTPL_A
		out[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02
		out[5] = 0x01
	case 3: // READ FULL STATUS
		out = make([]byte, 8)
		binary.BigEndian.PutUint32(out, s.Gen)
		for _, r := range s.Regs {
			tid := transportID(r.Nexus.Initiator)
			d := make([]byte, 24, 24+len(tid))
			binary.BigEndian.PutUint64(d, r.Key)
			if s.holds(r.Nexus) {
				d[12] = 0x01 // R_HOLDER
				d[13] = s.Type
			}
			binary.BigEndian.PutUint16(d[18:], r.Nexus.Port)
			binary.BigEndian.PutUint32(d[20:], uint32(len(tid)))
			out = append(out, append(d, tid...)...)
		}
		binary.BigEndian.PutUint32(out[4:], uint32(len(out)-8))
	default:
		l.mu.Unlock()
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	l.mu.Unlock()
	t.setIn(out[:min(alloc, len(out))])
}

// transportID is an iSCSI TransportID, initiator port format (SPC-4 7.6.4.6).
func transportID(port string) []byte {
	n := len(port) + 1
	n = (n + 3) &^ 3
	if n < 16 {
		n = 16
	}
	b := make([]byte, 4+n)
	b[0] = 0x40 | 0x05
	binary.BigEndian.PutUint16(b[2:], uint16(n))
	copy(b[4:], port)
	return b
}

// prOut implements PERSISTENT RESERVE OUT (SPC-4 6.15, 5.12).
//
//	parameter list (24 bytes)
//	+--------+--------+--------+--------------------------------+
//	| 0..7   | 8..15  | 16..19 | 20: SPEC_I_PT ALL_TG_PT APTPL  |
//	| key    | SA key | obs.   |                                |
//	+--------+--------+--------+--------------------------------+
func (l *LU) prOut(ctx context.Context, t *Task) {
	cdb := t.CDB
	sa := cdb[1] & 0x1f
	scope, typ := cdb[2]>>4, cdb[2]&0x0f
	plen := int(binary.BigEndian.Uint32(cdb[5:]))
	if sa > 6 {
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	if plen != 24 {
		t.Want = plen
		l.fail(t, senseIllegal, ascParamListLength)
		return
	}
	p, ok := l.dataOut(t, 24)
	if !ok {
		return
	}
	key := binary.BigEndian.Uint64(p[0:])
	sakey := binary.BigEndian.Uint64(p[8:])
	if p[20]&0x0c != 0 { // SPEC_I_PT, ALL_TG_PT unsupported
		l.fail(t, senseIllegal, ascInvalidFieldParam)
		return
	}
	validType := func() bool {
		switch typ {
		case prWriteExclusive, prExclusiveAccess, prWriteExclusiveRO, prExclusiveAccessRO, prWriteExclusiveAR, prExclusiveAccessAR:
			return scope == 0
		}
		return false
	}

	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.reserved != nil && *l.mu.reserved != t.Nexus {
		t.Status = StatusReservationConflict
		return
	}
	s := &l.mu.pr
	old, _ := json.Marshal(s)
	cur, registered := s.key(t.Nexus)
	switch sa {
	case 0, 6: // REGISTER, REGISTER AND IGNORE EXISTING KEY
		if sa == 0 {
			if !registered && key != 0 || registered && key != cur {
				t.Status = StatusReservationConflict
				return
			}
		}
		switch {
		case !registered && sakey == 0:
		case !registered:
			s.Regs = append(s.Regs, prReg{Nexus: t.Nexus, Key: sakey})
		case sakey == 0:
			s.unregister(t.Nexus)
		default:
			for i := range s.Regs {
				if s.Regs[i].Nexus == t.Nexus {
					s.Regs[i].Key = sakey
				}
			}
		}
		s.Gen++
	case 1: // RESERVE
		if !registered || key != cur {
			t.Status = StatusReservationConflict
			return
		}
		if !validType() {
			l.failLocked(t, senseIllegal, ascInvalidFieldCDB)
			return
		}
		if s.Holder != nil {
			if !s.holds(t.Nexus) || s.Type != typ {
				t.Status = StatusReservationConflict
			}
			return
		}
		n := t.Nexus
		s.Holder, s.Type = &n, typ
	case 2: // RELEASE
		if !registered || key != cur {
			t.Status = StatusReservationConflict
			return
		}
		if s.Holder == nil || !s.holds(t.Nexus) {
			return
		}
		if s.Type != typ || scope != 0 {
			l.failLocked(t, senseIllegal, ascInvalidPRRelease)
			return
		}
		if registrantsOnly(s.Type) { // SPC-4 5.12.11.2.2
			for _, r := range s.Regs {
				if r.Nexus != t.Nexus {
					l.addUALocked(r.Nexus, uaReservationsReleased)
				}
			}
		}
		s.Holder, s.Type = nil, 0
	case 3: // CLEAR
		if !registered || key != cur {
			t.Status = StatusReservationConflict
			return
		}
		for _, r := range s.Regs {
			if r.Nexus != t.Nexus {
				l.addUALocked(r.Nexus, uaReservationsPreempted) // SPC-4 5.12.11.6
			}
		}
		s.Regs, s.Holder, s.Type = nil, nil, 0
		s.Gen++
	case 4, 5: // PREEMPT, PREEMPT AND ABORT
		if !registered || key != cur {
			t.Status = StatusReservationConflict
			return
		}
		if !validType() {
			l.failLocked(t, senseIllegal, ascInvalidFieldCDB)
			return
		}
		var removed []Nexus
		switch {
		case s.Holder != nil && allRegistrants(s.Type) && sakey == 0:
			removed = s.removeWhere(func(r prReg) bool { return r.Nexus != t.Nexus })
			n := t.Nexus
			s.Holder, s.Type = &n, typ
		case s.Holder != nil && !allRegistrants(s.Type) && s.holderKey() == sakey:
			removed = s.removeKey(sakey, t.Nexus)
			n := t.Nexus
			s.Holder, s.Type = &n, typ
		default:
			if sakey == 0 {
				l.failLocked(t, senseIllegal, ascInvalidFieldParam)
				return
			}
			if removed = s.removeKey(sakey, t.Nexus); len(removed) == 0 {
				t.Status = StatusReservationConflict
				return
			}
		}
		// SPC-4 5.12.11.4: the preempted nexuses learn it.
		for _, n := range removed {
			l.addUALocked(n, uaRegistrationsPreempted)
		}
		s.Gen++
	}
	if l.store == nil {
		return
	}
	b, _ := json.Marshal(s)
	if string(b) == string(old) {
		return
	}
	if err := l.store.SavePR(ctx, l.info.Name, b); err != nil {
		_ = s.decode(old)
		l.failLocked(t, senseIllegal, ascNoRegResources)
	}
}

func (s *prState) holderKey() uint64 {
	k, _ := s.key(*s.Holder)
	return k
}

// unregister removes n's registration; a reservation it held is released
// unless other registrants still hold an all-registrants reservation.
func (s *prState) unregister(n Nexus) {
	s.removeWhere(func(r prReg) bool { return r.Nexus == n })
	if s.Holder == nil {
		return
	}
	if allRegistrants(s.Type) {
		if len(s.Regs) == 0 {
			s.Holder, s.Type = nil, 0
		}
		return
	}
	if *s.Holder == n {
		s.Holder, s.Type = nil, 0
	}
}

// removeKey removes every registration with key other than self's and
// returns the nexuses removed. A removed holder loses its reservation.
func (s *prState) removeKey(key uint64, self Nexus) []Nexus {
	removed := s.removeWhere(func(r prReg) bool { return r.Key == key && r.Nexus != self })
	if len(removed) > 0 && s.Holder != nil && !allRegistrants(s.Type) {
		if _, ok := s.key(*s.Holder); !ok {
			s.Holder, s.Type = nil, 0
		}
	}
	return removed
}

func (s *prState) removeWhere(f func(prReg) bool) []Nexus {
	var keep []prReg
	var removed []Nexus
	for _, r := range s.Regs {
		if f(r) {
			removed = append(removed, r.Nexus)
			continue
		}
		keep = append(keep, r)
	}
	s.Regs = keep
	return removed
}

// Unit attentions of persistent reservations (SPC-4 5.12.11).
const (
	uaReservationsPreempted  = 0x2a03
	uaReservationsReleased   = 0x2a04
	uaRegistrationsPreempted = 0x2a05
)

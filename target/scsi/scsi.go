// Package scsi is an SBC-3/SPC-4 device server: it decodes CDBs, executes
// them against a target.BlockDevice and reports status and sense data. It
// knows nothing of iSCSI; a transport hands it a Task and sends the result.
//
// Model:
//
//	transport (iSCSI)            scsi.LU (one per volume, shared)
//	  Task{LUN, CDB, Nexus,  ->    Execute(ctx, dev, task)
//	       DataOut, DataIn}          decode CDB, check reservations,
//	  <- Status, Sense, Want         lock LBA stripes, call dev
//
// Rules:
//   - One LU per volume, shared by every session that opened it: it owns the
//     state SPC-4 scopes to the logical unit (persistent reservations, the
//     SPC-2 reservation, mode pages, the stripe locks that make COMPARE AND
//     WRITE atomic against every other writer). Execute is safe for
//     concurrent use.
//   - The transport collects all Data-Out before Execute (DataOut holds what
//     the initiator sent, at most its expected transfer length) and sizes
//     DataIn to the initiator's expected transfer length.
//   - Task.Want reports the bytes the command itself would move (SPDTL); the
//     transport derives residual overflow/underflow from it (RFC 7143 11.4.5).
//   - Sense data is fixed format (0x70) unless the control mode page's
//     D_SENSE bit selects descriptor format (0x72) (SPC-4 4.5).
//   - Device errors map to sense in one table: senseFor.
//   - Only LUN 0 exists; other LUNs answer INQUIRY with peripheral qualifier
//     3 and everything else with LOGICAL UNIT NOT SUPPORTED.
package scsi

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"

	"stor.dev/stor/target"
)

// Status is a SCSI status byte (SAM-5 5.3).
type Status byte

const (
	StatusGood                Status = 0x00
	StatusCheckCondition      Status = 0x02
	StatusConditionMet        Status = 0x04
	StatusBusy                Status = 0x08
	StatusReservationConflict Status = 0x18
	StatusTaskSetFull         Status = 0x28
	StatusTaskAborted         Status = 0x40
)

// Errors of this package.
var (
	ErrBadPRState = errors.New("scsi: malformed persistent reservation state")
)

// Task is one SCSI command as the transport hands it over. The transport
// may reuse a Task after Execute returns.
type Task struct {
	LUN     uint64
	CDB     []byte
	Nexus   Nexus
	DataOut []byte // data the initiator sent (<= its expected length)
	DataIn  []byte // room for data to the initiator (its expected length)

	// Results.
	Status   Status
	Want     int // bytes the command moves per its CDB (SPDTL)
	InLen    int // bytes of DataIn filled
	Sense    [sizeSense]byte
	SenseLen int
}

const sizeSense = 64

// Nexus identifies an I_T nexus: the initiator port (for iSCSI
// "iqn...,i,0x<ISID>") and the relative target port.
type Nexus struct {
	Initiator string // initiator port name, e.g. iqn.x,i,0x23d000000001
	Port      uint16 // relative target port identifier
}

// reset clears the results of t.
func (t *Task) reset() {
	t.Status = StatusGood
	t.Want = 0
	t.InLen = 0
	t.SenseLen = 0
}

// setIn copies p into DataIn (truncated) and records Want = len(p).
func (t *Task) setIn(p []byte) {
	t.Want = len(p)
	t.InLen = copy(t.DataIn, p)
}

// PRStore persists a volume's persistent reservation state across restarts
// (SPC-4 APTPL). Implementations must be safe for concurrent use; SavePR is
// durable on return.
type PRStore interface {
	// LoadPR returns the last saved state of volume, or nil if none.
	LoadPR(ctx context.Context, volume string) ([]byte, error)
	// SavePR replaces the saved state of volume.
	SavePR(ctx context.Context, volume string, state []byte) error
}

// MemoryPRStore is an in-memory PRStore for tests.
type MemoryPRStore struct {
	mu struct {
		sync.Mutex
		m map[string][]byte
	}
}

// NewMemoryPRStore returns an empty store.
func NewMemoryPRStore() *MemoryPRStore {
	s := &MemoryPRStore{}
	s.mu.m = map[string][]byte{}
	return s
}

func (s *MemoryPRStore) LoadPR(ctx context.Context, volume string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.mu.m[volume]...), nil
}

func (s *MemoryPRStore) SavePR(ctx context.Context, volume string, state []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.m[volume] = append([]byte(nil), state...)
	return nil
}

// LU is the shared state of one logical unit (one volume). See the package
// doc.
type LU struct {
	info   target.Export
	store  PRStore
	stripe stripes

	mu struct {
		sync.Mutex
		dsense   bool // control mode page D_SENSE
		pr       prState
		reserved *Nexus             // SPC-2 RESERVE(6) holder
		nexuses  map[Nexus]int      // attached I_T nexuses (count of sessions)
		ua       map[Nexus][]uint16 // pending unit attentions, oldest first
	}
}

// NewLU returns the logical unit of the export info. PR state is loaded from
// store (nil: not persisted).
func NewLU(ctx context.Context, info target.Export, store PRStore) (*LU, error) {
	l := &LU{info: info, store: store}
	l.mu.pr.init()
	l.mu.nexuses = map[Nexus]int{}
	l.mu.ua = map[Nexus][]uint16{}
	if store != nil {
		b, err := store.LoadPR(ctx, info.Name)
		if err != nil {
			return nil, err
		}
		if len(b) > 0 {
			if err := l.mu.pr.decode(b); err != nil {
				return nil, err
			}
		}
	}
	return l, nil
}

// Info is the export this LU serves.
func (l *LU) Info() target.Export { return l.info }

// Unit attention conditions a transport may raise with Reset.
const (
	UAReset       uint16 = 0x2900 // POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
	UALUNReset    uint16 = 0x2903 // BUS DEVICE RESET FUNCTION OCCURRED
	UATargetReset uint16 = 0x2902 // SCSI BUS RESET OCCURRED
)

// Attach records that I_T nexus n uses the LU (a session logged in).
func (l *LU) Attach(n Nexus) {
	l.mu.Lock()
	l.mu.nexuses[n]++
	l.mu.Unlock()
}

// Reset performs a reset's effect on LU state (SAM-5 6.4): the SPC-2
// reservation is released, persistent reservations survive, and every
// attached nexus gets the unit attention ua.
func (l *LU) Reset(ua uint16) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mu.reserved = nil
	for n := range l.mu.nexuses {
		l.addUALocked(n, ua)
	}
}

// addUALocked queues a unit attention for n. REQUIRES: l.mu.
func (l *LU) addUALocked(n Nexus, ua uint16) {
	q := l.mu.ua[n]
	for _, x := range q {
		if x == ua {
			return
		}
	}
	if len(q) < 8 {
		l.mu.ua[n] = append(q, ua)
	}
}

// takeUA pops the oldest unit attention pending for n.
func (l *LU) takeUA(n Nexus) (uint16, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	q := l.mu.ua[n]
	if len(q) == 0 {
		return 0, false
	}
	if len(q) == 1 {
		delete(l.mu.ua, n)
	} else {
		l.mu.ua[n] = q[1:]
	}
	return q[0], true
}

// NexusLost detaches n: the SPC-2 reservation it held is released and its
// unit attentions forgotten once no session uses it.
func (l *LU) NexusLost(n Nexus) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.mu.reserved != nil && *l.mu.reserved == n {
		l.mu.reserved = nil
	}
	if l.mu.nexuses[n]--; l.mu.nexuses[n] <= 0 {
		delete(l.mu.nexuses, n)
		delete(l.mu.ua, n)
	}
}

// Execute runs t against dev and fills in t's results.
func (l *LU) Execute(ctx context.Context, dev target.BlockDevice, t *Task) {
	t.reset()
	if len(t.CDB) == 0 {
		l.fail(t, senseIllegal, ascInvalidOpcode)
		return
	}
	op := t.CDB[0]
	if t.LUN != 0 {
		switch op {
		case opInquiry:
			l.inquiryNoLUN(t)
		case opReportLUNs:
			l.reportLUNs(t)
		case opRequestSense:
			l.requestSense(t)
		default:
			l.fail(t, senseIllegal, ascLUNotSupported)
		}
		return
	}
	if op != opInquiry && op != opReportLUNs {
		if ua, ok := l.takeUA(t.Nexus); ok {
			if op == opRequestSense {
				var b [sizeSense]byte
				n := buildSense(b[:], t.CDB[1]&0x01 != 0, senseUnitAttention, ua, false, 0)
				t.setIn(b[:min(int(t.CDB[4]), n)])
				return
			}
			l.fail(t, senseUnitAttention, ua)
			return
		}
	}
	c := cmdTable[op]
	if c.run == nil {
		l.fail(t, senseIllegal, ascInvalidOpcode)
		return
	}
	if len(t.CDB) < c.cdbLen {
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	if l.conflict(t, op) {
		t.Status = StatusReservationConflict
		return
	}
	c.run(l, ctx, dev, t)
}

// fail sets CHECK CONDITION with the sense key and ASC/ASCQ.
func (l *LU) fail(t *Task, key byte, asc uint16) {
	l.failInfo(t, key, asc, false, 0)
}

// failInfo is fail with the INFORMATION field set when valid.
func (l *LU) failInfo(t *Task, key byte, asc uint16, valid bool, info uint64) {
	l.mu.Lock()
	desc := l.mu.dsense
	l.mu.Unlock()
	t.Status = StatusCheckCondition
	t.SenseLen = buildSense(t.Sense[:], desc, key, asc, valid, info)
}

// failField fails t with ILLEGAL REQUEST, INVALID FIELD IN CDB and the
// sense-key-specific field pointer at CDB byte i (SPC-4 4.5.2.4.2), so an
// initiator can tell a bad field from an unsupported service action.
func (l *LU) failField(t *Task, i int) {
	l.fail(t, senseIllegal, ascInvalidFieldCDB)
	sks := [3]byte{0x80 | 0x40, byte(i >> 8), byte(i)} // SKSV, C/D=CDB
	if t.Sense[0] == 0x72 {
		d := t.Sense[t.SenseLen:]
		d[0], d[1], d[2], d[3] = 0x02, 0x06, 0, 0
		copy(d[4:7], sks[:])
		d[7] = 0
		t.SenseLen += 8
		t.Sense[7] += 8
		return
	}
	copy(t.Sense[15:18], sks[:])
}

// failLocked is fail for callers holding l.mu. REQUIRES: l.mu.
func (l *LU) failLocked(t *Task, key byte, asc uint16) {
	t.Status = StatusCheckCondition
	t.SenseLen = buildSense(t.Sense[:], l.mu.dsense, key, asc, false, 0)
}

// buildSense writes sense data into b and returns its length (SPC-4 4.5).
//
// Fixed format (0x70):
//
//	+------+---------+-----+----------+--------+------+------+-------+------+
//	| 0    | 1       | 2   | 3..6     | 7      | 8..11| 12   | 13    | 14.. |
//	| 0x70 | obsolete| key | info     | add len| cmd  | ASC  | ASCQ  | ...  |
//	| VALID|         |     |          | = 10   | spec |      |       |      |
//	+------+---------+-----+----------+--------+------+------+-------+------+
//
// Descriptor format (0x72): 0x72, key, ASC, ASCQ, 0, 0, 0, add len, then an
// information descriptor (type 0, 12 bytes) when info is valid.
func buildSense(b []byte, desc bool, key byte, asc uint16, valid bool, info uint64) int {
	if desc {
		clear(b[:20])
		b[0] = 0x72
		b[1] = key & 0x0f
		b[2] = byte(asc >> 8)
		b[3] = byte(asc)
		if !valid {
			return 8
		}
		b[7] = 12
		b[8] = 0x00 // information descriptor
		b[9] = 0x0a
		b[10] = 0x80 // VALID
		binary.BigEndian.PutUint64(b[12:], info)
		return 20
	}
	clear(b[:18])
	b[0] = 0x70
	if valid {
		b[0] |= 0x80
		binary.BigEndian.PutUint32(b[3:], uint32(info))
	}
	b[2] = key & 0x0f
	b[7] = 10
	b[12] = byte(asc >> 8)
	b[13] = byte(asc)
	return 18
}

// Sense keys (SPC-4 table 27).
const (
	senseNoSense       = 0x00
	senseNotReady      = 0x02
	senseMedium        = 0x03
	senseHardware      = 0x04
	senseIllegal       = 0x05
	senseUnitAttention = 0x06
	senseDataProtect   = 0x07
	senseAborted       = 0x0b
	senseMiscompare    = 0x0e
)

// Additional sense codes as ASC<<8|ASCQ (SPC-4 table 28).
const (
	ascNone                 = 0x0000
	ascWriteError           = 0x0c00
	ascInvalidFieldCmdIU    = 0x0e03
	ascReadError            = 0x1100
	ascParamListLength      = 0x1a00
	ascMiscompare           = 0x1d00
	ascInvalidOpcode        = 0x2000
	ascLBAOutOfRange        = 0x2100
	ascInvalidFieldCDB      = 0x2400
	ascLUNotSupported       = 0x2500
	ascInvalidFieldParam    = 0x2600
	ascWriteProtected       = 0x2700
	ascSavingNotSupported   = 0x3900
	ascInternalFailure      = 0x4400
	ascNoRegResources       = 0x5504
	ascMediumRemovalPrevent = 0x5302
	ascSpaceAllocFailed     = 0x2707
)

// devFail maps a BlockDevice error to sense data: the one table.
func (l *LU) devFail(t *Task, err error, write bool) {
	switch {
	case errors.Is(err, target.ErrOutOfRange):
		l.fail(t, senseIllegal, ascLBAOutOfRange)
	case errors.Is(err, target.ErrInvalid):
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
	case errors.Is(err, target.ErrReadOnly):
		l.fail(t, senseDataProtect, ascWriteProtected)
	case errors.Is(err, target.ErrNoSpace):
		l.fail(t, senseDataProtect, ascSpaceAllocFailed)
	case errors.Is(err, target.ErrNotSupported):
		l.fail(t, senseIllegal, ascInvalidOpcode)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		t.Status = StatusTaskAborted
	case errors.Is(err, target.ErrClosed):
		l.fail(t, senseNotReady, 0x0400) // LOGICAL UNIT NOT READY
	default:
		if write {
			l.fail(t, senseMedium, ascWriteError)
		} else {
			l.fail(t, senseMedium, ascReadError)
		}
	}
}

package scsi

import (
	"context"
	"encoding/binary"
	"hash/fnv"

	"stor.dev/stor/target"
)

// Operation codes (SPC-4 annex D, SBC-3 table 12).
const (
	opTestUnitReady   = 0x00
	opRequestSense    = 0x03
	opRead6           = 0x08
	opWrite6          = 0x0a
	opInquiry         = 0x12
	opModeSelect6     = 0x15
	opReserve6        = 0x16
	opRelease6        = 0x17
	opModeSense6      = 0x1a
	opStartStop       = 0x1b
	opPreventAllow    = 0x1e
	opReadCapacity10  = 0x25
	opRead10          = 0x28
	opWrite10         = 0x2a
	opWriteVerify10   = 0x2e
	opVerify10        = 0x2f
	opPrefetch10      = 0x34
	opSyncCache10     = 0x35
	opWriteSame10     = 0x41
	opUnmap           = 0x42
	opModeSelect10    = 0x55
	opModeSense10     = 0x5a
	opPRIn            = 0x5e
	opPROut           = 0x5f
	opRead16          = 0x88
	opCompareAndWrite = 0x89
	opOrWrite16       = 0x8b
	opWrite16         = 0x8a
	opWriteVerify16   = 0x8e
	opVerify16        = 0x8f
	opPrefetch16      = 0x90
	opSyncCache16     = 0x91
	opWriteSame16     = 0x93
	opServiceIn16     = 0x9e
	opReportLUNs      = 0xa0
	opMaintenanceIn   = 0xa3
	opRead12          = 0xa8
	opWrite12         = 0xaa
	opWriteVerify12   = 0xae
	opVerify12        = 0xaf
	opReadDefect10    = 0x37
	opReadDefect12    = 0xb7

	saReadCapacity16 = 0x10
	saGetLBAStatus   = 0x12
	saReportTPG      = 0x0a
	saReportOpcodes  = 0x0c
	saReportTMFs     = 0x0d
)

// class says how a command fares under a reservation held by another nexus.
type class uint8

const (
	classAlways class = iota // never conflicts (INQUIRY, REPORT LUNS, ...)
	classRead                // conflicts under exclusive-access reservations
	classWrite               // conflicts under every reservation type
	classPR                  // PERSISTENT RESERVE IN/OUT: decided inside
)

type cmd struct {
	cdbLen int
	class  class
	sas    []byte // service actions, when the opcode has them
	run    func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task)
}

var cmdTable [256]cmd

func init() {
	add := func(op byte, n int, c class, run func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task), sas ...byte) {
		cmdTable[op] = cmd{cdbLen: n, class: c, run: run, sas: sas}
	}
	add(opTestUnitReady, 6, classAlways, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) {})
	add(opRequestSense, 6, classAlways, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.requestSense(t) })
	add(opInquiry, 6, classAlways, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.inquiry(dev, t) })
	add(opReportLUNs, 12, classAlways, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.reportLUNs(t) })
	add(opRead6, 6, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.read(ctx, dev, t, 6) })
	add(opRead10, 10, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.read(ctx, dev, t, 10) })
	add(opRead12, 12, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.read(ctx, dev, t, 12) })
	add(opRead16, 16, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.read(ctx, dev, t, 16) })
	add(opWrite6, 6, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.write(ctx, dev, t, 6, false) })
	add(opWrite10, 10, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.write(ctx, dev, t, 10, false) })
	add(opWrite12, 12, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.write(ctx, dev, t, 12, false) })
	add(opWrite16, 16, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.write(ctx, dev, t, 16, false) })
	add(opWriteVerify10, 10, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.write(ctx, dev, t, 10, true) })
	add(opWriteVerify12, 12, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.write(ctx, dev, t, 12, true) })
	add(opWriteVerify16, 16, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.write(ctx, dev, t, 16, true) })
	add(opVerify10, 10, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.verify(ctx, dev, t, 10) })
	add(opVerify12, 12, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.verify(ctx, dev, t, 12) })
	add(opVerify16, 16, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.verify(ctx, dev, t, 16) })
	add(opPrefetch10, 10, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.prefetch(ctx, dev, t, 10) })
	add(opPrefetch16, 16, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.prefetch(ctx, dev, t, 16) })
	add(opSyncCache10, 10, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.syncCache(ctx, dev, t, 10) })
	add(opSyncCache16, 16, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.syncCache(ctx, dev, t, 16) })
	add(opWriteSame10, 10, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.writeSame(ctx, dev, t, 10) })
	add(opWriteSame16, 16, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.writeSame(ctx, dev, t, 16) })
	add(opUnmap, 10, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.unmap(ctx, dev, t) })
	add(opOrWrite16, 16, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.orWrite(ctx, dev, t) })
	add(opCompareAndWrite, 16, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.compareAndWrite(ctx, dev, t) })
	add(opReadCapacity10, 10, classAlways, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.readCapacity10(ctx, dev, t) })
	add(opServiceIn16, 16, classAlways, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) {
		switch t.CDB[1] & 0x1f {
		case saReadCapacity16:
			l.readCapacity16(ctx, dev, t)
		case saGetLBAStatus:
			if l.conflict(t, opRead10) {
				t.Status = StatusReservationConflict
				return
			}
			l.getLBAStatus(ctx, dev, t)
		default:
			l.fail(t, senseIllegal, ascInvalidFieldCDB)
		}
	}, saReadCapacity16, saGetLBAStatus)
	add(opMaintenanceIn, 12, classAlways, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) {
		switch t.CDB[1] & 0x1f {
		case saReportOpcodes:
			l.reportOpcodes(t)
		case saReportTMFs:
			l.reportTMFs(t)
		case saReportTPG:
			l.reportTPG(t)
		default:
			l.fail(t, senseIllegal, ascInvalidFieldCDB)
		}
	}, saReportTPG, saReportOpcodes, saReportTMFs)
	add(opModeSense6, 6, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.modeSense(dev, t, false) })
	add(opModeSense10, 10, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.modeSense(dev, t, true) })
	add(opModeSelect6, 6, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.modeSelect(t, false) })
	add(opModeSelect10, 10, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.modeSelect(t, true) })
	add(opStartStop, 6, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) {})
	add(opPreventAllow, 6, classWrite, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) {
		if t.CDB[4]&0x03 > 1 { // only PREVENT 00b/01b mean anything for a disk
			l.fail(t, senseIllegal, ascInvalidFieldCDB)
		}
	})
	add(opReadDefect10, 10, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.readDefects(t, false) })
	add(opReadDefect12, 12, classRead, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.readDefects(t, true) })
	add(opReserve6, 6, classPR, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.reserve6(t) })
	add(opRelease6, 6, classPR, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.release6(t) })
	add(opPRIn, 10, classPR, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.prIn(t) }, 0, 1, 2, 3)
	add(opPROut, 10, classPR, func(l *LU, ctx context.Context, dev target.BlockDevice, t *Task) { l.prOut(ctx, t) }, 0, 1, 2, 3, 4, 5, 6)
}

// alloc16 is the 16-bit allocation length at CDB offset i.
func alloc16(t *Task, i int) int { return int(binary.BigEndian.Uint16(t.CDB[i:])) }

// inquiry implements INQUIRY (SPC-4 6.6): standard data or a VPD page.
func (l *LU) inquiry(dev target.BlockDevice, t *Task) {
	cdb := t.CDB
	alloc := alloc16(t, 3)
	evpd := cdb[1]&0x01 != 0
	if !evpd {
		if cdb[2] != 0 {
			l.fail(t, senseIllegal, ascInvalidFieldCDB)
			return
		}
		t.setIn(l.standardInquiry(0x00)[:min(alloc, 66)])
		return
	}
	p := l.vpd(dev, cdb[2])
	if p == nil {
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	t.setIn(p[:min(alloc, len(p))])
}

// inquiryNoLUN answers INQUIRY for a LUN that does not exist: peripheral
// qualifier 011b, device type 1Fh (SPC-4 6.6.2).
func (l *LU) inquiryNoLUN(t *Task) {
	if t.CDB[1]&0x01 != 0 {
		l.fail(t, senseIllegal, ascLUNotSupported)
		return
	}
	t.setIn(l.standardInquiry(0x7f)[:min(alloc16(t, 3), 66)])
}

// standardInquiry is the standard INQUIRY data (SPC-4 6.6.2):
//
//	+----+-------+---------+--------+-------+------+--------+---------+--------+----------+
//	| 0  | 1     | 2       | 3      | 4     | 5..7 | 8..15  | 16..31  | 32..35 | 58..73   |
//	| PQ | RMB=0 | version | HISUP, | add   | flags| vendor | product | rev    | version  |
//	| DT |       | 6=SPC-4 | fmt 2  | len   | CMDQ |        |         |        | descript.|
//	+----+-------+---------+--------+-------+------+--------+---------+--------+----------+
func (l *LU) standardInquiry(pqdt byte) []byte {
	b := make([]byte, 66)
	b[0] = pqdt
	b[2] = 0x06
	b[3] = 0x12 // HISUP | response data format 2
	b[4] = byte(len(b) - 5)
	b[5] = 0x10 // TPGS = 01b: implicit ALUA
	b[7] = 0x02 // CMDQUE
	copy(b[8:16], "STOR    ")
	copy(b[16:32], "VOLUME          ")
	copy(b[32:36], "0001")
	for i, v := range []uint16{0x00c0 /* SAM-5 */, 0x0960 /* iSCSI */, 0x0460 /* SPC-4 */, 0x04c0 /* SBC-3 */} {
		binary.BigEndian.PutUint16(b[58+2*i:], v)
	}
	return b
}

var vpdPages = []byte{0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2}

// vpd returns the VPD page code, or nil (SPC-4 7.8, SBC-3 6.5).
func (l *LU) vpd(dev target.BlockDevice, code byte) []byte {
	page := func(body []byte) []byte {
		b := make([]byte, 4+len(body))
		b[1] = code
		binary.BigEndian.PutUint16(b[2:], uint16(len(body)))
		copy(b[4:], body)
		return b
	}
	switch code {
	case 0x00: // supported VPD pages
		return page(vpdPages)
	case 0x80: // unit serial number = volume id
		return page([]byte(l.serial()))
	case 0x83: // device identification
		return page(l.designators())
	case 0xb0: // block limits
		g := dev.Geometry()
		body := make([]byte, 0x3c)
		body[0] = 0x00 // WSNZ = 0: WRITE SAME 0 blocks = to the end
		body[1] = maxCAWBlocks
		binary.BigEndian.PutUint16(body[2:], uint16(4096/g.BlockSize)) // optimal granularity
		binary.BigEndian.PutUint32(body[4:], uint32(maxXferBytes/g.BlockSize))
		binary.BigEndian.PutUint32(body[8:], uint32(1<<20/g.BlockSize))
		binary.BigEndian.PutUint32(body[16:], maxUnmapBlocks)
		binary.BigEndian.PutUint32(body[20:], maxUnmapDescs)
		binary.BigEndian.PutUint32(body[24:], uint32(4096/g.BlockSize)) // optimal unmap granularity
		binary.BigEndian.PutUint32(body[28:], 0x80000000)               // UGAVALID, alignment 0
		binary.BigEndian.PutUint64(body[32:], 0)                        // max WRITE SAME: no limit
		return page(body)
	case 0xb1: // block device characteristics
		body := make([]byte, 0x3c)
		binary.BigEndian.PutUint16(body[0:], 1) // non-rotating medium
		return page(body)
	case 0xb2: // logical block provisioning
		body := make([]byte, 4)
		body[1] = 0x80 | 0x40 | 0x20 // LBPU, LBPWS, LBPWS10
		if lbprz(dev.Geometry()) {
			body[1] |= 0x04 // LBPRZ
		}
		body[2] = 0x02 // thin provisioned
		return page(body)
	}
	return nil
}

func (l *LU) serial() string {
	if l.info.ID != "" {
		return l.info.ID
	}
	return l.info.Name
}

// designators builds the device identification page's designators
// (SPC-4 7.8.6): NAA IEEE Registered Extended (6h) from a hash of the
// volume id, T10 vendor id "STOR" + id, and the relative target port.
func (l *LU) designators() []byte {
	h := fnv.New128a()
	h.Write([]byte(l.serial()))
	sum := h.Sum(nil)
	var out []byte
	naa := make([]byte, 4+16)
	naa[0] = 0x01 // binary, protocol 0
	naa[1] = 0x03 // association LU, type NAA
	naa[3] = 16
	copy(naa[4:], sum)
	naa[4] = 0x60 | naa[4]&0x0f
	out = append(out, naa...)

	id := "STOR    " + l.serial()
	t10 := make([]byte, 4+len(id))
	t10[0] = 0x02 // ASCII
	t10[1] = 0x01 // association LU, type T10 vendor id
	t10[3] = byte(len(id))
	copy(t10[4:], id)
	out = append(out, t10...)

	rtp := []byte{0x51, 0x94, 0, 4, 0, 0, 0, 1} // iSCSI, PIV, target port, relative target port 1
	tpg := []byte{0x51, 0x95, 0, 4, 0, 0, 0, 1} // target port group 1
	out = append(out, rtp...)
	out = append(out, tpg...)
	return out
}

// reportLUNs implements REPORT LUNS (SPC-4 6.33): LUN 0 only.
func (l *LU) reportLUNs(t *Task) {
	alloc := int(binary.BigEndian.Uint32(t.CDB[6:]))
	if alloc < 16 {
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	if t.CDB[2] > 2 && t.CDB[2] != 0x10 && t.CDB[2] != 0x11 && t.CDB[2] != 0x12 {
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	b := make([]byte, 16)
	binary.BigEndian.PutUint32(b, 8)
	t.setIn(b[:min(alloc, 16)])
}

// requestSense implements REQUEST SENSE (SPC-4 6.39): with autosense there
// is never a pending condition, so NO SENSE.
func (l *LU) requestSense(t *Task) {
	var b [sizeSense]byte
	n := buildSense(b[:], t.CDB[1]&0x01 != 0, senseNoSense, ascNone, false, 0)
	t.setIn(b[:min(int(t.CDB[4]), n)])
}

// opDesc lists every supported (opcode, service action) for REPORT
// SUPPORTED OPERATION CODES.
type opDesc struct {
	op, sa byte
	hasSA  bool
	cdbLen int
}

func supportedOps() []opDesc {
	var out []opDesc
	for op := 0; op < 256; op++ {
		c := cmdTable[op]
		if c.run == nil {
			continue
		}
		if len(c.sas) == 0 {
			out = append(out, opDesc{op: byte(op), cdbLen: c.cdbLen})
			continue
		}
		for _, sa := range c.sas {
			out = append(out, opDesc{op: byte(op), sa: sa, hasSA: true, cdbLen: c.cdbLen})
		}
	}
	return out
}

// usage is a CDB usage bitmap: every bit of the CDB may be set except
// reserved high bytes; good enough for initiators that only read lengths.
func usage(d opDesc) []byte {
	u := make([]byte, d.cdbLen)
	u[0] = d.op
	for i := 1; i < d.cdbLen; i++ {
		u[i] = 0xff
	}
	if d.hasSA {
		u[1] = 0x1f
	}
	u[d.cdbLen-1] = 0x07 // CONTROL: NACA, LINK, obsolete
	return u
}

// reportOpcodes implements REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).
func (l *LU) reportOpcodes(t *Task) {
	cdb := t.CDB
	rctd := cdb[2]&0x80 != 0
	opts := cdb[2] & 0x07
	reqOp, reqSA := cdb[3], binary.BigEndian.Uint16(cdb[4:])
	alloc := int(binary.BigEndian.Uint32(cdb[6:]))
	timeout := func() []byte { // command timeouts descriptor
		b := make([]byte, 12)
		binary.BigEndian.PutUint16(b, 10)
		binary.BigEndian.PutUint32(b[4:], 30)
		binary.BigEndian.PutUint32(b[8:], 60)
		return b
	}
	var out []byte
	switch opts {
	case 0:
		ops := supportedOps()
		out = make([]byte, 4)
		for _, d := range ops {
			e := make([]byte, 8)
			e[0] = d.op
			binary.BigEndian.PutUint16(e[2:], uint16(d.sa))
			if d.hasSA {
				e[5] |= 0x01 // SERVACTV
			}
			if rctd {
				e[5] |= 0x02 // CTDP
			}
			binary.BigEndian.PutUint16(e[6:], uint16(d.cdbLen))
			out = append(out, e...)
			if rctd {
				out = append(out, timeout()...)
			}
		}
		binary.BigEndian.PutUint32(out, uint32(len(out)-4))
	case 1, 2:
		c := cmdTable[reqOp]
		if c.run != nil && (opts == 1) != (len(c.sas) == 0) {
			l.failField(t, 2)
			return
		}
		supported := c.run != nil
		if opts == 2 && supported {
			supported = false
			for _, sa := range c.sas {
				if uint16(sa) == reqSA {
					supported = true
				}
			}
		}
		out = make([]byte, 4)
		if supported {
			out[1] = 0x03 // supported per standard
			u := usage(opDesc{op: reqOp, sa: byte(reqSA), hasSA: opts == 2, cdbLen: c.cdbLen})
			if opts == 2 {
				u[1] = byte(reqSA)
			}
			binary.BigEndian.PutUint16(out[2:], uint16(len(u)))
			out = append(out, u...)
			if rctd {
				out[1] |= 0x80 // CTDP
				out = append(out, timeout()...)
			}
		} else {
			out[1] = 0x01 // not supported
		}
	default:
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	t.setIn(out[:min(alloc, len(out))])
}

// reportTMFs implements REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4
// 6.36): ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET,
// and with REPD the extended format.
func (l *LU) reportTMFs(t *Task) {
	alloc := int(binary.BigEndian.Uint32(t.CDB[6:]))
	b := make([]byte, 4)
	b[0] = 0x80 | 0x40 | 0x10 | 0x08 // ATS, ATSS, CTSS, LURS
	if t.CDB[2]&0x80 != 0 {          // REPD
		b = make([]byte, 16)
		b[0] = 0x80 | 0x40 | 0x10 | 0x08
		b[3] = 0x0c
	}
	t.setIn(b[:min(alloc, len(b))])
}

// reportTPG implements REPORT TARGET PORT GROUPS (SPC-4 6.37): one group,
// active/optimized, one port.
func (l *LU) reportTPG(t *Task) {
	alloc := int(binary.BigEndian.Uint32(t.CDB[6:]))
	b := make([]byte, 4+8+4)
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	b[4] = 0x80 | 0x00               // PREF, active/optimized
	b[5] = 0x01 | 0x02 | 0x04 | 0x08 // AO_SUP AN_SUP S_SUP U_SUP
	binary.BigEndian.PutUint16(b[6:], 1)
	b[11] = 1 // one port
	binary.BigEndian.PutUint16(b[14:], 1)
	t.setIn(b[:min(alloc, len(b))])
}

// readDefects implements READ DEFECT DATA (10) and (12) (SBC-3 5.20-5.21):
// a virtual disk has no defects, so the list is empty in the format asked.
func (l *LU) readDefects(t *Task, twelve bool) {
	flags := t.CDB[2] & 0x1f
	if twelve {
		flags = t.CDB[1] & 0x1f
		b := make([]byte, 8)
		b[1] = flags
		t.setIn(b[:min(int(binary.BigEndian.Uint32(t.CDB[6:])), len(b))])
		return
	}
	b := make([]byte, 4)
	b[1] = flags
	t.setIn(b[:min(alloc16(t, 7), len(b))])
}

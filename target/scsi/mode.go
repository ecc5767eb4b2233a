package scsi

import (
	"encoding/binary"

	"stor.dev/stor/target"
)

// Mode pages this device server has (SPC-4 7.5, SBC-3 6.4). Only the
// control page's D_SENSE bit is changeable.
const (
	pageErrRecovery = 0x01
	pageCaching     = 0x08
	pageControl     = 0x0a
	pageInfoExc     = 0x1c
	pageAll         = 0x3f
)

var modePages = []byte{pageErrRecovery, pageCaching, pageControl, pageInfoExc}

// Page controls (SPC-4 6.11 table 98).
const (
	pcCurrent    = 0
	pcChangeable = 1
	pcDefault    = 2
	pcSaved      = 3
)

// modePage returns page code in page control pc.
func (l *LU) modePage(code byte, pc byte) []byte {
	switch code {
	case pageErrRecovery:
		b := make([]byte, 12)
		b[0], b[1] = code, 10
		if pc != pcChangeable {
			b[2] = 0x80 | 0x40 // AWRE ARRE
		}
		return b
	case pageCaching:
		b := make([]byte, 20)
		b[0], b[1] = code, 18
		if pc != pcChangeable {
			b[2] = 0x04 // WCE
		}
		return b
	case pageControl:
		b := make([]byte, 12)
		b[0], b[1] = code, 10
		switch pc {
		case pcChangeable:
			b[2] = 0x04 // D_SENSE
		default:
			l.mu.Lock()
			if pc == pcCurrent && l.mu.dsense {
				b[2] |= 0x04
			}
			l.mu.Unlock()
			b[3] = 0x10 // unrestricted reordering, QERR 0
			b[5] = 0x40 // TAS
			binary.BigEndian.PutUint16(b[8:], 0xffff)
		}
		return b
	case pageInfoExc:
		b := make([]byte, 12)
		b[0], b[1] = code, 10
		return b
	}
	return nil
}

// modeSense implements MODE SENSE (6) and (10) (SPC-4 6.11-6.12).
//
//	header (6):  len(1) medium(1) devspec(1) bdlen(1)
//	header (10): len(2) medium(1) devspec(1) LONGLBA(1) rsvd(1) bdlen(2)
//	block descriptor (8): density(1) blocks(3) rsvd(1) block length(3)
//	devspec: WP 0x80, DPOFUA 0x10
func (l *LU) modeSense(dev target.BlockDevice, t *Task, ten bool) {
	cdb := t.CDB
	dbd := cdb[1]&0x08 != 0
	pc := cdb[2] >> 6
	code := cdb[2] & 0x3f
	sub := cdb[3]
	var alloc int
	if ten {
		alloc = alloc16(t, 7)
	} else {
		alloc = int(cdb[4])
	}
	if pc == pcSaved {
		l.fail(t, senseIllegal, ascSavingNotSupported)
		return
	}
	var pages []byte
	switch {
	case code == pageAll && (sub == 0 || sub == 0xff):
		for _, c := range modePages {
			pages = append(pages, l.modePage(c, pc)...)
		}
	case sub == 0 || sub == 0xff:
		pages = l.modePage(code, pc)
		if pages == nil {
			l.fail(t, senseIllegal, ascInvalidFieldCDB)
			return
		}
	default:
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	g := dev.Geometry()
	devspec := byte(0x10) // DPOFUA
	if g.ReadOnly {
		devspec |= 0x80
	}
	var bd []byte
	if !dbd {
		bd = make([]byte, 8)
		blocks := g.Blocks()
		if blocks > 0xffffff {
			blocks = 0xffffff
		}
		bd[1], bd[2], bd[3] = byte(blocks>>16), byte(blocks>>8), byte(blocks)
		bs := g.BlockSize
		bd[5], bd[6], bd[7] = byte(bs>>16), byte(bs>>8), byte(bs)
	}
	var out []byte
	if ten {
		out = make([]byte, 8, 8+len(bd)+len(pages))
		out[3] = devspec
		binary.BigEndian.PutUint16(out[6:], uint16(len(bd)))
	} else {
		out = make([]byte, 4, 4+len(bd)+len(pages))
		out[2] = devspec
		out[3] = byte(len(bd))
	}
	out = append(out, bd...)
	out = append(out, pages...)
	if ten {
		binary.BigEndian.PutUint16(out, uint16(len(out)-2))
	} else {
		out[0] = byte(len(out) - 1)
	}
	t.setIn(out[:min(alloc, len(out))])
}

// modeSelect implements MODE SELECT (6) and (10) (SPC-4 6.9-6.10): every
// page sent must match the current values except changeable bits.
func (l *LU) modeSelect(t *Task, ten bool) {
	cdb := t.CDB
	var plen int
	if ten {
		plen = alloc16(t, 7)
	} else {
		plen = int(cdb[4])
	}
	if cdb[1]&0x01 != 0 { // SP: we cannot save pages
		l.fail(t, senseIllegal, ascInvalidFieldCDB)
		return
	}
	if plen == 0 {
		return
	}
	p, ok := l.dataOut(t, int64(plen))
	if !ok {
		return
	}
	hdr := 4
	var bdlen int
	if ten {
		hdr = 8
		if len(p) < hdr {
			l.fail(t, senseIllegal, ascParamListLength)
			return
		}
		bdlen = int(binary.BigEndian.Uint16(p[6:]))
	} else {
		if len(p) < hdr {
			l.fail(t, senseIllegal, ascParamListLength)
			return
		}
		bdlen = int(p[3])
	}
	rest := p[min(len(p), hdr+bdlen):]
	dsense := -1
	for len(rest) > 0 {
		if len(rest) < 2 {
			l.fail(t, senseIllegal, ascParamListLength)
			return
		}
		code := rest[0] & 0x3f
		if rest[0]&0x40 != 0 { // SPF: no subpages
			l.fail(t, senseIllegal, ascInvalidFieldParam)
			return
		}
		n := 2 + int(rest[1])
		if n > len(rest) {
			l.fail(t, senseIllegal, ascParamListLength)
			return
		}
		pg := rest[:n]
		cur, chg := l.modePage(code, pcCurrent), l.modePage(code, pcChangeable)
		if cur == nil || len(cur) != n {
			l.fail(t, senseIllegal, ascInvalidFieldParam)
			return
		}
		for i := 2; i < n; i++ {
			if (pg[i]^cur[i])&^chg[i] != 0 {
				l.fail(t, senseIllegal, ascInvalidFieldParam)
				return
			}
		}
		if code == pageControl {
			dsense = int(pg[2]>>2) & 1
		}
		rest = rest[n:]
	}
	if dsense >= 0 {
		l.mu.Lock()
		l.mu.dsense = dsense == 1
		l.mu.Unlock()
	}
}

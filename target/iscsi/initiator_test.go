package iscsi

import (
	"bufio"
	"crypto/md5"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// testInitiator is a minimal iSCSI initiator for tests: one command at a
// time, R2T-driven writes, optional digests and CHAP.
type testInitiator struct {
	t        testing.TB
	nc       net.Conn
	rd       pduReader
	hd, dd   bool
	cmdSN    uint32
	expStat  uint32
	itt      uint32
	tsih     uint16
	cid      uint16
	isid     [6]byte
	name     string
	maxBurst int
	mrdsl    int // target's MaxRecvDataSegmentLength
}

type loginOpts struct {
	initiator    string
	target       string // "" = discovery
	isid         byte
	tsih         uint16
	cid          uint16
	user, secret string // CHAP; "" = AuthMethod=None only
	authMethods  string // override the AuthMethod offer
	mutualUser   string
	mutualSecret string
	digest       bool
	immediate    bool
	initialR2T   bool
	maxConns     int
	cmdSN        uint32
}

// loginStatus is the class/detail of a failed login.
type loginStatus uint16

func (s loginStatus) Error() string { return fmt.Sprintf("login status %#04x", uint16(s)) }

func dialInitiator(t testing.TB, addr string, o loginOpts) (*testInitiator, error) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
	if o.initiator == "" {
		o.initiator = "iqn.2026-11.dev.stor.test:init"
	}
	ti := &testInitiator{t: t, nc: nc, name: o.initiator, mrdsl: 8192, maxBurst: 262144}
	ti.rd = pduReader{r: bufio.NewReader(nc), maxData: 1 << 24}
	ti.isid = [6]byte{0x80, 0, 0, 0, 0, o.isid}
	ti.tsih = o.tsih
	ti.cid = o.cid
	ti.cmdSN = o.cmdSN
	t.Cleanup(func() { nc.Close() })
	if err := ti.login(o); err != nil {
		nc.Close()
		return nil, err
	}
	return ti, nil
}

func (ti *testInitiator) send(h *bhs, data []byte) {
	b := appendPDU(nil, h, data, ti.hd, ti.dd)
	if _, err := ti.nc.Write(b); err != nil {
		ti.t.Fatalf("write: %v", err)
	}
}

func (ti *testInitiator) recv() (*pdu, error) {
	p := &pdu{}
	if err := ti.rd.read(p); err != nil {
		return nil, err
	}
	p.data = append([]byte(nil), p.data...)
	ti.expStat = p.hdr.u32(24) + 1
	return p, nil
}

func (ti *testInitiator) loginPDU(csg, nsg int, transit bool, text []byte) (*pdu, []kv, error) {
	var h bhs
	h[0] = 0x40 | opLoginReq
	h[1] = byte(csg)<<2 | byte(nsg)
	if transit {
		h[1] |= 0x80
	}
	copy(h[8:14], ti.isid[:])
	h[14], h[15] = byte(ti.tsih>>8), byte(ti.tsih)
	h.setU32(16, ti.itt)
	ti.itt++
	h[20], h[21] = byte(ti.cid>>8), byte(ti.cid)
	h.setU32(24, ti.cmdSN)
	h.setU32(28, ti.expStat)
	ti.send(&h, text)
	p, err := ti.recv()
	if err != nil {
		return nil, nil, err
	}
	if p.hdr.opcode() != opLoginResp {
		return nil, nil, fmt.Errorf("opcode %#x", p.hdr.opcode())
	}
	if st := p.hdr.u16(36); st != 0 {
		return p, nil, loginStatus(st)
	}
	ti.tsih = p.hdr.u16(14)
	return p, parseText(p.data), nil
}

func keyOf(kvs []kv, k string) string {
	for _, x := range kvs {
		if x.k == k {
			return x.v
		}
	}
	return ""
}

func (ti *testInitiator) login(o loginOpts) error {
	var text []byte
	text = appendText(text, "InitiatorName", o.initiator)
	if o.target == "" {
		text = appendText(text, "SessionType", "Discovery")
	} else {
		text = appendText(text, "TargetName", o.target)
	}
	methods := "None"
	if o.user != "" {
		methods = "CHAP,None"
	}
	if o.authMethods != "" {
		methods = o.authMethods
	}
	text = appendText(text, "AuthMethod", methods)
	_, kvs, err := ti.loginPDU(0, 1, o.user == "", text)
	if err != nil {
		return err
	}
	if keyOf(kvs, "AuthMethod") == "CHAP" {
		_, kvs, err = ti.loginPDU(0, 1, false, appendText(nil, "CHAP_A", "5"))
		if err != nil {
			return err
		}
		id, _ := strconv.Atoi(keyOf(kvs, "CHAP_I"))
		chal, err := decodeCHAP(keyOf(kvs, "CHAP_C"))
		if err != nil {
			return err
		}
		h := md5.New()
		h.Write([]byte{byte(id)})
		h.Write([]byte(o.secret))
		h.Write(chal)
		text = appendText(nil, "CHAP_N", o.user)
		text = appendText(text, "CHAP_R", "0x"+hex.EncodeToString(h.Sum(nil)))
		myChal := []byte("0123456789abcdef")
		if o.mutualUser != "" {
			text = appendText(text, "CHAP_I", "7")
			text = appendText(text, "CHAP_C", "0x"+hex.EncodeToString(myChal))
		}
		_, kvs, err = ti.loginPDU(0, 1, true, text)
		if err != nil {
			return err
		}
		if o.mutualUser != "" {
			want := chapResponse(7, o.mutualSecret, myChal)
			if keyOf(kvs, "CHAP_N") != o.mutualUser || keyOf(kvs, "CHAP_R") != "0x"+hex.EncodeToString(want[:]) {
				return fmt.Errorf("mutual CHAP: target answered %q %q", keyOf(kvs, "CHAP_N"), keyOf(kvs, "CHAP_R"))
			}
		}
	}
	text = nil
	dg := "None"
	if o.digest {
		dg = "CRC32C"
	}
	yn := func(b bool) string {
		if b {
			return "Yes"
		}
		return "No"
	}
	text = appendText(text, "HeaderDigest", dg)
	text = appendText(text, "DataDigest", dg)
	text = appendText(text, "InitialR2T", yn(o.initialR2T))
	text = appendText(text, "ImmediateData", yn(o.immediate))
	text = appendText(text, "MaxRecvDataSegmentLength", "65536")
	text = appendText(text, "MaxBurstLength", "262144")
	text = appendText(text, "FirstBurstLength", "65536")
	text = appendText(text, "MaxOutstandingR2T", "2")
	text = appendText(text, "X-com.example.Foo", "bar")
	if o.maxConns > 0 {
		text = appendText(text, "MaxConnections", strconv.Itoa(o.maxConns))
	}
	_, kvs, err = ti.loginPDU(1, 3, true, text)
	if err != nil {
		return err
	}
	if keyOf(kvs, "X-com.example.Foo") != "NotUnderstood" {
		return fmt.Errorf("unknown key answered %q", keyOf(kvs, "X-com.example.Foo"))
	}
	if v := keyOf(kvs, "MaxRecvDataSegmentLength"); v != "" {
		ti.mrdsl, _ = strconv.Atoi(v)
	}
	ti.hd, ti.dd = o.digest, o.digest
	ti.rd.hdigest, ti.rd.ddigest = o.digest, o.digest
	return nil
}

// result of one SCSI command.
type result struct {
	status  byte
	sense   []byte
	data    []byte
	resid   uint32
	flags   byte
	r2ts    int
	dataIns int
}

// senseKey returns key and ASC<<8|ASCQ of fixed or descriptor sense.
func (r result) senseKey() (byte, uint16) {
	if len(r.sense) < 4 {
		return 0, 0
	}
	if r.sense[0]&0x7f >= 0x72 {
		return r.sense[1] & 0x0f, uint16(r.sense[2])<<8 | uint16(r.sense[3])
	}
	if len(r.sense) < 14 {
		return r.sense[2] & 0x0f, 0
	}
	return r.sense[2] & 0x0f, uint16(r.sense[12])<<8 | uint16(r.sense[13])
}

// command runs one SCSI command: immediate data if allowed by imm, the rest
// on R2T.
func (ti *testInitiator) command(cdb []byte, out []byte, edtl int, read bool, imm int) (result, error) {
	var h bhs
	h[0] = opSCSICmd
	h[1] = 0x80 | 0x01 // F, SIMPLE
	if read {
		h[1] |= 0x40
	}
	if out != nil {
		h[1] |= 0x20
	}
	itt := ti.itt
	ti.itt++
	h.setU32(16, itt)
	h.setU32(20, uint32(edtl))
	h.setU32(24, ti.cmdSN)
	ti.cmdSN++
	h.setU32(28, ti.expStat)
	copy(h[32:48], cdb)
	var immData []byte
	if imm > 0 && len(out) > 0 {
		immData = out[:min(imm, len(out))]
	}
	ti.send(&h, immData)
	var r result
	for {
		p, err := ti.recv()
		if err != nil {
			return r, err
		}
		switch p.hdr.opcode() {
		case opR2T:
			if p.hdr.itt() != itt {
				continue // an earlier command's; the tests leave those hanging
			}
			r.r2ts++
			off, n := p.hdr.u32(40), p.hdr.u32(44)
			ttt := p.hdr.u32(20)
			sn := uint32(0)
			for done := uint32(0); done < n; {
				m := min(n-done, uint32(ti.mrdsl))
				var d bhs
				d[0] = opDataOut
				if done+m == n {
					d[1] = 0x80
				}
				d.setU32(16, itt)
				d.setU32(20, ttt)
				d.setU32(28, ti.expStat)
				d.setU32(36, sn)
				d.setU32(40, off+done)
				ti.send(&d, out[off+done:off+done+m])
				sn++
				done += m
			}
		case opDataIn:
			r.dataIns++
			r.data = append(r.data, p.data...)
			if p.hdr[1]&0x01 != 0 {
				r.status = p.hdr[3]
				r.flags = p.hdr[1] & 0x06
				r.resid = p.hdr.u32(44)
				return r, nil
			}
		case opSCSIResp:
			r.status = p.hdr[3]
			r.flags = p.hdr[1] & 0x06
			r.resid = p.hdr.u32(44)
			if len(p.data) >= 2 {
				n := int(binary.BigEndian.Uint16(p.data))
				r.sense = p.data[2 : 2+min(n, len(p.data)-2)]
			}
			return r, nil
		case opReject:
			return r, fmt.Errorf("reject reason %#x", p.hdr[2])
		default:
			return r, fmt.Errorf("unexpected opcode %#x", p.hdr.opcode())
		}
	}
}

// text sends a Text Request and returns the answer's keys.
func (ti *testInitiator) text(req []byte) ([]kv, error) {
	var all []byte
	ttt := uint32(reservedTT)
	for {
		var h bhs
		h[0] = 0x40 | opTextReq
		h[1] = 0x80
		h.setU32(16, ti.itt)
		ti.itt++
		h.setU32(20, ttt)
		h.setU32(24, ti.cmdSN)
		h.setU32(28, ti.expStat)
		ti.send(&h, req)
		p, err := ti.recv()
		if err != nil {
			return nil, err
		}
		if p.hdr.opcode() != opTextResp {
			return nil, fmt.Errorf("opcode %#x", p.hdr.opcode())
		}
		all = append(all, p.data...)
		if p.hdr[1]&0x40 == 0 {
			return parseText(all), nil
		}
		ttt, req = p.hdr.u32(20), nil
	}
}

func (ti *testInitiator) logout() error {
	var h bhs
	h[0] = 0x40 | opLogoutReq
	h[1] = 0x80
	h.setU32(16, ti.itt)
	ti.itt++
	h.setU32(24, ti.cmdSN)
	h.setU32(28, ti.expStat)
	ti.send(&h, nil)
	p, err := ti.recv()
	if err != nil {
		return err
	}
	if p.hdr.opcode() != opLogoutResp || p.hdr[2] != 0 {
		return fmt.Errorf("logout response %#x/%d", p.hdr.opcode(), p.hdr[2])
	}
	return nil
}

func mustCmd(t testing.TB, ti *testInitiator, cdb, out []byte, edtl int, read bool) result {
	t.Helper()
	r, err := ti.command(cdb, out, edtl, read, 0)
	if err != nil {
		t.Fatalf("cdb % x: %v", cdb, err)
	}
	return r
}

func cdb16(op byte, lba uint64, n uint32) []byte {
	c := make([]byte, 16)
	c[0] = op
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], n)
	return c
}

var _ = strings.Contains

package iscsi

import (
	"bytes"
	"net"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
)

func seedPDU(op byte, flags byte, data []byte, cdb []byte) []byte {
	var h bhs
	h[0], h[1] = op, flags
	h.setU32(20, uint32(len(data)))
	copy(h[32:], cdb)
	return appendPDU(nil, &h, data, false, false)
}

// FuzzPDU feeds arbitrary bytes to the PDU reader (BHS, AHS, header and
// data digests, padding): it never panics, never returns a data segment
// longer than allowed, and a PDU it accepts re-encodes to the same bytes.
func FuzzPDU(f *testing.F) {
	f.Add(seedPDU(opSCSICmd, 0xa1, make([]byte, 512), []byte{0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0}), false)
	f.Add(seedPDU(opLoginReq|0x40, 0x87, []byte("InitiatorName=iqn.x\x00"), nil), false)
	f.Add(seedPDU(opDataOut, 0x80, []byte{1, 2, 3}, nil), true)
	f.Add(bytes.Repeat([]byte{0xff}, 60), true)
	f.Fuzz(func(t *testing.T, b []byte, digests bool) {
		rd := pduReader{r: bytes.NewReader(b), hdigest: digests, ddigest: digests, maxData: 1 << 16}
		var p pdu
		err := rd.read(&p)
		if err != nil {
			return
		}
		if len(p.data) > rd.maxData || len(p.data) != p.hdr.dataLen() || len(p.ahs) != p.hdr.ahsLen() {
			t.Fatalf("data %d ahs %d for header % x", len(p.data), len(p.ahs), p.hdr[:8])
		}
		if len(p.ahs) == 0 {
			h := p.hdr
			out := appendPDU(nil, &h, p.data, digests, digests)
			if !bytes.Equal(out[:bhsLen], b[:bhsLen]) {
				t.Fatalf("re-encoded header differs")
			}
			_ = decodeLUN(h.lunField())
		}
	})
}

var fuzzSrv struct {
	once sync.Once
	addr string
}

// FuzzSession logs in to a real server and sends arbitrary bytes as the
// full feature phase: the server survives and keeps serving a new session.
func FuzzSession(f *testing.F) {
	f.Add(seedPDU(opSCSICmd, 0xa1, make([]byte, 512), []byte{0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0}))
	f.Add(seedPDU(opSCSICmd, 0xc1, nil, []byte{0x12, 1, 0x83, 0, 255, 0}))
	f.Add(append(seedPDU(opSCSICmd, 0x21, nil, []byte{0x2a, 0, 0, 0, 0, 0, 0, 0, 4, 0}), seedPDU(opDataOut, 0x80, make([]byte, 512), nil)...))
	f.Add(seedPDU(opTaskMgmt|0x40, 0x85, nil, nil))
	f.Add(seedPDU(opTextReq|0x40, 0x80, []byte("SendTargets=All\x00"), nil))
	f.Add(seedPDU(opNopOut|0x40, 0x80, []byte("ping"), nil))
	f.Add(seedPDU(opLogoutReq|0x40, 0x80, nil, nil))
	f.Add(seedPDU(opSNACK, 0x80, nil, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzSrv.once.Do(func() {
			cat := blockdevtest.NewCatalog()
			cat.Add("disk", "vol-1", blockdevtest.NewMemory(target.Geometry{Size: 1 << 20, BlockSize: 512}))
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				panic(err)
			}
			srv := NewServer(Config{Catalog: cat})
			go srv.Serve(ln) // lives for the fuzz process
			fuzzSrv.addr = ln.Addr().String()
		})
		ti, err := dialInitiator(t, fuzzSrv.addr, loginOpts{target: testTarget, immediate: true})
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		ti.nc.Write(b)
		ti.nc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		for {
			if _, err := ti.recv(); err != nil {
				break
			}
		}
		ti.nc.Close()
		ti2, err := dialInitiator(t, fuzzSrv.addr, loginOpts{target: testTarget, isid: 1})
		if err != nil {
			t.Fatalf("server stopped serving: %v", err)
		}
		if r, err := ti2.command(make([]byte, 6), nil, 0, false, 0); err != nil || r.status != 0 {
			t.Fatalf("TUR after fuzz: %v %#x", err, r.status)
		}
		ti2.nc.Close()
	})
}

// BenchmarkPDURead measures parsing a SCSI Command PDU with 4 KiB of
// immediate data and both digests; it must not allocate.
func BenchmarkPDURead(b *testing.B) {
	var h bhs
	h[0], h[1] = opSCSICmd, 0xa1
	one := appendPDU(nil, &h, make([]byte, 4096), true, true)
	stream := bytes.Repeat(one, 64)
	r := bytes.NewReader(stream)
	rd := pduReader{r: r, hdigest: true, ddigest: true, maxData: 1 << 16}
	var p pdu
	b.SetBytes(int64(len(one)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if r.Len() == 0 {
			r.Reset(stream)
		}
		if err := rd.read(&p); err != nil {
			b.Fatal(err)
		}
	}
}

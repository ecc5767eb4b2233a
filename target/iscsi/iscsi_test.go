package iscsi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"sync"
	"testing"
	"time"
)

const testTarget = IQNPrefix + "disk"

func login(t *testing.T, ts *testServer, o loginOpts) *testInitiator {
	t.Helper()
	if o.target == "" {
		o.target = testTarget
	}
	ti, err := dialInitiator(t, ts.addr, o)
	if err != nil {
		t.Fatalf("login: %v", err)
	}
	return ti
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// RFC 7143 6.3: login with AuthMethod=None, operational negotiation, a
// command, logout; the device is opened for the session and closed after.
func TestRFC7143_6_3_LoginNoneAndLogout(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	ti := login(t, ts, loginOpts{immediate: true})
	if ts.srv.Sessions() != 1 || ts.cat.Opened("disk") != 1 {
		t.Fatalf("sessions %d opened %d", ts.srv.Sessions(), ts.cat.Opened("disk"))
	}
	r := mustCmd(t, ti, make([]byte, 6), nil, 0, false) // TEST UNIT READY
	if r.status != 0 {
		t.Fatalf("TUR status %#x", r.status)
	}
	if err := ti.logout(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "session end", func() bool { return ts.srv.Sessions() == 0 && ts.cat.Opened("disk") == 0 })
}

// RFC 7143 11.13.5: a target that does not exist is status 0x0203; a
// missing InitiatorName 0x0207.
func TestRFC7143_11_13_5_LoginStatus(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	_, err := dialInitiator(t, ts.addr, loginOpts{target: IQNPrefix + "nope"})
	if st, ok := err.(loginStatus); !ok || st != loginNotFound {
		t.Fatalf("unknown target: %v", err)
	}
}

// RFC 7143 12.1.3: CHAP with MD5, one-way and mutual; refusals are status
// class 2 (initiator error) detail 1 (authentication failure), and the
// target keeps serving others.
func TestRFC7143_12_1_3_CHAP(t *testing.T) {
	auth := StaticAuth{
		"disk":   {User: "alice", Secret: "alice-secret-12"},
		"disk4k": {User: "bob", Secret: "bob-secret-1234", MutualUser: "tgt", MutualSecret: "target-secret-1"},
	}
	ts := startServer(t, Config{Auth: auth}, 1<<20)
	cases := []struct {
		name string
		o    loginOpts
		want error
	}{
		{"right secret", loginOpts{target: testTarget, user: "alice", secret: "alice-secret-12"}, nil},
		{"wrong secret", loginOpts{target: testTarget, user: "alice", secret: "wrong"}, loginStatus(loginAuthFailure)},
		{"unknown user", loginOpts{target: testTarget, user: "mallory", secret: "alice-secret-12"}, loginStatus(loginAuthFailure)},
		{"offers None only", loginOpts{target: testTarget, authMethods: "None"}, loginStatus(loginAuthFailure)},
		{"mutual", loginOpts{target: IQNPrefix + "disk4k", user: "bob", secret: "bob-secret-1234", mutualUser: "tgt", mutualSecret: "target-secret-1"}, nil},
		{"mutual required", loginOpts{target: IQNPrefix + "disk4k", user: "bob", secret: "bob-secret-1234"}, loginStatus(loginAuthFailure)},
		{"right secret again", loginOpts{target: testTarget, user: "alice", secret: "alice-secret-12"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ti, err := dialInitiator(t, ts.addr, c.o)
			if !errors.Is(err, c.want) && err != c.want {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if err == nil {
				if r := mustCmd(t, ti, make([]byte, 6), nil, 0, false); r.status != 0 {
					t.Fatalf("TUR %#x", r.status)
				}
			}
		})
	}
}

// RFC 7143 12.3 / 11.10: SendTargets=All in a discovery session lists
// every export with the portal.
func TestRFC7143_12_3_SendTargets(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	ti, err := dialInitiator(t, ts.addr, loginOpts{})
	if err != nil {
		t.Fatal(err)
	}
	kvs, err := ti.text(appendText(nil, "SendTargets", "All"))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, k := range kvs {
		got = append(got, k.k+"="+k.v)
	}
	want := []string{
		"TargetName=" + IQNPrefix + "disk", "TargetAddress=" + ts.addr + ",1",
		"TargetName=" + IQNPrefix + "disk4k", "TargetAddress=" + ts.addr + ",1",
	}
	if len(got) != len(want) {
		t.Fatalf("got %q", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %q, want %q", got, want)
		}
	}
	if err := ti.logout(); err != nil {
		t.Fatal(err)
	}
}

func rw10(op byte, lba uint32, n uint16) []byte {
	c := make([]byte, 10)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], n)
	return c
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// RFC 7143 13.1 and 11.7-11.8: with CRC32C digests, R2T-driven writes of
// several bursts and multi-PDU Data-In read back what was written.
func TestRFC7143_13_1_DigestsAndR2T(t *testing.T) {
	ts := startServer(t, Config{}, 8<<20)
	for _, o := range []loginOpts{
		{digest: true, initialR2T: true},
		{digest: false, immediate: true},
	} {
		ti := login(t, ts, o)
		data := pattern(1<<20, 3)
		imm := 0
		if o.immediate {
			imm = 8192
		}
		r, err := ti.command(rw10(0x2a, 8, 2048), data, len(data), false, imm)
		if err != nil || r.status != 0 {
			t.Fatalf("write: %v status %#x", err, r.status)
		}
		if r.r2ts < 4 {
			t.Errorf("r2ts = %d, want >= 4 for 1 MiB at MaxBurstLength 256 KiB", r.r2ts)
		}
		r = mustCmd(t, ti, rw10(0x28, 8, 2048), nil, len(data), true)
		if r.status != 0 || !bytes.Equal(r.data, data) {
			t.Fatalf("read back: status %#x, %d bytes, equal %v", r.status, len(r.data), bytes.Equal(r.data, data))
		}
		if r.dataIns < 16 {
			t.Errorf("Data-In PDUs = %d, want >= 16 at MaxRecvDataSegmentLength 64 KiB", r.dataIns)
		}
	}
}

// RFC 7143 13.1: a corrupted header digest ends the connection; a corrupted
// data digest is rejected (reason 0x02) and ends it too (ERL 0).
func TestRFC7143_13_1_BadDigests(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	for _, which := range []string{"header", "data"} {
		t.Run(which, func(t *testing.T) {
			ti := login(t, ts, loginOpts{digest: true, immediate: true})
			var h bhs
			h[0] = opSCSICmd
			h[1] = 0xa1
			h.setU32(20, 512)
			h.setU32(24, ti.cmdSN)
			copy(h[32:], rw10(0x2a, 0, 1))
			b := appendPDU(nil, &h, make([]byte, 512), true, true)
			if which == "header" {
				b[bhsLen] ^= 1
			} else {
				b[len(b)-1] ^= 1
			}
			ti.nc.Write(b)
			p, err := ti.recv()
			if which == "data" {
				if err != nil || p.hdr.opcode() != opReject || p.hdr[2] != rejectDataDigest {
					t.Fatalf("want Reject(data digest), got %v %v", p, err)
				}
				_, err = ti.recv()
			}
			if err == nil {
				t.Fatal("connection still open")
			}
		})
	}
}

// RFC 7143 11.7.4: a Data-Out with the wrong DataSN ends the command at
// ERL 0 with ABORTED COMMAND / DATA PHASE ERROR; the connection survives.
func TestRFC7143_11_7_4_DataSN(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	ti := login(t, ts, loginOpts{initialR2T: true})
	var h bhs
	h[0] = opSCSICmd
	h[1] = 0xa1
	h.setU32(16, 1)
	h.setU32(20, 1024)
	h.setU32(24, ti.cmdSN)
	copy(h[32:], rw10(0x2a, 0, 2))
	ti.send(&h, nil)
	ti.cmdSN++
	p, err := ti.recv()
	if err != nil || p.hdr.opcode() != opR2T {
		t.Fatalf("want R2T: %v", err)
	}
	var d bhs
	d[0] = opDataOut
	d[1] = 0x80
	d.setU32(16, 1)
	d.setU32(20, p.hdr.u32(20))
	d.setU32(36, 5) // DataSN should be 0
	ti.send(&d, make([]byte, 1024))
	p, err = ti.recv()
	if err != nil || p.hdr.opcode() != opSCSIResp || p.hdr[3] != 0x02 || len(p.data) < 16 || p.data[2+2] != 0x0b || p.data[2+12] != 0x4b {
		t.Fatalf("want CHECK CONDITION ABORTED COMMAND/DATA PHASE ERROR, got %v %v", p, err)
	}
	if r := mustCmd(t, ti, make([]byte, 6), nil, 0, false); r.status != 0 {
		t.Fatalf("TUR after data phase error: %#x", r.status)
	}
}

// RFC 7143 4.2.2.1: a command with CmdSN beyond MaxCmdSN is ignored; the
// session keeps working.
func TestRFC7143_4_2_2_1_CmdSNWindow(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	ti := login(t, ts, loginOpts{})
	saved := ti.cmdSN
	ti.cmdSN += cmdWindow + 5
	var h bhs
	h[0] = opSCSICmd
	h[1] = 0x81
	h.setU32(16, 99)
	h.setU32(24, ti.cmdSN)
	ti.send(&h, nil) // TEST UNIT READY out of window
	ti.cmdSN = saved
	r := mustCmd(t, ti, make([]byte, 6), nil, 0, false)
	if r.status != 0 {
		t.Fatalf("status %#x", r.status)
	}
}

// RFC 7143 6.3.5: a login with the same ISID and TSIH 0 reinstates the
// session: the old connection is closed.
func TestRFC7143_6_3_5_Reinstatement(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	old := login(t, ts, loginOpts{isid: 9})
	login(t, ts, loginOpts{isid: 9})
	old.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := old.recv(); err == nil {
		t.Fatal("old session still open")
	}
	waitFor(t, "one session", func() bool { return ts.srv.Sessions() == 1 })
}

// RFC 7143 11.5 + SAM-5 6.4: LOGICAL UNIT RESET completes and leaves a unit
// attention for the nexus.
func TestRFC7143_11_5_LUNReset(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	ti := login(t, ts, loginOpts{})
	var h bhs
	h[0] = 0x40 | opTaskMgmt
	h[1] = 0x80 | tmfLUNReset
	h.setU32(16, 77)
	h.setU32(20, reservedTT)
	h.setU32(24, ti.cmdSN)
	ti.send(&h, nil)
	p, err := ti.recv()
	if err != nil || p.hdr.opcode() != opTaskMgmtRsp || p.hdr[2] != tmfComplete {
		t.Fatalf("TMF response %v %v", p, err)
	}
	r := mustCmd(t, ti, make([]byte, 6), nil, 0, false)
	if k, asc := r.senseKey(); r.status != 2 || k != 6 || asc != 0x2903 {
		t.Fatalf("want UNIT ATTENTION 29/03, got status %#x key %#x asc %#x", r.status, k, asc)
	}
	if r := mustCmd(t, ti, make([]byte, 6), nil, 0, false); r.status != 0 {
		t.Fatalf("second TUR %#x", r.status)
	}
}

// Several sessions on one LUN: each writes its own blocks and increments a
// shared counter with COMPARE AND WRITE; the counter equals the number of
// successful CAWs (atomic against every other writer). Run with -race.
func TestSBC3_5_2_CompareAndWriteSessions(t *testing.T) {
	ts := startServer(t, Config{}, 4<<20)
	const sessions, incs = 4, 25
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	for s := 0; s < sessions; s++ {
		ti := login(t, ts, loginOpts{isid: byte(s + 1), immediate: true})
		wg.Add(1)
		go func(s int, ti *testInitiator) {
			defer wg.Done()
			done := 0
			for tries := 0; done < incs && tries < 20000; tries++ {
				r, err := ti.command(rw10(0x28, 0, 1), nil, 512, true, 0)
				if err != nil {
					errs <- err
					return
				}
				cur := binary.BigEndian.Uint64(r.data)
				buf := make([]byte, 1024)
				binary.BigEndian.PutUint64(buf, cur)
				copy(buf[8:512], r.data[8:])
				binary.BigEndian.PutUint64(buf[512:], cur+1)
				cdb := cdb16(0x89, 0, 0)
				cdb[13] = 1
				r, err = ti.command(cdb, buf, 1024, false, 1024)
				if err != nil {
					errs <- err
					return
				}
				if r.status == 0 {
					done++
				}
				// A plain write to this session's own block in between.
				w := pattern(512, byte(s))
				if r, err := ti.command(rw10(0x2a, uint32(100+s), 1), w, 512, false, 512); err != nil || r.status != 0 {
					errs <- errors.New("write failed")
					return
				}
			}
			if done != incs {
				errs <- errors.New("too many retries")
			}
		}(s, ti)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	ti := login(t, ts, loginOpts{isid: 99})
	r := mustCmd(t, ti, rw10(0x28, 0, 1), nil, 512, true)
	if got := binary.BigEndian.Uint64(r.data); got != sessions*incs {
		t.Fatalf("counter = %d, want %d", got, sessions*incs)
	}
}

// Close drains every session, closes every device and joins goroutines.
func TestServerCloseJoins(t *testing.T) {
	base := runtime.NumGoroutine()
	ts := startServer(t, Config{}, 1<<20)
	a := login(t, ts, loginOpts{isid: 1})
	login(t, ts, loginOpts{isid: 2})
	if n := ts.srv.Sessions(); n != 2 {
		t.Fatalf("sessions = %d", n)
	}
	ts.srv.Close()
	if _, err := a.recv(); err == nil || !errors.Is(err, io.EOF) && err.Error() == "" {
		t.Fatalf("connection survived Close: %v", err)
	}
	if n := ts.cat.Opened("disk"); n != 0 {
		t.Fatalf("%d devices still open", n)
	}
	if n := ts.srv.Sessions(); n != 0 {
		t.Fatalf("sessions = %d after Close", n)
	}
	<-ts.done // Serve returned
	ts.done <- ErrClosed
	waitFor(t, "no leaked goroutines", func() bool { return runtime.NumGoroutine() <= base })
}

// A connection flooding large writes without sending their data gets TASK
// SET FULL once its write buffers exceed the budget, and keeps working.
func TestWriteBufferBudget(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	ti := login(t, ts, loginOpts{initialR2T: true})
	for i := 0; i < maxCollecting/maxEDTL; i++ {
		var h bhs
		h[0] = opSCSICmd
		h[1] = 0xa1
		h.setU32(16, uint32(1000+i))
		h.setU32(20, maxEDTL)
		h.setU32(24, ti.cmdSN)
		ti.cmdSN++
		copy(h[32:], cdb16(0x8a, 0, maxEDTL/512))
		ti.send(&h, nil)
	}
	r, err := ti.command(cdb16(0x8a, 0, maxEDTL/512), []byte{}, maxEDTL, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	if r.status != 0x28 {
		t.Fatalf("status %#x, want TASK SET FULL", r.status)
	}
}

// A malformed or unknown PDU is rejected and the connection survives.
func TestRFC7143_11_17_RejectUnknownOpcode(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	ti := login(t, ts, loginOpts{})
	var h bhs
	h[0] = 0x1c // not an initiator opcode
	ti.send(&h, nil)
	p, err := ti.recv()
	if err != nil || p.hdr.opcode() != opReject || p.hdr[2] != rejectUnsupported {
		t.Fatalf("got %v %v", p, err)
	}
	if r := mustCmd(t, ti, make([]byte, 6), nil, 0, false); r.status != 0 {
		t.Fatalf("TUR after reject %#x", r.status)
	}
}

// RFC 7143 4.2.2.1 and 6.3: a second connection joins a session with its
// TSIH (MC/S); commands on both are admitted in one CmdSN window, and the
// session ends with its last connection.
func TestRFC7143_6_3_MultipleConnections(t *testing.T) {
	ts := startServer(t, Config{}, 1<<20)
	a := login(t, ts, loginOpts{isid: 5, maxConns: 2})
	b := login(t, ts, loginOpts{isid: 5, tsih: a.tsih, cid: 1, cmdSN: a.cmdSN + 32, maxConns: 2})
	if ts.srv.Sessions() != 1 {
		t.Fatalf("sessions = %d", ts.srv.Sessions())
	}
	w := pattern(512, 9)
	if r := mustCmd(t, b, rw10(0x2a, 3, 1), w, 512, false); r.status != 0 {
		t.Fatalf("write on conn 2: %#x", r.status)
	}
	r := mustCmd(t, a, rw10(0x28, 3, 1), nil, 512, true)
	if r.status != 0 || !bytes.Equal(r.data, w) {
		t.Fatalf("read on conn 1: %#x", r.status)
	}
	if _, err := dialInitiator(t, ts.addr, loginOpts{target: testTarget, isid: 5, tsih: a.tsih, cid: 2, maxConns: 2}); err != loginStatus(loginTooManyConns) {
		t.Fatalf("third connection: %v", err)
	}
	a.nc.Close()
	b.nc.Close()
	waitFor(t, "session end", func() bool { return ts.srv.Sessions() == 0 && ts.cat.Opened("disk") == 0 })
}

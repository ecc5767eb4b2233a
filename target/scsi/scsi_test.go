package scsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"

	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
)

const testBlocks = 2048

func newTestLU(t testing.TB, ro bool) (*LU, *blockdevtest.Memory) {
	t.Helper()
	dev := blockdevtest.NewMemory(target.Geometry{Size: testBlocks * 512, BlockSize: 512, ReadOnly: ro})
	lu, err := NewLU(context.Background(), target.Export{Name: "disk", ID: "vol-0001"}, NewMemoryPRStore())
	if err != nil {
		t.Fatal(err)
	}
	return lu, dev
}

func b16(op byte, lba uint64, n uint32, flags byte) []byte {
	c := make([]byte, 16)
	c[0], c[1] = op, flags
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], n)
	return c
}

func b10(op byte, lba uint32, n uint16, flags byte) []byte {
	c := make([]byte, 10)
	c[0], c[1] = op, flags
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], n)
	return c
}

func b12(op byte, lba, n uint32, flags byte) []byte {
	c := make([]byte, 12)
	c[0], c[1] = op, flags
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint32(c[6:], n)
	return c
}

func b6(op byte, b4 byte) []byte { return []byte{op, 0, 0, 0, b4, 0} }

func senseOf(t *Task) (byte, uint16) {
	s := t.Sense[:t.SenseLen]
	if len(s) == 0 {
		return 0, 0
	}
	if s[0]&0x7f == 0x72 {
		return s[1], uint16(s[2])<<8 | uint16(s[3])
	}
	return s[2], uint16(s[12])<<8 | uint16(s[13])
}

type step struct {
	name   string // spec section and case
	cdb    []byte
	out    []byte
	in     int // DataIn room
	status Status
	key    byte
	asc    uint16
	want   int // expected Want (-1: don't check)
}

func run(t *testing.T, lu *LU, dev target.BlockDevice, n Nexus, steps []step) {
	t.Helper()
	for _, s := range steps {
		tk := &Task{CDB: s.cdb, DataOut: s.out, DataIn: make([]byte, s.in), Nexus: n}
		lu.Execute(context.Background(), dev, tk)
		key, asc := senseOf(tk)
		if tk.Status != s.status || key != s.key || asc != s.asc {
			t.Errorf("%s: got status %#x sense %#x/%#04x, want %#x %#x/%#04x", s.name, tk.Status, key, asc, s.status, s.key, s.asc)
		}
		if s.want >= 0 && tk.Want != s.want {
			t.Errorf("%s: Want = %d, want %d", s.name, tk.Want, s.want)
		}
	}
}

var nexusA = Nexus{Initiator: "iqn.a,i,0x000000000001", Port: 1}
var nexusB = Nexus{Initiator: "iqn.b,i,0x000000000002", Port: 1}

const (
	good = StatusGood
	cc   = StatusCheckCondition
	rc   = StatusReservationConflict
)

func TestSBC3_5_ReadWriteTranscript(t *testing.T) {
	lu, dev := newTestLU(t, false)
	blk := bytes.Repeat([]byte{0xab}, 512)
	run(t, lu, dev, nexusA, []step{
		{"SPC-4 6.37 TEST UNIT READY", make([]byte, 6), nil, 0, good, 0, 0, 0},
		{"SPC-4 D invalid opcode", []byte{0xff, 0, 0, 0, 0, 0}, nil, 0, cc, senseIllegal, ascInvalidOpcode, -1},
		{"SBC-3 5.9 READ(10)", b10(opRead10, 0, 1, 0), nil, 512, good, 0, 0, 512},
		{"SBC-3 5.9 READ(10) 0 blocks", b10(opRead10, 0, 0, 0), nil, 0, good, 0, 0, 0},
		{"SBC-3 5.9 READ(10) past end", b10(opRead10, testBlocks-1, 2, 0), nil, 1024, cc, senseIllegal, ascLBAOutOfRange, -1},
		{"SBC-3 5.9 READ(10) RDPROTECT", b10(opRead10, 0, 1, 0x20), nil, 512, cc, senseIllegal, ascInvalidFieldCDB, -1},
		{"SBC-3 5.9 READ(10) DPO FUA", b10(opRead10, 0, 1, 0x18), nil, 512, good, 0, 0, 512},
		{"SBC-3 5.11 READ(16) past end", b16(opRead16, testBlocks, 1, 0), nil, 512, cc, senseIllegal, ascLBAOutOfRange, -1},
		{"SBC-3 5.10 READ(12)", b12(opRead12, 1, 2, 0), nil, 1024, good, 0, 0, 1024},
		{"SBC-3 5.8 READ(6) 0 means 256", []byte{opRead6, 0, 0, 0, 0, 0}, nil, 256 * 512, good, 0, 0, 256 * 512},
		{"SBC-3 5.32 WRITE(10)", b10(opWrite10, 5, 1, 0), blk, 0, good, 0, 0, 512},
		{"SBC-3 5.32 WRITE(10) FUA", b10(opWrite10, 5, 1, 0x08), blk, 0, good, 0, 0, 512},
		{"SBC-3 5.32 WRITE(10) WRPROTECT", b10(opWrite10, 5, 1, 0x20), blk, 0, cc, senseIllegal, ascInvalidFieldCDB, -1},
		{"SBC-3 5.34 WRITE(16) past end", b16(opWrite16, testBlocks-1, 2, 0), append(blk, blk...), 0, cc, senseIllegal, ascLBAOutOfRange, -1},
		{"SBC-3 5.32 WRITE(10) overflow writes what came", b10(opWrite10, 6, 2, 0), blk, 0, good, 0, 0, 1024},
		{"SBC-3 5.24 VERIFY(10) BYTCHK=0", b10(opVerify10, 5, 1, 0), nil, 0, good, 0, 0, -1},
		{"SBC-3 5.24 VERIFY(10) BYTCHK=1 match", b10(opVerify10, 5, 1, 0x02), blk, 0, good, 0, 0, -1},
		{"SBC-3 5.24 VERIFY(10) BYTCHK=1 miscompare", b10(opVerify10, 5, 1, 0x02), make([]byte, 512), 0, cc, senseMiscompare, ascMiscompare, -1},
		{"SBC-3 5.24 VERIFY(10) past end", b10(opVerify10, testBlocks, 1, 0), nil, 0, cc, senseIllegal, ascLBAOutOfRange, -1},
		{"SBC-3 5.30 WRITE AND VERIFY(10)", b10(opWriteVerify10, 7, 1, 0), blk, 0, good, 0, 0, 512},
		{"SBC-3 5.18 SYNCHRONIZE CACHE(10)", b10(opSyncCache10, 0, 0, 0), nil, 0, good, 0, 0, 0},
		{"SBC-3 5.19 SYNCHRONIZE CACHE(16) past end", b16(opSyncCache16, testBlocks+1, 0, 0), nil, 0, cc, senseIllegal, ascLBAOutOfRange, -1},
		{"SBC-3 5.6 PRE-FETCH(10)", b10(opPrefetch10, 0, 8, 0), nil, 0, good, 0, 0, 0},
	})
	if dev.Flushes() != 1 {
		t.Errorf("flushes = %d, want 1", dev.Flushes())
	}
	got := make([]byte, 512)
	dev.ReadAt(context.Background(), got, 6*512)
	if !bytes.Equal(got, blk) {
		t.Error("overflowed WRITE(10) did not write its first block")
	}
}

func TestSBC3_5_2_CompareAndWrite(t *testing.T) {
	lu, dev := newTestLU(t, false)
	zero := make([]byte, 512)
	ones := bytes.Repeat([]byte{1}, 512)
	caw := func(n byte) []byte { c := b16(opCompareAndWrite, 10, 0, 0); c[13] = n; return c }
	run(t, lu, dev, nexusA, []step{
		{"5.2 compare zeros, write ones", caw(1), append(zero, ones...), 0, good, 0, 0, 1024},
		{"5.2 miscompare", caw(1), append(zero, ones...), 0, cc, senseMiscompare, ascMiscompare, -1},
		{"5.2 compare ones", caw(1), append(ones, zero...), 0, good, 0, 0, 1024},
		{"5.2 wrong Data-Out size", caw(1), zero, 0, cc, senseIllegal, ascInvalidFieldCDB, -1},
		{"5.2 0 blocks", caw(0), nil, 0, good, 0, 0, 0},
	})
	// Miscompare INFORMATION is the offset of the first differing byte.
	tk := &Task{CDB: caw(1), DataOut: append(append(make([]byte, 100), 9), make([]byte, 923)...)}
	lu.Execute(context.Background(), dev, tk)
	if tk.Sense[0] != 0xf0 || binary.BigEndian.Uint32(tk.Sense[3:]) != 100 {
		t.Errorf("miscompare sense % x", tk.Sense[:tk.SenseLen])
	}
}

func TestSBC3_5_28_UnmapAndGetLBAStatus(t *testing.T) {
	lu, dev := newTestLU(t, false)
	blk := bytes.Repeat([]byte{7}, 8*512)
	param := func(lba uint64, n uint32) []byte {
		p := make([]byte, 24)
		binary.BigEndian.PutUint16(p[0:], 22)
		binary.BigEndian.PutUint16(p[2:], 16)
		binary.BigEndian.PutUint64(p[8:], lba)
		binary.BigEndian.PutUint32(p[16:], n)
		return p
	}
	unmap := func(n uint16) []byte {
		c := make([]byte, 10)
		c[0] = opUnmap
		binary.BigEndian.PutUint16(c[7:], n)
		return c
	}
	gls := func(lba uint64) []byte {
		c := b16(opServiceIn16, lba, 0, saGetLBAStatus)
		binary.BigEndian.PutUint32(c[10:], 64)
		return c
	}
	run(t, lu, dev, nexusA, []step{
		{"5.32 write 8 blocks", b10(opWrite10, 0, 8, 0), blk, 0, good, 0, 0, -1},
		{"5.28 UNMAP blocks 2..3", unmap(24), param(2, 2), 0, good, 0, 0, -1},
		{"5.28 UNMAP past end", unmap(24), param(testBlocks-1, 2), 0, cc, senseIllegal, ascLBAOutOfRange, -1},
		{"5.28 UNMAP short list", unmap(4), param(0, 1)[:4], 0, cc, senseIllegal, ascParamListLength, -1},
		{"5.4 GET LBA STATUS past end", gls(testBlocks), nil, 64, cc, senseIllegal, ascLBAOutOfRange, -1},
	})
	tk := &Task{CDB: gls(0), DataIn: make([]byte, 64)}
	lu.Execute(context.Background(), dev, tk)
	d := tk.DataIn[:tk.InLen]
	if tk.Status != good || len(d) < 8+3*16 {
		t.Fatalf("GET LBA STATUS: %#x % x", tk.Status, d)
	}
	wantDesc := []struct {
		lba  uint64
		n    uint32
		prov byte
	}{{0, 2, 0}, {2, 2, 1}, {4, 4, 0}}
	for i, w := range wantDesc {
		e := d[8+16*i:]
		if binary.BigEndian.Uint64(e) != w.lba || binary.BigEndian.Uint32(e[8:]) != w.n || e[12] != w.prov {
			t.Errorf("descriptor %d: % x, want %+v", i, e[:16], w)
		}
	}
}

func TestSBC3_5_42_WriteSame(t *testing.T) {
	lu, dev := newTestLU(t, false)
	pat := bytes.Repeat([]byte{0x5a}, 512)
	ws16 := func(lba uint64, n uint32, flags byte) []byte { return b16(opWriteSame16, lba, n, flags) }
	run(t, lu, dev, nexusA, []step{
		{"5.43 expand pattern", ws16(0, 16, 0), pat, 0, good, 0, 0, 512},
		{"5.43 zeros -> WriteZeroes", ws16(16, 16, 0), make([]byte, 512), 0, good, 0, 0, 512},
		{"5.43 UNMAP -> Trim", ws16(32, 16, 0x08), pat, 0, good, 0, 0, 512},
		{"5.43 wrong Data-Out size", ws16(0, 1, 0), append(pat, pat...), 0, cc, senseIllegal, ascInvalidFieldCDB, -1},
		{"5.43 ANCHOR unsupported", ws16(0, 1, 0x18), pat, 0, cc, senseIllegal, ascInvalidFieldCDB, -1},
		{"5.43 past end", ws16(testBlocks-1, 2, 0), pat, 0, cc, senseIllegal, ascLBAOutOfRange, -1},
		{"5.42 WRITE SAME(10)", b10(opWriteSame10, 100, 4, 0), pat, 0, good, 0, 0, 512},
	})
	ext, _ := dev.Map(context.Background(), 0, 48*512)
	want := []target.Extent{{Off: 0, Len: 16 * 512, Kind: target.ExtentData}, {Off: 16 * 512, Len: 16 * 512, Kind: target.ExtentZero}, {Off: 32 * 512, Len: 16 * 512, Kind: target.ExtentHole}}
	if len(ext) != 3 || ext[0] != want[0] || ext[1] != want[1] || ext[2] != want[2] {
		t.Errorf("map %+v, want %+v", ext, want)
	}
}

func TestSBC3_ReadOnly(t *testing.T) {
	lu, dev := newTestLU(t, true)
	run(t, lu, dev, nexusA, []step{
		{"5.32 WRITE(10) on read-only", b10(opWrite10, 0, 1, 0), make([]byte, 512), 0, cc, senseDataProtect, ascWriteProtected, -1},
		{"5.9 READ(10) on read-only", b10(opRead10, 0, 1, 0), nil, 512, good, 0, 0, 512},
	})
}

func TestSPC4_6_6_Inquiry(t *testing.T) {
	lu, dev := newTestLU(t, false)
	inq := func(evpd byte, page byte, alloc uint16) []byte {
		c := []byte{opInquiry, evpd, page, 0, 0, 0}
		binary.BigEndian.PutUint16(c[3:], alloc)
		return c
	}
	run(t, lu, dev, nexusA, []step{
		{"6.6.2 standard", inq(0, 0, 96), nil, 96, good, 0, 0, 66},
		{"6.6.2 short allocation", inq(0, 0, 5), nil, 5, good, 0, 0, 5},
		{"6.6 page code without EVPD", inq(0, 0x80, 96), nil, 96, cc, senseIllegal, ascInvalidFieldCDB, -1},
		{"7.8.2 supported pages", inq(1, 0, 255), nil, 255, good, 0, 0, 10},
		{"7.8 unknown page", inq(1, 0x99, 255), nil, 255, cc, senseIllegal, ascInvalidFieldCDB, -1},
	})
	tk := &Task{CDB: inq(1, 0x80, 255), DataIn: make([]byte, 255)}
	lu.Execute(context.Background(), dev, tk)
	if got := string(tk.DataIn[4:tk.InLen]); got != "vol-0001" {
		t.Errorf("serial = %q", got)
	}
	tk = &Task{CDB: inq(1, 0x83, 255), DataIn: make([]byte, 255)}
	lu.Execute(context.Background(), dev, tk)
	if d := tk.DataIn; d[4+1]&0x0f != 3 || d[4+4]>>4 != 6 {
		t.Errorf("first designator is not NAA 6: % x", d[:24])
	}
	tk = &Task{CDB: inq(1, 0xb2, 255), DataIn: make([]byte, 255)}
	lu.Execute(context.Background(), dev, tk)
	if tk.DataIn[5]&0xe4 != 0xe4 {
		t.Errorf("LBP page: LBPU/LBPWS/LBPWS10/LBPRZ not set: % x", tk.DataIn[:8])
	}
	// A LUN other than 0: peripheral qualifier 3.
	tk = &Task{LUN: 3, CDB: inq(0, 0, 36), DataIn: make([]byte, 36)}
	lu.Execute(context.Background(), dev, tk)
	if tk.Status != good || tk.DataIn[0] != 0x7f {
		t.Errorf("LUN 3 inquiry: %#x % x", tk.Status, tk.DataIn[:1])
	}
	tk = &Task{LUN: 3, CDB: make([]byte, 6)}
	lu.Execute(context.Background(), dev, tk)
	if k, asc := senseOf(tk); k != senseIllegal || asc != ascLUNotSupported {
		t.Errorf("LUN 3 TUR: %#x/%#x", k, asc)
	}
}

func TestSBC3_5_16_ReadCapacity(t *testing.T) {
	lu, dev := newTestLU(t, false)
	tk := &Task{CDB: b16(opServiceIn16, 0, 32, saReadCapacity16), DataIn: make([]byte, 32)}
	lu.Execute(context.Background(), dev, tk)
	d := tk.DataIn
	if binary.BigEndian.Uint64(d) != testBlocks-1 || binary.BigEndian.Uint32(d[8:]) != 512 || d[14]&0xc0 != 0xc0 {
		t.Errorf("READ CAPACITY(16): % x", d)
	}
	tk = &Task{CDB: make([]byte, 10), DataIn: make([]byte, 8)}
	tk.CDB[0] = opReadCapacity10
	lu.Execute(context.Background(), dev, tk)
	if binary.BigEndian.Uint32(tk.DataIn) != testBlocks-1 {
		t.Errorf("READ CAPACITY(10): % x", tk.DataIn)
	}
}

func TestSPC4_6_11_ModeSenseSelect(t *testing.T) {
	lu, dev := newTestLU(t, false)
	ms6 := func(page byte) []byte { return []byte{opModeSense6, 0, page, 0, 255, 0} }
	run(t, lu, dev, nexusA, []step{
		{"6.11 all pages", ms6(0x3f), nil, 255, good, 0, 0, 4 + 8 + 12 + 20 + 12 + 12},
		{"6.11 caching page", ms6(0x08), nil, 255, good, 0, 0, 4 + 8 + 20},
		{"6.11 saved values", ms6(0xc8), nil, 255, cc, senseIllegal, ascSavingNotSupported, -1},
		{"6.11 unknown page", ms6(0x33), nil, 255, cc, senseIllegal, ascInvalidFieldCDB, -1},
	})
	tk := &Task{CDB: ms6(0x08), DataIn: make([]byte, 255)}
	lu.Execute(context.Background(), dev, tk)
	if tk.DataIn[4+8+2]&0x04 == 0 {
		t.Error("caching page WCE not set")
	}
	// Switch to descriptor sense with MODE SELECT(6) of the control page.
	tk = &Task{CDB: ms6(0x0a), DataIn: make([]byte, 255)}
	lu.Execute(context.Background(), dev, tk)
	page := append([]byte(nil), tk.DataIn[4+8:4+8+12]...)
	page[2] |= 0x04
	sel := append([]byte{0, 0, 0, 0}, page...)
	run(t, lu, dev, nexusA, []step{
		{"6.9 MODE SELECT(6) D_SENSE", []byte{opModeSelect6, 0x10, 0, 0, byte(len(sel)), 0}, sel, 0, good, 0, 0, -1},
	})
	tk = &Task{CDB: b10(opRead10, testBlocks, 1, 0), DataIn: make([]byte, 512)}
	lu.Execute(context.Background(), dev, tk)
	if tk.Sense[0] != 0x72 {
		t.Errorf("sense after D_SENSE=1: % x", tk.Sense[:tk.SenseLen])
	}
	bad := append([]byte(nil), sel...)
	bad[4+3] ^= 0x80 // a bit that is not changeable
	run(t, lu, dev, nexusA, []step{
		{"6.9 MODE SELECT(6) unchangeable bit", []byte{opModeSelect6, 0x10, 0, 0, byte(len(bad)), 0}, bad, 0, cc, senseIllegal, ascInvalidFieldParam, -1},
	})
}

func prOut(sa, typ byte, key, sakey uint64) ([]byte, []byte) {
	c := make([]byte, 10)
	c[0], c[1], c[2] = opPROut, sa, typ
	binary.BigEndian.PutUint32(c[5:], 24)
	p := make([]byte, 24)
	binary.BigEndian.PutUint64(p, key)
	binary.BigEndian.PutUint64(p[8:], sakey)
	return c, p
}

func prStep(name string, sa, typ byte, key, sakey uint64, st Status) step {
	c, p := prOut(sa, typ, key, sakey)
	return step{name, c, p, 0, st, 0, 0, -1}
}

func TestSPC4_5_12_PersistentReservations(t *testing.T) {
	lu, dev := newTestLU(t, false)
	blk := make([]byte, 512)
	w := step{"write", b10(opWrite10, 0, 1, 0), blk, 0, good, 0, 0, -1}
	r := step{"read", b10(opRead10, 0, 1, 0), nil, 512, good, 0, 0, -1}
	wc, rcf := w, r
	wc.status, rcf.status = rc, rc
	wc.name, rcf.name = "write conflicts", "read conflicts"
	run(t, lu, dev, nexusA, []step{
		prStep("5.12.4 A registers", 0, 0, 0, 0xa, good),
		prStep("5.12.4 A registers again with wrong key", 0, 0, 0x1, 0xb, rc),
		prStep("5.12.5 A reserves WE", 1, prWriteExclusive, 0xa, 0, good),
		w,
	})
	run(t, lu, dev, nexusB, []step{
		prStep("5.12.5 B unregistered cannot reserve", 1, prWriteExclusive, 0xb, 0, rc),
		wc, r,
		prStep("5.12.4 B registers", 0, 0, 0, 0xb, good),
		wc,
	})
	run(t, lu, dev, nexusA, []step{
		func() step {
			s := prStep("5.12.11 A releases with wrong type", 2, prExclusiveAccess, 0xa, 0, cc)
			s.key, s.asc = senseIllegal, ascInvalidPRRelease
			return s
		}(),
		prStep("5.12.11 A releases", 2, prWriteExclusive, 0xa, 0, good),
		prStep("5.12.5 A reserves EA", 1, prExclusiveAccess, 0xa, 0, good),
	})
	run(t, lu, dev, nexusB, []step{
		rcf,
		prStep("5.12.12 B preempts A", 4, prExclusiveAccessRO, 0xb, 0xa, good),
		w, r,
	})
	run(t, lu, dev, nexusA, []step{
		{"5.12.11.4 REGISTRATIONS PREEMPTED unit attention", make([]byte, 6), nil, 0, cc, senseUnitAttention, uaRegistrationsPreempted, -1},
		wc, rcf, prStep("A was unregistered", 1, prWriteExclusive, 0xa, 0, rc),
	})
	// READ KEYS shows only B; the state survives a new LU on the same store.
	store := lu.store
	lu2, err := NewLU(context.Background(), lu.info, store)
	if err != nil {
		t.Fatal(err)
	}
	c := []byte{opPRIn, 0, 0, 0, 0, 0, 0, 0, 255, 0}
	tk := &Task{CDB: c, DataIn: make([]byte, 255), Nexus: nexusB}
	lu2.Execute(context.Background(), dev, tk)
	if n := binary.BigEndian.Uint32(tk.DataIn[4:]); n != 8 || binary.BigEndian.Uint64(tk.DataIn[8:]) != 0xb {
		t.Errorf("READ KEYS after reload: % x", tk.DataIn[:16])
	}
	run(t, lu2, dev, nexusA, []step{rcf})
	run(t, lu2, dev, nexusB, []step{prStep("5.12.10 CLEAR", 3, 0, 0xb, 0, good)})
	run(t, lu2, dev, nexusA, []step{w})
}

func TestSPC2_7_21_Reserve6(t *testing.T) {
	lu, dev := newTestLU(t, false)
	w := step{"write", b10(opWrite10, 0, 1, 0), make([]byte, 512), 0, good, 0, 0, -1}
	wc := w
	wc.status = rc
	run(t, lu, dev, nexusA, []step{{"RESERVE(6)", b6(opReserve6, 0), nil, 0, good, 0, 0, -1}, w})
	run(t, lu, dev, nexusB, []step{wc, {"RESERVE(6) conflict", b6(opReserve6, 0), nil, 0, rc, 0, 0, -1}})
	lu.NexusLost(nexusA)
	run(t, lu, dev, nexusB, []step{w})
}

func TestSPC4_6_35_ReportSupportedOpcodes(t *testing.T) {
	lu, dev := newTestLU(t, false)
	c := make([]byte, 12)
	c[0], c[1] = opMaintenanceIn, saReportOpcodes
	binary.BigEndian.PutUint32(c[6:], 4096)
	tk := &Task{CDB: c, DataIn: make([]byte, 4096)}
	lu.Execute(context.Background(), dev, tk)
	n := int(binary.BigEndian.Uint32(tk.DataIn))
	if tk.Status != good || n%8 != 0 || n/8 < 40 {
		t.Fatalf("status %#x, %d bytes of descriptors", tk.Status, n)
	}
	c[2], c[3] = 1, opRead10 // one command
	tk = &Task{CDB: c, DataIn: make([]byte, 4096)}
	lu.Execute(context.Background(), dev, tk)
	if tk.DataIn[1]&0x07 != 3 || binary.BigEndian.Uint16(tk.DataIn[2:]) != 10 {
		t.Errorf("READ(10) support: % x", tk.DataIn[:6])
	}
}

func TestSPC4_6_33_ReportLUNsAndRequestSense(t *testing.T) {
	lu, dev := newTestLU(t, false)
	rl := make([]byte, 12)
	rl[0] = opReportLUNs
	binary.BigEndian.PutUint32(rl[6:], 64)
	run(t, lu, dev, nexusA, []step{
		{"6.33 REPORT LUNS", rl, nil, 64, good, 0, 0, 16},
		{"6.39 REQUEST SENSE", b6(opRequestSense, 18), nil, 18, good, 0, 0, 18},
	})
	lu.Attach(nexusA)
	lu.Reset(UALUNReset)
	run(t, lu, dev, nexusA, []step{
		{"SAM-5 5.14 UA on INQUIRY is not reported", []byte{opInquiry, 0, 0, 0, 36, 0}, nil, 36, good, 0, 0, 36},
		{"SAM-5 5.14 UA reported once", make([]byte, 6), nil, 0, cc, senseUnitAttention, UALUNReset, -1},
		{"SAM-5 5.14 then clear", make([]byte, 6), nil, 0, good, 0, 0, -1},
	})
}

// FuzzCDB runs arbitrary CDBs and data against a small device: nothing
// panics and results are self-consistent.
func FuzzCDB(f *testing.F) {
	f.Add(b10(opRead10, 0, 1, 0), []byte{}, uint16(512))
	f.Add(b16(opCompareAndWrite, 0, 0, 0), make([]byte, 1024), uint16(0))
	f.Add([]byte{opModeSelect6, 0x10, 0, 0, 16, 0}, make([]byte, 16), uint16(0))
	f.Add([]byte{opPROut, 0, 0, 0, 0, 0, 0, 0, 24, 0}, make([]byte, 24), uint16(0))
	f.Add(b16(opWriteSame16, 0, 0, 0x08), make([]byte, 512), uint16(0))
	f.Add([]byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, make([]byte, 24), uint16(0))
	f.Add([]byte{opMaintenanceIn, saReportOpcodes, 2, opServiceIn16, 0, saGetLBAStatus, 0, 0, 1, 0, 0, 0}, []byte{}, uint16(256))
	dev := blockdevtest.NewMemory(target.Geometry{Size: 64 * 512, BlockSize: 512})
	lu, _ := NewLU(context.Background(), target.Export{Name: "f", ID: "f"}, NewMemoryPRStore())
	f.Fuzz(func(t *testing.T, cdb, out []byte, in uint16) {
		tk := &Task{CDB: cdb, DataOut: out, DataIn: make([]byte, int(in)%8192), Nexus: nexusA}
		lu.Execute(context.Background(), dev, tk)
		if tk.InLen > len(tk.DataIn) || tk.SenseLen > len(tk.Sense) {
			t.Fatalf("InLen %d SenseLen %d", tk.InLen, tk.SenseLen)
		}
		if (tk.Status == StatusCheckCondition) != (tk.SenseLen > 0) {
			t.Fatalf("status %#x with %d sense bytes", tk.Status, tk.SenseLen)
		}
	})
}

// BenchmarkRead10 measures the device server's READ(10) path for 4 KiB;
// it must not allocate.
func BenchmarkRead10(b *testing.B) {
	lu, dev := newTestLU(b, false)
	tk := &Task{CDB: b10(opRead10, 8, 8, 0), DataIn: make([]byte, 4096), Nexus: nexusA}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		lu.Execute(context.Background(), dev, tk)
	}
}

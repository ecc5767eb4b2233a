package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
)

func TestRequestCodec(t *testing.T) {
	r := request{Flags: cmdFlagFUA, Type: cmdWrite, Cookie: 0x0102030405060708, Offset: 1 << 40, Length: 4096}
	b := appendRequest(nil, r)
	want := []byte{
		0x25, 0x60, 0x95, 0x13, // magic
		0x00, 0x01, // flags
		0x00, 0x01, // type
		1, 2, 3, 4, 5, 6, 7, 8, // cookie
		0, 0, 1, 0, 0, 0, 0, 0, // offset
		0, 0, 0x10, 0, // length
	}
	if !bytes.Equal(b, want) {
		t.Fatalf("encoded %x\nwant    %x", b, want)
	}
	got, err := parseRequest(b)
	if err != nil || got != r {
		t.Fatalf("parse = %+v, %v", got, err)
	}
	b[0] ^= 1
	if _, err := parseRequest(b); !errors.Is(err, errBadMagic) {
		t.Fatalf("bad magic: %v", err)
	}
}

func TestReplyCodec(t *testing.T) {
	var b [structuredReplySize]byte
	putSimpleReply(b[:], errnoNoSpc, 42)
	if want := []byte{0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 42}; !bytes.Equal(b[:16], want) {
		t.Errorf("simple reply %x", b[:16])
	}
	putChunk(b[:], replyFlagDone, replyOffsetData, 7, 520)
	if want := []byte{0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 2, 8}; !bytes.Equal(b[:], want) {
		t.Errorf("chunk %x", b[:])
	}
}

func TestErrnoTable(t *testing.T) {
	for _, tc := range []struct {
		err         error
		read, write uint32
	}{
		{nil, 0, 0},
		{target.ErrOutOfRange, errnoInval, errnoNoSpc},
		{fmt.Errorf("vol x: %w", target.ErrInvalid), errnoInval, errnoInval},
		{target.ErrNoSpace, errnoNoSpc, errnoNoSpc},
		{target.ErrReadOnly, errnoPerm, errnoPerm},
		{target.ErrNotSupported, errnoNotSup, errnoNotSup},
		{target.ErrIO, errnoIO, errnoIO},
		{errors.New("disk on fire"), errnoIO, errnoIO},
		{target.ErrClosed, errnoShutdown, errnoShutdown},
	} {
		if r, w := errno(tc.err, classRead), errno(tc.err, classWrite); r != tc.read || w != tc.write {
			t.Errorf("%v: read %d write %d, want %d %d", tc.err, r, w, tc.read, tc.write)
		}
	}
}

// fuaDevice records FUA writes.
type fuaDevice struct {
	*blockdevtest.Memory
	fua atomic.Int64
}

func (d *fuaDevice) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if fua {
		d.fua.Add(1)
	}
	return d.Memory.WriteAt(ctx, p, off, fua)
}

func (d *fuaDevice) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if fua {
		d.fua.Add(1)
	}
	return d.Memory.WriteZeroes(ctx, off, n, fua)
}

// replyOf reads the reply to a payload-free request in either mode.
func (c *rawClient) replyOf(structured bool) reply {
	c.t.Helper()
	if structured {
		return c.chunkOrSimple()
	}
	e, cookie := c.simpleReply()
	return reply{simple: true, errno: e, cookie: cookie}
}

// readBack reads n bytes at off and returns them, in either mode.
func (c *rawClient) readBack(structured bool, cookie, off uint64, n uint32) []byte {
	c.t.Helper()
	c.request(0, cmdRead, cookie, off, n, nil)
	if !structured {
		if e, ck := c.simpleReply(); e != 0 || ck != cookie {
			c.t.Fatalf("read: errno %d cookie %d", e, ck)
		}
		return c.read(int(n))
	}
	r := c.chunkOrSimple()
	if r.typ != replyOffsetData || r.cookie != cookie || r.flags != replyFlagDone ||
		binary.BigEndian.Uint64(r.data) != off || len(r.data) != 8+int(n) {
		c.t.Fatalf("read reply %+v", r)
	}
	return r.data[8:]
}

func TestTransmission_ReadWriteTrimZero(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			geo := target.Geometry{Size: 8 << 20, BlockSize: 4096}
			dev := &fuaDevice{Memory: blockdevtest.NewMemory(geo)}
			cat := newDevCatalog()
			cat.add("v", dev)
			ts := startServer(t, cat, Config{})
			c := connect(t, ts.addr, "v", structured)
			data := bytes.Repeat([]byte{1, 2, 3, 4, 5, 6, 7, 8}, 2048) // 16 KiB
			c.request(cmdFlagFUA, cmdWrite, 1, 8192, uint32(len(data)), data)
			if r := c.replyOf(structured); r.errno != 0 || r.cookie != 1 {
				t.Fatalf("write: %+v", r)
			}
			if dev.fua.Load() != 1 {
				t.Errorf("FUA not passed to the device")
			}
			if got := c.readBack(structured, 2, 8192, uint32(len(data))); !bytes.Equal(got, data) {
				t.Fatal("read back differs")
			}
			c.request(0, cmdTrim, 3, 8192, 4096, nil)
			c.request(cmdFlagNoHole|cmdFlagFastZero|cmdFlagFUA, cmdWriteZeroes, 4, 12288, 4096, nil)
			c.request(0, cmdCache, 5, 0, 1<<20, nil)
			c.request(0, cmdFlush, 6, 0, 0, nil)
			c.request(0, cmdWrite, 7, 0, 0, nil) // zero length: a no-op
			seen := map[uint64]bool{}
			for range 5 {
				r := c.replyOf(structured)
				if r.errno != 0 {
					t.Fatalf("reply %+v", r)
				}
				seen[r.cookie] = true
			}
			if len(seen) != 5 {
				t.Fatalf("cookies %v", seen)
			}
			want := append(make([]byte, 8192), data[8192:]...)
			if got := c.readBack(structured, 8, 8192, uint32(len(data))); !bytes.Equal(got, want) {
				t.Fatal("trim / write zeroes did not read back as zeros")
			}
			ext, _ := dev.Map(context.Background(), 8192, 16384)
			wantExt := []target.Extent{
				{Off: 8192, Len: 4096, Kind: target.ExtentHole},
				{Off: 12288, Len: 4096, Kind: target.ExtentZero},
				{Off: 16384, Len: 8192, Kind: target.ExtentData},
			}
			if fmt.Sprint(ext) != fmt.Sprint(wantExt) {
				t.Errorf("map %v, want %v", ext, wantExt)
			}
			if dev.Flushes() != 1 {
				t.Errorf("flushes %d", dev.Flushes())
			}
		})
	}
}

// TestErrorValues checks the error each bad request gets ("Error values")
// and that the connection goes on afterwards.
func TestErrorValues(t *testing.T) {
	geo := target.Geometry{Size: 1 << 20, BlockSize: 512}
	roGeo := geo
	roGeo.ReadOnly = true
	cat := newDevCatalog()
	cat.add("rw", blockdevtest.NewMemory(geo))
	cat.add("ro", blockdevtest.NewMemory(roGeo))
	faulty := blockdevtest.NewFaulty(blockdevtest.NewMemory(geo))
	cat.add("faulty", faulty)
	ts := startServer(t, cat, Config{})
	const end = 1 << 20
	type req struct {
		name    string
		export  string
		flags   uint16
		typ     uint16
		off     uint64
		length  uint32
		payload bool
		want    uint32
	}
	cases := []req{
		{"read past end", "rw", 0, cmdRead, end - 512, 1024, false, errnoInval},
		{"read at huge offset", "rw", 0, cmdRead, 1 << 63, 512, false, errnoInval},
		{"write past end", "rw", 0, cmdWrite, end - 512, 1024, true, errnoNoSpc},
		{"write starting past end", "rw", 0, cmdWrite, end, 512, true, errnoNoSpc},
		{"write zeroes past end", "rw", 0, cmdWriteZeroes, end, 512, false, errnoNoSpc},
		{"trim past end", "rw", 0, cmdTrim, end - 512, 1024, false, errnoInval},
		{"cache past end", "rw", 0, cmdCache, end, 512, false, errnoInval},
		{"misaligned read offset", "rw", 0, cmdRead, 100, 512, false, errnoInval},
		{"misaligned write length", "rw", 0, cmdWrite, 0, 100, true, errnoInval},
		{"misaligned trim", "rw", 0, cmdTrim, 512, 1000, false, errnoInval},
		{"read longer than max payload", "rw", 0, cmdRead, 0, MaxPayload + 512, false, errnoInval},
		{"unknown command", "rw", 0, 99, 0, 0, false, errnoInval},
		{"resize is not offered", "rw", 0, 8, 0, 0, false, errnoInval},
		{"unknown flag", "rw", 1 << 9, cmdRead, 0, 512, false, errnoInval},
		{"unknown flag on flush", "rw", cmdFlagNoHole, cmdFlush, 0, 0, false, errnoInval},
		{"NO_HOLE on write", "rw", cmdFlagNoHole, cmdWrite, 0, 512, true, errnoInval},
		{"FAST_ZERO on trim", "rw", cmdFlagFastZero, cmdTrim, 0, 512, false, errnoInval},
		{"DF without structured replies", "rw", cmdFlagDF, cmdRead, 0, 512, false, errnoInval},
		{"block status without structured replies", "rw", 0, cmdBlockStatus, 0, 512, false, errnoInval},
		{"write to read-only", "ro", 0, cmdWrite, 0, 512, true, errnoPerm},
		{"trim on read-only", "ro", 0, cmdTrim, 0, 512, false, errnoPerm},
		{"write zeroes on read-only", "ro", 0, cmdWriteZeroes, 0, 512, false, errnoPerm},
	}
	conns := map[string]*rawClient{"rw": connect(t, ts.addr, "rw", false), "ro": connect(t, ts.addr, "ro", false)}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := conns[tc.export]
			c.t = t
			var payload []byte
			if tc.payload {
				payload = make([]byte, tc.length)
			}
			c.request(tc.flags, tc.typ, 77, tc.off, tc.length, payload)
			if e, cookie := c.simpleReply(); e != tc.want || cookie != 77 {
				t.Fatalf("errno %d cookie %d, want errno %d", e, cookie, tc.want)
			}
			c.request(0, cmdFlush, 78, 0, 0, nil)
			if e, _ := c.simpleReply(); e != 0 {
				t.Fatalf("connection unusable after the error: flush errno %d", e)
			}
		})
	}

	t.Run("device errors", func(t *testing.T) {
		c := connect(t, ts.addr, "faulty", true)
		faulty.Fail(blockdevtest.OpRead, fmt.Errorf("sled 3: %w", target.ErrIO))
		faulty.Fail(blockdevtest.OpWrite, target.ErrNoSpace)
		faulty.Fail(blockdevtest.OpFlush, errors.New("unlisted"))
		faulty.Fail(blockdevtest.OpWriteZeroes, target.ErrNotSupported)
		c.request(0, cmdRead, 1, 0, 512, nil)
		r := c.chunkOrSimple()
		if r.typ != replyError || r.errno != errnoIO || r.flags != replyFlagDone {
			t.Fatalf("read: %+v", r)
		}
		if ml := binary.BigEndian.Uint16(r.data[4:]); !bytes.Contains(r.data[6:6+ml], []byte("sled 3")) {
			t.Errorf("error message %q", r.data[6:])
		}
		c.request(0, cmdWrite, 2, 0, 512, make([]byte, 512))
		if r := c.chunkOrSimple(); r.errno != errnoNoSpc {
			t.Fatalf("write: %+v", r)
		}
		c.request(0, cmdFlush, 3, 0, 0, nil)
		if r := c.chunkOrSimple(); r.errno != errnoIO {
			t.Fatalf("flush: %+v", r)
		}
		// FAST_ZERO: fail fast with ENOTSUP; without it, fall back.
		c.request(cmdFlagFastZero, cmdWriteZeroes, 4, 0, 512, nil)
		if r := c.chunkOrSimple(); r.errno != errnoNotSup {
			t.Fatalf("fast zero: %+v", r)
		}
		faulty.Fail(blockdevtest.OpWrite, nil)
		c.request(0, cmdWriteZeroes, 5, 0, 512, nil)
		if r := c.chunkOrSimple(); r.errno != 0 {
			t.Fatalf("write zeroes fallback: %+v", r)
		}
		faulty.Fail(blockdevtest.OpMap, target.ErrIO)
		c.request(0, cmdBlockStatus, 6, 0, 512, nil)
		if r := c.chunkOrSimple(); r.errno != errnoIO {
			t.Fatalf("block status: %+v", r)
		}
	})
}

func TestBlockStatus(t *testing.T) {
	geo := target.Geometry{Size: 1 << 20, BlockSize: 512}
	mem := blockdevtest.NewMemory(geo)
	ctx := context.Background()
	mem.WriteAt(ctx, make([]byte, 4096), 4096, false)
	mem.WriteZeroes(ctx, 8192, 4096, false)
	cat := newDevCatalog()
	cat.add("mapped", mem)
	cat.add("plain", struct{ target.BlockDevice }{mem}) // hides Map
	ts := startServer(t, cat, Config{})

	c := connect(t, ts.addr, "mapped", true)
	descs := func(r reply) [][2]uint32 {
		t.Helper()
		if r.typ != replyBlockStatus || r.flags != replyFlagDone || (len(r.data)-4)%8 != 0 {
			t.Fatalf("block status reply %+v", r)
		}
		var out [][2]uint32
		for d := r.data[4:]; len(d) > 0; d = d[8:] {
			out = append(out, [2]uint32{binary.BigEndian.Uint32(d), binary.BigEndian.Uint32(d[4:])})
		}
		return out
	}
	c.request(0, cmdBlockStatus, 1, 0, 16384, nil)
	want := [][2]uint32{{4096, 3}, {4096, 0}, {4096, 2}, {4096, 3}}
	if got := descs(c.chunkOrSimple()); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("extents %v, want %v", got, want)
	}
	c.request(cmdFlagReqOne, cmdBlockStatus, 2, 4096, 1024, nil)
	if got := descs(c.chunkOrSimple()); fmt.Sprint(got) != "[[1024 0]]" {
		t.Errorf("REQ_ONE extents %v", got)
	}
	c.request(0, cmdBlockStatus, 9, 4096, 1<<20-4096-100, nil) // a hint: rounded down
	if got := descs(c.chunkOrSimple()); fmt.Sprint(got[:3]) != "[[4096 0] [4096 2] [1035776 3]]" {
		t.Errorf("unaligned length: %v", got)
	}
	c.request(0, cmdBlockStatus, 3, 1<<20-512, 1024, nil)
	if r := c.chunkOrSimple(); r.typ != replyError || r.errno != errnoInval {
		t.Errorf("past end: %+v", r)
	}
	c.request(0, cmdBlockStatus, 4, 0, 0, nil)
	if r := c.chunkOrSimple(); r.errno != errnoInval {
		t.Errorf("zero length: %+v", r)
	}

	p := connect(t, ts.addr, "plain", true)
	p.request(0, cmdBlockStatus, 1, 0, 16384, nil)
	if got := descs(p.chunkOrSimple()); fmt.Sprint(got) != "[[16384 0]]" {
		t.Errorf("device without map: %v", got)
	}
}

// TestPipelining sends many requests before reading any reply, with a
// small in-flight bound so the reader blocks and resumes.
func TestPipelining(t *testing.T) {
	cat, _ := memCatalog("v", target.Geometry{Size: 4 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{MaxInFlight: 4})
	c := connect(t, ts.addr, "v", false)
	const n = 300
	go c.nc.Write(numberedWrites(n, nil)) // errors surface as missing replies
	seen := make([]bool, n)
	for range n {
		e, cookie := c.simpleReply()
		if e != 0 || cookie >= n || seen[cookie] {
			t.Fatalf("reply errno %d cookie %d", e, cookie)
		}
		seen[cookie] = true
	}
	checkNumbered(c, n)
}

// numberedWrites is n pipelined 4 KiB WRITEs, write i (cookie i) at 4 KiB
// block i holding the number i in its first 8 bytes; flags(i), if given,
// are write i's flags.
func numberedWrites(n int, flags func(i int) uint16) []byte {
	var b []byte
	for i := range n {
		r := request{Type: cmdWrite, Cookie: uint64(i), Offset: uint64(i) * 4096, Length: 4096}
		if flags != nil {
			r.Flags = flags(i)
		}
		blk := make([]byte, 4096)
		binary.BigEndian.PutUint64(blk, uint64(i))
		b = append(appendRequest(b, r), blk...)
	}
	return b
}

// checkNumbered reads back the first n blocks numberedWrites wrote.
func checkNumbered(c *rawClient, n int) {
	c.t.Helper()
	for i := range n {
		if got := binary.BigEndian.Uint64(c.readBack(false, 1, uint64(i)*4096, 512)); got != uint64(i) {
			c.t.Fatalf("block %d holds %d", i, got)
		}
	}
}

// TestManyConnections runs clients on disjoint ranges of one device at once
// (run with -race).
func TestManyConnections(t *testing.T) {
	const clients, ops, span = 12, 150, 256 << 10
	cat, _ := memCatalog("v", target.Geometry{Size: clients * span, BlockSize: 512})
	ts := startServer(t, cat, Config{})
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ct := &collectT{TB: t}
			c := connect(ct, ts.addr, "v", i%2 == 0)
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			shadow := make([]byte, span)
			base := uint64(i * span)
			for k := range ops {
				off := uint64(rng.IntN(span/512-8)) * 512
				n := uint32(512 * (1 + rng.IntN(8)))
				if rng.IntN(2) == 0 {
					data := make([]byte, n)
					for j := range data {
						data[j] = byte(rng.Uint32())
					}
					copy(shadow[off:], data)
					c.request(0, cmdWrite, uint64(k), base+off, n, data)
					if r := c.replyOf(i%2 == 0); r.errno != 0 {
						errs <- fmt.Errorf("client %d: write errno %d", i, r.errno)
						return
					}
				} else if got := c.readBack(i%2 == 0, uint64(k), base+off, n); !bytes.Equal(got, shadow[off:off+uint64(n)]) {
					errs <- fmt.Errorf("client %d op %d: read at %d differs from what it wrote", i, k, off)
					return
				}
			}
			c.request(0, cmdDisc, 0, 0, 0, nil)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	eventually(t, 10*time.Second, "all connections closed", func() bool { return ts.Connections() == 0 })
	if n := ts.cat.(*blockdevtest.Catalog).Opened("v"); n != 0 {
		t.Errorf("%d devices left open", n)
	}
}

// collectT lets helper Fatal calls from client goroutines end just that
// goroutine.
type collectT struct {
	testing.TB
}

func (c *collectT) Fatalf(format string, args ...any) {
	c.TB.Errorf(format, args...)
	runtime.Goexit()
}

func (c *collectT) Fatal(args ...any) {
	c.TB.Error(args...)
	runtime.Goexit()
}

// TestMalformedClientsDoNotDisturbOthers: bad magic, an oversized write and
// garbage in the handshake each close only their own connection.
func TestMalformedClientsDoNotDisturbOthers(t *testing.T) {
	cat, _ := memCatalog("v", target.Geometry{Size: 1 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{})
	good := connect(t, ts.addr, "v", true)
	ping := func(cookie uint64) {
		t.Helper()
		good.request(0, cmdWrite, cookie, 0, 512, bytes.Repeat([]byte{byte(cookie)}, 512))
		if r := good.chunkOrSimple(); r.errno != 0 || r.cookie != cookie {
			t.Fatalf("good client: %+v", r)
		}
	}
	ping(1)

	bad := connect(t, ts.addr, "v", false)
	bad.write(bytes.Repeat([]byte{0xff}, requestSize))
	bad.expectEOF()
	ping(2)

	big := connect(t, ts.addr, "v", false)
	big.request(0, cmdWrite, 1, 0, MaxPayload+512, nil)
	big.expectEOF()
	ping(3)

	garbage := dial(t, ts.addr)
	garbage.read(18)
	garbage.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	garbage.expectEOF()
	ping(4)

	ext := connect(t, ts.addr, "v", false)
	ext.write(binary.BigEndian.AppendUint32(make([]byte, 0, 32), magicExtRequest))
	ext.write(make([]byte, 28))
	ext.expectEOF()
	ping(5)

	// Requests pipelined ahead of the bad one are still answered.
	mixed := connect(t, ts.addr, "v", false)
	b := appendRequest(nil, request{Type: cmdFlush, Cookie: 9})
	b = append(b, bytes.Repeat([]byte{0xee}, requestSize)...)
	mixed.write(b)
	if e, cookie := mixed.simpleReply(); e != 0 || cookie != 9 {
		t.Fatalf("flush before garbage: errno %d cookie %d", e, cookie)
	}
	mixed.expectEOF()
	ping(6)
	if got := good.readBack(true, 7, 0, 512); got[0] != 6 {
		t.Fatalf("read %d", got[0])
	}
}

// TestCloseDrainsInFlight: Close answers the requests already read, then
// hangs up, closes devices and joins every goroutine.
func TestCloseDrainsInFlight(t *testing.T) {
	geo := target.Geometry{Size: 1 << 20, BlockSize: 512}
	faulty := blockdevtest.NewFaulty(blockdevtest.NewMemory(geo))
	cat := newDevCatalog()
	cat.add("v", faulty)
	ts := startServer(t, cat, Config{})
	c := connect(t, ts.addr, "v", false)
	idle := dial(t, ts.addr) // still haggling when the server closes
	idle.greet(clientFixedNewstyle)

	release := faulty.Stall()
	defer release()
	c.request(0, cmdWrite, 1, 0, 512, bytes.Repeat([]byte{9}, 512))
	eventually(t, 10*time.Second, "write reached the device", func() bool { return faulty.Entered() == 1 })

	closed := make(chan struct{})
	go func() {
		ts.Close()
		close(closed)
	}()
	eventually(t, 10*time.Second, "server closing", ts.isClosed)
	idle.expectEOF()
	select {
	case <-closed:
		t.Fatal("Close returned with a request in flight")
	default:
	}
	release()
	if e, cookie := c.simpleReply(); e != 0 || cookie != 1 {
		t.Fatalf("in-flight write: errno %d cookie %d", e, cookie)
	}
	c.expectEOF()
	<-closed
	if n := cat.opened("v"); n != 0 {
		t.Errorf("%d devices open after Close", n)
	}
	if n := ts.Connections(); n != 0 {
		t.Errorf("%d connections after Close", n)
	}
	got := make([]byte, 512)
	faulty.ReadAt(context.Background(), got, 0)
	if got[0] != 9 {
		t.Error("drained write not applied")
	}
}

func TestServeAfterCloseReturnsNil(t *testing.T) {
	cat, _ := memCatalog("v", target.Geometry{Size: 1 << 20, BlockSize: 512})
	s := NewServer(Config{Catalog: cat})
	s.Close()
	ts := startServer(t, cat, Config{})
	ts.Close()
	if err := <-ts.done; err != nil {
		t.Fatalf("Serve after Close: %v", err)
	}
	ts.done <- nil
}

// TestNoGoroutineLeft: after Close every goroutine of the server is gone,
// with connections in handshake and in transmission at the time.
func TestNoGoroutineLeft(t *testing.T) {
	before := runtime.NumGoroutine()
	cat, _ := memCatalog("v", target.Geometry{Size: 1 << 20, BlockSize: 512})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(Config{Catalog: cat})
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	var clients []*rawClient
	for i := range 6 {
		c := connect(t, ln.Addr().String(), "v", i%2 == 0)
		for k := range 8 {
			c.request(0, cmdRead, uint64(k), uint64(k)*512, 512, nil)
		}
		clients = append(clients, c)
	}
	half := dial(t, ln.Addr().String())
	half.greet(clientFixedNewstyle)
	eventually(t, 10*time.Second, "7 connections", func() bool { return s.Connections() == 7 })
	s.Close()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	for _, c := range append(clients, half) {
		c.nc.Close()
	}
	eventually(t, 10*time.Second, "goroutines back to the baseline", func() bool {
		return runtime.NumGoroutine() <= before
	})
}

// TestLargeRequestsBounded pipelines more 4 MiB writes than the large-buffer
// budget holds; they all complete (the reader waits, it does not fail).
func TestLargeRequestsBounded(t *testing.T) {
	const n, size = 40, 4 << 20 // 160 MiB of payload > maxBigInFlight
	cat, _ := memCatalog("v", target.Geometry{Size: 16 << 20, BlockSize: 4096})
	ts := startServer(t, cat, Config{})
	c := connect(t, ts.addr, "v", false)
	payload := bytes.Repeat([]byte{7}, size)
	go func() {
		for i := range n {
			b := appendRequest(nil, request{Type: cmdWrite, Cookie: uint64(i), Offset: uint64(i%4) * size, Length: size})
			if _, err := c.nc.Write(append(b, payload...)); err != nil {
				return
			}
		}
	}()
	for range n {
		if e, cookie := c.simpleReply(); e != 0 {
			t.Fatalf("write %d: errno %d", cookie, e)
		}
	}
}

// TestClientNotReadingRepliesIsBounded: a client that sends reads but never
// reads the replies makes the server stop executing requests (and, through
// TCP, stop reading them) instead of queueing replies without bound.
func TestClientNotReadingRepliesIsBounded(t *testing.T) {
	const n = 8000 // 32 MiB of replies; the requests fit in socket buffers
	faulty := blockdevtest.NewFaulty(blockdevtest.NewMemory(target.Geometry{Size: 1 << 20, BlockSize: 4096}))
	cat := newDevCatalog()
	cat.add("v", faulty)
	ts := startServer(t, cat, Config{})
	c := connect(t, ts.addr, "v", false)
	var b []byte
	for i := range n {
		b = appendRequest(b, request{Type: cmdRead, Cookie: uint64(i), Offset: uint64(i%256) * 4096, Length: 4096})
	}
	go c.nc.Write(b) // may block for good: the server stops reading
	eventually(t, 10*time.Second, "the server to start executing", func() bool { return faulty.Entered() > 100 })
	// A server queueing without bound would run all n reads within a
	// second even on a loaded machine; this one stalls once about
	// maxPending plus the socket buffers are full (about 1500 reads).
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if e := faulty.Entered(); e >= n {
			t.Fatalf("the server executed all %d reads while the client read no reply", e)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("stalled after %d reads", faulty.Entered())
	c.nc.Close()
}

// TestCloseGivesUpOnAStuckDevice: a device call that never returns on its
// own is cancelled after DrainTimeout and answered ESHUTDOWN.
func TestCloseGivesUpOnAStuckDevice(t *testing.T) {
	faulty := blockdevtest.NewFaulty(blockdevtest.NewMemory(target.Geometry{Size: 1 << 20, BlockSize: 512}))
	cat := newDevCatalog()
	cat.add("v", faulty)
	ts := startServer(t, cat, Config{DrainTimeout: 50 * time.Millisecond})
	c := connect(t, ts.addr, "v", true)
	release := faulty.Stall() // honours its context, nothing else
	defer release()
	c.request(0, cmdRead, 1, 0, 512, nil)
	eventually(t, 10*time.Second, "read reached the device", func() bool { return faulty.Entered() == 1 })
	ts.Close()
	if r := c.chunkOrSimple(); r.typ != replyError || r.errno != errnoShutdown {
		t.Fatalf("stuck read: %+v", r)
	}
	c.expectEOF()
}

// TestInlineFollowsLatency: READs move onto the reader once the device
// proves fast, and back to the workers when it turns slow; a slow device
// never runs inline, so pipelined requests still overlap.
func TestInlineFollowsLatency(t *testing.T) {
	geo := target.Geometry{Size: 1 << 20, BlockSize: 512}
	faulty := blockdevtest.NewFaulty(blockdevtest.NewMemory(geo))
	cat := newDevCatalog()
	cat.add("v", faulty)
	ts := startServer(t, cat, Config{InlineBelow: time.Millisecond})
	c := connect(t, ts.addr, "v", false)
	conn := ts.onlyConn(t)
	read, flush := &request{Type: cmdRead, Length: 512}, &request{Type: cmdFlush}
	if conn.fast(read, false) || conn.fast(flush, false) || conn.fast(read, true) {
		t.Fatal("a new connection runs requests inline before measuring")
	}
	for i := range 100 {
		c.readBack(false, uint64(i), 0, 512)
	}
	if !conn.fast(read, false) || conn.fast(&request{Type: cmdRead, Length: 2 << 20}, true) {
		t.Fatalf("reads at %v average still not inline", time.Duration(conn.lat[0].Load()))
	}
	// Pipelined inline reads: their corked replies all come out.
	var batch []byte
	for i := range 50 {
		batch = appendRequest(batch, request{Type: cmdRead, Cookie: uint64(500 + i), Offset: uint64(i) * 512, Length: 512})
	}
	c.write(batch)
	for range 50 {
		if e, _ := c.simpleReply(); e != 0 {
			t.Fatalf("pipelined read: errno %d", e)
		}
		c.read(512)
	}
	entered := faulty.Entered()
	// The device stalls: the next read runs inline and blocks the reader
	// until released; then the average jumps past the threshold.
	release := faulty.Stall()
	c.request(0, cmdRead, 1000, 0, 512, nil)
	eventually(t, 10*time.Second, "stalled read reached the device", func() bool { return faulty.Entered() == entered+1 })
	start := time.Now()
	eventually(t, 10*time.Second, "the stall to last 20ms", func() bool { return time.Since(start) > 20*time.Millisecond })
	release()
	if e, cookie := c.simpleReply(); e != 0 || cookie != 1000 {
		t.Fatalf("stalled read: errno %d cookie %d", e, cookie)
	}
	c.read(512)
	c.readBack(false, 1001, 0, 512) // the reader has recorded the sample
	if conn.fast(read, false) {
		t.Errorf("reads still inline after a %v average", time.Duration(conn.lat[0].Load()))
	}
	// Alone on the connection (queue depth 1), a few-millisecond average
	// still runs inline: there is nothing to overlap it with.
	if lat := time.Duration(conn.lat[0].Load()); lat < aloneFactor*time.Millisecond && !conn.fast(read, true) {
		t.Errorf("a lone read at a %v average not inline (bound %v)", lat, aloneFactor*time.Millisecond)
	}
}

// TestInlineFlushAlone: a FLUSH runs on the reader only alone on its
// connection and while recent ones took under aloneFlushFactor times
// Config.InlineBelow; a stall takes it back to the workers.
func TestInlineFlushAlone(t *testing.T) {
	faulty := blockdevtest.NewFaulty(blockdevtest.NewMemory(target.Geometry{Size: 1 << 20, BlockSize: 512}))
	cat := newDevCatalog()
	cat.add("v", faulty)
	ts := startServer(t, cat, Config{InlineBelow: 100 * time.Microsecond}) // flushes inline under 10 ms
	c := connect(t, ts.addr, "v", false)
	conn := ts.onlyConn(t)
	flush := &request{Type: cmdFlush}
	if conn.fast(flush, true) {
		t.Fatal("a new connection runs flushes inline before measuring")
	}
	for i := range 100 {
		c.request(0, cmdFlush, uint64(i), 0, 0, nil)
		if e, cookie := c.simpleReply(); e != 0 || cookie != uint64(i) {
			t.Fatalf("flush: errno %d cookie %d", e, cookie)
		}
	}
	if !conn.fast(flush, true) || conn.fast(flush, false) {
		t.Fatalf("at a %v average: a lone flush inline %v, one among others %v (want true, false)",
			time.Duration(conn.lat[latFlush].Load()), conn.fast(flush, true), conn.fast(flush, false))
	}
	entered := faulty.Entered()
	release := faulty.Stall()
	c.request(0, cmdFlush, 1000, 0, 0, nil)
	eventually(t, 10*time.Second, "stalled flush reached the device", func() bool { return faulty.Entered() == entered+1 })
	time.Sleep(200 * time.Millisecond)
	release()
	c.request(0, cmdFlush, 1001, 0, 0, nil) // answered after the reader recorded the stalled one
	for _, want := range []uint64{1000, 1001} {
		if e, cookie := c.simpleReply(); e != 0 || cookie != want {
			t.Fatalf("flush: errno %d cookie %d, want %d", e, cookie, want)
		}
	}
	if conn.fast(flush, true) {
		t.Errorf("flushes still inline at a %v average", time.Duration(conn.lat[latFlush].Load()))
	}
}

// TestInlineLargeReads: READs of largeRead bytes or more have their own
// average, per MiB, against Config.InlineLargeReadsBelow: they move onto the
// reader once the device serves them at memory speed and back when it
// stalls; small reads' average is not theirs; negative disables.
func TestInlineLargeReads(t *testing.T) {
	geo := target.Geometry{Size: 1 << 20, BlockSize: 512}
	faulty := blockdevtest.NewFaulty(blockdevtest.NewMemory(geo))
	cat := newDevCatalog()
	cat.add("v", faulty)
	ts := startServer(t, cat, Config{InlineBelow: -1, InlineLargeReadsBelow: 50 * time.Millisecond})
	c := connect(t, ts.addr, "v", false)
	conn := ts.onlyConn(t)
	large, small := &request{Type: cmdRead, Length: largeRead}, &request{Type: cmdRead, Length: 4096}
	if conn.fast(large, false) {
		t.Fatal("a new connection runs large reads inline before measuring")
	}
	for i := range 100 {
		c.readBack(false, uint64(i), 0, largeRead)
	}
	if !conn.fast(large, false) || conn.fast(small, false) {
		t.Fatalf("large reads at %v per MiB: inline %v (want true), small reads inline %v (want false: InlineBelow < 0)",
			time.Duration(conn.lat[latLargeRead].Load()), conn.fast(large, false), conn.fast(small, false))
	}
	// A stall of 200 ms on a 256 KiB read is 800 ms per MiB: past the bound.
	release := faulty.Stall()
	entered := faulty.Entered()
	c.request(0, cmdRead, 1000, 0, largeRead, nil)
	eventually(t, 10*time.Second, "stalled read reached the device", func() bool { return faulty.Entered() == entered+1 })
	time.Sleep(200 * time.Millisecond)
	release()
	if e, cookie := c.simpleReply(); e != 0 || cookie != 1000 {
		t.Fatalf("stalled read: errno %d cookie %d", e, cookie)
	}
	c.read(largeRead)
	c.readBack(false, 1001, 0, 512) // the reader has recorded the sample
	if conn.fast(large, false) {
		t.Errorf("large reads still inline after a %v per MiB average", time.Duration(conn.lat[latLargeRead].Load()))
	}

	off := startServer(t, cat, Config{InlineLargeReadsBelow: -1})
	c2 := connect(t, off.addr, "v", false)
	for i := range 50 {
		c2.readBack(false, uint64(i), 0, largeRead)
	}
	if off.onlyConn(t).fast(large, false) {
		t.Error("large reads inline with InlineLargeReadsBelow < 0")
	}
}

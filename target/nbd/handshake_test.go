package nbd

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
)

// Transcript tests of option haggling, named after the sections of
// doc/proto.md they check.

func handshakeServer(t *testing.T) *testServer {
	t.Helper()
	cat, _ := memCatalog("vol1", target.Geometry{Size: 1 << 20, BlockSize: 512})
	cat.Add("vol2", "id-vol2", blockdevtest.NewMemory(target.Geometry{Size: 4096, BlockSize: 512})) // listed only; never opened here
	return startServer(t, cat, Config{})
}

func TestNewstyleNegotiation_Greeting(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	if f := c.greet(clientFixedNewstyle); f != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x, want FIXED_NEWSTYLE|NO_ZEROES", f)
	}
}

func TestClientFlags_UnknownFlagDropsConnection(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle | 1<<7)
	c.expectEOF()
}

func TestFixedNewstyle_BadOptionMagicDropsConnection(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.write(bytes.Repeat([]byte{0x42}, optHeaderSize))
	c.expectEOF()
}

func TestOptionTypes_UnknownOptionThenGo(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	c.option(4242, []byte("some data the server must skip"))
	c.expectReply(4242, repErrUnsup)
	c.option(optPeekExport, nil)
	c.expectReply(optPeekExport, repErrUnsup)
	c.option(optStartTLS, nil)
	c.expectReply(optStartTLS, repErrUnsup)
	size, flags := c.goExport("vol1")
	if size != 1<<20 {
		t.Errorf("size %d", size)
	}
	want := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeros |
		tflagSendFastZero | tflagSendCache | tflagCanMultiConn
	if flags != want {
		t.Errorf("transmission flags %#x, want %#x", flags, want)
	}
	c.request(0, cmdRead, 7, 0, 512, nil)
	if e, cookie := c.simpleReply(); e != 0 || cookie != 7 {
		t.Fatalf("read: errno %d cookie %d", e, cookie)
	}
	if d := c.read(512); !bytes.Equal(d, make([]byte, 512)) {
		t.Fatal("unwritten block not zero")
	}
}

func TestOptExportName_Fallback(t *testing.T) {
	ts := handshakeServer(t)
	for _, noZeroes := range []bool{false, true} {
		c := dial(t, ts.addr)
		flags := clientFixedNewstyle
		if noZeroes {
			flags |= clientNoZeroes
		}
		c.greet(flags)
		// A client trying GO on an old server would fall back; here it
		// goes straight to EXPORT_NAME.
		c.option(optExportName, []byte("vol1"))
		b := c.read(10)
		if size := binary.BigEndian.Uint64(b); size != 1<<20 {
			t.Fatalf("size %d", size)
		}
		if f := binary.BigEndian.Uint16(b[8:]); f&tflagSendDF != 0 || f&tflagHasFlags == 0 {
			t.Fatalf("flags %#x", f)
		}
		if !noZeroes {
			if z := c.read(124); !bytes.Equal(z, make([]byte, 124)) {
				t.Fatal("padding not zero")
			}
		}
		c.request(0, cmdFlush, 9, 0, 0, nil)
		if e, cookie := c.simpleReply(); e != 0 || cookie != 9 {
			t.Fatalf("flush: errno %d cookie %d", e, cookie)
		}
	}
}

func TestOptExportName_UnknownExportHangsUp(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optExportName, []byte("nope"))
	c.expectEOF()
	eventually(t, 10*time.Second, "handshake failure counted", func() bool {
		return metricValue(ts.metrics.handshakeFailures) == 1
	})
}

func TestOptInfo_ThenGo(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	c.option(optInfo, goData("vol1", infoName, infoDescription, infoBlockSize, 999))
	infos, fin := c.infoReplies(optInfo)
	if fin.typ != repAck {
		t.Fatalf("final %#x", fin.typ)
	}
	if got := string(infos[infoName]); got != "vol1" {
		t.Errorf("NBD_INFO_NAME %q", got)
	}
	if _, ok := infos[infoDescription]; ok {
		t.Errorf("empty description sent")
	}
	bs := infos[infoBlockSize]
	if len(bs) != 12 || binary.BigEndian.Uint32(bs[0:]) != 512 || binary.BigEndian.Uint32(bs[4:]) != 4096 ||
		binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
		t.Errorf("NBD_INFO_BLOCK_SIZE %x", bs)
	}
	if ts.cat.(interface{ Opened(string) int }).Opened("vol1") != 0 {
		t.Error("NBD_OPT_INFO left the device open")
	}
	// Still haggling: GO works afterwards.
	c.goExport("vol1")
	eventually(t, 10*time.Second, "device opened", func() bool {
		return ts.cat.(interface{ Opened(string) int }).Opened("vol1") == 1
	})
	c.request(0, cmdDisc, 1, 0, 0, nil)
	c.expectEOF()
	eventually(t, 10*time.Second, "device closed after NBD_CMD_DISC", func() bool {
		return ts.cat.(interface{ Opened(string) int }).Opened("vol1") == 0
	})
}

func TestOptInfo_MalformedIsInvalid(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	for _, data := range [][]byte{
		nil,
		{0, 0, 0, 9, 'v', 'o', 'l', '1', 0, 0}, // name length past the data
		append(goData("vol1"), 0),              // trailing byte
		append(goData("vol1", 1, 2)[:10], 0, 2, 0), // count says 2, one given
	} {
		c.option(optGo, data)
		c.expectReply(optGo, repErrInvalid)
	}
	c.goExport("vol1")
}

func TestOptGo_UnknownExport(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optGo, goData("missing"))
	r := c.expectReply(optGo, repErrUnknown)
	if !bytes.Contains(r.data, []byte("missing")) {
		t.Errorf("error message %q", r.data)
	}
	c.option(optInfo, goData("missing"))
	c.expectReply(optInfo, repErrUnknown)
	c.goExport("vol1")
}

func TestOptGo_DefaultExportWhenOnlyOne(t *testing.T) {
	cat, _ := memCatalog("only", target.Geometry{Size: 1 << 20, BlockSize: 4096})
	ts := startServer(t, cat, Config{})
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optStructuredReply, nil)
	c.expectReply(optStructuredReply, repAck)
	c.option(optSetMetaContext, metaData("", metaAllocation))
	c.expectReply(optSetMetaContext, repMetaContext)
	c.expectReply(optSetMetaContext, repAck)
	c.option(optGo, goData("", infoName))
	infos, fin := c.infoReplies(optGo)
	if fin.typ != repAck || string(infos[infoName]) != "only" {
		t.Fatalf("default export: %#x name %q", fin.typ, infos[infoName])
	}
	c.request(0, cmdBlockStatus, 1, 0, 4096, nil)
	if r := c.chunkOrSimple(); r.typ != replyBlockStatus {
		t.Fatalf("block status on the default export: %+v", r)
	}
}

func TestOptList(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optList, nil)
	var names []string
	for {
		r := c.optReply()
		if r.typ == repAck {
			break
		}
		if r.typ != repServer {
			t.Fatalf("reply %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+n]))
	}
	if len(names) != 2 || names[0] != "vol1" || names[1] != "vol2" {
		t.Fatalf("exports %q", names)
	}
	c.option(optList, []byte("x"))
	c.expectReply(optList, repErrInvalid)
}

func TestOptAbort(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optAbort, []byte("ignored"))
	c.expectReply(optAbort, repAck)
	c.expectEOF()
	eventually(t, 10*time.Second, "connection gone", func() bool { return ts.Connections() == 0 })
	if n := metricValue(ts.metrics.handshakeFailures); n != 0 {
		t.Errorf("abort counted as handshake failure (%v)", n)
	}
}

func TestStructuredReply_AndMetaContext(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)

	// Meta contexts need structured replies first.
	c.option(optSetMetaContext, metaData("vol1", metaAllocation))
	c.expectReply(optSetMetaContext, repErrInvalid)
	c.option(optListMetaContext, metaData("vol1"))
	c.expectReply(optListMetaContext, repErrInvalid)

	c.option(optStructuredReply, []byte{1})
	c.expectReply(optStructuredReply, repErrInvalid)
	c.option(optStructuredReply, nil)
	c.expectReply(optStructuredReply, repAck)

	// LIST with no query lists everything; "base:" is a wildcard.
	for _, q := range [][]string{nil, {"base:"}, {metaAllocation}, {"x-other:thing", "base:allocation"}} {
		c.option(optListMetaContext, metaData("vol1", q...))
		r := c.expectReply(optListMetaContext, repMetaContext)
		if id := binary.BigEndian.Uint32(r.data); id != 0 || string(r.data[4:]) != metaAllocation {
			t.Fatalf("LIST %q: context %d %q", q, id, r.data[4:])
		}
		c.expectReply(optListMetaContext, repAck)
	}
	// Unknown namespaces and leaves are ignored, not errors.
	c.option(optListMetaContext, metaData("vol1", "x-other:thing", "base:nothing"))
	c.expectReply(optListMetaContext, repAck)
	c.option(optSetMetaContext, metaData("vol1", "base:"))
	c.expectReply(optSetMetaContext, repAck)
	// Malformed: query length past the end.
	bad := metaData("vol1", metaAllocation)
	c.option(optSetMetaContext, bad[:len(bad)-1])
	c.expectReply(optSetMetaContext, repErrInvalid)

	c.option(optSetMetaContext, metaData("vol1", metaAllocation, metaAllocation, "x-foo:bar"))
	r := c.expectReply(optSetMetaContext, repMetaContext)
	id := binary.BigEndian.Uint32(r.data)
	if string(r.data[4:]) != metaAllocation {
		t.Fatalf("SET selected %q", r.data[4:])
	}
	c.expectReply(optSetMetaContext, repAck)

	_, flags := c.goExport("vol1")
	if flags&tflagSendDF == 0 {
		t.Errorf("flags %#x lack SEND_DF with structured replies", flags)
	}
	c.request(cmdFlagReqOne, cmdBlockStatus, 5, 0, 1<<20, nil)
	rep := c.chunkOrSimple()
	if rep.typ != replyBlockStatus || rep.flags != replyFlagDone || rep.cookie != 5 || len(rep.data) != 12 {
		t.Fatalf("block status reply %+v", rep)
	}
	if got := binary.BigEndian.Uint32(rep.data); got != id {
		t.Errorf("context id %d, want %d", got, id)
	}
	if l, f := binary.BigEndian.Uint32(rep.data[4:]), binary.BigEndian.Uint32(rep.data[8:]); l != 1<<20 || f != stateHole|stateZero {
		t.Errorf("extent %d flags %d", l, f)
	}
}

func TestSetMetaContext_OtherExportDisablesBlockStatus(t *testing.T) {
	cat, _ := memCatalog("vol1", target.Geometry{Size: 1 << 20, BlockSize: 512})
	cat.Add("vol2", "id-vol2", blockdevtest.NewMemory(target.Geometry{Size: 4096, BlockSize: 512}))
	ts := startServer(t, cat, Config{})
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optStructuredReply, nil)
	c.expectReply(optStructuredReply, repAck)
	c.option(optSetMetaContext, metaData("vol2", metaAllocation))
	c.expectReply(optSetMetaContext, repMetaContext)
	c.expectReply(optSetMetaContext, repAck)
	c.goExport("vol1")
	c.request(0, cmdBlockStatus, 1, 0, 512, nil)
	if r := c.chunkOrSimple(); r.typ != replyError || r.errno != errnoInval {
		t.Fatalf("block status without context for this export: %+v", r)
	}
}

func TestExtendedHeaders_RefusedCleanly(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	c.option(optExtendedHeaders, nil)
	c.expectReply(optExtendedHeaders, repErrUnsup)
	// libnbd >= 1.18 then falls back to structured replies.
	c.option(optStructuredReply, nil)
	c.expectReply(optStructuredReply, repAck)
	c.goExport("vol1")
	c.request(0, cmdRead, 4, 0, 0, nil)
	if r := c.chunkOrSimple(); r.simple || r.typ != replyNone || r.flags != replyFlagDone || r.cookie != 4 {
		t.Fatalf("zero-length structured read: %+v", r)
	}
	c.request(0, cmdRead, 3, 512, 512, nil)
	r := c.chunkOrSimple()
	if r.typ != replyOffsetData || r.flags != replyFlagDone || len(r.data) != 8+512 ||
		binary.BigEndian.Uint64(r.data) != 512 {
		t.Fatalf("structured read reply %+v", r)
	}
}

func TestOption_TooBigIsRefusedThenHagglingGoesOn(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optList, make([]byte, maxOptionLen+1))
	c.expectReply(optList, repErrTooBig)
	c.goExport("vol1")
}

func TestOption_HugeLengthDropsConnection(t *testing.T) {
	ts := handshakeServer(t)
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, optGo)
	b = binary.BigEndian.AppendUint32(b, 1<<31)
	c.write(b)
	c.expectEOF()
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	cat, _ := memCatalog("vol1", target.Geometry{Size: 1 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{Registerer: reg})
	// A second server on the same registry shares the collectors.
	NewServer(Config{Catalog: cat, Registerer: reg}).Close()
	c := connect(t, ts.addr, "vol1", false)
	eventually(t, 10*time.Second, "one connection", func() bool { return ts.Connections() == 1 })
	if n := metricValue(ts.metrics.connections); n != 1 {
		t.Errorf("connections gauge %v", n)
	}
	c.request(0, cmdDisc, 0, 0, 0, nil)
	eventually(t, 10*time.Second, "no connection", func() bool { return ts.Connections() == 0 })
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	if got := strings.Join(names, " "); got != "stor_nbd_connections stor_nbd_connections_total stor_nbd_handshake_failures_total" {
		t.Errorf("registered metrics: %s", got)
	}
	if n := metricValue(ts.metrics.connectionsTotal); n != 1 {
		t.Errorf("connections_total %v", n)
	}
}

// metricValue reads a gauge or counter.
func metricValue(m prometheus.Metric) float64 {
	var pb dto.Metric
	if err := m.Write(&pb); err != nil {
		panic(err)
	}
	if g := pb.GetGauge(); g != nil {
		return g.GetValue()
	}
	return pb.GetCounter().GetValue()
}

func TestHandshakeTimeout(t *testing.T) {
	cat, _ := memCatalog("vol1", target.Geometry{Size: 1 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{HandshakeTimeout: 100 * time.Millisecond})
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle) // then says nothing
	c.expectEOF()
	eventually(t, 10*time.Second, "connection gone", func() bool { return ts.Connections() == 0 })
	// A client that got to transmission is not timed out.
	d := connect(t, ts.addr, "vol1", false)
	attached := time.Now()
	eventually(t, 10*time.Second, "the handshake timeout to pass", func() bool {
		return time.Since(attached) > 300*time.Millisecond
	})
	d.request(0, cmdFlush, 1, 0, 0, nil)
	if e, _ := d.simpleReply(); e != 0 {
		t.Fatalf("flush after idle: errno %d", e)
	}
}

func TestOptInfo_DescriptionAndList(t *testing.T) {
	cat := newDevCatalog()
	cat.add("v", blockdevtest.NewMemory(target.Geometry{Size: 1 << 20, BlockSize: 4096}))
	ts := startServer(t, cat, Config{})
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optInfo, goData("v", infoDescription))
	infos, fin := c.infoReplies(optInfo)
	if fin.typ != repAck || string(infos[infoDescription]) != "device v" {
		t.Fatalf("NBD_INFO_DESCRIPTION %q (final %#x)", infos[infoDescription], fin.typ)
	}
	if bs := infos[infoBlockSize]; binary.BigEndian.Uint32(bs) != 4096 || binary.BigEndian.Uint32(bs[4:]) != 4096 {
		t.Errorf("block sizes %x for a 4096-byte device", bs)
	}
	c.option(optList, nil)
	r := c.expectReply(optList, repServer)
	if n := binary.BigEndian.Uint32(r.data); string(r.data[4:4+n]) != "v" || string(r.data[4+n:]) != "device v" {
		t.Errorf("NBD_REP_SERVER %q", r.data)
	}
	c.expectReply(optList, repAck)
}

// TestTermination_ShutdownErrorsFurtherOptions: options already sent when
// the server starts closing get NBD_REP_ERR_SHUTDOWN, then a hang-up.
func TestTermination_ShutdownErrorsFurtherOptions(t *testing.T) {
	cat, _ := memCatalog("vol1", target.Geometry{Size: 1 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{})
	c := dial(t, ts.addr)
	c.greet(clientFixedNewstyle)
	c.option(optList, nil) // answered: the server is open
	c.expectReply(optList, repServer)
	c.expectReply(optList, repAck)
	eventually(t, 10*time.Second, "one connection", func() bool { return ts.Connections() == 1 })
	conn := ts.onlyConn(t)
	// Mark it closing as Close would, but leave its read deadline alone so
	// the next option is read.
	conn.mu.Lock()
	conn.mu.closing = true
	conn.mu.Unlock()
	c.option(optGo, goData("vol1"))
	c.expectReply(optGo, repErrShutdown)
	c.expectEOF()
}

package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/target"
)

// rawClient speaks the wire protocol byte by byte, so tests can write
// transcripts and break the rules on purpose.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func dial(t testing.TB, addr string) *rawClient {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	return &rawClient{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (c *rawClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// expectEOF checks that the server hung up.
func (c *rawClient) expectEOF() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	n, err := c.br.Read(b[:])
	if err == nil {
		c.t.Fatalf("server sent %d more bytes (%#x), want hang-up", n, b[0])
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatal("server did not hang up")
	}
}

// greet reads the server greeting and sends client flags.
func (c *rawClient) greet(clientFlags uint32) uint16 {
	c.t.Helper()
	b := c.read(18)
	if m := binary.BigEndian.Uint64(b[0:8]); m != magicNBD {
		c.t.Fatalf("magic %#x", m)
	}
	if m := binary.BigEndian.Uint64(b[8:16]); m != magicOpt {
		c.t.Fatalf("IHAVEOPT %#x", m)
	}
	c.write(binary.BigEndian.AppendUint32(nil, clientFlags))
	return binary.BigEndian.Uint16(b[16:18])
}

func (c *rawClient) option(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

type optRep struct {
	opt, typ uint32
	data     []byte
}

func (c *rawClient) optReply() optRep {
	c.t.Helper()
	h := c.read(optReplyHeaderSize)
	if m := binary.BigEndian.Uint64(h[0:8]); m != magicOptReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	return optRep{
		opt:  binary.BigEndian.Uint32(h[8:12]),
		typ:  binary.BigEndian.Uint32(h[12:16]),
		data: c.read(int(binary.BigEndian.Uint32(h[16:20]))),
	}
}

// expectReply reads one option reply and checks its option and type.
func (c *rawClient) expectReply(opt, typ uint32) optRep {
	c.t.Helper()
	r := c.optReply()
	if r.opt != opt || r.typ != typ {
		c.t.Fatalf("reply to option %d: got option %d type %#x (%q), want type %#x", opt, r.opt, r.typ, r.data, typ)
	}
	return r
}

// goData encodes the data of NBD_OPT_INFO / NBD_OPT_GO.
func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// metaData encodes the data of the meta context options.
func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// infoReplies collects NBD_REP_INFO replies up to the final reply, which
// it returns.
func (c *rawClient) infoReplies(opt uint32) (map[uint16][]byte, optRep) {
	c.t.Helper()
	infos := map[uint16][]byte{}
	for {
		r := c.optReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ != repInfo {
			return infos, r
		}
		if len(r.data) < 2 {
			c.t.Fatalf("short NBD_REP_INFO %x", r.data)
		}
		it := binary.BigEndian.Uint16(r.data)
		if _, dup := infos[it]; dup {
			c.t.Fatalf("info %d sent twice", it)
		}
		infos[it] = r.data[2:]
	}
}

// goExport runs NBD_OPT_GO and returns size and transmission flags.
func (c *rawClient) goExport(name string) (uint64, uint16) {
	c.t.Helper()
	c.option(optGo, goData(name, infoBlockSize))
	infos, fin := c.infoReplies(optGo)
	if fin.typ != repAck {
		c.t.Fatalf("NBD_OPT_GO %q: final reply %#x %q", name, fin.typ, fin.data)
	}
	e := infos[infoExport]
	if len(e) != 10 {
		c.t.Fatalf("NBD_INFO_EXPORT payload %x", e)
	}
	return binary.BigEndian.Uint64(e[0:8]), binary.BigEndian.Uint16(e[8:10])
}

// connect does a full handshake: structured replies and base:allocation
// when structured, then GO.
func connect(t testing.TB, addr, name string, structured bool) *rawClient {
	t.Helper()
	c := dial(t, addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	if structured {
		c.option(optStructuredReply, nil)
		c.expectReply(optStructuredReply, repAck)
		c.option(optSetMetaContext, metaData(name, metaAllocation))
		c.expectReply(optSetMetaContext, repMetaContext)
		c.expectReply(optSetMetaContext, repAck)
	}
	c.goExport(name)
	return c
}

func (c *rawClient) request(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := appendRequest(nil, request{Flags: flags, Type: typ, Cookie: cookie, Offset: off, Length: length})
	c.write(append(b, payload...))
}

// simpleReply reads a simple reply header.
func (c *rawClient) simpleReply() (errno uint32, cookie uint64) {
	c.t.Helper()
	b := c.read(simpleReplySize)
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicSimple {
		c.t.Fatalf("simple reply magic %#x", m)
	}
	return binary.BigEndian.Uint32(b[4:8]), binary.BigEndian.Uint64(b[8:16])
}

// reply is one decoded reply: simple, or one structured chunk.
type reply struct {
	simple bool
	errno  uint32
	flags  uint16
	typ    uint16
	cookie uint64
	data   []byte // chunk payload
}

// chunkOrSimple reads a reply in a structured session, where payload-free
// successes may come as simple replies.
func (c *rawClient) chunkOrSimple() reply {
	c.t.Helper()
	m := binary.BigEndian.Uint32(c.peek(4))
	switch m {
	case magicSimple:
		e, cookie := c.simpleReply()
		return reply{simple: true, errno: e, cookie: cookie}
	case magicStructured:
		b := c.read(structuredReplySize)
		r := reply{
			flags:  binary.BigEndian.Uint16(b[4:6]),
			typ:    binary.BigEndian.Uint16(b[6:8]),
			cookie: binary.BigEndian.Uint64(b[8:16]),
		}
		r.data = c.read(int(binary.BigEndian.Uint32(b[16:20])))
		if r.typ&(1<<15) != 0 && len(r.data) >= 4 {
			r.errno = binary.BigEndian.Uint32(r.data)
		}
		return r
	}
	c.t.Fatalf("reply magic %#x", m)
	return reply{}
}

func (c *rawClient) peek(n int) []byte {
	c.t.Helper()
	b, err := c.br.Peek(n)
	if err != nil {
		c.t.Fatalf("peek: %v", err)
	}
	return b
}

// devCatalog is a target.Catalog over arbitrary BlockDevices.
type devCatalog struct {
	mu   sync.Mutex
	devs map[string]target.BlockDevice
	open map[string]int
}

func newDevCatalog() *devCatalog {
	return &devCatalog{devs: map[string]target.BlockDevice{}, open: map[string]int{}}
}

func (c *devCatalog) add(name string, d target.BlockDevice) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.devs[name] = d
}

func (c *devCatalog) opened(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.open[name]
}

func (c *devCatalog) List(ctx context.Context) ([]target.Export, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []target.Export
	for n := range c.devs {
		out = append(out, target.Export{Name: n, ID: n, Description: "device " + n})
	}
	return out, nil
}

func (c *devCatalog) Open(ctx context.Context, name string) (target.Device, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.devs[name]
	if !ok {
		return nil, target.ErrNotFound
	}
	c.open[name]++
	cd := &catDevice{BlockDevice: d, c: c, name: name}
	if _, ok := d.(target.AsyncWriter); ok {
		return asyncCatDevice{cd}, nil
	}
	return cd, nil
}

// asyncCatDevice is a catDevice of a device that writes asynchronously.
type asyncCatDevice struct{ *catDevice }

func (d asyncCatDevice) WriteAtAsync(ctx context.Context, p []byte, off int64, fua bool, done func(error)) {
	d.BlockDevice.(target.AsyncWriter).WriteAtAsync(ctx, p, off, fua, done)
}

type catDevice struct {
	target.BlockDevice
	c    *devCatalog
	name string
	once sync.Once
}

func (d *catDevice) Info() target.Export {
	return target.Export{Name: d.name, ID: d.name, Description: "device " + d.name}
}

func (d *catDevice) Close() error {
	d.once.Do(func() {
		d.c.mu.Lock()
		d.c.open[d.name]--
		d.c.mu.Unlock()
	})
	return nil
}

// Map forwards to the device when it has a map.
func (d *catDevice) Map(ctx context.Context, off, n int64) ([]target.Extent, error) {
	if m, ok := d.BlockDevice.(target.Mapper); ok {
		return m.Map(ctx, off, n)
	}
	return nil, target.ErrNotSupported
}

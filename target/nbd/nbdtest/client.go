// Package nbdtest is a small NBD client for tests that drive a real server
// over TCP: the end-to-end and crash tests of cmd/stord use it where the
// stock clients (nbdinfo, qemu-io, nbdcopy) cannot keep exact books of what
// was acknowledged.
//
// It speaks the fixed newstyle handshake with NBD_OPT_GO only and asks for
// simple replies (doc/proto.md "Newstyle negotiation", "Simple reply
// message"). After the handshake any number of goroutines may call ReadAt,
// WriteAt, WriteZeroes, Trim and Flush at once: requests are pipelined on
// the one connection and one reader goroutine matches replies to them by
// cookie, so replies may come back in any order.
//
// Wire formats it writes and reads (all integers big-endian):
//
//	request (28 bytes + payload of WRITE)
//	+--------+--------+--------+--------+--------+--------+
//	| magic  | flags  | type   | cookie | offset | length |
//	| u32    | u16    | u16    | u64    | u64    | u32    |
//	| 25609513                                            |
//	+--------+--------+--------+--------+--------+--------+
//
//	simple reply (16 bytes + payload of a successful READ)
//	+----------+--------+--------+
//	| magic    | error  | cookie |
//	| u32      | u32    | u64    |
//	| 67446698 |        |        |
//	+----------+--------+--------+
//
// Rules: the Client owns its connection; Close sends NBD_CMD_DISC, closes
// it and joins the reader. A broken connection (the server died or hung up)
// fails every pending and later request with an error wrapping
// ErrDisconnected. A request that the server answers with an error value
// returns an *Error carrying it.
package nbdtest

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Errors.
var (
	// ErrDisconnected reports a connection that is gone: the server hung up
	// or died, or the client was closed.
	ErrDisconnected = errors.New("nbdtest: disconnected")
	// ErrHandshake reports a handshake the server refused or broke.
	ErrHandshake = errors.New("nbdtest: handshake failed")
)

// Error is a non-zero error value in a reply ("Error values"): 1 EPERM,
// 5 EIO, 12 ENOMEM, 22 EINVAL, 28 ENOSPC, 75 EOVERFLOW, 95 ENOTSUP,
// 108 ESHUTDOWN.
type Error struct {
	Cmd    string
	Errno  uint32
	Offset uint64
	Length uint32
}

func (e *Error) Error() string {
	return fmt.Sprintf("nbdtest: %s at %d+%d: server error %d", e.Cmd, e.Offset, e.Length, e.Errno)
}

// Error values tests compare against.
const (
	EPERM   uint32 = 1
	EIO     uint32 = 5
	EINVAL  uint32 = 22
	ENOSPC  uint32 = 28
	ENOTSUP uint32 = 95
)

// Protocol constants (doc/proto.md).
const (
	magicNBD      uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt      uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptReply uint64 = 0x3e889045565a9
	magicRequest  uint32 = 0x25609513
	magicSimple   uint32 = 0x67446698

	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	optGo       uint32 = 7
	repAck      uint32 = 1
	repInfo     uint32 = 3
	infoExport  uint16 = 0
	repErrorBit uint32 = 1 << 31

	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdWriteZeroes uint16 = 6

	cmdFlagFUA    uint16 = 1 << 0
	cmdFlagNoHole uint16 = 1 << 1
)

var cmdNames = map[uint16]string{cmdRead: "READ", cmdWrite: "WRITE", cmdFlush: "FLUSH",
	cmdTrim: "TRIM", cmdWriteZeroes: "WRITE_ZEROES"}

// Transmission flags the server may announce ("Transmission flags").
const (
	FlagReadOnly     uint16 = 1 << 1
	FlagSendFlush    uint16 = 1 << 2
	FlagSendFUA      uint16 = 1 << 3
	FlagSendTrim     uint16 = 1 << 5
	FlagSendZeroes   uint16 = 1 << 6
	FlagCanMultiConn uint16 = 1 << 8
)

// Client is one NBD connection in transmission phase.
type Client struct {
	// Size is the export size the server announced; Flags its
	// transmission flags.
	Size  int64
	Flags uint16

	nc   net.Conn
	wmu  sync.Mutex // serialises request writes on nc
	done chan struct{}

	mu struct {
		sync.Mutex
		next    uint64
		pending map[uint64]*call
		err     error // set once the connection broke
	}
}

// call is one request waiting for its reply. The reader owns buf until it
// sends on done.
type call struct {
	cmd  uint16
	off  uint64
	n    uint32
	buf  []byte // READ destination
	done chan error
}

// Dial connects to addr and negotiates export name with NBD_OPT_GO. ctx
// bounds the dial and the handshake.
func Dial(ctx context.Context, addr, name string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrDisconnected, err)
	}
	c, err := Handshake(ctx, nc, name)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// Handshake runs the fixed newstyle handshake on nc and starts the reply
// reader. On error the caller still owns nc.
func Handshake(ctx context.Context, nc net.Conn, name string) (*Client, error) {
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	} else {
		nc.SetDeadline(time.Now().Add(30 * time.Second))
	}
	br := bufio.NewReader(nc)
	size, flags, err := negotiate(br, nc, name)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	c := &Client{Size: size, Flags: flags, nc: nc, done: make(chan struct{})}
	c.mu.pending = make(map[uint64]*call)
	go c.reader(br)
	return c, nil
}

// negotiate: greeting, client flags, NBD_OPT_GO, replies up to NBD_REP_ACK
// ("Fixed newstyle negotiation", "NBD_OPT_GO").
func negotiate(br *bufio.Reader, w io.Writer, name string) (int64, uint16, error) {
	var g [18]byte
	if _, err := io.ReadFull(br, g[:]); err != nil {
		return 0, 0, fmt.Errorf("%w: greeting: %v", ErrHandshake, err)
	}
	if binary.BigEndian.Uint64(g[0:]) != magicNBD || binary.BigEndian.Uint64(g[8:]) != magicOpt {
		return 0, 0, fmt.Errorf("%w: not a newstyle NBD server (%x)", ErrHandshake, g[:16])
	}
	hflags := binary.BigEndian.Uint16(g[16:])
	if hflags&flagFixedNewstyle == 0 {
		return 0, 0, fmt.Errorf("%w: server is not fixed newstyle", ErrHandshake)
	}
	cflags := uint32(1) // NBD_FLAG_C_FIXED_NEWSTYLE
	if hflags&flagNoZeroes != 0 {
		cflags |= 2 // NBD_FLAG_C_NO_ZEROES
	}
	opt := binary.BigEndian.AppendUint32(nil, cflags)
	opt = binary.BigEndian.AppendUint64(opt, magicOpt)
	opt = binary.BigEndian.AppendUint32(opt, optGo)
	opt = binary.BigEndian.AppendUint32(opt, uint32(4+len(name)+2))
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(name)))
	opt = append(opt, name...)
	opt = binary.BigEndian.AppendUint16(opt, 0) // no information requests
	if _, err := w.Write(opt); err != nil {
		return 0, 0, fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	var size int64
	var flags uint16
	haveExport := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return 0, 0, fmt.Errorf("%w: option reply: %v", ErrHandshake, err)
		}
		if binary.BigEndian.Uint64(h[0:]) != magicOptReply {
			return 0, 0, fmt.Errorf("%w: bad option reply magic %x", ErrHandshake, h[:8])
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > 1<<20 {
			return 0, 0, fmt.Errorf("%w: option reply of %d bytes", ErrHandshake, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(br, data); err != nil {
			return 0, 0, fmt.Errorf("%w: option reply data: %v", ErrHandshake, err)
		}
		switch {
		case typ&repErrorBit != 0:
			return 0, 0, fmt.Errorf("%w: export %q refused (reply %#x): %s", ErrHandshake, name, typ, data)
		case typ == repInfo && len(data) >= 2 && binary.BigEndian.Uint16(data) == infoExport:
			if len(data) != 12 {
				return 0, 0, fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrHandshake, len(data))
			}
			size = int64(binary.BigEndian.Uint64(data[2:]))
			flags = binary.BigEndian.Uint16(data[10:])
			haveExport = true
		case typ == repAck:
			if !haveExport {
				return 0, 0, fmt.Errorf("%w: NBD_REP_ACK without NBD_INFO_EXPORT", ErrHandshake)
			}
			return size, flags, nil
		}
	}
}

// reader reads replies until the connection breaks, then fails every
// pending call.
func (c *Client) reader(br *bufio.Reader) {
	defer close(c.done)
	err := c.readReplies(br)
	c.mu.Lock()
	if c.mu.err == nil {
		c.mu.err = fmt.Errorf("%w: %v", ErrDisconnected, err)
	}
	err = c.mu.err
	pending := c.mu.pending
	c.mu.pending = nil
	c.mu.Unlock()
	for _, cl := range pending {
		cl.done <- err
	}
}

func (c *Client) readReplies(br *bufio.Reader) error {
	var h [16]byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return err
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != magicSimple {
			return fmt.Errorf("bad reply magic %#x", m)
		}
		errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		cl := c.mu.pending[cookie]
		delete(c.mu.pending, cookie)
		c.mu.Unlock()
		if cl == nil {
			return fmt.Errorf("reply to unknown cookie %d", cookie)
		}
		if errno != 0 {
			cl.done <- &Error{Cmd: cmdNames[cl.cmd], Errno: errno, Offset: cl.off, Length: cl.n}
			continue
		}
		if cl.cmd == cmdRead {
			if _, err := io.ReadFull(br, cl.buf); err != nil {
				cl.done <- fmt.Errorf("%w: read payload: %v", ErrDisconnected, err)
				return err
			}
		}
		cl.done <- nil
	}
}

// do sends one request and waits for its reply. Cancelling ctx closes the
// connection: a request on the wire cannot be taken back.
func (c *Client) do(ctx context.Context, cmd, flags uint16, off uint64, n uint32, payload, buf []byte) error {
	cl := &call{cmd: cmd, off: off, n: n, buf: buf, done: make(chan error, 1)}
	c.mu.Lock()
	if c.mu.err != nil {
		err := c.mu.err
		c.mu.Unlock()
		return err
	}
	c.mu.next++
	cookie := c.mu.next
	c.mu.pending[cookie] = cl
	c.mu.Unlock()

	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], cmd)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], n)
	b = append(b, payload...)
	c.wmu.Lock()
	_, werr := c.nc.Write(b)
	c.wmu.Unlock()
	if werr != nil {
		c.nc.Close() // the reader fails the call
	}
	select {
	case err := <-cl.done:
		return err
	case <-ctx.Done():
		c.nc.Close()
		<-cl.done
		return ctx.Err()
	}
}

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.do(ctx, cmdRead, 0, uint64(off), uint32(len(p)), nil, p)
}

// WriteAt writes p at off, with NBD_CMD_FLAG_FUA if fua.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	var f uint16
	if fua {
		f = cmdFlagFUA
	}
	return c.do(ctx, cmdWrite, f, uint64(off), uint32(len(p)), p, nil)
}

// WriteZeroes zeroes n bytes at off; noHole asks the server to allocate.
func (c *Client) WriteZeroes(ctx context.Context, off, n int64, noHole bool) error {
	var f uint16
	if noHole {
		f = cmdFlagNoHole
	}
	return c.do(ctx, cmdWriteZeroes, f, uint64(off), uint32(n), nil, nil)
}

// Trim discards n bytes at off.
func (c *Client) Trim(ctx context.Context, off, n int64) error {
	return c.do(ctx, cmdTrim, 0, uint64(off), uint32(n), nil, nil)
}

// Flush returns once every write completed before it is durable.
func (c *Client) Flush(ctx context.Context) error {
	return c.do(ctx, cmdFlush, 0, 0, 0, nil, nil)
}

// Close sends NBD_CMD_DISC (best effort), closes the connection and waits
// for the reader to exit. Pending requests fail with ErrDisconnected.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.mu.err == nil {
		c.mu.err = fmt.Errorf("%w: client closed", ErrDisconnected)
	}
	c.mu.Unlock()
	var b [28]byte
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[6:], cmdDisc)
	c.wmu.Lock()
	c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	c.nc.Write(b[:])
	c.wmu.Unlock()
	err := c.nc.Close()
	<-c.done
	return err
}

// Done is closed when the connection is gone (the reader exited).
func (c *Client) Done() <-chan struct{} { return c.done }

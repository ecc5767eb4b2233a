package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"stor.dev/stor/target"
)

// negotiation is the state option haggling builds up. It is owned by the
// connection's goroutine.
type negotiation struct {
	clientFlags uint32
	structured  bool
	// metaExport and metaSelected record the last NBD_OPT_SET_META_CONTEXT:
	// base:allocation is usable in transmission only if it was selected
	// for the export finally chosen.
	metaExport   string
	metaSelected bool
	metaSet      bool
}

// session is what a successful negotiation hands to transmission.
type session struct {
	dev        target.Device
	name       string
	geo        target.Geometry
	structured bool
	meta       bool // base:allocation selected for this export
	flags      uint16
}

// Reasons a negotiation ends without transmission.
var (
	errAbort    = errors.New("nbd: client aborted negotiation")
	errShutdown = errors.New("nbd: server shutting down")
)

// negotiate runs the fixed newstyle handshake ("Fixed newstyle
// negotiation") on br/bw until the client enters transmission (returns the
// session), aborts (errAbort) or breaks the protocol (an error wrapping
// ErrProtocol, or the I/O error). bw is flushed after each reply.
func (c *conn) negotiate(br *bufio.Reader, bw *bufio.Writer) (*session, error) {
	var b [optHeaderSize]byte
	binary.BigEndian.PutUint64(b[0:8], magicNBD)
	binary.BigEndian.PutUint64(b[8:16], magicOpt)
	bw.Write(b[:16])
	binary.BigEndian.PutUint16(b[0:2], flagFixedNewstyle|flagNoZeroes)
	bw.Write(b[:2])
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(br, b[:4]); err != nil {
		return nil, err
	}
	var n negotiation
	n.clientFlags = binary.BigEndian.Uint32(b[:4])
	if n.clientFlags&^(clientFixedNewstyle|clientNoZeroes) != 0 {
		// "Client flags": the server MUST drop the connection.
		return nil, fmt.Errorf("%w: unknown client flags %#x", ErrProtocol, n.clientFlags)
	}
	for {
		if _, err := io.ReadFull(br, b[:optHeaderSize]); err != nil {
			return nil, err
		}
		if m := binary.BigEndian.Uint64(b[0:8]); m != magicOpt {
			return nil, fmt.Errorf("%w: bad option magic %#x", ErrProtocol, m)
		}
		opt := binary.BigEndian.Uint32(b[8:12])
		length := binary.BigEndian.Uint32(b[12:16])
		if length > maxOptionSkip {
			return nil, fmt.Errorf("%w: option %d with %d bytes of data", ErrProtocol, opt, length)
		}
		if length > maxOptionLen {
			if _, err := io.CopyN(io.Discard, br, int64(length)); err != nil {
				return nil, err
			}
			if opt == optExportName {
				return nil, fmt.Errorf("%w: export name of %d bytes", ErrProtocol, length)
			}
			optReply(bw, opt, repErrTooBig, "option data too long")
			if err := bw.Flush(); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(br, data); err != nil {
			return nil, err
		}
		if opt != optAbort && c.closing() {
			// "Termination of the session during option haggling": a
			// server shutting down SHOULD error further options.
			optReply(bw, opt, repErrShutdown, "server shutting down")
			bw.Flush()
			return nil, errShutdown
		}
		s, err := c.option(&n, bw, opt, data)
		if err != nil || s != nil {
			return s, err
		}
		if err := bw.Flush(); err != nil {
			return nil, err
		}
	}
}

// option answers one option. It returns a session when transmission is
// entered.
func (c *conn) option(n *negotiation, bw *bufio.Writer, opt uint32, data []byte) (*session, error) {
	switch opt {
	case optExportName:
		// "NBD_OPT_EXPORT_NAME": no way to report an error but to hang up.
		s, err := c.open(n, string(data))
		if err != nil {
			return nil, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME %q: %w", ErrProtocol, data, err)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:8], uint64(s.geo.Size))
		binary.BigEndian.PutUint16(b[8:10], s.flags)
		out := b[:]
		if n.clientFlags&clientNoZeroes != 0 {
			out = b[:10]
		}
		bw.Write(out)
		if err := bw.Flush(); err != nil {
			s.dev.Close()
			return nil, err
		}
		return s, nil

	case optAbort:
		// "NBD_OPT_ABORT": reply ACK (ignoring any data); the client
		// may already have hung up.
		optReply(bw, opt, repAck, "")
		bw.Flush()
		return nil, errAbort

	case optList:
		if len(data) != 0 {
			return nil, optReply(bw, opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		exports, err := c.s.cfg.Catalog.List(c.ctx)
		if err != nil {
			return nil, optReply(bw, opt, repErrPolicy, "cannot list exports: "+err.Error())
		}
		for _, e := range exports {
			p := make([]byte, 4, 4+len(e.Name)+len(e.Description))
			binary.BigEndian.PutUint32(p, uint32(len(e.Name)))
			p = append(p, e.Name...)
			p = append(p, e.Description...)
			if err := optReplyData(bw, opt, repServer, p); err != nil {
				return nil, err
			}
		}
		return nil, optReply(bw, opt, repAck, "")

	case optInfo, optGo:
		return c.optInfo(n, bw, opt, data)

	case optStructuredReply:
		if len(data) != 0 {
			return nil, optReply(bw, opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		n.structured = true
		return nil, optReply(bw, opt, repAck, "")

	case optListMetaContext, optSetMetaContext:
		return nil, c.optMeta(n, bw, opt, data)

	default:
		// Unknown options, NBD_OPT_STARTTLS (no TLS here) and
		// NBD_OPT_EXTENDED_HEADERS (experimental, not offered): refuse and
		// keep haggling ("Option types", "NBD_REP_ERR_UNSUP").
		return nil, optReply(bw, opt, repErrUnsup, fmt.Sprintf("option %d not supported", opt))
	}
}

// optInfo answers NBD_OPT_INFO and NBD_OPT_GO ("NBD_OPT_INFO and NBD_OPT_GO").
func (c *conn) optInfo(n *negotiation, bw *bufio.Writer, opt uint32, data []byte) (*session, error) {
	if len(data) < 6 {
		return nil, optReply(bw, opt, repErrInvalid, "option data too short")
	}
	nameLen := binary.BigEndian.Uint32(data[0:4])
	if uint64(nameLen) > uint64(len(data)-6) {
		return nil, optReply(bw, opt, repErrInvalid, "export name length exceeds option data")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest[0:2]))
	if len(rest) != 2+2*nreq {
		return nil, optReply(bw, opt, repErrInvalid, "information request list does not match option length")
	}
	var wantName, wantDesc bool
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	s, err := c.open(n, name)
	if err != nil {
		if errors.Is(err, target.ErrNotFound) {
			return nil, optReply(bw, opt, repErrUnknown, fmt.Sprintf("no export %q", name))
		}
		if c.closing() {
			return nil, optReply(bw, opt, repErrShutdown, "server shutting down")
		}
		return nil, optReply(bw, opt, repErrPolicy, fmt.Sprintf("export %q unavailable: %v", name, err))
	}
	var p [14]byte
	binary.BigEndian.PutUint16(p[0:2], infoExport)
	binary.BigEndian.PutUint64(p[2:10], uint64(s.geo.Size))
	binary.BigEndian.PutUint16(p[10:12], s.flags)
	err = optReplyData(bw, opt, repInfo, p[:12])
	if wantName && err == nil {
		err = optReplyData(bw, opt, repInfo, append([]byte{0, byte(infoName)}, s.name...))
	}
	if desc := s.dev.Info().Description; wantDesc && desc != "" && err == nil {
		err = optReplyData(bw, opt, repInfo, append([]byte{0, byte(infoDescription)}, desc...))
	}
	if err == nil {
		// Always sent: our minimum block size (the logical block size)
		// is not the default of 1 ("Size constraints").
		bs := uint32(s.geo.BlockSize)
		binary.BigEndian.PutUint16(p[0:2], infoBlockSize)
		binary.BigEndian.PutUint32(p[2:6], bs)
		binary.BigEndian.PutUint32(p[6:10], max(bs, preferredBlock))
		binary.BigEndian.PutUint32(p[10:14], MaxPayload)
		err = optReplyData(bw, opt, repInfo, p[:14])
	}
	if err == nil {
		err = optReply(bw, opt, repAck, "")
	}
	if err == nil && opt == optGo {
		err = bw.Flush()
	}
	if err != nil || opt == optInfo {
		s.dev.Close()
		return nil, err
	}
	return s, nil
}

// open opens the export called name (the empty name is the default export:
// the only one, if the catalog holds exactly one) and builds the session
// transmission would use.
func (c *conn) open(n *negotiation, name string) (*session, error) {
	// Meta contexts apply when SET_META_CONTEXT named the export the same
	// way the client names it now.
	meta := n.structured && n.metaSet && n.metaSelected && n.metaExport == name
	if name == "" {
		if ex, err := c.s.cfg.Catalog.List(c.ctx); err == nil && len(ex) == 1 {
			name = ex[0].Name
		}
	}
	if len(name) > maxString {
		return nil, fmt.Errorf("%w: export name too long", target.ErrNotFound)
	}
	dev, err := c.s.cfg.Catalog.Open(c.ctx, name)
	if err != nil {
		return nil, err
	}
	geo := dev.Geometry()
	return &session{
		dev:        dev,
		name:       name,
		geo:        geo,
		structured: n.structured,
		meta:       meta,
		flags:      transmissionFlags(geo, n.structured),
	}, nil
}

// optMeta answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT
// ("Metadata querying", "The base: metadata namespace").
func (c *conn) optMeta(n *negotiation, bw *bufio.Writer, opt uint32, data []byte) error {
	set := opt == optSetMetaContext
	if set {
		// "Issuing this command replaces all previously-set metadata
		// contexts (including when this command fails)".
		n.metaSet, n.metaSelected, n.metaExport = false, false, ""
	}
	if !n.structured {
		return optReply(bw, opt, repErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY first")
	}
	name, queries, ok := parseMetaQuery(data)
	if !ok {
		return optReply(bw, opt, repErrInvalid, "malformed metadata context request")
	}
	match := false
	if len(queries) == 0 {
		// LIST: everything; SET: nothing.
		match = !set
	}
	for _, q := range queries {
		if !utf8.ValidString(q) || len(q) > maxString {
			return optReply(bw, opt, repErrInvalid, "malformed metadata context query")
		}
		switch q {
		case metaAllocation:
			match = true
		case "base:":
			// A wildcard for LIST; ignored by SET.
			match = match || !set
		}
	}
	if match {
		var p []byte
		p = binary.BigEndian.AppendUint32(p, 0)
		if set {
			binary.BigEndian.PutUint32(p, metaAllocationID)
		}
		p = append(p, metaAllocation...)
		if err := optReplyData(bw, opt, repMetaContext, p); err != nil {
			return err
		}
	}
	if set {
		n.metaSet, n.metaSelected, n.metaExport = true, match, name
	}
	return optReply(bw, opt, repAck, "")
}

// parseMetaQuery splits the data of a meta context option: export name,
// then a count of length-prefixed queries.
func parseMetaQuery(data []byte) (name string, queries []string, ok bool) {
	rd := func(n uint64) ([]byte, bool) {
		if uint64(len(data)) < n {
			return nil, false
		}
		p := data[:n]
		data = data[n:]
		return p, true
	}
	p, ok := rd(4)
	if !ok {
		return "", nil, false
	}
	if p, ok = rd(uint64(binary.BigEndian.Uint32(p))); !ok {
		return "", nil, false
	}
	name = string(p)
	if p, ok = rd(4); !ok {
		return "", nil, false
	}
	count := binary.BigEndian.Uint32(p)
	for range count {
		if p, ok = rd(4); !ok {
			return "", nil, false
		}
		if p, ok = rd(uint64(binary.BigEndian.Uint32(p))); !ok {
			return "", nil, false
		}
		queries = append(queries, string(p))
	}
	if len(data) != 0 {
		return "", nil, false
	}
	return name, queries, true
}

// optReply writes an option reply whose data is msg (empty for ACK; a
// human-readable message for errors).
func optReply(bw *bufio.Writer, opt, typ uint32, msg string) error {
	if len(msg) > maxString {
		msg = msg[:maxString]
	}
	return optReplyData(bw, opt, typ, []byte(msg))
}

// optReplyData writes one option reply ("Fixed newstyle negotiation").
func optReplyData(bw *bufio.Writer, opt, typ uint32, data []byte) error {
	var h [optReplyHeaderSize]byte
	binary.BigEndian.PutUint64(h[0:8], magicOptReply)
	binary.BigEndian.PutUint32(h[8:12], opt)
	binary.BigEndian.PutUint32(h[12:16], typ)
	binary.BigEndian.PutUint32(h[16:20], uint32(len(data)))
	bw.Write(h[:])
	_, err := bw.Write(data)
	return err
}

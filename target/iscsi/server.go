// Package iscsi is an iSCSI target (RFC 7143) in front of target.Catalog:
// every export is a target named iqn.2026-11.dev.stor:<name> with one LUN,
// LUN 0, whose commands run in target/scsi.
//
// Model:
//
//	Server ── listener ── conn (one reader goroutine each)
//	   │                    │ login: security (None, CHAP-MD5, mutual) then
//	   │                    │        operational negotiation, then
//	   │                    │ full feature phase: PDUs -> tasks
//	   ├── sessions (by TSIH; ISID+initiator for reinstatement)
//	   │     └── conns (MC/S), CmdSN window, open target.Device
//	   └── LUs (one scsi.LU per open volume, shared by its sessions)
//
// Rules:
//   - Each connection has one reader goroutine; each SCSI command runs in
//     its own goroutine once its data has arrived; responses are written
//     under the connection's write mutex, a task's PDUs back to back.
//   - CmdSN (RFC 7143 4.2.2): one window per session, across connections;
//     a CmdSN outside [ExpCmdSN, MaxCmdSN] or seen before is silently
//     dropped; ExpCmdSN advances over contiguous CmdSNs; MaxCmdSN =
//     ExpCmdSN+127. Commands run concurrently as SIMPLE tasks, so a command
//     that arrives ahead of a gap (MC/S) is not held back.
//   - ErrorRecoveryLevel is 0: a header or data digest error ends the
//     connection (the initiator recovers with a new session); a broken
//     Data-Out sequence (DataSN, buffer offset, TTT) ends only its task,
//     with CHECK CONDITION, ABORTED COMMAND, DATA PHASE ERROR.
//   - Write buffers of commands still waiting for Data-Out are bounded per
//     connection (256 MiB); beyond that a write gets TASK SET FULL.
//   - StatSN is per connection and advances with every status-bearing PDU.
//   - A normal session opens its Device at login (Catalog.Open) and closes
//     it when its last connection ends; Close drains and joins everything.
package iscsi

import (
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"stor.dev/stor/target"
	"stor.dev/stor/target/scsi"
)

// IQNPrefix is the prefix of every target name; the rest is the export
// name. It equals ctl/api.IQN("") (checked by a test: target/... may not
// import ctl).
const IQNPrefix = "iqn.2026-11.dev.stor:"

// CHAP is the CHAP configuration of one target (RFC 7143 12.1.3, RFC 1994).
type CHAP struct {
	User, Secret             string // the initiator must answer as User with Secret
	MutualUser, MutualSecret string // the target answers as these; empty: no mutual CHAP
}

// Authenticator says which targets require CHAP. Safe for concurrent use.
type Authenticator interface {
	// CHAPFor returns the CHAP configuration of the export volume ("" for
	// discovery sessions); ok=false means no authentication is required.
	CHAPFor(ctx context.Context, volume string) (c CHAP, ok bool, err error)
}

// StaticAuth is an Authenticator from a fixed map of volume -> CHAP.
type StaticAuth map[string]CHAP

func (a StaticAuth) CHAPFor(ctx context.Context, volume string) (CHAP, bool, error) {
	c, ok := a[volume]
	return c, ok, nil
}

// Config configures a Server.
type Config struct {
	Catalog    target.Catalog
	Portal     string        // "host:port" announced by SendTargets
	Auth       Authenticator // nil: no authentication
	PR         scsi.PRStore  // nil: reservations not persisted
	Logger     *slog.Logger
	Registerer prometheus.Registerer // nil: metrics not registered
}

// Server is an iSCSI target. See the package doc.
type Server struct {
	cfg     Config
	log     *slog.Logger
	metrics metrics
	bufs    bufPool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu struct {
		sync.Mutex
		closed    bool
		listeners map[net.Listener]struct{}
		conns     map[*conn]struct{}
		sessions  map[uint16]*session
		nextTSIH  uint16
		lus       map[string]*luRef
	}
}

type luRef struct {
	lu   *scsi.LU
	refs int
}

type metrics struct {
	sessions   prometheus.Gauge
	commands   prometheus.Counter
	pdus       prometheus.Counter
	loginFails prometheus.Counter
	readBytes  prometheus.Counter
	writeBytes prometheus.Counter
}

// NewServer returns a Server; it serves nothing until Serve.
func NewServer(cfg Config) *Server {
	s := &Server{cfg: cfg, log: cfg.Logger}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.mu.listeners = map[net.Listener]struct{}{}
	s.mu.conns = map[*conn]struct{}{}
	s.mu.sessions = map[uint16]*session{}
	s.mu.lus = map[string]*luRef{}
	var b [2]byte
	_, _ = rand.Read(b[:])
	s.mu.nextTSIH = uint16(b[0])<<8 | uint16(b[1])
	s.metrics = metrics{
		sessions:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "stor_iscsi_sessions", Help: "Open iSCSI sessions."}),
		commands:   prometheus.NewCounter(prometheus.CounterOpts{Name: "stor_iscsi_commands_total", Help: "SCSI commands executed."}),
		pdus:       prometheus.NewCounter(prometheus.CounterOpts{Name: "stor_iscsi_pdus_received_total", Help: "PDUs received."}),
		loginFails: prometheus.NewCounter(prometheus.CounterOpts{Name: "stor_iscsi_login_failures_total", Help: "Logins refused."}),
		readBytes:  prometheus.NewCounter(prometheus.CounterOpts{Name: "stor_iscsi_read_bytes_total", Help: "Bytes sent as Data-In."}),
		writeBytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "stor_iscsi_write_bytes_total", Help: "Bytes received as Data-Out or immediate data."}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{s.metrics.sessions, s.metrics.commands, s.metrics.pdus, s.metrics.loginFails, s.metrics.readBytes, s.metrics.writeBytes} {
			if err := cfg.Registerer.Register(c); err != nil {
				s.log.Warn("iscsi: metric not registered", "err", err)
			}
		}
	}
	return s
}

// Serve accepts connections on ln until Close or an accept error. It
// returns ErrClosed after Close.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.mu.listeners[ln] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.mu.listeners, ln)
		s.mu.Unlock()
	}()
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.mu.closed
			s.mu.Unlock()
			if closed {
				return ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		if tc, ok := nc.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		c := newConn(s, nc)
		s.mu.Lock()
		if s.mu.closed {
			s.mu.Unlock()
			nc.Close()
			return ErrClosed
		}
		s.mu.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve()
			s.mu.Lock()
			delete(s.mu.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Close stops every listener and connection, waits for running commands
// and goroutines to finish, and closes every open Device.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.mu.closed = true
	for ln := range s.mu.listeners {
		ln.Close()
	}
	for c := range s.mu.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return nil
}

// Sessions is the number of open sessions (discovery sessions included).
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.mu.sessions)
}

// volumeOf maps a target name to an export name.
func volumeOf(iqn string) (string, bool) {
	if !strings.HasPrefix(iqn, IQNPrefix) || len(iqn) == len(IQNPrefix) {
		return "", false
	}
	return iqn[len(IQNPrefix):], true
}

// acquireLU returns the shared LU of an export, creating it on first use.
func (s *Server) acquireLU(ctx context.Context, info target.Export) (*scsi.LU, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.mu.lus[info.Name]; ok {
		r.refs++
		return r.lu, nil
	}
	lu, err := scsi.NewLU(ctx, info, s.cfg.PR)
	if err != nil {
		return nil, err
	}
	s.mu.lus[info.Name] = &luRef{lu: lu, refs: 1}
	return lu, nil
}

func (s *Server) releaseLU(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.mu.lus[name]; ok {
		r.refs--
		if r.refs == 0 {
			delete(s.mu.lus, name)
		}
	}
}

// bufPool recycles data buffers by power-of-two size class, so that the
// hot path does not allocate per command. It belongs to one Server.
type bufPool struct {
	classes [25]sync.Pool // 512 B << i
}

func sizeClass(n int) int {
	c, size := 0, 512
	for size < n {
		size <<= 1
		c++
	}
	return c
}

// get returns a buffer of length n (contents undefined).
func (p *bufPool) get(n int) *[]byte {
	c := sizeClass(n)
	if c >= len(p.classes) {
		b := make([]byte, n)
		return &b
	}
	if v := p.classes[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 512<<c)
	return &b
}

func (p *bufPool) put(b *[]byte) {
	if b == nil {
		return
	}
	c := sizeClass(cap(*b))
	if c >= len(p.classes) || 512<<c != cap(*b) {
		return
	}
	p.classes[c].Put(b)
}

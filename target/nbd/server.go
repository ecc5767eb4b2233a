package nbd

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"stor.dev/stor/target"
)

// ErrProtocol reports a client that broke the protocol; its connection is
// dropped. It appears in the connection's log line.
var ErrProtocol = errors.New("nbd: protocol violation")

// Config configures a Server. Catalog is required; zero values of the other
// fields take defaults.
type Config struct {
	// Catalog lists and opens the exports. Each connection opens its
	// Device at NBD_OPT_GO or NBD_OPT_EXPORT_NAME and closes it on
	// disconnect.
	Catalog target.Catalog
	// Logger gets one line per connection lifecycle event, never one per
	// I/O. Nil discards.
	Logger *slog.Logger
	// Registerer, when non-nil, gets the server's metrics.
	Registerer prometheus.Registerer
	// MaxInFlight bounds the requests one connection executes at once;
	// the connection stops reading requests while it is full. Default 64.
	MaxInFlight int
	// HandshakeTimeout bounds option haggling, from accept to the start of
	// transmission. Default 30s.
	HandshakeTimeout time.Duration
	// InlineBelow lets the reader goroutine run a READ or WRITE (of at
	// most 1 MiB, without FUA) itself,
	// instead of handing it to a worker, while recent requests of that
	// type completed faster than this: for a fast device the handoff (a
	// goroutine wakeup, often on another CPU) costs more than the request,
	// and serial execution beats it. A request slower than expected delays
	// the requests behind it on the connection until the average adapts.
	// Zero means DefaultInlineBelow; negative disables.
	InlineBelow time.Duration
	// InlineLargeReadsBelow lets the reader goroutine run a READ of
	// largeRead bytes up to 1 MiB (without FUA) itself, serially, while
	// recent ones took less than this per MiB: such a read served from
	// memory is CPU work (a copy, checksums, a socket write), and when
	// no CPU is spare, the hand-off to a worker and the parallel copies
	// cost more than the overlap buys (scripts/bench's 1 MiB read row on
	// a 2-vCPU VM, 2026-11-26: a median 431 µs of CPU per read inline,
	// 9 cells, against 580 on the workers, 12 cells). Reads that wait on a
	// disk take longer per MiB and stay on the workers, which overlap
	// the waits. Zero means DefaultInlineLargeReadsBelow where
	// GOMAXPROCS is 2 or less, and disabled where it is more (spare CPUs
	// make the workers' parallel copies pay); negative disables.
	InlineLargeReadsBelow time.Duration
	// SpinRead is how long the reader polls an idle connection for the
	// next request before it parks (see spinReader). Zero means
	// DefaultSpinRead; negative disables.
	SpinRead time.Duration
	// DrainTimeout bounds how long Close waits for requests in flight:
	// then the contexts of their device calls are cancelled; replies a
	// client has not read after twice that are abandoned. Default 5s.
	DrainTimeout time.Duration
}

// Defaults of Config.
const (
	DefaultMaxInFlight = 64
	DefaultInlineBelow = 20 * time.Microsecond
	// DefaultInlineLargeReadsBelow: 2 ms per MiB (0.5 GB/s), well above a
	// read from memory (~0.4 ms per MiB on the test VM), below one that
	// waits on most disks.
	DefaultInlineLargeReadsBelow = 2 * time.Millisecond
	DefaultSpinRead              = 50 * time.Microsecond
)

// Server serves the exports of a Catalog over NBD. It is safe for
// concurrent use; Serve may be called on several listeners.
type Server struct {
	cfg     Config
	log     *slog.Logger
	metrics *metrics
	wg      sync.WaitGroup // Serve loops and connections
	nconns  atomic.Int64

	mu struct {
		sync.Mutex
		closed    bool
		listeners map[net.Listener]struct{}
		conns     map[*conn]struct{}
	}
}

// NewServer returns a Server for cfg. It panics if cfg.Catalog is nil.
func NewServer(cfg Config) *Server {
	if cfg.Catalog == nil {
		panic("nbd: Config.Catalog is nil")
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	if cfg.SpinRead == 0 {
		cfg.SpinRead = DefaultSpinRead
	}
	if cfg.InlineBelow == 0 {
		cfg.InlineBelow = DefaultInlineBelow
	}
	if cfg.InlineLargeReadsBelow == 0 {
		cfg.InlineLargeReadsBelow = -1
		if runtime.GOMAXPROCS(0) <= 2 {
			cfg.InlineLargeReadsBelow = DefaultInlineLargeReadsBelow
		}
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	s := &Server{cfg: cfg, log: cfg.Logger, metrics: newMetrics(cfg.Registerer)}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.mu.listeners = map[net.Listener]struct{}{}
	s.mu.conns = map[*conn]struct{}{}
	return s
}

// Serve accepts connections on ln and serves each on its own goroutine
// until Close. It returns nil after Close, or the listener's error. Serve
// closes ln before returning.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.mu.listeners[ln] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.mu.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()

	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: back off and retry,
			// as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("nbd: accept failed; retrying", "err", err, "backoff", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if !s.startConn(nc) {
			nc.Close()
			return nil
		}
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.closed
}

// startConn registers and starts a connection; false if the server closed.
func (s *Server) startConn(nc net.Conn) bool {
	c, ok := s.track(nc)
	if ok {
		go s.run(c)
	}
	return ok
}

// ServeConn serves one already accepted connection and returns when it
// ends. It is how tests and in-process clients attach without a listener.
// After Close it closes nc at once.
func (s *Server) ServeConn(nc net.Conn) {
	if c, ok := s.track(nc); ok {
		s.run(c)
	} else {
		nc.Close()
	}
}

// track registers a new connection unless the server is closed.
func (s *Server) track(nc net.Conn) (*conn, bool) {
	c := newConn(s, nc)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.closed {
		return nil, false
	}
	s.mu.conns[c] = struct{}{}
	s.wg.Add(1)
	s.nconns.Add(1)
	s.metrics.connections.Inc()
	s.metrics.connectionsTotal.Inc()
	return c, true
}

// run serves a tracked connection and untracks it.
func (s *Server) run(c *conn) {
	defer s.wg.Done()
	c.serve()
	s.mu.Lock()
	delete(s.mu.conns, c)
	s.mu.Unlock()
	s.nconns.Add(-1)
	s.metrics.connections.Dec()
}

// Close stops accepting, lets every connection finish the requests it has
// already read (replying to them), closes the connections and their
// devices, and waits for every goroutine of the server. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.mu.closed = true
	for ln := range s.mu.listeners {
		ln.Close()
	}
	for c := range s.mu.conns {
		c.shutdown()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// Connections reports the number of open client connections, in handshake
// or transmission.
func (s *Server) Connections() int { return int(s.nconns.Load()) }

// metrics are the server's Prometheus collectors.
type metrics struct {
	connections       prometheus.Gauge
	connectionsTotal  prometheus.Counter
	handshakeFailures prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		connections: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "stor", Subsystem: "nbd", Name: "connections",
			Help: "Open NBD client connections.",
		}),
		connectionsTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "stor", Subsystem: "nbd", Name: "connections_total",
			Help: "NBD client connections accepted.",
		}),
		handshakeFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "stor", Subsystem: "nbd", Name: "handshake_failures_total",
			Help: "NBD connections that ended before reaching transmission, other than by NBD_OPT_ABORT.",
		}),
	}
	if reg != nil {
		m.connections = register(reg, m.connections)
		m.connectionsTotal = register(reg, m.connectionsTotal)
		m.handshakeFailures = register(reg, m.handshakeFailures)
	}
	return m
}

// register registers c, or returns the collector already registered under
// its name (several servers in one process share the metrics).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if old, ok := are.ExistingCollector.(C); ok {
				return old
			}
		}
		panic(fmt.Sprintf("nbd: registering metrics: %v", err))
	}
	return c
}

// Package sockio reads and writes TCP sockets with raw system calls on
// their non-blocking descriptors, parking on Go's netpoller only when the
// socket is not ready, and can poll a socket for a while before parking.
//
// Why: Go's net.Conn makes every read and write an ordinary system call
// (syscall.Syscall), and the first ordinary system call after the process
// went idle wakes the runtime's monitor thread, sysmon, which then sleeps
// in 20 µs steps until the process is idle again. At queue depth 1 that
// is every op: on the 2-vCPU VM these figures come from, it cost ~2
// context switches and ~50 µs of CPU per replicated 4 KiB write on each
// node, and a parked reader costs an epoll round trip and the wake-up of
// an idle CPU on top. A raw system call (syscall.RawSyscall) skips the
// runtime's syscall bookkeeping, which is safe only for calls that cannot
// block: a non-blocking socket's read or write returns EAGAIN instead.
//
// Deadlines set on the net.Conn apply (the waits go through
// syscall.RawConn). A Conn is a view of one net.Conn; its methods may be
// used concurrently as the net.Conn's may (one reader and one writer at a
// time).
package sockio

import (
	"errors"
	"io"
	"net"
	"syscall"
	"time"
	"unsafe"
)

// Conn wraps a net.Conn. Without a raw descriptor (not a socket: a pipe
// from net.Pipe, a TLS conn) every method falls back to the net.Conn.
type Conn struct {
	nc net.Conn
	rc syscall.RawConn // nil: fall back
}

// New returns a Conn for nc.
func New(nc net.Conn) *Conn {
	c := &Conn{nc: nc}
	if sc, ok := nc.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			c.rc = rc
		}
	}
	return c
}

// Read reads into p like net.Conn.Read. When nothing is there to read
// and spin is positive, it polls the socket for up to spin while keep
// reports true, then parks until the socket is readable. keep may be nil
// (always true).
func (c *Conn) Read(p []byte, spin time.Duration, keep func() bool) (int, error) {
	if c.rc == nil || len(p) == 0 {
		return c.nc.Read(p)
	}
	var (
		n     int
		errno syscall.Errno
		until time.Time
	)
	rerr := c.rc.Read(func(fd uintptr) bool {
		for {
			n, errno = rawIO(syscall.SYS_READ, fd, p)
			switch {
			case errno == syscall.EINTR:
				continue
			case errno != syscall.EAGAIN:
				return true
			case spin <= 0:
				return false
			case until.IsZero():
				until = time.Now().Add(spin)
			case time.Now().After(until) || keep != nil && !keep():
				return false // park until readable
			}
		}
	})
	switch {
	case rerr != nil: // deadline, closed connection
		return 0, rerr
	case errno != 0:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.nc.LocalAddr(), Addr: c.nc.RemoteAddr(), Err: errno}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write writes all of b, parking while the socket is full.
func (c *Conn) Write(b []byte) error {
	if c.rc == nil {
		_, err := c.nc.Write(b)
		return err
	}
	n, errno := 0, syscall.Errno(0)
	rerr := c.rc.Write(func(fd uintptr) bool {
		var full bool
		full, errno = writeSome(fd, b, &n)
		return !full // full: park until writable
	})
	return c.writeErr(rerr, errno)
}

// TryWrite writes as much of b as the socket takes without waiting and
// returns how much that was. An error other than a full socket is
// returned with the count written before it.
func (c *Conn) TryWrite(b []byte) (int, error) {
	if c.rc == nil {
		return 0, ErrNoRaw
	}
	n, errno := 0, syscall.Errno(0)
	rerr := c.rc.Write(func(fd uintptr) bool {
		_, errno = writeSome(fd, b, &n) // full: the caller decides
		return true
	})
	return n, c.writeErr(rerr, errno)
}

// writeSome writes b[*n:] to fd, advancing *n, until all is written, the
// socket is full, or another error.
func writeSome(fd uintptr, b []byte, n *int) (full bool, errno syscall.Errno) {
	for *n < len(b) {
		k, e := rawIO(syscall.SYS_WRITE, fd, b[*n:])
		switch e {
		case 0:
			*n += k
		case syscall.EINTR:
		case syscall.EAGAIN:
			return true, 0
		default:
			return false, e
		}
	}
	return false, 0
}

// ErrNoRaw is TryWrite's answer on a Conn without a raw descriptor.
var ErrNoRaw = errors.New("sockio: no raw descriptor")

func (c *Conn) writeErr(rerr error, errno syscall.Errno) error {
	switch {
	case rerr != nil:
		return rerr
	case errno != 0:
		return &net.OpError{Op: "write", Net: "tcp", Source: c.nc.LocalAddr(), Addr: c.nc.RemoteAddr(), Err: errno}
	}
	return nil
}

// rawIO is read(2) or write(2) of b on fd without the runtime's syscall
// bookkeeping. REQUIRES: fd is non-blocking (a netpoller socket) and b is
// not empty.
func rawIO(trap, fd uintptr, b []byte) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), 0
}

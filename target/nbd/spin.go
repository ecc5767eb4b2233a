package nbd

import (
	"errors"
	"io"
	"net"
	"syscall"
	"time"
)

// spinReader is the transmission reader of a connection. When no request
// has arrived yet and nothing is executing on the workers (queue depth 1:
// the client is busy with the reply it just got), it polls the socket for
// up to Config.SpinRead before parking on the netpoller. A parked reader
// costs an epoll round trip and a goroutine wakeup, often on another CPU,
// per request (a fifth of the CPU of a 4 KiB read at queue depth 1); a
// client at queue depth 1 sends its next request within tens of
// microseconds. With requests executing, it never spins: the CPU is
// theirs.
type spinReader struct {
	nc   net.Conn
	rc   syscall.RawConn // nil: no polling, plain reads
	spin time.Duration
	idle func() bool // nothing is executing on the workers
}

func newSpinReader(nc net.Conn, spin time.Duration, idle func() bool) *spinReader {
	r := &spinReader{nc: nc, spin: spin, idle: idle}
	if sc, ok := nc.(syscall.Conn); ok && spin > 0 {
		if rc, err := sc.SyscallConn(); err == nil {
			r.rc = rc
		}
	}
	return r
}

func (r *spinReader) Read(p []byte) (int, error) {
	if r.rc == nil || len(p) == 0 || !r.idle() {
		return r.nc.Read(p)
	}
	var (
		n     int
		err   error
		until time.Time
	)
	rerr := r.rc.Read(func(fd uintptr) bool {
		for {
			n, err = syscall.Read(int(fd), p)
			switch {
			case err == syscall.EINTR:
				continue
			case err != syscall.EAGAIN:
				return true
			case until.IsZero():
				until = time.Now().Add(r.spin)
			case time.Now().After(until):
				return false // park on the netpoller until readable
			}
		}
	})
	switch {
	case rerr != nil: // deadline, closed connection
		return 0, rerr
	case err != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Err: errors.Join(err)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

package nbd

import (
	"time"

	"stor.dev/stor/target/sockio"
)

// spinReader is the transmission reader of a connection. When no request
// has arrived yet and nothing is executing on the workers (queue depth 1:
// the client is busy with the reply it just got), it polls the socket for
// up to Config.SpinRead before parking on the netpoller. A parked reader
// costs an epoll round trip and a goroutine wakeup, often on another CPU,
// per request (a fifth of the CPU of a 4 KiB read at queue depth 1); a
// client at queue depth 1 sends its next request within tens of
// microseconds. With requests executing, it never spins: the CPU is
// theirs. Its reads are raw system calls (see package sockio).
type spinReader struct {
	sc   *sockio.Conn
	spin time.Duration
	idle func() bool // nothing is executing on the workers
}

func (r *spinReader) Read(p []byte) (int, error) {
	if !r.idle() {
		return r.sc.Read(p, 0, nil)
	}
	return r.sc.Read(p, r.spin, r.idle)
}

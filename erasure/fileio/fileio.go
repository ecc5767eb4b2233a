// Package fileio reads files with raw system calls (syscall.RawSyscall6)
// while they are fast, and decides for other raw file calls (Valve).
//
// Why: an ordinary system call that lasts over 20 µs (a 1 MiB pread from
// the page cache takes 100-250 µs on the test VM) makes the Go runtime's
// sysmon thread hand the caller's P to another thread and keep polling
// every 20 µs; one made while the process is idle wakes sysmon. Each is a
// context switch, tens of microseconds of CPU on a VM (see package
// target/sockio, which does the same for sockets). A raw call skips the
// runtime's bookkeeping but keeps its P for its whole duration: if the
// read waits for a disk, the P runs nothing else meanwhile and a GC
// stop-the-world waits for it. So a Valve turns raw calls off for a while
// after Strikes raw calls in a row took longer than a page-cache access
// should. In a row: on a machine with more runnable threads than CPUs a
// single call is often slow only because its thread was preempted in the
// middle of it (a time slice is milliseconds), which says nothing about
// the file; a disk that stalls writers (dirty-page throttling) or reads
// stalls every call.
package fileio

import (
	"io"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Thresholds: a raw call of n bytes is slow past Slow + n*SlowPerMiB/1MiB;
// after Strikes slow ones in a row, raw calls are off for Pause. Variables
// for tests.
var (
	Slow       = 2 * time.Millisecond
	SlowPerMiB = 4 * time.Millisecond
	Strikes    = int32(3)
	Pause      = 10 * time.Second
)

// A Valve decides whether the reads it serves may be raw. The zero value
// allows them. Safe for concurrent use.
type Valve struct {
	off     atomic.Int64 // UnixNano until which raw calls are off
	strikes atomic.Int32 // slow raw calls in a row
}

// On reports whether raw calls are allowed now.
func (v *Valve) On() bool { return time.Now().UnixNano() >= v.off.Load() }

// ReadAt reads len(p) bytes at off from f like io.ReaderAt (a short count
// comes with an error, io.EOF at the end of the file). The read is raw
// when the Valve allows it and f is an os.File (directly or embedded);
// otherwise it is f.ReadAt. The descriptor stays valid while it is used:
// a concurrent Close waits (syscall.RawConn.Control).
func (v *Valve) ReadAt(f io.ReaderAt, p []byte, off int64) (int, error) {
	sc, ok := f.(syscall.Conn)
	if !ok || len(p) == 0 || !v.On() {
		return f.ReadAt(p, off)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return f.ReadAt(p, off)
	}
	var (
		n     int
		errno syscall.Errno
	)
	if cerr := rc.Control(func(fd uintptr) { n, errno = v.pread(fd, p, off) }); cerr != nil {
		return n, cerr
	}
	return n, result(f, n, len(p), errno)
}

// ReadAtFd is ReadAt on fd, f's descriptor, which the caller keeps open
// for the call (no allocation); fd == InvalidFd means f.ReadAt.
func (v *Valve) ReadAtFd(f io.ReaderAt, fd uintptr, p []byte, off int64) (int, error) {
	if fd == InvalidFd || len(p) == 0 || !v.On() {
		return f.ReadAt(p, off)
	}
	n, errno := v.pread(fd, p, off)
	return n, result(f, n, len(p), errno)
}

// InvalidFd is "no descriptor" (as vfs.InvalidFd).
const InvalidFd = ^uintptr(0)

// pread reads p at off from fd, raw, to the end of the file at most, and
// times itself.
func (v *Valve) pread(fd uintptr, p []byte, off int64) (int, syscall.Errno) {
	start := time.Now()
	n := 0
	for n < len(p) {
		k, _, e := syscall.RawSyscall6(syscall.SYS_PREAD64, fd, uintptr(unsafe.Pointer(&p[n])), uintptr(len(p)-n),
			uintptr(off+int64(n)), 0, 0)
		switch {
		case e == syscall.EINTR:
			continue
		case e != 0:
			v.Timed(start, len(p))
			return n, e
		case k == 0:
			v.Timed(start, len(p))
			return n, 0 // end of file
		}
		n += int(k)
	}
	v.Timed(start, len(p))
	return n, 0
}

// Timed counts a raw call of n bytes that began at start, for callers that
// make their own raw calls: the Strikes-th slow one in a row turns raw
// calls off. (Concurrent callers may miscount a little; it is a hint.)
func (v *Valve) Timed(start time.Time, n int) {
	d := time.Since(start)
	if d <= Slow+time.Duration(int64(SlowPerMiB)*int64(n)>>20) {
		if v.strikes.Load() != 0 {
			v.strikes.Store(0)
		}
		return
	}
	if v.strikes.Add(1) >= Strikes {
		v.strikes.Store(0)
		v.off.Store(start.Add(d + Pause).UnixNano())
	}
}

func result(f io.ReaderAt, n, want int, errno syscall.Errno) error {
	switch {
	case errno != 0:
		return &os.PathError{Op: "pread", Path: name(f), Err: errno}
	case n < want:
		return io.EOF
	}
	return nil
}

func name(f io.ReaderAt) string {
	if nf, ok := f.(interface{ Name() string }); ok {
		return nf.Name()
	}
	return "?"
}

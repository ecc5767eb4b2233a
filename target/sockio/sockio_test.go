package sockio

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"testing"
	"time"
)

// pair returns the two ends of a loopback TCP connection.
func pair(t *testing.T) (a, b net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	a, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b = <-acc
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestWriteReadWhole sends 16 MiB through Write to a reader that reads
// with Read in odd sizes and pauses, so both sides meet a full or empty
// socket and park; every byte arrives, in order.
func TestWriteReadWhole(t *testing.T) {
	a, b := pair(t)
	src := make([]byte, 16<<20)
	for i := range src {
		src[i] = byte(rand.Uint32())
	}
	errc := make(chan error, 1)
	go func() {
		w := New(a)
		for at := 0; at < len(src); {
			n := min(len(src)-at, 1+rand.IntN(3<<20))
			if err := w.Write(src[at : at+n]); err != nil {
				errc <- err
				return
			}
			at += n
		}
		errc <- a.(*net.TCPConn).CloseWrite()
	}()
	r := New(b)
	var got []byte
	buf := make([]byte, 100_000)
	for i := 0; ; i++ {
		n, err := r.Read(buf[:1+rand.IntN(len(buf))], time.Duration(i%3)*50*time.Microsecond, nil)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if i%50 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, src) {
		t.Fatalf("received %d bytes, not the %d sent", len(got), len(src))
	}
}

// TestReadSpinsThenParks: a spinning Read returns data that comes during
// the spin and data that comes long after it (parked); keep false stops
// the spin at once.
func TestReadSpinsThenParks(t *testing.T) {
	a, b := pair(t)
	r := New(b)
	buf := make([]byte, 16)
	for _, after := range []time.Duration{100 * time.Microsecond, 30 * time.Millisecond} {
		go func() {
			time.Sleep(after)
			a.Write([]byte("x"))
		}()
		n, err := r.Read(buf, 5*time.Millisecond, nil)
		if n != 1 || err != nil || buf[0] != 'x' {
			t.Fatalf("after %v: read %d %v", after, n, err)
		}
	}
	calls := 0
	go func() {
		time.Sleep(20 * time.Millisecond)
		a.Write([]byte("y"))
	}()
	n, err := r.Read(buf, time.Hour, func() bool { calls++; return false })
	if n != 1 || err != nil || buf[0] != 'y' {
		t.Fatalf("read %d %v", n, err)
	}
	if calls != 1 {
		t.Fatalf("keep called %d times; a false answer should end the spin", calls)
	}
}

// TestReadDeadline: the net.Conn's read deadline applies to a parked Read.
func TestReadDeadline(t *testing.T) {
	_, b := pair(t)
	b.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	start := time.Now()
	_, err := New(b).Read(make([]byte, 8), time.Millisecond, nil)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past the deadline: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Read returned after %v", d)
	}
}

// TestTryWriteNeverWaits: on a socket whose reader does not read,
// TryWrite returns what fitted (less than asked, no error) instead of
// waiting, and then 0.
func TestTryWriteNeverWaits(t *testing.T) {
	a, b := pair(t)
	w := New(a)
	big := make([]byte, 64<<20)
	n, err := w.TryWrite(big)
	if err != nil || n <= 0 || n >= len(big) {
		t.Fatalf("TryWrite into an unread socket: %d of %d, %v", n, len(big), err)
	}
	if n2, err := w.TryWrite(big[:4096]); n2 != 0 || err != nil {
		t.Fatalf("TryWrite into a full socket: %d, %v", n2, err)
	}
	b.Close()
	time.Sleep(10 * time.Millisecond)
	var werr error
	for i := 0; i < 100 && werr == nil; i++ {
		_, werr = w.TryWrite(big[:4096])
	}
	if werr == nil {
		t.Fatal("TryWrite to a closed peer never failed")
	}
}

// TestFallback: a net.Conn without a descriptor (net.Pipe) works through
// its own methods; TryWrite says it cannot.
func TestFallback(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go New(a).Write([]byte("hello"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(readerFunc(func(p []byte) (int, error) { return New(b).Read(p, time.Millisecond, nil) }), buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if _, err := New(a).TryWrite([]byte("x")); !errors.Is(err, ErrNoRaw) {
		t.Fatalf("TryWrite on a pipe: %v", err)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

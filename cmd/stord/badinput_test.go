package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/target/nbd/nbdtest"
)

// TestE2EBadNBDInput: a wrong export name is refused, out-of-range reads
// and writes past the end get errors, and clients spewing garbage (before
// and after the handshake) are dropped while a well-behaved client keeps
// working; stord then still stops cleanly.
func TestE2EBadNBDInput(t *testing.T) {
	nbdinfo := needTool(t, "nbdinfo")
	qemuIO := needTool(t, "qemu-io")
	d := startDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const size = 1 << 30

	// Wrong export name.
	r := runCmd(t, nbdinfo, d.url("nosuch"))
	if r.code == 0 || !strings.Contains(r.stderr, "nosuch") {
		t.Errorf("nbdinfo of an unknown export: exit %d, stderr %q", r.code, r.stderr)
	}
	if _, err := nbdtest.Dial(ctx, d.nbdAddr, "nosuch"); !errors.Is(err, nbdtest.ErrHandshake) {
		t.Errorf("NBD_OPT_GO for an unknown export: %v, want refusal", err)
	}

	// A good client, connected throughout.
	good, err := nbdtest.Dial(ctx, d.nbdAddr, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	pat := bytes.Repeat([]byte("good"), 16<<10)
	if err := good.WriteAt(ctx, pat, 1<<20, false); err != nil {
		t.Fatal(err)
	}

	// Out of range, as qemu-io users see it...
	for _, c := range []string{"read 1073741312 4096", "write 1073741312 4096", "read 1073741824 512"} {
		r := runCmd(t, qemuIO, "-f", "raw", "-c", c, d.url("vol0"))
		if r.code == 0 || !strings.Contains(r.stdout+r.stderr, "failed") {
			t.Errorf("qemu-io -c %q: exit %d, output %q; want a failure", c, r.code, r.stdout+r.stderr)
		}
	}
	// ...and on the wire, where qemu's own checks do not hide the server's
	// answer: EINVAL for reads, ENOSPC for writes past the end ("Error
	// values"), and the connection goes on.
	var ne *nbdtest.Error
	for _, tc := range []struct {
		name  string
		err   error
		errno uint32
	}{
		{"read at the end", good.ReadAt(ctx, make([]byte, 512), size), nbdtest.EINVAL},
		{"read across the end", good.ReadAt(ctx, make([]byte, 4096), size-512), nbdtest.EINVAL},
		{"read far past the end", good.ReadAt(ctx, make([]byte, 512), 1<<62), nbdtest.EINVAL},
		{"write across the end", good.WriteAt(ctx, make([]byte, 4096), size-512, false), nbdtest.ENOSPC},
		{"write past the end", good.WriteAt(ctx, make([]byte, 512), size, true), nbdtest.ENOSPC},
		{"trim past the end", good.Trim(ctx, size, 4096), nbdtest.EINVAL},
		{"zeroes past the end", good.WriteZeroes(ctx, size-512, 4096, false), nbdtest.ENOSPC},
		{"misaligned read", good.ReadAt(ctx, make([]byte, 512), 100), nbdtest.EINVAL},
	} {
		if !errors.As(tc.err, &ne) || ne.Errno != tc.errno {
			t.Errorf("%s: %v, want server error %d", tc.name, tc.err, tc.errno)
		}
	}
	checkGood := func(when string) {
		t.Helper()
		got := make([]byte, len(pat))
		if err := good.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, pat) {
			t.Fatalf("good client %s: err %v, data equal %v", when, err, bytes.Equal(got, pat))
		}
	}
	checkGood("after out-of-range requests")

	// Garbage before the handshake, garbage requests after it, a request
	// announcing a huge write, and a silent client: each is dropped or
	// ignored alone, while the good client works on.
	rng := rand.New(rand.NewPCG(1, 2))
	var wg sync.WaitGroup
	errc := make(chan error, 64)
	for i := range 16 {
		junk := make([]byte, 64<<10)
		for j := range junk {
			junk[j] = byte(rng.Uint32())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch i % 4 {
			case 0:
				errc <- spewBeforeHandshake(d.nbdAddr, junk)
			case 1:
				errc <- spewAfterHandshake(ctx, d.nbdAddr, junk)
			case 2:
				// A header with a bad magic, then noise.
				errc <- spewAfterHandshake(ctx, d.nbdAddr, append([]byte{0xde, 0xad, 0xbe, 0xef}, junk[:100]...))
			case 3:
				// WRITE announcing 4 GiB - 1 bytes of payload that never come.
				req := binary.BigEndian.AppendUint32(nil, 0x25609513)
				req = binary.BigEndian.AppendUint16(req, 0)
				req = binary.BigEndian.AppendUint16(req, 1)
				req = binary.BigEndian.AppendUint64(req, 7)
				req = binary.BigEndian.AppendUint64(req, 0)
				req = binary.BigEndian.AppendUint32(req, 0xffffffff)
				errc <- spewAfterHandshake(ctx, d.nbdAddr, append(req, junk[:512]...))
			}
		}()
	}
	silent, err := net.Dial("tcp", d.nbdAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	for i := range 50 {
		p := bytes.Repeat([]byte{byte(i)}, 4096)
		if err := good.WriteAt(ctx, p, 8<<20+int64(i)*4096, false); err != nil {
			t.Fatalf("good client write during the garbage: %v", err)
		}
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Error(err)
		}
	}
	checkGood("after the garbage")
	if out := mustRun(t, nbdinfo, d.url("vol0")); !strings.Contains(out, "export-size: 1073741824") {
		t.Errorf("nbdinfo after the garbage:\n%s", out)
	}
	if v, ok := metricValue(d.metrics(), "stor_nbd_handshake_failures_total", nil); !ok || v < 4 {
		t.Errorf("stor_nbd_handshake_failures_total = %v (found %v), want >= 4", v, ok)
	}
}

// spewBeforeHandshake sends junk instead of client flags and options and
// requires the server to hang up.
func spewBeforeHandshake(addr string, junk []byte) error {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	go nc.Write(junk) // may fail once the server hangs up
	return expectHangup(nc, "garbage handshake")
}

// spewAfterHandshake negotiates properly, then sends junk where requests
// belong, and requires the server to hang up.
func spewAfterHandshake(ctx context.Context, addr string, junk []byte) error {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	c, err := nbdtest.Handshake(ctx, nc, "vol0")
	if err != nil {
		return err
	}
	nc.SetWriteDeadline(time.Now().Add(30 * time.Second))
	nc.Write(junk)
	select {
	case <-c.Done():
		return nil
	case <-time.After(30 * time.Second):
		c.Close()
		return errors.New("server kept a connection that sent garbage requests")
	}
}

// expectHangup reads until EOF or error; a timeout means the server kept
// the connection.
func expectHangup(nc net.Conn, what string) error {
	buf := make([]byte, 4096)
	for {
		_, err := nc.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return errors.New("server did not hang up on " + what)
		}
		return nil
	}
}

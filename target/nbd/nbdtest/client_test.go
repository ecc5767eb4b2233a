package nbdtest_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
	"stor.dev/stor/target/nbd"
	"stor.dev/stor/target/nbd/nbdtest"
)

func serve(t *testing.T, geo target.Geometry) string {
	t.Helper()
	cat := blockdevtest.NewCatalog()
	cat.Add("vol1", "id1", blockdevtest.NewMemory(geo))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Catalog: cat})
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

func TestClientRoundTrip(t *testing.T) {
	addr := serve(t, target.Geometry{Size: 8 << 20, BlockSize: 512})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := nbdtest.Dial(ctx, addr, "vol1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Size != 8<<20 || c.Flags&nbdtest.FlagSendFlush == 0 {
		t.Fatalf("size %d flags %#x", c.Size, c.Flags)
	}
	// Pipelined writes and reads from many goroutines.
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(g + 1)}, 64<<10)
			off := int64(g) * 64 << 10
			if err := c.WriteAt(ctx, p, off, g%2 == 0); err != nil {
				errc <- err
				return
			}
			q := make([]byte, len(p))
			if err := c.ReadAt(ctx, q, off); err != nil {
				errc <- err
				return
			}
			if !bytes.Equal(p, q) {
				errc <- errors.New("read back differs")
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(ctx, 0, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(ctx, 64<<10, 64<<10, false); err != nil {
		t.Fatal(err)
	}
	q := make([]byte, 128<<10)
	if err := c.ReadAt(ctx, q, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(q, make([]byte, len(q))) {
		t.Error("trimmed and zeroed range does not read as zeros")
	}
	// Out of range: EINVAL for reads, ENOSPC for writes; the connection
	// stays usable.
	var ne *nbdtest.Error
	if err := c.ReadAt(ctx, make([]byte, 4096), 8<<20); !errors.As(err, &ne) || ne.Errno != nbdtest.EINVAL {
		t.Errorf("read past the end: %v, want EINVAL", err)
	}
	if err := c.WriteAt(ctx, make([]byte, 4096), 8<<20-512, false); !errors.As(err, &ne) || ne.Errno != nbdtest.ENOSPC {
		t.Errorf("write past the end: %v, want ENOSPC", err)
	}
	if err := c.ReadAt(ctx, q[:512], 0); err != nil {
		t.Errorf("read after errors: %v", err)
	}
}

func TestClientUnknownExport(t *testing.T) {
	addr := serve(t, target.Geometry{Size: 1 << 20, BlockSize: 512})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := nbdtest.Dial(ctx, addr, "nosuch"); !errors.Is(err, nbdtest.ErrHandshake) {
		t.Fatalf("Dial nosuch = %v, want ErrHandshake", err)
	}
}

func TestClientServerGone(t *testing.T) {
	cat := blockdevtest.NewCatalog()
	cat.Add("vol1", "id1", blockdevtest.NewMemory(target.Geometry{Size: 1 << 20, BlockSize: 512}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.Config{Catalog: cat})
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := nbdtest.Dial(ctx, ln.Addr().String(), "vol1")
	if err != nil {
		t.Fatal(err)
	}
	srv.Close()
	<-done
	<-c.Done()
	if err := c.Flush(ctx); !errors.Is(err, nbdtest.ErrDisconnected) {
		t.Fatalf("Flush after server close = %v, want ErrDisconnected", err)
	}
	c.Close()
}

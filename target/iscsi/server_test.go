package iscsi

import (
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"testing"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
	"stor.dev/stor/target/scsi"
)

// testServer runs a Server on 127.0.0.1:0 over an in-memory catalog with
// the exports "disk" (512-byte blocks) and "disk4k" (4096-byte blocks).
type testServer struct {
	srv  *Server
	addr string
	cat  *blockdevtest.Catalog
	done chan error
}

func startServer(t testing.TB, cfg Config, size int64) *testServer {
	t.Helper()
	cat := blockdevtest.NewCatalog()
	cat.Add("disk", "vol-0001", blockdevtest.NewMemory(target.Geometry{Size: size, BlockSize: 512}))
	cat.Add("disk4k", "vol-0002", blockdevtest.NewMemory(target.Geometry{Size: size, BlockSize: 4096}))
	if cfg.Catalog == nil {
		cfg.Catalog = cat
	}
	if cfg.PR == nil {
		cfg.PR = scsi.NewMemoryPRStore()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Portal = ln.Addr().String()
	ts := &testServer{srv: NewServer(cfg), addr: ln.Addr().String(), cat: cat, done: make(chan error, 1)}
	go func() { ts.done <- ts.srv.Serve(ln) }()
	t.Cleanup(func() {
		ts.srv.Close()
		if err := <-ts.done; err != ErrClosed {
			t.Errorf("Serve returned %v", err)
		}
	})
	return ts
}

func (ts *testServer) url(name string) string {
	return "iscsi://" + ts.addr + "/" + IQNPrefix + name + "/0"
}

// needTool skips (or, under CI=true, fails) when a tool is missing.
func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not installed", name)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

func TestIQNPrefixMatchesAPI(t *testing.T) {
	if got := api.IQN("x"); got != IQNPrefix+"x" {
		t.Fatalf("api.IQN = %q, prefix %q", got, IQNPrefix)
	}
}

// TestServeForever serves until killed when STOR_ISCSI_SERVE is set: a
// manual harness for running initiators by hand.
func TestServeForever(t *testing.T) {
	if os.Getenv("STOR_ISCSI_SERVE") == "" {
		t.Skip("set STOR_ISCSI_SERVE=1 to serve by hand")
	}
	ts := startServer(t, Config{Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))}, 64<<20)
	t.Logf("serving on %s", ts.addr)
	os.WriteFile("/tmp/iscsi-addr", []byte(ts.addr), 0o644)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
}

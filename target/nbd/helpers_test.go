package nbd

import (
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"stor.dev/stor/target"
	"stor.dev/stor/target/blockdevtest"
)

// testServer is a Server listening on 127.0.0.1 over a catalog of Memory
// devices.
type testServer struct {
	*Server
	addr string
	cat  target.Catalog
	done chan error
}

// startServer serves cat on 127.0.0.1:0; Close and the Serve result are
// checked at cleanup.
func startServer(t testing.TB, cat target.Catalog, cfg Config) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Catalog = cat
	if cfg.Logger == nil && testing.Verbose() {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	ts := &testServer{Server: NewServer(cfg), addr: ln.Addr().String(), cat: cat, done: make(chan error, 1)}
	go func() { ts.done <- ts.Serve(ln) }()
	t.Cleanup(func() {
		ts.Close()
		if err := <-ts.done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

// onlyConn returns the server's one connection (the test made exactly one).
func (ts *testServer) onlyConn(t testing.TB) *conn {
	t.Helper()
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if len(ts.mu.conns) != 1 {
		t.Fatalf("%d connections, want 1", len(ts.mu.conns))
	}
	for c := range ts.mu.conns {
		return c
	}
	return nil
}

// memCatalog returns a catalog holding one Memory device called name.
func memCatalog(name string, geo target.Geometry) (*blockdevtest.Catalog, *blockdevtest.Memory) {
	cat := blockdevtest.NewCatalog()
	m := blockdevtest.NewMemory(geo)
	cat.Add(name, "id-"+name, m)
	return cat, m
}

// needTool returns the path of an external tool; a missing tool skips the
// test, or fails it when CI=true.
func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not installed (CI=true): %v", name, err)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
}

package head

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"stor.dev/stor/ctl/cluster"
)

// TestHTTPControlSkipsAHungNode: a control node that accepts connections
// but never answers (cut off: packets dropped) costs one attempt's
// timeout, not the caller's whole deadline; the next node answers, and the
// next call starts there. A 503 (no leader) passes to the next node at
// once; an API refusal is an answer.
func TestHTTPControlSkipsAHungNode(t *testing.T) {
	release := make(chan struct{})
	hung := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer hung.Close()
	defer close(release)
	noLeader := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte(`{"error":"no leader is known","code":"unavailable"}`))
	}))
	defer noLeader.Close()
	calls := 0
	good := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls++
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/v1/cluster/volumes/nope" {
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"error":"volume \"nope\"","code":"not_found"}`))
			return
		}
		json.NewEncoder(w).Encode([]cluster.Volume{{Name: "v", ID: "vol-000001"}})
	}))
	defer good.Close()

	h := NewHTTPControl([]string{hung.URL, noLeader.URL, good.URL}, &http.Client{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	vols, err := h.ClusterVolumes(ctx)
	if err != nil || len(vols) != 1 || vols[0].Name != "v" {
		t.Fatalf("ClusterVolumes: %v, %+v", err, vols)
	}
	if took := time.Since(start); took < attemptTimeout || took > attemptTimeout+3*time.Second {
		t.Fatalf("first call took %v: want about one attempt timeout (%v)", took, attemptTimeout)
	}
	start = time.Now()
	if _, err := h.ClusterVolumes(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("second call took %v: it should start at the node that answered", took)
	}
	if _, err := h.ClusterVolume(ctx, "nope"); err == nil {
		t.Fatal("a refusal (404) read as success")
	}
	if calls != 3 {
		t.Fatalf("the good node got %d calls, want 3 (a refusal is an answer: no retry elsewhere)", calls)
	}
}

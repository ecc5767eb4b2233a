package control_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client/clienttest"
	"stor.dev/stor/ctl/control"
)

// syncBuffer is a log sink safe for the server's goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// fixture is a handler over a fake backend holding vol0 (1 GiB) and busy
// (1 GiB, 2 connections).
type fixture struct {
	vols *clienttest.Volumes
	h    http.Handler
	log  *syncBuffer
}

func newFixture(t *testing.T, wrap func(*clienttest.Volumes) control.Volumes) *fixture {
	t.Helper()
	f := &fixture{vols: clienttest.NewVolumes(), log: &syncBuffer{}}
	ctx := t.Context()
	for _, name := range []string{"vol0", "busy"} {
		if _, err := f.vols.CreateVolume(ctx, api.CreateVolume{Name: name, Size: 1 << 30}); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.vols.SetConnections("busy", 2); err != nil {
		t.Fatal(err)
	}
	var backend control.Volumes = f.vols
	if wrap != nil {
		backend = wrap(f.vols)
	}
	f.h = control.NewHandler(control.HandlerConfig{
		Volumes: backend,
		Status:  f.vols.Status,
		Metrics: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "# TYPE stor_up gauge\nstor_up 1\n")
		}),
		Logger: slog.New(slog.NewTextHandler(f.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	return f
}

func (f *fixture) do(t *testing.T, method, path, body string) *httptest.ResponseRecorder {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req := httptest.NewRequestWithContext(t.Context(), method, path, r)
	w := httptest.NewRecorder()
	f.h.ServeHTTP(w, req)
	return w
}

// backend lets wrappers embed a control.Volumes without a field named
// Volumes.
type backend = control.Volumes

// panicky panics in Volumes, to show the handler survives a broken backend.
type panicky struct{ backend }

func (panicky) Volumes(context.Context) ([]api.Volume, error) { panic("backend bug") }

// noCHAP hides the fake's CHAPSetter.
type noCHAP struct{ backend }

func TestHandler(t *testing.T) {
	big := `{"name":"x","size":1024,"pad":"` + strings.Repeat("a", control.MaxBodyBytes) + `"}`
	tests := []struct {
		name         string
		wrap         func(*clienttest.Volumes) control.Volumes
		setup        func(*clienttest.Volumes)
		method, path string
		body         string
		status       int
		code         string // for non-2xx: the api.Error code
		contains     string // in the body
		check        func(*testing.T, *fixture, *httptest.ResponseRecorder)
	}{
		// status
		{name: "status", method: "GET", path: "/v1/status", status: 200, contains: `"node": "node-1"`},
		{name: "status/head", method: "HEAD", path: "/v1/status", status: 200},

		// list
		{name: "list", method: "GET", path: "/v1/volumes", status: 200, check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
			var vols []api.Volume
			mustDecode(t, w, &vols)
			if len(vols) != 2 || vols[0].Name != "busy" || vols[1].Name != "vol0" {
				t.Errorf("list = %+v, want busy, vol0", vols)
			}
		}},
		{name: "list/empty", setup: func(v *clienttest.Volumes) {
			v.DeleteVolume(context.Background(), "vol0", true)
			v.DeleteVolume(context.Background(), "busy", true)
		}, method: "GET", path: "/v1/volumes", status: 200, contains: "[]"},
		{name: "list/internal", setup: failNext(errors.New("disk on fire")), method: "GET", path: "/v1/volumes", status: 500, code: "internal", contains: "disk on fire"},
		{name: "list/panic", wrap: func(v *clienttest.Volumes) control.Volumes { return panicky{v} },
			method: "GET", path: "/v1/volumes", status: 500, code: "internal", check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
				if !strings.Contains(f.log.String(), "backend bug") {
					t.Errorf("panic not logged: %s", f.log.String())
				}
			}},

		// create
		{name: "create", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1073741824}`, status: 201,
			check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
				var v api.Volume
				mustDecode(t, w, &v)
				if v.Name != "v1" || v.Size != 1<<30 || v.BlockSize != 512 || v.PartitionSize != api.DefaultPartitionSize || v.Replicas != 1 {
					t.Errorf("created %+v, want defaults filled", v)
				}
				if loc := w.Header().Get("Location"); loc != "/v1/volumes/v1" {
					t.Errorf("Location = %q", loc)
				}
				if !strings.Contains(f.log.String(), "volume created") {
					t.Errorf("create not logged: %s", f.log.String())
				}
			}},
		{name: "create/all-fields", method: "POST", path: "/v1/volumes",
			body: `{"name":"v.2_x-y","size":8388608,"block_size":4096,"partition_size":2097152,"replicas":3}`, status: 201,
			contains: `"partition_count": 4`},
		{name: "create/duplicate", method: "POST", path: "/v1/volumes", body: `{"name":"vol0","size":1048576}`, status: 409, code: "exists"},
		{name: "create/no-space", setup: func(v *clienttest.Volumes) { v.SetCapacity(3 << 30) },
			method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":2147483648}`, status: 507, code: "no_space"},
		{name: "create/bad-name", method: "POST", path: "/v1/volumes", body: `{"name":"Bad!","size":1048576}`, status: 400, code: "invalid", contains: "volume name"},
		{name: "create/empty-name", method: "POST", path: "/v1/volumes", body: `{"size":1048576}`, status: 400, code: "invalid"},
		{name: "create/zero-size", method: "POST", path: "/v1/volumes", body: `{"name":"v1"}`, status: 400, code: "invalid", contains: "size 0"},
		{name: "create/negative-size", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":-512}`, status: 400, code: "invalid"},
		{name: "create/huge", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":2251799813685248}`, status: 400, code: "invalid", contains: "maximum"},
		{name: "create/unaligned-size", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1000}`, status: 400, code: "invalid", contains: "multiple of the block size"},
		{name: "create/unaligned-4k", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1536,"block_size":4096}`, status: 400, code: "invalid"},
		{name: "create/block-size", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1048576,"block_size":1024}`, status: 400, code: "invalid", contains: "block size 1024"},
		{name: "create/small-partition", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1048576,"partition_size":4096}`, status: 400, code: "invalid", contains: "partition size"},
		{name: "create/unaligned-partition", method: "POST", path: "/v1/volumes",
			body: `{"name":"v1","size":4194304,"block_size":4096,"partition_size":1049088}`, status: 400, code: "invalid", contains: "partition size"},
		{name: "create/replicas-4", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1048576,"replicas":4}`, status: 400, code: "invalid", contains: "replicas"},
		{name: "create/replicas-negative", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1048576,"replicas":-1}`, status: 400, code: "invalid"},
		{name: "create/bad-json", method: "POST", path: "/v1/volumes", body: `{"name":`, status: 400, code: "invalid"},
		{name: "create/wrong-type", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":"1G"}`, status: 400, code: "invalid"},
		{name: "create/unknown-field", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1048576,"blocksize":4096}`, status: 400, code: "invalid", contains: "blocksize"},
		{name: "create/empty-body", method: "POST", path: "/v1/volumes", status: 400, code: "invalid", contains: "empty"},
		{name: "create/trailing", method: "POST", path: "/v1/volumes", body: `{"name":"v1","size":1048576} {}`, status: 400, code: "invalid", contains: "after"},
		{name: "create/array", method: "POST", path: "/v1/volumes", body: `[]`, status: 400, code: "invalid"},
		{name: "create/too-large", method: "POST", path: "/v1/volumes", body: big, status: 413, code: "invalid"},
		{name: "create/internal", setup: failNext(errors.New("raft: no leader")), method: "POST", path: "/v1/volumes",
			body: `{"name":"v1","size":1048576}`, status: 500, code: "internal"},

		// show
		{name: "show", method: "GET", path: "/v1/volumes/vol0", status: 200, contains: `"iqn": "iqn.2026-11.dev.stor:vol0"`},
		{name: "show/unknown", method: "GET", path: "/v1/volumes/nope", status: 404, code: "not_found", contains: `volume \"nope\": not found`},
		{name: "show/bad-name", method: "GET", path: "/v1/volumes/UPPER", status: 400, code: "invalid"},
		{name: "show/escaped-name", method: "GET", path: "/v1/volumes/a%2Fb", status: 400, code: "invalid"},
		{name: "show/trailing-slash", method: "GET", path: "/v1/volumes/", status: 404, code: "not_found"},

		// resize
		{name: "resize", method: "POST", path: "/v1/volumes/vol0/resize", body: `{"size":2147483648}`, status: 200,
			check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
				var v api.Volume
				mustDecode(t, w, &v)
				if v.Size != 2<<30 || v.Partitions != 2 {
					t.Errorf("resized %+v", v)
				}
				if !strings.Contains(f.log.String(), "volume resized") {
					t.Errorf("resize not logged")
				}
			}},
		{name: "resize/same", method: "POST", path: "/v1/volumes/vol0/resize", body: `{"size":1073741824}`, status: 200},
		{name: "resize/shrink", method: "POST", path: "/v1/volumes/vol0/resize", body: `{"size":1048576}`, status: 400, code: "invalid", contains: "cannot shrink"},
		{name: "resize/zero", method: "POST", path: "/v1/volumes/vol0/resize", body: `{"size":0}`, status: 400, code: "invalid"},
		{name: "resize/unaligned", method: "POST", path: "/v1/volumes/vol0/resize", body: `{"size":2147483649}`, status: 400, code: "invalid", contains: "multiple"},
		{name: "resize/unknown", method: "POST", path: "/v1/volumes/nope/resize", body: `{"size":2147483648}`, status: 404, code: "not_found"},
		{name: "resize/bad-name", method: "POST", path: "/v1/volumes/-x/resize", body: `{"size":2147483648}`, status: 400, code: "invalid"},
		{name: "resize/bad-json", method: "POST", path: "/v1/volumes/vol0/resize", body: `size=2G`, status: 400, code: "invalid"},
		{name: "resize/no-space", setup: func(v *clienttest.Volumes) { v.SetCapacity(3 << 30) },
			method: "POST", path: "/v1/volumes/vol0/resize", body: `{"size":4294967296}`, status: 507, code: "no_space"},

		// delete
		{name: "delete", method: "DELETE", path: "/v1/volumes/vol0", status: 204, check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
			if f.vols.Len() != 1 {
				t.Errorf("%d volumes left, want 1", f.vols.Len())
			}
			if w.Body.Len() != 0 {
				t.Errorf("204 with body %q", w.Body)
			}
		}},
		{name: "delete/in-use", method: "DELETE", path: "/v1/volumes/busy", status: 409, code: "in_use", contains: "2 connections"},
		{name: "delete/force", method: "DELETE", path: "/v1/volumes/busy?force=1", status: 204},
		{name: "delete/force-true", method: "DELETE", path: "/v1/volumes/busy?force=true", status: 204},
		{name: "delete/force-0", method: "DELETE", path: "/v1/volumes/busy?force=0", status: 409, code: "in_use"},
		{name: "delete/force-bad", method: "DELETE", path: "/v1/volumes/busy?force=banana", status: 400, code: "invalid"},
		{name: "delete/unknown", method: "DELETE", path: "/v1/volumes/nope", status: 404, code: "not_found"},
		{name: "delete/bad-name", method: "DELETE", path: "/v1/volumes/x%20y", status: 400, code: "invalid"},

		// chap
		{name: "chap", method: "POST", path: "/v1/volumes/vol0/chap",
			body: `{"user":"alice","secret":"0123456789abcdef","mutual_user":"target","mutual_secret":"fedcba9876543210"}`, status: 204,
			check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
				c, _ := f.vols.CHAP("vol0")
				if c.User != "alice" || c.MutualSecret != "fedcba9876543210" {
					t.Errorf("chap = %+v", c)
				}
				if strings.Contains(f.log.String(), "0123456789abcdef") {
					t.Errorf("secret logged: %s", f.log.String())
				}
				if w := f.do(t, "GET", "/v1/volumes/vol0", ""); !strings.Contains(w.Body.String(), `"chap": true`) ||
					strings.Contains(w.Body.String(), "0123456789abcdef") {
					t.Errorf("show after chap: %s", w.Body)
				}
			}},
		{name: "chap/off", method: "POST", path: "/v1/volumes/vol0/chap", body: `{"user":""}`, status: 204},
		{name: "chap/short-secret", method: "POST", path: "/v1/volumes/vol0/chap", body: `{"user":"alice","secret":"short"}`, status: 400, code: "invalid",
			check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
				if strings.Contains(w.Body.String(), "short\"") {
					t.Errorf("secret echoed: %s", w.Body)
				}
			}},
		{name: "chap/same-mutual", method: "POST", path: "/v1/volumes/vol0/chap",
			body: `{"user":"alice","secret":"0123456789abcdef","mutual_user":"t","mutual_secret":"0123456789abcdef"}`, status: 400, code: "invalid"},
		{name: "chap/secret-without-user", method: "POST", path: "/v1/volumes/vol0/chap", body: `{"secret":"0123456789abcdef"}`, status: 400, code: "invalid"},
		{name: "chap/unknown", method: "POST", path: "/v1/volumes/nope/chap", body: `{"user":"alice","secret":"0123456789abcdef"}`, status: 404, code: "not_found"},
		{name: "chap/unsupported", wrap: func(v *clienttest.Volumes) control.Volumes { return noCHAP{v} },
			method: "POST", path: "/v1/volumes/vol0/chap", body: `{"user":"alice","secret":"0123456789abcdef"}`, status: 404, code: "not_found", contains: "not supported"},

		// metrics, unknown routes, wrong methods
		{name: "metrics", method: "GET", path: "/metrics", status: 200, contains: "stor_up 1"},
		{name: "unknown-route", method: "GET", path: "/v2/volumes", status: 404, code: "not_found", contains: "no route"},
		{name: "root", method: "GET", path: "/", status: 404, code: "not_found"},
		{name: "wrong-method/volumes", method: "PUT", path: "/v1/volumes", status: 405, code: "invalid",
			check: func(t *testing.T, f *fixture, w *httptest.ResponseRecorder) {
				if a := w.Header().Get("Allow"); a != "GET, POST" {
					t.Errorf("Allow = %q", a)
				}
			}},
		{name: "wrong-method/volume", method: "PATCH", path: "/v1/volumes/vol0", status: 405, code: "invalid"},
		{name: "wrong-method/resize", method: "GET", path: "/v1/volumes/vol0/resize", status: 405, code: "invalid"},
		{name: "wrong-method/status", method: "POST", path: "/v1/status", status: 405, code: "invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, tt.wrap)
			if tt.setup != nil {
				tt.setup(f.vols)
			}
			w := f.do(t, tt.method, tt.path, tt.body)
			if w.Code != tt.status {
				t.Fatalf("%s %s = %d %s, want %d", tt.method, tt.path, w.Code, w.Body, tt.status)
			}
			if tt.code != "" {
				var e api.Error
				mustDecode(t, w, &e)
				if e.Code != tt.code || e.Error == "" {
					t.Errorf("error body %+v, want code %q and a message", e, tt.code)
				}
			}
			if w.Code != 204 && tt.method != "HEAD" && tt.path != "/metrics" {
				if ct := w.Header().Get("Content-Type"); ct != "application/json" {
					t.Errorf("Content-Type = %q", ct)
				}
			}
			if tt.contains != "" && !strings.Contains(w.Body.String(), tt.contains) {
				t.Errorf("body %s does not contain %q", w.Body, tt.contains)
			}
			if tt.check != nil {
				tt.check(t, f, w)
			}
		})
	}
}

func failNext(err error) func(*clienttest.Volumes) {
	return func(v *clienttest.Volumes) { v.FailNext(err) }
}

func mustDecode(t *testing.T, w *httptest.ResponseRecorder, v any) {
	t.Helper()
	if err := json.Unmarshal(w.Body.Bytes(), v); err != nil {
		t.Fatalf("decode %q: %v", w.Body, err)
	}
}

// TestHandlerDefaults: without Status and Metrics hooks the handler still
// answers status (from Volumes) and 404s /metrics.
func TestHandlerDefaults(t *testing.T) {
	vols := clienttest.NewVolumes()
	vols.CreateVolume(t.Context(), api.CreateVolume{Name: "a", Size: 1 << 20})
	h := control.NewHandler(control.HandlerConfig{Volumes: vols, Logger: slog.New(slog.DiscardHandler)})
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("GET", "/v1/status", nil))
	var st api.Status
	if err := json.Unmarshal(w.Body.Bytes(), &st); err != nil || w.Code != 200 || st.Volumes != 1 || !st.Healthy || st.Roles == nil {
		t.Errorf("status = %d %s (%v)", w.Code, w.Body, err)
	}
	w = httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("GET", "/metrics", nil))
	if w.Code != 404 {
		t.Errorf("/metrics without a handler = %d", w.Code)
	}
}

func TestErrorStatus(t *testing.T) {
	for _, c := range api.Codes {
		status, body := control.ErrorStatus(errors.Join(errors.New("context"), c.Err))
		if status != c.Status || body.Code != c.Code {
			t.Errorf("%v -> %d %q, want %d %q", c.Err, status, body.Code, c.Status, c.Code)
		}
	}
	if status, body := control.ErrorStatus(errors.New("boom")); status != 500 || body.Code != "internal" {
		t.Errorf("plain error -> %d %q", status, body.Code)
	}
}

func TestCheckCreateVolumeDefaults(t *testing.T) {
	req, err := control.CheckCreateVolume(api.CreateVolume{Name: "a", Size: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if req.BlockSize != 512 || req.PartitionSize != api.DefaultPartitionSize || req.Replicas != 0 {
		t.Errorf("defaults: %+v", req)
	}
}

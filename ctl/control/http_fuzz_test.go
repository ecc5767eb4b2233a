package control_test

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client/clienttest"
	"stor.dev/stor/ctl/control"
)

// FuzzHandler sends arbitrary requests: the handler never panics, never
// answers 500 over a healthy backend, and every refusal is a JSON api.Error
// with a known code.
func FuzzHandler(f *testing.F) {
	seeds := []struct{ method, path, body string }{
		{"GET", "/v1/status", ""},
		{"GET", "/v1/volumes", ""},
		{"POST", "/v1/volumes", `{"name":"a","size":1048576}`},
		{"POST", "/v1/volumes", `{"name":"a","size":1048576,"block_size":4096,"partition_size":1048576,"replicas":3}`},
		{"POST", "/v1/volumes", `{"name":"vol0","size":-1}`},
		{"POST", "/v1/volumes", `{"name":"a","size":1e300}`},
		{"POST", "/v1/volumes", `{"name":"a","size":9223372036854775807,"block_size":-4096}`},
		{"POST", "/v1/volumes", `{"name":"a","size":1048576,"partition_size":9223372036854775807}`},
		{"GET", "/v1/volumes/vol0", ""},
		{"POST", "/v1/volumes/vol0/resize", `{"size":2147483648}`},
		{"POST", "/v1/volumes/vol0/resize", `{"size":9223372036854775807}`},
		{"DELETE", "/v1/volumes/vol0?force=1", ""},
		{"POST", "/v1/volumes/vol0/chap", `{"user":"u","secret":"0123456789abc"}`},
		{"PUT", "/v1/volumes/%2e%2e", "{"},
		{"GET", "/metrics", ""},
	}
	for _, s := range seeds {
		f.Add(s.method, s.path, s.body)
	}
	codes := map[string]bool{}
	for _, c := range api.Codes {
		codes[c.Code] = true
	}
	f.Fuzz(func(t *testing.T, method, path, body string) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \t\r\n#") || strings.ContainsAny(method, " \t\r\n/()<>@,;:\\\"[]?={}") || method == "" {
			t.Skip()
		}
		vols := clienttest.NewVolumes()
		if _, err := vols.CreateVolume(t.Context(), api.CreateVolume{Name: "vol0", Size: 1 << 30}); err != nil {
			t.Fatal(err)
		}
		h := control.NewHandler(control.HandlerConfig{Volumes: vols, Status: vols.Status, Logger: slog.New(slog.DiscardHandler)})
		req, err := http.NewRequestWithContext(t.Context(), method, "http://stor"+path, strings.NewReader(body))
		if err != nil {
			t.Skip()
		}
		req.RequestURI = path
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code >= 500 {
			t.Fatalf("%s %s %q -> %d %s", method, path, body, w.Code, w.Body)
		}
		if w.Code >= 400 && method != "HEAD" {
			var e api.Error
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || !codes[e.Code] || e.Error == "" {
				t.Fatalf("%s %s %q -> %d with body %q", method, path, body, w.Code, w.Body)
			}
		}
	})
}

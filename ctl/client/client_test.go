package client_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/client/clienttest"
)

func TestVolumeLifecycle(t *testing.T) {
	srv, vols := clienttest.NewServer(t, nil)
	c := client.New(srv.URL+"/", srv.Client()) // a trailing slash is fine
	ctx := t.Context()

	if list, err := c.Volumes(ctx); err != nil || list == nil || len(list) != 0 {
		t.Fatalf("Volumes on empty = %v, %v; want empty non-nil", list, err)
	}
	v, err := c.CreateVolume(ctx, api.CreateVolume{Name: "a", Size: 1 << 30, BlockSize: 4096, PartitionSize: 256 << 20, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	if v.Name != "a" || v.Size != 1<<30 || v.BlockSize != 4096 || v.Partitions != 4 || v.Replicas != 2 || v.IQN != api.IQN("a") {
		t.Errorf("created %+v", v)
	}
	if _, err := c.CreateVolume(ctx, api.CreateVolume{Name: "b", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	list, err := c.Volumes(ctx)
	if err != nil || len(list) != 2 || list[0].Name != "a" || list[1].Name != "b" {
		t.Fatalf("Volumes = %+v, %v", list, err)
	}
	got, err := c.Volume(ctx, "a")
	if err != nil || got.ID != v.ID {
		t.Fatalf("Volume(a) = %+v, %v", got, err)
	}
	got, err = c.ResizeVolume(ctx, "a", 2<<30)
	if err != nil || got.Size != 2<<30 || got.Partitions != 8 {
		t.Fatalf("ResizeVolume = %+v, %v", got, err)
	}
	if err := c.SetCHAP(ctx, "a", api.SetCHAP{User: "u", Secret: "0123456789ab"}); err != nil {
		t.Fatal(err)
	}
	if ch, _ := vols.CHAP("a"); ch.User != "u" {
		t.Errorf("CHAP = %+v", ch)
	}
	vols.SetConnections("a", 1)
	if err := c.DeleteVolume(ctx, "a", false); !errors.Is(err, api.ErrInUse) {
		t.Fatalf("DeleteVolume busy = %v, want ErrInUse", err)
	}
	if err := c.DeleteVolume(ctx, "a", true); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteVolume(ctx, "b", false); err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil || st.Node != "node-1" || st.Volumes != 0 || !st.Healthy {
		t.Fatalf("Status = %+v, %v", st, err)
	}
}

func TestServerErrors(t *testing.T) {
	srv, vols := clienttest.NewServer(t, nil)
	c := client.New(srv.URL, srv.Client())
	ctx := t.Context()
	if _, err := c.CreateVolume(ctx, api.CreateVolume{Name: "a", Size: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		setup  func()
		call   func() error
		want   error
		status int
		msg    string
	}{
		{"not-found", nil, func() error { _, err := c.Volume(ctx, "nope"); return err }, api.ErrNotFound, 404, `volume "nope": not found`},
		{"exists", nil, func() error {
			_, err := c.CreateVolume(ctx, api.CreateVolume{Name: "a", Size: 1 << 20})
			return err
		}, api.ErrExists, 409, `volume "a": already exists`},
		{"invalid-name", nil, func() error {
			_, err := c.CreateVolume(ctx, api.CreateVolume{Name: "A", Size: 1 << 20})
			return err
		}, api.ErrInvalid, 400, `volume name "A"`},
		{"invalid-path-name", nil, func() error { _, err := c.Volume(ctx, "../etc"); return err }, api.ErrInvalid, 400, `volume name "../etc"`},
		{"shrink", nil, func() error { _, err := c.ResizeVolume(ctx, "a", 1<<20); return err }, api.ErrInvalid, 400, "cannot shrink"},
		{"in-use", func() { vols.SetConnections("a", 3) }, func() error { return c.DeleteVolume(ctx, "a", false) }, api.ErrInUse, 409, "3 connections"},
		{"no-space", func() { vols.SetCapacity(1 << 30) }, func() error {
			_, err := c.CreateVolume(ctx, api.CreateVolume{Name: "b", Size: 1 << 20})
			return err
		}, api.ErrNoSpace, 507, "does not fit"},
		{"internal", func() { vols.FailNext(errors.New("disk on fire")) }, func() error { _, err := c.Volumes(ctx); return err }, api.ErrInternal, 500, "disk on fire"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.setup != nil {
				tt.setup()
			}
			err := tt.call()
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			var ce *client.Error
			if !errors.As(err, &ce) || ce.Status != tt.status {
				t.Fatalf("err %#v, want *client.Error with status %d", err, tt.status)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("message %q does not contain %q", err, tt.msg)
			}
		})
	}
}

func TestUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	c := client.New(addr, nil) // no scheme: http:// is assumed
	if c.URL() != "http://"+addr {
		t.Errorf("URL = %q", c.URL())
	}
	_, err = c.Status(t.Context())
	if !errors.Is(err, client.ErrUnreachable) || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("err = %v, want ErrUnreachable and ECONNREFUSED", err)
	}
	if !strings.Contains(err.Error(), "http://"+addr) {
		t.Errorf("message %q does not name the URL", err)
	}
}

func TestCanceled(t *testing.T) {
	srv, _ := clienttest.NewServer(t, nil)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := client.New(srv.URL, srv.Client()).Volumes(ctx)
	if !errors.Is(err, context.Canceled) || errors.Is(err, client.ErrUnreachable) {
		t.Fatalf("err = %v, want context.Canceled only", err)
	}
}

// TestForeignAnswers: answers that are not the API's (a proxy's HTML error,
// a 2xx that is not JSON) still give clear errors.
func TestForeignAnswers(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/status":
			http.Error(w, "<html>bad gateway</html>", http.StatusBadGateway)
		case "/v1/volumes":
			w.Write([]byte("hello"))
		case "/v1/volumes/gone":
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	defer srv.Close()
	c := client.New(srv.URL, srv.Client())
	_, err := c.Status(t.Context())
	var ce *client.Error
	if !errors.Is(err, api.ErrInternal) || !errors.As(err, &ce) || ce.Status != 502 || !strings.Contains(err.Error(), "502") || !strings.Contains(err.Error(), "bad gateway") {
		t.Errorf("502 html -> %v", err)
	}
	if _, err := c.Volumes(t.Context()); !errors.Is(err, client.ErrBadAnswer) {
		t.Errorf("non-JSON 200 -> %v, want ErrBadAnswer", err)
	}
	if _, err := c.Volume(t.Context(), "gone"); !errors.Is(err, api.ErrNotFound) || !strings.Contains(err.Error(), "404") {
		t.Errorf("bare 404 -> %v, want ErrNotFound", err)
	}
}

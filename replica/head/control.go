package head

// HTTPControl: the Control interface over ctl/client, trying the control
// nodes in turn.

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
)

// HTTPControl speaks the cluster API to a list of control nodes: a call
// goes to the node that answered last; one that cannot be reached, or
// answers 503 (no leader known), passes the call to the next. An answer of
// the API (a refusal included) ends the call. Safe for concurrent use.
type HTTPControl struct {
	clients []*client.Client
	mu      sync.Mutex
	cur     int
}

// NewHTTPControl returns an HTTPControl over urls (http://host:port).
func NewHTTPControl(urls []string, hc *http.Client) *HTTPControl {
	h := &HTTPControl{}
	for _, u := range urls {
		h.clients = append(h.clients, client.New(u, hc))
	}
	return h
}

// attemptTimeout bounds one node's attempt: a control node cut off from the
// network (packets dropped, not refused) must not use up the caller's
// whole deadline before the next node is asked.
const attemptTimeout = 2 * time.Second

func call[T any](ctx context.Context, h *HTTPControl, fn func(context.Context, *client.Client) (T, error)) (T, error) {
	h.mu.Lock()
	start := h.cur
	h.mu.Unlock()
	var zero T
	err := errors.New("head: no control node to ask")
	for i := range h.clients {
		if ctx.Err() != nil {
			break
		}
		j := (start + i) % len(h.clients)
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		var out T
		out, err = fn(actx, h.clients[j])
		cancel()
		var ae *client.Error
		if err == nil || errors.As(err, &ae) && ae.Status != http.StatusServiceUnavailable {
			h.mu.Lock()
			h.cur = j
			h.mu.Unlock()
			return out, err
		}
		h.mu.Lock()
		if h.cur == j {
			h.cur = (j + 1) % len(h.clients) // the next call starts elsewhere
		}
		h.mu.Unlock()
	}
	return zero, err
}

func (h *HTTPControl) ClusterVolumes(ctx context.Context) ([]cluster.Volume, error) {
	return call(ctx, h, func(ctx context.Context, c *client.Client) ([]cluster.Volume, error) { return c.ClusterVolumes(ctx) })
}

func (h *HTTPControl) ClusterVolume(ctx context.Context, name string) (cluster.Volume, error) {
	return call(ctx, h, func(ctx context.Context, c *client.Client) (cluster.Volume, error) { return c.ClusterVolume(ctx, name) })
}

func (h *HTTPControl) Nodes(ctx context.Context) ([]cluster.Node, error) {
	return call(ctx, h, func(ctx context.Context, c *client.Client) ([]cluster.Node, error) { return c.Nodes(ctx) })
}

func (h *HTTPControl) Acquire(ctx context.Context, req client.GrantRequest) (cluster.Grant, error) {
	return call(ctx, h, func(ctx context.Context, c *client.Client) (cluster.Grant, error) { return c.Acquire(ctx, req) })
}

func (h *HTTPControl) Release(ctx context.Context, req client.GrantRequest) (cluster.Grant, error) {
	return call(ctx, h, func(ctx context.Context, c *client.Client) (cluster.Grant, error) { return c.Release(ctx, req) })
}

func (h *HTTPControl) Bless(ctx context.Context, req client.GrantRequest) (cluster.Blessing, error) {
	return call(ctx, h, func(ctx context.Context, c *client.Client) (cluster.Blessing, error) { return c.Bless(ctx, req) })
}

func (h *HTTPControl) SetInSync(ctx context.Context, req client.InSyncRequest) (cluster.Volume, error) {
	return call(ctx, h, func(ctx context.Context, c *client.Client) (cluster.Volume, error) { return c.SetInSync(ctx, req) })
}

// Package client is the Go client of stor's HTTP/JSON API (the routes in the
// ctl/api package doc), used by storctl and by every role that talks to the
// control plane.
//
// Rules:
//   - Methods mirror the routes one to one, take a context and return api
//     types. A Client is safe for concurrent use; it holds no state but the
//     base URL and the *http.Client.
//   - A non-2xx answer becomes an *Error whose message is the server's and
//     which wraps the api sentinel of its code (errors.Is(err,
//     api.ErrNotFound) and so on). An answer without a JSON body is mapped by
//     its HTTP status.
//   - A request that never got an answer wraps ErrUnreachable and names the
//     URL; one cut short by ctx wraps ctx.Err().
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"stor.dev/stor/ctl/api"
)

// Errors of the client itself (answers of the server wrap api.Err*).
var (
	ErrUnreachable = errors.New("client: cannot reach the stor API")
	ErrBadAnswer   = errors.New("client: bad answer from the stor API")
)

// Limits on what the client reads.
const (
	maxAnswerBytes = 64 << 20 // a volume list
	maxErrorBytes  = 64 << 10
)

// Client calls one API server.
type Client struct {
	base string // scheme://host[:port][/prefix], no trailing slash
	hc   *http.Client
}

// New returns a client of the API at baseURL (such as
// http://127.0.0.1:7480; a URL without a scheme gets http://). A nil
// httpClient means http.DefaultClient.
func New(baseURL string, httpClient *http.Client) *Client {
	if httpClient == nil {
		httpClient = http.DefaultClient
	}
	base := strings.TrimSpace(baseURL)
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	return &Client{base: strings.TrimRight(base, "/"), hc: httpClient}
}

// URL is the base URL the client calls.
func (c *Client) URL() string { return c.base }

// Error is a non-2xx answer of the server.
type Error struct {
	Status  int    // HTTP status
	Code    string // api.Error code, "" if the body was not an api.Error
	Message string // the server's message
	err     error  // the api sentinel
}

func (e *Error) Error() string { return e.Message }

// Unwrap returns the api sentinel the answer maps to.
func (e *Error) Unwrap() error { return e.err }

// Status answers GET /v1/status.
func (c *Client) Status(ctx context.Context) (api.Status, error) {
	var st api.Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
	return st, err
}

// Volumes answers GET /v1/volumes.
func (c *Client) Volumes(ctx context.Context) ([]api.Volume, error) {
	var vols []api.Volume
	if err := c.do(ctx, http.MethodGet, "/v1/volumes", nil, &vols); err != nil {
		return nil, err
	}
	if vols == nil {
		vols = []api.Volume{}
	}
	return vols, nil
}

// Volume answers GET /v1/volumes/{name}.
func (c *Client) Volume(ctx context.Context, name string) (api.Volume, error) {
	var v api.Volume
	err := c.do(ctx, http.MethodGet, volumePath(name), nil, &v)
	return v, err
}

// CreateVolume calls POST /v1/volumes.
func (c *Client) CreateVolume(ctx context.Context, req api.CreateVolume) (api.Volume, error) {
	var v api.Volume
	err := c.do(ctx, http.MethodPost, "/v1/volumes", req, &v)
	return v, err
}

// ResizeVolume calls POST /v1/volumes/{name}/resize.
func (c *Client) ResizeVolume(ctx context.Context, name string, size int64) (api.Volume, error) {
	var v api.Volume
	err := c.do(ctx, http.MethodPost, volumePath(name)+"/resize", api.ResizeVolume{Size: size}, &v)
	return v, err
}

// DeleteVolume calls DELETE /v1/volumes/{name}, with ?force=1 if force.
func (c *Client) DeleteVolume(ctx context.Context, name string, force bool) error {
	p := volumePath(name)
	if force {
		p += "?force=1"
	}
	return c.do(ctx, http.MethodDelete, p, nil, nil)
}

// SetCHAP calls POST /v1/volumes/{name}/chap.
func (c *Client) SetCHAP(ctx context.Context, name string, req api.SetCHAP) error {
	return c.do(ctx, http.MethodPost, volumePath(name)+"/chap", req, nil)
}

// Replicas answers GET /v1/replicas: the partition replicas the node asked
// holds (none on a node without the head role).
func (c *Client) Replicas(ctx context.Context) ([]api.ReplicaStatus, error) {
	out := []api.ReplicaStatus{}
	if err := c.do(ctx, http.MethodGet, "/v1/replicas", nil, &out); err != nil {
		return nil, err
	}
	return out, nil
}

func volumePath(name string) string { return "/v1/volumes/" + url.PathEscape(name) }

// do sends one request with body (if not nil) as JSON and decodes a 2xx
// answer into out (if not nil).
func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	u := c.base + path
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("client: %s %s: encode request: %w", method, u, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return fmt.Errorf("%w: bad API URL %q: %v", ErrUnreachable, c.base, err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("client: %s %s: %w", method, u, ctx.Err())
		}
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // drop the repeated method and URL
		}
		return fmt.Errorf("%w at %s: %w", ErrUnreachable, c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return answerError(method, u, resp)
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBytes))
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxAnswerBytes)).Decode(out); err != nil {
		return fmt.Errorf("%w: %s %s: %d answer: %v", ErrBadAnswer, method, u, resp.StatusCode, err)
	}
	return nil
}

// answerError turns a non-2xx answer into an *Error.
func answerError(method, u string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBytes))
	e := &Error{Status: resp.StatusCode}
	var body api.Error
	if json.Unmarshal(b, &body) == nil && body.Error != "" {
		e.Code, e.Message = body.Code, body.Error
	} else {
		text := strings.TrimSpace(string(b))
		if i := strings.IndexByte(text, '\n'); i >= 0 {
			text = text[:i]
		}
		if len(text) > 200 {
			text = text[:200] + "..."
		}
		e.Message = fmt.Sprintf("%s %s: HTTP %s", method, u, resp.Status)
		if text != "" {
			e.Message += ": " + text
		}
	}
	for _, c := range api.Codes {
		if e.Code != "" && c.Code == e.Code {
			e.err = c.Err
			return e
		}
	}
	for _, c := range api.Codes {
		if c.Status == resp.StatusCode {
			e.err = c.Err
			return e
		}
	}
	if resp.StatusCode >= 500 {
		e.err = api.ErrInternal
	} else {
		e.err = api.ErrInvalid
	}
	return e
}

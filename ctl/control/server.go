// Package control is stor's control plane: the HTTP/JSON API that storctl and
// the other roles speak (this file and http*.go), and the Raft wiring behind
// it.
//
// # HTTP API
//
// NewHandler serves the routes of the api package doc over a Volumes backend:
//
//	method  path                        body          answer
//	------  --------------------------  ------------  -------------------------
//	GET     /v1/status                  -             200 api.Status
//	GET     /v1/volumes                 -             200 []api.Volume (never null)
//	POST    /v1/volumes                 CreateVolume  201 api.Volume, Location
//	GET     /v1/volumes/{name}          -             200 api.Volume
//	POST    /v1/volumes/{name}/resize   ResizeVolume  200 api.Volume
//	DELETE  /v1/volumes/{name}[?force=1] -            204
//	POST    /v1/volumes/{name}/chap     SetCHAP       204 (backend a CHAPSetter)
//	GET     /metrics                    -             Prometheus text (if configured)
//
// Rules:
//   - Every non-2xx answer is a JSON api.Error; its status and code come from
//     the api.Codes table by errors.Is on the backend's error. An error that
//     wraps no api sentinel is an internal error (500). An unknown path is 404
//     and a known path with the wrong method is 405 with an Allow header, both
//     with JSON bodies.
//   - The handler validates what it can before it calls the backend: names
//     (api.CheckName), sizes (> 0, <= api.MaxVolumeSize, multiples of the block
//     size), block size (512 or 4096), partition size (a multiple of the block
//     size, >= api.MinPartitionSize), replicas (1..3, or 0 for the backend's
//     default), and that a resize never shrinks. Backends check again under
//     their own lock; the handler's checks only give early, clear answers.
//   - The handler fills the defaults the api doc promises (BlockSize 512,
//     PartitionSize api.DefaultPartitionSize) before CreateVolume; Replicas 0 is
//     passed through for the backend to choose.
//   - Request bodies are at most MaxBodyBytes, JSON objects with no unknown
//     fields and nothing after them; anything else is 400 (413 if too large).
//   - A panic in a backend answers 500 and is logged; the server goes on.
//   - Logging: the backend logs each volume change (it is where the change
//     happens); the handler logs 5xx answers and panics at Error, and changes
//     and refusals at Debug; never a line per read-only request at Info.
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"
	"strings"

	"stor.dev/stor/ctl/api"
)

// Volumes is the backend of the volume API. Errors wrap api.ErrNotFound,
// ErrExists, ErrInvalid, ErrInUse, ErrNoSpace; any other error is answered
// as an internal error. Methods are called concurrently, one call per HTTP
// request, with the request's context.
type Volumes interface {
	// CreateVolume creates a volume. req has been validated and its
	// BlockSize and PartitionSize defaults filled; Replicas may be 0
	// (backend's default).
	CreateVolume(ctx context.Context, req api.CreateVolume) (api.Volume, error)
	// Volumes lists every volume, in name order.
	Volumes(ctx context.Context) ([]api.Volume, error)
	// Volume describes one volume.
	Volume(ctx context.Context, name string) (api.Volume, error)
	// ResizeVolume grows a volume to size bytes. It must refuse a shrink
	// with ErrInvalid (the handler's check races with other resizes).
	ResizeVolume(ctx context.Context, name string, size int64) (api.Volume, error)
	// DeleteVolume deletes a volume; while it has connections it refuses
	// with ErrInUse unless force is set.
	DeleteVolume(ctx context.Context, name string, force bool) error
}

// CHAPSetter is an optional capability of a Volumes backend: iSCSI CHAP
// credentials per volume. Without it, POST /v1/volumes/{name}/chap answers
// 404. Secrets are never returned by any route.
type CHAPSetter interface {
	// SetCHAP replaces the volume's CHAP credentials; an empty User turns
	// CHAP off. req has been validated.
	SetCHAP(ctx context.Context, name string, req api.SetCHAP) error
}

// HandlerConfig configures NewHandler.
type HandlerConfig struct {
	Volumes Volumes                                       // required
	Status  func(ctx context.Context) (api.Status, error) // nil: a minimal status from Volumes
	Metrics http.Handler                                  // served at GET /metrics; nil: 404
	Logger  *slog.Logger                                  // nil: slog.Default()
}

// MaxBodyBytes bounds every request body.
const MaxBodyBytes = 1 << 20

// NewHandler returns the HTTP handler of the API. It panics if cfg.Volumes is
// nil (a wiring bug).
func NewHandler(cfg HandlerConfig) http.Handler {
	if cfg.Volumes == nil {
		panic("control: NewHandler without Volumes")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	h := &handler{cfg: cfg, log: cfg.Logger, mux: http.NewServeMux()}
	h.mux.HandleFunc("GET /v1/status", h.status)
	h.mux.HandleFunc("GET /v1/volumes", h.listVolumes)
	h.mux.HandleFunc("POST /v1/volumes", h.createVolume)
	h.mux.HandleFunc("GET /v1/volumes/{name}", h.showVolume)
	h.mux.HandleFunc("POST /v1/volumes/{name}/resize", h.resizeVolume)
	h.mux.HandleFunc("DELETE /v1/volumes/{name}", h.deleteVolume)
	h.mux.HandleFunc("POST /v1/volumes/{name}/chap", h.setCHAP)
	if cfg.Metrics != nil {
		h.mux.Handle("GET /metrics", cfg.Metrics)
	}
	h.mux.HandleFunc("/", h.fallback)
	return h
}

type handler struct {
	cfg HandlerConfig
	log *slog.Logger
	mux *http.ServeMux
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			h.log.Error("api: panic serving request", "method", r.Method, "path", r.URL.Path,
				"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			// If the handler already wrote a header this is a superfluous
			// WriteHeader, which net/http ignores and logs.
			h.writeError(w, r, fmt.Errorf("%w: panic serving %s %s", api.ErrInternal, r.Method, r.URL.Path))
		}
	}()
	h.mux.ServeHTTP(w, r)
}

// fallback answers every request no route matched: 405 if the path exists
// under another method, else 404.
func (h *handler) fallback(w http.ResponseWriter, r *http.Request) {
	var allow []string
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
		probe := &http.Request{Method: m, URL: r.URL, Host: r.Host}
		if _, pattern := h.mux.Handler(probe); pattern != "" && pattern != "/" {
			allow = append(allow, m)
		}
	}
	if len(allow) > 0 {
		w.Header().Set("Allow", strings.Join(allow, ", "))
		writeJSON(w, http.StatusMethodNotAllowed, api.Error{
			Error: fmt.Sprintf("method %s not allowed on %s (allowed: %s)", r.Method, r.URL.Path, strings.Join(allow, ", ")),
			Code:  codeOf(api.ErrInvalid),
		})
		return
	}
	h.writeError(w, r, fmt.Errorf("no route %s %s: %w", r.Method, r.URL.Path, api.ErrNotFound))
}

func (h *handler) status(w http.ResponseWriter, r *http.Request) {
	var st api.Status
	var err error
	if h.cfg.Status != nil {
		st, err = h.cfg.Status(r.Context())
	} else {
		var vols []api.Volume
		vols, err = h.cfg.Volumes.Volumes(r.Context())
		st = api.Status{Healthy: err == nil, Volumes: len(vols), Roles: []string{}}
	}
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	if st.Roles == nil {
		st.Roles = []string{}
	}
	writeJSON(w, http.StatusOK, st)
}

func (h *handler) listVolumes(w http.ResponseWriter, r *http.Request) {
	vols, err := h.cfg.Volumes.Volumes(r.Context())
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	if vols == nil {
		vols = []api.Volume{}
	}
	writeJSON(w, http.StatusOK, vols)
}

func (h *handler) createVolume(w http.ResponseWriter, r *http.Request) {
	var req api.CreateVolume
	if err := decodeBody(w, r, &req); err != nil {
		h.writeError(w, r, err)
		return
	}
	req, err := CheckCreateVolume(req)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	v, err := h.cfg.Volumes.CreateVolume(r.Context(), req)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	h.log.Debug("api: volume created", "volume", v.Name, "id", v.ID, "size", v.Size,
		"block_size", v.BlockSize, "partition_size", v.PartitionSize, "replicas", v.Replicas)
	w.Header().Set("Location", "/v1/volumes/"+url.PathEscape(v.Name))
	writeJSON(w, http.StatusCreated, v)
}

func (h *handler) showVolume(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := api.CheckName(name); err != nil {
		h.writeError(w, r, err)
		return
	}
	v, err := h.cfg.Volumes.Volume(r.Context(), name)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *handler) resizeVolume(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := api.CheckName(name); err != nil {
		h.writeError(w, r, err)
		return
	}
	var req api.ResizeVolume
	if err := decodeBody(w, r, &req); err != nil {
		h.writeError(w, r, err)
		return
	}
	if err := checkSize(req.Size); err != nil {
		h.writeError(w, r, err)
		return
	}
	old, err := h.cfg.Volumes.Volume(r.Context(), name)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	if err := CheckResize(old, req.Size); err != nil {
		h.writeError(w, r, err)
		return
	}
	v, err := h.cfg.Volumes.ResizeVolume(r.Context(), name, req.Size)
	if err != nil {
		h.writeError(w, r, err)
		return
	}
	if v.Size != old.Size {
		h.log.Debug("api: volume resized", "volume", name, "old_size", old.Size, "size", v.Size)
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *handler) deleteVolume(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := api.CheckName(name); err != nil {
		h.writeError(w, r, err)
		return
	}
	force := false
	if s := r.URL.Query().Get("force"); s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			h.writeError(w, r, fmt.Errorf("%w: force=%q: want 1, true, 0 or false", api.ErrInvalid, s))
			return
		}
		force = b
	}
	if err := h.cfg.Volumes.DeleteVolume(r.Context(), name, force); err != nil {
		h.writeError(w, r, err)
		return
	}
	h.log.Debug("api: volume deleted", "volume", name, "force", force)
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) setCHAP(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := api.CheckName(name); err != nil {
		h.writeError(w, r, err)
		return
	}
	cs, ok := h.cfg.Volumes.(CHAPSetter)
	if !ok {
		h.writeError(w, r, fmt.Errorf("CHAP is not supported by this server: %w", api.ErrNotFound))
		return
	}
	var req api.SetCHAP
	if err := decodeBody(w, r, &req); err != nil {
		h.writeError(w, r, err)
		return
	}
	if err := CheckCHAP(req); err != nil {
		h.writeError(w, r, err)
		return
	}
	if err := cs.SetCHAP(r.Context(), name, req); err != nil {
		h.writeError(w, r, err)
		return
	}
	// Never log the secrets.
	h.log.Debug("api: volume chap set", "volume", name, "user", req.User, "mutual", req.MutualUser != "")
	w.WriteHeader(http.StatusNoContent)
}

// CheckCreateVolume validates req and fills the defaults the api doc
// promises (BlockSize 512, PartitionSize api.DefaultPartitionSize). Errors
// wrap api.ErrInvalid. Backends may call it too.
func CheckCreateVolume(req api.CreateVolume) (api.CreateVolume, error) {
	if err := api.CheckName(req.Name); err != nil {
		return req, err
	}
	if req.BlockSize == 0 {
		req.BlockSize = 512
	}
	if req.BlockSize != 512 && req.BlockSize != 4096 {
		return req, fmt.Errorf("%w: block size %d: want 512 or 4096", api.ErrInvalid, req.BlockSize)
	}
	if err := checkSize(req.Size); err != nil {
		return req, err
	}
	if req.Size%int64(req.BlockSize) != 0 {
		return req, fmt.Errorf("%w: size %d is not a multiple of the block size %d", api.ErrInvalid, req.Size, req.BlockSize)
	}
	if req.PartitionSize == 0 {
		req.PartitionSize = api.DefaultPartitionSize
	}
	if req.PartitionSize < api.MinPartitionSize || req.PartitionSize > api.MaxVolumeSize {
		return req, fmt.Errorf("%w: partition size %d: want %s to %s", api.ErrInvalid,
			req.PartitionSize, api.FormatSize(api.MinPartitionSize), api.FormatSize(api.MaxVolumeSize))
	}
	if req.PartitionSize%int64(req.BlockSize) != 0 {
		return req, fmt.Errorf("%w: partition size %d is not a multiple of the block size %d", api.ErrInvalid, req.PartitionSize, req.BlockSize)
	}
	if req.Replicas < 0 || req.Replicas > 3 {
		return req, fmt.Errorf("%w: replicas %d: want 1, 2 or 3", api.ErrInvalid, req.Replicas)
	}
	return req, nil
}

// CheckResize validates growing v to size bytes. Errors wrap api.ErrInvalid.
// A resize to the current size is allowed (a no-op).
func CheckResize(v api.Volume, size int64) error {
	if err := checkSize(size); err != nil {
		return err
	}
	if size < v.Size {
		return fmt.Errorf("%w: volume %q: cannot shrink from %s to %s (grow only)", api.ErrInvalid,
			v.Name, api.FormatSize(v.Size), api.FormatSize(size))
	}
	if v.BlockSize > 0 && size%int64(v.BlockSize) != 0 {
		return fmt.Errorf("%w: size %d is not a multiple of the block size %d", api.ErrInvalid, size, v.BlockSize)
	}
	return nil
}

// CheckCHAP validates CHAP credentials. Errors wrap api.ErrInvalid and never
// contain a secret.
func CheckCHAP(req api.SetCHAP) error {
	if req.User == "" {
		if req.Secret != "" || req.MutualUser != "" || req.MutualSecret != "" {
			return fmt.Errorf("%w: CHAP secret or mutual credentials without a user", api.ErrInvalid)
		}
		return nil // CHAP off
	}
	if err := checkCHAPPair("user", req.User, req.Secret); err != nil {
		return err
	}
	if req.MutualUser == "" && req.MutualSecret == "" {
		return nil
	}
	if err := checkCHAPPair("mutual user", req.MutualUser, req.MutualSecret); err != nil {
		return err
	}
	if req.MutualSecret == req.Secret {
		return fmt.Errorf("%w: the mutual CHAP secret must differ from the CHAP secret", api.ErrInvalid)
	}
	return nil
}

func checkCHAPPair(what, user, secret string) error {
	if user == "" || len(user) > 255 || !printableASCII(user) {
		return fmt.Errorf("%w: CHAP %s %q: want 1-255 printable ASCII characters", api.ErrInvalid, what, user)
	}
	// RFC 7143 section 12.1.3 asks for secrets of at least 12 bytes (96
	// bits); libiscsi and Linux open-iscsi accept up to 255.
	if len(secret) < 12 || len(secret) > 255 || !printableASCII(secret) {
		return fmt.Errorf("%w: CHAP secret for %s %q: want 12-255 printable ASCII characters", api.ErrInvalid, what, user)
	}
	return nil
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

func checkSize(size int64) error {
	if size <= 0 {
		return fmt.Errorf("%w: size %d: want more than 0", api.ErrInvalid, size)
	}
	if size > api.MaxVolumeSize {
		return fmt.Errorf("%w: size %s: more than the maximum %s", api.ErrInvalid, api.FormatSize(size), api.FormatSize(api.MaxVolumeSize))
	}
	return nil
}

// decodeBody decodes one JSON object of at most MaxBodyBytes into v.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			return &bodyTooLarge{limit: tooBig.Limit}
		case errors.Is(err, io.EOF):
			return fmt.Errorf("%w: empty request body: want a JSON object", api.ErrInvalid)
		default:
			return fmt.Errorf("%w: request body: %v", api.ErrInvalid, err)
		}
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return &bodyTooLarge{limit: tooBig.Limit}
		}
		return fmt.Errorf("%w: request body: data after the JSON object", api.ErrInvalid)
	}
	return nil
}

// bodyTooLarge is answered 413 with code "invalid".
type bodyTooLarge struct{ limit int64 }

func (e *bodyTooLarge) Error() string {
	return fmt.Sprintf("%v: request body larger than %d bytes", api.ErrInvalid, e.limit)
}
func (e *bodyTooLarge) Unwrap() error { return api.ErrInvalid }

// ErrorStatus maps err to its HTTP status and JSON body by the api.Codes
// table; an error that wraps no api sentinel is internal (500).
func ErrorStatus(err error) (int, api.Error) {
	var tooBig *bodyTooLarge
	if errors.As(err, &tooBig) {
		return http.StatusRequestEntityTooLarge, api.Error{Error: err.Error(), Code: codeOf(api.ErrInvalid)}
	}
	for _, c := range api.Codes {
		if errors.Is(err, c.Err) {
			return c.Status, api.Error{Error: err.Error(), Code: c.Code}
		}
	}
	return http.StatusInternalServerError, api.Error{Error: err.Error(), Code: codeOf(api.ErrInternal)}
}

// WriteError answers err as JSON with the status ErrorStatus gives. For
// wrappers of NewHandler's handler (leader forwarding, auth).
func WriteError(w http.ResponseWriter, err error) {
	status, body := ErrorStatus(err)
	writeJSON(w, status, body)
}

func (h *handler) writeError(w http.ResponseWriter, r *http.Request, err error) {
	status, body := ErrorStatus(err)
	switch {
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away; nobody reads the answer.
	case status >= 500:
		h.log.Error("api: request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	default:
		h.log.Debug("api: request refused", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	}
	writeJSON(w, status, body)
}

func codeOf(err error) string {
	for _, c := range api.Codes {
		if c.Err == err {
			return c.Code
		}
	}
	return "internal"
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		// Only our own api types are written; they always marshal.
		panic(fmt.Sprintf("control: marshal %T: %v", v, err))
	}
	b = append(b, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

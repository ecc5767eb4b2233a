package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// Cluster API.
//
// NewClusterHandler serves the control plane's own routes over a Node:
//
//	method  path                          body             answer
//	------  ----------------------------  ---------------  --------------------------
//	GET     /v1/cluster/status            -                200 ClusterStatus (local)
//	POST    /v1/cluster/config            ConfigureRequest 200 cluster.Config (the new one)
//	POST    /v1/cluster/join              JoinRequest      200 []Voter
//	POST    /v1/cluster/leave             LeaveRequest     200 []Voter
//	GET     /v1/cluster/volumes           -                200 []cluster.Volume (placement)
//	GET     /v1/cluster/volumes/{name}    -                200 cluster.Volume
//	GET     /v1/cluster/work              -                200 []cluster.Work
//	GET     /v1/nodes                     -                200 []cluster.Node
//	POST    /v1/nodes                     RegisterRequest  201 cluster.Node
//	GET     /v1/nodes/{id}                -                200 NodeView
//	DELETE  /v1/nodes/{id}                -                204 (also leaves raft)
//	POST    /v1/nodes/{id}/heartbeat      HeartbeatRequest 200 cluster.Node
//	POST    /v1/nodes/{id}/drain          -                200 cluster.Node
//	POST    /v1/nodes/{id}/undrain        -                200 cluster.Node
//	POST    /v1/nodes/{id}/sled           SledRequest      200 cluster.Node
//	GET     /v1/grants[?node=&volume=]    -                200 []cluster.Grant
//	POST    /v1/grants                    GrantRequest     200 cluster.Grant (409 names the holder)
//	POST    /v1/grants/release            GrantRequest     200 cluster.Grant
//	POST    /v1/grants/in-sync            InSyncRequest    200 cluster.Volume
//	POST    /v1/grants/bless              GrantRequest     200 cluster.Blessing
//	POST    /v1/grants/unbless            GrantRequest     200 cluster.Blessing
//
// Rules:
//   - Only /v1/cluster/status is answered by whichever node is asked: it is
//     that node's view (its raft state and whom it believes leads). Every
//     other route is served by the leader, with a consistent read for GETs.
//   - A follower forwards such a request to the leader's API address (a
//     reverse proxy; the answer carries X-Stor-Leader). It does not forward
//     a request that already made MaxForwardHops hops, nor when no leader is
//     known or the leader cannot be reached: then it answers 503 with code
//     "unavailable" and, when known, the leader in X-Stor-Leader and
//     X-Stor-Leader-API.
//   - Errors are JSON api.Error bodies by the api.Codes table (WriteError); a
//     refused grant is 409 "in_use" naming the holder.
//   - POST /v1/cluster/config changes the fields its body names and keeps
//     the rest: the leader reads the current config (consistent read),
//     merges, and proposes a configure; a value the map refuses (cluster's
//     Config rules) is 400 "invalid", as is a body that names no field. The
//     leader runs one configure at a time, so two concurrent ones both land.
//     The body spells durations as Go duration strings ("1500ms"); the
//     answer, like every cluster.Config the API shows, holds nanoseconds.

// Headers of leader forwarding.
const (
	HeaderLeader    = "X-Stor-Leader"     // the leader's node id
	HeaderLeaderAPI = "X-Stor-Leader-API" // the leader's API address, host:port
	HeaderHops      = "X-Stor-Hops"       // forwards a request has made
	MaxForwardHops  = 2
)

// ClusterStatus is the answer of GET /v1/cluster/status.
type ClusterStatus struct {
	Leader       api.NodeID     `json:"leader"` // "" when no leader is known
	LeaderAPI    string         `json:"leader_api,omitempty"`
	Node         api.NodeID     `json:"node"`  // the node answering
	State        string         `json:"state"` // its raft state
	Term         uint64         `json:"term"`
	CommitIndex  uint64         `json:"commit_index"`
	AppliedIndex uint64         `json:"applied_index"`
	LastContact  string         `json:"last_contact,omitempty"`
	Voters       []StatusVoter  `json:"voters"`
	Healthy      bool           `json:"healthy"` // a leader is known and a quorum of voters is active
	Nodes        map[string]int `json:"nodes"`   // registered nodes by state
	Volumes      int            `json:"volumes"`
	Work         int            `json:"work"` // open re-placement work items
	Config       cluster.Config `json:"config"`
	Time         time.Time      `json:"time"`
	Errors       []string       `json:"errors,omitempty"`
}

// StatusVoter is a raft voter with its cluster map state.
type StatusVoter struct {
	Voter
	API   string        `json:"api,omitempty"`
	State cluster.State `json:"node_state,omitempty"` // "" if not registered
}

// JoinRequest is the body of POST /v1/cluster/join.
type JoinRequest struct {
	ID   api.NodeID `json:"id"`
	Raft string     `json:"raft"`
}

// ConfigureRequest is the body of POST /v1/cluster/config: the settings to
// change. An absent or null field keeps the map's value. Durations are Go
// duration strings ("1.5s", "750ms").
type ConfigureRequest struct {
	LeaseTimeout         *string `json:"lease_timeout,omitempty"`
	SuspectTimeout       *string `json:"suspect_timeout,omitempty"`
	MinHealth            *int    `json:"min_health,omitempty"`
	DefaultPartitionSize *int64  `json:"default_partition_size,omitempty"`
	DefaultReplicas      *int    `json:"default_replicas,omitempty"`
}

// merge returns cur with the fields r names replaced. It checks only the
// duration strings; the map checks the result.
func (r ConfigureRequest) merge(cur cluster.Config) (cluster.Config, error) {
	if r == (ConfigureRequest{}) {
		return cur, fmt.Errorf("%w: configure names no setting: want one or more of lease_timeout, suspect_timeout, min_health, default_partition_size, default_replicas", api.ErrInvalid)
	}
	for _, d := range []struct {
		name string
		s    *string
		into *time.Duration
	}{{"lease_timeout", r.LeaseTimeout, &cur.LeaseTimeout}, {"suspect_timeout", r.SuspectTimeout, &cur.SuspectTimeout}} {
		if d.s == nil {
			continue
		}
		v, err := time.ParseDuration(*d.s)
		if err != nil {
			return cur, fmt.Errorf("%w: %s %q: want a duration such as \"1500ms\" or \"1.5s\"", api.ErrInvalid, d.name, *d.s)
		}
		*d.into = v
	}
	if r.MinHealth != nil {
		cur.MinHealth = *r.MinHealth
	}
	if r.DefaultPartitionSize != nil {
		cur.DefaultPartitionSize = *r.DefaultPartitionSize
	}
	if r.DefaultReplicas != nil {
		cur.DefaultReplicas = *r.DefaultReplicas
	}
	return cur, nil
}

// LeaveRequest is the body of POST /v1/cluster/leave.
type LeaveRequest struct {
	ID api.NodeID `json:"id"`
}

// RegisterRequest is the body of POST /v1/nodes.
type RegisterRequest struct {
	ID api.NodeID `json:"id"`
	cluster.NodeSpec
	Health int `json:"health,omitempty"`
}

// HeartbeatRequest is the body of POST /v1/nodes/{id}/heartbeat.
type HeartbeatRequest struct {
	Health int `json:"health"`
}

// SledRequest is the body of POST /v1/nodes/{id}/sled.
type SledRequest struct {
	Devices []cluster.Device `json:"devices"`
}

// GrantRequest is the body of the grant routes.
type GrantRequest struct {
	Volume    string          `json:"volume"`
	Partition api.PartitionID `json:"partition"`
	Role      cluster.Role    `json:"role,omitempty"`
	Node      api.NodeID      `json:"node"`
	Epoch     api.Epoch       `json:"epoch,omitempty"` // bless; acquire by the primary: leave this epoch
	Force     bool            `json:"force,omitempty"` // release
}

// InSyncRequest is the body of POST /v1/grants/in-sync.
type InSyncRequest struct {
	Volume    string          `json:"volume"`
	Partition api.PartitionID `json:"partition"`
	Node      api.NodeID      `json:"node"` // the primary
	Epoch     api.Epoch       `json:"epoch"`
	InSync    []api.NodeID    `json:"in_sync"`
}

// NodeView is the answer of GET /v1/nodes/{id}.
type NodeView struct {
	cluster.Node
	Sled   *cluster.Sled   `json:"sled,omitempty"`
	Grants []cluster.Grant `json:"grants"`
	Voter  *Voter          `json:"voter,omitempty"`
}

// ClusterHandlerConfig configures NewClusterHandler.
type ClusterHandlerConfig struct {
	Logger *slog.Logger // nil: slog.Default()
	// Transport carries forwarded requests; nil: http.DefaultTransport.
	Transport http.RoundTripper
}

type clusterHandler struct {
	node *Node
	log  *slog.Logger
	mux  *http.ServeMux
	fwd  http.RoundTripper

	// configuring is held from the read to the proposal of a configure, so
	// that two concurrent ones do not merge over the same old config.
	configuring sync.Mutex
}

// NewClusterHandler returns the handler of the cluster routes above.
func NewClusterHandler(node *Node, cfg ClusterHandlerConfig) http.Handler {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Transport == nil {
		cfg.Transport = http.DefaultTransport
	}
	h := &clusterHandler{node: node, log: cfg.Logger, mux: http.NewServeMux(), fwd: cfg.Transport}
	h.mux.HandleFunc("GET /v1/cluster/status", h.status)
	lead := func(pattern string, fn http.HandlerFunc) {
		h.mux.Handle(pattern, LeaderOnly(node, fn, cfg))
	}
	lead("POST /v1/cluster/join", h.join)
	lead("POST /v1/cluster/leave", h.leave)
	lead("POST /v1/cluster/config", h.configure)
	lead("GET /v1/cluster/volumes", h.volumes)
	lead("GET /v1/cluster/volumes/{name}", h.volume)
	lead("GET /v1/cluster/work", h.work)
	lead("GET /v1/nodes", h.listNodes)
	lead("POST /v1/nodes", h.register)
	lead("GET /v1/nodes/{id}", h.showNode)
	lead("DELETE /v1/nodes/{id}", h.removeNode)
	lead("POST /v1/nodes/{id}/heartbeat", h.heartbeat)
	lead("POST /v1/nodes/{id}/drain", h.drain(cluster.OpDrain))
	lead("POST /v1/nodes/{id}/undrain", h.drain(cluster.OpUndrain))
	lead("POST /v1/nodes/{id}/sled", h.sled)
	lead("GET /v1/grants", h.listGrants)
	lead("POST /v1/grants", h.grant(cluster.OpAcquire))
	lead("POST /v1/grants/release", h.grant(cluster.OpRelease))
	lead("POST /v1/grants/bless", h.grant(cluster.OpBless))
	lead("POST /v1/grants/unbless", h.grant(cluster.OpUnbless))
	lead("POST /v1/grants/in-sync", h.inSync)
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, fmt.Errorf("no route %s %s: %w", r.Method, r.URL.Path, api.ErrNotFound))
	})
	return h
}

func (h *clusterHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// MountCluster registers the cluster handler h (from NewClusterHandler) on
// mux under /v1/cluster/, /v1/nodes and /v1/grants, next to whatever else
// mux serves (the volume API at "/").
func MountCluster(mux *http.ServeMux, h http.Handler) {
	for _, p := range []string{"/v1/cluster/", "/v1/nodes", "/v1/nodes/", "/v1/grants", "/v1/grants/"} {
		mux.Handle(p, h)
	}
}

// LeaderOnly serves next on the leader and forwards the request to the
// leader elsewhere (see the Cluster API rules); GET /v1/status and GET
// /metrics are always served by next on the node asked. Wrap the volume API
// with it to make every node of a cluster answer for the leader.
func LeaderOnly(node *Node, next http.Handler, cfg ClusterHandlerConfig) http.Handler {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Transport == nil {
		cfg.Transport = http.DefaultTransport
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if node.IsLeader() || servedLocally(r) {
			w.Header().Set(HeaderLeader, string(node.ID()))
			next.ServeHTTP(w, r)
			return
		}
		forward(w, r, node.notLeader(), cfg)
	})
}

// servedLocally reports whether r is about the node it was sent to: its
// status and its metrics are never forwarded.
func servedLocally(r *http.Request) bool {
	return r.Method == http.MethodGet && (r.URL.Path == "/v1/status" || r.URL.Path == "/metrics")
}

// forward proxies r to the leader nl names, or answers 503.
func forward(w http.ResponseWriter, r *http.Request, nl *NotLeaderError, cfg ClusterHandlerConfig) {
	if nl.ID != "" {
		w.Header().Set(HeaderLeader, string(nl.ID))
	}
	if nl.API != "" {
		w.Header().Set(HeaderLeaderAPI, nl.API)
	}
	hops, _ := strconv.Atoi(r.Header.Get(HeaderHops))
	switch {
	case nl.ID == "":
		unavailable(w, fmt.Errorf("no leader is known: %w", ErrNoLeader))
		return
	case nl.API == "":
		unavailable(w, fmt.Errorf("leader %s has no registered API address: %w", nl.ID, ErrNotLeader))
		return
	case hops >= MaxForwardHops:
		unavailable(w, fmt.Errorf("request forwarded %d times without reaching the leader (%s): %w", hops, nl.ID, ErrNotLeader))
		return
	}
	target := &url.URL{Scheme: "http", Host: nl.API}
	p := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = nl.API
			pr.Out.Header.Set(HeaderHops, strconv.Itoa(hops+1))
		},
		Transport: cfg.Transport,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			cfg.Logger.Warn("control: forward to leader failed", "leader", string(nl.ID), "api", nl.API, "err", err)
			unavailable(w, fmt.Errorf("forward to leader %s at %s: %v: %w", nl.ID, nl.API, err, ErrNotLeader))
		},
	}
	p.ServeHTTP(w, r)
}

// unavailable answers 503 with code "unavailable".
func unavailable(w http.ResponseWriter, err error) {
	clusterJSON(w, http.StatusServiceUnavailable, api.Error{Error: err.Error(), Code: "unavailable"})
}

// clusterError answers err: raft-layer errors as 503, the rest by the
// api.Codes table.
func (h *clusterHandler) clusterError(w http.ResponseWriter, r *http.Request, err error) {
	var nl *NotLeaderError
	switch {
	case errors.As(err, &nl):
		// Leadership moved between the check and the proposal.
		if nl.ID != "" {
			w.Header().Set(HeaderLeader, string(nl.ID))
		}
		if nl.API != "" {
			w.Header().Set(HeaderLeaderAPI, nl.API)
		}
		unavailable(w, err)
	case errors.Is(err, ErrLeadershipLost), errors.Is(err, ErrClosed), errors.Is(err, context.DeadlineExceeded):
		unavailable(w, err)
	default:
		if status, _ := ErrorStatus(err); status >= 500 {
			h.log.Error("control: cluster request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		}
		WriteError(w, err)
	}
}

func clusterJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		panic(fmt.Sprintf("control: marshal %T: %v", v, err)) // our own types always marshal
	}
	b = append(b, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// clusterDecode decodes one JSON object of at most MaxBodyBytes into v; an
// empty body leaves v alone when emptyOK.
func clusterDecode(r *http.Request, v any, emptyOK bool) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, MaxBodyBytes+1))
	if err != nil {
		return fmt.Errorf("%w: read body: %v", api.ErrInvalid, err)
	}
	if len(body) > MaxBodyBytes {
		return fmt.Errorf("%w: request body larger than %d bytes", api.ErrInvalid, MaxBodyBytes)
	}
	if len(body) == 0 {
		if emptyOK {
			return nil
		}
		return fmt.Errorf("%w: empty request body: want a JSON object", api.ErrInvalid)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: request body: %v", api.ErrInvalid, err)
	}
	if dec.More() {
		return fmt.Errorf("%w: request body: data after the JSON object", api.ErrInvalid)
	}
	return nil
}

// propose runs c and answers its result with pick, or the error.
func (h *clusterHandler) propose(w http.ResponseWriter, r *http.Request, status int, c cluster.Command, pick func(cluster.Result) any) {
	res, err := h.node.Propose(r.Context(), c)
	if err != nil {
		h.clusterError(w, r, err)
		return
	}
	if c.Op != cluster.OpHeartbeat {
		h.log.Info("control: "+string(c.Op), "node", string(c.Node), "volume", c.Volume)
	}
	clusterJSON(w, status, pick(res))
}

// read runs fn in a consistent read and answers what it returns.
func (h *clusterHandler) read(w http.ResponseWriter, r *http.Request, fn func(*cluster.Map) (any, error)) {
	var out any
	var ferr error
	if err := h.node.ConsistentRead(r.Context(), func(m *cluster.Map) { out, ferr = fn(m) }); err != nil {
		h.clusterError(w, r, err)
		return
	}
	if ferr != nil {
		h.clusterError(w, r, ferr)
		return
	}
	clusterJSON(w, http.StatusOK, out)
}

// Status builds this node's ClusterStatus (no consensus round).
func (n *Node) Status() ClusterStatus {
	st := n.Stats()
	cs := ClusterStatus{
		Leader: st.Leader, Node: st.ID, State: st.State, Term: st.Term,
		CommitIndex: st.CommitIndex, AppliedIndex: st.AppliedIndex, LastContact: st.LastContact,
		Voters: []StatusVoter{}, Nodes: map[string]int{}, Time: n.cfg.Now().UTC(),
	}
	active := 0
	n.Read(func(m *cluster.Map) {
		if l, ok := m.Nodes[st.Leader]; ok {
			cs.LeaderAPI = l.Addr.API
		}
		for _, v := range st.Voters {
			sv := StatusVoter{Voter: v}
			if nd, ok := m.Nodes[v.ID]; ok {
				sv.API, sv.State = nd.Addr.API, nd.State
			}
			if sv.State == "" || sv.State == cluster.StateActive || sv.State == cluster.StateIsolating {
				active++
			}
			cs.Voters = append(cs.Voters, sv)
		}
		for _, nd := range m.Nodes {
			cs.Nodes[string(nd.State)]++
		}
		cs.Volumes, cs.Work, cs.Config = len(m.Volumes), len(m.Work), m.Config
	})
	switch {
	case cs.Leader == "":
		cs.Errors = append(cs.Errors, "no leader")
	case len(st.Voters) == 0:
		cs.Errors = append(cs.Errors, "no raft configuration")
	case st.State != "Leader" && time.Since(n.raft.LastContact()) > 2*n.cfg.HeartbeatTimeout:
		cs.Errors = append(cs.Errors, fmt.Sprintf("no contact with leader %s for %v", cs.Leader, time.Since(n.raft.LastContact()).Round(time.Millisecond)))
	case active <= len(st.Voters)/2:
		cs.Errors = append(cs.Errors, fmt.Sprintf("only %d of %d voters active", active, len(st.Voters)))
	}
	cs.Healthy = len(cs.Errors) == 0
	return cs
}

func (h *clusterHandler) status(w http.ResponseWriter, r *http.Request) {
	clusterJSON(w, http.StatusOK, h.node.Status())
}

func (h *clusterHandler) join(w http.ResponseWriter, r *http.Request) {
	var req JoinRequest
	if err := clusterDecode(r, &req, false); err != nil {
		WriteError(w, err)
		return
	}
	if err := h.node.Join(r.Context(), req.ID, req.Raft); err != nil {
		h.clusterError(w, r, err)
		return
	}
	vs, err := h.node.Voters()
	if err != nil {
		h.clusterError(w, r, err)
		return
	}
	clusterJSON(w, http.StatusOK, vs)
}

func (h *clusterHandler) leave(w http.ResponseWriter, r *http.Request) {
	var req LeaveRequest
	if err := clusterDecode(r, &req, false); err != nil {
		WriteError(w, err)
		return
	}
	if req.ID == "" {
		WriteError(w, fmt.Errorf("%w: leave needs a node id", api.ErrInvalid))
		return
	}
	if err := h.node.Leave(r.Context(), req.ID); err != nil {
		h.clusterError(w, r, err)
		return
	}
	vs, err := h.node.Voters()
	if err != nil {
		h.clusterError(w, r, err)
		return
	}
	clusterJSON(w, http.StatusOK, vs)
}

func (h *clusterHandler) configure(w http.ResponseWriter, r *http.Request) {
	var req ConfigureRequest
	if err := clusterDecode(r, &req, false); err != nil {
		WriteError(w, err)
		return
	}
	if _, err := req.merge(cluster.DefaultConfig()); err != nil {
		WriteError(w, err) // refuse a bad body before taking the lock
		return
	}
	h.configuring.Lock()
	defer h.configuring.Unlock()
	var cur cluster.Config
	if err := h.node.ConsistentRead(r.Context(), func(m *cluster.Map) { cur = m.Config }); err != nil {
		h.clusterError(w, r, err)
		return
	}
	next, err := req.merge(cur)
	if err != nil {
		WriteError(w, err)
		return
	}
	if _, err := h.node.Propose(r.Context(), cluster.Command{Op: cluster.OpConfigure, Config: &next}); err != nil {
		h.clusterError(w, r, err)
		return
	}
	h.log.Info("control: configure", "lease_timeout", next.LeaseTimeout, "suspect_timeout", next.SuspectTimeout,
		"min_health", next.MinHealth, "default_partition_size", next.DefaultPartitionSize, "default_replicas", next.DefaultReplicas)
	clusterJSON(w, http.StatusOK, next)
}

func (h *clusterHandler) volumes(w http.ResponseWriter, r *http.Request) {
	h.read(w, r, func(m *cluster.Map) (any, error) { return m.VolumeList(), nil })
}

func (h *clusterHandler) volume(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	h.read(w, r, func(m *cluster.Map) (any, error) {
		v, ok := m.Volume(name)
		if !ok {
			return nil, fmt.Errorf("%w: volume %q", api.ErrNotFound, name)
		}
		return v, nil
	})
}

func (h *clusterHandler) work(w http.ResponseWriter, r *http.Request) {
	h.read(w, r, func(m *cluster.Map) (any, error) {
		out := append([]cluster.Work{}, m.Work...)
		return out, nil
	})
}

func (h *clusterHandler) listNodes(w http.ResponseWriter, r *http.Request) {
	h.read(w, r, func(m *cluster.Map) (any, error) { return m.NodeList(), nil })
}

func (h *clusterHandler) showNode(w http.ResponseWriter, r *http.Request) {
	id := api.NodeID(r.PathValue("id"))
	voters, _ := h.node.Voters()
	h.read(w, r, func(m *cluster.Map) (any, error) {
		n, ok := m.Node(id)
		if !ok {
			return nil, fmt.Errorf("%w: node %s is not registered", api.ErrNotFound, id)
		}
		v := NodeView{Node: n, Grants: m.Grants(id)}
		if v.Grants == nil {
			v.Grants = []cluster.Grant{}
		}
		if s, ok := m.Sleds[id]; ok {
			cp := *s
			cp.Devices = append([]cluster.Device{}, s.Devices...)
			v.Sled = &cp
		}
		for i := range voters {
			if voters[i].ID == id {
				v.Voter = &voters[i]
			}
		}
		return v, nil
	})
}

func (h *clusterHandler) register(w http.ResponseWriter, r *http.Request) {
	var req RegisterRequest
	if err := clusterDecode(r, &req, false); err != nil {
		WriteError(w, err)
		return
	}
	spec := req.NodeSpec
	h.propose(w, r, http.StatusCreated, cluster.Command{Op: cluster.OpRegister, Node: req.ID, Spec: &spec, Health: req.Health},
		func(res cluster.Result) any { return res.Node })
}

func (h *clusterHandler) removeNode(w http.ResponseWriter, r *http.Request) {
	id := api.NodeID(r.PathValue("id"))
	if _, err := h.node.Propose(r.Context(), cluster.Command{Op: cluster.OpRemoveNode, Node: id}); err != nil {
		h.clusterError(w, r, err)
		return
	}
	if err := h.node.Leave(r.Context(), id); err != nil {
		h.clusterError(w, r, err)
		return
	}
	h.log.Info("control: node removed", "node", string(id))
	w.WriteHeader(http.StatusNoContent)
}

func (h *clusterHandler) heartbeat(w http.ResponseWriter, r *http.Request) {
	var req HeartbeatRequest
	if err := clusterDecode(r, &req, false); err != nil {
		WriteError(w, err)
		return
	}
	h.propose(w, r, http.StatusOK, cluster.Command{Op: cluster.OpHeartbeat, Node: api.NodeID(r.PathValue("id")), Health: req.Health},
		func(res cluster.Result) any { return res.Node })
}

func (h *clusterHandler) drain(op cluster.Op) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		h.propose(w, r, http.StatusOK, cluster.Command{Op: op, Node: api.NodeID(r.PathValue("id"))},
			func(res cluster.Result) any { return res.Node })
	}
}

func (h *clusterHandler) sled(w http.ResponseWriter, r *http.Request) {
	var req SledRequest
	if err := clusterDecode(r, &req, false); err != nil {
		WriteError(w, err)
		return
	}
	h.propose(w, r, http.StatusOK, cluster.Command{Op: cluster.OpSetSled, Node: api.NodeID(r.PathValue("id")), Devices: req.Devices},
		func(res cluster.Result) any { return res.Node })
}

func (h *clusterHandler) listGrants(w http.ResponseWriter, r *http.Request) {
	node := api.NodeID(r.URL.Query().Get("node"))
	volume := r.URL.Query().Get("volume")
	h.read(w, r, func(m *cluster.Map) (any, error) {
		out := []cluster.Grant{}
		for _, g := range m.Grants(node) {
			if volume == "" || g.Volume == volume {
				out = append(out, g)
			}
		}
		return out, nil
	})
}

func (h *clusterHandler) grant(op cluster.Op) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req GrantRequest
		if err := clusterDecode(r, &req, false); err != nil {
			WriteError(w, err)
			return
		}
		c := cluster.Command{Op: op, Volume: req.Volume, Partition: req.Partition, Role: req.Role, Node: req.Node, Epoch: req.Epoch, Force: req.Force}
		h.propose(w, r, http.StatusOK, c, func(res cluster.Result) any {
			if res.Blessing != nil {
				return res.Blessing
			}
			return res.Grant
		})
	}
}

func (h *clusterHandler) inSync(w http.ResponseWriter, r *http.Request) {
	var req InSyncRequest
	if err := clusterDecode(r, &req, false); err != nil {
		WriteError(w, err)
		return
	}
	c := cluster.Command{Op: cluster.OpSetInSync, Volume: req.Volume, Partition: req.Partition, Node: req.Node, Epoch: req.Epoch, Nodes: req.InSync}
	h.propose(w, r, http.StatusOK, c, func(res cluster.Result) any { return res.Volume })
}

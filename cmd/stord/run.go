package main

// `stord run`: one node of a multi-node cluster, with the roles it is given.
//
//	stord run --node-id n1 --roles control,head,sled,export --data DIR \
//	          --api-listen 127.0.0.11:7480 --bootstrap
//	stord run --node-id n2 --data DIR --api-listen 127.0.0.12:7480 \
//	          --join http://127.0.0.11:7480
//
// Every listen address given as ":PORT" takes the host of --api-listen, so a
// node is usually told only its API address. Layout of --data:
//
//	DIR/node.json   the node id the directory belongs to (a reused directory
//	                with another --node-id is refused), and whether the
//	                control plane accepted it once
//	DIR/raft/       control role: raft log, stable store and snapshots
//	DIR/volumes/    head+export roles: the local volume manager (see below)
//
// Start-up: the control role opens its raft node (bootstrapping a
// one-voter cluster with --bootstrap and no raft state), then the API and
// NBD listeners serve. The node registers synchronously through --join and
// its own API, bounded by --join-timeout, so a wrong --join or a node id
// already registered with other addresses ends the process with one clear
// error; a node registered before (node.json) goes on when no control node
// answers, since the whole cluster may be restarting. Then the
// membership agent (ctl/control.StartAgent) joins the raft group (control
// role) and heartbeats.
//
// Data path: a node with the head or export role runs replica/head (see
// export.go): the head role holds the replicas the cluster map places on
// the node and serves them to peers on --peer-listen; the export role
// serves every volume of the map over NBD and iSCSI, whichever nodes hold
// it, so an initiator may use any export node's address.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/ctl/control"
)

// Errors of `stord run`.
var (
	errConfig    = errors.New("bad configuration")
	errJoin      = errors.New("cannot join the cluster")
	errDataOwner = errors.New("data directory belongs to another node")
	errNoAnswer  = errors.New("no control node accepted the registration")
)

var allRoles = []string{cluster.NodeRoleControl, cluster.NodeRoleHead, cluster.NodeRoleSled, cluster.NodeRoleExport}

type runFlags struct {
	config        string
	nodeID        string
	roles         []string
	data          string
	raftAddr      string
	apiAddr       string
	peerAddr      string
	nbdAddr       string
	iscsiAddr     string
	failureDomain string
	bootstrap     bool
	join          []string
	joinTimeout   time.Duration
	logFormat     string
	logLevel      string
}

func (f *runFlags) has(role string) bool { return slices.Contains(f.roles, role) }

func runCommand(stdout, stderr io.Writer) *cobra.Command {
	var f runFlags
	c := &cobra.Command{
		Use:   "run",
		Short: "run one node of a multi-node cluster",
		Long: `Run one node of a multi-node cluster with the given roles.

The first control node starts with --bootstrap; every other node is given
--join URL (any control node's API). Listen addresses given as ":PORT" use
the host of --api-listen. --config FILE reads a JSON object whose keys are
these flags' names (e.g. {"node-id": "n1", "roles": ["control", "head"]});
flags on the command line win.

A head node holds the replicas the cluster map places on it (replicated
primary -> secondaries, failover through the control plane); an export
node serves every volume of the cluster over NBD and iSCSI.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if f.config != "" {
				if err := applyConfigFile(cmd.Flags(), f.config); err != nil {
					return err
				}
			}
			if err := f.check(); err != nil {
				return err
			}
			log, err := newLogger(stderr, f.logFormat, f.logLevel)
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			return runNode(ctx, f, stdout, log)
		},
	}
	fl := c.Flags()
	fl.StringVar(&f.config, "config", "", "JSON file with the same keys as these flags")
	fl.StringVar(&f.nodeID, "node-id", "", "this node's id, unique in the cluster (required)")
	fl.StringSliceVar(&f.roles, "roles", allRoles, "roles to run: control, head, sled, export")
	fl.StringVar(&f.data, "data", "", "data directory (required)")
	fl.StringVar(&f.apiAddr, "api-listen", "127.0.0.1:7480", "HTTP API listen address; its host is this node's address")
	fl.StringVar(&f.raftAddr, "raft-listen", ":7481", "raft listen address (control role)")
	fl.StringVar(&f.peerAddr, "peer-listen", ":7482", "replication listen address (head and export roles)")
	fl.StringVar(&f.nbdAddr, "nbd-listen", ":10809", "NBD listen address (export role)")
	fl.StringVar(&f.iscsiAddr, "iscsi-listen", ":3260", `iSCSI listen address (export role; "off" to disable)`)
	fl.StringVar(&f.failureDomain, "failure-domain", "", "failure domain (rack, host, zone) for placement")
	fl.BoolVar(&f.bootstrap, "bootstrap", false, "form a new cluster with this node as its first voter (control role)")
	fl.StringSliceVar(&f.join, "join", nil, "API URL of a control node to join through (repeat or comma-separate)")
	fl.DurationVar(&f.joinTimeout, "join-timeout", 30*time.Second, "give up registering a new node after this long")
	fl.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fl.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	return c
}

// applyConfigFile sets every flag named in the JSON object in path that the
// command line did not set.
func applyConfigFile(fs *pflag.FlagSet, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%w: --config: %v", errConfig, err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("%w: --config %s: want a JSON object of flag names: %v", errConfig, path, err)
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fl := fs.Lookup(k)
		if fl == nil || k == "config" {
			return fmt.Errorf("%w: --config %s: unknown key %q", errConfig, path, k)
		}
		if fl.Changed {
			continue
		}
		var vals []string
		switch v := m[k].(type) {
		case string:
			vals = []string{v}
		case bool, float64:
			vals = []string{fmt.Sprint(v)}
		case []any:
			for _, x := range v {
				s, ok := x.(string)
				if !ok {
					return fmt.Errorf("%w: --config %s: key %q: want strings in the list", errConfig, path, k)
				}
				vals = append(vals, s)
			}
		default:
			return fmt.Errorf("%w: --config %s: key %q: want a string, number, boolean or list of strings", errConfig, path, k)
		}
		if sv, ok := fl.Value.(pflag.SliceValue); ok {
			err = sv.Replace(vals)
		} else {
			err = fl.Value.Set(strings.Join(vals, ","))
		}
		if err != nil {
			return fmt.Errorf("%w: --config %s: key %q: %v", errConfig, path, k, err)
		}
	}
	return nil
}

// check validates the flags and resolves ":PORT" addresses.
func (f *runFlags) check() error {
	if f.nodeID == "" {
		return fmt.Errorf("%w: --node-id is required", errConfig)
	}
	if strings.ContainsAny(f.nodeID, "/?#% \t\n") || len(f.nodeID) > 63 {
		return fmt.Errorf("%w: --node-id %q: use up to 63 characters, no spaces or / ? # %%", errConfig, f.nodeID)
	}
	if f.data == "" {
		return fmt.Errorf("%w: --data is required", errConfig)
	}
	if len(f.roles) == 0 {
		return fmt.Errorf("%w: --roles is empty: want some of %s", errConfig, strings.Join(allRoles, ","))
	}
	for i, r := range f.roles {
		f.roles[i] = strings.TrimSpace(r)
		if !slices.Contains(allRoles, f.roles[i]) {
			return fmt.Errorf("%w: --roles: unknown role %q: want some of %s", errConfig, r, strings.Join(allRoles, ","))
		}
	}
	slices.Sort(f.roles)
	f.roles = slices.Compact(f.roles)
	host, _, err := net.SplitHostPort(f.apiAddr)
	if err != nil {
		return fmt.Errorf("%w: --api-listen %q: want HOST:PORT", errConfig, f.apiAddr)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		return fmt.Errorf("%w: --api-listen %q: name the address other nodes reach this one at, not a wildcard", errConfig, f.apiAddr)
	}
	for _, a := range []struct {
		name string
		addr *string
	}{{"raft-listen", &f.raftAddr}, {"peer-listen", &f.peerAddr}, {"nbd-listen", &f.nbdAddr}, {"iscsi-listen", &f.iscsiAddr}} {
		h, p, err := net.SplitHostPort(*a.addr)
		if err != nil {
			return fmt.Errorf("%w: --%s %q: want HOST:PORT or :PORT", errConfig, a.name, *a.addr)
		}
		if h == "" {
			*a.addr = net.JoinHostPort(host, p)
		}
	}
	if f.bootstrap && !f.has(cluster.NodeRoleControl) {
		return fmt.Errorf("%w: --bootstrap needs the control role", errConfig)
	}
	if !f.bootstrap && len(f.join) == 0 {
		return fmt.Errorf("%w: give --bootstrap (first control node) or --join URL", errConfig)
	}
	for i, u := range f.join {
		u = strings.TrimRight(strings.TrimSpace(u), "/")
		if !strings.Contains(u, "://") {
			u = "http://" + u
		}
		if _, _, err := net.SplitHostPort(strings.TrimPrefix(strings.TrimPrefix(u, "http://"), "https://")); err != nil {
			return fmt.Errorf("%w: --join %q: want http://HOST:PORT", errConfig, f.join[i])
		}
		f.join[i] = u
	}
	if f.joinTimeout <= 0 {
		return fmt.Errorf("%w: --join-timeout must be positive", errConfig)
	}
	return nil
}

// nodeFile is DIR/node.json.
type nodeFile struct {
	ID api.NodeID `json:"id"`
	// Registered is set once the control plane accepted the node: later
	// starts skip the synchronous check-in (the cluster may be restarting
	// and have no leader yet).
	Registered bool `json:"registered,omitempty"`
}

// claimData makes sure dir belongs to node id (claiming it on first use)
// and returns what DIR/node.json says.
func claimData(dir string, id api.NodeID) (nodeFile, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nodeFile{}, err
	}
	b, err := os.ReadFile(filepath.Join(dir, "node.json"))
	switch {
	case errors.Is(err, os.ErrNotExist):
		nf := nodeFile{ID: id}
		return nf, saveNodeFile(dir, nf)
	case err != nil:
		return nodeFile{}, err
	}
	var nf nodeFile
	if err := json.Unmarshal(b, &nf); err != nil {
		return nodeFile{}, fmt.Errorf("%s: %w", filepath.Join(dir, "node.json"), err)
	}
	if nf.ID != id {
		return nodeFile{}, fmt.Errorf("%w: %s is node %s's, not %s", errDataOwner, dir, nf.ID, id)
	}
	return nf, nil
}

func saveNodeFile(dir string, nf nodeFile) error {
	b, _ := json.Marshal(nf)
	p := filepath.Join(dir, "node.json")
	if err := os.WriteFile(p+".tmp", append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(p+".tmp", p)
}

// node is one running `stord run` process: its roles' parts.
type node struct {
	f     runFlags
	id    api.NodeID
	base  *slog.Logger // for ctl/control, which adds the node id itself
	log   *slog.Logger // base with the node id
	start time.Time
	reg   *prometheus.Registry

	apiLn net.Listener
	ctl   *controlRole                  // nil without the control role
	exp   *exportRole                   // nil without the head and export roles
	agent atomic.Pointer[control.Agent] // set once registered; read by status
}

func runNode(ctx context.Context, f runFlags, stdout io.Writer, log *slog.Logger) (err error) {
	n := &node{f: f, id: api.NodeID(f.nodeID), base: log, log: log.With("node", f.nodeID), start: time.Now(), reg: prometheus.NewRegistry()}
	n.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	nf, err := claimData(f.data, n.id)
	if err != nil {
		return err
	}
	var closers []func() error
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			err = errors.Join(err, closers[i]())
		}
		if err == nil {
			n.log.Info("stopped cleanly")
		}
	}()

	if n.apiLn, err = net.Listen("tcp", f.apiAddr); err != nil {
		return fmt.Errorf("API listener: %w", err)
	}
	closers = append(closers, func() error { n.apiLn.Close(); return nil })

	if f.has(cluster.NodeRoleControl) {
		if n.ctl, err = startControl(n); err != nil {
			return err
		}
		closers = append(closers, n.ctl.close)
	}
	if f.has(cluster.NodeRoleHead) || f.has(cluster.NodeRoleExport) {
		if n.exp, err = startExport(ctx, n); err != nil {
			return err
		}
		closers = append(closers, n.exp.close)
	}

	httpSrv := &http.Server{Handler: n.handler(), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() {
		if err := httpSrv.Serve(n.apiLn); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
			return
		}
		errc <- nil
	}()
	closers = append(closers, func() error {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := httpSrv.Shutdown(sctx)
		if serr := <-errc; err == nil {
			err = serr
		}
		return err
	})

	spec := n.spec()
	// Its own API serves once this node is a voter (it forwards to the leader).
	self := f.bootstrap || (n.ctl != nil && nf.Registered)
	switch err := n.checkIn(ctx, spec, self); {
	case ctx.Err() != nil:
		n.log.Info("shutting down before the check-in completed")
		return nil
	case errors.Is(err, errNoAnswer) && nf.Registered:
		// A known node: the cluster may be restarting and elect a
		// leader only once this node's raft runs. The agent goes on.
		n.log.Warn("no control node answered the check-in yet; going on", "err", err)
	case err != nil:
		return err
	case !nf.Registered:
		nf.Registered = true
		if err := saveNodeFile(f.data, nf); err != nil {
			return err
		}
	}
	joinURLs := slices.Clone(f.join)
	if n.ctl != nil {
		joinURLs = append([]string{"http://" + spec.Addr.API}, joinURLs...)
	}
	agent, err := control.StartAgent(control.AgentConfig{
		ID: n.id, Spec: spec, Join: joinURLs, Voter: n.ctl != nil, Logger: n.base,
	})
	if err != nil {
		return err
	}
	n.agent.Store(agent)
	closers = append(closers, func() error { agent.Close(); return nil })

	n.log.Info("stord run started", "roles", strings.Join(f.roles, ","), "api", spec.Addr.API, "raft", spec.Addr.Raft, "nbd", spec.Addr.NBD, "data", f.data)
	fmt.Fprintf(stdout, "stor node %s is running (roles %s, data in %s).\n  API:  export STOR_API=http://%s   then: storctl cluster status\n",
		n.id, strings.Join(f.roles, ","), f.data, spec.Addr.API)
	if spec.Addr.NBD != "" {
		fmt.Fprintf(stdout, "  NBD:  nbd://%s/VOLUME\n", spec.Addr.NBD)
	}
	if spec.Addr.ISCSI != "" {
		fmt.Fprintf(stdout, "  iSCSI: portal %s, target %s\n", spec.Addr.ISCSI, api.IQN("VOLUME"))
	}

	var serveErr error
	select {
	case <-ctx.Done():
		n.log.Info("shutting down")
	case serveErr = <-errc:
		errc <- serveErr // for the closer
		n.log.Error("API server failed", "err", serveErr)
	case <-n.exp.stopped():
		serveErr = n.exp.err
		n.log.Error("NBD server failed", "err", serveErr)
	}
	return serveErr
}

// spec is what the node registers: its addresses as the listeners bound
// them.
func (n *node) spec() cluster.NodeSpec {
	s := cluster.NodeSpec{Roles: n.f.roles, FailureDomain: n.f.failureDomain}
	s.Addr.API = n.apiLn.Addr().String()
	if n.ctl != nil {
		s.Addr.Raft = n.ctl.node.RaftAddr()
	}
	if n.exp != nil {
		s.Addr.Peer = n.exp.data.Addr().String()
		if n.exp.nbdLn != nil {
			s.Addr.NBD = n.exp.nbdLn.Addr().String()
		}
		if n.exp.iscsiLn != nil {
			s.Addr.ISCSI = n.exp.iscsiLn.Addr().String()
		}
	}
	return s
}

// checkIn registers the node through the control plane (again, after a
// restart: the same addresses are accepted), bounded by --join-timeout: a
// wrong --join or a node id registered with other addresses is an error
// here, not a retry loop in the background. No answer at all wraps
// errNoAnswer, which a node registered before rides out.
func (n *node) checkIn(ctx context.Context, spec cluster.NodeSpec, self bool) error {
	urls := slices.Clone(n.f.join)
	if self {
		urls = append([]string{"http://" + spec.Addr.API}, urls...)
	}
	ctx, cancel := context.WithTimeout(ctx, n.f.joinTimeout)
	defer cancel()
	hc := &http.Client{Timeout: 5 * time.Second}
	req := client.RegisterNode{ID: n.id, NodeSpec: spec, Health: 100}
	last := map[string]error{}
	for {
		for _, u := range urls {
			_, err := client.New(u, hc).RegisterNode(ctx, req)
			var ce *client.Error
			switch {
			case err == nil:
				n.log.Info("registered", "via", u)
				return nil
			case errors.Is(err, api.ErrExists):
				return nil // registered before with these addresses
			case errors.Is(err, api.ErrInUse), errors.Is(err, api.ErrInvalid):
				return fmt.Errorf("%w through %s: %w", errJoin, u, err)
			case errors.As(err, &ce) && ce.Status != http.StatusServiceUnavailable:
				return fmt.Errorf("%w through %s: is it a stor control node? %w", errJoin, u, err)
			}
			if ctx.Err() != nil {
				break
			}
			last[u] = err
		}
		select {
		case <-ctx.Done():
			var parts []string
			for _, u := range urls {
				if e := last[u]; e != nil {
					parts = append(parts, fmt.Sprintf("%s: %v", u, e))
				}
			}
			return fmt.Errorf("%w: %w within %v (%s)", errJoin, errNoAnswer, n.f.joinTimeout, strings.Join(parts, "; "))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// handler is the node's HTTP API: the cluster and volume API on a control
// node (forwarded to the leader), only /v1/status and /metrics elsewhere.
func (n *node) handler() http.Handler {
	metrics := promhttpHandler(n.reg)
	if n.ctl != nil {
		return n.ctl.handler(n.status, metrics, n.replicas)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/replicas", n.replicas)
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, _ := n.status(r.Context())
		b, _ := json.MarshalIndent(st, "", "  ")
		w.Header().Set("Content-Type", "application/json")
		w.Write(append(b, '\n'))
	})
	mux.Handle("GET /metrics", metrics)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		control.WriteError(w, fmt.Errorf("%w: node %s runs no control role; send %s %s to a control node (%s)",
			api.ErrNotFound, n.id, r.Method, r.URL.Path, strings.Join(n.f.join, ", ")))
	})
	return mux
}

// replicas is GET /v1/replicas: the partition replicas this node holds.
func (n *node) replicas(w http.ResponseWriter, r *http.Request) {
	out := []api.ReplicaStatus{}
	if n.exp != nil {
		out = n.exp.data.Status()
	}
	b, _ := json.MarshalIndent(out, "", "  ")
	w.Header().Set("Content-Type", "application/json")
	w.Write(append(b, '\n'))
}

// status is GET /v1/status: this node's view.
func (n *node) status(ctx context.Context) (api.Status, error) {
	st := api.Status{
		Node: n.id, Version: version, Roles: n.f.roles, Uptime: time.Since(n.start).Truncate(time.Second).String(),
		API: n.apiLn.Addr().String(), DataDir: n.f.data,
	}
	if n.ctl != nil {
		cs := n.ctl.node.Status()
		st.Healthy, st.Volumes = cs.Healthy, cs.Volumes
	} else if a := n.agent.Load(); a != nil {
		st.Healthy = a.State() == cluster.StateActive
	}
	if n.exp != nil && n.exp.nbdLn != nil {
		st.NBD = n.exp.nbdLn.Addr().String()
		st.Connected = n.exp.data.Connections()
	}
	if n.exp != nil && n.exp.iscsiLn != nil {
		st.ISCSI = n.exp.iscsiLn.Addr().String()
	}
	return st, nil
}

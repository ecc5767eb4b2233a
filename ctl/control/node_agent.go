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
	"strings"
	"sync"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// Agent keeps one node's membership: it registers the node, joins it to the
// raft group when it is a voter, then heartbeats with its health score. It
// speaks the cluster API over HTTP to any control node (followers forward),
// so it runs on every node, control voter or not.
//
// The agent is how a node knows it is isolating: State is the state the
// control plane answered with last, and becomes StateIsolating on its own
// when no heartbeat was acknowledged for the cluster's suspect timeout.
//
// The agent learns the cluster's config from GET /v1/cluster/status once
// registered and again after a heartbeat once relearnEvery has passed, so a
// configure reaches running agents within about a second and a heartbeat
// period (the leader's hand-offs wait configSettle for that). Unless AgentConfig sets them, it takes from it:
//   - the suspect timeout after which it counts itself isolating;
//   - its heartbeat period, min(1s, suspect timeout/3) and at least
//     minHeartbeatPeriod, so that at least two heartbeats fall in every
//     suspect timeout. Before it has learned anything it assumes
//     cluster.DefaultConfig.
type Agent struct {
	cfg    AgentConfig
	log    *slog.Logger
	cancel context.CancelFunc
	done   chan struct{}

	mu struct {
		sync.Mutex
		state   cluster.State
		renewed time.Time     // last acknowledged heartbeat (local clock)
		suspect time.Duration // isolating after this long unrenewed
		learned time.Duration // the cluster's suspect timeout, as last learned
		trusted bool          // learned from the leader's status
		err     error         // last error, nil after a success
	}
}

// AgentConfig configures StartAgent.
type AgentConfig struct {
	ID       api.NodeID
	Spec     cluster.NodeSpec // Spec.Addr.API is required; Spec.Addr.Raft when Voter
	Join     []string         // base URLs of control nodes, tried in turn (http://host:port)
	Voter    bool             // ask to join the raft group at Spec.Addr.Raft
	Interval time.Duration    // heartbeat period; 0: min(1s, the cluster's suspect timeout/3)
	Suspect  time.Duration    // isolating after this long unrenewed; 0: the cluster's suspect timeout
	Health   func() int       // the health score 0..100; nil: 100
	Client   *http.Client     // nil: a client with a 5s timeout
	Logger   *slog.Logger     // nil: slog.Default()
}

// StartAgent starts the agent's goroutine; Close stops it.
func StartAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.ID == "" || cfg.Spec.Addr.API == "" || len(cfg.Join) == 0 {
		return nil, fmt.Errorf("%w: agent needs a node id, an api address and a control URL", api.ErrInvalid)
	}
	if cfg.Voter && cfg.Spec.Addr.Raft == "" {
		return nil, fmt.Errorf("%w: a voter agent needs a raft address", api.ErrInvalid)
	}
	if cfg.Interval < 0 {
		cfg.Interval = 0
	}
	if cfg.Health == nil {
		cfg.Health = func() int { return 100 }
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: 5 * time.Second}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{cfg: cfg, log: cfg.Logger.With("node", string(cfg.ID)), cancel: cancel, done: make(chan struct{})}
	a.mu.learned = cluster.DefaultConfig().SuspectTimeout
	a.mu.suspect = cfg.Suspect
	if a.mu.suspect <= 0 {
		a.mu.suspect = a.mu.learned
	}
	go a.run(ctx)
	return a, nil
}

// Close stops the agent and waits for its goroutine.
func (a *Agent) Close() {
	a.cancel()
	<-a.done
}

// State is the node's state as last answered by the control plane, or
// StateIsolating when no heartbeat was acknowledged for the suspect
// timeout; "" before the first answer.
func (a *Agent) State() cluster.State {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.mu.renewed.IsZero() && time.Since(a.mu.renewed) > a.mu.suspect && a.mu.state != cluster.StateDead {
		return cluster.StateIsolating
	}
	return a.mu.state
}

// Err is the last error the agent met, nil after a success.
func (a *Agent) Err() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mu.err
}

func (a *Agent) setErr(err error) {
	a.mu.Lock()
	a.mu.err = err
	a.mu.Unlock()
}

// Heartbeat periods.
const (
	maxHeartbeatPeriod = time.Second            // when AgentConfig.Interval is 0
	minHeartbeatPeriod = 10 * time.Millisecond  // however short the suspect timeout
	relearnEvery       = time.Second            // least time between two config reads
	untrustedPeriod    = 250 * time.Millisecond // longest period until the leader's config is learned
)

// heartbeatPeriod is the agent's heartbeat period: explicit when set, else
// min(maxHeartbeatPeriod, suspect/3), at least minHeartbeatPeriod.
func heartbeatPeriod(explicit, suspect time.Duration) time.Duration {
	if explicit > 0 {
		return explicit
	}
	return max(min(maxHeartbeatPeriod, suspect/3), minHeartbeatPeriod)
}

// interval is the heartbeat period now: at most untrustedPeriod until the
// config was learned from the leader (a restarted node's own map may
// hold an old, longer suspect timeout, and the lease may be shorter than
// the period that one gives).
func (a *Agent) interval() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := heartbeatPeriod(a.cfg.Interval, a.mu.learned)
	if !a.mu.trusted && a.cfg.Interval <= 0 {
		p = min(p, untrustedPeriod)
	}
	return p
}

func (a *Agent) run(ctx context.Context) {
	defer close(a.done)
	registered, joined := false, !a.cfg.Voter
	var learned time.Time // when the config was read last
	// The period counts from one step's start to the next's.
	t := time.NewTimer(a.interval())
	defer t.Stop()
	for {
		var err error
		switch {
		case !registered:
			err = a.register(ctx)
			registered = err == nil
			if registered {
				a.learnConfig(ctx)
				learned = time.Now()
			}
		case !joined:
			err = a.call(ctx, "POST", "/v1/cluster/join", JoinRequest{ID: a.cfg.ID, Raft: a.cfg.Spec.Addr.Raft}, nil)
			joined = err == nil
			if joined {
				a.log.Info("control: joined the raft group")
			}
		default:
			err = a.heartbeat(ctx)
			if errors.Is(err, api.ErrNotFound) {
				registered = false // removed from the map: register again
			}
			if err == nil && (time.Since(learned) >= relearnEvery || !a.trusted()) {
				a.learnConfig(ctx)
				learned = time.Now()
			}
		}
		a.setErr(err)
		if err != nil && ctx.Err() == nil {
			a.log.Debug("control: agent", "err", err)
		}
		if err == nil && (!registered || !joined) {
			continue // next step at once
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			t.Reset(a.interval())
		}
	}
}

// trusted reports whether the config was learned from the leader.
func (a *Agent) trusted() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mu.trusted
}

func (a *Agent) register(ctx context.Context) error {
	var n cluster.Node
	err := a.call(ctx, "POST", "/v1/nodes", RegisterRequest{ID: a.cfg.ID, NodeSpec: a.cfg.Spec, Health: a.cfg.Health()}, &n)
	if errors.Is(err, api.ErrExists) {
		return nil // registered before, with these addresses
	}
	if err != nil {
		return err
	}
	a.log.Info("control: node registered")
	return nil
}

// learnConfig reads the cluster's suspect timeout, which sets the isolation
// timeout and the heartbeat period where AgentConfig left them 0. A failed
// read keeps what the agent knew.
func (a *Agent) learnConfig(ctx context.Context) {
	if a.cfg.Suspect > 0 && a.cfg.Interval > 0 {
		return
	}
	var st ClusterStatus
	if err := a.call(ctx, "GET", "/v1/cluster/status", nil, &st); err != nil || st.Config.SuspectTimeout <= 0 {
		a.log.Debug("control: agent: learn the cluster config", "err", err)
		return
	}
	// A status is the answering node's own map, which a follower that
	// just restarted holds from before the entries it has yet to apply
	// (a configure among them): the leader's is the one to learn.
	trusted := st.State == "Leader"
	if !trusted && st.LeaderAPI != "" {
		var ls ClusterStatus
		if err := a.callAt(ctx, "http://"+st.LeaderAPI, "GET", "/v1/cluster/status", nil, &ls); err == nil && ls.Config.SuspectTimeout > 0 {
			st, trusted = ls, ls.State == "Leader"
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.mu.trusted = trusted
	if a.mu.learned != st.Config.SuspectTimeout {
		a.log.Info("control: cluster suspect timeout", "suspect", st.Config.SuspectTimeout,
			"heartbeat", heartbeatPeriod(a.cfg.Interval, st.Config.SuspectTimeout))
	}
	a.mu.learned = st.Config.SuspectTimeout
	if a.cfg.Suspect <= 0 {
		a.mu.suspect = st.Config.SuspectTimeout
	}
}

func (a *Agent) heartbeat(ctx context.Context) error {
	var n cluster.Node
	if err := a.call(ctx, "POST", "/v1/nodes/"+string(a.cfg.ID)+"/heartbeat", HeartbeatRequest{Health: a.cfg.Health()}, &n); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.mu.state != n.State {
		a.log.Info("control: node state", "state", string(n.State))
	}
	a.mu.state = n.State
	a.mu.renewed = time.Now()
	return nil
}

// attemptTimeout is how long one control node gets to answer one call:
// half the suspect timeout, at least a second.
func (a *Agent) attemptTimeout() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	return max(time.Second, a.mu.suspect/2)
}

// call sends one request to the first control URL that answers.
func (a *Agent) call(ctx context.Context, method, path string, body, out any) error {
	var last error
	for _, base := range a.cfg.Join {
		err := a.callAt(ctx, base, method, path, body, out)
		if !errors.Is(err, errNoAnswer) {
			return err
		}
		last = err
	}
	return fmt.Errorf("no control node answered: %w", last)
}

// errNoAnswer marks a callAt error after which the next control node is
// asked: no connection, a timeout, or 503 (no leader known).
var errNoAnswer = errors.New("no answer")

// callAt sends one request to the control node at base. An error that
// wraps errNoAnswer means another node may answer.
func (a *Agent) callAt(ctx context.Context, base, method, path string, body, out any) error {
	var b []byte
	if body != nil {
		var err error
		if b, err = json.Marshal(body); err != nil {
			return fmt.Errorf("%w: %v", api.ErrInternal, err)
		}
	}
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	// One node's attempt is bounded well under the suspect timeout: a
	// control node cut off from the network (packets dropped) must not
	// make this node miss its heartbeats while others answer.
	actx, cancel := context.WithTimeout(ctx, a.attemptTimeout())
	defer cancel()
	req, err := http.NewRequestWithContext(actx, method, strings.TrimRight(base, "/")+path, bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("%w: %v", api.ErrInvalid, err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.cfg.Client.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %w", errNoAnswer, err)
	}
	data, _ := io.ReadAll(io.LimitReader(resp.Body, MaxBodyBytes))
	resp.Body.Close()
	if resp.StatusCode == http.StatusServiceUnavailable {
		return fmt.Errorf("%w: %s %s: %s", errNoAnswer, method, base+path, strings.TrimSpace(string(data)))
	}
	if resp.StatusCode/100 != 2 {
		var e api.Error
		_ = json.Unmarshal(data, &e)
		for _, c := range api.Codes {
			if c.Code == e.Code {
				return fmt.Errorf("%w: %s", c.Err, e.Error)
			}
		}
		return fmt.Errorf("%w: %s %s: %d %s", api.ErrInternal, method, path, resp.StatusCode, strings.TrimSpace(string(data)))
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("%w: %s %s: %v", api.ErrInternal, method, path, err)
		}
	}
	return nil
}

package main

// The control role of `stord run`: a raft voter of the control plane and
// the HTTP API it serves (ctl/control does the work; this is wiring).

import (
	"context"
	"net"
	"net/http"
	"net/http/pprof"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/control"
)

type controlRole struct {
	node *control.Node
	cfg  control.ClusterHandlerConfig
}

func startControl(n *node) (*controlRole, error) {
	cn, err := control.NewNode(control.NodeConfig{
		ID: n.id, Dir: filepath.Join(n.f.data, "raft"), RaftAddr: n.f.raftAddr,
		Bootstrap: n.f.bootstrap, Logger: n.base,
	})
	if err != nil {
		return nil, err
	}
	// Forwarding to the leader: a leader cut off from the network must
	// fail the forward within a second (the caller then asks another
	// node), not after the default transport's 30 s dial timeout.
	fwd := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: time.Second, KeepAlive: 15 * time.Second}).DialContext,
		ResponseHeaderTimeout: 10 * time.Second,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
	}
	return &controlRole{node: cn, cfg: control.ClusterHandlerConfig{Logger: n.log, Transport: fwd}}, nil
}

// handler serves the cluster routes and the volume API (over the cluster
// map), both answered by the leader; /v1/status, /v1/replicas and /metrics
// are this node's own.
func (c *controlRole) handler(status func(context.Context) (api.Status, error), metrics http.Handler, replicas http.HandlerFunc) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/replicas", replicas)
	control.MountCluster(mux, control.NewClusterHandler(c.node, c.cfg))
	mux.Handle("/", control.LeaderOnly(c.node, control.NewHandler(control.HandlerConfig{
		Volumes: control.ClusterVolumes{Node: c.node}, Status: status, Metrics: metrics, Logger: c.cfg.Logger,
	}), c.cfg))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

func (c *controlRole) close() error { return c.node.Close() }

func promhttpHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

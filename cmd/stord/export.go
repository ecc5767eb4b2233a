package main

// The head and export roles of `stord run`: the replicated data path
// (replica/head) and, with the export role, the NBD and iSCSI servers over
// its catalog of the cluster map's volumes.
//
//	head role    DIR/replicas/: the replicas the map places on this node,
//	             served to peers on --peer-listen
//	export role  NBD on --nbd-listen and iSCSI on --iscsi-listen ("off":
//	             none): every volume of the map, whichever nodes hold it
//
// Not yet in cluster mode: CHAP secrets and persistent reservations are
// `stord dev`'s (its local volume manager keeps them); a cluster's iSCSI
// targets take any initiator and keep reservations in memory.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/replica/head"
	"stor.dev/stor/target/iscsi"
	"stor.dev/stor/target/nbd"
)

type exportRole struct {
	data    *head.Node
	nbdLn   net.Listener // nil without the export role
	iscsiLn net.Listener // nil without the export role or with --iscsi-listen off
	nbd     *nbd.Server
	iscsi   *iscsi.Server
	once    sync.Once
	done    chan struct{} // closed when a server's Serve returned
	err     error         // that Serve's error, valid after done
}

func startExport(ctx context.Context, n *node) (e *exportRole, err error) {
	e = &exportRole{done: make(chan struct{})}
	defer func() {
		if err != nil {
			e.closeListeners()
			if e.data != nil {
				e.data.Close()
			}
		}
	}()
	export := n.f.has(cluster.NodeRoleExport)
	if export {
		if e.nbdLn, err = net.Listen("tcp", n.f.nbdAddr); err != nil {
			return nil, fmt.Errorf("NBD listener: %w", err)
		}
		if n.f.iscsiAddr != "off" {
			if e.iscsiLn, err = net.Listen("tcp", n.f.iscsiAddr); err != nil {
				return nil, fmt.Errorf("iSCSI listener: %w", err)
			}
		}
	}
	urls := slices.Clone(n.f.join)
	if n.f.has(cluster.NodeRoleControl) {
		urls = append([]string{"http://" + n.apiLn.Addr().String()}, urls...)
	}
	e.data, err = head.Open(ctx, head.Config{
		Self: n.id, Dir: filepath.Join(n.f.data, "replicas"), Listen: n.f.peerAddr,
		Control: head.NewHTTPControl(urls, &http.Client{Timeout: 5 * time.Second}),
		Head:    n.f.has(cluster.NodeRoleHead), Logger: n.base,
	})
	if err != nil {
		return nil, err
	}
	if !export {
		return e, nil
	}
	e.nbd = nbd.NewServer(nbd.Config{Catalog: e.data.Catalog(), Logger: n.log, Registerer: n.reg})
	go e.serve(func() error { return e.nbd.Serve(e.nbdLn) }, errNBDStopped)
	if e.iscsiLn != nil {
		e.iscsi = iscsi.NewServer(iscsi.Config{Catalog: e.data.Catalog(), Portal: e.iscsiLn.Addr().String(), Logger: n.log, Registerer: n.reg})
		go e.serve(func() error { return e.iscsi.Serve(e.iscsiLn) }, errISCSIStopped)
	}
	return e, nil
}

var (
	errNBDStopped   = errors.New("NBD server stopped")
	errISCSIStopped = errors.New("iSCSI server stopped")
)

// serve runs one server's Serve; the first to return sets err and closes
// done.
func (e *exportRole) serve(fn func() error, stopped error) {
	err := fn()
	if err == nil {
		err = stopped
	}
	e.once.Do(func() {
		e.err = err
		close(e.done)
	})
}

// stopped is closed when a protocol server stops (on its own, or by
// close); nil for a node without the export role (a nil channel never
// delivers).
func (e *exportRole) stopped() <-chan struct{} {
	if e == nil || e.nbd == nil {
		return nil
	}
	return e.done
}

func (e *exportRole) closeListeners() {
	for _, ln := range []net.Listener{e.nbdLn, e.iscsiLn} {
		if ln != nil {
			ln.Close()
		}
	}
}

func (e *exportRole) close() error {
	var err error
	if e.nbd != nil {
		err = e.nbd.Close()
	}
	if e.iscsi != nil {
		err = errors.Join(err, e.iscsi.Close())
	}
	return errors.Join(err, e.data.Close())
}

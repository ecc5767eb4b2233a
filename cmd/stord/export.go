package main

// The head+export roles of `stord run`, until multi-node replication
// (issue 5): a local, unreplicated volume manager served over NBD, as in
// `stord dev`. The cluster map's volumes are not created here: this node
// serves what its own manager holds.
//
// iSCSI hook: when target/iscsi's server is wired (as in `stord dev`),
// listen on f.iscsiAddr here, serve the same manager as its catalog, and
// set cluster.Addresses.ISCSI in node.spec. --iscsi-listen is accepted and
// not bound until then.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"

	"stor.dev/stor/replica/volume"
	"stor.dev/stor/target/nbd"
)

type exportRole struct {
	nbdLn net.Listener
	mgr   *volume.Manager
	srv   *nbd.Server
	done  chan struct{} // closed when Serve returned
	err   error         // Serve's error, valid after done
}

func startExport(ctx context.Context, n *node) (*exportRole, error) {
	ln, err := net.Listen("tcp", n.f.nbdAddr)
	if err != nil {
		return nil, fmt.Errorf("NBD listener: %w", err)
	}
	mgr, err := volume.OpenManager(ctx, volume.Config{
		Dir: filepath.Join(n.f.data, "volumes"), Logger: n.log, Registerer: n.reg, NBDAddr: ln.Addr().String(),
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	e := &exportRole{nbdLn: ln, mgr: mgr, done: make(chan struct{})}
	e.srv = nbd.NewServer(nbd.Config{Catalog: mgr, Logger: n.log, Registerer: n.reg})
	go func() {
		e.err = e.srv.Serve(ln)
		if e.err == nil {
			e.err = errNBDStopped
		}
		close(e.done)
	}()
	return e, nil
}

var errNBDStopped = errors.New("NBD server stopped")

// stopped is closed when the NBD server stops (on its own, or by close);
// nil for a node without the export role (a nil channel never delivers).
func (e *exportRole) stopped() <-chan struct{} {
	if e == nil {
		return nil
	}
	return e.done
}

func (e *exportRole) close() error {
	err := e.srv.Close()
	<-e.done
	return errors.Join(err, e.mgr.Close())
}

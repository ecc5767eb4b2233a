package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/control"
	"stor.dev/stor/replica/volume"
	"stor.dev/stor/target/iscsi"
	"stor.dev/stor/target/nbd"
)

type devFlags struct {
	data      string
	nbdAddr   string
	apiAddr   string
	iscsiAddr string
	logFormat string
	logLevel  string
	noVol0    bool
	segSize   string
}

func devCommand(stdout, stderr io.Writer) *cobra.Command {
	var f devFlags
	c := &cobra.Command{
		Use:   "dev",
		Short: "run every role in one process (the embedded default)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(stderr, f.logFormat, f.logLevel)
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			return runDev(ctx, f, stdout, log)
		},
	}
	c.Flags().StringVar(&f.data, "data", "./stor-data", "data directory")
	c.Flags().StringVar(&f.nbdAddr, "nbd-listen", "127.0.0.1:10809", "NBD listen address")
	c.Flags().StringVar(&f.apiAddr, "api-listen", "127.0.0.1:7480", "HTTP API and /metrics listen address")
	c.Flags().StringVar(&f.iscsiAddr, "iscsi-listen", "127.0.0.1:3260", `iSCSI listen address ("off" to disable)`)
	c.Flags().StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	c.Flags().StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	c.Flags().BoolVar(&f.noVol0, "no-default-volume", false, "do not create vol0 on first start")
	c.Flags().StringVar(&f.segSize, "journal-segment-size", "64M", "size of a partition journal's segment files (tuning and tests)")
	return c
}

func runDev(ctx context.Context, f devFlags, stdout io.Writer, log *slog.Logger) error {
	start := time.Now()
	segSize, err := api.ParseSize(f.segSize)
	if err != nil || segSize < 64<<10 || segSize > 1<<30 {
		return fmt.Errorf("--journal-segment-size %q: want a size from 64K to 1G", f.segSize)
	}
	if err := os.MkdirAll(f.data, 0o755); err != nil {
		return err
	}
	first := !fileExists(filepath.Join(f.data, "meta"))

	nbdLn, err := net.Listen("tcp", f.nbdAddr)
	if err != nil {
		return fmt.Errorf("NBD listener: %w", err)
	}
	apiLn, err := net.Listen("tcp", f.apiAddr)
	if err != nil {
		nbdLn.Close()
		return fmt.Errorf("API listener: %w", err)
	}

	var iscsiLn net.Listener
	if f.iscsiAddr != "off" && f.iscsiAddr != "" {
		if iscsiLn, err = net.Listen("tcp", f.iscsiAddr); err != nil {
			nbdLn.Close()
			apiLn.Close()
			return fmt.Errorf("iSCSI listener: %w", err)
		}
	}
	closeListeners := func() {
		nbdLn.Close()
		apiLn.Close()
		if iscsiLn != nil {
			iscsiLn.Close()
		}
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	iscsiPortal := ""
	if iscsiLn != nil {
		iscsiPortal = iscsiLn.Addr().String()
	}
	mgr, err := volume.OpenManager(ctx, volume.Config{
		Dir: f.data, Logger: log, Registerer: reg, SegmentSize: segSize,
		NBDAddr: nbdLn.Addr().String(), ISCSIAddr: iscsiPortal,
	})
	if err != nil {
		closeListeners()
		return err
	}
	if first && !f.noVol0 {
		if _, err := mgr.CreateVolume(ctx, api.CreateVolume{Name: "vol0", Size: 1 << 30}); err != nil && !errors.Is(err, api.ErrExists) {
			closeListeners()
			mgr.Close()
			return err
		}
	}

	nbdSrv := nbd.NewServer(nbd.Config{Catalog: mgr, Logger: log, Registerer: reg})
	iscsiSrv := iscsi.NewServer(iscsi.Config{Catalog: mgr, Portal: iscsiPortal, Auth: chapAuth{mgr}, PR: mgr, Logger: log, Registerer: reg})
	status := func(ctx context.Context) (api.Status, error) {
		vs, _ := mgr.Volumes(ctx)
		return api.Status{
			Node: "dev", Version: version, Roles: []string{"control", "head", "sled", "export"},
			Uptime: time.Since(start).Truncate(time.Second).String(), Volumes: len(vs),
			NBD: nbdLn.Addr().String(), ISCSI: iscsiPortal, API: apiLn.Addr().String(), Healthy: true,
			DataDir: f.data, Connected: mgr.Connections(),
		}, nil
	}
	mux := http.NewServeMux()
	mux.Handle("/", control.NewHandler(control.HandlerConfig{
		Volumes: mgr, Status: status, Logger: log,
		Metrics: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}),
	}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	httpSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	errc := make(chan error, 3)
	go func() { errc <- nbdSrv.Serve(nbdLn) }()
	if iscsiLn != nil {
		go func() { errc <- iscsiSrv.Serve(iscsiLn) }()
	}
	go func() {
		if err := httpSrv.Serve(apiLn); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
			return
		}
		errc <- nil
	}()
	log.Info("stord dev started", "data", f.data, "nbd", nbdLn.Addr().String(), "iscsi", iscsiPortal, "api", apiLn.Addr().String())
	fmt.Fprintf(stdout, `stor is running (data in %s).
  NBD:    nbd://%s/vol0     e.g. nbdinfo nbd://%s/vol0
          nbd-client -N vol0 %s %s /dev/nbd0
          qemu-system-x86_64 -drive file=nbd://%s/vol0,format=raw
%s  API:    export STOR_API=http://%s   then: storctl volume list
Stop with Ctrl-C (SIGINT) or SIGTERM: in-flight requests drain and everything is flushed.
`, f.data, nbdLn.Addr(), nbdLn.Addr(), hostOf(nbdLn.Addr()), portOf(nbdLn.Addr()), nbdLn.Addr(), iscsiHelp(iscsiPortal), apiLn.Addr())

	var serveErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case serveErr = <-errc:
		log.Error("server failed", "err", serveErr)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := []error{serveErr}
	errs = append(errs, nbdSrv.Close())
	if iscsiLn != nil {
		errs = append(errs, iscsiSrv.Close())
	}
	errs = append(errs, httpSrv.Shutdown(sctx))
	errs = append(errs, mgr.Close())
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("stopped cleanly")
	return nil
}

func iscsiHelp(portal string) string {
	if portal == "" {
		return ""
	}
	return fmt.Sprintf("  iSCSI:  portal %s, target %s, LUN 0\n          iscsiadm -m discovery -t st -p %s; qemu-img info iscsi://%s/%s/0\n",
		portal, api.IQN("vol0"), portal, portal, api.IQN("vol0"))
}

// chapAuth serves the iSCSI server the CHAP credentials stored with each
// volume.
type chapAuth struct{ m *volume.Manager }

func (a chapAuth) CHAPFor(ctx context.Context, vol string) (iscsi.CHAP, bool, error) {
	if vol == "" {
		return iscsi.CHAP{}, false, nil
	}
	c, ok, err := a.m.CHAP(ctx, vol)
	if err != nil || !ok {
		return iscsi.CHAP{}, false, err
	}
	return iscsi.CHAP{User: c.User, Secret: c.Secret, MutualUser: c.MutualUser, MutualSecret: c.MutualSecret}, true, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func hostOf(a net.Addr) string {
	h, _, _ := net.SplitHostPort(a.String())
	return h
}

func portOf(a net.Addr) string {
	_, p, _ := net.SplitHostPort(a.String())
	return p
}

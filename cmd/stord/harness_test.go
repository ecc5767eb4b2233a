package main

// The end-to-end harness: TestMain builds the stord and storctl binaries
// once; each test starts its own `stord dev` process on free loopback ports
// with its own data directory, drives it with real clients (nbdinfo,
// nbdcopy, qemu-io, qemu-img, fio, nbdfuse, storctl, and nbdtest's Go
// client), and stops it with SIGTERM, requiring exit status 0.
//
// A test that needs a tool skips when it is missing, except under CI=true,
// where a missing tool fails the test: CI installs them all (.ci/run).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
)

// Paths of the binaries TestMain built; empty when the build failed
// (buildErr says why) or the run needs no binaries.
var (
	stordBin, storctlBin string
	buildErr             error
)

// toolTimeout bounds every external command a test runs.
const toolTimeout = 3 * time.Minute

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "stord-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		if wantsBinaries() {
			buildErr = buildBinaries(dir)
		}
		return m.Run()
	}()
	os.Exit(code)
}

// wantsBinaries reports whether the selected tests may need the binaries:
// not for -list or a -run selecting only in-process tests (cheap guess:
// always, except when listing).
func wantsBinaries() bool {
	if f := flag.Lookup("test.list"); f != nil && f.Value.String() != "" {
		return false
	}
	return true
}

func buildBinaries(dir string) error {
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "stor.dev/stor/cmd/stord", "stor.dev/stor/cmd/storctl")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, gobin, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	stordBin, storctlBin = filepath.Join(dir, "stord"), filepath.Join(dir, "storctl")
	return nil
}

// inCI reports whether missing tools and privileges fail tests instead of
// skipping them.
func inCI() bool { return os.Getenv("CI") == "true" }

// needTool returns the path of an external tool, or skips the test (fails
// it under CI=true) when it is not installed.
func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} { // losetup, mkfs.ext4 for non-root PATHs
		if p := filepath.Join(dir, name); isExecutable(p) {
			return p
		}
	}
	if inCI() {
		t.Fatalf("%s is not installed (CI=true requires it)", name)
	}
	t.Skipf("%s is not installed", name)
	return ""
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// needBinaries fails the test if TestMain could not build stord/storctl.
func needBinaries(t testing.TB) {
	t.Helper()
	if buildErr != nil {
		t.Fatalf("building the binaries: %v", buildErr)
	}
	if stordBin == "" {
		t.Fatal("binaries were not built")
	}
}

// result is what an external command did.
type result struct {
	stdout, stderr string
	code           int // exit status; -1 if it did not exit normally
	err            error
}

// runCmd runs name with args, bounded by toolTimeout, and returns what
// happened without judging it.
func runCmd(t testing.TB, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), toolTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String(), err: err, code: 0}
	if err != nil {
		r.code = -1
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			r.code = ee.ExitCode()
		}
		if ctx.Err() != nil {
			r.err = fmt.Errorf("timed out after %v: %w", toolTimeout, err)
		}
	}
	return r
}

// mustRun runs a command that must succeed and returns its stdout.
func mustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	r := runCmd(t, name, args...)
	if r.err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// lockedBuffer collects a process's output while it runs.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// daemon is one `stord dev` process (restartable on the same data dir).
type daemon struct {
	t         testing.TB
	dataDir   string
	args      []string // extra flags
	nbdAddr   string
	apiAddr   string
	iscsiAddr string // iSCSI portal

	cmd    *exec.Cmd
	stdout *lockedBuffer
	stderr *lockedBuffer
	exited chan struct{} // closed when cmd.Wait returned
	werr   error         // cmd.Wait's error, valid after exited
}

// startDaemon starts `stord dev` on a fresh data directory and registers a
// cleanup that stops it (SIGTERM, exit status 0 required).
func startDaemon(t testing.TB, args ...string) *daemon {
	t.Helper()
	needBinaries(t)
	d := &daemon{t: t, dataDir: filepath.Join(t.TempDir(), "data"), args: args}
	d.start()
	t.Cleanup(func() {
		if d.running() {
			d.stop()
		}
	})
	return d
}

func (d *daemon) running() bool {
	if d.cmd == nil {
		return false
	}
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// start launches the process on the daemon's data dir. It keeps the
// previous ports if it had some, and picks new ones when they are taken
// (another process on this machine may grab a freed port).
func (d *daemon) start() {
	d.t.Helper()
	var lastErr string
	for attempt := 0; attempt < 5; attempt++ {
		if d.nbdAddr == "" || attempt > 0 {
			d.nbdAddr, d.apiAddr, d.iscsiAddr = freePort(d.t), freePort(d.t), freePort(d.t)
		}
		err := d.launch()
		if err == nil {
			return
		}
		lastErr = err.Error()
		if !strings.Contains(lastErr, "address already in use") {
			break
		}
	}
	d.t.Fatalf("stord dev did not start: %s", lastErr)
}

// launch starts the process and waits for the API to answer.
func (d *daemon) launch() error {
	args := append([]string{"dev", "--data", d.dataDir, "--nbd-listen", d.nbdAddr,
		"--api-listen", d.apiAddr, "--iscsi-listen", d.iscsiAddr}, d.args...)
	d.cmd = exec.Command(stordBin, args...)
	// If the test binary dies (a -timeout panic), stord dies with it
	// rather than living on as an orphan holding its ports.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	d.stdout, d.stderr = &lockedBuffer{}, &lockedBuffer{}
	d.cmd.Stdout, d.cmd.Stderr = d.stdout, d.stderr
	if err := d.cmd.Start(); err != nil {
		return err
	}
	d.exited = make(chan struct{})
	go func() {
		d.werr = d.cmd.Wait()
		close(d.exited)
	}()
	deadline := time.Now().Add(60 * time.Second)
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		select {
		case <-d.exited:
			return fmt.Errorf("stord exited during start-up (%v):\n%s", d.werr, d.stderr.String())
		default:
		}
		resp, err := client.Get("http://" + d.apiAddr + "/v1/status")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			d.kill()
			return fmt.Errorf("stord API did not answer within 60s (last error %v):\n%s", err, d.stderr.String())
		}
		select {
		case <-d.exited:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// freePort returns a loopback address that was free a moment ago.
func freePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// stop sends SIGTERM and requires a clean exit (status 0) within a minute.
func (d *daemon) stop() {
	d.t.Helper()
	d.stopWith(syscall.SIGTERM)
}

// stopWith sends sig (SIGTERM or SIGINT) and requires a clean exit.
func (d *daemon) stopWith(sig syscall.Signal) {
	d.t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		d.t.Fatalf("%v: %v", sig, err)
	}
	select {
	case <-d.exited:
	case <-time.After(60 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
		d.t.Fatalf("stord did not exit within 60s of %v:\n%s", sig, d.tail())
	}
	if d.werr != nil {
		d.t.Errorf("stord exited with %v after %v, want status 0:\n%s", d.werr, sig, d.tail())
	}
	if !strings.Contains(d.stderr.String(), "stopped cleanly") {
		d.t.Errorf("stord log lacks \"stopped cleanly\":\n%s", d.tail())
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (d *daemon) kill() {
	d.cmd.Process.Kill()
	<-d.exited
}

// restart stops the process cleanly and starts it again on the same data.
func (d *daemon) restart() {
	d.t.Helper()
	d.stop()
	d.start()
}

// tail is the end of the daemon's log, for failure messages.
func (d *daemon) tail() string {
	s := d.stderr.String()
	if len(s) > 8000 {
		s = "...\n" + s[len(s)-8000:]
	}
	return s
}

// url is the NBD URI of a volume.
func (d *daemon) url(volume string) string { return "nbd://" + d.nbdAddr + "/" + volume }

// storctl runs storctl against this daemon's API.
func (d *daemon) storctl(args ...string) result {
	d.t.Helper()
	return runCmd(d.t, storctlBin, append([]string{"--api", "http://" + d.apiAddr}, args...)...)
}

// mustStorctl runs a storctl command that must succeed.
func (d *daemon) mustStorctl(args ...string) string {
	d.t.Helper()
	r := d.storctl(args...)
	if r.err != nil {
		d.t.Fatalf("storctl %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// createVolume makes a volume with storctl and returns what it answered.
func (d *daemon) createVolume(name string, flags ...string) api.Volume {
	d.t.Helper()
	out := d.mustStorctl(append([]string{"-o", "json", "volume", "create", name}, flags...)...)
	var v api.Volume
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		d.t.Fatalf("storctl volume create -o json: %v\n%s", err, out)
	}
	return v
}

// showVolume asks storctl for one volume.
func (d *daemon) showVolume(name string) api.Volume {
	d.t.Helper()
	out := d.mustStorctl("-o", "json", "volume", "show", name)
	var v api.Volume
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		d.t.Fatalf("storctl volume show -o json: %v\n%s", err, out)
	}
	return v
}

// metrics fetches /metrics.
func (d *daemon) metrics() string {
	d.t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + d.apiAddr + "/metrics")
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		d.t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	return string(b)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// heavy skips a long test under -short.
func heavy(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("long end-to-end test; skipped with -short")
	}
}

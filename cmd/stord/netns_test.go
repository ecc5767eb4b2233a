package main

// Tests of `stord run` hosts in Linux network namespaces, so that a host
// can be cut off the network while its process keeps running: a partition,
// not a crash. The topology (A.B from the test process's pid and a
// sequence number; nothing of it exists in the root namespace):
//
//	   ini 10.A.B.100      h1 10.A.B.11    h2 10.A.B.12    h3 10.A.B.13
//	       eth0                eth0            eth0            eth0
//	        |                   |               |               |
//	sw:   "ini" ------ br0 --- "h1" ---------- "h2" ---------- "h3"     (veth ends)
//
// Every namespace is named stornet-PID-SEQ-ROLE. The initiator's tools
// (storctl, fio, qemu-io) run in "ini" or a host's namespace through
// `ip netns exec`, which execs them (the pid is the tool's). A link is cut
// by setting its veth end in the switch down: the host sees no carrier,
// its peers see silence. Deleting the namespaces removes every link and
// the bridge. Namespaces left by a test process that died without its
// cleanup (a -timeout panic) are removed by the next run.
//
// Needs root and network namespaces: without them the tests skip outside
// CI and fail under CI=true, as a missing ip(8) does.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/replica/head"
)

// netnsLab is a switch namespace with a bridge, an initiator namespace
// and host namespaces, and every process the test started in them.
type netnsLab struct {
	t      *testing.T
	ip     string // path of ip(8)
	tag    string // stornet-PID-SEQ: the prefix of every namespace name
	prefix string // the subnet's first three octets
	sw     string // the switch's namespace
	ini    string // the initiator's namespace
	hosts  []*nsHost
	dir    string    // the nodes' data directories and fio's files
	made   []string  // namespaces created, in order
	last   string    // what a waitFor condition saw last, for its failure message
	procs  []*nsProc // processes started, in order
}

// nsHost is one `stord run` node in its own namespace.
type nsHost struct {
	id   string // n1, n2, ...
	ns   string
	addr string // its IP
	port string // its veth end in the switch namespace
	data string // --data
	proc *nsProc
}

func (h *nsHost) api() string           { return "http://" + h.addr + ":7480" }
func (h *nsHost) nbd(vol string) string { return "nbd://" + h.addr + ":10809/" + vol }

// nsProc is a process started through `ip netns exec`.
type nsProc struct {
	name   string
	cmd    *exec.Cmd
	out    *lockedBuffer // stdout and stderr
	stord  bool          // stopped with SIGTERM and must exit 0
	killed bool          // the teardown had to SIGKILL it
	exited chan struct{} // closed when cmd.Wait returned
	werr   error         // cmd.Wait's error, valid after exited
}

func (p *nsProc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// netnsSeq numbers the labs this process made.
var netnsSeq int

// netnsName matches the namespaces a lab makes; group 1 is the pid.
var netnsName = regexp.MustCompile(`^stornet-([0-9]+)-`)

// needNetns returns the path of ip(8) once it made sure this process can
// create network namespaces, veth pairs and a bridge; it skips the test
// (fails it under CI=true) when it cannot.
func needNetns(t *testing.T) string {
	t.Helper()
	ipBin := needTool(t, "ip")
	cannot := func(format string, args ...any) {
		t.Helper()
		if inCI() {
			t.Fatalf(format+" (CI=true requires it)", args...)
		}
		t.Skipf(format, args...)
	}
	if os.Geteuid() != 0 {
		cannot("network namespaces need root; running as uid %d", os.Geteuid())
	}
	probe := fmt.Sprintf("stornet-%d-probe", os.Getpid())
	if r := runCmd(t, ipBin, "netns", "add", probe); r.err != nil {
		cannot("no network namespace support: ip netns add: %v: %s", r.err, strings.TrimSpace(r.stderr))
	}
	defer func() {
		if r := runCmd(t, ipBin, "netns", "del", probe); r.err != nil {
			t.Errorf("ip netns del %s: %v: %s", probe, r.err, r.stderr)
		}
	}()
	for _, args := range [][]string{
		{"-n", probe, "link", "add", "br0", "type", "bridge"},
		{"-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"},
	} {
		if r := runCmd(t, ipBin, args...); r.err != nil {
			cannot("no bridge or veth support: ip %s: %v: %s", strings.Join(args, " "), r.err, strings.TrimSpace(r.stderr))
		}
	}
	return ipBin
}

// sweepNetns deletes namespaces of labs whose test process is gone, and
// any of this pid's (a process that had this pid before, or a failed
// cleanup): this process makes its own only after the sweep.
func sweepNetns(t *testing.T, ipBin string) {
	t.Helper()
	out := mustRun(t, ipBin, "netns", "list")
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		m := netnsName.FindStringSubmatch(f[0])
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid != os.Getpid() && processAlive(pid) {
			continue
		}
		if r := runCmd(t, ipBin, "netns", "del", f[0]); r.err != nil {
			t.Logf("removing leftover namespace %s: %v: %s", f[0], r.err, r.stderr)
		} else {
			t.Logf("removed leftover namespace %s (pid %d is gone)", f[0], pid)
		}
	}
}

// newNetnsLab makes the switch, the initiator and n hosts, and registers
// the teardown: stop every process, check the stord logs, delete every
// namespace.
func newNetnsLab(t *testing.T, n int) *netnsLab {
	t.Helper()
	ipBin := needNetns(t)
	sweepNetns(t, ipBin)
	pid := os.Getpid()
	netnsSeq++
	l := &netnsLab{
		t:      t,
		ip:     ipBin,
		tag:    fmt.Sprintf("stornet-%d-%d", pid, netnsSeq),
		prefix: fmt.Sprintf("10.%d.%d", 200+pid%50, netnsSeq%250),
	}
	// The directory first: cleanups run last-registered first, and the
	// data directories must outlive the processes that use them.
	l.dir = t.TempDir()
	t.Cleanup(l.teardown)
	l.sw, l.ini = l.addNS("sw"), l.addNS("ini")
	l.must("-n", l.sw, "link", "add", "br0", "type", "bridge")
	l.must("-n", l.sw, "link", "set", "br0", "up")
	l.must("-n", l.sw, "link", "set", "lo", "up")
	l.plug(l.ini, "ini", l.prefix+".100")
	for i := 1; i <= n; i++ {
		id := fmt.Sprintf("n%d", i)
		h := &nsHost{id: id, ns: l.addNS(id), addr: fmt.Sprintf("%s.%d", l.prefix, 10+i), port: "h" + strconv.Itoa(i),
			data: filepath.Join(l.dir, id)}
		l.plug(h.ns, h.port, h.addr)
		l.hosts = append(l.hosts, h)
	}
	t.Logf("network: namespaces %s-{sw,ini,n1..n%d}, subnet %s.0/24", l.tag, n, l.prefix)
	return l
}

func (l *netnsLab) addNS(role string) string {
	l.t.Helper()
	ns := l.tag + "-" + role
	l.must("netns", "add", ns)
	l.made = append(l.made, ns)
	return ns
}

// plug connects namespace ns to the bridge: a veth pair whose end port is
// in the switch and whose end eth0 in ns gets addr.
func (l *netnsLab) plug(ns, port, addr string) {
	l.t.Helper()
	l.must("-n", l.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
	l.must("-n", l.sw, "link", "set", port, "master", "br0")
	l.must("-n", l.sw, "link", "set", port, "up")
	l.must("-n", ns, "link", "set", "lo", "up")
	l.must("-n", ns, "addr", "add", addr+"/24", "dev", "eth0")
	l.must("-n", ns, "link", "set", "eth0", "up")
}

// must runs ip(8) with args, which must succeed.
func (l *netnsLab) must(args ...string) string {
	l.t.Helper()
	return mustRun(l.t, l.ip, args...)
}

// spawn starts name with args in namespace ns, in directory dir ("": the
// test's). A process left running is stopped by the teardown; it dies
// with the test process (Pdeathsig).
func (l *netnsLab) spawn(label, ns, dir, name string, args ...string) *nsProc {
	l.t.Helper()
	p := &nsProc{name: label, out: &lockedBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(l.ip, append([]string{"netns", "exec", ns, name}, args...)...)
	p.cmd.Dir = dir
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		l.t.Fatalf("starting %s: %v", label, err)
	}
	l.procs = append(l.procs, p)
	go func() {
		p.werr = p.cmd.Wait()
		close(p.exited)
	}()
	return p
}

// start runs `stord run` on every host, like scripts/cluster-up: n1
// bootstraps, every node joins through the others.
func (l *netnsLab) start() {
	l.t.Helper()
	needBinaries(l.t)
	for _, h := range l.hosts {
		args := []string{"run", "--node-id", h.id, "--data", h.data, "--api-listen", h.addr + ":7480", "--log-format", "text"}
		if h.id == "n1" {
			args = append(args, "--bootstrap")
		}
		var joins []string
		for _, o := range l.hosts {
			if o != h {
				joins = append(joins, o.api())
			}
		}
		args = append(args, "--join", strings.Join(joins, ","))
		h.proc = l.spawn(h.id, h.ns, "", stordBin, args...)
		h.proc.stord = true
	}
}

// teardown stops every process still running (stord: SIGTERM, and after
// 30 s SIGQUIT for a stack dump, then SIGKILL; others: SIGKILL), checks
// that every stord stopped cleanly and logged no panic or race, then
// deletes the namespaces, which removes the links and the bridge.
func (l *netnsLab) teardown() {
	t := l.t
	for _, p := range l.procs {
		if !p.running() {
			continue
		}
		sig := syscall.SIGKILL
		if p.stord {
			sig = syscall.SIGTERM
		}
		p.cmd.Process.Signal(sig)
	}
	signalled := time.Now()
	cpu := make(map[*nsProc]time.Duration)
	for _, p := range l.procs {
		cpu[p] = cpuTime(p.cmd.Process.Pid)
	}
	deadline := signalled.Add(30 * time.Second)
	for _, p := range l.procs {
		if !p.running() {
			continue
		}
		select {
		case <-p.exited:
		case <-time.After(time.Until(deadline)):
			// A Go process prints every goroutine's stack on SIGQUIT:
			// the log then says where it hung; its CPU time since the
			// signal says whether it spun or waited.
			used := cpuTime(p.cmd.Process.Pid) - cpu[p]
			p.killed = true
			p.cmd.Process.Signal(syscall.SIGQUIT)
			select {
			case <-p.exited:
			case <-time.After(5 * time.Second):
				p.cmd.Process.Kill()
				<-p.exited
			}
			t.Errorf("%s (pid %d) did not exit within %v of the teardown's signal (it used %v of CPU meanwhile); SIGQUIT's stack dump:\n%s",
				p.name, p.cmd.Process.Pid, time.Since(signalled).Round(time.Second), used, lastChars(p.out.String(), 30000))
		}
	}
	for _, p := range l.procs {
		if !p.stord {
			continue
		}
		log := p.out.String()
		if p.werr != nil && !p.killed {
			t.Errorf("%s exited with %v, want status 0 after the teardown's SIGTERM:\n%s", p.name, p.werr, lastChars(log, 4000))
		} else if !p.killed && !strings.Contains(log, "stopped cleanly") {
			t.Errorf("%s's log lacks \"stopped cleanly\":\n%s", p.name, lastChars(log, 4000))
		}
		for _, bad := range []string{"WARNING: DATA RACE", "panic:", "fatal error:"} {
			if i := strings.Index(log, bad); i >= 0 {
				t.Errorf("%s's log has %q:\n%s", p.name, bad, log[i:min(len(log), i+4000)])
			}
		}
	}
	for i := len(l.made) - 1; i >= 0; i-- {
		ns := l.made[i]
		if pids := strings.Fields(runCmd(t, l.ip, "netns", "pids", ns).stdout); len(pids) > 0 {
			t.Errorf("namespace %s still has processes %v after the teardown", ns, pids)
		}
		if r := runCmd(t, l.ip, "netns", "del", ns); r.err != nil {
			t.Errorf("ip netns del %s: %v: %s", ns, r.err, r.stderr)
		}
	}
	out := runCmd(t, l.ip, "netns", "list").stdout
	if strings.Contains(out, l.tag+"-") {
		t.Errorf("namespaces of %s left after the teardown:\n%s", l.tag, out)
	}
}

// cpuTime is the user+system CPU time process pid has used (0 once it is
// gone), from /proc/PID/stat.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * time.Second / 100 // USER_HZ
}

// logs is the end of every node's log, for failure messages.
func (l *netnsLab) logs() string {
	var b strings.Builder
	for _, h := range l.hosts {
		if h.proc != nil {
			fmt.Fprintf(&b, "--- %s log\n%s\n", h.id, lastChars(h.proc.out.String(), 3000))
		}
	}
	return b.String()
}

// lastChars is the end of s, at most n bytes of it.
func lastChars(s string, n int) string {
	if len(s) > n {
		return "...\n" + s[len(s)-n:]
	}
	return s
}

// storctl runs storctl in the initiator's namespace against host h.
func (l *netnsLab) storctl(h *nsHost, args ...string) result {
	l.t.Helper()
	return runCmd(l.t, l.ip, append([]string{"netns", "exec", l.ini, storctlBin, "--api", h.api(), "--timeout", "3s"}, args...)...)
}

// query runs storctl -o json against h and decodes its answer into out.
func (l *netnsLab) query(h *nsHost, out any, args ...string) error {
	l.t.Helper()
	r := l.storctl(h, append([]string{"-o", "json"}, args...)...)
	if r.err != nil {
		return fmt.Errorf("storctl %s: %v: %s", strings.Join(args, " "), r.err, strings.TrimSpace(r.stderr))
	}
	if err := json.Unmarshal([]byte(r.stdout), out); err != nil {
		return fmt.Errorf("storctl %s: %v\n%s", strings.Join(args, " "), err, r.stdout)
	}
	return nil
}

func (l *netnsLab) mustJSON(h *nsHost, out any, args ...string) {
	l.t.Helper()
	if err := l.query(h, out, args...); err != nil {
		l.t.Fatalf("%v\n%s", err, l.logs())
	}
}

// waitFor polls cond until it holds, failing the test with the nodes'
// logs after timeout.
func (l *netnsLab) waitFor(what string, timeout time.Duration, cond func() bool) time.Duration {
	l.t.Helper()
	start := time.Now()
	l.last = ""
	for !cond() {
		if time.Since(start) > timeout {
			l.t.Fatalf("timed out after %v waiting for %s; last seen:\n%s\n%s", timeout, what, l.last, l.logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start)
}

// healthy reports whether every host in hs answers healthy with the same
// leader, and the leader sees len(hs) voters, all active (scripts/cluster-up's
// test).
func (l *netnsLab) healthy(hs ...*nsHost) bool {
	leader, led := api.NodeID(""), false
	for _, h := range hs {
		var st client.ClusterStatus
		if l.query(h, &st, "cluster", "status") != nil || !st.Healthy || st.Leader == "" || (leader != "" && st.Leader != leader) {
			return false
		}
		leader = st.Leader
		if st.State == "Leader" {
			active := 0
			for _, v := range st.Voters {
				if v.Suffrage == "Voter" && v.State == cluster.StateActive {
					active++
				}
			}
			if len(st.Voters) != len(hs) || active != len(hs) {
				return false
			}
			led = true
		}
	}
	return led
}

func (l *netnsLab) host(id api.NodeID) *nsHost {
	for _, h := range l.hosts {
		if h.id == string(id) {
			return h
		}
	}
	l.t.Fatalf("no host %q", id)
	return nil
}

// nodeState is node id's state as h's control plane sees it.
func (l *netnsLab) nodeState(h *nsHost, id string) cluster.State {
	var nodes []cluster.Node
	if l.query(h, &nodes, "node", "list") != nil {
		return ""
	}
	for _, n := range nodes {
		if string(n.ID) == id {
			return n.State
		}
	}
	return ""
}

// replicated returns the placement of vol when every partition has a
// primary and want in-sync replicas, none on node without.
func (l *netnsLab) replicated(h *nsHost, vol string, want int, without string) (placed, bool) {
	var v placed
	if l.query(h, &v, "volume", "show", vol) != nil || len(v.Placement) == 0 {
		return v, false
	}
	for _, p := range v.Placement {
		if p.Primary == "" || len(p.InSync) != want || slices.Contains(p.Members(), api.NodeID(without)) {
			return v, false
		}
	}
	return v, true
}

// startFio runs fio in the initiator's namespace with the cut-off job's
// options and extra, writing its JSON to dir/name.json; its working
// directory is dir, so that nothing lands in the package's.
func (l *netnsLab) startFio(fio, dir, name, uri string, extra ...string) (*nsProc, string) {
	l.t.Helper()
	out := filepath.Join(dir, name+".json")
	args := append([]string{"--name=cutoff", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bs=4k",
		"--iodepth=8", "--size=" + strconv.Itoa(cutOffSize), "--verify=crc32c", "--verify_fatal=1",
		"--verify_state_save=0", "--output-format=json", "--output=" + out}, extra...)
	p := l.spawn("fio "+name, l.ini, dir, fio, args...)
	return p, out
}

// waitFio waits (bounded) for a fio process and parses its output; fio
// exits non-zero on any I/O or verify error.
func (l *netnsLab) waitFio(p *nsProc, out string) fioRun {
	l.t.Helper()
	select {
	case <-p.exited:
	case <-time.After(5 * time.Minute):
		p.cmd.Process.Kill()
		<-p.exited
		l.t.Fatalf("%s still running after 5 minutes\n%s\n%s", p.name, p.out.String(), l.logs())
	}
	b, rerr := os.ReadFile(out)
	if p.werr != nil || rerr != nil {
		l.t.Fatalf("%s: %v %v\n%s\n%s\n%s", p.name, p.werr, rerr, p.out.String(), b, l.logs())
	}
	res, err := parseFio(b)
	if err != nil {
		l.t.Fatalf("%s output: %v\n%s", p.name, err, b)
	}
	return res
}

// cutOffSize is how much the cut-off test's fio job writes and verifies:
// the first 96 MiB of the 128 MiB volume. probeOffset, past it, is where
// the cut-off primary is asked to write.
const (
	cutOffSize  = 96 << 20
	probeOffset = 120 << 20
)

// TestNetnsPrimaryCutOff: three `stord run` hosts and a 2-replica volume
// of one partition. fio writes (random 4 KiB, QD8, then reads every block
// back and checks its crc32c) through the NBD server of the host that
// holds no replica, while the primary's host is cut off the network, its
// process still running:
//   - the control plane declares it dead after the lease and the in-sync
//     secondary takes the primary role at a higher epoch; fio sees no I/O
//     or verify error, only a stall (logged);
//   - the cut-off primary cannot get a write acknowledged through its own
//     NBD server (its secondary is out of reach, it has no solo blessing);
//   - once the link is back, the node heartbeats again, deletes its stale
//     replica (it is no longer a member), the cluster is healthy with three
//     active nodes, and every block fio wrote reads back correctly through
//     the formerly cut-off node's own NBD server (fio --verify_only).
func TestNetnsPrimaryCutOff(t *testing.T) {
	heavy(t)
	needBinaries(t)
	fio := needTool(t, "fio")
	qemuIO := needTool(t, "qemu-io")
	l := newNetnsLab(t, 3)
	l.start()
	took := l.waitFor("3 healthy voters", 90*time.Second, func() bool { return l.healthy(l.hosts...) })
	t.Logf("cluster of 3 healthy after %v", took.Round(time.Millisecond))
	n1 := l.hosts[0]
	if r := l.storctl(n1, "cluster", "configure", "--lease-timeout", "1500ms", "--suspect-timeout", "750ms"); r.err != nil {
		t.Fatalf("cluster configure: %v\n%s", r.err, r.stderr)
	}
	var v placed
	l.mustJSON(n1, &v, "volume", "create", "v", "--size", "128M", "--partition-size", "128M", "--replicas", "2")
	l.waitFor("v with a primary and 2 in-sync replicas", 60*time.Second, func() bool {
		var ok bool
		v, ok = l.replicated(n1, "v", 2, "")
		return ok
	})
	if len(v.Placement) != 1 {
		t.Fatalf("v has %d partitions, want 1: %+v", len(v.Placement), v.Placement)
	}
	before := v.Placement[0]
	victim := l.host(before.Primary)
	// The initiator uses the host that holds no replica of the partition.
	var exporter *nsHost
	for _, h := range l.hosts {
		if !slices.Contains(before.Members(), api.NodeID(h.id)) {
			exporter = h
		}
	}
	if exporter == nil {
		exporter = l.host(before.Secondaries[0])
	}
	t.Logf("partition 0: primary %s, secondaries %v, epoch %d; fio through %s", before.Primary, before.Secondaries, before.Epoch, exporter.id)

	// The victim's journal of the partition (made by its first write),
	// which it must delete once it learns it is no longer a member.
	key, err := head.Key(v.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	journal := filepath.Join(victim.data, "replicas", "journals", fmt.Sprintf("%d-%d", key>>16, key&0xffff))
	// Both exports serve v (an export learns of a new volume at its next
	// poll of the map), and the probe below reaches the victim's data path
	// rather than failing in the handshake.
	for _, h := range []*nsHost{victim, exporter} {
		var r result
		l.waitFor(h.id+"'s NBD server to serve v", 30*time.Second, func() bool {
			r = runCmd(t, l.ip, "netns", "exec", h.ns, qemuIO, "-f", "raw", "-c", fmt.Sprintf("read %d 4096", probeOffset), h.nbd("v"))
			l.last = r.stdout + r.stderr
			return r.err == nil && strings.Contains(r.stdout, "read 4096/4096")
		})
	}

	job, jobOut := l.startFio(fio, l.dir, "write", exporter.nbd("v"))
	select {
	case <-job.exited:
		t.Fatalf("fio finished before the cut (%v): raise the job size\n%s", job.werr, job.out.String())
	case <-time.After(2 * time.Second):
	}

	if _, err := os.Stat(journal); err != nil {
		t.Fatalf("the primary's journal after 2s of writes: %v (has replica/head's layout changed?)", err)
	}

	// Cut the primary's host off: its switch port goes down.
	l.must("-n", l.sw, "link", "set", victim.port, "down")
	cut := time.Now()
	t.Logf("cut %s off (switch port %s down); its process keeps running", victim.id, victim.port)
	// Polled through the exporter: the times are when a poll first saw
	// the change (each poll runs storctl twice).
	var dead, moved time.Duration
	var after placed
	var st cluster.State
	l.waitFor(victim.id+" declared dead and another primary at a higher epoch", 60*time.Second, func() bool {
		if dead == 0 {
			if st = l.nodeState(exporter, victim.id); st == cluster.StateDead {
				dead = time.Since(cut)
			}
		}
		if moved == 0 {
			var now placed // fresh: decoding into a used one keeps fields the answer omits
			err := l.query(exporter, &now, "volume", "show", "v")
			after = now
			if p := after.Placement; err == nil && len(p) == 1 && p[0].Primary != "" && p[0].Primary != before.Primary && p[0].Epoch > before.Epoch {
				moved = time.Since(cut)
			}
			l.last = fmt.Sprintf("%s: %q; v: %+v %v", victim.id, st, after.Placement, err)
		}
		return dead != 0 && moved != 0
	})
	t.Logf("after the cut: %s seen dead after %v, %s seen primary at epoch %d after %v", victim.id, dead.Round(time.Millisecond),
		after.Placement[0].Primary, after.Placement[0].Epoch, moved.Round(time.Millisecond))

	// The cut-off primary, asked through its own NBD server (from its
	// own namespace), cannot acknowledge a write.
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	probe := exec.CommandContext(ctx, l.ip, "netns", "exec", victim.ns, qemuIO, "-f", "raw", "-c",
		fmt.Sprintf("write -P 0x5a %d 4096", probeOffset), victim.nbd("v"))
	probe.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	pout, perr := probe.CombinedOutput()
	cancel()
	if strings.Contains(string(pout), "wrote 4096/4096") {
		t.Errorf("the cut-off primary %s acknowledged a write at epoch %d after %s took over (split brain): %s",
			victim.id, before.Epoch, after.Placement[0].Primary, pout)
	} else {
		t.Logf("write through the cut-off %s not acknowledged within 4s (%v) %s", victim.id, perr, strings.TrimSpace(string(pout)))
	}
	if !victim.proc.running() {
		t.Fatalf("%s exited while cut off (%v)\n%s", victim.id, victim.proc.werr, lastChars(victim.proc.out.String(), 4000))
	}

	res := l.waitFio(job, jobOut)
	t.Logf("fio across the cut: %.0f write IOPS, longest write %.0f ms (the stall), %d bytes written, %d verified",
		res.WriteIOPS, res.WriteMaxMs, res.WriteBytes, res.ReadBytes)
	if res.Error != 0 || res.WriteBytes != cutOffSize || res.ReadBytes != cutOffSize {
		t.Fatalf("fio across the cut: error %d, wrote %d, verified %d bytes; want 0, %d, %d", res.Error, res.WriteBytes, res.ReadBytes, cutOffSize, cutOffSize)
	}
	if res.WriteMaxMs > 15000 {
		t.Errorf("a write stalled %.0f ms across the cut (bound 15 s)", res.WriteMaxMs)
	}
	l.waitFor("v with 2 in-sync replicas again, none on "+victim.id, 60*time.Second, func() bool {
		var ok bool
		after, ok = l.replicated(exporter, "v", 2, victim.id)
		return ok
	})
	if p := after.Placement[0]; p.Primary == before.Primary || p.Epoch <= before.Epoch {
		t.Fatalf("partition 0: primary %s at epoch %d, was %s at %d", p.Primary, p.Epoch, before.Primary, before.Epoch)
	}
	if !victim.proc.running() {
		t.Fatalf("%s exited while cut off (%v)\n%s", victim.id, victim.proc.werr, lastChars(victim.proc.out.String(), 4000))
	}

	// Restore the link: the node comes back, drops its stale replica, and
	// the cluster is whole again.
	l.must("-n", l.sw, "link", "set", victim.port, "up")
	healed := time.Now()
	l.waitFor(victim.id+" active again", 60*time.Second, func() bool { return l.nodeState(exporter, victim.id) == cluster.StateActive })
	back := time.Since(healed)
	l.waitFor(victim.id+" deleting its stale replica", 60*time.Second, func() bool {
		_, err := os.Stat(journal)
		return os.IsNotExist(err) && strings.Contains(victim.proc.out.String(), "replica no longer held: deleted")
	})
	deleted := time.Since(healed)
	l.waitFor("3 healthy voters after the heal", 60*time.Second, func() bool { return l.healthy(l.hosts...) })
	t.Logf("after the heal: %s active in %v, stale replica deleted in %v, cluster healthy in %v", victim.id,
		back.Round(time.Millisecond), deleted.Round(time.Millisecond), time.Since(healed).Round(time.Millisecond))
	var nodes []cluster.Node
	l.mustJSON(victim, &nodes, "node", "list")
	for _, n := range nodes {
		if n.State != cluster.StateActive {
			t.Errorf("node %s is %s after the heal, want active", n.ID, n.State)
		}
	}
	if len(nodes) != 3 {
		t.Errorf("%d nodes after the heal, want 3: %+v", len(nodes), nodes)
	}

	// Every block fio wrote reads back, checked, through the formerly
	// cut-off node's own export.
	check, checkOut := l.startFio(fio, l.dir, "verify", victim.nbd("v"), "--verify_only")
	res = l.waitFio(check, checkOut)
	t.Logf("fio --verify_only through %s: %d bytes verified", victim.id, res.ReadBytes)
	if res.Error != 0 || res.ReadBytes != cutOffSize {
		t.Fatalf("fio --verify_only through %s: error %d, verified %d bytes; want 0, %d", victim.id, res.Error, res.ReadBytes, cutOffSize)
	}
	if v, ok := l.replicated(victim, "v", 2, victim.id); !ok || v.Placement[0].Primary == before.Primary {
		t.Errorf("at the end partition 0 is %+v; want a primary other than %s and 2 in-sync replicas", v.Placement, before.Primary)
	}
}

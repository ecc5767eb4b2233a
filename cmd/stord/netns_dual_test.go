package main

// Dual isolation in network namespaces (see netns_test.go for the lab):
// both replica hosts of a partition lose the control plane at once while
// they still reach each other. The topology:
//
//	ini .100   c1 .21   c2 .22   c3 .23        h1 .31   h2 .32
//	           control,export (voters)         head,export (the replicas)
//	   all on one bridge; the fault is routes, not links:
//	   h1, h2: ip route add blackhole cI/32, for c1, c2, c3
//
// A blackhole route drops every packet a host sends to a control host, so
// h1 and h2 can neither heartbeat nor read the map, and the control hosts
// get no answer from them; h1 <-> h2, each host with itself and the
// initiator namespace with everyone keep working.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// dualSize is how much the dual-isolation fio job writes and verifies: the
// first 64 MiB of the 128 MiB volume. The write after the heal covers the
// next 16 MiB; probeOffset (netns_test.go) is past both.
const (
	dualSize      = 64 << 20
	dualAfterSize = 16 << 20
)

// addNSHost plugs a host namespace named id into the lab's switch with
// address prefix.octet; its switch port is named id too.
func addNSHost(l *netnsLab, id string, octet int) *nsHost {
	l.t.Helper()
	h := &nsHost{id: id, ns: l.addNS(id), addr: fmt.Sprintf("%s.%d", l.prefix, octet), port: id, data: filepath.Join(l.dir, id)}
	l.plug(h.ns, h.port, h.addr)
	l.hosts = append(l.hosts, h)
	return h
}

// startRoles runs `stord run` on every host with its roles: boot
// bootstraps, every other node joins through the control hosts (ctl).
func startRoles(l *netnsLab, boot *nsHost, ctl []*nsHost, roles map[*nsHost]string) {
	l.t.Helper()
	needBinaries(l.t)
	for _, h := range l.hosts {
		args := []string{"run", "--node-id", h.id, "--data", h.data, "--api-listen", h.addr + ":7480", "--log-format", "text",
			"--roles", roles[h]}
		if h == boot {
			args = append(args, "--bootstrap")
		} else {
			var joins []string
			for _, c := range ctl {
				if c != h {
					joins = append(joins, c.api())
				}
			}
			args = append(args, "--join", strings.Join(joins, ","))
		}
		h.proc = l.spawn(h.id, h.ns, "", stordBin, args...)
		h.proc.stord = true
	}
}

// startFioIn runs fio in namespace ns with the dual-isolation job's
// options (random 4 KiB writes, QD8, crc32c verify of size bytes) and
// extra, writing its JSON to l.dir/label.json.
func startFioIn(l *netnsLab, fio, ns, label, job, uri string, size int, extra ...string) (*nsProc, string) {
	l.t.Helper()
	out := filepath.Join(l.dir, label+".json")
	args := append([]string{"--name=" + job, "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite", "--bs=4k",
		"--iodepth=8", "--size=" + strconv.Itoa(size), "--verify=crc32c", "--verify_fatal=1",
		"--verify_state_save=0", "--output-format=json", "--output=" + out}, extra...)
	return l.spawn("fio "+label, ns, l.dir, fio, args...), out
}

// nodeStates is every node's state as h's control plane sees it (nil when
// it does not answer).
func nodeStates(l *netnsLab, h *nsHost) map[string]cluster.State {
	var nodes []cluster.Node
	if l.query(h, &nodes, "node", "list") != nil {
		return nil
	}
	m := make(map[string]cluster.State, len(nodes))
	for _, n := range nodes {
		m[string(n.ID)] = n.State
	}
	return m
}

// qemuIOIn runs qemu-io with commands in namespace ns against uri, bounded
// by timeout, and returns its output and error.
func qemuIOIn(l *netnsLab, qemuIO, ns, uri string, timeout time.Duration, cmds ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	args := []string{"netns", "exec", ns, qemuIO, "-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	cmd := exec.CommandContext(ctx, l.ip, append(args, uri)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", timeout, err)
	}
	return string(out), err
}

// routeBatch writes an ip -batch file that adds or deletes (verb) a
// blackhole route from h to every host in to, and returns its path.
func routeBatch(l *netnsLab, h *nsHost, verb string, to []*nsHost) string {
	l.t.Helper()
	var b strings.Builder
	for _, c := range to {
		fmt.Fprintf(&b, "route %s blackhole %s/32\n", verb, c.addr)
	}
	p := filepath.Join(l.dir, "routes-"+verb+"-"+h.id)
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		l.t.Fatal(err)
	}
	return p
}

// servingInSync reports whether vol's only partition has a primary that
// serves at the map's epoch with every secondary in sync, as `storctl
// volume rebuild-status` (asked of h) reports it, and returns the partition
// as the map had it.
func servingInSync(l *netnsLab, h *nsHost, vol string) (bool, cluster.Partition) {
	var v placed
	var rows []struct {
		Epoch   api.Epoch  `json:"epoch"`
		Replica api.NodeID `json:"replica"`
		State   string     `json:"state"`
	}
	if err := l.query(h, &v, "volume", "show", vol); err != nil || len(v.Placement) != 1 {
		l.last = fmt.Sprintf("%+v %v", v.Placement, err)
		return false, cluster.Partition{}
	}
	p := v.Placement[0]
	err := l.query(h, &rows, "volume", "rebuild-status", vol)
	l.last = fmt.Sprintf("%+v; rebuild-status %+v %v", p, rows, err)
	if err != nil || p.Primary == "" || len(rows) != len(p.Secondaries) || len(rows) == 0 {
		return false, p
	}
	for _, r := range rows {
		if r.State != "in-sync" || r.Epoch != p.Epoch || !slices.Contains(p.InSync, r.Replica) {
			return false, p
		}
	}
	return true, p
}

// sameSet reports whether a and b hold the same node ids.
func sameSet(a, b []api.NodeID) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// TestNetnsDualIsolation: five `stord run` hosts — c1..c3 control and
// export (the raft voters, no replicas), h1 and h2 head and export (so a
// 2-replica partition lives on h1 and h2). fio writes (random 4 KiB, QD8,
// then reads every block back and checks its crc32c) from the primary's own
// namespace through its own NBD server while both h1 and h2 lose every
// control host (blackhole routes), still reaching each other:
//   - the control plane sees them isolating, then declares both dead, and
//     leaves the partition as it is (ctl/cluster's evictDead: all in-sync
//     replicas dead, it waits): same primary, same in-sync set, same epoch;
//   - I/O goes on: fio sees no error, and a write through the primary
//     after both were declared dead is acknowledged and reads back;
//   - once the routes are gone, h1 and h2 heartbeat again, the cluster is
//     healthy with five active nodes, the partition has a primary and h1, h2
//     in sync, every block fio wrote reads back correctly through c1's
//     export (fio --verify_only), and a new write+verify through c2's
//     export works.
//
// h1 and h2 start together, so their heartbeats usually run nearly in
// phase (the test logs how far apart the last ones were) and the leader
// declares both dead at the same tick. When a tick falls between their
// last heartbeats' expiries, one is declared dead a tick before the other,
// while the partition still has a live (isolating) in-sync replica:
// evictDead then tears the placement down around that one, and this test
// fails (seen with heartbeats ~100 ms apart).
func TestNetnsDualIsolation(t *testing.T) {
	heavy(t)
	needBinaries(t)
	fio := needTool(t, "fio")
	qemuIO := needTool(t, "qemu-io")
	l := newNetnsLab(t, 0)
	c1, c2, c3 := addNSHost(l, "c1", 21), addNSHost(l, "c2", 22), addNSHost(l, "c3", 23)
	h1, h2 := addNSHost(l, "h1", 31), addNSHost(l, "h2", 32)
	ctl := []*nsHost{c1, c2, c3}
	t.Logf("hosts: c1..c3 %s.21-23 (control,export), h1 %s, h2 %s (head,export); initiator %s.100", l.prefix, h1.addr, h2.addr, l.prefix)
	startRoles(l, c1, ctl, map[*nsHost]string{c1: "control,export", c2: "control,export", c3: "control,export",
		h1: "head,export", h2: "head,export"})

	allActive := func() bool {
		st := nodeStates(l, c1)
		l.last = fmt.Sprint(st)
		if len(st) != len(l.hosts) {
			return false
		}
		for _, s := range st {
			if s != cluster.StateActive {
				return false
			}
		}
		return true
	}
	took := l.waitFor("3 healthy voters and 5 active nodes", 120*time.Second, func() bool { return l.healthy(ctl...) && allActive() })
	t.Logf("cluster of 3 voters and 5 active nodes after %v", took.Round(time.Millisecond))
	if r := l.storctl(c1, "cluster", "configure", "--lease-timeout", "1500ms", "--suspect-timeout", "750ms"); r.err != nil {
		t.Fatalf("cluster configure: %v\n%s", r.err, r.stderr)
	}
	// Every agent heartbeats at the default period (1 s) until it reads
	// the new suspect timeout, every 10 acknowledged heartbeats
	// (ctl/control's Agent): cut before that, and the nodes die from
	// heartbeats a second apart. Wait for all five to have learned it,
	// noting who the control plane saw as not active meanwhile.
	flapped := map[string]cluster.State{}
	took = l.waitFor("every node's agent to learn the 750ms suspect timeout", 60*time.Second, func() bool {
		for id, s := range nodeStates(l, c1) {
			if s != cluster.StateActive {
				flapped[id] = s
			}
		}
		learned := 0
		for _, h := range l.hosts {
			if strings.Contains(h.proc.out.String(), "suspect=750ms") {
				learned++
			}
		}
		l.last = fmt.Sprintf("%d of %d learned", learned, len(l.hosts))
		return learned == len(l.hosts)
	})
	t.Logf("every agent heartbeats at the 750ms suspect timeout's period %v after the configure; seen not active meanwhile: %v",
		took.Round(time.Millisecond), flapped)
	l.waitFor("5 active nodes after the configure", 30*time.Second, allActive)
	var v placed
	l.mustJSON(c1, &v, "volume", "create", "v", "--size", "128M", "--partition-size", "128M", "--replicas", "2")
	l.waitFor("v with a primary and 2 in-sync replicas", 60*time.Second, func() bool {
		var ok bool
		v, ok = l.replicated(c1, "v", 2, "")
		l.last = fmt.Sprintf("%+v", v.Placement)
		return ok
	})
	if len(v.Placement) != 1 {
		t.Fatalf("v has %d partitions, want 1: %+v", len(v.Placement), v.Placement)
	}
	before := v.Placement[0]
	pair := []api.NodeID{api.NodeID(h1.id), api.NodeID(h2.id)}
	if !sameSet(before.InSync, pair) || !slices.Contains(pair, before.Primary) {
		t.Fatalf("partition 0: primary %s, in sync %v; want h1 and h2 (the only head nodes)", before.Primary, before.InSync)
	}
	prim := l.host(before.Primary)
	// The map names the primary before it serves: it first takes a new
	// epoch of its own (replica/head's Promotion). Wait until it serves
	// at the map's epoch with its peer in sync, as it tells storctl.
	took = l.waitFor(prim.id+" serving as primary with its peer in sync", 60*time.Second, func() bool {
		ok, _ := servingInSync(l, c1, "v")
		return ok
	})
	t.Logf("partition 0: primary %s serving with %v in sync %v after the map placed it; fio in %s's namespace through its own NBD server",
		prim.id, before.Secondaries, took.Round(time.Millisecond), prim.id)

	// The primary's export serves v (an export learns of a new volume at
	// its next poll of the map) and reaches the data path.
	l.waitFor(prim.id+"'s NBD server to serve v", 30*time.Second, func() bool {
		out, err := qemuIOIn(l, qemuIO, prim.ns, prim.nbd("v"), 20*time.Second, fmt.Sprintf("read %d 4096", probeOffset))
		l.last = out
		return err == nil && strings.Contains(out, "read 4096/4096")
	})

	job, jobOut := startFioIn(l, fio, prim.ns, "write", "dual", prim.nbd("v"), dualSize)
	select {
	case <-job.exited:
		t.Fatalf("fio finished before the cut (%v): raise the job size\n%s", job.werr, job.out.String())
	case <-time.After(2 * time.Second):
	}

	// The placement the cut must leave as it is.
	var ok bool
	if ok, before = servingInSync(l, c1, "v"); !ok || !sameSet(before.InSync, pair) {
		t.Fatalf("before the cut: partition 0 is %+v, want %s serving with h1, h2 in sync\n%s", before, prim.id, l.logs())
	}
	t.Logf("before the cut: partition 0 primary %s, secondaries %v, in sync %v, epoch %d", before.Primary, before.Secondaries, before.InSync, before.Epoch)

	// Cut h1 and h2 off the control hosts only: one ip -batch per host.
	cut := time.Now()
	for _, h := range []*nsHost{h1, h2} {
		l.must("-n", h.ns, "-batch", routeBatch(l, h, "add", ctl))
	}
	t.Logf("cut h1 and h2 off c1..c3 (blackhole routes, installed in %v); h1 <-> h2 and the initiator's paths stay up",
		time.Since(cut).Round(time.Millisecond))

	// Watch through c1: when each node is first seen isolating and dead,
	// and whether the partition's placement ever changes.
	seen := map[string]map[cluster.State]time.Duration{h1.id: {}, h2.id: {}}
	var changed string // the first placement that differs from before
	var changedAt time.Duration
	watch := func() {
		st := nodeStates(l, c1)
		for _, h := range []*nsHost{h1, h2} {
			if s := st[h.id]; s != "" && seen[h.id][s] == 0 {
				seen[h.id][s] = time.Since(cut)
			}
		}
		var now placed // fresh: decoding into a used one keeps fields the answer omits
		err := l.query(c1, &now, "volume", "show", "v")
		l.last = fmt.Sprintf("nodes %v; v: %+v %v", st, now.Placement, err)
		if err != nil || changed != "" {
			return
		}
		if len(now.Placement) != 1 {
			changed, changedAt = fmt.Sprintf("%+v", now.Placement), time.Since(cut)
			return
		}
		p := now.Placement[0]
		if p.Primary != before.Primary || p.Epoch != before.Epoch || !sameSet(p.InSync, before.InSync) || !sameSet(p.Members(), before.Members()) {
			changed, changedAt = fmt.Sprintf("%+v", p), time.Since(cut)
		}
	}
	l.waitFor("h1 and h2 declared dead", 60*time.Second, func() bool {
		watch()
		return seen[h1.id][cluster.StateDead] != 0 && seen[h2.id][cluster.StateDead] != 0
	})
	bothDead := time.Now()
	for _, h := range []*nsHost{h1, h2} {
		iso := "not seen isolating"
		if d := seen[h.id][cluster.StateIsolating]; d != 0 {
			iso = "isolating after " + d.Round(time.Millisecond).String()
		}
		t.Logf("after the cut: %s %s, dead after %v", h.id, iso, seen[h.id][cluster.StateDead].Round(time.Millisecond))
	}
	fioRunning := job.running()
	var nodes []cluster.Node
	if l.query(c1, &nodes, "node", "list") == nil {
		last := map[string]time.Time{}
		for _, n := range nodes {
			last[string(n.ID)] = n.LastHeartbeat
		}
		// One clock: every namespace shares the machine's.
		t.Logf("last heartbeats the control plane took: h1 %v, h2 %v before the cut (%v apart)",
			cut.Sub(last[h1.id]).Round(time.Millisecond), cut.Sub(last[h2.id]).Round(time.Millisecond),
			last[h1.id].Sub(last[h2.id]).Abs().Round(time.Millisecond))
	}

	// With both declared dead, the primary still acknowledges a write
	// through its own export, and it reads back.
	probeStart := time.Now()
	out, err := qemuIOIn(l, qemuIO, prim.ns, prim.nbd("v"), 20*time.Second,
		fmt.Sprintf("write -P 0x5a %d 4096", probeOffset), fmt.Sprintf("read -P 0x5a %d 4096", probeOffset))
	if err != nil || !strings.Contains(out, "wrote 4096/4096") || !strings.Contains(out, "read 4096/4096") || strings.Contains(out, "verification failed") {
		t.Errorf("write+read through %s with h1 and h2 declared dead: %v\n%s\n%s", prim.id, err, out, l.logs())
	} else {
		t.Logf("write+read through %s with h1 and h2 declared dead: done in %v", prim.id, time.Since(probeStart).Round(time.Millisecond))
	}

	// Keep watching until fio is done, and for at least 3 s (8 ticks of
	// a 1500ms lease) with both dead: the partition must wait as it is.
	l.waitFor("fio to finish (and 3 s with h1 and h2 dead)", 5*time.Minute, func() bool {
		watch()
		return !job.running() && time.Since(bothDead) > 3*time.Second
	})
	if changed != "" {
		t.Errorf("the partition's placement changed %v after the cut, while h1 and h2 were isolated together: %s; want primary %s, in sync %v, epoch %d kept (evictDead: all in-sync replicas dead, it waits)\n%s",
			changedAt.Round(time.Millisecond), changed, before.Primary, before.InSync, before.Epoch, l.logs())
	} else {
		t.Logf("the partition kept primary %s, in sync %v, epoch %d while h1 and h2 were cut off", before.Primary, before.InSync, before.Epoch)
	}

	res := l.waitFio(job, jobOut)
	t.Logf("fio across the cut: %.0f write IOPS, longest write %.0f ms, %d bytes written, %d verified; still running when both were dead: %v (finished %v after the cut)",
		res.WriteIOPS, res.WriteMaxMs, res.WriteBytes, res.ReadBytes, fioRunning, time.Since(cut).Round(time.Millisecond))
	if res.Error != 0 || res.WriteBytes != dualSize || res.ReadBytes != dualSize {
		t.Fatalf("fio across the cut: error %d, wrote %d, verified %d bytes; want 0, %d, %d", res.Error, res.WriteBytes, res.ReadBytes, dualSize, dualSize)
	}
	if res.WriteMaxMs > 15000 {
		t.Errorf("a write stalled %.0f ms with the control plane out of reach (bound 15 s)", res.WriteMaxMs)
	}
	for _, h := range l.hosts {
		if !h.proc.running() {
			t.Fatalf("%s exited during the cut (%v)\n%s", h.id, h.proc.werr, lastChars(h.proc.out.String(), 4000))
		}
	}

	// Heal: h1 and h2 reach the control plane again.
	healed := time.Now()
	for _, h := range []*nsHost{h1, h2} {
		l.must("-n", h.ns, "-batch", routeBatch(l, h, "del", ctl))
	}
	l.waitFor("h1 and h2 active again", 60*time.Second, func() bool {
		st := nodeStates(l, c1)
		l.last = fmt.Sprint(st)
		return st[h1.id] == cluster.StateActive && st[h2.id] == cluster.StateActive
	})
	back := time.Since(healed)
	l.waitFor("3 healthy voters and 5 active nodes after the heal", 60*time.Second, func() bool { return l.healthy(ctl...) && allActive() })
	healthy := time.Since(healed)
	var after cluster.Partition
	l.waitFor("v with a primary and h1, h2 in sync after the heal", 120*time.Second, func() bool {
		var ok bool
		v, ok = l.replicated(c1, "v", 2, "")
		l.last = fmt.Sprintf("%+v", v.Placement)
		return ok && sameSet(v.Placement[0].InSync, pair)
	})
	l.waitFor("v's primary serving with its peer in sync after the heal", 60*time.Second, func() bool {
		var ok bool
		ok, after = servingInSync(l, c1, "v")
		return ok && sameSet(after.InSync, pair)
	})
	t.Logf("after the heal: h1, h2 active in %v, cluster healthy in %v, partition primary %s, in sync %v, epoch %d in %v",
		back.Round(time.Millisecond), healthy.Round(time.Millisecond), after.Primary, after.InSync, after.Epoch, time.Since(healed).Round(time.Millisecond))
	for _, h := range []*nsHost{h1, h2} {
		if strings.Contains(h.proc.out.String(), "replica no longer held: deleted") {
			t.Logf("%s deleted its replica at some point (it was re-placed and rebuilt)", h.id)
		}
	}

	// Nothing lost: every block fio wrote, and the probe written while
	// both were dead, read back through c1's export.
	check, checkOut := startFioIn(l, fio, l.ini, "verify", "dual", c1.nbd("v"), dualSize, "--verify_only")
	res = l.waitFio(check, checkOut)
	t.Logf("fio --verify_only through c1: %d bytes verified", res.ReadBytes)
	if res.Error != 0 || res.ReadBytes != dualSize {
		t.Fatalf("fio --verify_only through c1: error %d, verified %d bytes; want 0, %d", res.Error, res.ReadBytes, dualSize)
	}
	out, err = qemuIOIn(l, qemuIO, l.ini, c1.nbd("v"), 20*time.Second, fmt.Sprintf("read -P 0x5a %d 4096", probeOffset))
	if err != nil || !strings.Contains(out, "read 4096/4096") || strings.Contains(out, "verification failed") {
		t.Errorf("reading the block written while h1 and h2 were dead through c1: %v\n%s", err, out)
	}

	// I/O works through any export: a new write+verify through c2's.
	more, moreOut := startFioIn(l, fio, l.ini, "after", "dual-after", c2.nbd("v"), dualAfterSize, "--offset="+strconv.Itoa(dualSize))
	res = l.waitFio(more, moreOut)
	t.Logf("fio through c2 after the heal: %.0f write IOPS, longest write %.0f ms, %d bytes written, %d verified",
		res.WriteIOPS, res.WriteMaxMs, res.WriteBytes, res.ReadBytes)
	if res.Error != 0 || res.WriteBytes != dualAfterSize || res.ReadBytes != dualAfterSize {
		t.Fatalf("fio through c2 after the heal: error %d, wrote %d, verified %d bytes; want 0, %d, %d", res.Error, res.WriteBytes, res.ReadBytes, dualAfterSize, dualAfterSize)
	}
	for _, h := range l.hosts {
		if !h.proc.running() {
			t.Errorf("%s exited (%v)\n%s", h.id, h.proc.werr, lastChars(h.proc.out.String(), 4000))
		}
	}
}

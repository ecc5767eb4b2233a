package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/cluster"
)

// placed is `storctl volume show -o json` on a cluster.
type placed struct {
	api.Volume
	Placement []cluster.Partition `json:"partitions"`
}

// waitReplicated waits until every partition of vol has a primary and
// want in-sync replicas, none of them on a node in without, and returns
// the placement.
func waitReplicated(t *testing.T, c *testCluster, via int, vol string, want int, without ...string) placed {
	t.Helper()
	var v placed
	waitFor(t, fmt.Sprintf("%s with %d in-sync replicas per partition", vol, want), 60*time.Second, func() bool {
		r := c.storctl(via, "-o", "json", "volume", "show", vol)
		if r.err != nil || json.Unmarshal([]byte(r.stdout), &v) != nil || len(v.Placement) == 0 {
			return false
		}
		for _, p := range v.Placement {
			if p.Primary == "" || len(p.InSync) != want {
				return false
			}
			for _, w := range without {
				if slices.Contains(p.Members(), api.NodeID(w)) {
					return false
				}
			}
		}
		return true
	})
	return v
}

// fioRun is what the replication tests read of fio's JSON output.
type fioRun struct {
	Error      int
	WriteBytes int64
	WriteMaxMs float64
	WriteIOPS  float64
	ReadBytes  int64
}

// parseFio reads fio's JSON output of one job (the nbd engine prints a
// line before it).
func parseFio(b []byte) (fioRun, error) {
	if i := strings.IndexByte(string(b), '{'); i > 0 {
		b = b[i:]
	}
	var doc struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64   `json:"io_bytes"`
				IOPS    float64 `json:"iops"`
				LatNs   struct {
					Max float64 `json:"max"`
				} `json:"lat_ns"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return fioRun{}, err
	}
	if len(doc.Jobs) != 1 {
		return fioRun{}, fmt.Errorf("%d jobs in fio's output, want 1", len(doc.Jobs))
	}
	j := doc.Jobs[0]
	return fioRun{Error: j.Error, WriteBytes: j.Write.IOBytes, WriteMaxMs: j.Write.LatNs.Max / 1e6,
		WriteIOPS: j.Write.IOPS, ReadBytes: j.Read.IOBytes}, nil
}

// fioVerify runs a bounded fio write+verify job against url, calling
// during (in another goroutine) once fio has run for after, and returns
// what fio reported. fio exits non-zero on any I/O or verify error.
func fioVerify(t *testing.T, url, size string, after time.Duration, during func()) fioRun {
	t.Helper()
	fio := needTool(t, "fio")
	out := filepath.Join(t.TempDir(), "fio.json")
	cmd := exec.Command(fio, "--name=failover", "--ioengine=nbd", "--uri="+url, "--rw=randwrite", "--bs=4k",
		"--iodepth=16", "--size="+size, "--verify=crc32c", "--verify_fatal=1", "--output-format=json", "--output="+out)
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	cmd.Dir = filepath.Dir(out) // fio leaves its verify state files in its directory
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	timer := time.NewTimer(after)
	defer timer.Stop()
	var err error
	select {
	case err = <-done:
		t.Fatalf("fio finished before the fault (%v): raise the job size\n%s", err, stderr.String())
	case <-timer.C:
		during()
	}
	select {
	case err = <-done:
	case <-time.After(5 * time.Minute):
		cmd.Process.Kill()
		t.Fatalf("fio still running after 5 minutes: %v", <-done)
	}
	b, rerr := os.ReadFile(out)
	if err != nil || rerr != nil {
		t.Fatalf("fio: %v %v\n%s\n%s", err, rerr, stderr.String(), b)
	}
	res, err := parseFio(b)
	if err != nil {
		t.Fatalf("fio output: %v\n%s", err, b)
	}
	return res
}

// TestClusterReplicatedFailover: a 2-replica volume on three `stord run`
// processes, written by fio (random 4 KiB writes, then every block read
// back and checked with crc32c) through one node's NBD server while
//   - the primary of partition 0 gets SIGKILL: an in-sync secondary takes
//     over, the map places a new secondary that catches up;
//   - the killed node comes back (its old replicas are deleted) and a
//     node that holds replicas is drained: its primaries move away;
//
// fio sees no I/O error and no verify error in any phase; the longest
// write latency (the stall) is logged and bounded.
func TestClusterReplicatedFailover(t *testing.T) {
	heavy(t)
	c := startCluster(t, 3)
	if r := c.storctl(1, "cluster", "configure", "--lease-timeout", "1500ms", "--suspect-timeout", "750ms"); r.err != nil {
		t.Fatalf("cluster configure: %v\n%s", r.err, r.stderr)
	}
	var v placed
	c.mustJSON(1, &v, "volume", "create", "v", "--size", "256M", "--partition-size", "64M", "--replicas", "2")
	v = waitReplicated(t, c, 1, "v", 2)
	victim := string(v.Placement[0].Primary)
	exporter := 1
	for fmt.Sprintf("n%d", exporter) == victim {
		exporter++
	}
	url := fmt.Sprintf("nbd://%s:10809/v", c.ip(exporter))

	// Phase 1: SIGKILL the primary of partition 0.
	res := fioVerify(t, url, "96M", 3*time.Second, func() {
		pid := c.pids()[victim]
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Error(err)
		}
		t.Logf("SIGKILL %s (pid %d), primary of partition 0 at epoch %d", victim, pid, v.Placement[0].Epoch)
	})
	if res.Error != 0 || res.ReadBytes != 96<<20 {
		t.Fatalf("fio across the primary's SIGKILL: error %d, verified %d bytes", res.Error, res.ReadBytes)
	}
	t.Logf("primary SIGKILL: fio ok, %.0f write IOPS, longest write %.0f ms", res.WriteIOPS, res.WriteMaxMs)
	if res.WriteMaxMs > 15000 {
		t.Errorf("a write stalled %.0f ms across the failover (bound 15 s)", res.WriteMaxMs)
	}
	w := waitReplicated(t, c, exporter, "v", 2, victim)
	if w.Placement[0].Epoch <= v.Placement[0].Epoch {
		t.Fatalf("partition 0 at epoch %d after the failover, was %d", w.Placement[0].Epoch, v.Placement[0].Epoch)
	}
	// The primaries report their replacement secondaries rebuilt.
	var rows []struct {
		Partition int     `json:"partition"`
		Replica   string  `json:"replica"`
		State     string  `json:"state"`
		Done      uint64  `json:"done"`
		Total     uint64  `json:"total"`
		Percent   float64 `json:"percent"`
	}
	c.mustJSON(exporter, &rows, "volume", "rebuild-status", "v", "--wait", "60s")
	if len(rows) != len(w.Placement) {
		t.Fatalf("rebuild-status: %d rows for %d partitions: %+v", len(rows), len(w.Placement), rows)
	}
	for _, r := range rows {
		if r.State != "in-sync" || r.Percent != 100 || r.Done != r.Total || r.Total == 0 {
			t.Errorf("rebuild-status after the rebuild: %+v", r)
		}
	}
	if r := c.storctl(exporter, "volume", "rebuild-status", "v"); r.err != nil || !strings.Contains(r.stdout, "[####################] 100.0%") {
		t.Errorf("rebuild-status table: %v\n%s%s", r.err, r.stdout, r.stderr)
	}

	// Phase 2: the killed node restarts; then drain a node holding
	// primaries, not the exporter.
	c.up()
	var drained string
	for _, p := range w.Placement {
		if id := string(p.Primary); id != fmt.Sprintf("n%d", exporter) {
			drained = id
			break
		}
	}
	if drained == "" {
		t.Fatalf("every primary is on the exporting node n%d: placement should spread them: %+v", exporter, w.Placement)
	}
	res = fioVerify(t, url, "64M", 2*time.Second, func() {
		if r := c.storctl(exporter, "node", "drain", drained); r.err != nil {
			t.Errorf("node drain %s: %v\n%s", drained, r.err, r.stderr)
		}
		t.Logf("drained %s", drained)
	})
	if res.Error != 0 || res.ReadBytes != 64<<20 {
		t.Fatalf("fio across the drain: error %d, verified %d bytes", res.Error, res.ReadBytes)
	}
	t.Logf("drain: fio ok, %.0f write IOPS, longest write %.0f ms", res.WriteIOPS, res.WriteMaxMs)
	waitFor(t, "no primary on the drained node", 60*time.Second, func() bool {
		var d placed
		c.mustJSON(exporter, &d, "volume", "show", "v")
		for _, p := range d.Placement {
			if string(p.Primary) == drained || p.Primary == "" {
				return false
			}
		}
		return true
	})
}

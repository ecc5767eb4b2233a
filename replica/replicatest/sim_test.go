package replicatest

import (
	"os"
	"strconv"
	"testing"
	"time"
)

// simSeeds is the number of seeds TestSimulation runs: 2000, fewer with
// -short or -race, or $STOR_SIM_SEEDS.
func simSeeds(t *testing.T) int {
	if s := os.Getenv("STOR_SIM_SEEDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("STOR_SIM_SEEDS: %v", err)
		}
		return n
	}
	if testing.Short() || raceEnabled {
		return 200
	}
	return 2000
}

func simOptions(seed uint64, powerLoss bool) SimOptions {
	return SimOptions{Seed: seed, Nodes: 2 + int(seed%2), Clients: 3, Blocks: 4, Ops: 15, PowerLoss: powerLoss}
}

// TestSimulation runs thousands of seeded simulations under faults and
// checks every invariant (see the package doc). A failing seed prints the
// command that traces it.
func TestSimulation(t *testing.T) { runSims(t, false) }

// TestSimulationPowerLoss runs the simulation with power losses that lose
// unsynced journal tails, and a power loss of every node at the end; it
// checks that flushed writes survive (instead of linearizability, which
// a power loss may break for writes not yet flushed).
func TestSimulationPowerLoss(t *testing.T) { runSims(t, true) }

func runSims(t *testing.T, powerLoss bool) {
	n := simSeeds(t)
	if powerLoss && os.Getenv("STOR_SIM_SEEDS") == "" {
		n /= 2 // keeps the package under a minute
	}
	start := time.Now()
	var tot SimResult
	base := uint64(0)
	if s := os.Getenv("STOR_SIM_BASE"); s != "" {
		b, _ := strconv.ParseUint(s, 10, 64)
		base = b
	}
	failed := 0
	for i := range n {
		seed := base + uint64(i)
		res, err := Simulate(simOptions(seed, powerLoss))
		if err != nil {
			failed++
			pl := ""
			if powerLoss {
				pl = "STOR_SIM_POWERLOSS=1 "
			}
			t.Errorf("seed %d: %v\n  trace: %sSTOR_SIM_SEED=%d go test -count=1 -run TestSimulationSeed ./replica/replicatest/", seed, err, pl, seed)
			if failed >= 5 {
				t.FailNow()
			}
		}
		tot.Ops += res.Ops
		tot.Acked += res.Acked
		tot.Failovers += res.Failovers
		tot.Crashes += res.Crashes
		tot.Cuts += res.Cuts
		tot.Compactions += res.Compactions
		tot.Ticks += res.Ticks
		tot.Delivered += res.Delivered
		tot.Dropped += res.Dropped
	}
	t.Logf("%d seeds in %v: %d ops (%d acked), %d failovers, %d crashes, %d cuts, %d compactions, %d ticks, %d messages delivered, %d dropped",
		n, time.Since(start).Round(time.Millisecond), tot.Ops, tot.Acked, tot.Failovers, tot.Crashes, tot.Cuts, tot.Compactions, tot.Ticks, tot.Delivered, tot.Dropped)
}

// TestSimulationSeed traces one seed ($STOR_SIM_SEED).
func TestSimulationSeed(t *testing.T) {
	s := os.Getenv("STOR_SIM_SEED")
	if s == "" {
		t.Skip("set STOR_SIM_SEED")
	}
	seed, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	o := simOptions(seed, os.Getenv("STOR_SIM_POWERLOSS") != "")
	o.Trace = func(s string) { t.Log(s) }
	res, err := Simulate(o)
	t.Logf("%+v", res)
	if err != nil {
		t.Fatal(err)
	}
}

package head

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
	"stor.dev/stor/target"
)

// mapControl is a control plane for tests: a real cluster.Map under a
// mutex, with the clock of the wall. A heartbeat loop keeps the nodes in
// alive fresh and ticks, so a node taken out of alive is declared dead
// after the map's lease.
type mapControl struct {
	mu     sync.Mutex
	m      *cluster.Map
	alive  map[api.NodeID]bool
	health map[api.NodeID]int // heartbeat health; 0: 100
	calls  atomic.Int64
}

func (f *mapControl) apply(c cluster.Command) (cluster.Result, error) {
	f.calls.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	c.Now = time.Now().UTC()
	return f.m.Apply(c)
}

func (f *mapControl) ClusterVolumes(ctx context.Context) ([]cluster.Volume, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.m.VolumeList(), nil
}

func (f *mapControl) ClusterVolume(ctx context.Context, name string) (cluster.Volume, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.m.Volume(name)
	if !ok {
		return v, fmt.Errorf("%w: volume %s", api.ErrNotFound, name)
	}
	return v, nil
}

func (f *mapControl) Nodes(ctx context.Context) ([]cluster.Node, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.m.NodeList(), nil
}

func (f *mapControl) Acquire(ctx context.Context, r client.GrantRequest) (cluster.Grant, error) {
	res, err := f.apply(cluster.Command{Op: cluster.OpAcquire, Volume: r.Volume, Partition: r.Partition, Role: r.Role, Node: r.Node, Epoch: r.Epoch})
	if err != nil {
		return cluster.Grant{}, err
	}
	return *res.Grant, nil
}

func (f *mapControl) Release(ctx context.Context, r client.GrantRequest) (cluster.Grant, error) {
	res, err := f.apply(cluster.Command{Op: cluster.OpRelease, Volume: r.Volume, Partition: r.Partition, Role: r.Role, Node: r.Node, Force: r.Force})
	if err != nil {
		return cluster.Grant{}, err
	}
	return *res.Grant, nil
}

func (f *mapControl) Bless(ctx context.Context, r client.GrantRequest) (cluster.Blessing, error) {
	res, err := f.apply(cluster.Command{Op: cluster.OpBless, Volume: r.Volume, Partition: r.Partition, Node: r.Node, Epoch: r.Epoch})
	if err != nil {
		return cluster.Blessing{}, err
	}
	return *res.Blessing, nil
}

func (f *mapControl) SetInSync(ctx context.Context, r client.InSyncRequest) (cluster.Volume, error) {
	res, err := f.apply(cluster.Command{Op: cluster.OpSetInSync, Volume: r.Volume, Partition: r.Partition, Node: r.Node, Epoch: r.Epoch, Nodes: r.InSync})
	if err != nil {
		return cluster.Volume{}, err
	}
	return *res.Volume, nil
}

func (f *mapControl) volume(t *testing.T, name string) cluster.Volume {
	t.Helper()
	v, err := f.ClusterVolume(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// heartbeats heartbeats the alive nodes and ticks until ctx ends.
func (f *mapControl) heartbeats(ctx context.Context, wg *sync.WaitGroup) {
	defer wg.Done()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	since := time.Now().UTC()
	for {
		f.mu.Lock()
		beats := map[api.NodeID]int{}
		for id, ok := range f.alive {
			if ok {
				beats[id] = 100
				if h, ok := f.health[id]; ok {
					beats[id] = h
				}
			}
		}
		f.mu.Unlock()
		for id, h := range beats {
			f.apply(cluster.Command{Op: cluster.OpHeartbeat, Node: id, Health: h})
		}
		f.apply(cluster.Command{Op: cluster.OpTick, Since: since})
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

type testCluster struct {
	t     *testing.T
	ctl   *mapControl
	nodes map[api.NodeID]*Node
	fs    map[api.NodeID]vfs.FS
	stop  context.CancelFunc
	wg    sync.WaitGroup
}

// newTestCluster starts head+export nodes n1..nN on loopback over a map
// with a short lease.
func newTestCluster(t *testing.T, n int) *testCluster {
	t.Helper()
	base := runtime.NumGoroutine()
	m := cluster.New()
	cfg := cluster.DefaultConfig()
	cfg.LeaseTimeout, cfg.SuspectTimeout = 400*time.Millisecond, 200*time.Millisecond
	if _, err := m.Apply(cluster.Command{Op: cluster.OpConfigure, Config: &cfg}); err != nil {
		t.Fatal(err)
	}
	tc := &testCluster{t: t, ctl: &mapControl{m: m, alive: map[api.NodeID]bool{}, health: map[api.NodeID]int{}}, nodes: map[api.NodeID]*Node{}, fs: map[api.NodeID]vfs.FS{}}
	for i := 1; i <= n; i++ {
		id := api.NodeID(fmt.Sprintf("n%d", i))
		tc.fs[id] = vfs.NewMem()
		nd := tc.start(id)
		spec := cluster.NodeSpec{Addr: cluster.Addresses{API: fmt.Sprintf("127.0.0.1:%d", 7000+i), Peer: nd.Addr().String()}}
		if _, err := tc.ctl.apply(cluster.Command{Op: cluster.OpRegister, Node: id, Spec: &spec}); err != nil {
			t.Fatal(err)
		}
		tc.ctl.alive[id] = true
	}
	ctx, cancel := context.WithCancel(context.Background())
	tc.stop = cancel
	tc.wg.Add(1)
	go tc.ctl.heartbeats(ctx, &tc.wg)
	t.Cleanup(func() {
		tc.stop()
		tc.wg.Wait()
		for id, nd := range tc.nodes {
			if err := nd.Close(); err != nil {
				t.Errorf("closing %s: %v", id, err)
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for runtime.NumGoroutine() > base && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if g := runtime.NumGoroutine(); g > base {
			buf := make([]byte, 1<<20)
			t.Errorf("%d goroutines left (%d before):\n%s", g, base, buf[:runtime.Stack(buf, true)])
		}
	})
	return tc
}

// start opens node id's data path on its (kept) disk, at a fixed address
// once it had one.
func (tc *testCluster) start(id api.NodeID) *Node {
	tc.t.Helper()
	listen := "127.0.0.1:0"
	tc.ctl.mu.Lock()
	if nd, ok := tc.ctl.m.Node(id); ok {
		listen = nd.Addr.Peer
	}
	tc.ctl.mu.Unlock()
	var nd *Node
	var err error
	deadline := time.Now().Add(5 * time.Second)
	for {
		nd, err = Open(context.Background(), Config{
			Self: id, Dir: "data", Listen: listen, Control: tc.ctl, Head: true, FS: tc.fs[id],
			Poll: 20 * time.Millisecond, Tick: 5 * time.Millisecond, AttemptTimeout: 200 * time.Millisecond,
			SegmentSize: 4 << 20, Logger: slog.New(slog.NewTextHandler(testWriter{tc.t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
		})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // the old listener's port may linger
	}
	if err != nil {
		tc.t.Fatal(err)
	}
	tc.nodes[id] = nd
	return nd
}

// kill closes node id (its disk stays) and stops its heartbeats.
func (tc *testCluster) kill(id api.NodeID) {
	tc.t.Helper()
	tc.ctl.mu.Lock()
	tc.ctl.alive[id] = false
	tc.ctl.mu.Unlock()
	if err := tc.nodes[id].Close(); err != nil {
		tc.t.Fatal(err)
	}
	delete(tc.nodes, id)
}

func (tc *testCluster) open(id api.NodeID, vol string) target.Device {
	tc.t.Helper()
	var d target.Device
	waitFor(tc.t, "the volume in the catalog of "+string(id), func() bool {
		var err error
		d, err = tc.nodes[id].Catalog().Open(context.Background(), vol)
		return err == nil
	})
	return d
}

// createOne creates volume name of one partition of size bytes with 2
// replicas and returns it with its primary, its secondary and the node
// holding neither.
func (tc *testCluster) createOne(name string, size int64) (v cluster.Volume, primary, sec, other api.NodeID) {
	tc.t.Helper()
	if _, err := tc.ctl.apply(cluster.Command{Op: cluster.OpCreateVolume, Create: &cluster.VolumeSpec{
		Name: name, Size: size, PartitionSize: size, Replicas: 2}}); err != nil {
		tc.t.Fatal(err)
	}
	v = tc.ctl.volume(tc.t, name)
	primary, sec = v.Partitions[0].Primary, v.Partitions[0].Secondaries[0]
	for id := range tc.nodes {
		if id != primary && id != sec {
			other = id
		}
	}
	return v, primary, sec, other
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimSuffix(b, []byte("\n"))))
	return len(b), nil
}

// TestReplicatedVolume: a 2-replica volume placed by the map serves writes
// through any node's catalog; SIGKILL-like loss of a partition's primary
// node stalls I/O until an in-sync secondary takes over at a higher epoch,
// with nothing lost and no error seen by the writer; the replacement
// secondary the map places catches up and joins the in-sync set.
func TestReplicatedVolume(t *testing.T) {
	tc := newTestCluster(t, 3)
	const (
		mib  = 1 << 20
		size = 4 * mib
		bs   = 4096
	)
	if _, err := tc.ctl.apply(cluster.Command{Op: cluster.OpCreateVolume, Create: &cluster.VolumeSpec{
		Name: "v", Size: size, PartitionSize: mib, Replicas: 2}}); err != nil {
		t.Fatal(err)
	}
	v := tc.ctl.volume(t, "v")
	victim := v.Partitions[0].Primary
	var exporter api.NodeID
	for id := range tc.nodes {
		if id != victim && (exporter == "" || id < exporter) {
			exporter = id
		}
	}
	dev := tc.open(exporter, "v")
	defer dev.Close()
	ctx := context.Background()

	// What every block should hold: its last acknowledged write.
	want := make([][]byte, size/bs)
	var wmu sync.Mutex
	write := func(rng *rand.Rand, blk int) error {
		b := make([]byte, bs)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		wmu.Lock()
		defer wmu.Unlock() // one write at a time per block: the order is ours
		if err := dev.WriteAt(ctx, b, int64(blk)*bs, false); err != nil {
			return err
		}
		want[blk] = b
		return nil
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for blk := 0; blk < size/bs; blk += 7 {
		if err := write(rng, blk); err != nil {
			t.Fatal(err)
		}
	}
	check := func(d target.Device, who string) {
		t.Helper()
		buf := make([]byte, size)
		if err := d.ReadAt(ctx, buf, 0); err != nil {
			t.Fatal(err)
		}
		zero := make([]byte, bs)
		for blk := range want {
			exp := want[blk]
			if exp == nil {
				exp = zero
			}
			if !bytes.Equal(buf[blk*bs:(blk+1)*bs], exp) {
				t.Fatalf("%s: block %d differs", who, blk)
			}
		}
	}
	check(dev, "before the failover")

	// A writer runs through the failover; it must see no error.
	wctx, wcancel := context.WithCancel(ctx)
	var werr error
	var writes atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		rng := rand.New(rand.NewPCG(3, 4))
		for wctx.Err() == nil {
			if err := write(rng, rng.IntN(size/bs)); err != nil {
				werr = err
				return
			}
			writes.Add(1)
		}
	}()
	waitFor(t, "some writes", func() bool { return writes.Load() > 50 })
	epoch := v.Partitions[0].Epoch
	tc.kill(victim)
	t.Logf("killed %s, primary of partition 0 at epoch %d", victim, epoch)
	waitFor(t, "a new primary of partition 0", func() bool {
		p := tc.ctl.volume(t, "v").Partitions[0]
		return p.Primary != "" && p.Primary != victim && p.Epoch > epoch
	})
	n := writes.Load()
	waitFor(t, "writes on the new primary", func() bool { return writes.Load() > n+50 || werr != nil })
	wcancel()
	<-done
	if werr != nil {
		t.Fatalf("the writer saw an error across the failover: %v", werr)
	}
	check(dev, "after the failover")

	// The map places a replacement; it catches up and joins the in-sync set.
	waitFor(t, "every partition with 2 in-sync replicas on live nodes", func() bool {
		for _, p := range tc.ctl.volume(t, "v").Partitions {
			if len(p.InSync) != 2 || slices.Contains(p.InSync, victim) || p.Primary == "" {
				return false
			}
		}
		return true
	})
	// Another node's catalog reads the same.
	for id := range tc.nodes {
		if id != exporter {
			d := tc.open(id, "v")
			check(d, "through "+string(id))
			d.Close()
		}
	}
	if !errors.Is(func() error { _, err := tc.nodes[exporter].Catalog().Open(ctx, "nope"); return err }(), target.ErrNotFound) {
		t.Fatal("an unknown volume opened")
	}
}

// TestDualIsolation: the secondary's host is isolating (health below the
// cluster's minimum) when the primary's host dies: the isolating replica,
// the only one in sync, takes over with a solo blessing and serves; the
// replacement placed on the healthy node rebuilds and joins the in-sync
// set, which releases the blessing. Nothing written is lost.
func TestDualIsolation(t *testing.T) {
	tc := newTestCluster(t, 3)
	const size = 1 << 20
	_, primary, sec, healthy := tc.createOne("v", size)
	dev := tc.open(healthy, "v")
	defer dev.Close()
	ctx := context.Background()
	data := bytes.Repeat([]byte("dual isolation."), size/15+1)[:size]
	if err := dev.WriteAt(ctx, data, 0, true); err != nil {
		t.Fatal(err)
	}
	tc.ctl.mu.Lock()
	tc.ctl.health[sec] = 5
	tc.ctl.mu.Unlock()
	waitFor(t, "the secondary's node isolating", func() bool {
		nd, _ := func() (cluster.Node, bool) { tc.ctl.mu.Lock(); defer tc.ctl.mu.Unlock(); return tc.ctl.m.Node(sec) }()
		return nd.State == cluster.StateIsolating
	})
	tc.kill(primary)
	waitFor(t, "the isolating secondary primary with a solo blessing", func() bool {
		p := tc.ctl.volume(t, "v").Partitions[0]
		return p.Primary == sec && p.Solo != nil && p.Solo.Node == sec
	})
	// It serves: a write and a read through the healthy node's catalog.
	patch := bytes.Repeat([]byte{0xa5}, 8192)
	if err := dev.WriteAt(ctx, patch, 4096, true); err != nil {
		t.Fatal(err)
	}
	copy(data[4096:], patch)
	waitFor(t, "the replacement on the healthy node in sync, the blessing released", func() bool {
		p := tc.ctl.volume(t, "v").Partitions[0]
		return p.Primary == sec && slices.Contains(p.InSync, healthy) && p.Solo == nil
	})
	got := make([]byte, size)
	if err := dev.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("data differs after the dual-isolation recovery")
	}
	// The rebuilt replica holds the same: make it the primary.
	tc.kill(sec)
	waitFor(t, "the rebuilt replica primary", func() bool {
		return tc.ctl.volume(t, "v").Partitions[0].Primary == healthy
	})
	if err := dev.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the rebuilt replica's data differs")
	}
}

// TestProvisionAfterRestart: the primary restarts (its log then starts at
// its persisted state: the history a new replica would replay is gone),
// then its secondary dies; the replacement the map places is provisioned
// by a snapshot transfer while a writer goes on, joins the in-sync set,
// and holds every acknowledged write when it has to take over.
func TestProvisionAfterRestart(t *testing.T) {
	tc := newTestCluster(t, 3)
	const (
		size = 2 << 20
		bs   = 4096
	)
	v, primary, sec, third := tc.createOne("v", size)
	dev := tc.open(primary, "v")
	ctx := context.Background()
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	if err := dev.WriteAt(ctx, want, 0, true); err != nil {
		t.Fatal(err)
	}
	dev.Close()

	// Restart the primary before its lease runs out.
	if err := tc.nodes[primary].Close(); err != nil {
		t.Fatal(err)
	}
	tc.start(primary)
	waitFor(t, "the restarted primary serving at a new epoch", func() bool {
		p := tc.ctl.volume(t, "v").Partitions[0]
		return p.Primary == primary && p.Epoch > v.Partitions[0].Epoch && len(p.InSync) == 2
	})

	// A writer goes on through the third node while the secondary dies and
	// its replacement is provisioned.
	dev = tc.open(third, "v")
	defer dev.Close()
	var wmu sync.Mutex
	wctx, wcancel := context.WithCancel(ctx)
	var werr error
	var writes atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		rng := rand.New(rand.NewPCG(7, 8))
		b := make([]byte, bs)
		for wctx.Err() == nil {
			blk := rng.IntN(size / bs)
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			wmu.Lock()
			err := dev.WriteAt(ctx, b, int64(blk*bs), false)
			if err == nil {
				copy(want[blk*bs:], b)
			}
			wmu.Unlock()
			if err != nil {
				werr = err
				return
			}
			writes.Add(1)
		}
	}()
	waitFor(t, "some writes", func() bool { return writes.Load() > 20 })
	tc.kill(sec)
	waitFor(t, "the replacement on "+string(third)+" in sync", func() bool {
		p := tc.ctl.volume(t, "v").Partitions[0]
		return p.Primary == primary && slices.Contains(p.InSync, third) && len(p.InSync) == 2
	})
	n := writes.Load()
	waitFor(t, "writes after the rebuild", func() bool { return writes.Load() > n+20 || werr != nil })
	wcancel()
	<-done
	if werr != nil {
		t.Fatalf("the writer saw an error: %v", werr)
	}

	// The rebuilt replica takes over and holds everything.
	tc.kill(primary)
	waitFor(t, "the rebuilt replica primary", func() bool {
		return tc.ctl.volume(t, "v").Partitions[0].Primary == third
	})
	got := make([]byte, size)
	if err := dev.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the replica rebuilt by a snapshot lost acknowledged writes")
	}
}

package replica

import (
	"context"
	"testing"

	"stor.dev/stor/ctl/api"
)

// TestSnapshotProvisioning: a primary restarted (its log starts at its
// persisted state, so its history is gone) provisions a new, empty peer by
// a snapshot transfer in many small parts while writes go on; the peer
// installs it, catches up on the ops that came meanwhile, joins the in-sync
// set, serves as primary with the same bytes, and recovers them after a
// restart.
func TestSnapshotProvisioning(t *testing.T) {
	defer func(piece, part int64) { snapPiece, snapPart = piece, part }(snapPiece, snapPart)
	snapPiece, snapPart = 2*rbs, 3*rbs // many parts, and pieces split
	c := newRCluster(t, 3, false)
	defer c.close()
	ctx := context.Background()
	c.setCut("n3", true)
	c.promote("n1", "n3")
	var m rmodel
	for i := range rblocks {
		writeBlocks(t, c.rep("n1"), &m, i, 1, byte(i+1))
	}
	if err := c.rep("n1").WriteZeroes(ctx, 4*rbs, 3*rbs, false); err != nil {
		t.Fatal(err)
	}
	for b := 4; b < 7; b++ {
		m[b] = 0
	}
	if err := c.rep("n1").Trim(ctx, 20*rbs, 2*rbs); err != nil {
		t.Fatal(err)
	}
	m[20], m[21] = 0, 0
	writeBlocks(t, c.rep("n1"), &m, 10, 8, 0x77) // one extent over several pieces
	c.quiesce("n1", "n2")

	// Restart n1: its Core's log starts after the persisted map.
	c.stop(c.node("n1"), false)
	c.open(c.node("n1"))
	c.promote("n1", "n3")
	if s := c.rep("n1").Status(); s.Applied == 0 {
		t.Fatalf("n1 restarted with nothing applied: %+v", s)
	}

	// n3 comes back empty-handed: only a snapshot can bring it up. Writes
	// go on while it is sent.
	c.setCut("n3", false)
	for i := range 8 {
		writeBlocks(t, c.rep("n1"), &m, 24+i%8, 1, byte(0xa0+i))
	}
	waitUntil(t, "n3 in sync", func() bool { return c.ctl.isInSync("n3") })
	writeBlocks(t, c.rep("n1"), &m, 0, 2, 0x5a)
	c.quiesce("n1", "n2", "n3")
	c.checkPartition("n3", &m)

	// The installed state serves, and survives a restart.
	c.promote("n3")
	buf := make([]byte, rblocks*rbs)
	if err := c.rep("n3").ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, "n3 as primary", buf, &m)
	writeBlocks(t, c.rep("n3"), &m, 30, 2, 0x33)
	c.quiesce("n3", "n1", "n2")
	c.stop(c.node("n3"), false)
	c.open(c.node("n3"))
	c.promote("n3")
	if err := c.rep("n3").ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, "n3 restarted", buf, &m)
	c.quiesce("n3", "n1", "n2")
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		c.checkPartition(id, &m)
	}
}

// TestSnapshotInstallInterrupted: a partition whose install did not finish
// (its INSTALL marker is there) comes back empty, not half installed.
func TestSnapshotInstallInterrupted(t *testing.T) {
	c := newRCluster(t, 2, false)
	defer c.close()
	c.promote("n1")
	var m rmodel
	writeBlocks(t, c.rep("n1"), &m, 0, 4, 0x11)
	c.quiesce("n1", "n2")
	nd := c.node("n2")
	c.stop(nd, false)
	if err := replaceDurable(nd.fs, "journal", nd.fs.PathJoin("journal", installFile), []byte("1 5\n")); err != nil {
		t.Fatal(err)
	}
	c.open(nd)
	if s := c.rep("n2").Status(); s.Applied != 0 || s.Last != 0 || s.Err != nil {
		t.Fatalf("n2 after an interrupted install: %+v", s)
	}
	var empty rmodel
	c.checkPartition("n2", &empty)
	if _, err := nd.fs.Stat(nd.fs.PathJoin("journal", installFile)); err == nil {
		t.Fatal("the INSTALL marker is still there")
	}
	// It catches up from the primary's log like a new replica.
	writeBlocks(t, c.rep("n1"), &m, 4, 1, 0x12)
	c.quiesce("n1", "n2")
	c.checkPartition("n2", &m)
}

// TestReplicaBackground: the background flush of replicated partitions
// moves journal data into shards and frees segments without opnums of its
// own; a peer that was cut off meanwhile still catches up from the
// primary's log (the segments its appends need are kept), every replica
// holds the same bytes, and all of it survives restarts and a failover.
func TestReplicaBackground(t *testing.T) {
	defer func(k, a, s api.OpNum) { compactKeep, compactAbove, seenKeep = k, a, s }(compactKeep, compactAbove, seenKeep)
	compactKeep, compactAbove, seenKeep = 8, 16, 4
	c := newRCluster(t, 3, false)
	defer c.close()
	ctx := context.Background()
	c.promote("n1")
	var m rmodel
	for round := range 40 { // several 64 KiB segments
		writeBlocks(t, c.rep("n1"), &m, (round*4)%rblocks, 4, byte(round+1))
	}
	c.quiesce("n1", "n2", "n3")
	c.setCut("n3", true)
	for round := range 40 {
		writeBlocks(t, c.rep("n1"), &m, (round*2)%rblocks, 2, byte(0x80+round))
	}
	c.quiesce("n1", "n2")
	var moved int64
	var freed int
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		res, err := c.rep(id).Background(ctx, true)
		if err != nil {
			t.Fatalf("%s: background: %v", id, err)
		}
		moved += res.Moved
		freed += res.SegmentsFreed
		if id != "n3" {
			c.checkPartition(id, &m)
		}
	}
	if moved == 0 || freed == 0 {
		t.Fatalf("background moved %d bytes and freed %d segments: want both", moved, freed)
	}
	c.setCut("n3", false)
	writeBlocks(t, c.rep("n1"), &m, 0, 1, 0xee)
	c.quiesce("n1", "n2", "n3")
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		c.checkPartition(id, &m)
	}
	for _, nd := range c.nodes {
		c.stop(nd, false)
		c.open(nd)
	}
	c.promote("n2")
	buf := make([]byte, rblocks*rbs)
	if err := c.rep("n2").ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	checkBlocks(t, "n2 after restarts", buf, &m)
	writeBlocks(t, c.rep("n2"), &m, 5, 3, 0x44)
	c.quiesce("n2", "n1", "n3")
	for _, id := range []api.NodeID{"n1", "n2", "n3"} {
		c.checkPartition(id, &m)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/target/nbd/nbdtest"
)

// TestE2EStorctl drives the volume lifecycle with the storctl binary
// against a real stord: create, list, show, resize (a new NBD connection
// sees the new size), delete refused while connected and forced, the
// errors users make, --output json, and persistence across a restart.
func TestE2EStorctl(t *testing.T) {
	nbdinfo := needTool(t, "nbdinfo")
	d := startDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	v := d.createVolume("v1", "--size", "64M")
	if v.Name != "v1" || v.Size != 64<<20 || v.BlockSize != 512 || v.NBD != d.url("v1") {
		t.Errorf("create -o json = %+v", v)
	}
	human := d.mustStorctl("volume", "create", "v4k", "--size", "16M", "--block-size", "4096", "--partition-size", "4M")
	if !strings.Contains(human, "v4k") {
		t.Errorf("volume create prints:\n%s", human)
	}
	if got := d.showVolume("v4k"); got.BlockSize != 4096 || got.PartitionSize != 4<<20 || got.Partitions != 4 {
		t.Errorf("v4k = %+v, want block 4096, 4 partitions of 4M", got)
	}
	if names := listNames(t, d); strings.Join(names, ",") != "v1,v4k,vol0" {
		t.Errorf("volume list -o json names = %v", names)
	}
	if out := d.mustStorctl("volume", "list"); !strings.Contains(out, "NAME") || !strings.Contains(out, "v4k") {
		t.Errorf("volume list:\n%s", out)
	}

	// Errors: one line on stderr, nothing on stdout, non-zero exit (1 when
	// the operation failed, 2 when the command line is wrong).
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"volume", "create", "x", "--size", "banana"}, 2, "banana"},
		{[]string{"volume", "create", "v1", "--size", "64M"}, 1, "exists"},
		{[]string{"volume", "create", "bad name!", "--size", "1M"}, 2, "name"},
		{[]string{"volume", "create", "y", "--size", "1G", "--block-size", "1000"}, 2, "block size"},
		{[]string{"volume", "show", "nosuch"}, 1, "not found"},
		{[]string{"volume", "delete", "nosuch"}, 1, "not found"},
		{[]string{"volume", "resize", "nosuch", "--size", "1G"}, 1, "not found"},
		{[]string{"volume", "resize", "v1", "--size", "32M"}, 1, "shrink"},
		{[]string{"volume", "frobnicate"}, 2, ""},
	} {
		r := d.storctl(tc.args...)
		lines := strings.Split(strings.TrimRight(r.stderr, "\n"), "\n")
		if r.code != tc.code || len(lines) != 1 || !strings.Contains(r.stderr, tc.want) || r.stdout != "" {
			t.Errorf("storctl %s: exit %d (want %d), stdout %q, stderr %q (want one line with %q)",
				strings.Join(tc.args, " "), r.code, tc.code, r.stdout, r.stderr, tc.want)
		}
	}
	// The API is unreachable: one line, exit 1.
	r := runCmd(t, storctlBin, "--api", "http://"+freePort(t), "volume", "list")
	if r.code != 1 || strings.Count(strings.TrimRight(r.stderr, "\n"), "\n") != 0 {
		t.Errorf("storctl against a dead API: exit %d, stderr %q", r.code, r.stderr)
	}

	// Write a pattern, then hold a connection open.
	c, err := nbdtest.Dial(ctx, d.nbdAddr, "v1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pat := bytes.Repeat([]byte("v1v1"), 1024)
	if err := c.WriteAt(ctx, pat, 0, true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "v1 to show 1 connection", 10*time.Second, func() bool {
		return d.showVolume("v1").Connections == 1
	})

	// Grow: a new connection sees the new size, the open one keeps its own.
	out := d.mustStorctl("-o", "json", "volume", "resize", "v1", "--size", "128M")
	var rv api.Volume
	if err := json.Unmarshal([]byte(out), &rv); err != nil || rv.Size != 128<<20 {
		t.Errorf("resize -o json: %v %+v", err, rv)
	}
	if info := mustRun(t, nbdinfo, d.url("v1")); !strings.Contains(info, "export-size: 134217728") {
		t.Errorf("nbdinfo after resize:\n%s", info)
	}
	if c.Size != 64<<20 {
		t.Errorf("open connection size %d", c.Size)
	}
	if err := c.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Errorf("read on the open connection after resize: %v", err)
	}
	c2, err := nbdtest.Dial(ctx, d.nbdAddr, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if c2.Size != 128<<20 {
		t.Errorf("new connection size %d, want %d", c2.Size, 128<<20)
	}
	if err := c2.WriteAt(ctx, pat, 128<<20-4096, false); err != nil {
		t.Errorf("write into the grown range: %v", err)
	}
	got := make([]byte, 4096)
	if err := c2.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, pat) {
		t.Errorf("data before the resize: %v", err)
	}
	c2.Close()

	// Delete is refused while the connection is open.
	r = d.storctl("volume", "delete", "v1")
	if r.code != 1 || !strings.Contains(r.stderr, "in use") || strings.Count(strings.TrimRight(r.stderr, "\n"), "\n") != 0 {
		t.Errorf("delete while connected: exit %d, stderr %q; want 1 and one line saying in use", r.code, r.stderr)
	}
	if d.showVolume("v1").Size != 128<<20 {
		t.Error("refused delete changed the volume")
	}
	d.mustStorctl("volume", "delete", "v1", "--force")
	if r := d.storctl("volume", "show", "v1"); r.code != 1 {
		t.Errorf("show after delete: exit %d", r.code)
	}
	if err := c.ReadAt(ctx, got, 0); err == nil {
		t.Error("read on a connection to a force-deleted volume succeeded")
	}
	c.Close()

	// The name can be reused; the new volume holds none of the old data.
	d.createVolume("v1", "--size", "64M")
	c3, err := nbdtest.Dial(ctx, d.nbdAddr, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := c3.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Errorf("recreated v1 reads %q... (err %v), want zeros", got[:8], err)
	}
	c3.Close()
	waitFor(t, "v1 connections to drop to 0", 10*time.Second, func() bool {
		return d.showVolume("v1").Connections == 0
	})
	d.mustStorctl("volume", "delete", "v1")

	// status, and $STOR_API instead of --api.
	var st api.Status
	if err := json.Unmarshal([]byte(d.mustStorctl("-o", "json", "status")), &st); err != nil || !st.Healthy || st.Volumes != 2 {
		t.Errorf("status -o json: %v %+v", err, st)
	}
	t.Setenv("STOR_API", "http://"+d.apiAddr)
	if out := mustRun(t, storctlBin, "volume", "list"); !strings.Contains(out, "v4k") {
		t.Errorf("storctl with $STOR_API:\n%s", out)
	}

	// Everything survives a restart.
	d.restart()
	if names := listNames(t, d); strings.Join(names, ",") != "v4k,vol0" {
		t.Errorf("after restart: %v", names)
	}
	if got := d.showVolume("v4k"); got.Size != 16<<20 || got.BlockSize != 4096 {
		t.Errorf("v4k after restart = %+v", got)
	}
}

func listNames(t *testing.T, d *daemon) []string {
	t.Helper()
	var vs []api.Volume
	out := d.mustStorctl("--output", "json", "volume", "list")
	if err := json.Unmarshal([]byte(out), &vs); err != nil {
		t.Fatalf("volume list -o json: %v\n%s", err, out)
	}
	var names []string
	for _, v := range vs {
		names = append(names, v.Name)
	}
	return names
}

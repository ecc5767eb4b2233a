package nbd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"stor.dev/stor/target"
)

// Real-client tests: libnbd's nbdinfo and nbdcopy, QEMU's qemu-io, against
// the server in-process on 127.0.0.1.

const clientTimeout = 60 * time.Second

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	path := needTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

func TestNbdinfoList(t *testing.T) {
	needTool(t, "nbdinfo")
	cat, _ := memCatalog("vol1", target.Geometry{Size: 64 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{})
	out := runTool(t, "nbdinfo", "--list", "nbd://"+ts.addr)
	for _, want := range []string{"export=", "vol1", "export-size: 67108864", "block_size_minimum: 512",
		"block_size_preferred: 4096", "block_size_maximum: 33554432", "can_multi_conn: true",
		"can_trim: true", "can_zero: true", "can_fast_zero: true", "can_fua: true", "can_flush: true",
		"is_read_only: false", "is_rotational: false", "base:allocation"} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo --list output lacks %q:\n%s", want, out)
		}
	}
}

func TestNbdinfoMapShowsHoles(t *testing.T) {
	needTool(t, "nbdinfo")
	cat, _ := memCatalog("vol1", target.Geometry{Size: 64 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{})
	// Write 1 MiB, trim 256 KiB of it and write zeroes over 1 MiB, over
	// the wire, one at a time (they overlap).
	c := connect(t, ts.addr, "vol1", false)
	for i, r := range []request{
		{Type: cmdWrite, Offset: 0, Length: 1 << 20},
		{Type: cmdTrim, Offset: 256 << 10, Length: 256 << 10},
		{Type: cmdWriteZeroes, Flags: cmdFlagNoHole, Offset: 2 << 20, Length: 1 << 20},
	} {
		var payload []byte
		if r.Type == cmdWrite {
			payload = bytes.Repeat([]byte{0xab}, int(r.Length))
		}
		c.request(r.Flags, r.Type, uint64(i), r.Offset, r.Length, payload)
		if e, _ := c.simpleReply(); e != 0 {
			t.Fatalf("request %d: errno %d", i, e)
		}
	}
	out := runTool(t, "nbdinfo", "--map", "nbd://"+ts.addr+"/vol1")
	// nbdinfo prints: offset length type description.
	want := []string{
		"0      262144    0  data",
		"262144      262144    3  hole,zero",
		"524288      524288    0  data",
		"1048576     1048576    3  hole,zero",
		"2097152     1048576    2  zero",
		"3145728    63963136    3  hole,zero",
	}
	got := strings.Fields(out)
	var wantFields []string
	for _, w := range want {
		wantFields = append(wantFields, strings.Fields(w)...)
	}
	if strings.Join(got, " ") != strings.Join(wantFields, " ") {
		t.Errorf("nbdinfo --map:\n%s\nwant:\n%s", out, strings.Join(want, "\n"))
	}
}

func TestQemuIO(t *testing.T) {
	needTool(t, "qemu-io")
	cat, mem := memCatalog("vol1", target.Geometry{Size: 64 << 20, BlockSize: 512})
	ts := startServer(t, cat, Config{})
	out := runTool(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 1M",
		"-c", "read -P 0xab 0 1M",
		"-c", "discard 0 64k",
		"-c", "read -P 0 0 64k",
		"-c", "write -z 1M 64k",
		"-c", "read -P 0 1M 64k",
		"-c", "write -P 0x5c -f 2M 4k", // FUA
		"-c", "flush",
		"-c", "read -P 0x5c 2M 4k",
		"nbd://"+ts.addr+"/vol1")
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	ext, err := mem.Map(context.Background(), 0, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := []target.Extent{
		{Off: 0, Len: 64 << 10, Kind: target.ExtentHole},
		{Off: 64 << 10, Len: 1<<20 - 64<<10, Kind: target.ExtentData},
		{Off: 1 << 20, Len: 64 << 10, Kind: target.ExtentZero},
		{Off: 1<<20 + 64<<10, Len: 1<<20 - 64<<10, Kind: target.ExtentHole},
		{Off: 2 << 20, Len: 4 << 10, Kind: target.ExtentData},
		{Off: 2<<20 + 4<<10, Len: 2<<20 - 4<<10, Kind: target.ExtentHole},
	}
	if len(ext) != len(want) {
		t.Fatalf("map after qemu-io = %+v, want %+v", ext, want)
	}
	for i := range want {
		if ext[i] != want[i] {
			t.Errorf("extent %d = %+v, want %+v", i, ext[i], want[i])
		}
	}
	if mem.Flushes() == 0 {
		t.Error("qemu-io flush did not reach the device")
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	needTool(t, "nbdcopy")
	cat, _ := memCatalog("vol1", target.Geometry{Size: 64 << 20, BlockSize: 4096})
	ts := startServer(t, cat, Config{})
	dir := t.TempDir()
	in := filepath.Join(dir, "in.img")
	outp := filepath.Join(dir, "out.img")
	// 64 MiB with data, a hole and a zero run; deterministic bytes.
	img := make([]byte, 64<<20)
	seed := uint32(1)
	for i := 0; i < 16<<20; i += 4 {
		seed = seed*1664525 + 1013904223
		img[i], img[i+1], img[i+2], img[i+3] = byte(seed), byte(seed>>8), byte(seed>>16), byte(seed>>24)
	}
	copy(img[40<<20:], bytes.Repeat([]byte("stor"), 1<<20))
	if err := os.WriteFile(in, img, 0o600); err != nil {
		t.Fatal(err)
	}
	url := "nbd://" + ts.addr + "/vol1"
	runTool(t, "nbdcopy", in, url)
	runTool(t, "nbdcopy", url, outp)
	got, err := os.ReadFile(outp)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(img) {
		t.Fatalf("nbdcopy round trip: checksums differ (got %d bytes)", len(got))
	}
	// Parallel connections (multi-conn) too.
	runTool(t, "nbdcopy", "--connections=4", "--requests=16", url, outp)
	if got, err = os.ReadFile(outp); err != nil || sha256.Sum256(got) != sha256.Sum256(img) {
		t.Fatalf("nbdcopy with 4 connections: checksums differ (err %v)", err)
	}
}

func TestQemuImgConvertCompare(t *testing.T) {
	needTool(t, "qemu-img")
	cat, _ := memCatalog("vol1", target.Geometry{Size: 16 << 20, BlockSize: 4096})
	ts := startServer(t, cat, Config{})
	src := filepath.Join(t.TempDir(), "src.img")
	img := make([]byte, 16<<20)
	copy(img[1<<20:], bytes.Repeat([]byte("qemu"), 256<<10))
	copy(img[9<<20:], bytes.Repeat([]byte{0x11}, 4096))
	if err := os.WriteFile(src, img, 0o600); err != nil {
		t.Fatal(err)
	}
	url := "nbd://" + ts.addr + "/vol1"
	runTool(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, url)
	runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, url)
	out := runTool(t, "qemu-img", "map", "--output=json", "-f", "raw", url)
	if !strings.Contains(out, `"start": 1048576, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true`) {
		t.Errorf("qemu-img map:\n%s", out)
	}
}

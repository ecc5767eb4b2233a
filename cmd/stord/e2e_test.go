package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/target/nbd/nbdtest"
)

// End-to-end tests against a real `stord dev` with stock NBD clients.

// TestE2ENbdinfoListAndMap: the default volume is listed with its size and
// capabilities; after a discard the allocation map shows the hole.
func TestE2ENbdinfoListAndMap(t *testing.T) {
	nbdinfo := needTool(t, "nbdinfo")
	qemuIO := needTool(t, "qemu-io")
	d := startDaemon(t)
	out := mustRun(t, nbdinfo, "--list", "nbd://"+d.nbdAddr)
	for _, want := range []string{`export="vol0"`, "export-size: 1073741824", "can_flush: true",
		"can_trim: true", "can_zero: true", "can_multi_conn: true", "is_read_only: false", "base:allocation"} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, out)
		}
	}

	mustRun(t, qemuIO, "-f", "raw",
		"-c", "write -P 0xab 0 4M",
		"-c", "discard 1M 1M",
		"-c", "flush",
		d.url("vol0"))
	ext := nbdMap(t, nbdinfo, d.url("vol0"))
	checkKind(t, ext, 0, 1<<20, "data")
	checkKind(t, ext, 1<<20, 1<<20, "hole")
	checkKind(t, ext, 2<<20, 2<<20, "data")
	checkKind(t, ext, 4<<20, 1<<30-4<<20, "hole")

	// Still so after a restart (SIGINT, as Ctrl-C): the map comes from
	// recovered metadata.
	d.stopWith(syscall.SIGINT)
	d.start()
	ext = nbdMap(t, nbdinfo, d.url("vol0"))
	checkKind(t, ext, 0, 1<<20, "data")
	checkKind(t, ext, 1<<20, 1<<20, "hole")
	checkKind(t, ext, 2<<20, 2<<20, "data")
}

// extent is one line of `nbdinfo --map`: offset, length, type bits (1 hole,
// 2 zero).
type extent struct {
	off, n int64
	typ    int
}

func nbdMap(t *testing.T, nbdinfo, url string) []extent {
	t.Helper()
	out := mustRun(t, nbdinfo, "--map", url)
	var ext []extent
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("nbdinfo --map line %q", line)
		}
		off, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		typ, err3 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("nbdinfo --map line %q", line)
		}
		ext = append(ext, extent{off, n, typ})
	}
	return ext
}

// checkKind requires [off, off+n) to be covered by extents of one kind:
// "data" (type 0) or "hole" (hole bit set).
func checkKind(t *testing.T, ext []extent, off, n int64, kind string) {
	t.Helper()
	covered := int64(0)
	for _, e := range ext {
		lo, hi := max(e.off, off), min(e.off+e.n, off+n)
		if lo >= hi {
			continue
		}
		covered += hi - lo
		isHole := e.typ&1 != 0
		if (kind == "hole") != isHole || (kind == "data" && e.typ != 0) {
			t.Errorf("[%d, %d) overlaps extent %+v, want all %s; map: %+v", off, off+n, e, kind, ext)
			return
		}
	}
	if covered != n {
		t.Errorf("map covers %d of [%d, %d): %+v", covered, off, off+n, ext)
	}
}

// TestE2ENbdcopyRecovery copies 256 MiB of random data in and out, then
// stops stord, starts it again and reads the same bytes back.
func TestE2ENbdcopyRecovery(t *testing.T) {
	heavy(t)
	nbdcopy := needTool(t, "nbdcopy")
	d := startDaemon(t)
	const size = 256 << 20
	d.createVolume("copy", "--size", "256M", "--partition-size", "64M")

	dir := t.TempDir()
	in, out := filepath.Join(dir, "in.img"), filepath.Join(dir, "out.img")
	want := writeRandomFile(t, in, size, 1)
	mustRun(t, nbdcopy, "--flush", in, d.url("copy"))
	mustRun(t, nbdcopy, d.url("copy"), out)
	if got := fileSum(t, out); got != want {
		t.Fatalf("nbdcopy out: sha256 %x, want %x", got, want)
	}
	os.Remove(out)

	d.restart()
	mustRun(t, nbdcopy, "--connections=4", d.url("copy"), out)
	if got := fileSum(t, out); got != want {
		t.Fatalf("after restart: sha256 %x, want %x", got, want)
	}
	// And once more after SIGKILL: everything was flushed.
	os.Remove(out)
	d.kill()
	d.start()
	mustRun(t, nbdcopy, d.url("copy"), out)
	if got := fileSum(t, out); got != want {
		t.Fatalf("after SIGKILL: sha256 %x, want %x", got, want)
	}
}

// writeRandomFile fills a file with seeded random bytes and returns their
// sha256.
func writeRandomFile(t *testing.T, path string, size int, seed uint64) [32]byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.NewChaCha8([32]byte{byte(seed)})
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for done := 0; done < size; done += len(buf) {
		rng.Read(buf)
		h.Write(buf)
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}

// qemuScript is run by qemu-io against a volume and against a local raw
// file of the same size; qemu-img compare then finds them equal.
func qemuScript(size int64) []string {
	last := size - 64<<10
	return []string{
		"write -P 0xab 0 1M",
		"write -P 0xcd 256k 64k",
		"discard 512k 128k",
		"write -z 768k 64k",
		"write -P 0x5c -f 2M 4k", // FUA
		"write -P 0x11 3M 1M",
		"write -z -u 3584k 256k", // may unmap: WRITE_ZEROES without NO_HOLE
		"write -P 0x22 5M 8k",
		"write -P 0x23 5124k 4k", // overwrite inside
		"aio_write -P 0x31 6M 64k",
		"aio_write -P 0x32 7M 64k",
		"aio_flush",
		fmt.Sprintf("write -P 0x77 %d 64k", last),
		"flush",
		"read -P 0xab 0 256k",
		"read -P 0xcd 256k 64k",
		"read -P 0xab 320k 192k",
		"read -P 0 512k 128k",
		"read -P 0xab 640k 128k",
		"read -P 0 768k 64k",
		"read -P 0x5c 2M 4k",
		"read -P 0x11 3M 512k",
		"read -P 0 3584k 256k",
		"read -P 0x22 5M 4k",
		"read -P 0x23 5124k 4k",
		"read -P 0x31 6M 64k",
		"read -P 0x32 7M 64k",
		fmt.Sprintf("read -P 0x77 %d 64k", last),
		"read -P 0 8M 1M",
	}
}

// TestE2EQemu runs qemu-io write/read/discard/zero patterns over nbd:// on
// a 512-byte and a 4096-byte block volume, repeats them on a local raw file
// and compares the two with qemu-img compare, also after a restart.
func TestE2EQemu(t *testing.T) {
	qemuIO := needTool(t, "qemu-io")
	qemuImg := needTool(t, "qemu-img")
	nbdinfo := needTool(t, "nbdinfo")
	d := startDaemon(t, "--no-default-volume")
	const size = 64 << 20
	vols := []struct{ name, bs string }{{"q512", "512"}, {"q4k", "4096"}}
	for _, v := range vols {
		vol := d.createVolume(v.name, "--size", "64M", "--block-size", v.bs, "--partition-size", "16M")
		if vol.Size != size || strconv.Itoa(vol.BlockSize) != v.bs {
			t.Fatalf("created %+v", vol)
		}
		out := mustRun(t, nbdinfo, d.url(v.name))
		if !strings.Contains(out, "block_size_minimum: "+v.bs) {
			t.Errorf("nbdinfo %s lacks block_size_minimum: %s:\n%s", v.name, v.bs, out)
		}
		script := qemuScript(size)
		local := filepath.Join(t.TempDir(), v.name+".raw")
		if err := os.WriteFile(local, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(local, size); err != nil {
			t.Fatal(err)
		}
		for _, target := range []string{d.url(v.name), local} {
			args := []string{"-f", "raw"}
			for _, c := range script {
				args = append(args, "-c", c)
			}
			r := runCmd(t, qemuIO, append(args, target)...)
			if r.err != nil || strings.Contains(r.stdout, "failed") || strings.Contains(r.stderr, "failed") {
				t.Fatalf("qemu-io on %s: %v\n%s%s", target, r.err, r.stdout, r.stderr)
			}
		}
		mustRun(t, qemuImg, "compare", "-f", "raw", "-F", "raw", local, d.url(v.name))
		// A deliberate difference is found.
		mustRun(t, qemuIO, "-f", "raw", "-c", "write -P 0x99 10M 4k", local)
		if r := runCmd(t, qemuImg, "compare", "-f", "raw", "-F", "raw", local, d.url(v.name)); r.code != 1 {
			t.Errorf("qemu-img compare of different images: exit %d, want 1\n%s%s", r.code, r.stdout, r.stderr)
		}
		mustRun(t, qemuIO, "-f", "raw", "-c", "write -z 10M 4k", local)
	}
	d.restart()
	for _, v := range vols {
		local := filepath.Join(t.TempDir(), v.name+".raw")
		// Rebuild the local image: qemu-img convert from the volume must
		// equal a fresh run of the script on a file.
		mustRun(t, qemuImg, "convert", "-f", "raw", "-O", "raw", d.url(v.name), local)
		fresh := filepath.Join(t.TempDir(), "fresh.raw")
		os.WriteFile(fresh, nil, 0o600)
		os.Truncate(fresh, size)
		args := []string{"-f", "raw"}
		for _, c := range qemuScript(size) {
			args = append(args, "-c", c)
		}
		mustRun(t, qemuIO, append(args, fresh)...)
		mustRun(t, qemuImg, "compare", "-f", "raw", "-F", "raw", fresh, d.url(v.name))
		mustRun(t, qemuImg, "compare", "-f", "raw", "-F", "raw", fresh, local)
	}
}

// TestE2EFio runs fio's nbd engine: 4 jobs at queue depth 32 writing
// random 4k blocks with crc32c verification, each job in its own 64 MiB
// region, then a mixed-size pass.
func TestE2EFio(t *testing.T) {
	heavy(t)
	fio := needTool(t, "fio")
	d := startDaemon(t)
	runFio := func(name string, extra ...string) {
		t.Helper()
		args := append([]string{"--name=" + name, "--ioengine=nbd", "--uri=" + d.url("vol0"),
			"--rw=randwrite", "--verify=crc32c", "--verify_fatal=1", "--numjobs=4",
			"--iodepth=32", "--size=64M", "--offset_increment=64M", "--group_reporting=0",
			"--output-format=json", "--verify_state_save=0"}, extra...)
		r := runCmd(t, fio, args...)
		if r.err != nil {
			t.Fatalf("fio %s: %v\n%s\n%s", name, r.err, r.stdout, r.stderr)
		}
		var rep struct {
			Jobs []struct {
				Name  string `json:"jobname"`
				Error int    `json:"error"`
				Write struct {
					IOs int64 `json:"total_ios"`
				} `json:"write"`
				Read struct {
					IOs int64 `json:"total_ios"`
				} `json:"read"`
			} `json:"jobs"`
		}
		// fio may print notes before the JSON document.
		js := r.stdout[max(0, strings.Index(r.stdout, "{")):]
		if err := json.Unmarshal([]byte(js), &rep); err != nil {
			t.Fatalf("fio JSON: %v\n%s", err, r.stdout)
		}
		if len(rep.Jobs) != 4 {
			t.Fatalf("fio reported %d jobs, want 4", len(rep.Jobs))
		}
		for i, j := range rep.Jobs {
			if j.Error != 0 || j.Write.IOs == 0 || j.Read.IOs == 0 {
				t.Errorf("fio %s job %d: error %d, %d writes, %d verify reads", name, i, j.Error, j.Write.IOs, j.Read.IOs)
			}
		}
		t.Logf("fio %s: 4 jobs, writes %d, verify reads %d (job 0)", name, rep.Jobs[0].Write.IOs, rep.Jobs[0].Read.IOs)
	}
	runFio("randwrite-4k", "--bs=4k")
	runFio("randwrite-mixed", "--bsrange=4k-256k", "--size=32M")
}

// TestE2EMetrics: /metrics reports the volume ops that I/O caused.
func TestE2EMetrics(t *testing.T) {
	d := startDaemon(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := nbdtest.Dial(ctx, d.nbdAddr, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p := bytes.Repeat([]byte{7}, 64<<10)
	for i := range 10 {
		if err := c.WriteAt(ctx, p, int64(i)<<16, false); err != nil {
			t.Fatal(err)
		}
		if err := c.ReadAt(ctx, p, int64(i)<<16); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Trim(ctx, 0, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	m := d.metrics()
	for _, want := range []string{"stor_volume_ops_total", "stor_volume_bytes_total",
		"stor_volume_op_duration_seconds_bucket", "stor_volume_inflight_requests", "stor_nbd_connections"} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	for _, op := range []string{"read", "write", "trim", "flush"} {
		v, ok := metricValue(m, "stor_volume_ops_total", map[string]string{"volume": "vol0", "op": op})
		if !ok || v < 1 {
			t.Errorf("stor_volume_ops_total{volume=vol0,op=%s} = %v (found %v), want >= 1", op, v, ok)
		}
	}
	if v, _ := metricValue(m, "stor_volume_ops_total", map[string]string{"volume": "vol0", "op": "write"}); v != 10 {
		t.Errorf("write ops = %v, want 10", v)
	}
	if v, _ := metricValue(m, "stor_volume_bytes_total", map[string]string{"volume": "vol0", "op": "write"}); v != 10*64<<10 {
		t.Errorf("write bytes = %v, want %d", v, 10*64<<10)
	}
	if v, ok := metricValue(m, "stor_nbd_connections", nil); !ok || v != 1 {
		t.Errorf("stor_nbd_connections = %v (found %v), want 1", v, ok)
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", grepLines(m, "stor_"))
	}
}

var sampleRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)`)

// metricValue finds the sample of name whose labels include want.
func metricValue(text, name string, want map[string]string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		m := sampleRE.FindStringSubmatch(line)
		if m == nil || m[1] != name {
			continue
		}
		ok := true
		for k, v := range want {
			if !strings.Contains(m[2], k+`="`+v+`"`) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(m[3], 64)
		return f, err == nil
	}
	return 0, false
}

func grepLines(text, sub string) string {
	var b strings.Builder
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, sub) {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

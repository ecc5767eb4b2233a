package main

// End-to-end iSCSI tests against a real `stord dev`: libiscsi's conformance
// suite on vol0, qemu over iscsi:// and nbd:// on one volume, and CHAP
// stored with the volume across a restart.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"stor.dev/stor/ctl/api"
)

// iscsiURL is the iscsi:// URL of LUN 0 of a volume's target; user and
// secret, when set, go in the URL as libiscsi wants them (user%secret@).
func (d *daemon) iscsiURL(volume, user, secret string) string {
	cred := ""
	if user != "" {
		cred = user + "%" + secret + "@"
	}
	return "iscsi://" + cred + d.iscsiAddr + "/" + api.IQN(volume) + "/0"
}

// cuCounts is the outcome of one iscsi-test-cu suite (family).
type cuCounts struct {
	pass, fail, skip int
	failed           []string
}

var (
	cuTestRE    = regexp.MustCompile(`(?m)^  Test: (\S+) \.\.\.`)
	cuVerdictRE = regexp.MustCompile(`(?m)(?:^|\A)(passed|FAILED)`)
)

// parseCU counts one --verbose log: a test fails when CUnit says FAILED,
// skips when it logged [SKIPPED] before its verdict (CUnit counts skips as
// passes), and passes otherwise.
func parseCU(log string) cuCounts {
	var c cuCounts
	for _, l := range cuTestRE.FindAllStringSubmatchIndex(log, -1) {
		name, rest := log[l[2]:l[3]], log[l[1]:]
		body, verdict := rest, ""
		if v := cuVerdictRE.FindStringSubmatchIndex(rest); v != nil {
			body, verdict = rest[:v[0]], rest[v[2]:v[3]]
		}
		switch {
		case verdict == "FAILED":
			c.fail++
			c.failed = append(c.failed, name)
		case strings.Contains(body, "[SKIPPED]"):
			c.skip++
		default:
			c.pass++
		}
	}
	return c
}

func TestISCSIParseCU(t *testing.T) {
	log := "Suite: X\n  Test: A ...passed\n  Test: B ...    [SKIPPED] no\npassed\n" +
		"  Test: C ...    [FAILED] x\nFAILED\n    1. c.c:1 - x\n  Test: D ...passed    [FAILED] teardown noise\n"
	c := parseCU(log)
	if c.pass != 2 || c.skip != 1 || c.fail != 1 || c.failed[0] != "C" {
		t.Fatalf("%+v", c)
	}
}

// cuAllowed are the failures tolerated on stor, both bugs of the libiscsi
// 1.19.0 tests rather than of the target:
//   - GetLBAStatus.UnmapSingle asks for the status at LBA i+1 and wants the
//     first descriptor at i+LBPPB: equal only when a physical block is one
//     logical block (stor reports 4 KiB physical blocks, as tgtd does).
//   - MultipathIO.CompareAndWrite zeroes 256 blocks with WRITE SAME but
//     compares up to block 255+LBPPB: it depends on what earlier suites
//     left on the volume.
var cuAllowed = map[string]bool{
	"GetLBAStatus.UnmapSingle":    true,
	"MultipathIO.CompareAndWrite": true,
}

// TestISCSIConformance runs every suite of iscsi-test-cu's ALL family
// against vol0 of a real stord, one suite per process (the 1.19.0 trap in
// PROTOCOL-NOTES.md: a skipped CompareAndWrite test leaves a PDU hook that
// corrupts later 16-byte CDBs), with --dataloss and the URL twice (the
// MultipathIO suites want a second path). It logs the per-family table and
// fails on any failure outside cuAllowed.
func TestISCSIConformance(t *testing.T) {
	heavy(t)
	bin := needTool(t, "iscsi-test-cu")
	d := startDaemon(t)
	url := d.iscsiURL("vol0", "", "")

	out := mustRun(t, bin, "--list")
	var suites []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(strings.TrimSpace(line), ".")
		if len(f) == 2 && f[0] == "ALL" {
			suites = append(suites, f[1])
		}
	}
	if len(suites) < 40 {
		t.Fatalf("iscsi-test-cu --list gave %d ALL suites, want about 51:\n%s", len(suites), out)
	}
	sort.Strings(suites)

	// The whole run is bounded; about 75 s in-process on 2 vCPUs.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	logDir := t.TempDir()
	res := map[string]cuCounts{}
	start := time.Now()
	for _, s := range suites {
		sctx, scancel := context.WithTimeout(ctx, 3*time.Minute)
		cmd := exec.CommandContext(sctx, bin, "--dataloss", "--verbose", "-t", "ALL."+s, url, url)
		b, err := cmd.CombinedOutput()
		timedOut := sctx.Err() != nil
		scancel()
		os.WriteFile(filepath.Join(logDir, s+".log"), b, 0o644)
		if timedOut {
			t.Fatalf("suite %s timed out after %v in all (stord alive: %v)\n%s", s, time.Since(start).Round(time.Second), d.running(), lastLines(string(b), 30))
		}
		c := parseCU(string(b))
		if c.pass+c.fail+c.skip == 0 {
			t.Errorf("suite %s ran no test (%v):\n%s", s, err, lastLines(string(b), 30))
		}
		res[s] = c
		if !d.running() {
			t.Fatalf("stord exited during suite %s:\n%s", s, d.tail())
		}
	}

	var tbl bytes.Buffer
	var tot cuCounts
	fmt.Fprintf(&tbl, "%-24s %s\n", "family", "pass/fail/skip")
	for _, s := range suites {
		c := res[s]
		tot.pass, tot.fail, tot.skip = tot.pass+c.pass, tot.fail+c.fail, tot.skip+c.skip
		fmt.Fprintf(&tbl, "%-24s %d/%d/%d", s, c.pass, c.fail, c.skip)
		if len(c.failed) > 0 {
			fmt.Fprintf(&tbl, "  fails: %s", strings.Join(c.failed, " "))
		}
		tbl.WriteString("\n")
	}
	fmt.Fprintf(&tbl, "%-24s %d/%d/%d\n", "TOTAL", tot.pass, tot.fail, tot.skip)
	t.Logf("iscsi-test-cu ALL against stord dev vol0 (%d suites, %v):\n%s", len(suites), time.Since(start).Round(time.Second), tbl.String())

	for _, s := range suites {
		for _, f := range res[s].failed {
			if !cuAllowed[s+"."+f] {
				b, _ := os.ReadFile(filepath.Join(logDir, s+".log"))
				t.Errorf("%s.%s failed:\n%s", s, f, lastLines(string(b), 40))
			}
		}
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// TestISCSIQemu writes 64 MiB of random data into a volume with qemu-img
// over iscsi:// and reads it back over nbd://, then runs the qemu-io
// write/read/discard/zero script over iscsi:// and compares the volume,
// read over nbd://, with the same script applied to a local file.
func TestISCSIQemu(t *testing.T) {
	qemuImg := needTool(t, "qemu-img")
	qemuIO := needTool(t, "qemu-io")
	d := startDaemon(t, "--no-default-volume")
	const size = 64 << 20
	d.createVolume("iq", "--size", "64M")
	iurl, nurl := d.iscsiURL("iq", "", ""), d.url("iq")

	dir := t.TempDir()
	src, back := filepath.Join(dir, "src.raw"), filepath.Join(dir, "back.raw")
	want := writeRandomFile(t, src, size, 7)
	mustRun(t, qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", src, iurl)
	mustRun(t, qemuImg, "convert", "-f", "raw", "-O", "raw", nurl, back)
	if got := fileSum(t, back); got != want {
		t.Fatalf("read back over nbd:// differs from what qemu-img wrote over iscsi:// (sha256 %x, want %x)", got, want)
	}

	local := filepath.Join(dir, "local.raw")
	if err := os.WriteFile(local, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(local, size); err != nil {
		t.Fatal(err)
	}
	// Start both from zeroes.
	mustRun(t, qemuIO, "-f", "raw", "-c", fmt.Sprintf("write -z 0 %d", size), iurl)
	for _, target := range []string{iurl, local} {
		args := []string{"-f", "raw"}
		for _, c := range qemuScript(size) {
			args = append(args, "-c", c)
		}
		r := runCmd(t, qemuIO, append(args, target)...)
		if r.err != nil || strings.Contains(r.stdout, "failed") || strings.Contains(r.stderr, "failed") {
			t.Fatalf("qemu-io on %s: %v\n%s%s", target, r.err, r.stdout, r.stderr)
		}
	}
	mustRun(t, qemuImg, "compare", "-f", "raw", "-F", "raw", local, nurl)
	mustRun(t, qemuImg, "compare", "-f", "raw", "-F", "raw", local, iurl)
}

// TestISCSICHAP turns CHAP on for vol0 with storctl: qemu-img logs in with
// the right credentials and is refused without them or with a wrong
// secret, while NBD clients are unaffected; after a restart CHAP is still
// required.
func TestISCSICHAP(t *testing.T) {
	qemuImg := needTool(t, "qemu-img")
	nbdinfo := needTool(t, "nbdinfo")
	d := startDaemon(t)
	const user, secret = "alice", "correct-horse-battery"

	// Before CHAP: an open login works.
	mustRun(t, qemuImg, "info", d.iscsiURL("vol0", "", ""))
	d.mustStorctl("volume", "chap", "vol0", "--user", user, "--secret", secret)

	check := func(when string) {
		t.Helper()
		out := mustRun(t, qemuImg, "info", d.iscsiURL("vol0", user, secret))
		if !strings.Contains(out, "1073741824 bytes") {
			t.Errorf("%s: qemu-img info with credentials:\n%s", when, out)
		}
		for _, u := range []string{d.iscsiURL("vol0", "", ""), d.iscsiURL("vol0", user, "wrong-secret-123"), d.iscsiURL("vol0", "mallory", secret)} {
			r := runCmd(t, qemuImg, "info", u)
			if r.code == 0 || !strings.Contains(r.stderr, "Authentication failure") {
				t.Errorf("%s: qemu-img info %s: exit %d, want a refusal with \"Authentication failure\":\n%s%s", when, u, r.code, r.stdout, r.stderr)
			}
		}
		if out := strings.TrimSpace(mustRun(t, nbdinfo, "--size", d.url("vol0"))); out != "1073741824" {
			t.Errorf("%s: nbdinfo --size: %q", when, out)
		}
	}
	check("after storctl volume chap")
	d.restart()
	check("after a restart")
}

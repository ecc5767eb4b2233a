package iscsi

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The libiscsi conformance suite, iscsi-test-cu, one suite per process:
// in 1.19.0 CompareAndWrite.InvalidDataOutSize leaves a PDU-rewriting hook
// installed when it skips, corrupting every later 16-byte CDB of the same
// process (PROTOCOL-NOTES.md).
//
// Run it with STOR_ISCSI_CONFORMANCE=1 (about a minute); add
// STOR_ISCSI_TGTD=1 to run the same suites against Debian's tgtd with a
// thin file-backed LUN and print both tables side by side.
//
// Excluded families: none. Tape, changer and media-specific suites do not
// exist in 1.19.0's ALL family; tests that do not apply to a disk (removable
// media, SANITIZE without --allow-sanitize, EXTENDED COPY) report
// [SKIPPED] themselves and are counted as skips.

// cuCounts is the outcome of one suite (family).
type cuCounts struct {
	pass, fail, skip int
	failed, passed   []string
}

var cuTestRE = regexp.MustCompile(`(?m)^  Test: (\S+) \.\.\.`)
var cuVerdictRE = regexp.MustCompile(`(?m)(?:^|\A)(passed|FAILED)`)

// parseCU counts one --verbose log: a test fails when CUnit says FAILED,
// skips when it logged [SKIPPED] before passing, and passes otherwise.
func parseCU(log string) cuCounts {
	var c cuCounts
	locs := cuTestRE.FindAllStringSubmatchIndex(log, -1)
	for _, l := range locs {
		name := log[l[2]:l[3]]
		rest := log[l[1]:]
		v := cuVerdictRE.FindStringSubmatchIndex(rest)
		body := rest
		verdict := ""
		if v != nil {
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
			c.passed = append(c.passed, name)
		}
	}
	return c
}

// cuSuites lists ALL.<suite> from iscsi-test-cu --list.
func cuSuites(t *testing.T, bin string) []string {
	out, err := exec.Command(bin, "--list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Split(strings.TrimSpace(line), ".")
		if len(f) == 2 && f[0] == "ALL" {
			s = append(s, f[1])
		}
	}
	return s
}

// runCU runs every suite against url, one process each, and returns the
// counts per suite.
func runCU(t *testing.T, bin, url string, suites []string, logDir string) map[string]cuCounts {
	res := map[string]cuCounts{}
	for _, s := range suites {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		cmd := exec.CommandContext(ctx, bin, "--dataloss", "--verbose", "-t", "ALL."+s, url, url)
		out, _ := cmd.CombinedOutput()
		cancel()
		if logDir != "" {
			os.WriteFile(filepath.Join(logDir, s+".log"), out, 0o644)
		}
		res[s] = parseCU(string(out))
	}
	return res
}

// formatCU prints a per-family table, stor beside the peer when given.
func formatCU(suites []string, stor, peer map[string]cuCounts) string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%-24s %17s", "family", "stor pass/fail/skip")
	if peer != nil {
		fmt.Fprintf(&b, " %18s", "tgtd pass/fail/skip")
	}
	b.WriteString("\n")
	var ts, tp cuCounts
	sorted := append([]string(nil), suites...)
	sort.Strings(sorted)
	for _, s := range sorted {
		c := stor[s]
		ts.pass, ts.fail, ts.skip = ts.pass+c.pass, ts.fail+c.fail, ts.skip+c.skip
		fmt.Fprintf(&b, "%-24s %7d/%d/%d", s, c.pass, c.fail, c.skip)
		if peer != nil {
			p := peer[s]
			tp.pass, tp.fail, tp.skip = tp.pass+p.pass, tp.fail+p.fail, tp.skip+p.skip
			fmt.Fprintf(&b, " %12d/%d/%d", p.pass, p.fail, p.skip)
		}
		if len(c.failed) > 0 {
			fmt.Fprintf(&b, "  stor fails: %s", strings.Join(c.failed, " "))
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "%-24s %7d/%d/%d", "TOTAL", ts.pass, ts.fail, ts.skip)
	if peer != nil {
		fmt.Fprintf(&b, " %12d/%d/%d", tp.pass, tp.fail, tp.skip)
	}
	b.WriteString("\n")
	return b.String()
}

func TestParseCU(t *testing.T) {
	log := "Suite: X\n  Test: A ...passed\n  Test: B ...    [SKIPPED] no\npassed\n" +
		"  Test: C ...    [FAILED] x\nFAILED\n    1. c.c:1 - x\n  Test: D ...passed    [FAILED] teardown noise\n"
	c := parseCU(log)
	if c.pass != 2 || c.skip != 1 || c.fail != 1 || c.failed[0] != "C" {
		t.Fatalf("%+v", c)
	}
}

func TestConformanceLibiscsi(t *testing.T) {
	if os.Getenv("STOR_ISCSI_CONFORMANCE") != "1" || testing.Short() {
		t.Skip("set STOR_ISCSI_CONFORMANCE=1 to run iscsi-test-cu (about a minute)")
	}
	bin := needTool(t, "iscsi-test-cu")
	ts := startServer(t, Config{}, 64<<20)
	suites := cuSuites(t, bin)
	logDir := os.Getenv("STOR_ISCSI_CU_LOGS")
	if logDir != "" {
		os.MkdirAll(filepath.Join(logDir, "stor"), 0o755)
	}
	stor := runCU(t, bin, ts.url("disk"), suites, subdir(logDir, "stor"))
	var peer map[string]cuCounts
	if os.Getenv("STOR_ISCSI_TGTD") == "1" {
		url, stop := startTgtd(t)
		defer stop()
		peer = runCU(t, bin, url, suites, subdir(logDir, "tgtd"))
	}
	t.Logf("iscsi-test-cu per family:\n%s", formatCU(suites, stor, peer))
	// The anchor: every test tgtd passes, stor passes. Tolerated failures,
	// both bugs of the 1.19.0 tests:
	//   - GetLBAStatus.UnmapSingle asks for the status at LBA i+1 and wants
	//     the first descriptor at i+LBPPB (only equal for LBPPB = 1; we
	//     report 4 KiB physical blocks as tgtd does).
	//   - MultipathIO.CompareAndWrite zeroes 256 blocks with WRITE SAME but
	//     compares up to block 255+LBPPB: it depends on what earlier suites
	//     left there.
	allowed := map[string]bool{"GetLBAStatus.UnmapSingle": true, "MultipathIO.CompareAndWrite": true}
	for s, c := range stor {
		for _, f := range c.failed {
			if !allowed[s+"."+f] {
				t.Errorf("%s.%s failed", s, f)
			}
		}
		if peer == nil {
			continue
		}
		ours := map[string]bool{}
		for _, p := range c.passed {
			ours[p] = true
		}
		for _, p := range peer[s].passed {
			if !ours[p] {
				t.Errorf("%s.%s: tgtd passes, stor does not", s, p)
			}
		}
	}
}

func subdir(dir, name string) string {
	if dir == "" {
		return ""
	}
	d := filepath.Join(dir, name)
	os.MkdirAll(d, 0o755)
	return d
}

// startTgtd runs Debian's tgtd on free ports with a thin 64 MiB file-backed
// LUN 1 and returns its URL and a stop function (tgtd ignores SIGTERM: the
// target is deleted, then the system, then the process is killed).
func startTgtd(t *testing.T) (string, func()) {
	needTool(t, "tgtd")
	needTool(t, "tgtadm")
	if os.Geteuid() != 0 {
		t.Skip("tgtd needs root")
	}
	port, ctl := freePort(t), 100+os.Getpid()%20000 // tgtd: -C is a small index, not a TCP port
	img := filepath.Join(t.TempDir(), "lun.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("tgtd", "-f", "-C", strconv.Itoa(ctl), "--iscsi", "portal=127.0.0.1:"+strconv.Itoa(port))
	var tgtLog bytes.Buffer
	cmd.Stdout, cmd.Stderr = &tgtLog, &tgtLog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	adm := func(args ...string) error {
		return exec.Command("tgtadm", append([]string{"-C", strconv.Itoa(ctl), "--lld", "iscsi"}, args...)...).Run()
	}
	deadline := time.Now().Add(10 * time.Second)
	for adm("--op", "show", "--mode", "target") != nil {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("tgtd did not start: %s", tgtLog.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	iqn := IQNPrefix + "tgtd"
	for _, a := range [][]string{
		{"--op", "new", "--mode", "target", "--tid", "1", "-T", iqn},
		{"--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", img},
		{"--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "--params", "thin_provisioning=1"},
		{"--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"},
	} {
		if err := adm(a...); err != nil {
			cmd.Process.Kill()
			t.Fatalf("tgtadm %v: %v", a, err)
		}
	}
	stop := func() {
		adm("--op", "delete", "--mode", "target", "--tid", "1", "--force")
		adm("--op", "delete", "--mode", "system")
		cmd.Process.Kill()
		cmd.Wait()
	}
	return fmt.Sprintf("iscsi://127.0.0.1:%d/%s/1", port, iqn), stop
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

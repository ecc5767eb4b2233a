package iscsi

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"stor.dev/stor/target"
)

// fileDevice is a file-backed target.Device for the side-by-side benchmark
// (tgtd gets a file on the same filesystem).
type fileDevice struct {
	f   *os.File
	geo target.Geometry
}

func (d *fileDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	_, err := d.f.ReadAt(p, off)
	return err
}
func (d *fileDevice) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if _, err := d.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(int(d.f.Fd()))
	}
	return nil
}
func (d *fileDevice) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (d *fileDevice) Trim(ctx context.Context, off, n int64) error {
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (d *fileDevice) Flush(ctx context.Context) error { return unix.Fdatasync(int(d.f.Fd())) }
func (d *fileDevice) Geometry() target.Geometry       { return d.geo }
func (d *fileDevice) Info() target.Export             { return target.Export{Name: "bench", ID: "bench-1"} }
func (d *fileDevice) Close() error                    { return nil }

type fileCatalog struct{ dev *fileDevice }

func (c fileCatalog) List(ctx context.Context) ([]target.Export, error) {
	return []target.Export{c.dev.Info()}, nil
}
func (c fileCatalog) Open(ctx context.Context, name string) (target.Device, error) {
	if name != "bench" {
		return nil, target.ErrNotFound
	}
	return c.dev, nil
}

var qemuBenchRE = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)
var perfRE = regexp.MustCompile(`iops average (\d+)`)

// TestBenchVsTgtd runs stor (file-backed LUN) and Debian's tgtd (file-backed
// LUN on the same filesystem) side by side, alternating round by round, and
// prints the median of each row with min..max and the ratio stor/tgtd.
// Set STOR_ISCSI_BENCH=1 (takes a few minutes; needs root for tgtd).
func TestBenchVsTgtd(t *testing.T) {
	if os.Getenv("STOR_ISCSI_BENCH") != "1" {
		t.Skip("set STOR_ISCSI_BENCH=1 to benchmark against tgtd")
	}
	needTool(t, "qemu-img")
	perf := needTool(t, "iscsi-perf")
	const size = 256 << 20
	img := filepath.Join(t.TempDir(), "stor.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(size)
	dev := &fileDevice{f: f, geo: target.Geometry{Size: size, BlockSize: 512}}
	ts := startServer(t, Config{Catalog: fileCatalog{dev}}, 1<<20)
	storURL := ts.url("bench")
	tgtURL, stop := startTgtd(t)
	defer stop()
	// Fill both so reads hit data.
	for _, u := range []string{storURL, tgtURL} {
		runTool(t, "qemu-img", "bench", "-f", "raw", "-w", "-c", "256", "-d", "4", "-s", "1M", "-S", "1M", "-t", "none", u)
	}
	type row struct {
		name string
		run  func(url string) float64 // ops/s
	}
	qb := func(count int, args ...string) func(string) float64 {
		return func(url string) float64 {
			a := append([]string{"bench", "-f", "raw", "-t", "none", "-c", strconv.Itoa(count)}, args...)
			out := runTool(t, "qemu-img", append(a, url)...)
			m := qemuBenchRE.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("qemu-img bench: %s", out)
			}
			secs, _ := strconv.ParseFloat(m[1], 64)
			return float64(count) / secs
		}
	}
	rows := []row{
		{"iscsi-perf 4k rand read QD32 (IOPS)", func(url string) float64 {
			out, _ := exec.Command("timeout", "-s", "INT", "5", perf, "-m", "32", "-b", "8", "-r", url).CombinedOutput()
			m := perfRE.FindAllStringSubmatch(string(out), -1)
			if m == nil {
				t.Fatalf("iscsi-perf: %s", out)
			}
			v, _ := strconv.ParseFloat(m[len(m)-1][1], 64)
			return v
		}},
		{"qemu-img bench 4k read QD1", qb(20000, "-d", "1", "-s", "4k", "-S", "4k")},
		{"qemu-img bench 4k read QD32", qb(100000, "-d", "32", "-s", "4k", "-S", "4k")},
		{"qemu-img bench 4k write QD1", qb(20000, "-w", "-d", "1", "-s", "4k", "-S", "4k")},
		{"qemu-img bench 4k write QD32", qb(100000, "-w", "-d", "32", "-s", "4k", "-S", "4k")},
		{"qemu-img bench 1M seq read QD4", qb(1000, "-d", "4", "-s", "1M", "-S", "1M")},
		{"qemu-img bench 1M seq write QD4", qb(1000, "-w", "-d", "4", "-s", "1M", "-S", "1M")},
		{"qemu-img bench 4k write+flush QD1", qb(5000, "-w", "-d", "1", "-s", "4k", "-S", "4k", "--flush-interval=1")},
	}
	const rounds = 3
	var b strings.Builder
	fmt.Fprintf(&b, "machine: %d CPUs, %s; %d rounds alternating, median (min..max) ops/s\n", runtime.NumCPU(), runtime.Version(), rounds)
	fmt.Fprintf(&b, "%-38s %26s %26s %6s\n", "row", "stor", "tgtd", "ratio")
	for _, r := range rows {
		var s, g []float64
		for i := 0; i < rounds; i++ {
			s = append(s, r.run(storURL))
			g = append(g, r.run(tgtURL))
		}
		ms, mg := median(s), median(g)
		fmt.Fprintf(&b, "%-38s %26s %26s %6.2f\n", r.name, spread(s), spread(g), ms/mg)
	}
	t.Logf("stor vs tgtd (%s):\n%s", time.Now().UTC().Format(time.RFC3339), b.String())
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func spread(v []float64) string {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return fmt.Sprintf("%.0f (%.0f..%.0f)", median(v), s[0], s[len(s)-1])
}

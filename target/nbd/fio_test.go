package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"stor.dev/stor/target"
)

// TestFioVersusNbdServer compares this server with Debian's nbd-server under
// fio's nbd engine: 4 KiB random reads and writes at queue depth 1 and 32,
// rounds alternating between the peers, medians with min..max. It takes
// about a minute and a half, so it runs only with NBD_FIO=1:
//
//	NBD_FIO=1 go test -count=1 -run TestFioVersusNbdServer -v ./target/nbd
//
// Both export 64 MiB held in memory: ours a flat in-memory device in this
// process (so the comparison measures the protocol servers, not
// blockdevtest.Memory's per-block maps), nbd-server a file on /dev/shm
// (tmpfs).
func TestFioVersusNbdServer(t *testing.T) {
	if os.Getenv("NBD_FIO") != "1" {
		t.Skip("set NBD_FIO=1 to compare with nbd-server under fio")
	}
	fio := needTool(t, "fio")
	nbdServer := needTool(t, "nbd-server")
	const size = 64 << 20
	rounds, _ := strconv.Atoi(os.Getenv("NBD_FIO_ROUNDS"))
	if rounds <= 0 {
		rounds = 3
	}
	runtime := "3"

	fill := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	cat := newDevCatalog()
	cat.add("vol", &flatDevice{geo: target.Geometry{Size: size, BlockSize: 512}, data: bytes.Clone(fill)})
	ours := startServer(t, cat, Config{})

	dir, err := os.MkdirTemp("/dev/shm", "nbdfio")
	if err != nil {
		dir = t.TempDir()
	} else {
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	img := filepath.Join(dir, "vol.img")
	if err := os.WriteFile(img, fill, 0o600); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	cfg := filepath.Join(dir, "config")
	pidFile := filepath.Join(dir, "pid")
	os.WriteFile(cfg, []byte(fmt.Sprintf("[generic]\n\tlistenaddr = 127.0.0.1\n\tport = %d\n[vol]\n\texportname = %s\n\tflush = true\n\tfua = true\n", port, img)), 0o600)
	if out, err := exec.Command(nbdServer, "-C", cfg, "-p", pidFile).CombinedOutput(); err != nil {
		t.Fatalf("nbd-server: %v\n%s", err, out)
	}
	var pid int
	eventually(t, 10*time.Second, "nbd-server pid file", func() bool {
		b, err := os.ReadFile(pidFile)
		pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil && pid > 0
	})
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGTERM) })
	peerAddr := fmt.Sprintf("127.0.0.1:%d", port)
	eventually(t, 10*time.Second, "nbd-server listening", func() bool {
		c, err := net.Dial("tcp", peerAddr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	type key struct {
		server, rw string
		qd         int
	}
	results := map[key][]float64{}
	servers := []struct{ name, addr string }{{"stor", ours.addr}, {"nbd-server", peerAddr}}
	for round := range rounds {
		order := servers
		if round%2 == 1 {
			order = []struct{ name, addr string }{servers[1], servers[0]}
		}
		for _, rw := range []string{"randread", "randwrite"} {
			for _, qd := range []int{1, 32} {
				for _, s := range order {
					iops := runFio(t, fio, "nbd://"+s.addr+"/vol", rw, qd, runtime)
					k := key{s.name, rw, qd}
					results[k] = append(results[k], iops)
				}
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "fio nbd engine, 4 KiB, %d rounds of %ss, IOPS median (min..max):\n", rounds, runtime)
	for _, rw := range []string{"randread", "randwrite"} {
		for _, qd := range []int{1, 32} {
			fmt.Fprintf(&sb, "  %-9s qd%-2d", rw, qd)
			for _, s := range servers {
				v := slices.Clone(results[key{s.name, rw, qd}])
				slices.Sort(v)
				fmt.Fprintf(&sb, "  %s %7.0f (%.0f..%.0f)", s.name, v[len(v)/2], v[0], v[len(v)-1])
			}
			sb.WriteString("\n")
		}
	}
	t.Log(sb.String())
}

func runFio(t *testing.T, fio, uri, rw string, qd int, runtime string) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, fio, "--name=bench", "--ioengine=nbd", "--uri="+uri,
		"--rw="+rw, "--bs=4k", "--iodepth="+strconv.Itoa(qd), "--size=64M", "--time_based",
		"--runtime="+runtime, "--output-format=json").CombinedOutput()
	if err != nil {
		t.Fatalf("fio %s: %v\n%s", uri, err, out)
	}
	i := bytes.IndexByte(out, '{')
	if i < 0 {
		t.Fatalf("fio output: %s", out)
	}
	var res struct {
		Jobs []struct {
			Error int
			Read  struct{ IOPS float64 }
			Write struct{ IOPS float64 }
		}
	}
	if err := json.Unmarshal(out[i:], &res); err != nil || len(res.Jobs) != 1 || res.Jobs[0].Error != 0 {
		t.Fatalf("fio output (%v): %s", err, out)
	}
	return res.Jobs[0].Read.IOPS + res.Jobs[0].Write.IOPS
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// flatDevice is a preallocated in-memory disk, the analogue of a file on
// tmpfs.
type flatDevice struct {
	geo  target.Geometry
	mu   sync.RWMutex
	data []byte
}

func (d *flatDevice) Geometry() target.Geometry { return d.geo }

func (d *flatDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := d.geo.Check(off, int64(len(p))); err != nil {
		return err
	}
	d.mu.RLock()
	copy(p, d.data[off:])
	d.mu.RUnlock()
	return nil
}

func (d *flatDevice) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := d.geo.Check(off, int64(len(p))); err != nil {
		return err
	}
	d.mu.Lock()
	copy(d.data[off:], p)
	d.mu.Unlock()
	return nil
}

func (d *flatDevice) WriteZeroes(ctx context.Context, off, n int64, fua bool) error {
	if err := d.geo.Check(off, n); err != nil {
		return err
	}
	d.mu.Lock()
	clear(d.data[off : off+n])
	d.mu.Unlock()
	return nil
}

func (d *flatDevice) Trim(ctx context.Context, off, n int64) error {
	return d.WriteZeroes(ctx, off, n, false)
}

func (d *flatDevice) Flush(ctx context.Context) error { return nil }

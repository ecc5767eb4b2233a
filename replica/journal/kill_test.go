package journal

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/vfs"
)

const killChildEnv = "JOURNAL_KILL_CHILD_DIR"

// killData is the deterministic payload of opnum op.
func killData(op uint64) []byte {
	b := make([]byte, 512*(1+op%8))
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], op*0x9e3779b97f4a7c15+uint64(i))
	}
	return b
}

// TestKillChild is the child of TestSIGKILL: it appends on the real file
// system until killed, reporting each completed Sync on stdout, and after
// each Sync removes the oldest synced segments but the last few (so new
// segments reuse their files), reporting each before it removes it.
func TestKillChild(t *testing.T) {
	dir := os.Getenv(killChildEnv)
	if dir == "" {
		t.Skip("run by TestSIGKILL")
	}
	j, err := Open(vfs.Default, dir, Options{SegmentSize: 256 << 10})
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	deadline := time.Now().Add(20 * time.Second)
	for op := uint64(1); time.Now().Before(deadline); op++ {
		d := killData(op)
		if _, err := j.Append(&Record{Kind: KindWrite, Epoch: 1, OpNum: op, Off: int64(op) * 4096, Len: int64(len(d)), Data: d}); err != nil {
			fmt.Println("error", err)
			os.Exit(1)
		}
		if op%7 == 0 {
			if err := j.Sync(context.Background()); err != nil {
				fmt.Println("error", err)
				os.Exit(1)
			}
			fmt.Println("synced", j.SyncedOpNum())
			segs := j.Segments()
			for _, s := range segs[:max(0, len(segs)-4)] {
				if s.Active || s.LastOp > j.SyncedOpNum() {
					break
				}
				fmt.Println("removing", s.LastOp)
				if err := j.Remove(s.ID); err != nil {
					fmt.Println("error", err)
					os.Exit(1)
				}
			}
		}
	}
	os.Exit(0) // not reached when the parent kills us in time
}

// TestSIGKILL kills a process that appends to a journal on disk (and
// removes old segments, whose files new segments reuse) and checks that a
// reopen finds every record it appended and did not remove, synced or
// not, intact, and nothing else.
func TestSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child process")
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestKillChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), killChildEnv+"="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	var synced, removing uint64
	sc := bufio.NewScanner(out)
	scan := func(line string) {
		t.Helper()
		if n, ok := strings.CutPrefix(line, "synced "); ok {
			if synced, err = strconv.ParseUint(n, 10, 64); err != nil {
				t.Fatal(line)
			}
		} else if n, ok := strings.CutPrefix(line, "removing "); ok {
			if removing, err = strconv.ParseUint(n, 10, 64); err != nil {
				t.Fatal(line)
			}
		} else if strings.HasPrefix(line, "error") {
			t.Fatal(line)
		}
	}
	for synced < 2000 && sc.Scan() {
		scan(sc.Text())
	}
	if synced < 2000 {
		t.Fatalf("child stopped early at synced %d: %v", synced, sc.Err())
	}
	time.Sleep(20 * time.Millisecond) // appends, rotations and removals go on
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for sc.Scan() { // what the child said before it died
		scan(sc.Text())
	}
	cmd.Wait()

	j := openT(t, vfs.Default, dir, Options{SegmentSize: 256 << 10})
	defer j.Close()
	if j.LastOpNum() < synced {
		t.Fatalf("LastOpNum %d < %d synced before the kill", j.LastOpNum(), synced)
	}
	first, want := uint64(0), uint64(0)
	err = j.Replay(0, func(r *Record, _ Pos) error {
		if first == 0 {
			first, want = r.OpNum, r.OpNum
		}
		if r.OpNum != want || !bytes.Equal(r.Data, killData(r.OpNum)) {
			return fmt.Errorf("record %d: %s", want, fmtRecord(r))
		}
		want++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if first == 0 || first > removing+1 || want-1 != j.LastOpNum() {
		t.Fatalf("records %d..%d, want from <= %d (the child was removing up to %d) to %d", first, want-1, removing+1, removing, j.LastOpNum())
	}
	if removing == 0 {
		t.Fatal("the child removed no segment")
	}
	t.Logf("child synced %d, removed up to %d; reopen found records %d..%d in %d segments", synced, removing, first, want-1, len(j.Segments()))
}

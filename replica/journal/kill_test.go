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
// system until killed, reporting each completed Sync on stdout.
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
		}
	}
	os.Exit(0) // not reached when the parent kills us in time
}

// TestSIGKILL kills a process that appends to a journal on disk and checks
// that a reopen finds every record it appended, synced or not, intact.
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
	var synced uint64
	sc := bufio.NewScanner(out)
	for synced < 2000 && sc.Scan() {
		line := sc.Text()
		if n, ok := strings.CutPrefix(line, "synced "); ok {
			if synced, err = strconv.ParseUint(n, 10, 64); err != nil {
				t.Fatal(line)
			}
		} else if strings.HasPrefix(line, "error") {
			t.Fatal(line)
		}
	}
	if synced < 2000 {
		t.Fatalf("child stopped early at synced %d: %v", synced, sc.Err())
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()

	j := openT(t, vfs.Default, dir, Options{SegmentSize: 256 << 10})
	defer j.Close()
	if j.LastOpNum() < synced {
		t.Fatalf("LastOpNum %d < %d synced before the kill", j.LastOpNum(), synced)
	}
	want := uint64(1)
	err = j.Replay(0, func(r *Record, _ Pos) error {
		if r.OpNum != want || !bytes.Equal(r.Data, killData(r.OpNum)) {
			return fmt.Errorf("record %d: %s", want, fmtRecord(r))
		}
		want++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("child synced %d, reopen found %d records in %d segments", synced, want-1, len(j.Segments()))
}

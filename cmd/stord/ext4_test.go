package main

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestE2EExt4OverNbdfuse puts a real filesystem on a volume: nbdfuse
// exposes the export as a file, losetup turns it into a block device,
// mkfs.ext4 and mount; files with known checksums are written, the
// filesystem is unmounted and checked (e2fsck -fn), stord is restarted, and
// the remounted files must be intact. Needs root, /dev/fuse and loop
// devices (there under CI=true; skipped elsewhere without them).
func TestE2EExt4OverNbdfuse(t *testing.T) {
	heavy(t)
	tools := map[string]string{}
	for _, name := range []string{"nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "e2fsck", "fstrim"} {
		tools[name] = needTool(t, name)
	}
	need := func(ok bool, what string) {
		t.Helper()
		if ok {
			return
		}
		if inCI() {
			t.Fatalf("%s (CI=true requires it)", what)
		}
		t.Skip(what)
	}
	need(os.Geteuid() == 0, "needs root for losetup and mount")
	_, err := os.Stat("/dev/fuse")
	need(err == nil, "no /dev/fuse")
	_, err = os.Stat("/dev/loop-control")
	need(err == nil, "no /dev/loop-control")

	d := startDaemon(t)
	d.createVolume("fs", "--size", "512M", "--partition-size", "128M")
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}

	loop := attachLoop(t, tools, d.url("fs"), filepath.Join(dir, "disk1"))
	mustRun(t, tools["mkfs.ext4"], "-q", "-F", "-E", "nodiscard", loop.dev)
	mustRun(t, tools["mount"], loop.dev, mnt)
	loop.mounted = mnt

	files := writeTree(t, mnt)
	// Delete one file and trim: TRIM reaches stord through loop and nbdfuse.
	if err := os.Remove(filepath.Join(mnt, "big.bin")); err != nil {
		t.Fatal(err)
	}
	delete(files, "big.bin")
	if r := runCmd(t, tools["fstrim"], "-v", mnt); r.err != nil {
		t.Logf("fstrim (not required): %v %s", r.err, r.stderr)
	} else {
		t.Logf("fstrim: %s", strings.TrimSpace(r.stdout))
	}
	syscall.Sync()
	checkTree(t, mnt, files)
	loop.detach(t)
	// A fresh look through a new attachment: fsck, then restart stord.
	loop = attachLoop(t, tools, d.url("fs"), filepath.Join(dir, "disk2"))
	fsck(t, tools, loop.dev)
	loop.detach(t)

	d.restart()
	loop = attachLoop(t, tools, d.url("fs"), filepath.Join(dir, "disk3"))
	fsck(t, tools, loop.dev)
	mustRun(t, tools["mount"], loop.dev, mnt)
	loop.mounted = mnt
	checkTree(t, mnt, files)
	// Write more after the restart, unmount, check again.
	more := writeTree(t, filepath.Join(mnt, "after"))
	syscall.Sync()
	checkTree(t, filepath.Join(mnt, "after"), more)
	loop.detach(t)
	loop = attachLoop(t, tools, d.url("fs"), filepath.Join(dir, "disk4"))
	fsck(t, tools, loop.dev)
	loop.detach(t)
}

// loopDisk is a volume attached as nbdfuse file + loop device (+ mount).
type loopDisk struct {
	tools   map[string]string
	file    string
	nbdfuse *exec.Cmd
	exited  chan struct{}
	dev     string
	mounted string
	done    bool
}

// attachLoop exposes url as file with nbdfuse and attaches a loop device
// to it. A cleanup detaches everything even if the test fails.
func attachLoop(t *testing.T, tools map[string]string, url, file string) *loopDisk {
	t.Helper()
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	l := &loopDisk{tools: tools, file: file, exited: make(chan struct{})}
	pidfile := file + ".pid"
	l.nbdfuse = exec.Command(tools["nbdfuse"], "-P", pidfile, file, url)
	out := &lockedBuffer{}
	l.nbdfuse.Stdout, l.nbdfuse.Stderr = out, out
	if err := l.nbdfuse.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		l.nbdfuse.Wait()
		close(l.exited)
	}()
	t.Cleanup(func() { l.detach(t) })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, err := os.ReadFile(pidfile); err == nil && len(b) > 0 {
			break
		}
		select {
		case <-l.exited:
			t.Fatalf("nbdfuse exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse not ready after 30s: %s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	l.dev = strings.TrimSpace(mustRun(t, tools["losetup"], "-f", "--show", file))
	return l
}

// detach unmounts, detaches the loop device and unmounts nbdfuse. It is
// idempotent and keeps going after errors so that nothing is left behind.
func (l *loopDisk) detach(t *testing.T) {
	t.Helper()
	if l.done {
		return
	}
	l.done = true
	if l.mounted != "" {
		if r := runCmd(t, l.tools["umount"], l.mounted); r.err != nil {
			t.Errorf("umount %s: %v %s", l.mounted, r.err, r.stderr)
			runCmd(t, l.tools["umount"], "-l", l.mounted)
		}
		l.mounted = ""
	}
	if l.dev != "" {
		if r := runCmd(t, l.tools["losetup"], "-d", l.dev); r.err != nil {
			t.Errorf("losetup -d %s: %v %s", l.dev, r.err, r.stderr)
		}
	}
	if r := runCmd(t, l.tools["fusermount3"], "-u", l.file); r.err != nil {
		t.Errorf("fusermount3 -u %s: %v %s", l.file, r.err, r.stderr)
	}
	select {
	case <-l.exited:
	case <-time.After(30 * time.Second):
		l.nbdfuse.Process.Kill()
		<-l.exited
		t.Errorf("nbdfuse did not exit after fusermount3 -u")
	}
}

// fsck runs a forced read-only check that must find nothing to fix.
func fsck(t *testing.T, tools map[string]string, dev string) {
	t.Helper()
	r := runCmd(t, tools["e2fsck"], "-fn", dev)
	if r.code != 0 {
		t.Fatalf("e2fsck -fn %s: exit %d\n%s%s", dev, r.code, r.stdout, r.stderr)
	}
}

// writeTree writes files of assorted sizes under dir and returns their
// sha256 by relative path.
func writeTree(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(len(dir)), 42))
	sums := map[string][32]byte{}
	put := func(rel string, n int) {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, n)
		for i := 0; i+8 <= n; i += 8 {
			v := rng.Uint64()
			for k := range 8 {
				b[i+k] = byte(v >> (8 * k))
			}
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[rel] = sha256.Sum256(b)
	}
	put("big.bin", 48<<20)
	put("medium.bin", 8<<20)
	for i := range 40 {
		put(fmt.Sprintf("d%d/f%d.bin", i%5, i), 1+rng.IntN(256<<10))
	}
	put("empty", 0)
	return sums
}

func checkTree(t *testing.T, dir string, sums map[string][32]byte) {
	t.Helper()
	for rel, want := range sums {
		b, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		if sha256.Sum256(b) != want {
			t.Errorf("%s: content differs", rel)
		}
	}
}

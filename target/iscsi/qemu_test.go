package iscsi

import (
	"bytes"
	"crypto/sha256"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// QEMU's libiscsi block driver (qemu-block-extra) against the server:
// qemu-io write/read/discard with pattern checks, then qemu-img convert of
// 64 MiB in and out with equal checksums and qemu-img compare.
func TestQemuIO(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	needTool(t, "qemu-io")
	needTool(t, "qemu-img")
	ts := startServer(t, Config{}, 64<<20)
	for _, name := range []string{"disk", "disk4k"} {
		url := ts.url(name)
		out := runTool(t, "qemu-io", "-f", "raw",
			"-c", "write -P 0x5a 1M 192k",
			"-c", "read -P 0x5a 1M 192k",
			"-c", "write -z 1M 64k",
			"-c", "read -P 0 1M 64k",
			"-c", "discard 1088k 64k",
			"-c", "read -P 0 1088k 64k",
			"-c", "read -P 0x5a 1152k 64k",
			"-c", "flush",
			url)
		if strings.Contains(out, "fail") || strings.Contains(out, "error") {
			t.Fatalf("%s: qemu-io:\n%s", name, out)
		}
	}
	dir := t.TempDir()
	in := filepath.Join(dir, "in.raw")
	data := make([]byte, 64<<20)
	rand.New(rand.NewSource(1)).Read(data[:32<<20]) // second half stays zero
	if err := os.WriteFile(in, data, 0o644); err != nil {
		t.Fatal(err)
	}
	url := ts.url("disk")
	runTool(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", in, url)
	outFile := filepath.Join(dir, "out.raw")
	runTool(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", url, outFile)
	got, err := os.ReadFile(outFile)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(data) || !bytes.Equal(got, data) {
		t.Fatal("qemu-img convert out differs from what went in")
	}
	runTool(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", in, url)
}

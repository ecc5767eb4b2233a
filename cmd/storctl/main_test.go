package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"stor.dev/stor/ctl/client/clienttest"
)

// TestMain lets the test binary play storctl: with STORCTL_TEST_MAIN=1 it
// runs main with its arguments, so tests see real exit codes and streams
// without building a second binary.
func TestMain(m *testing.M) {
	if os.Getenv("STORCTL_TEST_MAIN") == "1" {
		main()
		os.Exit(99) // main always exits
	}
	os.Exit(m.Run())
}

func TestBinary(t *testing.T) {
	srv, _ := clienttest.NewServer(t, nil)
	tests := []struct {
		args   []string
		code   int
		stdout string // substring
		stderr string // exact
	}{
		{[]string{"volume", "create", "vol0", "--size", "1G"}, 0, "iqn.2026-11.dev.stor:vol0", ""},
		{[]string{"volume", "list", "-o", "json"}, 0, `"name": "vol0"`, ""},
		{[]string{"volume", "create", "x", "--size", "banana"}, 2, "",
			"storctl: volume create: invalid size \"banana\": want a number with an optional K, M, G, T suffix (e.g. 10G)\n"},
		{[]string{"volume", "show", "nope"}, 1, "", "storctl: volume show: volume \"nope\": not found\n"},
		{[]string{"volume", "create", "vol0", "--size", "1G"}, 1, "", "storctl: volume create: volume \"vol0\": already exists\n"},
	}
	for _, tt := range tests {
		cmd := exec.Command(os.Args[0], tt.args...)
		cmd.Env = append(os.Environ(), "STORCTL_TEST_MAIN=1", "STOR_API="+srv.URL)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		name := "storctl " + strings.Join(tt.args, " ")
		if code != tt.code {
			t.Errorf("%s: exit %d, want %d (stderr %q)", name, code, tt.code, errb.String())
		}
		if !strings.Contains(out.String(), tt.stdout) {
			t.Errorf("%s: stdout %q lacks %q", name, out.String(), tt.stdout)
		}
		if errb.String() != tt.stderr {
			t.Errorf("%s: stderr %q, want %q", name, errb.String(), tt.stderr)
		}
	}
}

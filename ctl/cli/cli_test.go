package cli

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client/clienttest"
)

// env is a test's storctl: a real handler over the fake backend, holding
// vol0 (1 GiB) and busy (1 GiB, 2 connections).
type env struct {
	url  string
	vols *clienttest.Volumes
}

func newEnv(t *testing.T) *env {
	t.Helper()
	srv, vols := clienttest.NewServer(t, nil)
	for _, name := range []string{"vol0", "busy"} {
		if _, err := vols.CreateVolume(t.Context(), api.CreateVolume{Name: name, Size: 1 << 30}); err != nil {
			t.Fatal(err)
		}
	}
	vols.SetConnections("busy", 2)
	return &env{url: srv.URL, vols: vols}
}

// storctl runs the CLI in-process with --api pointing at the env.
func (e *env) storctl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(append([]string{"--api", e.url}, args...), &out, &errb, func(string) string { return "" })
	return code, out.String(), errb.String()
}

func TestCommands(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    []string // in stdout
		notWant []string // not in stdout
		json    any      // if set, stdout decodes into it
		check   func(t *testing.T, e *env, stdout string)
	}{
		{name: "status", args: []string{"status"}, want: []string{"Node:", "node-1", "Healthy:", "yes", "Roles:", "control, head, export", "Volumes:", "2"}},
		{name: "status/json", args: []string{"status", "-o", "json"}, json: &api.Status{}, want: []string{`"node": "node-1"`}},

		{name: "list", args: []string{"volume", "list"}, want: []string{
			"NAME  SIZE  BLOCK  PARTITIONS  REPLICAS  ALLOCATED  CONNECTIONS  CREATED",
			"busy  1GiB  512    1           1         0B         2            2026-11-25T12:00:01Z",
			"vol0  1GiB  512    1           1         0B         0            2026-11-25T12:00:00Z",
		}},
		{name: "list/json", args: []string{"--output", "json", "volume", "ls"}, check: func(t *testing.T, e *env, out string) {
			var vols []api.Volume
			if err := json.Unmarshal([]byte(out), &vols); err != nil || len(vols) != 2 || vols[0].Name != "busy" {
				t.Errorf("list json = %q (%v)", out, err)
			}
		}},

		{name: "create", args: []string{"volume", "create", "db1", "--size", "10G", "--block-size", "4096", "--partition-size", "256M", "--replicas", "2"},
			want: []string{"Name:", "db1", "10GiB (10737418240 bytes)", "Block size:", "4096", "40 of 256MiB", "Replicas:", "2", "nbd://127.0.0.1:10809/db1", "iqn.2026-11.dev.stor:db1"},
			check: func(t *testing.T, e *env, _ string) {
				if e.vols.Len() != 3 {
					t.Errorf("%d volumes after create", e.vols.Len())
				}
			}},
		{name: "create/json", args: []string{"volume", "create", "db1", "--size", "1.5G", "-o", "json"}, check: func(t *testing.T, e *env, out string) {
			var v api.Volume
			if err := json.Unmarshal([]byte(out), &v); err != nil || v.Name != "db1" || v.Size != 3<<29 || v.BlockSize != 512 {
				t.Errorf("create json = %q (%v)", out, err)
			}
		}},

		{name: "show", args: []string{"volume", "show", "vol0"}, want: []string{
			"Name:           vol0", "ID:             vol-000001", "Size:           1GiB (1073741824 bytes)",
			"Partitions:     1 of 1GiB", "Connections:    0", "Created:        2026-11-25T12:00:00Z",
			"NBD:            nbd://127.0.0.1:10809/vol0", "iSCSI IQN:      iqn.2026-11.dev.stor:vol0",
			"iSCSI portals:  127.0.0.1:3260", "iSCSI CHAP:     off",
		}},
		{name: "show/json", args: []string{"volume", "show", "vol0", "-o=json"}, json: &api.Volume{}, want: []string{`"portals": [`}},

		{name: "resize", args: []string{"volume", "resize", "vol0", "--size", "2G"}, want: []string{"2GiB (2147483648 bytes)", "2 of 1GiB"}},
		{name: "resize/delta", args: []string{"volume", "resize", "vol0", "--size", "+512M"}, want: []string{"1.5GiB"}},
		{name: "resize/same", args: []string{"volume", "resize", "vol0", "--size", "1G"}, want: []string{"1GiB"}},
		{name: "resize/json", args: []string{"-o", "json", "volume", "resize", "vol0", "--size", "4G"}, json: &api.Volume{}, want: []string{`"size": 4294967296`}},

		{name: "delete", args: []string{"volume", "delete", "vol0"}, want: []string{"deleted volume vol0"}, check: func(t *testing.T, e *env, _ string) {
			if e.vols.Len() != 1 {
				t.Errorf("%d volumes after delete", e.vols.Len())
			}
		}},
		{name: "delete/force", args: []string{"volume", "rm", "busy", "--force"}, want: []string{"deleted volume busy"}},
		{name: "delete/json", args: []string{"volume", "delete", "vol0", "-o", "json"}, want: []string{`"name": "vol0"`, `"deleted": true`}},

		{name: "chap", args: []string{"volume", "chap", "vol0", "--user", "alice", "--secret", "0123456789abcdef"},
			want: []string{"CHAP on for volume vol0: user alice"}, notWant: []string{"0123456789abcdef"},
			check: func(t *testing.T, e *env, _ string) {
				if c, _ := e.vols.CHAP("vol0"); c.Secret != "0123456789abcdef" {
					t.Errorf("chap = %+v", c)
				}
			}},
		{name: "chap/mutual-json", args: []string{"volume", "chap", "vol0", "--user", "alice", "--secret", "0123456789abcdef",
			"--mutual-user", "tgt", "--mutual-secret", "fedcba9876543210", "-o", "json"},
			want: []string{`"chap": true`, `"mutual_user": "tgt"`}, notWant: []string{"0123456789abcdef", "fedcba9876543210"}},
		{name: "chap/disable", args: []string{"volume", "chap", "vol0", "--disable"}, want: []string{"CHAP off for volume vol0"}},

		{name: "help/volume", args: []string{"volume"}, want: []string{"Usage:", "create", "resize"}},
		{name: "help/create", args: []string{"volume", "create", "--help"}, want: []string{"--block-size", "--partition-size", "--replicas"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			code, out, errs := e.storctl(t, tt.args...)
			if code != 0 || errs != "" {
				t.Fatalf("storctl %s = %d, stderr %q", strings.Join(tt.args, " "), code, errs)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("stdout lacks %q:\n%s", w, out)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(out, w) {
					t.Errorf("stdout has %q:\n%s", w, out)
				}
			}
			if tt.json != nil {
				if err := json.Unmarshal([]byte(out), tt.json); err != nil {
					t.Errorf("stdout is not JSON: %v\n%s", err, out)
				}
			}
			if tt.check != nil {
				tt.check(t, e, out)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		code int
		line string // the exact stderr line, or a prefix if it ends in "..."
	}{
		{"bad-size", []string{"volume", "create", "x", "--size", "banana"}, 2,
			`storctl: volume create: invalid size "banana": want a number with an optional K, M, G, T suffix (e.g. 10G)`},
		{"zero-size", []string{"volume", "create", "x", "--size", "0"}, 2, `storctl: volume create: invalid size "0": want more than 0`},
		{"empty-size", []string{"volume", "create", "x", "--size="}, 2, `storctl: volume create: missing --size (e.g. --size 10G)`},
		{"no-size", []string{"volume", "create", "x"}, 2, `storctl: volume create: missing --size (e.g. --size 10G)`},
		{"missing-name", []string{"volume", "create", "--size", "1G"}, 2, `storctl: volume create: missing volume NAME`},
		{"two-names", []string{"volume", "show", "a", "b"}, 2, `storctl: volume show: want one volume NAME, got 2 arguments: a b`},
		{"bad-name", []string{"volume", "create", "Bad_Name", "--size", "1G"}, 2,
			`storctl: volume create: volume name "Bad_Name": use 1-63 of a-z 0-9 . _ - starting with a letter or digit`},
		{"bad-block-size", []string{"volume", "create", "x", "--size", "1G", "--block-size", "1024"}, 2,
			`storctl: volume create: invalid block size "1024": want 512 or 4096`},
		{"bad-partition-size", []string{"volume", "create", "x", "--size", "1G", "--partition-size", "lots"}, 2,
			`storctl: volume create: invalid partition size "lots": want a number...`},
		{"bad-replicas", []string{"volume", "create", "x", "--size", "1G", "--replicas", "4"}, 2, `storctl: volume create: invalid --replicas 4: want 1, 2 or 3`},
		{"replicas-not-number", []string{"volume", "create", "x", "--size", "1G", "--replicas", "two"}, 2,
			`storctl: volume create: invalid value "two" for --replicas: invalid syntax`},
		{"unknown-flag", []string{"volume", "create", "x", "--sise", "1G"}, 2, `storctl: volume create: unknown flag: --sise`},
		{"unknown-command", []string{"volum", "list"}, 2, `storctl: unknown command "volum" for "storctl"; did you mean "volume"?`},
		{"unknown-subcommand", []string{"volume", "grow"}, 2, `storctl: volume: unknown command "grow" (want one of chap, create, delete, list, rebuild-status, resize, show)`},
		{"list-arg", []string{"volume", "list", "x"}, 2, `storctl: volume list: unexpected argument "x"`},
		{"bad-output", []string{"-o", "yaml", "status"}, 2, `storctl: status: invalid --output "yaml": want table or json`},
		{"bad-api", []string{"--api", "ftp://x", "status"}, 2, `storctl: status: invalid API URL "ftp://x": want http://HOST:PORT`},
		{"bad-timeout", []string{"--timeout", "0s", "status"}, 2, `storctl: status: invalid --timeout 0s: want more than 0`},
		{"resize-no-size", []string{"volume", "resize", "vol0"}, 2, `storctl: volume resize: missing --size (e.g. --size 20G or --size +5G)`},
		{"chap-no-secret", []string{"volume", "chap", "vol0", "--user", "u"}, 2, `storctl: volume chap: want --user and --secret (or --disable)`},
		{"chap-secret-twice", []string{"volume", "chap", "vol0", "--user", "u", "--secret", "x", "--secret-file", "/nonexistent"}, 2,
			`storctl: volume chap: give --secret or --secret-file, not both`},
		{"chap-secret-file-missing", []string{"volume", "chap", "vol0", "--user", "u", "--secret-file", "/nonexistent/s"}, 2,
			`storctl: volume chap: --secret-file: open /nonexistent/s: no such file or directory`},
		{"chap-half-mutual", []string{"volume", "chap", "vol0", "--user", "u", "--secret", "0123456789abcdef", "--mutual-user", "t"}, 2,
			`storctl: volume chap: want both --mutual-user and --mutual-secret, or neither`},

		// The server refuses: exit 1, its message.
		{"unknown-volume", []string{"volume", "show", "nope"}, 1, `storctl: volume show: volume "nope": not found`},
		{"unknown-volume-delete", []string{"volume", "delete", "nope"}, 1, `storctl: volume delete: volume "nope": not found`},
		{"unknown-volume-resize", []string{"volume", "resize", "nope", "--size", "2G"}, 1, `storctl: volume resize: volume "nope": not found`},
		{"duplicate", []string{"volume", "create", "vol0", "--size", "1G"}, 1, `storctl: volume create: volume "vol0": already exists`},
		{"server-invalid", []string{"volume", "create", "x", "--size", "1000"}, 1,
			`storctl: volume create: invalid argument: size 1000 is not a multiple of the block size 512`},
		{"shrink", []string{"volume", "resize", "vol0", "--size", "512M"}, 1, `storctl: volume resize: volume "vol0": cannot shrink from 1GiB to 512MiB (grow only)`},
		{"in-use", []string{"volume", "delete", "busy"}, 1, `storctl: volume delete: volume "busy" has 2 connections (use force): in use`},
		{"chap-short-secret", []string{"volume", "chap", "vol0", "--user", "u", "--secret", "short"}, 1,
			`storctl: volume chap: invalid argument: CHAP secret for user "u": want 12-255 printable ASCII characters`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			code, out, errs := e.storctl(t, tt.args...)
			if code != tt.code {
				t.Errorf("exit %d, want %d", code, tt.code)
			}
			if out != "" {
				t.Errorf("stdout %q, want nothing", out)
			}
			checkLine(t, errs, tt.line)
		})
	}
}

func checkLine(t *testing.T, stderr, want string) {
	t.Helper()
	if strings.Count(stderr, "\n") != 1 || !strings.HasSuffix(stderr, "\n") {
		t.Fatalf("stderr %q, want exactly one line", stderr)
	}
	got := strings.TrimSuffix(stderr, "\n")
	if prefix, ok := strings.CutSuffix(want, "..."); ok {
		if !strings.HasPrefix(got, prefix) {
			t.Errorf("stderr %q, want prefix %q", got, prefix)
		}
	} else if got != want {
		t.Errorf("stderr\n got %q\nwant %q", got, want)
	}
}

func TestCHAPSecretFile(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	sf, mf := filepath.Join(dir, "s"), filepath.Join(dir, "m")
	os.WriteFile(sf, []byte("0123456789abcdef\r\nignored\n"), 0o600)
	os.WriteFile(mf, []byte("fedcba9876543210"), 0o600)
	code, out, errs := e.storctl(t, "volume", "chap", "vol0", "--user", "u", "--secret-file", sf, "--mutual-user", "t", "--mutual-secret-file", mf)
	if code != 0 || strings.Contains(out, "0123456789abcdef") {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errs)
	}
	if c, _ := e.vols.CHAP("vol0"); c.Secret != "0123456789abcdef" || c.MutualSecret != "fedcba9876543210" {
		t.Errorf("chap = %+v", c)
	}
}

func TestUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	var out, errb bytes.Buffer
	code := run([]string{"status"}, &out, &errb, func(k string) string {
		if k == "STOR_API" {
			return "http://" + addr
		}
		return ""
	})
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	checkLine(t, errb.String(), "storctl: status: cannot reach the stor API at http://"+addr+"...")
	if !strings.Contains(errb.String(), "connection refused") {
		t.Errorf("stderr %q does not say why", errb.String())
	}
}

// TestEnvAPI: $STOR_API is used without --api, and --api wins over it.
// TestTimeout: a server that never answers is reported as slow, within
// --timeout.
func TestTimeout(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
	}))
	defer srv.Close()
	var out, errb bytes.Buffer
	code := run([]string{"--api", srv.URL, "--timeout", "50ms", "status"}, &out, &errb, func(string) string { return "" })
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	checkLine(t, errb.String(), "storctl: status: no answer from the stor API at "+srv.URL+" within 50ms (set --timeout)")
}

func TestEnvAPI(t *testing.T) {
	e := newEnv(t)
	var out, errb bytes.Buffer
	getenv := func(k string) string {
		if k == "STOR_API" {
			return e.url
		}
		return ""
	}
	if code := run([]string{"volume", "show", "vol0"}, &out, &errb, getenv); code != 0 || !strings.Contains(out.String(), "vol0") {
		t.Fatalf("with $STOR_API: exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
	}
	out.Reset()
	errb.Reset()
	if code := run([]string{"--api", "http://127.0.0.1:1", "status"}, &out, &errb, getenv); code != 1 ||
		!strings.Contains(errb.String(), "http://127.0.0.1:1") {
		t.Fatalf("--api over $STOR_API: exit %d, stderr %q", code, errb.String())
	}
}

func TestNoCompletionCommand(t *testing.T) {
	e := newEnv(t)
	code, out, _ := e.storctl(t, "--help")
	if code != 0 || strings.Contains(out, "completion") {
		t.Errorf("--help: exit %d, mentions completion:\n%s", code, out)
	}
	code, _, errs := e.storctl(t, "completion", "bash")
	if code != 2 {
		t.Errorf("completion: exit %d, stderr %q", code, errs)
	}
}

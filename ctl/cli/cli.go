// Package cli is storctl, the command line of stor's HTTP/JSON API:
//
//	storctl [--api URL] [-o table|json] [--timeout D] COMMAND
//
//	volume create NAME --size SIZE [--block-size 512|4096] [--partition-size SIZE] [--replicas N]
//	volume list
//	volume show NAME
//	volume resize NAME --size SIZE|+DELTA     grow only
//	volume delete NAME [--force]              --force: even while connected
//	volume chap NAME --user U --secret S [--mutual-user U --mutual-secret S] | --disable
//	                 (--secret-file F, --mutual-secret-file F read a secret from a file)
//	volume rebuild-status NAME [--wait D]     replicas' rebuild progress (cluster.go)
//	status
//	cluster status                            leader, voters, term, commit index, health (cluster.go)
//	cluster configure [--lease-timeout D] [--suspect-timeout D] [--min-health N] [--default-replicas N] ...
//	node list | show ID | drain ID | undrain ID | remove ID
//	grant list [--node ID] [--volume NAME]
//
// On a cluster, volume show also prints the placement of every partition.
//
// Rules:
//   - The API is --api, else $STOR_API, else http://127.0.0.1:7480.
//   - Sizes are api.ParseSize's (512, 4096, 10M, 1G, 1GiB, 2T, 1.5G); tables
//     print them with api.FormatSize. --output json prints the API's objects
//     as they come, indented, for scripts.
//   - Every failure is exactly one line on stderr, "storctl: COMMAND: message",
//     and an exit code: 2 when the command line is wrong (unknown command or
//     flag, missing NAME, a bad size, name or block size: nothing was sent),
//     1 when the operation failed (the server refused it, the volume does not
//     exist, the API is unreachable). Usage text is printed only on --help.
//   - CHAP secrets are sent, never printed.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
)

// DefaultAPI is the API URL when neither --api nor $STOR_API is set.
const DefaultAPI = "http://127.0.0.1:7480"

// Exit codes.
const (
	ExitOK    = 0
	ExitError = 1 // the operation failed
	ExitUsage = 2 // the command line is wrong
)

// Main runs storctl with args (without the program name), writing results
// to stdout and errors to stderr, and returns the exit code. It reads
// $STOR_API from the environment.
func Main(args []string, stdout, stderr io.Writer) int {
	return run(args, stdout, stderr, os.Getenv)
}

// usageError marks a wrong command line (exit 2).
type usageError struct{ err error }

func (e *usageError) Error() string { return e.err.Error() }
func (e *usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Errorf(format, args...)}
}

// opError marks an error returned by a command's RunE (exit 1 unless it is
// a usageError). Errors without it come from cobra's parsing (exit 2).
type opError struct{ err error }

func (e *opError) Error() string { return e.err.Error() }
func (e *opError) Unwrap() error { return e.err }

func run(args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	a := &app{stdout: stdout, getenv: getenv}
	root := a.rootCommand()
	if args == nil {
		args = []string{} // cobra reads os.Args for nil
	}
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteC()
	if err == nil {
		return ExitOK
	}
	where := ""
	if cmd != nil {
		where = strings.TrimSpace(strings.TrimPrefix(cmd.CommandPath(), root.Name()))
	}
	if where != "" {
		where += ": "
	}
	fmt.Fprintf(stderr, "storctl: %s%s\n", where, oneLine(a.message(err)))
	var ue *usageError
	var oe *opError
	switch {
	case errors.As(err, &ue):
		return ExitUsage
	case errors.As(err, &oe):
		return ExitError
	default:
		return ExitUsage // cobra's own: unknown command or flag, bad flag value
	}
}

// message phrases err for a person.
func (a *app) message(err error) string {
	var inv *pflag.InvalidValueError
	switch {
	case errors.Is(err, client.ErrUnreachable):
		return strings.TrimPrefix(err.Error(), "client: ") + " (is stord running? set --api or $STOR_API)"
	case errors.As(err, &inv):
		cause := inv.Unwrap()
		var ne *strconv.NumError
		if errors.As(cause, &ne) {
			cause = ne.Err
		}
		return fmt.Sprintf("invalid value %q for --%s: %v", inv.GetValue(), inv.GetFlag().Name, cause)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Sprintf("no answer from the stor API at %s within %v (set --timeout)", a.apiURL, a.timeout)
	}
	msg := err.Error()
	// cobra: `unknown command "x" for "storctl"\n\nDid you mean this?\n\ty\n`
	if head, sugg, ok := strings.Cut(msg, "\n\nDid you mean this?\n"); ok {
		var names []string
		for _, s := range strings.Fields(sugg) {
			names = append(names, strconv.Quote(s))
		}
		msg = head + "; did you mean " + strings.Join(names, " or ") + "?"
	}
	return msg
}

func oneLine(s string) string {
	s = strings.TrimSpace(s)
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

type app struct {
	stdout io.Writer
	getenv func(string) string

	// flags
	apiURL  string
	output  string
	timeout time.Duration

	c *client.Client // set by setup
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "storctl",
		Short: "Manage the volumes of a stor cluster",
		Long: `storctl manages the volumes of a stor cluster through its HTTP API.

The API is --api URL, else $STOR_API, else ` + DefaultAPI + `.
Sizes accept 512, 4096, 10M, 1G, 1GiB, 2T, 1.5G (binary units).
Exit codes: 0 ok, 1 the operation failed, 2 the command line is wrong.`,
		SilenceUsage:      true,
		SilenceErrors:     true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		PersistentPreRunE: a.setup,
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVar(&a.apiURL, "api", "", "API URL (default $STOR_API, else "+DefaultAPI+")")
	pf.StringVarP(&a.output, "output", "o", "table", "output format: table or json")
	pf.DurationVar(&a.timeout, "timeout", 30*time.Second, "give up on the API after this long")

	vol := &cobra.Command{
		Use:   "volume",
		Short: "Create, list, show, resize and delete volumes",
		Args:  unknownSubcommand,
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	vol.AddCommand(a.createCommand(), a.listCommand(), a.showCommand(), a.resizeCommand(), a.deleteCommand(), a.chapCommand(), a.rebuildStatusCommand())
	root.AddCommand(vol, a.statusCommand())
	root.AddCommand(a.clusterCommands()...)
	return root
}

// setup checks the global flags and builds the client.
func (a *app) setup(cmd *cobra.Command, _ []string) error {
	if a.output != "table" && a.output != "json" {
		return usagef("invalid --output %q: want table or json", a.output)
	}
	if a.timeout <= 0 {
		return usagef("invalid --timeout %v: want more than 0", a.timeout)
	}
	if a.apiURL == "" {
		a.apiURL = a.getenv("STOR_API")
	}
	if a.apiURL == "" {
		a.apiURL = DefaultAPI
	}
	// The deadline is the context's (runE), so that a slow server is
	// reported as such and not as unreachable.
	a.c = client.New(a.apiURL, &http.Client{})
	u, err := url.Parse(a.c.URL())
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return usagef("invalid API URL %q: want http://HOST:PORT", a.apiURL)
	}
	a.apiURL = a.c.URL()
	return nil
}

// runE adapts a command body: it gets a context bounded by --timeout and
// its errors are marked as operation errors.
func (a *app) runE(f func(ctx context.Context, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		ctx, cancel := context.WithTimeout(cmd.Context(), a.timeout)
		defer cancel()
		if err := f(ctx, args); err != nil {
			return &opError{err}
		}
		return nil
	}
}

func unknownSubcommand(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	var names []string
	for _, c := range cmd.Commands() {
		if c.IsAvailableCommand() {
			names = append(names, c.Name())
		}
	}
	return usagef("unknown command %q (want one of %s)", args[0], strings.Join(names, ", "))
}

// oneName accepts exactly one volume NAME argument, checked by api.CheckName.
func oneName(_ *cobra.Command, args []string) error {
	switch {
	case len(args) == 0:
		return usagef("missing volume NAME")
	case len(args) > 1:
		return usagef("want one volume NAME, got %d arguments: %s", len(args), strings.Join(args, " "))
	}
	if err := api.CheckName(args[0]); err != nil {
		return &usageError{errors.New(strings.TrimPrefix(err.Error(), api.ErrInvalid.Error()+": "))}
	}
	return nil
}

func noArgs(_ *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("unexpected argument %q", args[0])
	}
	return nil
}

// parseSize parses a size flag; what names it in errors ("size").
func parseSize(what, s string) (int64, error) {
	if strings.TrimSpace(s) == "" {
		return 0, usagef("invalid %s %q: want a number with an optional K, M, G, T suffix (e.g. 10G)", what, s)
	}
	n, err := api.ParseSize(s)
	if err != nil {
		msg := strings.TrimPrefix(err.Error(), api.ErrInvalid.Error()+": ")
		if rest, ok := strings.CutPrefix(msg, "size "); ok {
			return 0, usagef("invalid %s %s", what, rest)
		}
		return 0, usagef("invalid %s %q: %s", what, s, msg)
	}
	if n <= 0 {
		return 0, usagef("invalid %s %q: want more than 0", what, s)
	}
	return n, nil
}

func (a *app) createCommand() *cobra.Command {
	var size, blockSize, partSize string
	var replicas int
	cmd := &cobra.Command{
		Use:   "create NAME --size SIZE",
		Short: "Create a volume",
		Long: `Create a thin volume of SIZE bytes.

NAME is 1-63 of a-z 0-9 . _ - starting with a letter or digit; it is the NBD
export name and the last part of the iSCSI IQN.`,
		Example: "  storctl volume create db1 --size 10G\n  storctl volume create logs --size 1T --block-size 4096 --replicas 3",
		Args:    oneName,
	}
	f := cmd.Flags()
	f.StringVar(&size, "size", "", "volume size, e.g. 10G (required)")
	f.StringVar(&blockSize, "block-size", "", "logical block size: 512 or 4096 (default 512)")
	f.StringVar(&partSize, "partition-size", "", "partition size, the unit of replication (default 1G)")
	f.IntVar(&replicas, "replicas", 0, "replica count 1-3 (default: the cluster's)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		req := api.CreateVolume{Name: args[0]}
		if size == "" {
			return usagef("missing --size (e.g. --size 10G)")
		}
		var err error
		if req.Size, err = parseSize("size", size); err != nil {
			return err
		}
		if blockSize != "" {
			bs, err := parseSize("block size", blockSize)
			if err != nil {
				return err
			}
			if bs != 512 && bs != 4096 {
				return usagef("invalid block size %q: want 512 or 4096", blockSize)
			}
			req.BlockSize = int(bs)
		}
		if partSize != "" {
			if req.PartitionSize, err = parseSize("partition size", partSize); err != nil {
				return err
			}
		}
		if cmd.Flags().Changed("replicas") {
			if replicas < 1 || replicas > 3 {
				return usagef("invalid --replicas %d: want 1, 2 or 3", replicas)
			}
			req.Replicas = replicas
		}
		return a.runE(func(ctx context.Context, _ []string) error {
			v, err := a.c.CreateVolume(ctx, req)
			if err != nil {
				return err
			}
			return a.printVolume(v)
		})(cmd, args)
	}
	return cmd
}

func (a *app) listCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List volumes",
		Args:    noArgs,
	}
	cmd.RunE = a.runE(func(ctx context.Context, _ []string) error {
		vols, err := a.c.Volumes(ctx)
		if err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(vols)
		}
		tw := a.table()
		fmt.Fprintln(tw, "NAME\tSIZE\tBLOCK\tPARTITIONS\tREPLICAS\tALLOCATED\tCONNECTIONS\tCREATED")
		for _, v := range vols {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%d\t%s\n", v.Name, api.FormatSize(v.Size), v.BlockSize,
				v.Partitions, v.Replicas, api.FormatSize(v.Allocated), v.Connections, formatTime(v.Created))
		}
		return tw.Flush()
	})
	return cmd
}

func (a *app) showCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "show NAME",
		Short: "Show a volume and how to attach it",
		Args:  oneName,
	}
	cmd.RunE = a.runE(func(ctx context.Context, args []string) error {
		v, err := a.c.Volume(ctx, args[0])
		if err != nil {
			return err
		}
		return a.showPlaced(ctx, v)
	})
	return cmd
}

func (a *app) resizeCommand() *cobra.Command {
	var size string
	cmd := &cobra.Command{
		Use:   "resize NAME --size SIZE|+DELTA",
		Short: "Grow a volume",
		Long: `Grow a volume to SIZE, or by DELTA with a leading +. Volumes never shrink.
Clients see the new size when they reconnect.`,
		Example: "  storctl volume resize db1 --size 20G\n  storctl volume resize db1 --size +5G",
		Args:    oneName,
	}
	cmd.Flags().StringVar(&size, "size", "", "new size, or +DELTA to grow by (required)")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if size == "" {
			return usagef("missing --size (e.g. --size 20G or --size +5G)")
		}
		delta, grow := strings.CutPrefix(strings.TrimSpace(size), "+")
		n, err := parseSize("size", delta)
		if err != nil {
			return err
		}
		return a.runE(func(ctx context.Context, args []string) error {
			v, err := a.c.Volume(ctx, args[0])
			if err != nil {
				return err
			}
			target := n
			if grow {
				if v.Size > api.MaxVolumeSize-n {
					return fmt.Errorf("volume %q: %s + %s is more than the maximum %s", v.Name,
						api.FormatSize(v.Size), api.FormatSize(n), api.FormatSize(api.MaxVolumeSize))
				}
				target = v.Size + n
			}
			if target < v.Size {
				return fmt.Errorf("volume %q: cannot shrink from %s to %s (grow only)", v.Name,
					api.FormatSize(v.Size), api.FormatSize(target))
			}
			if v, err = a.c.ResizeVolume(ctx, v.Name, target); err != nil {
				return err
			}
			return a.printVolume(v)
		})(cmd, args)
	}
	return cmd
}

func (a *app) deleteCommand() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:     "delete NAME",
		Aliases: []string{"rm"},
		Short:   "Delete a volume and its data",
		Long:    "Delete a volume and its data. A volume with open connections is refused unless --force.",
		Args:    oneName,
	}
	cmd.Flags().BoolVar(&force, "force", false, "delete even while initiators are connected")
	cmd.RunE = a.runE(func(ctx context.Context, args []string) error {
		if err := a.c.DeleteVolume(ctx, args[0], force); err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(struct {
				Name    string `json:"name"`
				Deleted bool   `json:"deleted"`
			}{args[0], true})
		}
		_, err := fmt.Fprintf(a.stdout, "deleted volume %s\n", args[0])
		return err
	})
	return cmd
}

func (a *app) chapCommand() *cobra.Command {
	var req api.SetCHAP
	var disable bool
	cmd := &cobra.Command{
		Use:   "chap NAME --user U --secret S [--mutual-user U --mutual-secret S] | --disable",
		Short: "Set or turn off iSCSI CHAP for a volume",
		Long: `Set the iSCSI CHAP credentials a volume's target asks initiators for, and
optionally the mutual credentials it answers with. Secrets are 12-255
printable characters; they are sent to the server and never printed.`,
		Args: oneName,
	}
	f := cmd.Flags()
	f.StringVar(&req.User, "user", "", "CHAP user name the initiator logs in with")
	f.StringVar(&req.Secret, "secret", "", "CHAP secret of that user")
	f.StringVar(&req.MutualUser, "mutual-user", "", "user name the target answers with (mutual CHAP)")
	f.StringVar(&req.MutualSecret, "mutual-secret", "", "secret the target answers with (mutual CHAP)")
	f.BoolVar(&disable, "disable", false, "turn CHAP off")
	var secretFile, mutualSecretFile string
	f.StringVar(&secretFile, "secret-file", "", "read --secret from the first line of this file (keeps it out of ps and shell history)")
	f.StringVar(&mutualSecretFile, "mutual-secret-file", "", "read --mutual-secret from the first line of this file")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if err := readSecret(&req.Secret, "secret", secretFile); err != nil {
			return err
		}
		if err := readSecret(&req.MutualSecret, "mutual-secret", mutualSecretFile); err != nil {
			return err
		}
		switch {
		case disable && (req.User != "" || req.Secret != "" || req.MutualUser != "" || req.MutualSecret != ""):
			return usagef("--disable takes no credentials")
		case disable:
			req = api.SetCHAP{}
		case req.User == "" || req.Secret == "":
			return usagef("want --user and --secret (or --disable)")
		case (req.MutualUser == "") != (req.MutualSecret == ""):
			return usagef("want both --mutual-user and --mutual-secret, or neither")
		}
		return a.runE(func(ctx context.Context, args []string) error {
			if err := a.c.SetCHAP(ctx, args[0], req); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(struct {
					Name       string `json:"name"`
					CHAP       bool   `json:"chap"`
					User       string `json:"user,omitempty"`
					MutualUser string `json:"mutual_user,omitempty"`
				}{args[0], !disable, req.User, req.MutualUser})
			}
			var err error
			switch {
			case disable:
				_, err = fmt.Fprintf(a.stdout, "CHAP off for volume %s\n", args[0])
			case req.MutualUser != "":
				_, err = fmt.Fprintf(a.stdout, "CHAP on for volume %s: user %s, mutual user %s\n", args[0], req.User, req.MutualUser)
			default:
				_, err = fmt.Fprintf(a.stdout, "CHAP on for volume %s: user %s\n", args[0], req.User)
			}
			return err
		})(cmd, args)
	}
	return cmd
}

// readSecret sets *secret from the first line of file, if file is set; the
// flag --NAME and --NAME-file exclude each other.
func readSecret(secret *string, name, file string) error {
	if file == "" {
		return nil
	}
	if *secret != "" {
		return usagef("give --%s or --%s-file, not both", name, name)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return usagef("--%s-file: %v", name, err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	*secret = strings.TrimRight(line, "\r")
	if *secret == "" {
		return usagef("--%s-file %s: first line is empty", name, file)
	}
	return nil
}

func (a *app) statusCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the node's status",
		Args:  noArgs,
	}
	cmd.RunE = a.runE(func(ctx context.Context, _ []string) error {
		st, err := a.c.Status(ctx)
		if err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(st)
		}
		tw := a.table()
		row(tw, "Node", string(st.Node))
		row(tw, "Version", st.Version)
		row(tw, "Roles", strings.Join(st.Roles, ", "))
		row(tw, "Healthy", yesNo(st.Healthy))
		row(tw, "Uptime", st.Uptime)
		row(tw, "Volumes", strconv.Itoa(st.Volumes))
		row(tw, "Connections", strconv.Itoa(st.Connected))
		row(tw, "API", st.API)
		row(tw, "NBD", st.NBD)
		row(tw, "iSCSI", st.ISCSI)
		row(tw, "Data dir", st.DataDir)
		return tw.Flush()
	})
	return cmd
}

func (a *app) printVolume(v api.Volume) error {
	if a.output == "json" {
		return a.printJSON(v)
	}
	tw := a.table()
	row(tw, "Name", v.Name)
	row(tw, "ID", string(v.ID))
	row(tw, "Size", fmt.Sprintf("%s (%d bytes)", api.FormatSize(v.Size), v.Size))
	row(tw, "Block size", strconv.Itoa(v.BlockSize))
	row(tw, "Partitions", fmt.Sprintf("%d of %s", v.Partitions, api.FormatSize(v.PartitionSize)))
	row(tw, "Replicas", strconv.Itoa(v.Replicas))
	row(tw, "Allocated", api.FormatSize(v.Allocated))
	row(tw, "Connections", strconv.Itoa(v.Connections))
	row(tw, "Created", formatTime(v.Created))
	row(tw, "NBD", v.NBD)
	row(tw, "iSCSI IQN", v.IQN)
	row(tw, "iSCSI portals", strings.Join(v.Portals, ", "))
	if len(v.Portals) > 0 || v.CHAP {
		row(tw, "iSCSI CHAP", onOff(v.CHAP))
	}
	return tw.Flush()
}

// row writes "key:\tvalue", skipping empty values.
func row(w io.Writer, key, value string) {
	if value != "" {
		fmt.Fprintf(w, "%s:\t%s\n", key, value)
	}
}

func (a *app) table() *tabwriter.Writer { return tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0) }

func (a *app) printJSON(v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = a.stdout.Write(append(b, '\n'))
	return err
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

package cli

// Cluster commands:
//
//	cluster status                          the asked node's view: leader, voters, term, commit index, health
//	cluster configure [--lease-timeout D] [--suspect-timeout D] [--min-health N]
//	                  [--default-replicas N] [--default-partition-size SIZE]
//	                                        change the named settings, keep the rest
//	node list
//	node show ID
//	node drain ID | undrain ID | remove ID  remove: leaves the map and the raft group
//	grant list [--node ID] [--volume NAME]
//
// They speak ctl/control's cluster routes; against `stord dev` (no cluster
// routes) they fail with the server's "not found".

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"stor.dev/stor/ctl/api"
	"stor.dev/stor/ctl/client"
	"stor.dev/stor/ctl/cluster"
)

// clusterCommands returns the top-level cluster, node and grant commands.
func (a *app) clusterCommands() []*cobra.Command {
	group := func(use, short string, subs ...*cobra.Command) *cobra.Command {
		c := &cobra.Command{
			Use:   use,
			Short: short,
			Args:  unknownSubcommand,
			RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
		}
		c.AddCommand(subs...)
		return c
	}
	return []*cobra.Command{
		group("cluster", "Show and configure the control plane", a.clusterStatusCommand(), a.clusterConfigureCommand()),
		group("node", "List, show, drain, undrain and remove nodes",
			a.nodeListCommand(), a.nodeShowCommand(),
			a.nodeChangeCommand("drain", "Drain a node: it sheds its primaries and gets no new replicas", (*client.Client).DrainNode),
			a.nodeChangeCommand("undrain", "Undrain a node: it takes replicas again", (*client.Client).UndrainNode),
			a.nodeRemoveCommand()),
		group("grant", "List the partition roles nodes hold", a.grantListCommand()),
	}
}

// oneNodeID accepts exactly one node ID argument.
func oneNodeID(_ *cobra.Command, args []string) error {
	switch {
	case len(args) == 0:
		return usagef("missing node ID")
	case len(args) > 1:
		return usagef("want one node ID, got %d arguments: %s", len(args), strings.Join(args, " "))
	case strings.TrimSpace(args[0]) == "" || strings.ContainsAny(args[0], "/?# \t"):
		return usagef("invalid node ID %q", args[0])
	}
	return nil
}

func (a *app) clusterStatusCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the leader, voters, term, commit index and health, as the node asked sees them",
		Args:  noArgs,
	}
	cmd.RunE = a.runE(func(ctx context.Context, _ []string) error {
		st, err := a.c.ClusterStatus(ctx)
		if err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(st)
		}
		tw := a.table()
		leader := string(st.Leader)
		if leader == "" {
			leader = "(none known)"
		} else if st.LeaderAPI != "" {
			leader += " (api " + st.LeaderAPI + ")"
		}
		row(tw, "Leader", leader)
		row(tw, "Asked", fmt.Sprintf("%s (%s)", st.Node, st.State))
		row(tw, "Healthy", yesNo(st.Healthy))
		row(tw, "Term", strconv.FormatUint(st.Term, 10))
		row(tw, "Commit index", strconv.FormatUint(st.CommitIndex, 10))
		row(tw, "Applied index", strconv.FormatUint(st.AppliedIndex, 10))
		row(tw, "Nodes", formatCounts(st.Nodes))
		row(tw, "Volumes", strconv.Itoa(st.Volumes))
		row(tw, "Open work", strconv.Itoa(st.Work))
		for _, e := range st.Errors {
			row(tw, "Problem", e)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintln(a.stdout)
		tw = a.table()
		fmt.Fprintln(tw, "VOTER\tSUFFRAGE\tLEADER\tSTATE\tRAFT\tAPI")
		for _, v := range st.Voters {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", v.ID, v.Suffrage, yesNo(v.Leader), dash(string(v.State)), v.Raft, dash(v.API))
		}
		return tw.Flush()
	})
	return cmd
}

func (a *app) clusterConfigureCommand() *cobra.Command {
	var lease, suspect time.Duration
	var minHealth, replicas int
	var partSize string
	cmd := &cobra.Command{
		Use:   "configure [--lease-timeout D] [--suspect-timeout D] [--min-health N] [--default-replicas N] [--default-partition-size SIZE]",
		Short: "Change the cluster's timeouts and defaults; settings not given keep their values",
		Long: `Change the cluster-wide settings named by the flags; the others keep their
values. A node that misses heartbeats for the suspect timeout is isolating;
after the lease timeout it is dead, and an in-sync secondary takes over its
primary roles. The leader checks the leases every lease/4 or more often,
and agents without an explicit interval heartbeat every min(1s, suspect/3):
a shorter lease means faster failover, and more heartbeats. The suspect
timeout may not exceed the lease.`,
		Example: "  storctl cluster configure --lease-timeout 1.5s --suspect-timeout 750ms\n  storctl cluster configure --default-replicas 2 --default-partition-size 1G",
		Args:    noArgs,
	}
	f := cmd.Flags()
	f.DurationVar(&lease, "lease-timeout", 0, "declare a node dead after this long without a heartbeat, e.g. 1.5s")
	f.DurationVar(&suspect, "suspect-timeout", 0, "mark a node isolating after this long without a heartbeat, e.g. 750ms")
	f.IntVar(&minHealth, "min-health", 0, "mark a node isolating below this health score, 0-100")
	f.IntVar(&replicas, "default-replicas", 0, fmt.Sprintf("replica count of volumes created without one, 1-%d", cluster.MaxReplicas))
	f.StringVar(&partSize, "default-partition-size", "", "partition size of volumes created without one, e.g. 1G")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		changed := cmd.Flags().Changed
		var req client.ConfigureCluster
		n := 0
		for _, d := range []struct {
			flag string
			v    time.Duration
			into *client.Duration
		}{{"lease-timeout", lease, &req.LeaseTimeout}, {"suspect-timeout", suspect, &req.SuspectTimeout}} {
			if !changed(d.flag) {
				continue
			}
			if d.v <= 0 {
				return usagef("invalid --%s %v: want more than 0 (e.g. 1.5s)", d.flag, d.v)
			}
			*d.into = client.Duration(d.v)
			n++
		}
		if changed("min-health") {
			if minHealth < 0 || minHealth > 100 {
				return usagef("invalid --min-health %d: want 0 to 100", minHealth)
			}
			req.MinHealth = &minHealth
			n++
		}
		if changed("default-replicas") {
			if replicas < 1 || replicas > cluster.MaxReplicas {
				return usagef("invalid --default-replicas %d: want 1 to %d", replicas, cluster.MaxReplicas)
			}
			req.DefaultReplicas = replicas
			n++
		}
		if changed("default-partition-size") {
			var err error
			if req.DefaultPartitionSize, err = parseSize("default partition size", partSize); err != nil {
				return err
			}
			n++
		}
		if n == 0 {
			return usagef("nothing to change: give one or more of --lease-timeout, --suspect-timeout, --min-health, --default-replicas, --default-partition-size")
		}
		return a.runE(func(ctx context.Context, _ []string) error {
			cfg, err := a.c.ConfigureCluster(ctx, req)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(cfg)
			}
			tw := a.table()
			row(tw, "Lease timeout", cfg.LeaseTimeout.String())
			row(tw, "Suspect timeout", cfg.SuspectTimeout.String())
			row(tw, "Min health", strconv.Itoa(cfg.MinHealth))
			row(tw, "Default replicas", strconv.Itoa(cfg.DefaultReplicas))
			row(tw, "Default partition size", api.FormatSize(cfg.DefaultPartitionSize))
			return tw.Flush()
		})(cmd, args)
	}
	return cmd
}

func (a *app) nodeListCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List the registered nodes",
		Args:    noArgs,
	}
	cmd.RunE = a.runE(func(ctx context.Context, _ []string) error {
		nodes, err := a.c.Nodes(ctx)
		if err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(nodes)
		}
		tw := a.table()
		fmt.Fprintln(tw, "ID\tSTATE\tHEALTH\tROLES\tDOMAIN\tAPI\tRAFT\tLAST HEARTBEAT")
		for _, n := range nodes {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", n.ID, n.State, n.Health, roles(n.Roles),
				dash(n.FailureDomain), n.Addr.API, dash(n.Addr.Raft), formatTime(n.LastHeartbeat))
		}
		return tw.Flush()
	})
	return cmd
}

func (a *app) nodeShowCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Show a node, its addresses and the roles it holds",
		Args:  oneNodeID,
	}
	cmd.RunE = a.runE(func(ctx context.Context, args []string) error {
		v, err := a.c.Node(ctx, api.NodeID(args[0]))
		if err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(v)
		}
		if err := a.printNode(v.Node); err != nil {
			return err
		}
		tw := a.table()
		if v.Voter != nil {
			row(tw, "Voter", fmt.Sprintf("%s, leader: %s", v.Voter.Suffrage, yesNo(v.Voter.Leader)))
		} else {
			row(tw, "Voter", "no")
		}
		if v.Sled != nil {
			row(tw, "Sled", fmt.Sprintf("%d devices, %s", len(v.Sled.Devices), api.FormatSize(v.Sled.Capacity())))
		}
		row(tw, "Grants", strconv.Itoa(len(v.Grants)))
		if err := tw.Flush(); err != nil {
			return err
		}
		if len(v.Grants) > 0 {
			fmt.Fprintln(a.stdout)
			return a.printGrants(v.Grants)
		}
		return nil
	})
	return cmd
}

func (a *app) nodeChangeCommand(verb, short string, call func(*client.Client, context.Context, api.NodeID) (cluster.Node, error)) *cobra.Command {
	cmd := &cobra.Command{
		Use:   verb + " ID",
		Short: short,
		Args:  oneNodeID,
	}
	cmd.RunE = a.runE(func(ctx context.Context, args []string) error {
		n, err := call(a.c, ctx, api.NodeID(args[0]))
		if err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(n)
		}
		_, err = fmt.Fprintf(a.stdout, "node %s is %s\n", n.ID, n.State)
		return err
	})
	return cmd
}

func (a *app) nodeRemoveCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "remove ID",
		Aliases: []string{"rm"},
		Short:   "Remove a node from the cluster map and the raft group; its roles are released",
		Args:    oneNodeID,
	}
	cmd.RunE = a.runE(func(ctx context.Context, args []string) error {
		if err := a.c.RemoveNode(ctx, api.NodeID(args[0])); err != nil {
			return err
		}
		if a.output == "json" {
			return a.printJSON(struct {
				ID      string `json:"id"`
				Removed bool   `json:"removed"`
			}{args[0], true})
		}
		_, err := fmt.Fprintf(a.stdout, "removed node %s\n", args[0])
		return err
	})
	return cmd
}

func (a *app) grantListCommand() *cobra.Command {
	var node, volume string
	cmd := &cobra.Command{
		Use:     "list [--node ID] [--volume NAME]",
		Aliases: []string{"ls"},
		Short:   "List the grants: which node holds which role of which partition",
		Args:    noArgs,
	}
	cmd.Flags().StringVar(&node, "node", "", "only the grants of this node")
	cmd.Flags().StringVar(&volume, "volume", "", "only the grants of this volume")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if volume != "" {
			if err := api.CheckName(volume); err != nil {
				return usagef("invalid --volume: %s", strings.TrimPrefix(err.Error(), api.ErrInvalid.Error()+": "))
			}
		}
		return a.runE(func(ctx context.Context, _ []string) error {
			gs, err := a.c.Grants(ctx, api.NodeID(node), volume)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(gs)
			}
			return a.printGrants(gs)
		})(cmd, args)
	}
	return cmd
}

func (a *app) printNode(n cluster.Node) error {
	tw := a.table()
	row(tw, "ID", string(n.ID))
	row(tw, "State", string(n.State))
	row(tw, "Health", strconv.Itoa(n.Health))
	row(tw, "Roles", roles(n.Roles))
	row(tw, "Failure domain", n.FailureDomain)
	row(tw, "API", n.Addr.API)
	row(tw, "Raft", n.Addr.Raft)
	row(tw, "Peer", n.Addr.Peer)
	row(tw, "NBD", n.Addr.NBD)
	row(tw, "iSCSI", n.Addr.ISCSI)
	if n.Capacity > 0 {
		row(tw, "Capacity", api.FormatSize(n.Capacity))
	}
	row(tw, "Registered", formatTime(n.Registered))
	row(tw, "Last heartbeat", formatTime(n.LastHeartbeat))
	return tw.Flush()
}

func (a *app) printGrants(gs []cluster.Grant) error {
	tw := a.table()
	fmt.Fprintln(tw, "VOLUME\tPARTITION\tROLE\tNODE\tEPOCH\tIN SYNC")
	for _, g := range gs {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%d\t%s\n", g.Volume, g.Partition, g.Role, g.Node, g.Epoch, yesNo(g.InSync))
	}
	return tw.Flush()
}

// placedVolume is `volume show -o json` on a cluster: the API's volume and
// the placement of its partitions.
type placedVolume struct {
	api.Volume
	Placement   []cluster.Partition `json:"partitions,omitempty"` // in LBA order
	Rebuild     []rebuildRow        `json:"rebuild,omitempty"`    // each secondary's progress, as rebuild-status
	Replication string              `json:"replication,omitempty"`
}

// replicationNote says what the placement means for the data.
const replicationNote = "every write is committed on the primary and every in-sync replica before it is acknowledged"

// showPlaced prints v with its placement when the API has the cluster
// routes; against `stord dev` it prints v alone.
func (a *app) showPlaced(ctx context.Context, v api.Volume) error {
	cv, err := a.c.ClusterVolume(ctx, v.Name)
	if errors.Is(err, api.ErrNotFound) {
		return a.printVolume(v) // no cluster routes here (or the volume went away meanwhile)
	}
	if err != nil {
		return err
	}
	// Rebuild progress needs the primaries' own APIs: best effort (rows
	// say what did not answer).
	rows, _ := a.rebuildRows(ctx, v.Name)
	if a.output == "json" {
		return a.printJSON(placedVolume{Volume: v, Placement: cv.Partitions, Rebuild: rows, Replication: replicationNote})
	}
	if err := a.printVolume(v); err != nil {
		return err
	}
	tw := a.table()
	row(tw, "Replication", replicationNote)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(a.stdout)
	if err := a.printPlacement(cv.Partitions); err != nil || len(rows) == 0 {
		return err
	}
	fmt.Fprintln(a.stdout)
	return a.printRebuild(rows)
}

func (a *app) printPlacement(ps []cluster.Partition) error {
	tw := a.table()
	fmt.Fprintln(tw, "PARTITION\tEPOCH\tPRIMARY\tSECONDARIES\tRESERVES\tIN SYNC\tSOLO")
	for _, p := range ps {
		solo := "-"
		if p.Solo != nil {
			solo = fmt.Sprintf("%s@%d", p.Solo.Node, p.Solo.Epoch)
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\t%s\n", p.Index, p.Epoch, dash(string(p.Primary)),
			ids(p.Secondaries), ids(p.Reserves), ids(p.InSync), solo)
	}
	return tw.Flush()
}

func ids(xs []api.NodeID) string {
	if len(xs) == 0 {
		return "-"
	}
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = string(x)
	}
	return strings.Join(s, ",")
}

func roles(rs []string) string {
	if len(rs) == 0 {
		return "all"
	}
	return strings.Join(rs, ",")
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// formatCounts prints {"active": 3, "dead": 1} as "3 active, 1 dead".
func formatCounts(m map[string]int) string {
	var parts []string
	for _, k := range []cluster.State{cluster.StateActive, cluster.StateIsolating, cluster.StateDraining, cluster.StateDead} {
		if n := m[string(k)]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, k))
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// rebuildRow is one replica of one partition in `volume rebuild-status`.
type rebuildRow struct {
	Partition api.PartitionID `json:"partition"`
	Primary   api.NodeID      `json:"primary"`
	Epoch     api.Epoch       `json:"epoch"`
	Replica   api.NodeID      `json:"replica"`
	State     string          `json:"state"` // in-sync, rebuilding, waiting, unknown
	Done      api.OpNum       `json:"done"`  // ops of the primary's log it holds
	Total     api.OpNum       `json:"total"` // ops in the primary's log
	Percent   float64         `json:"percent"`
	Note      string          `json:"note,omitempty"`
}

func (a *app) rebuildStatusCommand() *cobra.Command {
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "rebuild-status NAME",
		Short: "Show the rebuild progress of a volume's replicas",
		Long: `Show, for every partition of a volume, each secondary's state as its
primary sees it: in sync, or rebuilding with the share of the primary's log
it holds (a progress bar). With --wait DURATION it polls until every replica
is in sync, and fails if that takes longer.`,
		Example: "  storctl volume rebuild-status db1\n  storctl volume rebuild-status db1 --wait 5m",
		Args:    oneName,
	}
	cmd.Flags().DurationVar(&wait, "wait", 0, "poll until every replica is in sync, up to this long")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if wait < 0 {
			return usagef("invalid --wait %v: want 0 or more", wait)
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), a.timeout+wait)
		defer cancel()
		deadline := time.Now().Add(wait)
		for {
			rows, err := a.rebuildRows(ctx, args[0])
			if err != nil {
				return &opError{err}
			}
			synced := !slices.ContainsFunc(rows, func(r rebuildRow) bool { return r.State != "in-sync" })
			if wait == 0 || synced || time.Now().After(deadline) {
				if err := a.printRebuild(rows); err != nil {
					return &opError{err}
				}
				if wait > 0 && !synced {
					return &opError{fmt.Errorf("volume %s: replicas still rebuilding after %v", args[0], wait)}
				}
				return nil
			}
			select {
			case <-ctx.Done():
				return &opError{ctx.Err()}
			case <-time.After(500 * time.Millisecond):
			}
		}
	}
	return cmd
}

// rebuildRows asks the primary of every partition of volume how far its
// peers are.
func (a *app) rebuildRows(ctx context.Context, volume string) ([]rebuildRow, error) {
	cv, err := a.c.ClusterVolume(ctx, volume)
	if err != nil {
		return nil, err
	}
	nodes, err := a.c.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	apiOf := map[api.NodeID]string{}
	for _, n := range nodes {
		apiOf[n.ID] = n.Addr.API
	}
	held := map[api.NodeID][]api.ReplicaStatus{}
	asked := map[api.NodeID]error{}
	var rows []rebuildRow
	for _, p := range cv.Partitions {
		var st *api.ReplicaStatus
		if p.Primary != "" {
			if _, ok := asked[p.Primary]; !ok {
				hc := &http.Client{Timeout: 5 * time.Second}
				held[p.Primary], asked[p.Primary] = client.New("http://"+apiOf[p.Primary], hc).Replicas(ctx)
			}
			for i, r := range held[p.Primary] {
				if r.Volume == volume && r.Partition == p.Index {
					st = &held[p.Primary][i]
				}
			}
		}
		for _, sec := range p.Secondaries {
			row := rebuildRow{Partition: p.Index, Primary: p.Primary, Epoch: p.Epoch, Replica: sec, State: "unknown"}
			switch {
			case p.Primary == "":
				row.Note = "no primary: waiting for failover"
			case asked[p.Primary] != nil:
				row.Note = fmt.Sprintf("primary %s did not answer: %v", p.Primary, asked[p.Primary])
			case st == nil || st.Role != "primary" || st.Epoch != p.Epoch:
				row.State, row.Note = "waiting", fmt.Sprintf("%s is not serving as primary at epoch %d yet", p.Primary, p.Epoch)
			default:
				row.Total = st.Last
				row.State, row.Note = "waiting", "not a peer of the primary yet"
				for _, peer := range st.Peers {
					if peer.Node != sec {
						continue
					}
					row.Done, row.State, row.Note = min(peer.Match, st.Last), "rebuilding", ""
					if peer.InSync && slices.Contains(p.InSync, sec) {
						row.State = "in-sync"
					}
					if peer.NeedSnapshot {
						row.Note = "needs a snapshot of the primary's state (not supported yet)"
					}
				}
			}
			if row.Total > 0 {
				row.Percent = 100 * float64(row.Done) / float64(row.Total)
			} else if row.State == "in-sync" {
				row.Percent = 100
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}

func (a *app) printRebuild(rows []rebuildRow) error {
	if rows == nil {
		rows = []rebuildRow{}
	}
	if a.output == "json" {
		return a.printJSON(rows)
	}
	tw := a.table()
	fmt.Fprintln(tw, "PARTITION\tPRIMARY\tEPOCH\tREPLICA\tSTATE\tPROGRESS\tNOTE")
	for _, r := range rows {
		const width = 20
		bar := strings.Repeat("#", int(r.Percent/100*width)) + strings.Repeat(".", width-int(r.Percent/100*width))
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t[%s] %5.1f%% (%d/%d ops)\t%s\n", r.Partition, dash(string(r.Primary)), r.Epoch,
			r.Replica, r.State, bar, r.Percent, r.Done, r.Total, dash(r.Note))
	}
	return tw.Flush()
}

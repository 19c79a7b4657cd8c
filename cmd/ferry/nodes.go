package main

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/agent/agentclient"
	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/internal/migratecmd"
	"github.com/ferrycr/ferry/transport"
)

func init() { register(newNodesCmd) }

func newNodesCmd() *cobra.Command {
	var (
		addr    string
		tls     transport.TLS
		jsonOut bool
	)
	cmd := &cobra.Command{
		Use:   "nodes --agent HOST[:PORT] --tls-cacert CA --tls-cert CERT --tls-key KEY [--json]",
		Short: "list the agents of the cluster",
		Long: `List the cluster's agents as the agent at --agent sees them (their gossip):
name, gRPC address, state (alive, suspect, dead, left), kernel, free memory,
load and migrations in flight. An agent started without --gossip lists only
itself. --json prints an array of objects instead.`,
		Example: `  ferry nodes --agent 10.0.0.1 --tls-cacert pki/ca.crt --tls-cert pki/operator.crt --tls-key pki/operator.key`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := migratecmd.HostPort("--agent", addr)
			if err != nil {
				return err
			}
			conn, err := agentclient.Dial(a, tls)
			if err != nil {
				return err
			}
			defer conn.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), 15*time.Second)
			defer cancel()
			r, err := agentv1.NewAgentClient(conn).Nodes(ctx, &agentv1.NodesRequest{})
			if err != nil {
				return fmt.Errorf("agent %s: %w", a, err)
			}
			out := cmd.OutOrStdout()
			if jsonOut {
				type node struct {
					Name         string  `json:"name"`
					Address      string  `json:"address"`
					State        string  `json:"state"`
					Kernel       string  `json:"kernel"`
					MemAvailable uint64  `json:"mem_available"`
					Load1        float64 `json:"load1"`
					Migrations   int32   `json:"migrations"`
					LazyPages    bool    `json:"lazy_pages"`
				}
				list := []node{}
				for _, n := range r.Nodes {
					list = append(list, node{n.Name, n.GrpcAddress, n.State, n.Kernel, n.MemAvailable, n.Load1, n.Migrations, n.LazyPages})
				}
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(list)
			}
			w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tADDRESS\tSTATE\tKERNEL\tMEM FREE\tLOAD\tMIGRATIONS")
			for _, n := range r.Nodes {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%.1f GiB\t%.2f\t%d\n", n.Name, n.GrpcAddress, n.State, n.Kernel, float64(n.MemAvailable)/(1<<30), n.Load1, n.Migrations)
			}
			return w.Flush()
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&addr, "agent", "", "the agent to ask, HOST[:PORT] (required)")
	fs.StringVar(&tls.CACert, "tls-cacert", "", "CA certificate the agent's certificate must chain to (PEM)")
	fs.StringVar(&tls.Cert, "tls-cert", "", "this side's certificate (PEM), from the same CA")
	fs.StringVar(&tls.Key, "tls-key", "", "this side's private key (PEM)")
	fs.BoolVar(&jsonOut, "json", false, "print JSON")
	cmd.MarkFlagRequired("agent")
	return cmd
}

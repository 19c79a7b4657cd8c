package main

import (
	"fmt"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/agent"
)

func init() { register(newAgentCmd) }

func newAgentCmd() *cobra.Command {
	var (
		c        common
		cfg      agent.Config
		statusFd int
		pidfile  string
		metrics  string
	)
	cmd := &cobra.Command{
		Use:   "agent --listen HOST:PORT --state-dir DIR --tls-cacert CA --tls-cert CERT --tls-key KEY",
		Short: "run the per-host daemon that migrations are driven through",
		Long: `Run ferry's per-host agent: a gRPC service (agent/api/v1 in the source tree)
over mutual TLS through which a coordinator ("migrate", or "ferry migrate")
moves process trees between hosts. On a source host the agent inspects the
tree, runs its pre-copy rounds and the final dump, streaming pages to the
target; on a target host it checks that it can take the tree (free PIDs,
memory, CPU features), receives the pages in a page-server session, restores
the tree and records the commit.

Every connection is mutually authenticated: the agent presents --tls-cert and
--tls-key, and accepts only peers whose certificate chains to --tls-cacert and
is not on --tls-cacrl ("ferry certs" makes them all). Certificates name the
hosts they are valid for: use the address peers dial (--listen's host).

Each migration's record lives in --state-dir (migrations/ID.json), with the
images of its rounds (images/ID/N, removed once it ends). A migration has a
lease that its coordinator renews; when a lease runs out, a target rolls back
what it restored, and a source asks the target what was decided: committed,
its frozen tree is killed; not, it resumes. While the target cannot be asked,
a frozen source stays frozen, so the workload never runs on two hosts. An agent
that restarts finds its unfinished migrations in --state-dir and resolves
them the same way.

With --gossip the agents form a cluster (hashicorp/memberlist, encrypted
with --gossip-key, the same on every node): each gossips its name, gRPC
address, kernel, free memory, load and migrations in flight; --join names
members to start from. "ferry nodes" lists the cluster, and "migrate --via"
resolves node names through it.

--metrics ADDR serves Prometheus metrics over plain HTTP on ADDR (keep it
on a trusted interface): ferry_migrations_total{role,outcome},
ferry_migrations_in_flight, ferry_migration_rounds_total,
ferry_migration_page_bytes_total{direction="sent"|"served"},
ferry_migration_downtime_seconds (histogram, committed migrations, on the
target) and ferry_migration_step_seconds{step} (round, final-round, restore,
post-copy).

--status-fd FD writes a zero byte to FD once the agent serves; under systemd
(NOTIFY_SOCKET set) it also reports READY=1.`,
		Example: `  ferry certs issue --dir /etc/ferry/pki node-a --host 10.0.0.1
  ferry agent --listen 10.0.0.1:27100 --state-dir /var/lib/ferry \
      --tls-cacert /etc/ferry/pki/ca.crt --tls-cert /etc/ferry/pki/node-a.crt \
      --tls-key /etc/ferry/pki/node-a.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := c.logger()
			if err != nil {
				return err
			}
			defer c.close()
			cfg.Version = version
			cfg.Logger = log
			a, err := agent.New(cfg)
			if err != nil {
				return err
			}
			if metrics != "" {
				if err := a.ServeMetrics(cmd.Context(), metrics); err != nil {
					return fmt.Errorf("--metrics %s: %w", metrics, err)
				}
			}
			if pidfile != "" {
				if err := writePidfile(pidfile, os.Getpid()); err != nil {
					return err
				}
			}
			if statusFd >= 0 {
				writeStatus(statusFd)
			}
			daemon.SdNotify(false, daemon.SdNotifyReady)
			fmt.Fprintf(cmd.ErrOrStderr(), "ferry agent %s serving on %s\n", a.Name(), a.Addr())
			return a.Serve(cmd.Context())
		},
	}
	fs := cmd.Flags()
	fs.StringVarP(&c.logFile, "log-file", "o", "", "write the log to FILE (default: standard error)")
	fs.CountVarP(&c.verbosity, "verbosity", "v", "more log output: -v, -vv, ... or -vN with N from 0 (errors) to 4 (debug); default 2 (warnings)")
	fs.StringVar(&cfg.Listen, "listen", ":27100", "serve gRPC on HOST:PORT")
	fs.StringVar(&cfg.PageHost, "page-address", "", "address the migrations' page-server sessions listen on (default: --listen's host)")
	fs.StringVar(&cfg.StateDir, "state-dir", "/var/lib/ferry", "directory of migration records and images")
	fs.StringVar(&cfg.RunDir, "run-dir", "", "directory of the migration records and a source's round images instead of --state-dir: a tmpfs such as /run/ferry keeps their writes from waiting behind the pages written to --state-dir")
	fs.StringVar(&cfg.Name, "node-name", "", "this node's name (default: the host name)")
	fs.DurationVar(&cfg.Lease, "lease", 30*time.Second, "lease of a migration whose coordinator names none")
	fs.StringVar(&cfg.TLS.CACert, "tls-cacert", "", "CA certificate every peer's certificate must chain to (PEM)")
	fs.StringVar(&cfg.TLS.CRL, "tls-cacrl", "", "certificate revocation list: peers listed are refused")
	fs.StringVar(&cfg.TLS.Cert, "tls-cert", "", "this agent's certificate (PEM)")
	fs.StringVar(&cfg.TLS.Key, "tls-key", "", "this agent's private key (PEM)")
	fs.IntVar(&statusFd, "status-fd", -1, "write a zero byte to FD when serving")
	fs.StringVar(&metrics, "metrics", "", "serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9127)")
	fs.StringVar(&pidfile, "pidfile", "", "write the agent's PID to FILE")
	fs.StringVar(&cfg.Gossip.Bind, "gossip", "", "join cluster membership, gossiping on HOST:PORT (UDP and TCP; e.g. 10.0.0.1:7946)")
	fs.StringSliceVar(&cfg.Gossip.Join, "join", nil, "members to join at start, HOST:PORT of their --gossip (repeatable)")
	fs.StringVar(&cfg.Gossip.KeyFile, "gossip-key", "", "the cluster's gossip encryption key (base64; ferry certs init writes gossip.key)")
	fs.StringVar(&cfg.Fault, "fault", "", "fail or slow a step on purpose (tests): restore, slow-restore, after-restore, commit, slow-pages, flags-moved")
	fs.MarkHidden("fault")
	return cmd
}

// Package migratecmd is the command line of a live migration, shared by
// the migrate binary and "ferry migrate".
package migratecmd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/agent/agentclient"
	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/coordinator"
	"github.com/ferrycr/ferry/internal/hooks"
	"github.com/ferrycr/ferry/transport"
)

// Exit statuses.
const (
	ExitCommitted  = 0 // the tree runs on the target; the source is gone
	ExitRolledBack = 1 // failed; the tree runs on the source as before
	ExitRefused    = 2 // refused before anything was touched (or bad usage)
	ExitUnresolved = 3 // outcome left to the agents; the source stays frozen until they settle it
	ExitRunning    = 4 // --result without --wait: still under way
)

// DefaultPort is the agents' gRPC port.
const DefaultPort = "27100"

// ExitError carries the exit status of a migration that did not commit.
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return "exit status " + strconv.Itoa(e.Code) }

// New returns the migrate command (use is "migrate" or "migrate" under
// ferry).
func New() *cobra.Command {
	var (
		o         coordinator.Options
		from, to  string
		jsonOut   bool
		statusFd  int
		verbosity int
		via       string
		detach    bool
		resultID  string
		wait      bool
		scripts   []string
		compress  bool
	)
	cmd := &cobra.Command{
		Use:   "migrate --from HOST[:PORT] --to HOST[:PORT] [options] PID",
		Short: "move a running process from one host to another",
		Long: `Move the running process PID from the host whose agent is at --from to the
host whose agent is at --to ("ferry agent" runs on both; PORT defaults to
27100; with --via, node names of the cluster work too), as the same process: same PID, same memory, continuing where it
stopped.

--mode picks how its memory travels:

  precopy   the process keeps running while pre-copy rounds send its memory,
            each round only what it wrote since the previous one; once a
            final round fits the --max-downtime budget (or the rounds stop
            converging, or --max-rounds is reached) the source is frozen, the
            last pages and the rest of its state go over, and the target
            restores it with all its memory.
  postcopy  no pre-copy round: the source is frozen at once, its state
            (without memory) goes over, and the process resumes on the target
            while its memory follows, each page fetched from the frozen source
            when touched, the rest in the background.
  hybrid    (default) pre-copy rounds as in precopy, then post-copy for what
            the last round left: the downtime does not grow with memory.

Nothing is lost when something fails. Until the target has recorded the
commit, any failure (preflight refusal, a round, the restore, an agent or
the network going away) ends with the target's copy killed and the source
resumed. The source is held by SIGSTOP after its final round — a freeze that
outlives every ferry process — and is resumed only once the target has
confirmed its rollback; if the target cannot confirm, the source stays
frozen and the agents settle the migration themselves when its lease runs
out ("unresolved"). The workload never runs on two hosts.

Preflight, before anything is touched: the target must have the tree's
PIDs free, enough memory, every instruction-set feature of the source's
CPU, and the same vDSO as the source's kernel.

In post-copy the commit is the target having every page: until then the
process needs both hosts, and a failure stops it on the target and resumes
the source (what it did on the target since it resumed is lost, and the
error says so).

On a terminal, each step is printed as it happens and a summary at the end
(downtime, total time, bytes, rounds). --json prints one JSON object per
event instead, the last one being the result (event "result": id, outcome,
pid, restored_pid, rounds, bytes, downtime_ms, frozen_ms, postcopy_ms,
total_ms, error).
--status-fd FD writes a zero byte to FD once the process runs on the target
and the migration is committed.

--action-script SCRIPT (repeatable) runs SCRIPT here, in migrate's process,
with CRTOOLS_SCRIPT_ACTION set to the stage and FERRY_MIGRATION_ID,
FERRY_PID, FERRY_FROM and FERRY_TO describing the migration:

  post-dump     the source is frozen for good, the target has its images and
                (with --tcp-established) drops its connections' packets until
                the restore rebuilds them: move the workload's service
                addresses to the target now. A failing script rolls the
                migration back.
  post-migrate  committed: the process runs on the target.
  rollback      a migration that ran post-dump is being undone: move the
                addresses back. Then the target's copy goes (its connections
                silently) and the source resumes.

--detach has the source's agent (--from) coordinate instead, so the caller
need not stay: it prints the migration's id and returns. "migrate --from A
--result ID [--wait] [--json]" prints its result later, with the exit status
of its outcome.

Exit status: 0 committed (the process runs on the target); 1 failed and
rolled back (it runs on the source, as before); 2 refused before anything was
touched, or bad usage; 3 unresolved (the source stays frozen until the agents
settle it; "ferry agent" logs the outcome); 4 (--result without --wait) still
under way.`,
		Example: `  migrate --from 10.0.0.1 --to 10.0.0.2 --tls-cacert pki/ca.crt \
      --tls-cert pki/operator.crt --tls-key pki/operator.key 4242
  migrate --from node-a:27100 --to node-b:27100 --max-downtime 50ms --json ... 4242`,
		Args:          cobra.RangeArgs(0, 1),
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if resultID != "" {
				return showResult(cmd, o.TLS, from, resultID, wait, jsonOut)
			}
			if len(args) != 1 {
				return usage(cmd, errors.New("want one PID"))
			}
			pid, err := strconv.Atoi(args[0])
			if err != nil || pid <= 0 {
				return usage(cmd, fmt.Errorf("PID %q: want a process ID", args[0]))
			}
			o.Pid = pid
			o.NoCompress = !compress
			if via != "" {
				if from, to, err = resolve(cmd.Context(), via, o.TLS, from, to); err != nil {
					return usage(cmd, err)
				}
			}
			if o.From, err = HostPort("--from", from); err != nil {
				return usage(cmd, err)
			}
			if o.To, err = HostPort("--to", to); err != nil {
				return usage(cmd, err)
			}
			if o.From == o.To {
				return usage(cmd, fmt.Errorf("--from and --to are the same agent (%s)", o.From))
			}
			if o.MaxRounds < 0 {
				return usage(cmd, fmt.Errorf("--max-rounds %d: want 0 or more", o.MaxRounds))
			}
			if o.MaxRounds == 0 {
				o.MaxRounds = -1 // none
			}
			if detach {
				if len(scripts) > 0 {
					return usage(cmd, errors.New("--action-script runs in migrate's process: it cannot be combined with --detach"))
				}
				return startDetached(cmd, o, jsonOut)
			}
			if len(scripts) > 0 {
				if o.ID == "" {
					o.ID = coordinator.NewID()
				}
				h := &hooks.Scripts{Paths: scripts, Env: []string{"FERRY_MIGRATION_ID=" + o.ID,
					"FERRY_PID=" + strconv.Itoa(o.Pid), "FERRY_FROM=" + o.From, "FERRY_TO=" + o.To}}
				o.Hook = func(stage string) error { return h.Run(stage) }
			}
			o.Logger = logger(cmd.ErrOrStderr(), verbosity)
			out := cmd.OutOrStdout()
			var disp *display
			if jsonOut {
				enc := json.NewEncoder(out)
				o.Progress = func(e coordinator.Event) { enc.Encode(e) }
			} else {
				disp = newDisplay(out)
				o.Progress = disp.event
			}
			res, err := coordinator.Migrate(cmd.Context(), o)
			if disp != nil {
				disp.close()
			}
			if jsonOut {
				json.NewEncoder(out).Encode(struct {
					Event string `json:"event"`
					*coordinator.Result
				}{"result", res})
			} else {
				printSummary(out, res)
			}
			if err == nil {
				if statusFd >= 0 {
					f := os.NewFile(uintptr(statusFd), "status-fd")
					f.Write([]byte{0})
					f.Close()
				}
				return nil
			}
			var ce *coordinator.Error
			code := ExitRolledBack
			if errors.As(err, &ce) {
				switch ce.Outcome {
				case coordinator.Refused:
					code = ExitRefused
				case coordinator.Unresolved:
					code = ExitUnresolved
				}
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "migrate: %v\n", err)
			return &ExitError{code}
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&from, "from", "", "the source host's agent, HOST[:PORT] (required)")
	fs.StringVar(&to, "to", "", "the target host's agent, HOST[:PORT] (required)")
	fs.BoolVar(&detach, "detach", false, "have the source's agent coordinate: print the migration's id and return at once")
	fs.StringVar(&resultID, "result", "", "print the result of migration ID, coordinated by the agent at --from (no PID)")
	fs.BoolVar(&wait, "wait", false, "with --result: wait until the migration is settled")
	fs.StringVar(&via, "via", "", "resolve --from and --to as node names through the cluster, asking the agent at HOST[:PORT]")
	fs.StringVar(&o.Mode, "mode", "hybrid", "hybrid (pre-copy rounds, then post-copy), precopy or postcopy")
	fs.DurationVar(&o.MaxDowntime, "max-downtime", 100*time.Millisecond, "downtime budget the pre-copy rounds converge to")
	fs.IntVar(&o.MaxRounds, "max-rounds", 8, "pre-copy rounds at most before the final one (0 with --mode precopy: stop-and-copy, all memory sent while frozen)")
	fs.DurationVar(&o.Lease, "lease", 30*time.Second, "how long the agents wait without hearing from this command before they settle the migration alone")
	fs.BoolVar(&o.TCPEstablished, "tcp-established", false, "move established TCP connections too (TCP_REPAIR)")
	fs.BoolVar(&compress, "compress", true, "zstd on the page streams (--compress=false: fast links, few spare CPUs)")
	fs.StringArrayVar(&scripts, "action-script", nil, "run SCRIPT at the stages post-dump, post-migrate and rollback (repeatable)")
	fs.StringVar(&o.ID, "id", "", "the migration's id (default: time and random)")
	fs.StringVar(&o.TLS.CACert, "tls-cacert", "", "CA certificate the agents' certificates must chain to (PEM)")
	fs.StringVar(&o.TLS.CRL, "tls-cacrl", "", "certificate revocation list: agents listed are refused")
	fs.StringVar(&o.TLS.Cert, "tls-cert", "", "this side's certificate (PEM), from the same CA")
	fs.StringVar(&o.TLS.Key, "tls-key", "", "this side's private key (PEM)")
	fs.BoolVar(&jsonOut, "json", false, "print JSON lines (one per event, then the result)")
	fs.IntVar(&statusFd, "status-fd", -1, "write a zero byte to FD once the migration is committed")
	fs.CountVarP(&verbosity, "verbosity", "v", "log to standard error: -v info, -vv debug")
	cmd.MarkFlagRequired("from")

	return cmd
}

func usage(cmd *cobra.Command, err error) error {
	fmt.Fprintf(cmd.ErrOrStderr(), "migrate: %v\n", err)
	return &ExitError{ExitRefused}
}

// HostPort adds the default port to a host without one.
func HostPort(flag, s string) (string, error) {
	if s == "" {
		return "", fmt.Errorf("%s is required", flag)
	}
	if _, _, err := net.SplitHostPort(s); err == nil {
		return s, nil
	}
	return net.JoinHostPort(s, DefaultPort), nil
}

func logger(w io.Writer, v int) *slog.Logger {
	if v == 0 {
		return slog.New(slog.DiscardHandler)
	}
	level := slog.LevelInfo
	if v > 1 {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

func printEvent(w io.Writer, e coordinator.Event) {
	switch e.Event {
	case "preflight":
		fmt.Fprintf(w, "migration %s: %s\n", e.ID, e.Message)
	case "round":
		fmt.Fprintf(w, "  round %d: %d pages, %s in %s", e.Round, e.Pages, coordinator.Size(e.Bytes), dur(e.Seconds))
		if e.Rate > 0 {
			fmt.Fprintf(w, " (%s/s)", coordinator.Size(uint64(e.Rate)))
		}
		if e.DirtyRate > 0 || e.PredictedDowntimeMs > 0 {
			fmt.Fprintf(w, "; dirty %s/s, a final round now: ~%.0f ms", coordinator.Size(uint64(e.DirtyRate)), e.PredictedDowntimeMs)
		}
		if e.Message != "" {
			fmt.Fprintf(w, "; %s", e.Message)
		}
		fmt.Fprintln(w)
	case "final":
		fmt.Fprintf(w, "  final round %d: %d pages, %s; %s (%.1f ms so far)\n", e.Round, e.Pages, coordinator.Size(e.Bytes), e.Message, e.FrozenMs)
	case "restored":
		fmt.Fprintf(w, "  restored on the target as PID %d in %s: %s\n", e.Pid, dur(e.Seconds), e.Message)
	case "pages":
		fmt.Fprintf(w, "  post-copy: %d pages (%s) from the source in %s; %s\n", e.Pages, coordinator.Size(e.Bytes), dur(e.Seconds), e.Message)
	}
}

func printSummary(w io.Writer, r *coordinator.Result) {
	if r == nil {
		return
	}
	switch r.Outcome {
	case coordinator.Committed:
		fmt.Fprintf(w, "migrated: PID %d now runs on %s; downtime %.1f ms, total %s, %s in %d rounds",
			r.RestoredPid, r.To, r.DowntimeMs, dur(r.TotalMs/1000), coordinator.Size(r.Bytes), r.Rounds)
		if r.PostcopyMs > 0 {
			fmt.Fprintf(w, " and %s of post-copy", dur(r.PostcopyMs/1000))
		}
		fmt.Fprintln(w)
	case coordinator.RolledBack:
		fmt.Fprintf(w, "not migrated: rolled back; PID %d runs on %s as before\n", r.Pid, r.From)
	case coordinator.Refused:
		fmt.Fprintf(w, "not migrated: refused; nothing was touched\n")
	case coordinator.Unresolved:
		fmt.Fprintf(w, "unresolved: PID %d stays frozen on %s until the agents settle migration %s\n", r.Pid, r.From, r.ID)
	}
}

func dur(s float64) string {
	if s < 1 {
		return fmt.Sprintf("%.0f ms", s*1000)
	}
	return fmt.Sprintf("%.2f s", s)
}

// startDetached asks the source's agent to coordinate the migration and
// prints its id.
func startDetached(cmd *cobra.Command, o coordinator.Options, jsonOut bool) error {
	conn, err := agentclient.Dial(o.From, o.TLS)
	if err != nil {
		return usage(cmd, err)
	}
	defer conn.Close()
	ref, err := agentv1.NewAgentClient(conn).Migrate(cmd.Context(), &agentv1.MigrateRequest{Pid: int32(o.Pid), To: o.To, Mode: o.Mode,
		MaxDowntimeMs: uint32(o.MaxDowntime / time.Millisecond), MaxRounds: int32(o.MaxRounds),
		LeaseMs: uint32(o.Lease / time.Millisecond), TcpEstablished: o.TCPEstablished, Id: o.ID, NoCompress: o.NoCompress})
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "migrate: %s: %v\n", o.From, err)
		return &ExitError{ExitRefused}
	}
	if jsonOut {
		json.NewEncoder(cmd.OutOrStdout()).Encode(map[string]string{"event": "started", "id": ref.Id, "coordinator": o.From})
	} else {
		fmt.Fprintf(cmd.OutOrStdout(), "migration %s started, coordinated by %s; see: migrate --from %s --result %s --wait\n", ref.Id, o.From, o.From, ref.Id)
	}
	return nil
}

// showResult prints the result of a migration an agent coordinates, with
// the exit status of its outcome (4 while it runs).
func showResult(cmd *cobra.Command, t transport.TLS, from, id string, wait, jsonOut bool) error {
	addr, err := HostPort("--from", from)
	if err != nil {
		return usage(cmd, err)
	}
	conn, err := agentclient.Dial(addr, t)
	if err != nil {
		return usage(cmd, err)
	}
	defer conn.Close()
	r, err := agentv1.NewAgentClient(conn).Result(cmd.Context(), &agentv1.ResultRequest{Id: id, Wait: wait})
	if err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "migrate: %s: %v\n", addr, err)
		return &ExitError{ExitRefused}
	}
	if !r.Done {
		if jsonOut {
			json.NewEncoder(cmd.OutOrStdout()).Encode(map[string]any{"event": "result", "id": id, "outcome": "running"})
		} else {
			fmt.Fprintf(cmd.OutOrStdout(), "migration %s is under way\n", id)
		}
		return &ExitError{ExitRunning}
	}
	res := &coordinator.Result{ID: r.Id, Outcome: r.Outcome, Error: r.Error, Pid: int(r.Pid), RestoredPid: int(r.RestoredPid),
		Rounds: int(r.Rounds), Bytes: r.Bytes, DowntimeMs: r.DowntimeMs, FrozenMs: r.FrozenMs, PostcopyMs: r.PostcopyMs,
		TotalMs: r.TotalMs, From: r.From, To: r.To}
	if jsonOut {
		json.NewEncoder(cmd.OutOrStdout()).Encode(struct {
			Event string `json:"event"`
			*coordinator.Result
		}{"result", res})
	} else {
		printSummary(cmd.OutOrStdout(), res)
	}
	switch r.Outcome {
	case coordinator.Committed:
		return nil
	case coordinator.Refused:
		return &ExitError{ExitRefused}
	case coordinator.Unresolved:
		return &ExitError{ExitUnresolved}
	}
	return &ExitError{ExitRolledBack}
}

// resolve maps node names to their agents' addresses through the
// cluster, as the agent at via sees it; other values are left alone.
func resolve(ctx context.Context, via string, t transport.TLS, names ...string) (string, string, error) {
	addr, err := HostPort("--via", via)
	if err != nil {
		return "", "", err
	}
	conn, err := agentclient.Dial(addr, t)
	if err != nil {
		return "", "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	r, err := agentv1.NewAgentClient(conn).Nodes(ctx, &agentv1.NodesRequest{})
	if err != nil {
		return "", "", fmt.Errorf("--via %s: %w", addr, err)
	}
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = n
		for _, node := range r.Nodes {
			if node.Name == n {
				if node.State != "alive" {
					return "", "", fmt.Errorf("node %s is %s", n, node.State)
				}
				out[i] = node.GrpcAddress
			}
		}
	}
	return out[0], out[1], nil
}

// Main runs the migrate binary.
func Main() {
	ctx, stop := signalContext()
	defer stop()
	cmd := New()
	cmd.Use = "migrate --from HOST[:PORT] --to HOST[:PORT] [options] PID"
	err := cmd.ExecuteContext(ctx)
	var ee *ExitError
	switch {
	case err == nil:
		os.Exit(0)
	case errors.As(err, &ee):
		os.Exit(ee.Code)
	default:
		fmt.Fprintf(os.Stderr, "migrate: %v\n", err)
		os.Exit(ExitRefused)
	}
}

// signalContext is cancelled by SIGINT, SIGTERM or SIGHUP: an interrupted
// migration rolls back like any other failure.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), unix.SIGINT, unix.SIGTERM, unix.SIGHUP)
}

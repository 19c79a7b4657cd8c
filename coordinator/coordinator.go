// Package coordinator drives a live migration between two agents as an
// explicit state machine:
//
//	preflight -> pre-copy rounds -> final round (source frozen) -> restore
//	          -> commit (target records it; source tree killed)
//
// Any failure before the commit rolls back: the target's copy is killed,
// then the source resumes. The source is resumed only once the target has
// confirmed that it rolled back, so the workload never runs on two hosts;
// when the target cannot be reached, the source stays frozen and the
// agents resolve the migration themselves when its lease runs out (the
// outcome is then "unresolved").
package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/ferrycr/ferry/agent/agentclient"
	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/transport"
)

// Options describe a migration.
type Options struct {
	Pid      int
	From, To string // the agents' gRPC addresses (host:port)
	// Mode: "precopy" (pre-copy rounds, then a final round sends what is
	// left before the restore), "postcopy" (no pre-copy round: the tree
	// resumes on the target at once and its memory follows on demand),
	// "hybrid" (the default: pre-copy rounds while they converge, then
	// post-copy for what the last round left).
	Mode string
	// MaxDowntime is the downtime budget the pre-copy rounds converge to
	// (default 100 ms).
	MaxDowntime time.Duration
	// MaxRounds bounds the pre-copy rounds before the final one
	// (0: the default, 8; negative: none, which in precopy mode is a
	// stop-and-copy migration: the final round sends all memory).
	MaxRounds int
	// Lease: how long each agent waits without hearing from this
	// coordinator before it resolves the migration alone (default 30 s).
	Lease          time.Duration
	TCPEstablished bool
	// NoCompress sends pages without zstd.
	NoCompress bool
	TLS        transport.TLS
	ID         string // default: random
	// Hook, when set, runs at three stages (migrate --action-script):
	// "post-dump" once the source is frozen for good and the target has
	// its images and holds its connections, before the restore: the
	// moment to move the workload's service addresses to the target (an
	// error rolls the migration back); "post-migrate" after the commit;
	// "rollback" when a migration that ran post-dump is undone, before
	// the target drops its copy and the source resumes (move the
	// addresses back). Errors of the last two are logged.
	Hook func(stage string) error
	// Progress, when set, receives every event as it happens.
	Progress func(Event)
	Logger   *slog.Logger
}

// Event is one step of a migration, for progress displays and JSON lines.
type Event struct {
	Event string `json:"event"` // preflight, progress, round, final, restored, pages, committed, rolled-back, unresolved, refused
	ID    string `json:"id"`
	Round int    `json:"round,omitempty"`
	Pages uint64 `json:"pages,omitempty"`
	Bytes uint64 `json:"bytes,omitempty"`
	// Total (progress): the bytes the round is expected to send, 0 when
	// it cannot be told.
	Total   uint64  `json:"total,omitempty"`
	Seconds float64 `json:"seconds,omitempty"`
	// Rate: bytes per second the round's pages went at.
	Rate float64 `json:"rate,omitempty"`
	// DirtyRate: bytes per second the workload wrote, measured over the
	// previous round.
	DirtyRate float64 `json:"dirty_rate,omitempty"`
	// PredictedDowntimeMs: what a final round would cost now.
	PredictedDowntimeMs float64 `json:"predicted_downtime_ms,omitempty"`
	FrozenMs            float64 `json:"frozen_ms,omitempty"`
	Pid                 int     `json:"pid,omitempty"`
	Message             string  `json:"message,omitempty"`
}

// Outcomes.
const (
	Committed  = "committed"   // the tree runs on the target; the source is gone
	RolledBack = "rolled-back" // the tree runs on the source, as before
	Unresolved = "unresolved"  // the agents decide when the lease runs out; the source stays frozen meanwhile
	Refused    = "refused"     // preflight said no; nothing was touched
)

// Result describes a finished migration (also a failed one).
type Result struct {
	ID          string  `json:"id"`
	Outcome     string  `json:"outcome"`
	Pid         int     `json:"pid"`
	From        string  `json:"from"`
	To          string  `json:"to"`
	RestoredPid int     `json:"restored_pid,omitempty"`
	Rounds      int     `json:"rounds"`
	Bytes       uint64  `json:"bytes"`
	DowntimeMs  float64 `json:"downtime_ms,omitempty"`
	FrozenMs    float64 `json:"frozen_ms,omitempty"`   // the source's final freeze, up to its reply
	PostcopyMs  float64 `json:"postcopy_ms,omitempty"` // from the resume on the target to the last page
	TotalMs     float64 `json:"total_ms"`
	Error       string  `json:"error,omitempty"`
}

// Error is a failed migration and what became of it.
type Error struct {
	Outcome string
	Err     error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// NewID returns a fresh migration id: the time and random bits.
func NewID() string {
	var b [6]byte
	rand.Read(b[:])
	return time.Now().UTC().Format("20060102-150405-") + hex.EncodeToString(b[:])
}

type run struct {
	opts     Options
	log      *slog.Logger
	src, dst agentv1.AgentClient
	res      *Result
	start    time.Time
	frozen   bool // the source's final round succeeded: its tree is held
	hooked   bool // the post-dump hook ran
	// sinceFreeze tells, after the restore, how long the tree has been
	// frozen (pre-copy: the target's copy resumes at the commit).
	sinceFreeze func() time.Duration
}

// Migrate moves the tree opts.Pid from the agent opts.From to opts.To.
// The Result is filled in every outcome; the error, when not nil, is an
// *Error naming the outcome.
func Migrate(ctx context.Context, opts Options) (*Result, error) {
	if opts.Mode == "" {
		opts.Mode = "hybrid"
	}
	if opts.MaxDowntime <= 0 {
		opts.MaxDowntime = 100 * time.Millisecond
	}
	if opts.MaxRounds == 0 {
		opts.MaxRounds = 8
	}
	if opts.Lease <= 0 {
		opts.Lease = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ID == "" {
		opts.ID = NewID()
	}
	r := &run{opts: opts, log: opts.Logger.With("migration", opts.ID), start: time.Now(),
		res: &Result{ID: opts.ID, Pid: opts.Pid, From: opts.From, To: opts.To}}
	err := r.migrate(ctx)
	r.res.TotalMs = ms(time.Since(r.start))
	if err != nil {
		var e *Error
		if !errors.As(err, &e) {
			e = &Error{Outcome: RolledBack, Err: err}
			err = e
		}
		r.res.Outcome = e.Outcome
		r.res.Error = e.Err.Error()
		r.event(Event{Event: e.Outcome, Message: e.Err.Error()})
		return r.res, err
	}
	r.res.Outcome = Committed
	r.event(Event{Event: Committed, Pid: r.res.RestoredPid, Seconds: r.res.TotalMs / 1000, Bytes: r.res.Bytes, Round: r.res.Rounds})
	return r.res, nil
}

func (r *run) event(e Event) {
	e.ID = r.opts.ID
	r.log.Info("migration: "+e.Event, "round", e.Round, "pages", e.Pages, "bytes", e.Bytes, "message", e.Message)
	if r.opts.Progress != nil {
		r.opts.Progress(e)
	}
}

func (r *run) migrate(ctx context.Context) error {
	o := r.opts
	switch o.Mode {
	case "precopy", "postcopy", "hybrid":
	default:
		return &Error{Refused, fmt.Errorf("--mode %q: want precopy, postcopy or hybrid", o.Mode)}
	}
	if o.Pid <= 0 {
		return &Error{Refused, fmt.Errorf("invalid pid %d", o.Pid)}
	}
	var conns []*grpc.ClientConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for _, addr := range []string{o.From, o.To} {
		c, err := agentclient.Dial(addr, o.TLS)
		if err != nil {
			return &Error{Refused, fmt.Errorf("agent %s: %w", addr, err)}
		}
		conns = append(conns, c)
	}
	r.src, r.dst = agentv1.NewAgentClient(conns[0]), agentv1.NewAgentClient(conns[1])

	// Preflight: nothing is touched until both sides agree.
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	ins, err := r.src.Inspect(cctx, &agentv1.InspectRequest{Pid: int32(o.Pid)})
	cancel()
	if err != nil {
		return &Error{Refused, fmt.Errorf("source %s: %s", o.From, reason(err))}
	}
	cctx, cancel = context.WithTimeout(ctx, 15*time.Second)
	dstNode, err := r.dst.Info(cctx, &agentv1.InfoRequest{})
	cancel()
	if err != nil {
		return &Error{Refused, fmt.Errorf("target %s: %s", o.To, reason(err))}
	}
	if o.Mode != "precopy" && !dstNode.LazyPages {
		return &Error{Refused, fmt.Errorf("target %s cannot restore lazily (no userfaultfd on kernel %s): --mode %s needs it; use --mode precopy", o.To, dstNode.Kernel, o.Mode)}
	}
	leaseMs := uint32(o.Lease / time.Millisecond)
	cctx, cancel = context.WithTimeout(ctx, 15*time.Second)
	prep, err := r.dst.Prepare(cctx, &agentv1.PrepareRequest{Id: o.ID, Pids: ins.Pids, Rss: ins.Rss,
		CpuFlags: ins.Node.GetCpuFlags(), Kernel: ins.Node.GetKernel(), LeaseMs: leaseMs, SourceAddress: o.From,
		Vdso: ins.Node.GetVdso()})
	cancel()
	if err != nil {
		return &Error{Refused, fmt.Errorf("target %s refuses: %s", o.To, reason(err))}
	}
	r.event(Event{Event: "preflight", Pid: o.Pid, Bytes: ins.Rss,
		Message: fmt.Sprintf("%s (pid %d, %d processes, %d threads, %s resident) from %s (kernel %s) to %s (kernel %s, %s available)",
			ins.Command, o.Pid, max(ins.Processes, 1), len(ins.Pids), Size(ins.Rss), ins.Node.GetName(), ins.Node.GetKernel(),
			dstNode.Name, dstNode.Kernel, Size(dstNode.MemAvailable))})

	// From here on every failure is rolled back. The lease is renewed on
	// both sides while the migration is under way.
	lctx, stopLease := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); r.renew(lctx, leaseMs) }()
	defer func() { stopLease(); wg.Wait() }()

	if err := r.rounds(ctx, prep.PageAddress, leaseMs, ins.Rss); err != nil {
		return r.rollback(err)
	}
	return r.commit(ctx)
}

// rounds runs the pre-copy rounds until they converge, then the final
// round and the restore.
func (r *run) rounds(ctx context.Context, pageAddr string, leaseMs uint32, rss uint64) error {
	o := r.opts
	lazy := o.Mode != "precopy"
	expect := rss // what the next round should send
	// The final round's images go with the restore request, one call
	// fewer while the source is frozen; but not where a post-dump hook may
	// move the service address meanwhile: the target holds the moved
	// connections (from the images) before that.
	withRestore := o.Hook == nil && !o.TCPEstablished
	round := func(k int, final bool) (*agentv1.RoundReply, error) {
		stop := r.watchRound(ctx, k, expect)
		rep, err := r.src.Round(ctx, &agentv1.RoundRequest{Id: o.ID, Pid: int32(o.Pid), Round: int32(k), Final: final,
			PageAddress: pageAddr, LeaseMs: leaseMs, TargetAddress: o.To, TcpEstablished: o.TCPEstablished,
			Lazy: final && lazy, NoCompress: o.NoCompress})
		stop()
		if err != nil {
			return nil, fmt.Errorf("round %d on %s: %s", k, o.From, reason(err))
		}
		if final {
			r.frozen = true
		}
		r.res.Rounds = k
		r.res.Bytes += rep.Bytes
		if final && withRestore {
			return rep, nil // its images go with the restore request
		}
		if _, err := r.dst.PutFiles(ctx, &agentv1.PutFilesRequest{Id: o.ID, Round: int32(k), Files: rep.Files}); err != nil {
			return nil, fmt.Errorf("round %d: images to %s: %s", k, o.To, reason(err))
		}
		return rep, nil
	}
	var prev *agentv1.RoundReply
	k := 1
	if o.Mode == "postcopy" || o.MaxRounds < 0 {
		k = 0 // straight to the final round
	}
	for ; k >= 1 && k <= o.MaxRounds; k++ {
		rep, err := round(k, false)
		if err != nil {
			return err
		}
		d := time.Duration(rep.DurationUs) * time.Microsecond
		e := Event{Event: "round", Round: k, Pages: rep.PagesWritten, Bytes: rep.Bytes, Seconds: d.Seconds(), FrozenMs: float64(rep.FrozenUs) / 1000}
		if d > 0 && rep.Bytes > 0 {
			e.Rate = float64(rep.Bytes) / d.Seconds()
		}
		stop, why := false, ""
		if prev != nil {
			// What this round sent was written during the previous one.
			pd := time.Duration(prev.DurationUs) * time.Microsecond
			e.DirtyRate = float64(rep.Bytes) / pd.Seconds()
			rate := e.Rate
			if rate == 0 && prev.DurationUs > 0 {
				rate = float64(prev.Bytes) / pd.Seconds()
			}
			// A final round now: what gets dirty while this round ran,
			// sent at this rate, plus the fixed cost of a freeze.
			predicted := 2 * time.Duration(rep.FrozenUs) * time.Microsecond
			if rate > 0 {
				predicted += time.Duration(e.DirtyRate * d.Seconds() / rate * float64(time.Second))
			}
			e.PredictedDowntimeMs = ms(predicted)
			switch {
			case predicted <= o.MaxDowntime:
				stop, why = true, "converged"
			case float64(rep.Bytes) > 0.9*float64(prev.Bytes):
				stop, why = true, "not converging (the workload writes as fast as the rounds send)"
			}
		} else if d <= o.MaxDowntime/2 {
			stop, why = true, "small enough"
		}
		if k == o.MaxRounds && !stop {
			stop, why = true, fmt.Sprintf("round limit (%d)", o.MaxRounds)
		}
		if stop {
			e.Message = why
		}
		r.event(e)
		prev = rep
		expect = 0
		if e.DirtyRate > 0 {
			expect = uint64(e.DirtyRate * d.Seconds())
		}
		if stop {
			break
		}
	}
	if k > 0 && k > o.MaxRounds {
		k = o.MaxRounds
	}
	final := k + 1
	rep, err := round(final, true)
	if err != nil {
		return err
	}
	replied := time.Now()
	frozen := time.Duration(rep.FrozenUntilReplyUs) * time.Microsecond
	r.res.FrozenMs = ms(frozen)
	msg := "source frozen; restoring on the target"
	if lazy {
		msg = fmt.Sprintf("source frozen; %d pages left for post-copy", rep.PagesLazy)
		if rep.Unlisted {
			msg = "source frozen; its memory follows post-copy"
		}
	}
	r.event(Event{Event: "final", Round: final, Pages: rep.PagesWritten, Bytes: rep.Bytes, FrozenMs: ms(frozen), Message: msg})
	if o.Hook != nil {
		r.hooked = true
		if err := o.Hook("post-dump"); err != nil {
			return fmt.Errorf("action script, post-dump: %w", err)
		}
	}
	req := &agentv1.RestoreRequest{Id: o.ID, Round: int32(final), LazyAddress: rep.LazyAddress}
	if withRestore {
		req.Files = rep.Files
	}
	rr, err := r.dst.Restore(ctx, req)
	if err != nil {
		return fmt.Errorf("restore on %s: %s", o.To, reason(err))
	}
	r.res.RestoredPid = int(rr.Root)
	r.sinceFreeze = func() time.Duration { return frozen + time.Since(replied) }
	r.res.DowntimeMs = ms(r.sinceFreeze())
	if !lazy {
		r.event(Event{Event: "restored", Pid: int(rr.Root), Seconds: float64(rr.DurationUs) / 1e6,
			Message: "stopped until the commit"})
		return nil
	}
	r.event(Event{Event: "restored", Pid: int(rr.Root), Seconds: float64(rr.DurationUs) / 1e6, Message: "it runs there"})
	// Post-copy: the tree runs on the target and pulls the rest of its
	// memory from the frozen source; the target commits once it has it all.
	pr, err := r.dst.WaitPages(ctx, &agentv1.MigrationRef{Id: o.ID})
	if err != nil {
		return fmt.Errorf("post-copy on %s: %s (what the tree did on the target since it resumed is lost)", o.To, reason(err))
	}
	r.res.Bytes += pr.Pages * pageSize
	r.res.PostcopyMs = float64(pr.DurationUs) / 1000
	r.event(Event{Event: "pages", Pages: pr.Pages, Bytes: pr.Pages * pageSize, Seconds: float64(pr.DurationUs) / 1e6,
		Message: fmt.Sprintf("every page arrived (%d on demand)", pr.Faults)})
	return nil
}

const pageSize = 4096

// watchRound reports the progress of round k (expected to send expect
// bytes) until the returned function is called, asking the source every
// quarter second. Progress events go to Options.Progress only (not to the
// log).
func (r *run) watchRound(ctx context.Context, k int, expect uint64) (stop func()) {
	if r.opts.Progress == nil {
		return func() {}
	}
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		start := time.Now()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
			}
			st, err := r.src.Status(wctx, &agentv1.MigrationRef{Id: r.opts.ID})
			if err != nil || int(st.Round) != k || st.RoundBytes == 0 || wctx.Err() != nil {
				continue
			}
			r.opts.Progress(Event{Event: "progress", ID: r.opts.ID, Round: k, Bytes: st.RoundBytes, Total: expect,
				Rate: float64(st.RoundBytes) / time.Since(start).Seconds()})
		}
	}()
	return func() { cancel(); <-done }
}

// commit makes the target record the migration as done, then has the
// source kill its frozen tree.
func (r *run) commit(ctx context.Context) error {
	o := r.opts
	downtime := uint64(r.res.DowntimeMs * 1000)
	if _, err := r.dst.Commit(ctx, &agentv1.MigrationRef{Id: o.ID, DowntimeUs: downtime}); err != nil {
		// Did the target record it? Only the target knows.
		st, serr := r.dst.Status(ctx, &agentv1.MigrationRef{Id: o.ID})
		switch {
		case serr != nil:
			return &Error{Unresolved, fmt.Errorf("commit on %s: %s; its outcome is unknown: the source stays frozen until the agents settle it", o.To, reason(err))}
		case st.State != agentclient.StateCommitted:
			return r.rollback(fmt.Errorf("commit on %s: %s", o.To, reason(err)))
		}
	}
	if o.Mode == "precopy" {
		// The copy resumed at the commit.
		r.res.DowntimeMs = ms(r.sinceFreeze())
	}
	if _, err := r.src.Finish(ctx, &agentv1.FinishRequest{Id: o.ID, Commit: true}); err != nil {
		// Committed all the same; the source agent kills the frozen tree
		// when the lease runs out and the target tells it.
		r.log.Warn("migration committed, but the source did not confirm removing its tree", "err", reason(err))
	}
	if o.Hook != nil {
		if err := o.Hook("post-migrate"); err != nil {
			r.log.Warn("action script, post-migrate", "err", err)
		}
	}
	return nil
}

// rollback undoes a migration that failed with err: the target's copy
// first, then the source resumes.
func (r *run) rollback(err error) error {
	o := r.opts
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r.log.Warn("migration failed; rolling back", "err", err)
	if r.hooked {
		// The addresses go back first: the target's copy may still
		// run, but the source stays frozen until the target confirms.
		if herr := o.Hook("rollback"); herr != nil {
			r.log.Warn("action script, rollback", "err", herr)
		}
	}
	if _, derr := r.dst.Finish(ctx, &agentv1.FinishRequest{Id: o.ID}); derr != nil {
		if r.frozen {
			return &Error{Unresolved, fmt.Errorf("%w; rolling back: target %s: %s (the source stays frozen until the agents settle it)", err, o.To, reason(derr))}
		}
		r.log.Warn("rollback on the target", "err", reason(derr))
	}
	if _, serr := r.src.Finish(ctx, &agentv1.FinishRequest{Id: o.ID}); serr != nil {
		if r.frozen {
			return &Error{Unresolved, fmt.Errorf("%w; rolling back: source %s: %s (its agent resumes the tree when the lease runs out)", err, o.From, reason(serr))}
		}
	}
	return &Error{RolledBack, err}
}

// renew keeps both leases alive until ctx ends.
func (r *run) renew(ctx context.Context, leaseMs uint32) {
	t := time.NewTicker(r.opts.Lease / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, c := range []agentv1.AgentClient{r.src, r.dst} {
			cctx, cancel := context.WithTimeout(ctx, r.opts.Lease/3)
			c.Renew(cctx, &agentv1.RenewRequest{Id: r.opts.ID, LeaseMs: leaseMs})
			cancel()
		}
	}
}

// reason is a gRPC error's message without the status decoration.
func reason(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Message()
	}
	return err.Error()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Size prints a byte count for people: KiB, MiB or GiB.
func Size(b uint64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", b>>10)
}

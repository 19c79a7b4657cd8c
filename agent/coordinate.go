package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/coordinator"
)

// coordinated is a migration this agent coordinates (Migrate).
type coordinated struct {
	done chan struct{}
	res  *coordinator.Result // set when done
}

// Migrate starts a migration of a tree of this node, coordinated here.
func (a *Agent) Migrate(ctx context.Context, req *agentv1.MigrateRequest) (*agentv1.MigrationRef, error) {
	if req.Pid <= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "pid %d", req.Pid)
	}
	if req.To == "" {
		return nil, status.Error(codes.InvalidArgument, "no target agent (to)")
	}
	opts := coordinator.Options{
		Pid: int(req.Pid), From: a.advertised(), To: req.To, Mode: req.Mode,
		MaxDowntime: time.Duration(req.MaxDowntimeMs) * time.Millisecond, MaxRounds: int(req.MaxRounds),
		Lease: time.Duration(req.LeaseMs) * time.Millisecond, TCPEstablished: req.TcpEstablished, NoCompress: req.NoCompress,
		TLS: a.tls, ID: req.Id, Logger: a.log,
	}
	if opts.ID == "" {
		opts.ID = coordinator.NewID()
	} else if err := checkID(opts.ID); err != nil {
		return nil, err
	}
	c := &coordinated{done: make(chan struct{})}
	a.mu.Lock()
	if _, ok := a.coordinated[opts.ID]; ok {
		a.mu.Unlock()
		return nil, status.Errorf(codes.AlreadyExists, "migration %s exists", opts.ID)
	}
	a.coordinated[opts.ID] = c
	a.mu.Unlock()
	go func() {
		// The agent's own lifetime bounds it, not the caller's call.
		res, err := coordinator.Migrate(a.ctx, opts)
		if err != nil {
			a.log.Warn("migration: coordinated here, not committed", "id", opts.ID, "outcome", res.Outcome, "err", err)
		} else {
			a.log.Info("migration: coordinated here, committed", "id", opts.ID, "downtime_ms", res.DowntimeMs)
		}
		if err := a.saveResult(res); err != nil {
			a.log.Warn("migration: keeping its result", "id", opts.ID, "err", err)
		}
		c.res = res
		close(c.done)
	}()
	return &agentv1.MigrationRef{Id: opts.ID}, nil
}

// Result reports a migration this agent coordinates.
func (a *Agent) Result(ctx context.Context, req *agentv1.ResultRequest) (*agentv1.MigrationResult, error) {
	if err := checkID(req.Id); err != nil {
		return nil, err
	}
	a.mu.Lock()
	c, ok := a.coordinated[req.Id]
	a.mu.Unlock()
	if !ok {
		return a.pastResult(ctx, req)
	}
	if req.Wait {
		select {
		case <-c.done:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	select {
	case <-c.done:
	default:
		return &agentv1.MigrationResult{Id: req.Id}, nil
	}
	return resultMessage(c.res), nil
}

func resultMessage(r *coordinator.Result) *agentv1.MigrationResult {
	return &agentv1.MigrationResult{Id: r.ID, Done: true, Outcome: r.Outcome, Error: r.Error, Pid: int32(r.Pid),
		RestoredPid: int32(r.RestoredPid), Rounds: int32(r.Rounds), Bytes: r.Bytes, DowntimeMs: r.DowntimeMs,
		FrozenMs: r.FrozenMs, PostcopyMs: r.PostcopyMs, TotalMs: r.TotalMs, From: r.From, To: r.To}
}

func (a *Agent) resultPath(id string) string {
	return filepath.Join(a.cfg.StateDir, "results", id+".json")
}

// saveResult keeps the result of a migration coordinated here in the
// state directory: it outlives the agent.
func (a *Agent) saveResult(r *coordinator.Result) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	p := a.resultPath(r.ID)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(p+".tmp", append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(p+".tmp", p)
}

// pastResult answers for a migration this agent does not coordinate now:
// one it coordinated before a restart (its saved result), or, failing
// that, one it took part in as the source (what its record says; the
// figures are lost).
func (a *Agent) pastResult(ctx context.Context, req *agentv1.ResultRequest) (*agentv1.MigrationResult, error) {
	if b, err := os.ReadFile(a.resultPath(req.Id)); err == nil {
		var r coordinator.Result
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, status.Errorf(codes.DataLoss, "the result of migration %s: %v", req.Id, err)
		}
		return resultMessage(&r), nil
	}
	m, err := a.get(req.Id)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "no migration %s coordinated by %s", req.Id, a.cfg.Name)
	}
	for req.Wait && !terminal(a.recordOf(m).State) {
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	rec := a.recordOf(m)
	if !terminal(rec.State) {
		return &agentv1.MigrationResult{Id: req.Id}, nil
	}
	return &agentv1.MigrationResult{Id: req.Id, Done: true, Outcome: rec.State, Pid: int32(rec.Pid), To: rec.Peer,
		Error: fmt.Sprintf("%s restarted while it coordinated this migration: only its outcome is known", a.cfg.Name)}, nil
}

package agent

import (
	"context"
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
		c.res = res
		close(c.done)
	}()
	return &agentv1.MigrationRef{Id: opts.ID}, nil
}

// Result reports a migration this agent coordinates.
func (a *Agent) Result(ctx context.Context, req *agentv1.ResultRequest) (*agentv1.MigrationResult, error) {
	a.mu.Lock()
	c, ok := a.coordinated[req.Id]
	a.mu.Unlock()
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no migration %s coordinated by %s (since it started)", req.Id, a.cfg.Name)
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
	r := c.res
	return &agentv1.MigrationResult{Id: r.ID, Done: true, Outcome: r.Outcome, Error: r.Error, Pid: int32(r.Pid),
		RestoredPid: int32(r.RestoredPid), Rounds: int32(r.Rounds), Bytes: r.Bytes, DowntimeMs: r.DowntimeMs,
		FrozenMs: r.FrozenMs, PostcopyMs: r.PostcopyMs, TotalMs: r.TotalMs, From: r.From, To: r.To}, nil
}

// Package agent is ferry's per-host daemon: a gRPC service (agent/api/v1)
// over mutual TLS that runs the source and target halves of migrations —
// inspection, preflight, pre-copy rounds streamed to a page-server session,
// the final dump, the restore, and the commit or rollback — and keeps each
// migration's record in its state directory, so that an agent that
// restarts, or whose coordinator vanished, resolves what it left.
//
// The target is the authority on a migration's outcome: its record says
// "committed" or not. A source whose lease ran out asks the target before
// it does anything with the frozen tree, and keeps the tree frozen while
// the target cannot be reached: the workload never runs on two hosts.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/ferrycr/ferry/agent/agentclient"
	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
	"github.com/ferrycr/ferry/transport"
)

// Config configures an agent.
type Config struct {
	Name     string // node name (default: the host name)
	Listen   string // gRPC host:port
	PageHost string // host the page-server sessions listen on (default: Listen's host)
	StateDir string // migration records and session images
	// RunDir (default StateDir) holds the migration records and a
	// source's round images, which are small: a file system of their own
	// (a tmpfs, /run/ferry) keeps their writes from waiting for the
	// journal of the one that takes gigabytes of pages (over a second
	// here, with the workload frozen).
	RunDir  string
	TLS     transport.TLS // mutual TLS, required
	Version string
	// Lease is the default lease of a migration whose coordinator names
	// none: how long a side waits without hearing from it before it
	// resolves the migration on its own.
	Lease time.Duration
	// Fault makes a step fail on purpose, for tests of the rollback:
	// "restore" (before restoring), "slow-restore" (2 s before
	// restoring), "after-restore" (with the tree restored and running),
	// "commit".
	Fault string
	// Gossip, when its Bind is set, joins cluster membership.
	Gossip Gossip
	Logger *slog.Logger
}

// MaxMessage bounds a gRPC message.
const MaxMessage = agentclient.MaxMessage

// Agent is a running agent.
type Agent struct {
	agentv1.UnimplementedAgentServer
	cfg  Config
	log  *slog.Logger
	tls  transport.TLS
	grpc *grpc.Server
	lis  net.Listener

	metrics *metrics
	ml      *memberlist.Memberlist // nil outside a cluster; guarded by mu

	ctx context.Context // the agent's lifetime (Serve's context)

	mu          sync.Mutex
	coordinated map[string]*coordinated
	migs        map[string]*migration
	peers       map[string]*grpc.ClientConn
}

// New checks cfg, loads the records of the state directory and listens.
func New(cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.StateDir == "" {
		return nil, errors.New("agent: --state-dir is required")
	}
	if cfg.RunDir == "" {
		cfg.RunDir = cfg.StateDir
	}
	if cfg.Lease <= 0 {
		cfg.Lease = 30 * time.Second
	}
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	cfg.TLS.Enabled = true
	srvTLS, err := cfg.TLS.ServerConfig()
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(cfg.RunDir, "migrations"), 0o700); err != nil {
		return nil, fmt.Errorf("agent: state directory: %w", err)
	}
	host, _, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("agent: --listen %q: %w", cfg.Listen, err)
	}
	if cfg.PageHost == "" {
		cfg.PageHost = host
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, tls: cfg.TLS, migs: map[string]*migration{}, coordinated: map[string]*coordinated{}, ctx: context.Background(), peers: map[string]*grpc.ClientConn{}}
	a.metrics = newMetrics(a)
	if err := a.load(); err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("agent: listen on %s: %w", cfg.Listen, err)
	}
	a.lis = lis
	a.grpc = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(srvTLS)),
		grpc.MaxRecvMsgSize(MaxMessage), grpc.MaxSendMsgSize(MaxMessage),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: agentclient.KeepaliveMin, PermitWithoutStream: true}),
		grpc.UnaryInterceptor(a.logCalls),
	)
	agentv1.RegisterAgentServer(a.grpc, a)
	return a, nil
}

// Name is the node's name.
func (a *Agent) Name() string { return a.cfg.Name }

// Addr is the address the agent's gRPC service listens on.
func (a *Agent) Addr() string { return a.lis.Addr().String() }

// Serve serves until ctx ends, resolving migrations whose lease ran out.
func (a *Agent) Serve(ctx context.Context) error {
	a.ctx = ctx
	if a.cfg.Gossip.Bind != "" {
		if err := a.startGossip(ctx, a.cfg.Gossip); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
	}
	go a.watch(ctx)
	go func() {
		<-ctx.Done()
		a.grpc.Stop()
	}()
	a.log.Info("agent: serving", "name", a.cfg.Name, "address", a.Addr(), "state-dir", a.cfg.StateDir)
	err := a.grpc.Serve(a.lis)
	a.mu.Lock()
	for _, c := range a.peers {
		c.Close()
	}
	for _, m := range a.migs {
		m.stopSession()
	}
	a.mu.Unlock()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (a *Agent) logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	if err != nil {
		a.log.Warn("agent: call failed", "method", info.FullMethod, "took", time.Since(start), "err", err)
	} else {
		a.log.Debug("agent: call", "method", info.FullMethod, "took", time.Since(start))
	}
	return resp, err
}

// peer returns a client of the agent at addr, connecting once.
func (a *Agent) peer(addr string) (agentv1.AgentClient, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c, ok := a.peers[addr]; ok {
		return agentv1.NewAgentClient(c), nil
	}
	c, err := agentclient.Dial(addr, a.tls)
	if err != nil {
		return nil, err
	}
	a.peers[addr] = c
	return agentv1.NewAgentClient(c), nil
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func checkID(id string) error {
	if !idRE.MatchString(id) {
		return status.Errorf(codes.InvalidArgument, "migration id %q: want 1-64 letters, digits, '.', '_' or '-'", id)
	}
	return nil
}

func (a *Agent) lease(ms uint32) time.Duration {
	if ms == 0 {
		return a.cfg.Lease
	}
	return time.Duration(ms) * time.Millisecond
}

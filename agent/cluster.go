package agent

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agentv1 "github.com/ferrycr/ferry/agent/api/v1"
)

// Gossip configures cluster membership (hashicorp/memberlist).
type Gossip struct {
	Bind string   // host:port of the gossip (UDP and TCP)
	Join []string // members to join at start
	// KeyFile holds the gossip encryption key (16, 24 or 32 bytes, in
	// base64): required, gossip is never sent in clear.
	KeyFile string
}

// nodeMeta is what each member gossips about itself (kept under
// memberlist's 512-byte limit: short keys).
type nodeMeta struct {
	GRPC       string  `json:"g"`
	Kernel     string  `json:"k"`
	Mem        uint64  `json:"m"`
	Load       float64 `json:"l"`
	Migrations int32   `json:"n"`
	Lazy       bool    `json:"z,omitempty"`
}

// ReadGossipKey reads a base64 gossip key from path.
func ReadGossipKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("gossip key: %w", err)
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("gossip key %s: not base64: %w", path, err)
	}
	switch len(key) {
	case 16, 24, 32:
		return key, nil
	}
	return nil, fmt.Errorf("gossip key %s: %d bytes; want 16, 24 or 32", path, len(key))
}

// delegate gives memberlist this node's metadata.
type delegate struct{ a *Agent }

func (d delegate) NodeMeta(limit int) []byte {
	n := d.a.node()
	b, _ := json.Marshal(nodeMeta{GRPC: n.GrpcAddress, Kernel: n.Kernel, Mem: n.MemAvailable, Load: n.Load1, Migrations: n.Migrations, Lazy: n.LazyPages})
	if len(b) > limit {
		b, _ = json.Marshal(nodeMeta{GRPC: n.GrpcAddress})
	}
	return b
}
func (delegate) NotifyMsg([]byte)                           {}
func (delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (delegate) LocalState(join bool) []byte                { return nil }
func (delegate) MergeRemoteState(buf []byte, join bool)     {}

// startGossip joins the cluster and keeps this node's metadata fresh
// until ctx ends.
func (a *Agent) startGossip(ctx context.Context, g Gossip) error {
	key, err := ReadGossipKey(g.KeyFile)
	if err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(g.Bind)
	if err != nil {
		return fmt.Errorf("--gossip %q: %w", g.Bind, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return fmt.Errorf("--gossip %q: port: %w", g.Bind, err)
	}
	conf := memberlist.DefaultLANConfig()
	conf.Name = a.cfg.Name
	conf.BindAddr, conf.BindPort = host, p
	conf.AdvertisePort = p
	conf.SecretKey = key
	conf.Delegate = delegate{a}
	conf.Logger = log.New(slogWriter{a}, "", 0)
	ml, err := memberlist.Create(conf)
	if err != nil {
		return fmt.Errorf("gossip on %s: %w", g.Bind, err)
	}
	a.mu.Lock()
	a.ml = ml
	a.mu.Unlock()
	if len(g.Join) > 0 {
		if n, err := ml.Join(g.Join); err != nil {
			a.log.Warn("agent: joining the cluster", "members", g.Join, "joined", n, "err", err)
		} else {
			a.log.Info("agent: joined the cluster", "members", g.Join, "joined", n)
		}
	}
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				ml.Leave(time.Second)
				ml.Shutdown()
				return
			case <-t.C:
				ml.UpdateNode(time.Second) // fresh load, memory, migrations
			}
		}
	}()
	return nil
}

// slogWriter passes memberlist's log lines to the agent's log.
type slogWriter struct{ a *Agent }

func (w slogWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	switch {
	case strings.Contains(line, "[ERR]"):
		w.a.log.Error("gossip: " + line)
	case strings.Contains(line, "[WARN]"):
		w.a.log.Warn("gossip: " + line)
	default:
		w.a.log.Debug("gossip: " + line)
	}
	return len(p), nil
}

var _ io.Writer = slogWriter{}

// Nodes lists the cluster's members as this node sees them.
func (a *Agent) Nodes(ctx context.Context, _ *agentv1.NodesRequest) (*agentv1.NodesReply, error) {
	a.mu.Lock()
	ml := a.ml
	a.mu.Unlock()
	if ml == nil {
		// Not in a cluster: just this node.
		n := a.node()
		n.State = "alive"
		return &agentv1.NodesReply{Nodes: []*agentv1.NodeInfo{n}}, nil
	}
	var out []*agentv1.NodeInfo
	for _, m := range ml.Members() {
		var meta nodeMeta
		if err := json.Unmarshal(m.Meta, &meta); err != nil {
			return nil, status.Errorf(codes.Internal, "member %s: metadata: %v", m.Name, err)
		}
		out = append(out, &agentv1.NodeInfo{Name: m.Name, GrpcAddress: meta.GRPC, Kernel: meta.Kernel,
			MemAvailable: meta.Mem, Load1: meta.Load, Migrations: meta.Migrations, LazyPages: meta.Lazy,
			State: memberState(m.State)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return &agentv1.NodesReply{Nodes: out}, nil
}

func memberState(s memberlist.NodeStateType) string {
	switch s {
	case memberlist.StateAlive:
		return "alive"
	case memberlist.StateSuspect:
		return "suspect"
	case memberlist.StateDead:
		return "dead"
	case memberlist.StateLeft:
		return "left"
	}
	return "unknown"
}

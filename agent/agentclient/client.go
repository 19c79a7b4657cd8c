// Package agentclient connects to ferry agents (agent/api/v1) with mutual
// TLS. Coordinators, the command line and agents use it.
package agentclient

import (
	"crypto/tls"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/ferrycr/ferry/transport"
)

// MaxMessage bounds a gRPC message: a round's images (a fragmented 4 GiB
// process's pagemap is a few MiB).
const MaxMessage = 256 << 20

// Keepalive has a call on an agent that vanished (host down, link cut)
// fail within seconds instead of waiting for TCP. Agents accept pings this
// often (KeepaliveMin).
var Keepalive = keepalive.ClientParameters{Time: 2 * time.Second, Timeout: 3 * time.Second, PermitWithoutStream: true}

// KeepaliveMin is the shortest ping interval an agent accepts.
const KeepaliveMin = time.Second

// StateCommitted is the state a migration's record ends in when done.
const StateCommitted = "committed"

// Dial connects to the agent at addr (host:port) with mutual TLS.
func Dial(addr string, t transport.TLS) (*grpc.ClientConn, error) {
	t.Enabled = true
	cfg, err := t.ClientConfig(addr)
	if err != nil {
		return nil, err
	}
	return DialTLS(addr, cfg)
}

// DialTLS connects to the agent at addr with the given TLS configuration.
func DialTLS(addr string, cfg *tls.Config) (*grpc.ClientConn, error) {
	return grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg)),
		grpc.WithKeepaliveParams(Keepalive),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessage), grpc.MaxCallSendMsgSize(MaxMessage)))
}

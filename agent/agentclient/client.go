// Package agentclient connects to ferry agents (agent/api/v1) with mutual
// TLS. Coordinators, the command line and agents use it.
package agentclient

import (
	"crypto/tls"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/ferrycr/ferry/transport"
)

// MaxMessage bounds a gRPC message: a round's images (a fragmented 4 GiB
// process's pagemap is a few MiB).
const MaxMessage = 256 << 20

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
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessage), grpc.MaxCallSendMsgSize(MaxMessage)))
}

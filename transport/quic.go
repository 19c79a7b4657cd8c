package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/quic-go/quic-go"
)

// Networks a page stream runs over.
const (
	TCP  = "tcp"
	QUIC = "quic"
)

// alpn names ferry's page stream protocol in the QUIC handshake.
const alpn = "ferry-pages/1"

// ErrQUICNeedsTLS: QUIC always encrypts, and ferry always authenticates
// both ends of an encrypted stream.
var ErrQUICNeedsTLS = errors.New("the quic transport needs --tls with --tls-cacert, --tls-cert and --tls-key")

// ListenOn listens on network ("tcp", "quic") at addr. onReject, when set,
// is told about peers refused during the handshake (QUIC does not return
// them from Accept).
func ListenOn(network, addr string, t TLS, onReject func(error)) (net.Listener, error) {
	if network == "" || network == TCP {
		return Listen(addr, t)
	}
	cfg, pool, err := quicTLS(network, t)
	if err != nil {
		return nil, err
	}
	// Verify the client chain ourselves so that a refusal can be reported.
	cfg.ClientAuth = tls.RequireAnyClientCert
	crlCheck := cfg.VerifyPeerCertificate
	cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		err := verifyClient(raw, pool)
		if err == nil && crlCheck != nil {
			err = crlCheck(raw, [][]*x509.Certificate{parseAll(raw)})
		}
		if err != nil && onReject != nil {
			onReject(err)
		}
		return err
	}
	l, err := quic.ListenAddr(addr, cfg, &quic.Config{KeepAlivePeriod: 10 * time.Second, MaxIdleTimeout: 60 * time.Second})
	if err != nil {
		return nil, err
	}
	return &quicListener{l: l}, nil
}

// quicTLS checks the network is QUIC and builds its TLS configuration.
func quicTLS(network string, t TLS) (*tls.Config, *x509.CertPool, error) {
	if network != QUIC {
		return nil, nil, fmt.Errorf("unknown transport %q (tcp or quic)", network)
	}
	if !t.Enabled {
		return nil, nil, ErrQUICNeedsTLS
	}
	cfg, pool, err := t.base()
	if err != nil {
		return nil, nil, err
	}
	cfg.NextProtos = []string{alpn}
	return cfg, pool, nil
}

func parseAll(raw [][]byte) []*x509.Certificate {
	var out []*x509.Certificate
	for _, r := range raw {
		if c, err := x509.ParseCertificate(r); err == nil {
			out = append(out, c)
		}
	}
	return out
}

func verifyClient(raw [][]byte, pool *x509.CertPool) error {
	certs := parseAll(raw)
	if len(certs) == 0 {
		return errors.New("client sent no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return fmt.Errorf("client certificate %q: %w", certs[0].Subject, err)
	}
	return nil
}

// DialOn connects over network ("tcp", "quic").
func DialOn(ctx context.Context, network, addr string, t TLS) (net.Conn, error) {
	if network == "" || network == TCP {
		return Dial(ctx, addr, t)
	}
	cfg, pool, err := quicTLS(network, t)
	if err != nil {
		return nil, err
	}
	cfg.RootCAs = pool
	host, _, _ := net.SplitHostPort(addr)
	cfg.ServerName = host
	c, err := quic.DialAddr(ctx, addr, cfg, &quic.Config{KeepAlivePeriod: 10 * time.Second, MaxIdleTimeout: 60 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("QUIC handshake with %s: %w", addr, err)
	}
	s, err := c.OpenStreamSync(ctx)
	if err != nil {
		c.CloseWithError(1, "no stream")
		return nil, err
	}
	return &quicConn{Stream: s, c: c}, nil
}

type quicListener struct{ l *quic.Listener }

func (q *quicListener) Accept() (net.Conn, error) {
	for {
		c, err := q.l.Accept(context.Background())
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s, err := c.AcceptStream(ctx)
		cancel()
		if err != nil {
			c.CloseWithError(1, "no stream")
			continue
		}
		return &quicConn{Stream: s, c: c}, nil
	}
}

func (q *quicListener) Close() error   { return q.l.Close() }
func (q *quicListener) Addr() net.Addr { return q.l.Addr() }

// quicConn is one QUIC stream of its own connection, as a net.Conn.
type quicConn struct {
	*quic.Stream
	c *quic.Conn
}

func (q *quicConn) LocalAddr() net.Addr  { return q.c.LocalAddr() }
func (q *quicConn) RemoteAddr() net.Addr { return q.c.RemoteAddr() }

// Close ends the send side, waits (briefly) for the peer to end its side
// so that nothing in flight is cut, then closes the connection.
func (q *quicConn) Close() error {
	q.Stream.Close()
	q.Stream.SetReadDeadline(time.Now().Add(2 * time.Second))
	io.Copy(io.Discard, q.Stream)
	return q.c.CloseWithError(0, "done")
}

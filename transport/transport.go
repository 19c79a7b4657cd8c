package transport

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// DeadPeer bounds how long a TCP stream waits on a peer that vanished
// (host down, link cut) before it fails: data unacknowledged for that long
// (TCP_USER_TIMEOUT), or an idle peer silent to keepalive probes for about
// as long. TCP's own limits are many minutes.
const DeadPeer = 15 * time.Second

var keepAlive = net.KeepAliveConfig{Enable: true, Idle: 5 * time.Second, Interval: 2 * time.Second, Count: 5}

// control sets TCP_USER_TIMEOUT (DeadPeer) on a socket before it connects
// or listens (accepted sockets inherit it).
func control(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(DeadPeer/time.Millisecond))
	})
	if err != nil {
		return err
	}
	return os.NewSyscallError("setsockopt TCP_USER_TIMEOUT", serr)
}

// TLS configures mutual TLS; zero value: plain TCP.
type TLS struct {
	Enabled bool
	CACert  string // --tls-cacert: trusted CA (PEM)
	CRL     string // --tls-cacrl: revoked certificates (PEM or DER)
	Cert    string // --tls-cert
	Key     string // --tls-key
}

// ErrRevoked reports a peer certificate on the CRL.
var ErrRevoked = errors.New("peer certificate is revoked")

func (t TLS) base() (*tls.Config, *x509.CertPool, error) {
	if t.CACert == "" || t.Cert == "" || t.Key == "" {
		return nil, nil, errors.New("TLS needs --tls-cacert, --tls-cert and --tls-key")
	}
	pem, err := os.ReadFile(t.CACert)
	if err != nil {
		return nil, nil, fmt.Errorf("--tls-cacert: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, nil, fmt.Errorf("--tls-cacert %s: no certificate", t.CACert)
	}
	cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	if t.CRL != "" {
		b, err := os.ReadFile(t.CRL)
		if err != nil {
			return nil, nil, fmt.Errorf("--tls-cacrl: %w", err)
		}
		crl, err := parseCRL(b)
		if err != nil {
			return nil, nil, fmt.Errorf("--tls-cacrl %s: %w", t.CRL, err)
		}
		cfg.VerifyPeerCertificate = func(_ [][]byte, chains [][]*x509.Certificate) error {
			for _, chain := range chains {
				for _, c := range chain {
					for _, r := range crl.RevokedCertificateEntries {
						if r.SerialNumber.Cmp(c.SerialNumber) == 0 {
							return fmt.Errorf("%w: serial %s (%s)", ErrRevoked, c.SerialNumber, c.Subject)
						}
					}
				}
			}
			return nil
		}
	}
	return cfg, pool, nil
}

func parseCRL(b []byte) (*x509.RevocationList, error) {
	if blk, _ := pemDecode(b); blk != nil {
		b = blk
	}
	return x509.ParseRevocationList(b)
}

// Listen listens on addr (host:port), with TLS if enabled.
func Listen(addr string, t TLS) (net.Listener, error) {
	lc := net.ListenConfig{KeepAliveConfig: keepAlive, Control: control}
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, err
	}
	return serverTLS(l, t)
}

// ListenConn is a listener whose only connection is c, already connected
// (criu's --ps-socket), with TLS if enabled.
func ListenConn(c net.Conn, t TLS) (net.Listener, error) {
	return serverTLS(&oneConn{c: c}, t)
}

func serverTLS(l net.Listener, t TLS) (net.Listener, error) {
	if !t.Enabled {
		return l, nil
	}
	cfg, pool, err := t.base()
	if err != nil {
		l.Close()
		return nil, err
	}
	cfg.ClientCAs = pool
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	return tls.NewListener(l, cfg), nil
}

// Dial connects to addr, with TLS if enabled (the server name is checked
// against the certificate).
func Dial(ctx context.Context, addr string, t TLS) (net.Conn, error) {
	d := net.Dialer{KeepAliveConfig: keepAlive, Control: control}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return clientTLS(ctx, c, t)
}

// DialConn runs the client side over c, already connected (criu's
// --ps-socket), with TLS if enabled (the peer's address is checked
// against its certificate).
func DialConn(ctx context.Context, c net.Conn, t TLS) (net.Conn, error) {
	return clientTLS(ctx, c, t)
}

func clientTLS(ctx context.Context, c net.Conn, t TLS) (net.Conn, error) {
	if !t.Enabled {
		return c, nil
	}
	cfg, pool, err := t.base()
	if err != nil {
		c.Close()
		return nil, err
	}
	cfg.RootCAs = pool
	cfg.ClientSessionCache = sessionCache(t)
	addr := c.RemoteAddr().String()
	cfg.ServerName, _, _ = net.SplitHostPort(addr)
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("TLS handshake with %s: %w", addr, err)
	}
	return tc, nil
}

// sessions keeps TLS sessions per client identity (the settings t), so
// that a second stream to the same page server (a lazy-pages daemon's
// stream for faults, opened right after its first) resumes the first's
// session instead of a full mutual handshake (~2 ms of CPU on each side,
// taken from a restore running beside it). A session is offered only
// under the identity that made it: a process with two identities never
// resumes one's session as the other.
var sessions struct {
	sync.Mutex
	m map[TLS]tls.ClientSessionCache
}

func sessionCache(t TLS) tls.ClientSessionCache {
	sessions.Lock()
	defer sessions.Unlock()
	if sessions.m == nil {
		sessions.m = map[TLS]tls.ClientSessionCache{}
	}
	c := sessions.m[t]
	if c == nil {
		c = tls.NewLRUClientSessionCache(16)
		sessions.m[t] = c
	}
	return c
}

// ErrConnUsed: the one connection of a ListenConn listener was taken
// (and refused, if Accept is called again).
var ErrConnUsed = errors.New("the connection given with --ps-socket was used and refused")

// oneConn is a listener that hands out one connection.
type oneConn struct {
	mu sync.Mutex
	c  net.Conn
}

func (o *oneConn) Accept() (net.Conn, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if c := o.c; c != nil {
		o.c = nil
		return c, nil
	}
	return nil, ErrConnUsed
}

func (o *oneConn) Close() error { return nil }

func (o *oneConn) Addr() net.Addr {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.c != nil {
		return o.c.LocalAddr()
	}
	return &net.TCPAddr{}
}

const (
	helloMagic = "FERRYTP1"
	// Version of the stream protocol; bumped only by appending.
	Version  = 1
	FlagZstd = 1 << 0
	// FlagFaults: the server of a lazy page stream takes a second
	// stream from the same daemon for the pages faults wait for, so
	// that they do not queue behind the prefetched megabytes in the
	// first one's socket buffers. (Other servers never see one.)
	FlagFaults = 1 << 1
	// FlagZstdFrames: with FlagZstd, compression block by block (see
	// blocks.go) instead of one zstd stream around everything, which is
	// what peers that do not set it get.
	FlagZstdFrames = 1 << 2
	// MaxFrame bounds one frame's payload.
	MaxFrame = 16 << 20
)

// Stream is a framed, possibly compressed, connection.
type Stream struct {
	conn net.Conn
	w    io.Writer
	bw   *bufio.Writer
	enc  *zstd.Encoder
	r    io.Reader
	dec  *zstd.Decoder
	blk  *blockWriter // block compression (FlagZstdFrames)
	// Zstd reports that the stream is compressed; Faults that both sides
	// set FlagFaults.
	Zstd, Faults bool
}

func hello(flags uint16) []byte {
	b := make([]byte, len(helloMagic)+4)
	copy(b, helloMagic)
	binary.LittleEndian.PutUint16(b[8:], Version)
	binary.LittleEndian.PutUint16(b[10:], flags)
	return b
}

func readHello(c net.Conn) (uint16, error) {
	b := make([]byte, len(helloMagic)+4)
	if _, err := io.ReadFull(c, b); err != nil {
		return 0, fmt.Errorf("read hello: %w", err)
	}
	if string(b[:8]) != helloMagic {
		return 0, fmt.Errorf("peer is not a ferry page stream (hello %q)", b[:8])
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != Version {
		return 0, fmt.Errorf("peer speaks stream version %d, this ferry %d", v, Version)
	}
	return binary.LittleEndian.Uint16(b[10:]), nil
}

// Client performs the client side of the hello; compression is used when
// asked for and offered by the server.
func Client(c net.Conn, wantZstd bool) (*Stream, error) {
	flags := uint16(FlagFaults)
	if wantZstd {
		flags |= FlagZstd | FlagZstdFrames
	}
	if _, err := c.Write(hello(flags)); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	peer, err := readHello(c)
	if err != nil {
		return nil, err
	}
	return newStream(c, flags&peer)
}

// Server performs the server side of the hello, offering compression.
func Server(c net.Conn) (*Stream, error) {
	peer, err := readHello(c)
	if err != nil {
		return nil, err
	}
	offer := uint16(FlagZstd | FlagZstdFrames | FlagFaults)
	if _, err := c.Write(hello(offer)); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	return newStream(c, offer&peer)
}

// newStream makes the stream of c with the flags both sides set.
func newStream(c net.Conn, both uint16) (*Stream, error) {
	s := &Stream{conn: c, Zstd: both&FlagZstd != 0, Faults: both&FlagFaults != 0,
		bw: bufio.NewWriterSize(c, 1<<20), r: bufio.NewReaderSize(c, 1<<20)}
	s.w = s.bw
	if s.Zstd && both&FlagZstdFrames != 0 {
		var err error
		if s.blk, err = newBlockWriter(s.bw, c); err != nil {
			return nil, err
		}
		if s.r, err = newBlockReader(s.r); err != nil {
			return nil, err
		}
		return s, nil
	}
	if s.Zstd {
		enc, err := zstd.NewWriter(s.bw, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		dec, err := zstd.NewReader(s.r, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		s.enc, s.dec, s.w, s.r = enc, dec, enc, dec
	}
	return s, nil
}

// WriteFrame sends one frame.
func (s *Stream) WriteFrame(typ uint8, payload []byte) error {
	if len(payload) > MaxFrame {
		return fmt.Errorf("frame of %d bytes exceeds %d", len(payload), MaxFrame)
	}
	var h [5]byte
	h[0] = typ
	binary.LittleEndian.PutUint32(h[1:], uint32(len(payload)))
	if s.blk != nil {
		return s.blk.writeFrame(h[:], payload)
	}
	return writeOut(s.w, s.bw, s.conn, h[:], payload, s.enc == nil && len(payload) >= directWrite)
}

// directWrite: payloads from this size on bypass the write buffer on
// plain TCP.
const directWrite = 64 << 10

// writeOut writes head, then p. With direct, on plain TCP, they go to the
// socket from the caller's buffers in one writev, not copied through the
// write buffer bw (whatever that holds goes first); otherwise through w.
func writeOut(w io.Writer, bw *bufio.Writer, conn net.Conn, head, p []byte, direct bool) error {
	if tc, ok := conn.(*net.TCPConn); ok && direct {
		if err := bw.Flush(); err != nil {
			return err
		}
		bufs := net.Buffers{head, p}
		_, err := bufs.WriteTo(tc)
		return err
	}
	if _, err := w.Write(head); err != nil {
		return err
	}
	_, err := w.Write(p)
	return err
}

// Flush pushes buffered frames to the peer.
func (s *Stream) Flush() error {
	if s.blk != nil {
		return s.blk.flush()
	}
	if s.enc != nil {
		if err := s.enc.Flush(); err != nil {
			return err
		}
	}
	return s.bw.Flush()
}

// ReadFrame receives one frame; buf is reused when large enough.
func (s *Stream) ReadFrame(buf []byte) (uint8, []byte, error) {
	typ, n, err := s.ReadHead()
	if err != nil {
		return 0, nil, err
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if err := s.ReadBody(buf); err != nil {
		return 0, nil, err
	}
	return typ, buf, nil
}

// ReadHead receives a frame's type and payload length; the payload follows
// in ReadBody calls that take exactly n bytes together (a reader that knows
// where the payload goes reads it there, without a copy in between).
func (s *Stream) ReadHead() (typ uint8, n int, err error) {
	var h [5]byte
	if _, err := io.ReadFull(s.r, h[:]); err != nil {
		return 0, 0, err
	}
	size := binary.LittleEndian.Uint32(h[1:])
	if size > MaxFrame {
		return 0, 0, fmt.Errorf("frame of %d bytes exceeds %d (corrupt stream)", size, MaxFrame)
	}
	return h[0], int(size), nil
}

// ReadBody fills p with the next bytes of the current frame's payload.
func (s *Stream) ReadBody(p []byte) error {
	if _, err := io.ReadFull(s.r, p); err != nil {
		return fmt.Errorf("frame cut short: %w", err)
	}
	return nil
}

// Close closes the stream's connection. It may be called while another
// goroutine reads or writes the stream (that call fails): the zstd coders
// are left to the collector, not closed, since closing a decoder under a
// read under way crashes it (they run synchronously here: nothing of
// theirs lingers).
func (s *Stream) Close() error {
	return s.conn.Close()
}

// ServerConfig is the TLS configuration of a server that requires and
// verifies client certificates (agents' gRPC).
func (t TLS) ServerConfig() (*tls.Config, error) {
	cfg, pool, err := t.base()
	if err != nil {
		return nil, err
	}
	cfg.ClientCAs = pool
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	return cfg, nil
}

// ClientConfig is the TLS configuration of a client of the server at
// addr (host:port); the host is checked against its certificate.
func (t TLS) ClientConfig(addr string) (*tls.Config, error) {
	cfg, pool, err := t.base()
	if err != nil {
		return nil, err
	}
	cfg.RootCAs = pool
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("address %q: %w", addr, err)
	}
	cfg.ServerName = host
	return cfg, nil
}

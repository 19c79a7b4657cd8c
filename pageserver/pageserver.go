package pageserver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/ferrycr/ferry/transport"
)

// Frame types.
const (
	frameOpen  = 1
	frameData  = 2
	frameClose = 3
	frameEnd   = 4
	frameAck   = 5
)

// Options configure a page server.
type Options struct {
	Dir      string
	Listener net.Listener
	Logger   *slog.Logger
}

// Stats describe a finished session.
type Stats struct {
	Files int
	Bytes int64
	Zstd  bool
	Peer  string
}

// Serve accepts one session, stores its files in opts.Dir and returns.
func Serve(ctx context.Context, opts Options) (*Stats, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	go func() { <-ctx.Done(); opts.Listener.Close() }()
	for {
		conn, err := opts.Listener.Accept()
		if err != nil {
			return nil, fmt.Errorf("page-server: accept: %w", err)
		}
		st, err := session(conn, opts.Dir, log)
		if err != nil {
			var herr *handshakeError
			if errors.As(err, &herr) {
				// A peer that failed TLS or the hello: refuse it, keep
				// waiting for the real client.
				log.Warn("page-server: refused a connection", "peer", conn.RemoteAddr().String(), "err", herr.err)
				continue
			}
			return st, err
		}
		log.Info("page-server: session done", "peer", st.Peer, "files", st.Files, "bytes", st.Bytes, "zstd", st.Zstd)
		return st, nil
	}
}

// Accept waits for one client that passes TLS and the hello and returns
// its stream (refused peers are logged and skipped).
func Accept(ctx context.Context, l net.Listener, log *slog.Logger) (*transport.Stream, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	go func() { <-ctx.Done(); l.Close() }()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("page-server: interrupted while waiting for a client: %w", ctx.Err())
			}
			return nil, fmt.Errorf("page-server: accept: %w", err)
		}
		if tc, ok := conn.(interface{ Handshake() error }); ok {
			if err := tc.Handshake(); err != nil {
				log.Warn("page-server: refused a connection", "peer", conn.RemoteAddr().String(), "err", fmt.Errorf("TLS: %w", err))
				conn.Close()
				continue
			}
		}
		s, err := transport.Server(conn)
		if err != nil {
			log.Warn("page-server: refused a connection", "peer", conn.RemoteAddr().String(), "err", err)
			conn.Close()
			continue
		}
		return s, nil
	}
}

type handshakeError struct{ err error }

func (e *handshakeError) Error() string { return e.err.Error() }

func session(conn net.Conn, dir string, log *slog.Logger) (*Stats, error) {
	defer conn.Close()
	st := &Stats{Peer: conn.RemoteAddr().String()}
	if tc, ok := conn.(interface{ Handshake() error }); ok {
		if err := tc.Handshake(); err != nil {
			return nil, &handshakeError{fmt.Errorf("TLS: %w", err)}
		}
	}
	s, err := transport.Server(conn)
	if err != nil {
		return nil, &handshakeError{err}
	}
	st.Zstd = s.Zstd
	var f *os.File
	var buf []byte
	fail := func(err error) (*Stats, error) {
		if f != nil {
			f.Close()
		}
		s.WriteFrame(frameAck, []byte(err.Error()))
		s.Flush()
		return st, err
	}
	for {
		typ, p, err := s.ReadFrame(buf)
		if err != nil {
			return fail(fmt.Errorf("page-server: %w", err))
		}
		buf = p
		switch typ {
		case frameOpen:
			name := string(p)
			if name == "" || filepath.Base(name) != name || strings.HasPrefix(name, ".") {
				return fail(fmt.Errorf("page-server: refusing file name %q", name))
			}
			if f != nil {
				return fail(errors.New("page-server: OPEN before CLOSE"))
			}
			if f, err = os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600); err != nil {
				return fail(err)
			}
		case frameData:
			if f == nil {
				return fail(errors.New("page-server: DATA outside a file"))
			}
			if _, err := f.Write(p); err != nil {
				return fail(err)
			}
			st.Bytes += int64(len(p))
		case frameClose:
			if f == nil {
				return fail(errors.New("page-server: CLOSE outside a file"))
			}
			err := f.Close()
			f = nil
			if err != nil {
				return fail(err)
			}
			st.Files++
		case frameEnd:
			if f != nil {
				return fail(errors.New("page-server: END with a file open"))
			}
			if err := s.WriteFrame(frameAck, nil); err != nil {
				return st, err
			}
			return st, s.Flush()
		default:
			return fail(fmt.Errorf("page-server: unknown frame type %d", typ))
		}
	}
}

// Client sends image files to a page server.
type Client struct {
	s    *transport.Stream
	done bool
}

// Connect opens a session with the page server at addr over network
// ("tcp" or "quic").
func Connect(ctx context.Context, network, addr string, t transport.TLS, zstd bool) (*Client, error) {
	s, err := Dial(ctx, network, addr, t, zstd)
	if err != nil {
		return nil, err
	}
	return &Client{s: s}, nil
}

// Dial opens a stream to the page server at addr over network ("tcp" or
// "quic"), compressed if zstd and the server agrees: the client side of
// Accept.
func Dial(ctx context.Context, network, addr string, t transport.TLS, zstd bool) (*transport.Stream, error) {
	conn, err := transport.DialOn(ctx, network, addr, t)
	if err != nil {
		return nil, fmt.Errorf("page server %s: %w", addr, err)
	}
	s, err := transport.Client(conn, zstd)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("page server %s: %w", addr, err)
	}
	return s, nil
}

// ConnectConn opens a session over conn, already connected to a page
// server (criu's --ps-socket).
func ConnectConn(ctx context.Context, conn net.Conn, t transport.TLS, zstd bool) (*Client, error) {
	c, err := transport.DialConn(ctx, conn, t)
	if err != nil {
		return nil, fmt.Errorf("page server on --ps-socket: %w", err)
	}
	s, err := transport.Client(c, zstd)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("page server on --ps-socket: %w", err)
	}
	return &Client{s: s}, nil
}

// Create starts a file; write its bytes and Close it before the next.
func (c *Client) Create(name string) (io.WriteCloser, error) {
	if err := c.s.WriteFrame(frameOpen, []byte(name)); err != nil {
		return nil, err
	}
	return &remoteFile{c: c}, nil
}

type remoteFile struct{ c *Client }

func (r *remoteFile) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), 4<<20)]
		if err := r.c.s.WriteFrame(frameData, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}

func (r *remoteFile) Close() error { return r.c.s.WriteFrame(frameClose, nil) }

// Finish ends the session and waits for the server to have stored
// everything.
func (c *Client) Finish() error {
	c.done = true
	defer c.s.Close()
	if err := c.s.WriteFrame(frameEnd, nil); err != nil {
		return err
	}
	if err := c.s.Flush(); err != nil {
		return err
	}
	typ, p, err := c.s.ReadFrame(nil)
	if err != nil {
		return fmt.Errorf("page server: %w", err)
	}
	if typ != frameAck || len(p) != 0 {
		return fmt.Errorf("page server: %s", p)
	}
	return nil
}

// Abort drops the session unless it finished.
func (c *Client) Abort() {
	if !c.done {
		c.done = true
		c.s.Close()
	}
}

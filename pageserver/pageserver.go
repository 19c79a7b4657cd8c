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
	"sync/atomic"

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
	files := newFileWriter(dir)
	fail := func(err error) (*Stats, error) {
		files.stop()
		s.WriteFrame(frameAck, []byte(err.Error()))
		s.Flush()
		return st, err
	}
	open := false // a file is open
	var buf []byte
	for {
		if err := files.failed(); err != nil {
			return fail(err)
		}
		typ, n, err := s.ReadHead()
		if err != nil {
			return fail(fmt.Errorf("page-server: %w", err))
		}
		if typ == frameData {
			if !open {
				return fail(errors.New("page-server: DATA outside a file"))
			}
			if err := s.ReadBody(files.space(n)); err != nil {
				return fail(fmt.Errorf("page-server: %w", err))
			}
			st.Bytes += int64(n)
			continue
		}
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		p := buf[:n]
		if err := s.ReadBody(p); err != nil {
			return fail(fmt.Errorf("page-server: %w", err))
		}
		switch typ {
		case frameOpen:
			name := string(p)
			if name == "" || filepath.Base(name) != name || strings.HasPrefix(name, ".") {
				return fail(fmt.Errorf("page-server: refusing file name %q", name))
			}
			if open {
				return fail(errors.New("page-server: OPEN before CLOSE"))
			}
			open = true
			files.open(name)
		case frameClose:
			if !open {
				return fail(errors.New("page-server: CLOSE outside a file"))
			}
			open = false
			files.close()
		case frameEnd:
			if open {
				return fail(errors.New("page-server: END with a file open"))
			}
			nfiles, err := files.finish()
			st.Files = nfiles
			if err != nil {
				return fail(err)
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

// fileWriter stores a session's files from a goroutine of its own, so
// that the next pages are received (and decrypted) while the last are
// written. The data of a file gathers in chunks of up to chunkSize bytes
// (a fragmented process's runs of pages come a few pages per frame), each
// written with one call.
type fileWriter struct {
	dir  string
	ops  chan fileOp
	free chan []byte
	cur  []byte // data gathered for the next write
	done chan struct{}
	err  atomic.Pointer[error] // the first failure (failed)
	n    int                   // files stored; read after done

	stopped bool
}

type fileOp struct {
	open  string // a file to create
	data  []byte
	close bool
}

const (
	chunkSize = 1 << 20
	chunks    = 4 // in the writer's queue or being filled
)

func newFileWriter(dir string) *fileWriter {
	w := &fileWriter{dir: dir, ops: make(chan fileOp, chunks), free: make(chan []byte, chunks), done: make(chan struct{})}
	for range chunks {
		w.free <- nil
	}
	go w.run()
	return w
}

func (w *fileWriter) run() {
	defer close(w.done)
	var f *os.File
	for op := range w.ops {
		if w.failed() == nil {
			if err := w.do(&f, op); err != nil {
				w.err.Store(&err)
			}
		}
		if op.data != nil && cap(op.data) == chunkSize {
			w.free <- op.data[:0]
		}
	}
	if f != nil {
		f.Close()
	}
}

func (w *fileWriter) do(f **os.File, op fileOp) error {
	switch {
	case op.open != "":
		var err error
		*f, err = os.OpenFile(filepath.Join(w.dir, op.open), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		return err
	case op.close:
		err := (*f).Close()
		*f = nil
		w.n++
		return err
	default:
		_, err := (*f).Write(op.data)
		return err
	}
}

// failed returns the writer's first failure so far, if any.
func (w *fileWriter) failed() error {
	if e := w.err.Load(); e != nil {
		return *e
	}
	return nil
}

func (w *fileWriter) open(name string) { w.ops <- fileOp{open: name} }

func (w *fileWriter) close() {
	w.send()
	w.ops <- fileOp{close: true}
}

// space returns n bytes at the end of the data gathered, to be filled
// before the next call.
func (w *fileWriter) space(n int) []byte {
	if n == 0 {
		// Taken, an empty buffer would stay w.cur (send sends none) and
		// the next larger frame would not fit it.
		return nil
	}
	if w.cur != nil && len(w.cur)+n > cap(w.cur) {
		w.send()
	}
	if w.cur == nil {
		if n > chunkSize {
			w.cur = make([]byte, 0, n) // larger than a chunk: a buffer of its own
		} else if w.cur = <-w.free; w.cur == nil {
			w.cur = make([]byte, 0, chunkSize)
		}
	}
	w.cur = w.cur[:len(w.cur)+n]
	return w.cur[len(w.cur)-n:]
}

// send queues the data gathered.
func (w *fileWriter) send() {
	if len(w.cur) > 0 {
		w.ops <- fileOp{data: w.cur}
		w.cur = nil
	}
}

// finish waits for every file to be stored.
func (w *fileWriter) finish() (int, error) {
	w.stop()
	return w.n, w.failed()
}

// stop ends the writer, after what was queued (files stay as they are).
func (w *fileWriter) stop() {
	if !w.stopped {
		w.stopped = true
		close(w.ops)
	}
	<-w.done
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

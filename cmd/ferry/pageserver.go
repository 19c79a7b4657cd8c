package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ferrycr/ferry/dumpcore"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/pageserver"
	"github.com/ferrycr/ferry/transport"
)

// psFlags are criu's page-server and TLS options, shared by page-server,
// dump and pre-dump.
type psFlags struct {
	use      bool
	socketFd int // --ps-socket: an inherited, connected socket
	network  string
	address  string
	port     int
	compress bool
	tls      transport.TLS
}

func (p *psFlags) addFlags(fs *pflag.FlagSet, client bool) {
	if client {
		fs.BoolVar(&p.use, "page-server", false, "send pages to the page server at --address:--port instead of -D")
		fs.BoolVar(&p.compress, "compress", false, "zstd-compress pages: on the wire with --page-server (if the server agrees), else in pages-*.img")
	}
	psHelp := "serve the client connected on the inherited socket FD instead of listening on --address:--port"
	if client {
		psHelp = "talk to the page server over the connected, inherited socket FD (implies --page-server)"
	}
	fs.IntVar(&p.socketFd, "ps-socket", -1, psHelp)
	fs.StringVar(&p.address, "address", "", "page server address")
	fs.StringVar(&p.network, "transport", "tcp", "page stream transport: tcp, or quic (needs --tls)")
	fs.IntVar(&p.port, "port", 0, "page server port")
	fs.BoolVar(&p.tls.Enabled, "tls", false, "mutually authenticated TLS (needs --tls-cacert, --tls-cert, --tls-key)")
	fs.StringVar(&p.tls.CACert, "tls-cacert", "", "CA certificate the peer's certificate must chain to (PEM)")
	fs.StringVar(&p.tls.CRL, "tls-cacrl", "", "certificate revocation list: peers listed are refused")
	fs.StringVar(&p.tls.Cert, "tls-cert", "", "this side's certificate (PEM)")
	fs.StringVar(&p.tls.Key, "tls-key", "", "this side's private key (PEM)")
}

func (p *psFlags) addr() (string, error) {
	if p.port <= 0 || p.port > 65535 {
		return "", fmt.Errorf("--port %d: want 1-65535", p.port)
	}
	return net.JoinHostPort(p.address, strconv.Itoa(p.port)), nil
}

// connect opens a page-server session for a dump (nil without --page-server).
func (p *psFlags) connect(cmd *cobra.Command) (*pageserver.Client, error) {
	if !p.use && p.socketFd < 0 {
		return nil, nil
	}
	if p.socketFd >= 0 {
		conn, err := p.inherited()
		if err != nil {
			return nil, err
		}
		return pageserver.ConnectConn(cmd.Context(), conn, p.tls, p.compress)
	}
	if p.address == "" {
		return nil, errors.New("--page-server needs --address")
	}
	a, err := p.addr()
	if err != nil {
		return nil, err
	}
	return pageserver.Connect(cmd.Context(), p.network, a, p.tls, p.compress)
}

// inherited returns the --ps-socket connection.
func (p *psFlags) inherited() (net.Conn, error) {
	if p.network != "" && p.network != transport.TCP {
		return nil, fmt.Errorf("--ps-socket: a connected stream socket; not with --transport %s", p.network)
	}
	f := os.NewFile(uintptr(p.socketFd), "ps-socket")
	if f == nil {
		return nil, fmt.Errorf("--ps-socket %d: not an open file descriptor", p.socketFd)
	}
	defer f.Close()
	conn, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("--ps-socket %d: %w", p.socketFd, err)
	}
	return conn, nil
}

// serverListener is where a page server takes its client from: the
// --ps-socket connection, or --address:--port.
func (p *psFlags) serverListener(log *slog.Logger) (net.Listener, error) {
	if p.socketFd >= 0 {
		conn, err := p.inherited()
		if err != nil {
			return nil, err
		}
		return transport.ListenConn(conn, p.tls)
	}
	a, err := p.addr()
	if err != nil {
		return nil, err
	}
	return p.listen(a, log)
}

// lazyServe returns dump --lazy-pages' server: listen on --address:--port
// and serve the frozen process's pages to one lazy-pages daemon.
func (p *psFlags) lazyServe(cmd *cobra.Command, statusFd int) (func(func(int, uint64, []byte) error, func(int) ([][2]uint64, error)) error, error) {
	if p.socketFd < 0 {
		if _, err := p.addr(); err != nil {
			return nil, fmt.Errorf("--lazy-pages: %w", err)
		}
	}
	return func(read func(int, uint64, []byte) error, list func(int) ([][2]uint64, error)) error {
		l, err := p.serverListener(nil)
		if err != nil {
			return err
		}
		defer l.Close()
		if statusFd >= 0 {
			writeStatus(statusFd)
		}
		// criu's RPC clients (runc) learn it from a notification.
		if n, ok := cmd.Context().Value(notifierKey{}).(notifier); ok {
			if err := n("status-ready", 0); err != nil {
				return err
			}
		}
		return lazypages.ServeSession(cmd.Context(), l, nil, read, list)
	}, nil
}

// remoteSource connects lazy-pages --page-server to its page server.
func (p *psFlags) remoteSource(cmd *cobra.Command) (*lazypages.RemoteSource, error) {
	if !p.use {
		return nil, nil
	}
	a, err := p.addr()
	if err != nil {
		return nil, err
	}
	return lazypages.DialRemote(cmd.Context(), p.network, a, p.tls, p.compress)
}

// listen opens the page-stream listener, logging refused QUIC peers.
func (p *psFlags) listen(addr string, log *slog.Logger) (net.Listener, error) {
	return transport.ListenOn(p.network, addr, p.tls, func(err error) {
		if log != nil {
			log.Warn("page-server: refused a connection", "err", err)
		}
	})
}

// sink opens the page-server session as a dump's PageSink (nil without
// --page-server); release drops the session if the dump did not finish it.
func (p *psFlags) sink(cmd *cobra.Command) (dumpcore.PageSink, func(), error) {
	c, err := p.connect(cmd)
	if err != nil || c == nil {
		return nil, func() {}, err
	}
	return c, c.Abort, nil
}

func init() { register(newPageServerCmd) }

func newPageServerCmd() *cobra.Command {
	var (
		c        common
		ps       psFlags
		statusFd int
		daemon   bool
		pidfile  string
		lazy     bool
	)
	cmd := &cobra.Command{
		Use:   "page-server -D DIR --port P [--address A] [options]",
		Short: "receive a dump's pages over the network",
		Long: `Listen on --address:--port and store the pages (and pagemaps) that one
"ferry dump --page-server" or "ferry pre-dump --page-server" sends, in
DIR, exactly as the dump would have written them locally; then exit.
Copy the dump's other image files next to them to restore.

--transport quic carries the stream over QUIC (UDP) instead of TCP; QUIC
always encrypts, so it needs --tls. With --tls both sides authenticate: each presents --tls-cert/--tls-key and
the peer's certificate must chain to --tls-cacert and not be listed in
--tls-cacrl; a peer that fails is refused and logged, and the server keeps
waiting. Compression (zstd) is used when the client asks for it
(--compress).

--lazy-pages turns it around: it serves the pages of the dump in DIR to a
remote "ferry lazy-pages --page-server", in whatever order the restored
process needs them, until that daemon is done.

--status-fd FD writes a zero byte to FD once listening; --daemon detaches
into the background after that (--pidfile records its PID).`,
		Example: `  ferry page-server -D /srv/ckpt --port 27000 --status-fd 3 3>ready &
  ferry dump -t 1234 -D ckpt --page-server --address target --port 27000`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if ps.socketFd < 0 {
				if _, err := ps.addr(); err != nil {
					return err
				}
			} else if daemon {
				return errors.New("page-server: --daemon cannot pass the --ps-socket connection on; run it in the background yourself")
			}
			if daemon {
				return daemonize(statusFd, pidfile)
			}
			log, err := c.logger()
			if err != nil {
				return err
			}
			defer c.close()
			l, err := ps.serverListener(log)
			if err != nil {
				return fmt.Errorf("page-server: %w", err)
			}
			if pidfile != "" {
				if err := writePidfile(pidfile, os.Getpid()); err != nil {
					return err
				}
			}
			if statusFd >= 0 {
				writeStatus(statusFd)
			}
			if lazy {
				// Serve the pages of a local dump to a remote lazy-pages
				// daemon, in whatever order it asks.
				read, closeImages := lazypages.ImageReader(c.imagesDir)
				defer closeImages()
				return lazypages.ServeSession(cmd.Context(), l, log, read, nil)
			}
			_, err = pageserver.Serve(cmd.Context(), pageserver.Options{Dir: c.imagesDir, Listener: l, Logger: log})
			return err
		},
	}
	fs := cmd.Flags()
	c.addFlags(fs)
	ps.addFlags(fs, false)
	fs.IntVar(&statusFd, "status-fd", -1, "write a zero byte to FD when listening")
	fs.BoolVar(&daemon, "daemon", false, "run in the background once listening")
	fs.BoolVar(&lazy, "lazy-pages", false, "serve the pages of the dump in -D to a remote lazy-pages daemon")
	fs.StringVar(&pidfile, "pidfile", "", "write the server's PID to FILE")
	return cmd
}

// daemonize re-runs this command in a new session without --daemon and
// returns once the child listens (its status byte arrives), passing the
// readiness on to statusFd.
func daemonize(statusFd int, pidfile string) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	var args []string
	for _, a := range os.Args[1:] {
		if a != "--daemon" {
			args = append(args, a)
		}
	}
	args = append(args, "--status-fd", "3")
	child := exec.Command("/proc/self/exe", args...)
	child.ExtraFiles = []*os.File{w}
	child.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := child.Start(); err != nil {
		w.Close()
		return err
	}
	w.Close()
	b := make([]byte, 1)
	if n, _ := r.Read(b); n != 1 {
		child.Wait()
		return errors.New("page-server did not start (see its log)")
	}
	if pidfile != "" {
		if err := writePidfile(pidfile, child.Process.Pid); err != nil {
			return err
		}
	}
	if statusFd >= 0 {
		writeStatus(statusFd)
	}
	return child.Process.Release()
}

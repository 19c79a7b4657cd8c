package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/ferrycr/ferry/dumpcore"
	"github.com/ferrycr/ferry/pageserver"
	"github.com/ferrycr/ferry/transport"
)

// psFlags are criu's page-server and TLS options, shared by page-server,
// dump and pre-dump.
type psFlags struct {
	use      bool
	address  string
	port     int
	compress bool
	tls      transport.TLS
}

func (p *psFlags) addFlags(fs *pflag.FlagSet, client bool) {
	if client {
		fs.BoolVar(&p.use, "page-server", false, "send pages to the page server at --address:--port instead of -D")
		fs.BoolVar(&p.compress, "compress", false, "zstd-compress pages on the wire (if the server agrees)")
	}
	fs.StringVar(&p.address, "address", "", "page server address")
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
	if !p.use {
		return nil, nil
	}
	if p.address == "" {
		return nil, errors.New("--page-server needs --address")
	}
	a, err := p.addr()
	if err != nil {
		return nil, err
	}
	return pageserver.Connect(cmd.Context(), a, p.tls, p.compress)
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
	)
	cmd := &cobra.Command{
		Use:   "page-server -D DIR --port P [--address A] [options]",
		Short: "receive a dump's pages over the network",
		Long: `Listen on --address:--port and store the pages (and pagemaps) that one
"ferry dump --page-server" or "ferry pre-dump --page-server" sends, in
DIR, exactly as the dump would have written them locally; then exit.
Copy the dump's other image files next to them to restore.

With --tls both sides authenticate: each presents --tls-cert/--tls-key and
the peer's certificate must chain to --tls-cacert and not be listed in
--tls-cacrl; a peer that fails is refused and logged, and the server keeps
waiting. Compression (zstd) is used when the client asks for it
(--compress).

--status-fd FD writes a zero byte to FD once listening; --daemon detaches
into the background after that (--pidfile records its PID).`,
		Example: `  ferry page-server -D /srv/ckpt --port 27000 --status-fd 3 3>ready &
  ferry dump -t 1234 -D ckpt --page-server --address target --port 27000`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := ps.addr()
			if err != nil {
				return err
			}
			if daemon {
				return daemonize(statusFd, pidfile)
			}
			log, err := c.logger()
			if err != nil {
				return err
			}
			defer c.close()
			l, err := transport.Listen(a, ps.tls)
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
			_, err = pageserver.Serve(cmd.Context(), pageserver.Options{Dir: c.imagesDir, Listener: l, Logger: log})
			return err
		},
	}
	fs := cmd.Flags()
	c.addFlags(fs)
	ps.addFlags(fs, false)
	fs.IntVar(&statusFd, "status-fd", -1, "write a zero byte to FD when listening")
	fs.BoolVar(&daemon, "daemon", false, "run in the background once listening")
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

package main

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/spf13/cobra"
)

func init() { register(newServiceCmd) }

func newServiceCmd() *cobra.Command {
	var (
		addr, pidfile string
		statusFd      int
	)
	cmd := &cobra.Command{
		Use:   "service [--address PATH]",
		Short: "serve criu's RPC protocol on a unix socket, as criu service does",
		Long: `Listen on a SOCK_SEQPACKET unix socket (criu's default path unless
--address names another) and serve criu's RPC protocol to each client
in turn, as "ferry swrk" serves one (see its help). Only root may use it
(the socket is mode 0600, and a request from another uid is refused):
the requests name files and mounts that ferry acts on as root.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			os.Remove(addr) // a stale socket of an earlier service
			l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: addr, Net: "unixpacket"})
			if err != nil {
				return fmt.Errorf("service: %w", err)
			}
			defer l.Close()
			if err := os.Chmod(addr, 0o600); err != nil {
				return err
			}
			if err := writePidfile(pidfile, os.Getpid()); err != nil {
				return err
			}
			if statusFd >= 0 {
				writeStatus(statusFd)
			}
			ctx := cmd.Context()
			go func() {
				<-ctx.Done()
				l.Close()
			}()
			for {
				conn, err := l.AcceptUnix()
				if err != nil {
					if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
						return nil
					}
					return fmt.Errorf("service: accept: %w", err)
				}
				f, err := conn.File()
				conn.Close()
				if err != nil {
					return err
				}
				if err := serveRPC(ctx, f, true); err != nil {
					fmt.Fprintf(cmd.ErrOrStderr(), "service: %v\n", err)
				}
			}
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&addr, "address", "/var/run/criu_service.socket", "the socket's path")
	fs.StringVar(&pidfile, "pidfile", "", "write the service's PID to FILE")
	fs.IntVar(&statusFd, "status-fd", -1, "write \\0 to FD once the socket accepts clients")
	return cmd
}

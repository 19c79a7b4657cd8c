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
		mode          uint32
	)
	cmd := &cobra.Command{
		Use:   "service [--address PATH]",
		Short: "serve criu's RPC protocol on a unix socket, as criu service does",
		Long: `Listen on a SOCK_SEQPACKET unix socket (criu's default path unless
--address names another) and serve criu's RPC protocol to each client
in turn, as "ferry swrk" serves one (see its help).

The socket is mode 0600 (root's clients only) unless --socket-mode says
otherwise. A client that is not root may dump and restore only its own
processes, with its own rights: every process of the tree must run as
the client's uid and gid (and be dumpable); images to restore must be of
such processes, without capabilities, namespaces, SysV segments or
deleted files for ferry to make, and the restored processes are made as
the client (with CAP_CHECKPOINT_RESTORE until they run). Its images
directory must be given as images_dir_fd: ferry makes the images in a
directory of its own and copies them into the client's, as the client's
files (and copies a restore's images from it, regular files the client
owns). Options that would have ferry act as root on the client's say-so
(root, ext_mnt, external, join_ns, inherit_fd, page server, lazy pages,
cgroup roots, TCP repair, network lock, parent images) fail the request
by name; cgroups are left as they are.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			os.Remove(addr) // a stale socket of an earlier service
			l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: addr, Net: "unixpacket"})
			if err != nil {
				return fmt.Errorf("service: %w", err)
			}
			defer l.Close()
			if err := os.Chmod(addr, os.FileMode(mode)&os.ModePerm); err != nil {
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
	fs.Uint32Var(&mode, "socket-mode", 0o600, "the socket's permissions, octal (0666: users that are not root may use the service for their own processes)")
	return cmd
}

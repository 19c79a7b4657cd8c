package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/spf13/cobra"
)

func init() { register(newServiceCmd) }

func newServiceCmd() *cobra.Command {
	var (
		addr, pidfile string
		statusFd      int
		mode          string
	)
	cmd := &cobra.Command{
		Use:   "service [--address PATH]",
		Short: "serve criu's RPC protocol on a unix socket, as criu service does",
		Long: `Listen on a SOCK_SEQPACKET unix socket (criu's default path unless
--address names another) and serve criu's RPC protocol to each client
in turn, as "ferry swrk" serves one (see its help).

The socket is mode 0600 (root's clients only) unless --socket-mode says
otherwise. A client that is not root may dump and restore only its own
processes, with its own rights. It is pinned when it connects
(SO_PEERPIDFD, SO_PEERGROUPS) and must be in ferry's namespaces, without
seccomp or an LSM confinement. Every process it dumps must run as its uid
and gid, dumpable, without capabilities, in ferry's namespaces, and hold
no deleted file or FIFO. Images it restores must be of such processes and
need nothing that ferry would make, remove, write or send as root
(namespaces, SysV segments, deleted files, link remaps, parent images,
FIFOs, userfaultfds, queued unix messages); the restored processes are
made as the client, in its cgroups, limits, loginuid and OOM adjustment,
with CAP_CHECKPOINT_RESTORE and CAP_SETPCAP only until they run. Its images
and work directories must be given as descriptors of directories it owns:
ferry makes the images in a directory of its own and copies them in, each
file made anew and given to the client, and copies a restore's images out
first. Options that would have ferry act as root on the client's say-so
(root, ext_mnt, external, join_ns, inherit_fd, page server, lazy pages,
cgroup roots and modes, TCP repair, network lock, freeze_cgroup,
link_remap, parent images) fail the request by name.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			perm, err := strconv.ParseUint(mode, 8, 32)
			if err != nil || perm > 0o777 {
				return fmt.Errorf("--socket-mode %q: want octal permissions, as 0600 or 0666", mode)
			}
			os.Remove(addr) // a stale socket of an earlier service
			l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: addr, Net: "unixpacket"})
			if err != nil {
				return fmt.Errorf("service: %w", err)
			}
			defer l.Close()
			if err := os.Chmod(addr, os.FileMode(perm)); err != nil {
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
	fs.StringVar(&mode, "socket-mode", "0600", "the socket's permissions, octal (0666: users that are not root may use the service for their own processes)")
	return cmd
}

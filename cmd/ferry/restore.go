package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/restorecore"
)

func init() { register(newRestoreCmd) }

func newRestoreCmd() *cobra.Command {
	var (
		c            common
		detached     bool
		tcpClose     bool
		weakSysctls  bool
		cgYard       string
		leaveStopped bool
		shellJob     bool
		pidfile      string
		displayStats bool
		lazy         bool
		externals    []string
		sibling      bool
		cgMode       string
		cgRoots      []string
		rootDir      string
		mountMaps    []string
		inherit      []string
		joinNs       []string
		ps           psFlags
		statusFd     int
		rate         string
	)
	cmd := &cobra.Command{
		Use:   "restore -D DIR [options]",
		Short: "recreate a checkpointed process from an image directory",
		Long: `Recreate the processes saved in the image directory: the same PIDs and
thread IDs, parents, sessions and process groups, the same memory at the
same addresses, the same registers, open files, signal state and timers,
and what they shared shared again. Each process continues at the
instruction where it was frozen.

Everything is validated before anything is created: a PID or thread ID in
use, a file missing or changed since the dump, an image of a newer format,
a different vDSO or missing CPU features each stop the restore with a
one-line error and exit status 1, leaving nothing behind.

Without -d, ferry waits for the restored process and exits with its exit
status (128+N if a signal N killed it). With -d it exits as soon as the
process runs; the process is then re-parented to init.

--lazy-pages resumes the processes before their private anonymous memory
is back: a lazy-pages daemon fills it as they touch it. That daemon is
"ferry lazy-pages" on the same images, or, with --page-server --address A
--port P (the source's "ferry dump --lazy-pages", or "ferry page-server
--lazy-pages"), the restore itself: it connects while it makes the
processes, serves them until every page arrived, and only then exits (with
-d; without, once the process has also exited). If the pages cannot all
arrive (the page server is lost), the restored processes are killed and the
exit status is 1: they would run on memory that never came.

--status-fd FD writes one zero byte to FD when the restored processes run
(as --pidfile is written), for a restore that goes on serving pages.`,
		Example: `  # restore and wait for the process to finish
  ferry restore -D ckpt

  # restore in the background and record its PID
  ferry restore -D ckpt -d --pidfile restored.pid

  # post-copy: resume at once, memory pulled from the source as needed
  ferry restore -D ckpt -d --lazy-pages --page-server --address src --port 27000 \
      --status-fd 3 3>running`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := c.logger()
			if err != nil {
				return err
			}
			defer c.close()
			if !detached {
				// The restored root is our child: keep its SIGCHLD default
				// so wait4 sees it, and do not let ^C kill ferry first.
				signal.Ignore(syscall.SIGINT, syscall.SIGQUIT)
			}
			veths, extMnt, macvlans, err := parseExternals(externals, mountMaps)
			if err != nil {
				return err
			}
			inheritFds := map[string]int{}
			for _, x := range inherit {
				n, key, ok := cutExternal(x, "fd")
				fd, err := strconv.Atoi(n)
				if !ok || err != nil || key == "" {
					return fmt.Errorf("--inherit-fd %q: want fd[N]:KEY", x)
				}
				if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
					return fmt.Errorf("--inherit-fd %q: fd %d is not open", x, fd)
				}
				inheritFds[key] = fd
			}
			join := map[string]string{}
			for _, x := range joinNs {
				kind, rest, ok := strings.Cut(x, ":")
				rest, _, _ = strings.Cut(rest, ",") // criu's extra options (user namespaces)
				if !ok || kind == "" || rest == "" {
					return fmt.Errorf("--join-ns %q: want NS:PID or NS:FILE", x)
				}
				if _, err := strconv.Atoi(rest); err == nil {
					rest = fmt.Sprintf("/proc/%s/ns/%s", rest, kind)
				}
				join[kind] = rest
			}
			cgRoot := map[string]string{}
			for _, x := range cgRoots {
				ctrl, path, ok := strings.Cut(x, ":")
				if !ok {
					ctrl, path = "", x
				}
				if !strings.HasPrefix(path, "/") {
					return fmt.Errorf("--cgroup-root %q: want [CONTROLLER:]/PATH", x)
				}
				cgRoot[ctrl] = path
			}
			acts := c.actions(cmd.Context())
			if err := acts.run("pre-restore", 0); err != nil {
				return fmt.Errorf("restoring failed: %w", err)
			}
			lazySocket := filepath.Join(c.workDirOrImages(), lazypages.SocketName)
			var daemon *lazyDaemon
			if ps.use || ps.socketFd >= 0 {
				if !lazy {
					return errors.New("--page-server: the restore takes pages from a page server only with --lazy-pages")
				}
				r, err := parseRate(rate)
				if err != nil {
					return err
				}
				if daemon, err = startLazyDaemon(cmd.Context(), &ps, c.imagesDir, r, log); err != nil {
					return fmt.Errorf("restoring failed: %w", err)
				}
				defer daemon.stop()
				lazySocket = daemon.Socket
			}
			res, err := restorecore.Restore(cmd.Context(), restorecore.Options{
				Action:    acts.restoreHook(),
				ImagesDir: c.imagesDir, LeaveStopped: leaveStopped, ShellJob: shellJob, Logger: log, Caller: callerOf(cmd.Context()), OrphanPtsMaster: orphanMasters(cmd.Context()),
				LazyPages: lazy, LazySocket: lazySocket,
				TCPClose: tcpClose, WeakSysctls: weakSysctls, Veths: veths, Macvlans: macvlans, Sibling: sibling, ManageCgroups: cgMode, CgroupRoot: cgRoot, CgroupYard: cgYard, Root: rootDir, ExternalMounts: extMnt, InheritFds: inheritFds, JoinNs: join,
			})
			if err != nil {
				log.Error("restoring failed", "err", err)
				return fmt.Errorf("restoring failed: %w", err)
			}
			if err := acts.run("post-resume", res.Root); err != nil {
				log.Warn("post-resume", "err", err) // the process runs: too late to undo
			}
			if err := writePidfile(pidfile, res.Root); err != nil {
				return err
			}
			if statusFd >= 0 {
				writeStatus(statusFd)
			}
			if displayStats {
				printRestoreStats(cmd, res.Stats)
			}
			log.Info("restore finished successfully", "pid", res.Root)
			if detached || sibling {
				return daemon.wait()
			}
			var ws unix.WaitStatus
			for {
				_, err := unix.Wait4(res.Root, &ws, 0, nil)
				if err == unix.EINTR {
					continue
				}
				if err != nil {
					return fmt.Errorf("wait for restored process %d: %w", res.Root, os.NewSyscallError("wait4", err))
				}
				break
			}
			if err := daemon.wait(); err != nil {
				return err
			}
			switch {
			case ws.Exited():
				if ws.ExitStatus() != 0 {
					return &exitError{code: ws.ExitStatus()}
				}
				return nil
			case ws.Signaled():
				return &exitError{code: 128 + int(ws.Signal())}
			}
			return nil
		},
	}
	fs := cmd.Flags()
	c.addFlags(fs)
	fs.BoolVarP(&detached, "restore-detached", "d", false, "detach from the restored process once it runs")
	fs.BoolVarP(&leaveStopped, "leave-stopped", "s", false, "leave the restored process stopped (SIGSTOP)")
	fs.BoolVarP(&shellJob, "shell-job", "j", false, "restore a shell job: terminals become ferry's own")
	fs.StringVar(&pidfile, "pidfile", "", "write the restored root's PID to FILE")
	fs.BoolVar(&displayStats, "display-stats", false, "print restore statistics when done")
	fs.StringVar(&cgMode, "manage-cgroups", "soft", "put the processes into their cgroups: soft (make missing ones, with their properties), full (also set existing ones' properties), strict (as full; a property that cannot be set fails), props (they must exist; set properties), none (they must exist), ignore (leave the processes in ferry's)")
	fs.Lookup("manage-cgroups").NoOptDefVal = "soft"
	fs.StringArrayVarP(&mountMaps, "ext-mount-map", "M", nil, "KEY:PATH: bind PATH where the images have the external mount KEY (as --external mnt[KEY]:PATH); repeatable")
	fs.StringArrayVar(&joinNs, "join-ns", nil, "NS:PID|FILE: restore the tree into an existing namespace (net, uts, ipc, pid, mnt, cgroup, time): PID's, or the namespace file FILE; repeatable")
	fs.StringArrayVar(&inherit, "inherit-fd", nil, "fd[N]:KEY: the file the images name KEY (pipe:[INODE], socket:[INODE], a path) is ferry's fd N, not made anew; repeatable")
	fs.StringVarP(&rootDir, "root", "r", "", "where the root of the tree's own mount namespace is here (default: where the dump saw it)")
	fs.StringArrayVar(&cgRoots, "cgroup-root", nil, "[CONTROLLER:]/PATH: make the images' cgroups under PATH (for CONTROLLER's hierarchy, or all); repeatable")
	fs.BoolVar(&sibling, "restore-sibling", false, "make the root a child of ferry's parent, not of ferry (implies -d)")
	fs.BoolVar(&lazy, "lazy-pages", false, "resume at once; private anonymous memory comes from ferry lazy-pages, or with --page-server from the page server through this restore (post-copy)")
	ps.addFlags(fs, true)
	fs.Lookup("page-server").Usage = "with --lazy-pages: take the pages from the page server at --address:--port (serving them from this process until every page arrived) instead of from ferry lazy-pages"
	fs.Lookup("compress").Usage = "with --page-server: ask the page server for zstd-compressed pages"
	fs.MarkHidden("ps-socket") // refused: the restore dials its page server itself
	fs.IntVar(&statusFd, "status-fd", -1, "write a zero byte to FD once the restored processes run")
	fs.StringVar(&rate, "prefetch-rate", "", "with --page-server: limit the background copy to this many bytes per second (K, M, G suffixes), as ferry lazy-pages does")
	fs.Bool("tcp-established", false, "accepted for criu compatibility: connections in the images are always restored")
	const compat = "accepted for criu compatibility: the restore does what the images say"
	fs.BoolVar(&tcpClose, "tcp-close", false, "restore the established connections in the images as closed sockets")
	fs.StringVar(&cgYard, "cgroup-yard", "", "use the cgroup hierarchies mounted in DIR (one each, as criu's yard) instead of wherever they are mounted")
	fs.BoolVar(&weakSysctls, "weak-sysctls", false, "a sysctl of the images (of the tree's network namespace) that this kernel lacks or refuses is logged and left, instead of failing the restore")
	for _, name := range []string{"link-remap", "ghost-fiemap", "no-ghost-fiemap", "skip-in-flight"} {
		fs.Bool(name, false, compat)
	}
	fs.BoolP("file-locks", "l", false, compat)
	fs.String("ext-unix-sk", "", compat)
	fs.Lookup("ext-unix-sk").NoOptDefVal = "all"
	fs.StringArrayVar(&externals, "external", nil, "a resource outside the images, as criu names it: veth[IN]:OUT[@BRIDGE] makes the outer end of the tree's veth IN as OUT here, in BRIDGE if given; macvlan[IN]:PARENT makes the tree's macvlan IN on link PARENT here; mnt[KEY]:PATH binds PATH where the images have the external mount KEY; unix[INODE] is accepted (the images name the peer to connect to again); repeatable")
	fs.String("network-lock", "nftables", "accepted for criu compatibility: the lock the images name is removed once the restore is done")
	return cmd
}

func printRestoreStats(cmd *cobra.Command, s *pb.RestoreStats) {
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "Displaying restore stats:\n")
	fmt.Fprintf(w, "Pages restored: %d (0x%x)\n", s.PagesRestored, s.PagesRestored)
	fmt.Fprintf(w, "Validation time: %d us\n", s.ValidateTimeUs)
	fmt.Fprintf(w, "Forking time: %d us\n", s.ForkingTimeUs)
	fmt.Fprintf(w, "Memory fill time: %d us\n", s.MemfillTimeUs)
	fmt.Fprintf(w, "Total restore time: %d us\n", s.TotalTimeUs)
}

// parseExternals reads criu's --external veth[IN]:OUT[@BRIDGE] and
// mnt[KEY]:PATH arguments and --ext-mount-map KEY:PATH (and lets
// unix[INODE] by).
func parseExternals(externals, mountMaps []string) (veths map[string]restorecore.VethPeer, mnts, macvlans map[string]string, err error) {
	veths, mnts, macvlans = map[string]restorecore.VethPeer{}, map[string]string{}, map[string]string{}
	for _, m := range mountMaps {
		key, path, ok := strings.Cut(m, ":")
		if !ok || key == "" || path == "" {
			return nil, nil, nil, fmt.Errorf("--ext-mount-map %q: want KEY:PATH", m)
		}
		mnts[key] = path
	}
	for _, x := range externals {
		if strings.HasPrefix(x, "unix[") {
			continue
		}
		if key, path, ok := cutExternal(x, "mnt"); ok {
			if key == "" || path == "" {
				return nil, nil, nil, fmt.Errorf("--external %q: want mnt[KEY]:PATH", x)
			}
			mnts[key] = path
			continue
		}
		if in, parent, ok := cutExternal(x, "macvlan"); ok {
			if in == "" || parent == "" {
				return nil, nil, nil, fmt.Errorf("--external %q: want macvlan[IN]:PARENT", x)
			}
			macvlans[in] = parent
			continue
		}
		in, out, ok := cutExternal(x, "veth")
		if !ok || in == "" || out == "" {
			return nil, nil, nil, fmt.Errorf("--external %q: want veth[IN]:OUT[@BRIDGE], macvlan[IN]:PARENT, mnt[KEY]:PATH or unix[INODE]", x)
		}
		out, bridge, _ := strings.Cut(out, "@")
		veths[in] = restorecore.VethPeer{Out: out, Bridge: bridge}
	}
	return veths, mnts, macvlans, nil
}

// cutExternal splits criu's KIND[KEY]:VALUE (--external, --inherit-fd).
// ok tells whether x is of KIND; KEY and VALUE are empty if x has no "]:"
// after KIND[.
func cutExternal(x, kind string) (key, value string, ok bool) {
	rest, ok := strings.CutPrefix(x, kind+"[")
	if !ok {
		return "", "", false
	}
	key, value, cut := strings.Cut(rest, "]:")
	if !cut {
		return "", "", true
	}
	return key, value, true
}

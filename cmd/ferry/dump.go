package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferrycr/ferry/dumpcore"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/cgroups"
)

func init() { register(newDumpCmd) }

func newDumpCmd() *cobra.Command {
	var (
		c             common
		pid           int
		leaveRunning  bool
		leaveStopped  bool
		shellJob      bool
		timeout       int
		freezeCg      string
		cgProps       string
		cgPropsFile   string
		cgYard        string
		orphanPts     bool
		pidfile       string
		displayStats  bool
		dedup         bool
		ps            psFlags
		lazy          bool
		statusFd      int
		ghostLimit    string
		prevDir       string
		trackMem      bool
		background    bool
		tcpEst        bool
		netLock       string
		extUnix       string
		externals     []string
		cgControllers []string
		rootDir       string
		mountMaps     []string
		emptyNs       string
		fileLocks     bool
		tcpClose      bool
		skipInFlight  bool
		linkRemap     bool
	)
	cmd := &cobra.Command{
		Use:   "dump -t PID -D DIR [options]",
		Short: "checkpoint a running process into an image directory",
		Long: `Freeze the process PID with all its threads and all its descendants (each
frozen before its children are listed), write their complete state to the
image directory, then kill them (the default), leave them running (-R) or
leave them stopped (-s).

The images hold, for every process: memory (zero pages left out),
registers with the full FPU/SSE/AVX state, signal handlers, masks and
pending signals, timers, credentials, resource limits, open files with
their offsets, pipes and sockets with their queued data, and the
address-space layout; and for the tree: parents, sessions, process groups,
zombies, and what processes share (open file descriptions, pipes, socket
pairs, shared memory, fd tables). "ferry restore" recreates the very same
processes from them; "ferry show" prints them.

If anything fails before the images are complete, every process is
released exactly as it was and keeps running; the error names the process,
the fd and the object. stats-dump is always written to the work directory.`,
		Example: `  # checkpoint PID 1234 into ./ckpt and stop it
  ferry dump -t 1234 -D ckpt

  # snapshot without stopping the service, with a log at debug level
  ferry dump -t 1234 -D ckpt -R -v4 -o dump.log

  # a job started from an interactive shell
  ferry dump -t 1234 -D ckpt --shell-job

  # a consistent snapshot of a running service, frozen for milliseconds
  ferry dump -t 1234 -D snap --background

  # iterative: copy memory while the service runs, then a short final dump
  ferry pre-dump -t 1234 -D ckpt/1
  ferry dump -t 1234 -D ckpt/2 --prev-images-dir ../1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if pid <= 0 {
				return errors.New("dump: -t/--tree PID is required")
			}
			if emptyNs != "" && emptyNs != "net" {
				return fmt.Errorf("dump: --empty-ns %q: only net", emptyNs)
			}
			if leaveRunning && leaveStopped {
				return errors.New("dump: --leave-running and --leave-stopped exclude each other")
			}
			var extUnixSk []uint64
			extMnt := map[string]string{}
			extNs := map[string]dumpcore.ExternalNs{}
			for _, m := range mountMaps {
				point, key, ok := strings.Cut(m, ":")
				if !ok {
					return fmt.Errorf("--ext-mount-map %q: want MOUNTPOINT:KEY", m)
				}
				extMnt[point] = key
			}
			for _, x := range externals {
				// criu's --external RES: unix[INODE], a unix socket's
				// peer outside the dump, as --ext-unix-sk INODE. A veth
				// (veth[IN]) needs nothing at the dump: the restore
				// names its outer end.
				if strings.HasPrefix(x, "veth[") {
					continue
				}
				if kind, rest, ok := strings.Cut(x, "["); ok && (kind == "net" || kind == "uts" || kind == "ipc" || kind == "pid") {
					n, key, ok := strings.Cut(rest, "]:")
					ino, err := strconv.ParseUint(n, 10, 64)
					if !ok || err != nil || key == "" {
						return fmt.Errorf("--external %q: want %s[INODE]:KEY", x, kind)
					}
					extNs[kind] = dumpcore.ExternalNs{Ino: ino, Key: key}
					continue
				}
				if point, key, ok := cutExternal(x, "mnt"); ok {
					if point == "" || key == "" {
						return fmt.Errorf("--external %q: want mnt[MOUNTPOINT]:KEY", x)
					}
					extMnt[point] = key
					continue
				}
				v, ok := strings.CutPrefix(x, "unix[")
				ino, err := strconv.ParseUint(strings.TrimSuffix(v, "]"), 10, 64)
				if !ok || !strings.HasSuffix(v, "]") || err != nil {
					return fmt.Errorf("--external %q: want unix[INODE], veth[IN] or mnt[MOUNTPOINT]:KEY", x)
				}
				extUnixSk = append(extUnixSk, ino)
			}
			if cmd.Flags().Changed("ext-unix-sk") {
				if extUnixSk == nil {
					extUnixSk = []uint64{}
				}
				if extUnix == "all" {
					extUnixSk = []uint64{}
				} else {
					for _, f := range strings.Split(extUnix, ",") {
						ino, err := strconv.ParseUint(strings.TrimSpace(f), 10, 64)
						if err != nil {
							return fmt.Errorf("--ext-unix-sk %q: want socket inodes, comma separated", extUnix)
						}
						extUnixSk = append(extUnixSk, ino)
					}
				}
			}
			dump := dumpcore.Dump
			if background {
				if leaveStopped || lazy || ps.use || ps.socketFd >= 0 {
					return errors.New("dump: --background leaves the process running and writes local images: not with -s, --lazy-pages or --page-server")
				}
				leaveRunning = true
				dump = dumpcore.Background
			}
			gl := int64(dumpcore.DefaultGhostLimit)
			if ghostLimit != "" {
				v, err := parseSize(ghostLimit)
				if err != nil {
					return fmt.Errorf("--ghost-limit: %w", err)
				}
				gl = v
			}
			if c.workDir != "" {
				if err := os.MkdirAll(c.workDir, 0o755); err != nil {
					return fmt.Errorf("work directory: %w", err)
				}
			}
			log, err := c.logger()
			if err != nil {
				return err
			}
			defer c.close()
			var sink dumpcore.PageSink
			var lazyServe func(func(int, uint64, []byte) error, func(int) ([][2]uint64, error)) error
			if lazy {
				// The pages are served, not sent: --ps-socket or
				// --address/--port name where.
				if ps.use {
					return errors.New("dump: --lazy-pages serves the pages itself: not with --page-server")
				}
				if lazyServe, err = ps.lazyServe(cmd, statusFd); err != nil {
					return err
				}
			} else {
				s, release, err := ps.sink(cmd)
				if err != nil {
					return err
				}
				defer release()
				sink = s
			}
			acts := c.actions(cmd.Context())
			if err := acts.run("pre-dump", 0); err != nil {
				return fmt.Errorf("dump: %w", err)
			}
			spec, err := propsSpec(cgProps, cgPropsFile)
			if err != nil {
				return err
			}
			res, err := dump(cmd.Context(), dumpcore.Options{
				Action:   acts.dumpHook(),
				PageSink: sink, LazyServe: lazyServe,
				Pid: pid, ImagesDir: c.imagesDir, LeaveRunning: leaveRunning,
				LeaveStopped: leaveStopped, ShellJob: shellJob,
				Timeout: time.Duration(timeout) * time.Second, GhostLimit: gl,
				PrevImagesDir: prevDir, Compress: ps.compress, TCPEstablished: tcpEst, NetworkLock: netLock, ExtUnixSk: extUnixSk, FileLocks: fileLocks, TCPClose: tcpClose, SkipInFlight: skipInFlight, LinkRemap: linkRemap, TrackMem: trackMem, CgroupControllers: cgControllers, Root: rootDir, ExternalMounts: extMnt, EmptyNet: emptyNs == "net", ExternalNs: extNs,
				FreezeCgroup: freezeCg, OrphanPtsMaster: orphanPts, CgroupProps: spec, CgroupYard: cgYard, Caller: callerOf(cmd.Context()), Version: version, Logger: log,
			})
			if err != nil {
				log.Error("dumping failed", "pid", pid, "err", err)
				return fmt.Errorf("dumping %d failed: %w", pid, err)
			}
			if res.Release != nil {
				res.Release() // --leave-stopped --track-mem: nobody to hand them to
			}
			if err := autoDedup(cmd, dedup, c.imagesDir); err != nil {
				return err
			}
			if err := writePidfile(pidfile, pid); err != nil {
				return err
			}
			if displayStats {
				printDumpStats(cmd, res.Stats)
			}
			log.Info("dumping finished successfully", "pid", pid)
			return nil
		},
	}
	fs := cmd.Flags()
	c.addFlags(fs)
	ps.addFlags(fs, true)
	fs.IntVarP(&pid, "tree", "t", 0, "checkpoint the process PID with its threads and all its descendants")
	fs.BoolVarP(&leaveRunning, "leave-running", "R", false, "leave the process running after the dump")
	fs.BoolVarP(&leaveStopped, "leave-stopped", "s", false, "leave the process stopped (SIGSTOP) after the dump")
	fs.BoolVarP(&shellJob, "shell-job", "j", false, "allow a process that is a job of a shell (foreign session, terminal stdio)")
	fs.BoolVar(&orphanPts, "orphan-pts-master", false, "a pty slave whose master is outside the tree (a container's terminal) is dumped; the restore makes a new pty and hands its master to its RPC client (criu's orphan-pts-master notification)")
	fs.IntVar(&timeout, "timeout", 10, "seconds to wait for the process to freeze")
	fs.StringVar(&pidfile, "pidfile", "", "write the dumped PID to FILE")
	fs.BoolVar(&dedup, "auto-dedup", false, "free parent page data this round stores again (see ferry dedup)")
	fs.BoolVar(&displayStats, "display-stats", false, "print dump statistics when done")
	fs.StringVar(&ghostLimit, "ghost-limit", "1M", "largest deleted file carried in the images (bytes; K, M, G suffixes)")
	fs.StringVar(&prevDir, "prev-images-dir", "", "store only pages written since the (pre-)dump in DIR (relative to -D)")
	fs.BoolVar(&lazy, "lazy-pages", false, "write no pages: keep the process frozen and serve its memory on --address:--port to a lazy-pages daemon, then kill it")
	fs.IntVar(&statusFd, "status-fd", -1, "with --lazy-pages: write a zero byte to FD once the pages can be requested")
	fs.BoolVar(&trackMem, "track-mem", false, "with -R: leave the dirty tracker in the process for a later incremental dump")
	fs.StringVar(&netLock, "network-lock", "nftables", "with --tcp-established: keep the peers' packets out until the restore: nftables (iptables means the same here) or skip")
	fs.BoolVarP(&fileLocks, "file-locks", "l", false, "dump the file locks the process holds (POSIX, flock, OFD); without it a lock fails the dump")
	fs.BoolVar(&tcpClose, "tcp-close", false, "do not dump established TCP connections: the restored process finds them closed")
	fs.BoolVar(&linkRemap, "link-remap", false, "an open file whose name was removed while it keeps others gets a name of its own (a hard link) for the restore; otherwise it fails the dump")
	fs.Bool("ghost-fiemap", false, "accepted for criu compatibility")
	fs.Bool("no-ghost-fiemap", false, "accepted for criu compatibility")
	fs.BoolVar(&skipInFlight, "skip-in-flight", false, "drop the TCP connections a listener has not accepted yet (otherwise one fails the dump)")
	fs.StringVar(&extUnix, "ext-unix-sk", "", "allow unix datagram sockets connected to processes outside the dump (all, or the peers' inodes, comma separated); they are connected to the peer's name again on restore")
	fs.Lookup("ext-unix-sk").NoOptDefVal = "all"
	fs.StringArrayVar(&externals, "external", nil, "a resource outside the dump, as criu names it: unix[INODE], a unix socket of another process that a datagram socket of the tree is connected to (as --ext-unix-sk INODE); mnt[MOUNTPOINT]:KEY, a mount of the tree's namespace left out (the restore binds what it names KEY); veth[IN] (nothing to do at the dump); repeatable")
	fs.BoolVar(&tcpEst, "tcp-established", false, "dump established TCP connections (TCP_REPAIR); the restored process takes them over without the peer noticing")
	fs.StringArrayVarP(&mountMaps, "ext-mount-map", "M", nil, "MOUNTPOINT:KEY: the mount at MOUNTPOINT is not saved but named KEY (as --external mnt[MOUNTPOINT]:KEY); repeatable")
	fs.StringVarP(&rootDir, "root", "r", "", "where ferry sees the root of the tree's own mount namespace (found from the mount tables if not given)")
	fs.StringArrayVar(&cgControllers, "cgroup-dump-controller", nil, "save only the cgroup hierarchies holding CONTROLLER (repeatable; all by default)")
	fs.StringVar(&cgProps, "cgroup-props", "", "which properties of each controller to save, in criu's notation ('\"memory\": - \"strategy\": \"merge\" - \"properties\": [\"memory.swappiness\"]'): merge adds to ferry's set, replace stands for it")
	fs.StringVar(&cgPropsFile, "cgroup-props-file", "", "--cgroup-props read from FILE")
	fs.StringVar(&cgYard, "cgroup-yard", "", "read the cgroups from the hierarchies mounted in DIR (one each, as criu's yard) instead of wherever they are mounted")
	fs.String("manage-cgroups", "soft", "accepted for criu compatibility: the dump always saves the cgroups and their properties; the restore's --manage-cgroups decides")
	fs.Lookup("manage-cgroups").NoOptDefVal = "soft"
	fs.StringVar(&freezeCg, "freeze-cgroup", "", "freeze the tree with the freezer of the cgroup at this directory (v1 freezer.state or v2 cgroup.freeze; every task at once) before seizing it; a cgroup frozen already (a paused container) is frozen again after the dump")
	fs.StringVar(&emptyNs, "empty-ns", "", "net: the tree's network namespace is made new at the restore but its contents are not saved (the caller sets it up)")
	fs.BoolVar(&background, "background", false, "background snapshot (implies -R): copy memory while the process runs, then freeze it only to copy what it wrote meanwhile and its other state; the images show it as it was at that freeze")
	return cmd
}

func printDumpStats(cmd *cobra.Command, s *pb.DumpStats) {
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "Displaying dump stats:\n")
	fmt.Fprintf(w, "Freezing time: %d us\n", s.FreezingTimeUs)
	fmt.Fprintf(w, "Frozen time: %d us\n", s.FrozenTimeUs)
	fmt.Fprintf(w, "Memory dump time: %d us\n", s.MemdumpTimeUs)
	fmt.Fprintf(w, "Memory write time: %d us\n", s.MemwriteTimeUs)
	fmt.Fprintf(w, "Memory pages scanned: %d (0x%x)\n", s.PagesScanned, s.PagesScanned)
	fmt.Fprintf(w, "Memory pages skipped from parent: %d (0x%x)\n", s.PagesSkippedParent, s.PagesSkippedParent)
	fmt.Fprintf(w, "Memory pages written: %d (0x%x)\n", s.PagesWritten, s.PagesWritten)
	fmt.Fprintf(w, "Zero memory pages: %d (0x%x)\n", s.PagesZero, s.PagesZero)
}

// propsSpec reads --cgroup-props or --cgroup-props-file (nil if neither).
func propsSpec(text, file string) (cgroups.PropsSpec, error) {
	name := "--cgroup-props"
	if file != "" {
		if text != "" {
			return nil, fmt.Errorf("--cgroup-props and --cgroup-props-file: give one")
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("--cgroup-props-file: %w", err)
		}
		text, name = string(b), file
	}
	if text == "" {
		return nil, nil
	}
	return cgroups.ParsePropsSpec(name, text)
}

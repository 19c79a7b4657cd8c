package restorecore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/netlock"
)

// Options control a restore; the field comments name the criu option.
type Options struct {
	ImagesDir    string // -D/--images-dir
	LeaveStopped bool   // -s/--leave-stopped
	// Chains, when set, has parent image sets resolved ahead (a
	// migration's pre-copy rounds).
	Chains   *images.ChainCache
	ShellJob bool // -j/--shell-job
	// LazyPages (--lazy-pages): leave private anonymous memory to the
	// lazy-pages daemon listening at LazySocket.
	LazyPages  bool
	LazySocket string
	// Action, when set, runs criu's action-script stages with the root's
	// PID: "setup-namespaces" and "post-setup-namespaces" once the root
	// exists, "post-restore" and "pre-resume" before it runs (an error
	// fails the restore), "network-unlock" after the network lock goes.
	Action func(stage string, pid int) error
	// TCPClose (--tcp-close): established connections in the images come
	// back as closed sockets.
	TCPClose bool
	// KeepNetworkLock leaves the network lock the dump named to the
	// caller (a migration's target removes it at its commit).
	KeepNetworkLock bool
	// Veths (--external veth[IN]:OUT@BRIDGE) name, by the inner name of
	// each veth of the tree's network namespace, where its outer end goes.
	Veths map[string]VethPeer
	// Macvlans (--external macvlan[IN]:PARENT) name, by the name of each
	// macvlan of the tree's network namespace, its parent link here.
	Macvlans map[string]string
	// WeakSysctls (--weak-sysctls): a sysctl of the images this kernel
	// lacks or refuses is logged and left, not fatal.
	WeakSysctls bool
	// Sibling (--restore-sibling): the root is a child of ferry's parent,
	// not of ferry (criu's RPC clients wait for it themselves).
	Sibling bool
	// ManageCgroups (--manage-cgroups) is one of the Cgroups* modes
	// ("" is soft); CgroupRoot (--cgroup-root) moves the images' cgroups
	// under another path, by controller ("" for every hierarchy).
	ManageCgroups string
	CgroupRoot    map[string]string
	// CgroupYard (--cgroup-yard): the directory the hierarchies are
	// mounted in, one each ("": wherever they are mounted).
	CgroupYard string
	// Root (-r/--root): where the root of the tree's mount namespace is
	// here, when it has one of its own (by default, where the dump saw it).
	Root string
	// ExternalMounts (--external mnt[KEY]:PATH): what to bind for each
	// external mount of the images, by its key.
	ExternalMounts map[string]string
	// JoinNs (--join-ns NS:PID|FILE): namespaces the tree is restored
	// into, by kind, as paths of namespace files.
	JoinNs map[string]string
	// InheritFds (--inherit-fd fd[N]:KEY): files the restore does not
	// make but takes from ferry's fd N, by what the images name them
	// ("pipe:[INODE]", a path), as criu's callers pass stdio.
	InheritFds map[string]int
	// OrphanPtsMaster receives the master of each pty the restore makes
	// for a slave whose master was outside the dump (a container's
	// terminal: criu's orphan-pts-master notification). Without it such
	// images are refused.
	OrphanPtsMaster func(master *os.File) error
	// Caller, when set, is a client that is not root (of ferry's RPC
	// service): the images must be of its own processes, and the restore
	// runs with its rights (caller.go).
	Caller *proc.Caller
	Logger *slog.Logger
}

// Result describes a restored tree, running (or stopped with -s) and
// detached from ferry. Root is a child of the calling process.
type Result struct {
	Root int
	// Pids are the live processes of the tree, the root first; Tids
	// every thread of them (the main threads included).
	Pids  []int
	Tids  []int
	Stats *pb.RestoreStats
}

// Restore recreates the image set in opts.ImagesDir.
func Restore(ctx context.Context, opts Options) (*Result, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	start := time.Now()
	is, err := load(opts.ImagesDir, opts.LazyPages, opts.Chains)
	if err != nil {
		return nil, err
	}
	defer is.close()
	opts.Logger.Debug("images loaded", "took", time.Since(start))
	// The network lock the dump left goes in every outcome: the sockets are
	// back, or (the restore having failed) the connections are lost anyway
	// and the peers had better learn it.
	var res *Result
	if name := is.inv.NetworkLock; name != "" && !opts.KeepNetworkLock {
		defer func() {
			ns := 0
			if res != nil {
				ns = res.Root
			}
			if uerr := netlock.Unlock(ns, name); uerr != nil {
				opts.Logger.Warn("removing the network lock", "table", name, "err", uerr)
			} else {
				opts.Logger.Info("network unlocked", "table", name)
			}
			if opts.Action != nil {
				if err := opts.Action("network-unlock", 0); err != nil {
					opts.Logger.Warn("network-unlock", "err", err)
				}
			}
		}()
	}
	// In a PID namespace it joins (--join-ns pid, --external pid), the
	// tree's PIDs are that namespace's, not this one's.
	_, is.joinsPidNs = opts.JoinNs["pid"]
	for _, e := range is.inv.ExternalNs {
		is.joinsPidNs = is.joinsPidNs || e.Kind == "pid"
	}
	if opts.Caller != nil {
		if err := is.checkCaller(opts.Caller); err != nil {
			return nil, err
		}
		// The files are the process's to open, with the caller's
		// rights: checked by ferry as root, they would tell the caller
		// of files it may not see.
		is.noFileChecks = true
	}
	if err := is.validate(nil); err != nil {
		return nil, err
	}
	if opts.Caller != nil {
		if opts.LazyPages {
			return nil, fmt.Errorf("%w: --lazy-pages for a caller that is not root", ErrValidation)
		}
		opts.ManageCgroups = CgroupsIgnore // the caller's cgroups are its business
	}
	if opts.LazyPages {
		if st, err := os.Stat(opts.LazySocket); err != nil || st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%w: no lazy-pages daemon listening at %s (start ferry lazy-pages first)", ErrValidation, opts.LazySocket)
		}
	}
	validated := time.Now()
	opts.Logger.Debug("images validated", "took", validated.Sub(start))
	r := &restorer{opts: opts, log: opts.Logger, is: is, stats: &pb.RestoreStats{}, memfdOf: map[uint32]int{}}
	r.stats.ValidateTimeUs = uint64(validated.Sub(start).Microseconds())
	tr := ptrace.NewThread()
	defer tr.Close()
	err = tr.Do(func() error {
		var err error
		res, err = r.run(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	r.stats.TotalTimeUs = uint64(time.Since(start).Microseconds())
	res.Stats = r.stats
	if err := images.WriteAll(opts.ImagesDir, "stats-restore", images.KindStats, &pb.Stats{Restore: r.stats}); err != nil {
		opts.Logger.Warn("could not write stats-restore", "err", err)
	}
	return res, nil
}

type restorer struct {
	opts  Options
	log   *slog.Logger
	is    *imageSet
	stats *pb.RestoreStats

	seed *exec.Cmd
	// created lists every task this restore made, for cleanup.
	created []int
	// cleanup runs in reverse order on failure.
	cleanup []func()
	// affinity is the tracer's CPU mask before pinning.
	affinity unix.CPUSet
	// Sharing between the processes of a tree (tree.go): which file ids
	// and pipe inodes several processes use, and ferry's copies of those
	// made already (by file id, pipe inode, shmem inode).
	multi      map[uint32]bool
	multiPipes map[uint64]bool
	held       map[uint32]int
	heldPipes  map[uint64][2]int
	heldShmem  map[uint64]int
	shmemSize  map[uint64]uint64
	// unixSockets indexes the images' unix sockets by inode (unixByIno).
	unixSockets map[uint64]*pb.FileEntry
	// rootPid is the tree's root, once made.
	rootPid int
	// ghostDrops remove the stand-ins made on the tree's own mounts
	// (by file id: makeGhostInRoot).
	ghostDrops map[uint32]func()
	// ghosts are the stand-ins of deleted files (by file id), removed
	// once the tree holds them.
	ghosts map[uint32]string
	memfds []heldMemfd
	// memfdOf is ferry's memfd of each memfd file entry made (by the id
	// of the entry its ghost image belongs to).
	memfdOf map[uint32]int
	// dead holds the stand-ins for dead processes that pidfds refer to,
	// by the pidfds' inode.
	dead map[uint64]int
	// sysvMade are the SysV segments made again (makeSysv), sysvRemoved
	// those of them to remove once the tree holds them; ipcRemoved those
	// to remove in the tree's own IPC namespace (makeIpcNs).
	sysvMade, sysvRemoved, ipcRemoved []int
	// ferryFd: in a new PID namespace, where each fd table keeps ferry's
	// pidfd (clearFds), by the image PID of the process that restored it.
	ferryFd map[int32]uint64
	// cgroupsKept: the restore succeeded, the cgroups it made stay.
	cgroupsKept bool
	// userNs is the tree's new user namespace (makeUserNs), nsMade the
	// namespaces (clone flags) made inside it, which the seed joined.
	userNs *os.File
	nsMade uint64
	// holder, in a tree born in its user namespace (makeUserNs), is
	// what clones the root; channel is ferry's end of the socket its
	// processes take files through (take).
	holder  *compel.Task
	channel *os.File
	// orphans are the masters of the ptys made for slaves whose master
	// was outside the dump (makeOrphanPtys).
	orphans     []*os.File
	orphansMade bool
	// tunTransient are the tun devices made persistent for the restore
	// that were not (makeTun); tunFds a process and fd holding each.
	tunTransient []string
	tunFds       map[string][2]int
	tunNs        int // the root, in whose network namespace they are
}

func (r *restorer) run(ctx context.Context) (res *Result, err error) {
	defer func() {
		if len(r.sysvMade) > 0 {
			defer r.removeSysv(err != nil)
		}
		if err != nil {
			var all []int
			for i := len(r.created) - 1; i >= 0; i-- {
				pid := r.created[i]
				tids, _ := proc.Tids(pid)
				all = append(all, tids...)
				unix.Kill(pid, unix.SIGKILL)
			}
			ptrace.ReapAll(all)
		}
		for i := len(r.cleanup) - 1; i >= 0; i-- {
			r.cleanup[i]()
		}
	}()
	r.pin()

	forkStart := time.Now()
	if err := r.checkNetNs(); err != nil {
		return nil, err
	}
	if err := r.checkJoin(); err != nil {
		return nil, err
	}
	_, r.is.joinsPidNs = r.opts.JoinNs["pid"]
	r.ferryFd = map[int32]uint64{}
	var seedFd *os.File
	if r.seedKeepsFerry() {
		if seedFd, err = r.ferryChannel(); err != nil {
			return nil, err
		}
	}
	seed, err := startSeed(seedFd, r.opts.Sibling, r.opts.Caller)
	if seedFd != nil {
		seedFd.Close()
	}
	if err != nil {
		return nil, err
	}
	r.seed = seed
	r.cleanup = append(r.cleanup, func() {
		seed.Process.Kill()
		seed.Wait()
	})
	if err := ptrace.Seize(seed.Process.Pid, ptrace.OptsRestore); err != nil {
		return nil, fmt.Errorf("seize seed: %w", err)
	}
	if err := ptrace.Interrupt(seed.Process.Pid); err != nil {
		return nil, fmt.Errorf("interrupt seed: %w", err)
	}
	if err := waitStopped(seed.Process.Pid); err != nil {
		return nil, fmt.Errorf("seed: %w", err)
	}
	// The CPU check needs a traced task of this machine: the seed.
	xs, err := localXstate(seed.Process.Pid)
	if err != nil {
		return nil, err
	}
	if err := r.is.validate(xs); err != nil {
		return nil, err
	}
	// Every signal blocked but SIGTRAP (the remote calls' int3 would
	// otherwise reset its handler: see dumpcore's prepare).
	if err := ptrace.SetSigmask(seed.Process.Pid, ^uint64(0)&^(1<<(unix.SIGTRAP-1))); err != nil {
		return nil, err
	}
	regs, err := ptrace.GetRegs(seed.Process.Pid)
	if err != nil {
		return nil, err
	}
	seedTask := &compel.Task{Tid: seed.Process.Pid, Regs: regs, Gadget: seedGadget, Int3: true}
	if err := r.seedAsCaller(seedTask); err != nil {
		return nil, err
	}
	if err := r.joinNamespaces(seedTask); err != nil {
		return nil, err
	}
	if err := r.makeTimeNs(seedTask); err != nil {
		return nil, err
	}
	if err := r.seedCgroupNsRoots(seedTask.Tid); err != nil {
		return nil, err
	}
	if r.is.inv.UserNs != nil {
		if err := r.makeUserNs(seedTask); err != nil {
			return nil, err
		}
	}

	tasks, err := r.createTree(seedTask)
	if err != nil {
		return nil, err
	}
	r.stats.ForkingTimeUs = uint64(time.Since(forkStart).Microseconds())
	root := tasks[r.is.procs[0].pstree.Pid].Tid
	r.rootPid = root
	if r.is.inv.MntNs != nil {
		if err := r.makeMntNs(tasks[r.is.procs[0].pstree.Pid]); err != nil {
			return nil, fmt.Errorf("mount namespace: %w", err)
		}
	}
	if err := r.placeCgroups(tasks); err != nil {
		return nil, fmt.Errorf("cgroups: %w", err)
	}
	if r.is.inv.NetNs != nil {
		if err := r.makeNetNs(root); err != nil {
			return nil, fmt.Errorf("network namespace: %w", err)
		}
	}
	if r.is.inv.IpcNs {
		if err := r.makeIpcNs(root); err != nil {
			return nil, fmt.Errorf("IPC namespace: %w", err)
		}
	}

	if err := r.makeOrphanPtys(tasks[r.is.procs[0].pstree.Pid], "/dev/ptmx"); err != nil {
		return nil, err
	}
	for _, stage := range []string{"setup-namespaces", "post-setup-namespaces"} {
		if err := r.action(stage, root); err != nil {
			return nil, err
		}
	}
	r.planSharing()
	defer r.dropHeld()
	defer r.removeGhosts()
	var builders []*builder
	for _, p := range r.is.procs {
		if p.zombie {
			continue
		}
		b := &builder{r: r, p: p, pid: tasks[p.pstree.Pid].Tid, main: tasks[p.pstree.Pid]}
		if err := b.build(ctx); err != nil {
			return nil, err
		}
		builders = append(builders, b)
	}
	for _, m := range r.orphans {
		if err := r.opts.OrphanPtsMaster(m); err != nil {
			return nil, fmt.Errorf("handing over the master of a terminal: %w", err)
		}
	}
	for _, stage := range []string{"post-restore", "pre-resume"} {
		if err := r.action(stage, root); err != nil {
			return nil, err
		}
	}
	if err := r.sealMemfds(); err != nil {
		return nil, err
	}
	if err := r.endTransientTuns(); err != nil {
		return nil, err
	}
	r.dropFerryPidfds(builders)
	if r.is.inv.IpcNs {
		r.removeIpcRemoved(root)
	}
	// Every process is ready: let them go, children before parents.
	res = &Result{Root: root}
	for i := len(builders) - 1; i >= 0; i-- {
		if err := builders[i].finish(); err != nil {
			return nil, err
		}
	}
	r.cgroupsKept = true
	if r.opts.LazySocket != "" {
		// The daemon held its prefetch back while the tree was being
		// made; it would wait a little longer without this, no more.
		if err := lazypages.Resumed(r.opts.LazySocket); err != nil {
			r.log.Debug("could not tell the lazy-pages daemon that the tree runs", "err", err)
		}
	}
	for _, b := range builders {
		res.Pids = append(res.Pids, b.pid)
		res.Tids = append(res.Tids, b.tids()...)
	}
	return res, nil
}

// action runs stage of the action scripts, if any.
func (r *restorer) action(stage string, pid int) error {
	if r.opts.Action == nil {
		return nil
	}
	return r.opts.Action(stage, pid)
}

// pin keeps the tracer thread on one CPU; the seed and everything cloned
// from it inherit that CPU, so remote syscalls do not cross CPUs.
func (r *restorer) pin() {
	if err := unix.SchedGetaffinity(0, &r.affinity); err != nil {
		return
	}
	var c uint32
	getcpu(&c)
	var one unix.CPUSet
	one.Set(int(c))
	unix.SchedSetaffinity(0, &one)
	r.cleanup = append(r.cleanup, func() { unix.SchedSetaffinity(0, &r.affinity) })
}

func waitStopped(tid int) error {
	for {
		st, err := ptrace.Wait(tid)
		if err != nil {
			return err
		}
		if st.Exited() {
			return fmt.Errorf("%v", st)
		}
		if st.Event() == ptrace.EventStop || st.Sig() == int(unix.SIGSTOP) || st.Sig() == int(unix.SIGTRAP) {
			return nil
		}
		// Any other signal-delivery stop: suppress it and keep waiting.
		if err := ptrace.Cont(tid, 0); err != nil {
			return err
		}
	}
}

// clone3 flags and struct clone_args (include/uapi/linux/sched.h).
const (
	cloneArgsSize = 88
	threadFlags   = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
		unix.CLONE_THREAD | unix.CLONE_SYSVSEM
)

// cloneArgs encodes struct clone_args with set_tid pointing at setTidAddr.
func cloneArgs(flags, exitSignal uint64, setTidAddr uint64) []byte {
	b := make([]byte, cloneArgsSize+8)
	binary.LittleEndian.PutUint64(b[0:], flags)
	binary.LittleEndian.PutUint64(b[32:], exitSignal)
	binary.LittleEndian.PutUint64(b[64:], setTidAddr)
	binary.LittleEndian.PutUint64(b[72:], 1)
	return b
}

// remoteClone runs clone3(set_tid=[want]) in t, using scratch memory at
// argAddr, and returns the new task stopped and traced. want is the PID in
// the new task's PID namespace (1 with CLONE_NEWPID); the result is its
// PID in ferry's.
func remoteClone(t *compel.Task, argAddr uint64, flags, exitSignal uint64, want int) (int, error) {
	pid, _, err := remoteCloneIn(t, argAddr, flags, exitSignal, want)
	return pid, err
}

// remoteCloneIn is remoteClone that also returns the new task's PID as t
// sees it; want 0 takes any free PID (no set_tid).
func remoteCloneIn(t *compel.Task, argAddr uint64, flags, exitSignal uint64, want int) (pid, local int, err error) {
	return remoteCloneInto(t, argAddr, flags, exitSignal, want, flags&unix.CLONE_NEWPID != 0)
}

// remoteCloneInto is remoteCloneIn where elsewhere says the new task is
// made in a PID namespace t is not in (a new one, CLONE_NEWPID; one t
// unshared or joined for its children), so that t sees another PID.
func remoteCloneInto(t *compel.Task, argAddr uint64, flags, exitSignal uint64, want int, elsewhere bool) (pid, local int, err error) {
	args := cloneArgs(flags, exitSignal, argAddr+cloneArgsSize)
	binary.LittleEndian.PutUint32(args[cloneArgsSize:], uint32(want))
	if want == 0 {
		binary.LittleEndian.PutUint64(args[64:], 0) // set_tid
		binary.LittleEndian.PutUint64(args[72:], 0) // set_tid_size
	}
	if err := compel.WriteMem(t.Tid, []compel.Segment{{Addr: argAddr, Local: args}}); err != nil {
		return 0, 0, err
	}
	newTid := 0
	t.OnEvent = func(_, ev int, msg uint) {
		if ev == ptrace.EventClone || ev == ptrace.EventFork || ev == ptrace.EventVfork {
			newTid = int(msg)
		}
	}
	defer func() { t.OnEvent = nil }()
	got, err := t.Syscall(unix.SYS_CLONE3, argAddr, cloneArgsSize)
	if err != nil {
		if errors.Is(err, unix.EEXIST) {
			return 0, 0, fmt.Errorf("%w: PID %d is in use", ErrValidation, want)
		}
		return 0, 0, err
	}
	if newTid == 0 {
		newTid = int(got) // no event: t is in ferry's PID namespace
	}
	if elsewhere {
		got = uint64(newTid) // seen from t, outside the new namespace
		if v, err := proc.ReadStatus(newTid); err != nil || len(v.NSpid) == 0 || v.NSpid[len(v.NSpid)-1] != want {
			return 0, 0, fmt.Errorf("clone3 made %d, not PID %d of a new PID namespace (%v)", newTid, want, err)
		}
	} else if want != 0 && int(got) != want {
		return 0, 0, fmt.Errorf("clone3 returned %d, want %d", got, want)
	}
	if err := waitStopped(newTid); err != nil {
		return 0, 0, fmt.Errorf("new task %d: %w", want, err)
	}
	return newTid, int(got), nil
}

func leU64(b []byte) uint64 { return binary.LittleEndian.Uint64(b) }
func leU32(b []byte) uint32 { return binary.LittleEndian.Uint32(b) }

func readSelf(addr uint64, buf []byte) error {
	return compel.ReadMem(os.Getpid(), []compel.Segment{{Addr: addr, Local: buf}})
}

package dumpcore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
	"github.com/ferrycr/ferry/internal/vmflags"
)

// Options control a dump; the field comments name the criu option.
type Options struct {
	Pid          int           // -t/--tree
	ImagesDir    string        // -D/--images-dir
	LeaveRunning bool          // -R/--leave-running
	LeaveStopped bool          // -s/--leave-stopped
	ShellJob     bool          // -j/--shell-job
	Timeout      time.Duration // --timeout (default 10 s)
	// FreezeCgroup (--freeze-cgroup) is the directory of a cgroup with a
	// freezer that holds the tree: the tree is frozen with it (every task
	// at once) before ptrace takes it (freezeCgroup).
	FreezeCgroup string
	// OrphanPtsMaster (--orphan-pts-master): a pty slave whose master is
	// outside the tree (a container's terminal) is dumped, not refused;
	// the restore makes a new pty and hands its master to its caller.
	OrphanPtsMaster bool
	// Caller, when set, is a client that is not root (of ferry's RPC
	// service), for which only its own processes are dumped.
	Caller     *proc.Caller
	GhostLimit int64 // --ghost-limit (default 1 MiB)
	// PrevImagesDir (--prev-images-dir), relative to ImagesDir unless
	// absolute: store only pages written since that image set.
	PrevImagesDir string
	// TrackMem (--track-mem) leaves the dirty tracker in the process for
	// a later incremental dump (with -R).
	TrackMem bool
	// PreDump (ferry pre-dump): save memory only, copied while the
	// process runs, and leave the tracker in it.
	PreDump bool
	// LazyServe (dump --lazy-pages), when set, is called with the images
	// written but no page data: it serves the frozen process's pages
	// (read) to a lazy-pages daemon and returns once that is done. On
	// success the process is killed; on error it is resumed. list gives
	// the present pages of a process's unlisted memory (see NoPageData).
	LazyServe func(read func(pid int, vaddr uint64, buf []byte) error, list func(pid int) ([][2]uint64, error)) error
	// NoPageData (with LeaveStopped: a post-copy migration's final round)
	// lists the pages in the pagemap without copying them: they stay in
	// the stopped process, read from it later (process_vm_readv) for a
	// lazy-pages daemon. Stats.PagesWritten counts the pages listed.
	//
	// With NoPageData or LazyServe, and no parent round, the memory the
	// daemon serves (lazypages.Unlisted) is not even listed while the
	// tree is frozen (PAGEMAP_SCAN of a fragmented 4 GiB process takes
	// ~30 ms, the pagemap of 200,000 runs as long again): the pagemap
	// head says unlisted, and the page server lists it on the daemon's
	// request (lazypages.ListPresent) while the target restores. With
	// NoPageData and a PageSink, the pages of the rest (file-backed and
	// shared memory, which the restore fills before the tree runs) are
	// then sent with the images, and Stats.PagesWritten counts those.
	NoPageData bool
	// PageSink (--page-server), when set, receives the pages and pagemap
	// files instead of the images directory (the pagemap is also kept
	// locally, for the next incremental round).
	PageSink PageSink
	// Compress (--compress without --page-server) writes the pages file
	// as one zstd stream.
	Compress bool
	// TCPEstablished (--tcp-established) dumps established TCP
	// connections through TCP_REPAIR; otherwise one fails the dump.
	TCPEstablished bool
	// HoldConnections (with LeaveStopped and TCPEstablished: a
	// migration's final round) leaves the dumped connections in repair
	// mode and their peers' packets dropped (see lockNetwork) while the
	// process stays stopped, so that its copy elsewhere can take them
	// over. Whoever resumes the process instead calls ReleaseConnections
	// first.
	HoldConnections bool
	// TCPClose (--tcp-close): established connections are not dumped;
	// the restored process finds closed sockets in their place.
	TCPClose bool
	// LinkRemap (--link-remap): an open file whose name was removed while
	// it keeps others gets a name of its own for the restore (otherwise
	// one fails the dump).
	LinkRemap bool
	// SkipInFlight (--skip-in-flight): connections a TCP listener has
	// not accepted yet are left behind (their peers see them reset);
	// otherwise one fails the dump.
	SkipInFlight bool
	// CgroupControllers (--cgroup-dump-controller): save only the
	// hierarchies holding one of these controllers (all when empty).
	CgroupControllers []string
	// CgroupProps (--cgroup-props, --cgroup-props-file): which properties
	// of each controller are saved (nil: ferry's). CgroupYard
	// (--cgroup-yard): the directory the hierarchies are mounted in, one
	// each, to read them from ("": wherever they are mounted).
	CgroupProps cgroups.PropsSpec
	CgroupYard  string
	// Root (-r/--root): where ferry sees the root of the tree's mount
	// namespace, when it has one of its own; found from the mount tables
	// when empty.
	Root string
	// ExternalMounts (--external mnt[POINT]:KEY, criu's ext-mount-map):
	// mounts of the tree's namespace not saved, by mount point; the
	// restore binds what its own --external mnt[KEY]:PATH names for KEY.
	ExternalMounts map[string]string
	// ExternalNs (--external net[INODE]:KEY, uts, ipc): namespaces of the
	// tree's own not saved, by kind: the inode that must match and the key
	// the restore's caller gives one for.
	ExternalNs map[string]ExternalNs
	// EmptyNet (--empty-ns net): a network namespace of the tree's own is
	// made new at the restore but its contents are not saved (the caller
	// sets it up, as container runtimes do).
	EmptyNet bool
	// FileLocks (--file-locks) dumps the file locks the process holds;
	// otherwise a lock fails the dump.
	FileLocks bool
	// ExtUnixSk (--ext-unix-sk): nil forbids unix sockets connected to
	// processes outside the dump; empty allows any; else the peer inodes
	// allowed.
	ExtUnixSk []uint64
	// NetworkLock (--network-lock): "nftables" (the default; "iptables"
	// is taken to mean it too) drops the peers' packets of the dumped
	// connections from the dump until the restore; "skip" does not.
	NetworkLock string
	// FlagsBeforeFreeze (with LeaveRunning, background snapshots; or with
	// LeaveStopped, a migration's final round): the
	// VMAs' flags come from smaps read just before the freeze, since smaps
	// walks every page table (~10 ms per GiB); while frozen only the
	// layout is read (maps), and a VMA whose layout changed meanwhile
	// makes the dump read smaps after all. After the resume smaps is read
	// again: if a VMA whose flags came from before the freeze no longer
	// shows the same layout and flags, its flags at the freeze instant are
	// not certain, and Result.FlagsMoved says so. The images are complete
	// either way; with FlagsMoved they are fit only as a parent round.
	// With LeaveStopped, smaps of the stopped tree is read while the images
	// are written, and a difference fails the dump (errFlagsMoved; the
	// tree is left stopped); with NoPageData, the dump returns first and
	// Result.FlagsCheck gives the outcome.
	FlagsBeforeFreeze bool
	// Action, when set, runs criu's action-script stages: "network-lock"
	// and "network-unlock" around the network lock, "post-dump" once the
	// images are complete (before the commit: an error fails the dump and
	// resumes the process).
	Action func(stage string) error
	// Frozen, when set, is called once the process is frozen and before
	// any of its state is read (tests observe the frozen process with it;
	// for a background snapshot, at the final freeze).
	Frozen  func()
	Version string // written to the inventory
	Logger  *slog.Logger
}

// PageSink receives image files elsewhere (a page server session).
// Finish must return only once the files are safely stored: the dump
// calls it before its commit point (killing the process).
type PageSink interface {
	Create(name string) (io.WriteCloser, error)
	Finish() error
	Abort()
}

// Result describes a finished dump.
type Result struct {
	Stats *pb.DumpStats
	// FlagsMoved: see Options.FlagsBeforeFreeze.
	FlagsMoved bool
	// FlagsCheck (LeaveStopped, NoPageData and FlagsBeforeFreeze; without
	// NoPageData the dump waits for it) waits
	// until the VMA flags read before the freeze have been compared with
	// those of the stopped tree. Nothing restored from the images may be
	// kept before it returns nil: an error means the images' flags may be
	// wrong (the caller resumes the tree). Nil when there is nothing to
	// wait for.
	FlagsCheck func() error
	// Unlisted: some memory was left out of the pagemap (see NoPageData).
	Unlisted bool
	// Release (LeaveStopped) closes the dirty trackers of the stopped
	// tree, which keep its pages write-protected: closing them drops the
	// protection from every page (~50 ms per GiB), which costs nothing
	// once the tree is gone. Call it after killing the tree, or after
	// resuming it.
	Release func()
}

// DefaultGhostLimit is criu's default for --ghost-limit.
const DefaultGhostLimit = 1 << 20

// Dump checkpoints the process opts.Pid (with all its threads) into
// opts.ImagesDir.
func Dump(ctx context.Context, opts Options) (*Result, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Timeout == 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.GhostLimit == 0 {
		opts.GhostLimit = DefaultGhostLimit
	}
	if opts.Pid <= 0 {
		return nil, fmt.Errorf("invalid pid %d", opts.Pid)
	}
	// The VMA flags' iterator loads while the tree is found and frozen
	// (once per ferry process: ~0.5 ms from this boot's cache, ~4 ms
	// without; background snapshots and pre-dumps come through here too).
	go vmflags.Prepare()
	if _, err := os.Stat(proc.Path(opts.Pid, "stat")); err != nil {
		return nil, fmt.Errorf("process %d: %w", opts.Pid, ErrNoProcess)
	}
	if opts.Pid == os.Getpid() {
		return nil, fmt.Errorf("cannot dump ferry itself (pid %d)", opts.Pid)
	}
	st, err := os.Stat(opts.ImagesDir)
	if err != nil {
		return nil, fmt.Errorf("images directory: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("images directory %s: not a directory", opts.ImagesDir)
	}

	t := newTree(opts)
	d := t.procs[0]
	if opts.PrevImagesDir != "" {
		// Read the parent before freezing anything.
		p, err := loadParent(opts.ImagesDir, opts.PrevImagesDir, imagePid(opts.Pid))
		if err != nil {
			return nil, err
		}
		d.parent = p
	}
	if opts.FlagsBeforeFreeze && (opts.LeaveRunning == opts.LeaveStopped || opts.PreDump || opts.LazyServe != nil) {
		return nil, errors.New("VMA flags read before the freeze need a dump that leaves the process running or stopped")
	}
	// dump --lazy-pages does not: its tree stays frozen until the last
	// page is served, so the freeze buys nothing, and flags read early
	// would have to be checked against the frozen tree before its first
	// page leaves, a second walk the restore's first page request waits
	// for (~30 ms at 4 GiB).
	if opts.FlagsBeforeFreeze {
		// Last before the freeze, so that little can change in between.
		if err := t.readEarlyFlags(); err != nil {
			return nil, err
		}
		if testHookEarlyFlags != nil {
			testHookEarlyFlags(t.early)
		}
	}
	var res *Result
	// The whole dump runs on one locked OS thread: the tracer.
	tr := ptrace.NewThread()
	defer tr.Close()
	err = tr.Do(func() error {
		var err error
		res, err = t.run(ctx)
		return err
	})
	return res, err
}

// testHookEarlyFlags, set by tests, sees the VMA flags read before the
// freeze (and may change them, as a process could meanwhile).
var testHookEarlyFlags func(early map[int]map[vmaKey][]string)

// dumper collects one process of the tree (opts.Pid is that process).
type dumper struct {
	opts  Options
	log   *slog.Logger
	stats *pb.DumpStats
	// t is the tree the process belongs to (nil for the short stops of a
	// tracker's maintenance, see whileStopped).
	t *tree

	threads []*frozenThread
	// saved holds each thread's registers as frozen (before any fix-up).
	saved  map[int]ptrace.Regs
	masks  map[int]uint64
	vmas   []proc.Vma
	gadget uint64
	// affinity holds the threads' CPU masks while the tree is pinned to
	// the tracer's CPU (tree.pin).
	affinity map[int]unix.CPUSet
	// fastGadget, while set, is a "syscall; int3" in the scratch area
	// that remote calls use instead of gadget (scratch.gadget).
	fastGadget uint64
	// Per-thread state only the thread itself can report (collectRemote).
	tidAddr  map[int]uint64
	altStack map[int]*pb.SigAltStack

	// Incremental dumps (incremental.go).
	tracker *Tracker
	parent  *parentImages
	// dirty holds the pages written since the parent round; nil means
	// every page is copied and nothing refers to the parent.
	dirty *regionSet
	// armAfterResume: a new tracker is armed once the process runs again
	// (pre-dump), not while it is frozen.
	armAfterResume bool
	// early holds VMA flags read before the freeze (FlagsBeforeFreeze);
	// usedEarly the VMAs whose flags were taken from it.
	early     map[vmaKey][]string
	usedEarly []vmaKey
	// files is the tree's file table (its repaired TCP connections must
	// leave repair mode if the process goes on).
	files *fileTable
}

// ExternalNs names a namespace left out of the images (Options.ExternalNs).
type ExternalNs struct {
	Ino uint64
	Key string
}

// sigtrapBit is SIGTRAP in a signal mask.
const sigtrapBit = 1 << (unix.SIGTRAP - 1)

// action runs stage of the action scripts, if any.
func (d *dumper) action(stage string) error {
	if d.opts.Action == nil {
		return nil
	}
	return d.opts.Action(stage)
}

// release lets a tree that is left running (or stopped) go: trackers
// nobody will come back for are taken out of its processes, and it
// resumes.
//
// Closing a tracker inside a process would drop its write protection
// from every page while the process is frozen (~20 ms per GiB): a running
// process gets its trackers removed after it resumes (removeTrackers).
func (t *tree) release(frozenAt time.Time) error {
	drops := map[*dumper][]int{}
	for _, d := range t.procs {
		pid := d.opts.Pid
		var drop []int
		if tr := d.tracker; tr != nil && tr.parked > 0 && !d.opts.TrackMem {
			drop = append(drop, tr.parked)
		}
		for _, fd := range t.files.staleTrackers[pid] {
			if d.tracker == nil || fd != d.tracker.parked {
				d.log.Info("removing a dirty tracker an earlier round left in the process", "pid", pid, "fd", fd)
				drop = append(drop, fd)
			}
		}
		if d.opts.LeaveStopped {
			for _, fd := range drop {
				d.task(pid).Syscall(unix.SYS_CLOSE, uint64(fd))
			}
			continue
		}
		drops[d] = drop
	}
	t.resume(t.opts.LeaveStopped)
	t.stats.FrozenTimeUs = uint64(time.Since(frozenAt).Microseconds())
	var err error
	for d, drop := range drops {
		if len(drop) > 0 {
			err = errors.Join(err, removeTrackers(d.opts, d.log, drop))
		}
	}
	return err
}

// finish writes the dump's statistics.
func (d *dumper) finish(start time.Time) (*Result, error) {
	d.stats.TotalTimeUs = uint64(time.Since(start).Microseconds())
	if err := images.WriteAll(d.opts.ImagesDir, "stats-dump", images.KindStats, &pb.Stats{Dump: d.stats}); err != nil {
		return nil, err
	}
	d.log.Info("dump finished", "pid", d.opts.Pid, "frozen", time.Duration(d.stats.FrozenTimeUs)*time.Microsecond,
		"total", time.Since(start))
	return &Result{Stats: d.stats}, nil
}

// prepare blocks every signal of every thread (so remote syscalls are never
// interrupted and pending signals stay queued) and saves registers.
func (d *dumper) prepare() error {
	d.saved = map[int]ptrace.Regs{}
	d.masks = map[int]uint64{}
	for _, t := range d.threads {
		r, err := ptrace.GetRegs(t.tid)
		if err != nil {
			return fmt.Errorf("thread %d: %w", t.tid, err)
		}
		m, err := ptrace.GetSigmask(t.tid)
		if err != nil {
			return fmt.Errorf("thread %d: %w", t.tid, err)
		}
		d.saved[t.tid] = r
		d.masks[t.tid] = m
		// Every signal blocked but SIGTRAP: a remote call ends on int3,
		// and the kernel resets the handler of a blocked (or ignored)
		// SIGTRAP it forces (force_sig_info_to_task). Unblocked, it only
		// stops the thread for ferry, which takes it away.
		if err := ptrace.SetSigmask(t.tid, ^uint64(0)&^sigtrapBit); err != nil {
			return fmt.Errorf("thread %d: %w", t.tid, err)
		}
	}
	vmas, err := proc.ReadMaps(d.opts.Pid)
	if err != nil {
		return err
	}
	d.gadget, err = findSyscallGadget(d.opts.Pid, vmas)
	return err
}

// finishSink waits for the page server to have stored everything.
func (d *dumper) finishSink() error {
	if d.opts.PageSink == nil {
		return nil
	}
	if err := d.opts.PageSink.Finish(); err != nil {
		return fmt.Errorf("the page server did not store the pages: %w", err)
	}
	return nil
}

// resumeThreads puts every thread back as it was frozen and detaches:
// the process continues (or stays stopped).
func (d *dumper) resumeThreads(stopped bool) {
	if stopped {
		unix.Kill(d.opts.Pid, unix.SIGSTOP)
	}
	for _, t := range d.threads {
		if r, ok := d.saved[t.tid]; ok {
			// Our remote syscalls left the thread at a syscall-exit stop,
			// where the kernel no longer applies syscall restart: do it.
			restartFixup(&r, true)
			ptrace.SetRegs(t.tid, &r)
		}
		if m, ok := d.masks[t.tid]; ok {
			ptrace.SetSigmask(t.tid, m)
		}
	}
	for tid, m := range d.affinity {
		unix.SchedSetaffinity(tid, &m)
	}
	d.affinity = nil
	for _, t := range d.threads {
		if err := ptrace.Detach(t.tid, 0); err != nil && !errors.Is(err, unix.ESRCH) {
			d.log.Warn("detach failed", "tid", t.tid, "err", err)
		}
	}
	if stopped && !proc.WaitState(d.opts.Pid, "Tt", 2*time.Second) {
		d.log.Warn("the process did not reach the stopped state", "pid", d.opts.Pid)
	}
	if !stopped {
		for _, t := range d.threads {
			if t.groupStopped {
				// It was stopped before we came: keep it so.
				unix.Tgkill(d.opts.Pid, t.tid, unix.Signal(t.stopSig))
				break
			}
		}
	}
}

func (d *dumper) task(tid int) *compel.Task {
	if d.fastGadget != 0 {
		return &compel.Task{Tid: tid, Regs: d.saved[tid], Gadget: d.fastGadget, Int3: true, OnSignal: d.stopSignal}
	}
	return &compel.Task{Tid: tid, Regs: d.saved[tid], Gadget: d.gadget, OnSignal: d.stopSignal}
}

// stopSignal takes a stop signal a thread dequeued during a remote call:
// the process counts as stopped by it (as it would have been a moment
// later), which the restore and resumeThreads make true again.
func (d *dumper) stopSignal(tid, sig int) bool {
	switch unix.Signal(sig) {
	case unix.SIGSTOP, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU:
	default:
		return false
	}
	for _, t := range d.threads {
		if !t.groupStopped {
			t.groupStopped, t.stopSig = true, sig
		}
	}
	d.log.Debug("stop signal taken during a remote call", "tid", tid, "sig", sig)
	return true
}

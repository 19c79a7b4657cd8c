package dumpcore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
	"github.com/ferrycr/ferry/internal/treeplan"
	"github.com/ferrycr/ferry/internal/vmflags"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/netlock"
)

// tree is what a dump covers: the process opts.Pid and every descendant.
type tree struct {
	opts  Options
	log   *slog.Logger
	stats *pb.DumpStats
	root  int
	// kept: the trackers a dump leaving the tree stopped hands to its
	// caller (Result.Release); closed here if it fails.
	kept []*Tracker
	// procs are the live processes, the root first and every process
	// after its parent (the order the restore recreates them in).
	procs []*dumper
	// zombies are dead children their parents have not reaped yet.
	zombies []proc.Stat
	// pidNsExternal: the tree is in a PID namespace left out with
	// --external pid[INODE]:KEY (pidNamespace).
	pidNsExternal bool
	// refreeze is the cgroup freezer to freeze again once the tree goes
	// (it was frozen before the dump: freezeCgroup).
	refreeze *cgroups.Freezer
	// files is shared by every process: an open file description that
	// several processes hold is one entry.
	files *fileTable
	// locked names the network lock this dump added (removed again if
	// the tree goes on).
	locked string
	// ptyTaken: the ptys' queues were read out (takePtyQueues).
	ptyTaken bool
	// early holds each process's VMA flags read before the freeze
	// (readEarlyFlags), by PID.
	early map[int]map[vmaKey][]string
	// ownNs names the namespaces the tree has of its own, by kind
	// (checkNamespaces).
	ownNs map[string]string
	// In a PID namespace of the tree's own (pidns.go): each task's PID
	// there, and each process's group and session there.
	vpids   map[int]int
	vgroups map[int][2]int32
	// vpgids maps the tree's groups from ferry's PIDs to its own.
	vpgids map[int]int32
	// extNs are the namespaces of the tree's own left out (--external).
	extNs []*pb.ExternalNs
	// userNs is the tree's user namespace, if it has one of its own.
	userNs *pb.UserNs
	// ipc holds the SysV objects of an IPC namespace of the tree's own.
	ipc []*pb.IpcObject
}

func newTree(opts Options) *tree {
	t := &tree{opts: opts, log: opts.Logger, stats: &pb.DumpStats{}, root: opts.Pid}
	ft := newFileTable(opts.GhostLimit)
	ft.tcpEstablished = opts.TCPEstablished
	ft.extUnix = opts.ExtUnixSk
	ft.fileLocks = opts.FileLocks
	ft.tcpClose = opts.TCPClose
	ft.skipInFlight = opts.SkipInFlight
	ft.remapLinks = opts.LinkRemap
	t.files = ft
	root := t.newDumper(opts.Pid)
	ft.lock = root.lockConn
	t.procs = []*dumper{root}
	return t
}

func (t *tree) newDumper(pid int) *dumper {
	o := t.opts
	o.Pid = pid
	return &dumper{opts: o, log: t.log, stats: t.stats, t: t, files: t.files, early: t.early[pid]}
}

// readEarlyFlags reads the VMA flags of the root and its descendants
// before the freeze (Options.FlagsBeforeFreeze): smaps walks every page
// table, too slow for a frozen tree. A process born since reads its own
// while frozen.
func (t *tree) readEarlyFlags() error {
	t.early = map[int]map[vmaKey][]string{}
	pids := []int{t.root}
	for i := 0; i < len(pids); i++ {
		pids = append(pids, proc.Children(pids[i])...)
	}
	for _, pid := range pids {
		vmas, err := vmflags.Read(pid)
		if err != nil {
			if pid == t.root {
				return err
			}
			continue // gone meanwhile
		}
		m := make(map[vmaKey][]string, len(vmas))
		for i := range vmas {
			m[keyOf(&vmas[i])] = vmas[i].VmFlags
		}
		t.early[pid] = m
	}
	t.procs[0].early = t.early[t.root]
	return nil
}

// flagsMoved tells whether a VMA flag read before the freeze may differ
// from the one at the freeze, in any process (dumper.flagsMoved).
func (t *tree) flagsMoved() (bool, error) {
	for _, d := range t.procs {
		if moved, err := d.flagsMoved(); moved || err != nil {
			return moved, err
		}
	}
	return false, nil
}

// freeze seizes every thread of the root, then of its children, and so
// on down: a process's children are listed once it is frozen, when it can
// make no more. Zombies are noted, not seized.
func (t *tree) freeze(deadline time.Time) error {
	queue := []int{t.root}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		if pid != t.root {
			st, err := proc.ReadStat(pid)
			if err != nil {
				continue // reaped meanwhile
			}
			if st.State == 'Z' {
				t.zombies = append(t.zombies, st)
				continue
			}
		}
		threads, err := freeze(pid, deadline)
		if err != nil && pid != t.root {
			// Dead meanwhile (a zombie now, or reaped)?
			st, serr := proc.ReadStat(pid)
			if serr != nil {
				continue
			}
			if st.State == 'Z' {
				t.zombies = append(t.zombies, st)
				continue
			}
		}
		if err != nil {
			t.resume(false)
			return err
		}
		queue = append(queue, t.frozen(pid, threads)...)
	}
	return nil
}

// frozen records pid's seized threads (its dumper made, the root's
// there already) and returns its children, to freeze next.
func (t *tree) frozen(pid int, threads []*frozenThread) []int {
	d := t.procs[0]
	if pid != t.root {
		d = t.newDumper(pid)
		t.procs = append(t.procs, d)
	}
	d.threads = threads
	return proc.Children(pid)
}

// pin keeps the tracer thread and every frozen thread on the tracer's CPU
// while the tree is frozen: each remote call then wakes a thread on the
// same CPU instead of another (slow on a VM). Each thread gets its own
// mask back when it resumes (resumeThreads); the returned func gives the
// tracer its own back.
func (t *tree) pin() func() {
	var mine, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &mine); err != nil {
		return func() {}
	}
	one.Set(currentCPU())
	unix.SchedSetaffinity(0, &one)
	for _, d := range t.procs {
		d.affinity = map[int]unix.CPUSet{}
		for _, ft := range d.threads {
			var m unix.CPUSet
			if unix.SchedGetaffinity(ft.tid, &m) == nil && unix.SchedSetaffinity(ft.tid, &one) == nil {
				d.affinity[ft.tid] = m
			}
		}
	}
	return func() { unix.SchedSetaffinity(0, &mine) }
}

// single tells whether the tree is one process.
func (t *tree) single() bool { return len(t.procs) == 1 && len(t.zombies) == 0 }

// run dumps the tree: freeze, collect, write, then kill it (or let it go).
func (t *tree) run(ctx context.Context) (*Result, error) {
	start := time.Now()
	defer func() { closeAll(t.kept)() }()
	if err := t.checkCaller(true); err != nil {
		return nil, err
	}
	freeze := t.freeze
	if t.opts.FreezeCgroup != "" {
		freeze = t.freezeCgroup
	}
	if err := freeze(start.Add(t.opts.Timeout)); err != nil {
		return nil, err
	}
	if err := t.checkCaller(false); err != nil {
		t.resume(false)
		return nil, err
	}
	defer func() {
		if t.refreeze != nil {
			if err := t.refreeze.Set(true, time.Now().Add(t.opts.Timeout)); err != nil {
				t.log.Warn("freezing the cgroup again, as it was before the dump", "cgroup", t.opts.FreezeCgroup, "err", err)
			}
		}
	}()
	frozenAt := time.Now()
	root := t.procs[0]
	if t.opts.Frozen != nil {
		t.opts.Frozen()
	}
	t.stats.FreezingTimeUs = uint64(frozenAt.Sub(start).Microseconds())
	nthreads := 0
	for _, d := range t.procs {
		nthreads += len(d.threads)
	}
	t.log.Info("tree frozen", "pid", t.root, "processes", len(t.procs), "zombies", len(t.zombies),
		"threads", nthreads, "took", frozenAt.Sub(start))

	committed := false
	defer func() {
		if !committed {
			t.resume(false)
		}
	}()
	defer t.pin()()
	defer t.files.closePtyMasters()
	t0 := time.Now()
	for _, d := range t.procs {
		if err := d.prepare(); err != nil {
			return nil, err
		}
	}
	t.log.Debug("prepared", "took", time.Since(t0))
	if err := t.checkNamespaces(); err != nil {
		return nil, err
	}
	if err := t.pidNamespace(); err != nil {
		return nil, err
	}
	if err := t.checkNamespaceHolders(); err != nil {
		return nil, err
	}
	userNs, err := t.userNamespace()
	if err != nil {
		return nil, err
	}
	t.userNs = userNs
	t0 = time.Now()
	for _, d := range t.procs[1:] {
		if root.parent != nil {
			d.parent = root.parent.forProcess(t.opts.ImagesDir, int(t.vpid(d.opts.Pid)))
		}
	}
	for _, d := range t.procs {
		if err := d.setupTracking(); err != nil {
			return nil, err
		}
		if tr := d.tracker; tr != nil && t.opts.LeaveStopped {
			// Closing the last reference to a tracker drops its write
			// protection from every page (~50 ms per GiB here): not
			// while the copy waits for the final round. The caller
			// closes them (Result.Release), once the tree is gone
			// (cheap then) or resumed.
			t.kept = append(t.kept, tr)
		} else if tr != nil {
			defer tr.Close()
		}
	}
	t.log.Debug("tracking set up", "took", time.Since(t0))
	if t.opts.PreDump {
		committed = true
		return t.preDump(ctx, start, frozenAt)
	}
	imgs, err := t.collect(ctx)
	if err != nil {
		return nil, err
	}
	inv := imgs[0].inv
	t.lockNetwork(inv)
	if (t.opts.LeaveRunning || t.opts.LeaveStopped) && t.opts.LazyServe == nil {
		// Everything is read: the tree goes on while the images are
		// written. A failure from here on fails the dump, not the tree.
		committed = true
		if err := t.release(frozenAt); err != nil {
			return nil, fmt.Errorf("%w (the process runs on)", err)
		}
		var check func() error
		moved := false
		if t.opts.LeaveStopped && t.opts.FlagsBeforeFreeze {
			// The tree stays stopped: smaps now is smaps at the freeze,
			// compared while the images are written.
			check = t.checkFlags()
		} else if moved, err = t.flagsMoved(); err != nil {
			return nil, fmt.Errorf("%w (the process runs on)", err)
		}
		t1 := time.Now()
		if err := t.write(imgs); err != nil {
			return nil, fmt.Errorf("%w (the process runs on)", err)
		}
		t2 := time.Now()
		if err := root.finishSink(); err != nil {
			return nil, fmt.Errorf("%w (the process runs on)", err)
		}
		t.log.Debug("images written", "write", t2.Sub(t1), "sink", time.Since(t2))
		unlisted := false
		for _, img := range imgs {
			unlisted = unlisted || img.unlisted
		}
		// A post-copy final round (NoPageData) leaves the check to its
		// caller, which holds the target back until it is done (the
		// target's daemon needs the source's word to finish); otherwise it
		// is waited for here, after the images, which take about as long.
		if check != nil && !t.opts.NoPageData {
			t3 := time.Now()
			if err := check(); err != nil {
				return nil, fmt.Errorf("%w (the process is left stopped)", err)
			}
			t.log.Debug("flags checked", "waited", time.Since(t3))
		}
		if err := root.action("post-dump"); err != nil {
			return nil, fmt.Errorf("%w (the process runs on)", err)
		}
		res, err := root.finish(start)
		if res != nil {
			res.Release, t.kept = closeAll(t.kept), nil
			res.FlagsMoved, res.Unlisted = moved, unlisted
			if t.opts.NoPageData {
				res.FlagsCheck = check
			}
		}
		return res, err
	}
	// The tree is to die: what waits in its ptys goes in the images
	// (taken out of them; put back if the tree goes on after all).
	if err := t.files.takePtyQueues(); err != nil {
		return nil, err
	}
	t.ptyTaken = true
	if err := t.write(imgs); err != nil {
		return nil, err
	}
	if err := root.finishSink(); err != nil {
		return nil, err
	}
	if err := root.action("post-dump"); err != nil {
		return nil, err
	}
	if t.opts.LazyServe != nil {
		if err := t.serveLazy(imgs); err != nil {
			return nil, err
		}
	}

	// Images are complete: now the tree may be killed.
	committed = true
	t.stats.FrozenTimeUs = uint64(time.Since(frozenAt).Microseconds())
	t.kill()
	// Still in repair mode: the connections vanish without a packet (the
	// restored tree takes them over).
	for _, fd := range t.files.repaired {
		unix.Close(fd)
	}
	t.files.repaired = nil
	return root.finish(start)
}

// closeAll returns a function that closes the trackers.
func closeAll(trs []*Tracker) func() {
	return func() {
		for _, tr := range trs {
			tr.Close()
		}
	}
}

// errFlagsMoved fails a dump --lazy-pages whose VMA flags, read before
// the freeze, are not those of the frozen tree.
var errFlagsMoved = errors.New("a memory mapping changed as the process was frozen (its flags in the images are not certain); dump again")

// serveLazy serves the frozen tree's memory (dump --lazy-pages) until the
// lazy-pages daemon has it all. The VMA flags in the images are those of
// the frozen tree (see Dump).
func (t *tree) serveLazy(imgs []*imageSet) error {
	// Asked for by the images' PIDs (vpid).
	inTree := map[int]int{}
	vmas := map[int][]*pb.Vma{}
	for i, d := range t.procs {
		inTree[int(t.vpid(d.opts.Pid))] = d.opts.Pid
		if imgs[i].unlisted {
			vmas[d.opts.Pid] = imgs[i].mm.Vmas
		}
	}
	read := func(pid int, vaddr uint64, buf []byte) error {
		here, ok := inTree[pid]
		if !ok {
			return fmt.Errorf("process %d is not in this dump", pid)
		}
		return compel.ReadMem(here, []compel.Segment{{Addr: vaddr, Local: buf}})
	}
	list := func(pid int) ([][2]uint64, error) {
		here, ok := inTree[pid]
		if !ok || vmas[here] == nil {
			return nil, fmt.Errorf("process %d has no unlisted memory in this dump", pid)
		}
		return lazypages.ListPresent(here, vmas[here])
	}
	if err := t.opts.LazyServe(read, list); err != nil {
		return fmt.Errorf("serving pages to the lazy-pages daemon: %w (the process is resumed)", err)
	}
	return nil
}

// checkFlags compares, in the background, the VMA flags read before the
// freeze with smaps of the tree, which must be frozen or stopped until the
// returned function (which waits for the outcome) has been called: any
// difference is errFlagsMoved.
func (t *tree) checkFlags() func() error {
	verified := make(chan error, 1)
	go func() {
		// The walk (where the flags come from smaps, ~15 ms per GiB here;
		// with the VMA flags iterator, well under a millisecond at any
		// size) competes for the CPUs with what the downtime waits for:
		// the images, their transfer and the target's restore. It runs at the lowest priority, on a thread
		// of its own that ends with it (locked and never unlocked).
		runtime.LockOSThread()
		unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 19)
		moved, err := t.flagsMoved()
		if err == nil && moved {
			err = errFlagsMoved
		}
		verified <- err
	}()
	var once sync.Once
	var verr error
	return func() error {
		once.Do(func() { verr = <-verified })
		return verr
	}
}

// collect reads every process of the tree, then what spans processes.
func (t *tree) collect(ctx context.Context) ([]*imageSet, error) {
	t.log.Debug("VMA flags", "from", vmflags.Source())
	imgs := make([]*imageSet, 0, len(t.procs))
	for _, d := range t.procs {
		img, err := d.collect(ctx)
		if err != nil {
			if pid := strconv.Itoa(d.opts.Pid); d.opts.Pid != t.root && !strings.Contains(err.Error(), pid) {
				err = fmt.Errorf("process %s: %w", pid, err)
			}
			return nil, err
		}
		imgs = append(imgs, img)
	}
	inTree := map[int32]bool{}
	for _, d := range t.procs {
		inTree[int32(d.opts.Pid)] = true
	}
	for _, z := range t.zombies {
		inTree[int32(z.Pid)] = true
	}
	for _, img := range imgs {
		if err := t.files.checkUnixPeers(img.fds); err != nil {
			return nil, err
		}
		if err := t.files.checkTtys(img.fds, t.opts.ShellJob, t.opts.OrphanPtsMaster); err != nil {
			return nil, err
		}
		for _, fd := range img.fds.Fds {
			f := t.files.entries[fd.FileId-1]
			if f.Type == "pidfd" && f.PidfdPid != -1 && !inTree[f.PidfdPid] {
				return nil, fmt.Errorf("fd %d of %d: a pidfd of process %d, which is not in the tree: %w",
					fd.Fd, img.fds.Pid, f.PidfdPid, ErrUnsupported)
			}
		}
	}
	if err := t.checkUffd(imgs); err != nil {
		return nil, err
	}
	t.cttys(imgs)
	if err := t.files.checkRemovedWatches(); err != nil {
		return nil, err
	}
	t.sharedTables(imgs)
	if err := t.checkCallerFiles(); err != nil {
		return nil, err
	}
	uts, err := t.utsNamespace()
	if err != nil {
		return nil, err
	}
	imgs[0].inv.UtsNs = uts
	if imgs[0].inv.NetNs, err = t.netNamespace(); err != nil {
		return nil, err
	}
	if t.ipc, err = t.ipcNamespace(); err != nil {
		return nil, err
	}
	imgs[0].inv.IpcNs = t.ownNs["ipc"] != ""
	if err := t.checkSysvWhole(imgs); err != nil {
		return nil, err
	}
	if err := t.collectCgroups(imgs); err != nil {
		return nil, err
	}
	if imgs[0].inv.MntNs, err = t.mntNamespace(); err != nil {
		return nil, err
	}
	if imgs[0].inv.TimeNs, err = t.timeNamespace(); err != nil {
		return nil, err
	}
	if imgs[0].inv.CgroupNsRoots, err = t.cgroupNamespace(); err != nil {
		return nil, err
	}
	imgs[0].inv.CgroupNs = t.ownNs["cgroup"] != ""
	imgs[0].inv.ExternalNs = t.extNs
	imgs[0].inv.UserNs = t.userNs
	return imgs, t.checkSessions(imgs)
}

// cttys records each session leader's controlling terminal when it is a
// pty whose master is in the dump: the restore makes it the leader's
// terminal again even if no fd of the leader refers to it.
func (t *tree) cttys(imgs []*imageSet) {
	masters := map[int32]bool{}
	for _, f := range t.files.entries {
		if f.Type == "ptmx" && f.Tty != nil {
			masters[f.Tty.Index] = true
		}
	}
	for _, img := range imgs {
		st, pt := img.stat, img.pstree
		if pt.Sid != pt.Pid || st.TtyNr == 0 {
			continue
		}
		major, minor := unix.Major(st.TtyNr), unix.Minor(st.TtyNr)
		if major < 136 || major > 143 {
			continue // not a pty slave
		}
		index := int32((major-136)*256 + minor)
		if !masters[index] {
			t.log.Debug("controlling terminal outside the dump", "pid", pt.Pid, "pts", index)
			continue
		}
		img.core.CttyPts, img.core.CttyFg = index+1, int32(st.Tpgid)
	}
}

// checkSessions refuses sessions and process groups the restore cannot
// make again (internal/treeplan plans it), and those whose dead leader
// the restore would stand in for while the leader is in fact alive
// outside the tree.
func (t *tree) checkSessions(imgs []*imageSet) error {
	var procs []treeplan.Proc
	for _, img := range imgs {
		pt := img.pstree
		procs = append(procs, treeplan.Proc{Pid: pt.Pid, Ppid: pt.Ppid, Pgid: pt.Pgid, Sid: pt.Sid, ExitSignal: img.core.ExitSignal,
			FilesWith: img.core.FilesSharedWith, FsWith: img.core.FsSharedWith, Subreaper: img.core.ChildSubreaper != 0,
			Init: len(procs) == 0 && t.vpids != nil})
	}
	for _, z := range t.zombies {
		procs = append(procs, treeplan.Proc{Pid: int32(z.Pid), Ppid: int32(z.Ppid), Pgid: int32(z.Pgid), Sid: int32(z.Sid), ExitSignal: int32(z.ExitSignal)})
	}
	plan, err := treeplan.Make(procs)
	if err != nil {
		return unsupported{err}
	}
	for _, h := range plan.Helpers {
		if st, err := proc.ReadStat(int(h)); err == nil {
			return fmt.Errorf("the tree has processes in session or group %d, whose leader (%s) is alive outside the tree: %w", h, st.Comm, ErrUnsupported)
		}
	}
	return nil
}

// sharedTables finds processes that share their fd table (CLONE_FILES)
// or filesystem information (CLONE_FS) with an earlier process of the
// tree, their parent if it is one of them. Whether the restore can make
// the sharing again is the tree plan's to say (checkSessions).
func (t *tree) sharedTables(imgs []*imageSet) {
	const kcmpFiles, kcmpFS = 2, 3
	for i, img := range imgs[1:] {
		pid, ppid := int(img.pstree.Pid), int(img.pstree.Ppid)
		for _, k := range []struct {
			typ int
			set *int32
		}{{kcmpFiles, &img.core.FilesSharedWith}, {kcmpFS, &img.core.FsSharedWith}} {
			if kcmpSame(ppid, pid, k.typ) {
				*k.set = int32(ppid)
				continue
			}
			for _, other := range imgs[:i+1] {
				if o := int(other.pstree.Pid); kcmpSame(o, pid, k.typ) {
					*k.set = int32(o)
					break
				}
			}
		}
	}
}

// checkUffd matches each process's memory registered with a userfaultfd
// (uffd_modes) to the userfaultfd it holds: the restore makes that
// userfaultfd in the process and registers the memory with it. Without
// a userfaultfd of its own, what smaps shows is ferry's dirty tracker,
// and no registration is saved. Refused: memory registered with a
// userfaultfd the process holds no descriptor of (or one of several),
// one held by several processes (the restore could not tell whose memory
// it serves), and write-protect registrations in a process ferry tracks
// too.
func (t *tree) checkUffd(imgs []*imageSet) error {
	holders := map[uint32]map[int32]bool{}
	for _, img := range imgs {
		for _, fd := range img.fds.Fds {
			if t.files.entries[fd.FileId-1].Type == "userfaultfd" {
				if holders[fd.FileId] == nil {
					holders[fd.FileId] = map[int32]bool{}
				}
				holders[fd.FileId][img.fds.Pid] = true
			}
		}
	}
	for _, img := range imgs {
		pid := img.fds.Pid
		var own []int32
		for _, fd := range img.fds.Fds {
			if id := fd.FileId; t.files.entries[id-1].Type == "userfaultfd" {
				if len(holders[id]) > 1 {
					return fmt.Errorf("fd %d of %d: a userfaultfd held by %d processes: %w", fd.Fd, pid, len(holders[id]), ErrUnsupported)
				}
				if !slices.Contains(own, int32(id)) {
					own = append(own, int32(id))
				}
			}
		}
		tracked := len(t.files.staleTrackers[int(pid)]) > 0
		for _, v := range img.mm.Vmas {
			switch {
			case v.UffdModes == 0:
			case len(own) == 0 && v.UffdModes&^uffdWP == 0:
				v.UffdModes, v.UffdWp = 0, nil // ferry's tracker
			case len(own) == 0:
				return fmt.Errorf("process %d: memory at %#x is registered with a userfaultfd the process holds no descriptor of: %w", pid, v.Start, ErrUnsupported)
			case len(own) > 1:
				return fmt.Errorf("process %d: memory at %#x is registered with one of its %d userfaultfds: %w", pid, v.Start, len(own), ErrUnsupported)
			case tracked && v.UffdModes&uffdWP != 0:
				return fmt.Errorf("process %d: memory at %#x is write-protected through its own userfaultfd and tracked by ferry's (pre-dump): %w", pid, v.Start, ErrUnsupported)
			}
		}
	}
	return nil
}

// unsupported marks an error of another package as ErrUnsupported
// without adding to its text.
type unsupported struct{ error }

func (e unsupported) Unwrap() []error { return []error{e.error, ErrUnsupported} }

// write writes the image files: the tree's (inventory, pstree, files,
// ghosts), then each process's.
func (t *tree) write(imgs []*imageSet) error {
	t.translatePids(imgs)
	dir := t.opts.ImagesDir
	if imgs[0].inv.IpcNs {
		msgs := make([]proto.Message, len(t.ipc))
		for i, o := range t.ipc {
			msgs[i] = o
		}
		if err := images.WriteAll(dir, images.IpcName, images.KindIpc, msgs...); err != nil {
			return err
		}
	}
	if err := images.WriteAll(dir, images.InventoryName, images.KindInventory, imgs[0].inv); err != nil {
		return err
	}
	w, err := images.Create(dir, images.PstreeName, images.KindPstree)
	if err != nil {
		return err
	}
	for _, img := range imgs {
		if err := w.Write(img.pstree); err != nil {
			w.Close()
			return err
		}
	}
	for _, z := range t.zombies {
		if err := w.Write(&pb.PstreeEntry{Pid: int32(z.Pid), Ppid: int32(z.Ppid), Pgid: int32(z.Pgid), Sid: int32(z.Sid)}); err != nil {
			w.Close()
			return err
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	for _, z := range t.zombies {
		c := &pb.TaskCore{Pid: int32(z.Pid), Comm: z.Comm, State: "zombie", ExitCode: int32(z.ExitCode), ExitSignal: int32(z.ExitSignal)}
		if err := images.WriteAll(dir, images.CoreName(z.Pid), images.KindCore, c); err != nil {
			return err
		}
	}
	if w, err = images.Create(dir, images.FilesName, images.KindFiles); err != nil {
		return err
	}
	for _, f := range t.files.entries {
		if err := w.Write(f); err != nil {
			w.Close()
			return err
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	for _, g := range t.files.ghosts {
		if err := images.WriteAll(dir, images.GhostName(g.Id), images.KindGhost, g); err != nil {
			return err
		}
	}
	for i, d := range t.procs {
		if err := d.write(imgs[i]); err != nil {
			return err
		}
	}
	return nil
}

// kill ends the dumped tree and waits until its threads are dead. A PID
// is free once the parent reaps the zombie, which is the parent's
// business (criu behaves the same).
func (t *tree) kill() {
	for _, d := range t.procs {
		unix.Kill(d.opts.Pid, unix.SIGKILL)
	}
	var tids []int
	for _, d := range t.procs {
		for _, th := range d.threads {
			tids = append(tids, th.tid)
		}
	}
	ptrace.ReapAll(tids) // in whatever order they become ready
}

// resume lets the tree go on (or stay stopped): connections leave repair
// mode, the network lock goes, and every thread is put back as frozen.
func (t *tree) resume(stopped bool) {
	if stopped && t.opts.HoldConnections {
		// The connections stay held; the caller releases them.
		for _, fd := range t.files.repaired {
			unix.Close(fd)
		}
		t.files.repaired = nil
		t.locked = ""
	}
	unrepair(t.files.repaired)
	t.files.repaired = nil
	if t.ptyTaken {
		t.files.putPtyQueuesBack()
		t.ptyTaken = false
	}
	if t.locked != "" {
		if err := netlock.Unlock(t.root, t.locked); err != nil {
			t.log.Warn("removing the network lock", "table", t.locked, "err", err)
		}
		t.locked = ""
		if t.opts.Action != nil {
			if err := t.opts.Action("network-unlock"); err != nil {
				t.log.Warn("network-unlock", "err", err)
			}
		}
	}
	for _, d := range t.procs {
		d.resumeThreads(stopped)
	}
}

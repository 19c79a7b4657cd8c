package dumpcore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// imageSet is everything a dump writes besides page data.
type imageSet struct {
	stat    proc.Stat // the process's /proc/PID/stat at the freeze
	inv     *pb.Inventory
	pstree  *pb.PstreeEntry
	core    *pb.TaskCore
	mm      *pb.MmCore
	files   *fileTable
	fds     *pb.FdTable
	pagemap []images.PageEntry
	// unlisted: pagemap leaves out the lazy memory (Options.NoPageData).
	unlisted bool
	// gaps and parentPages: parent runs still to be merged into pagemap
	// (withParentRuns).
	gaps        []span
	parentPages *regionSet
}

func (d *dumper) collect(ctx context.Context) (*imageSet, error) {
	pid := d.opts.Pid
	img := &imageSet{files: d.files}

	stat, err := proc.ReadStat(pid)
	if err != nil {
		return nil, err
	}
	status, err := proc.ReadStatus(pid)
	if err != nil {
		return nil, err
	}
	if pid == d.t.root && !d.opts.ShellJob && stat.Sid != pid {
		return nil, fmt.Errorf("process %d is not a session leader (session %d); use --shell-job (-j) to dump a job of a shell",
			pid, stat.Sid)
	}

	img.stat = stat
	img.pstree = &pb.PstreeEntry{Pid: int32(pid), Ppid: int32(stat.Ppid), Pgid: int32(stat.Pgid), Sid: int32(stat.Sid)}
	for _, t := range d.threads {
		img.pstree.Threads = append(img.pstree.Threads, int32(t.tid))
	}

	core := &pb.TaskCore{
		Pid:        int32(pid),
		Comm:       stat.Comm,
		Umask:      status.Umask,
		ExitSignal: int32(stat.ExitSignal),
		State:      "running",
		Creds: &pb.Creds{
			Uid: status.Uid[0], Euid: status.Uid[1], Suid: status.Uid[2], Fsuid: status.Uid[3],
			Gid: status.Gid[0], Egid: status.Gid[1], Sgid: status.Gid[2], Fsgid: status.Gid[3],
			Groups: status.Groups,
			CapInh: status.CapInh, CapPrm: status.CapPrm, CapEff: status.CapEff,
			CapBnd: status.CapBnd, CapAmb: status.CapAmb, NoNewPrivs: status.NoNewPrivs,
		},
	}
	for _, t := range d.threads {
		if status.Seccomp != 0 && !ptrace.SeccompSuspended(t.tid) {
			return nil, fmt.Errorf("process %d uses seccomp (mode %d) and ferry cannot suspend its filters while it works in it (PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN, and ferry under no filter of its own): %w", pid, status.Seccomp, ErrUnsupported)
		}
	}
	if b, err := os.ReadFile(proc.Path(pid, "personality")); err == nil {
		p, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 16, 32)
		core.Personality = uint32(p)
	}
	if b, err := os.ReadFile(proc.Path(pid, "oom_score_adj")); err == nil {
		v, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		core.OomScoreAdj = int32(v)
	}
	core.Loginuid = ^uint32(0)
	if b, err := os.ReadFile(proc.Path(pid, "loginuid")); err == nil {
		if v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 32); err == nil {
			core.Loginuid = uint32(v)
		}
	}
	if b, err := os.ReadFile(proc.Path(pid, "timerslack_ns")); err == nil {
		v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		core.TimerslackNs = v
	}
	lims, err := proc.ReadLimits(pid)
	if err != nil {
		return nil, err
	}
	for _, l := range lims {
		core.Rlimits = append(core.Rlimits, &pb.Rlimit{Resource: uint32(l.Resource), Cur: l.Cur, Max: l.Max})
	}
	img.core = core

	phase := time.Now()
	lap := func(name string) {
		d.log.Debug("dump phase", "phase", name, "took", time.Since(phase))
		phase = time.Now()
	}
	lap("proc")
	// Remote syscalls in the main thread, with a scratch page.
	main := d.task(pid)
	sc, err := mapScratch(main, pid)
	if err != nil {
		return nil, err
	}
	// The int3 gadget, unless the process ignores SIGTRAP: the kernel
	// would reset that to the default when int3 forces one.
	if g := sc.gadget(main); g != 0 && status.SigIgn&sigtrapBit == 0 {
		d.fastGadget = g
		main = d.task(pid)
	}
	mm, err := d.collectRemote(img, main, sc, stat, status)
	d.fastGadget = 0
	main = d.task(pid)
	if uerr := sc.unmap(main); err == nil && uerr != nil {
		err = uerr
	}
	if err != nil {
		return nil, err
	}
	img.mm = mm
	lap("remote")

	// Threads: registers and per-thread state.
	for _, t := range d.threads {
		tc, err := d.collectThread(t.tid)
		if err != nil {
			return nil, err
		}
		if err := collectSeccomp(core, tc, t.tid); err != nil {
			return nil, fmt.Errorf("thread %d: %w", t.tid, err)
		}
		core.Threads = append(core.Threads, tc)
	}

	// Process-wide pending signals.
	shared, err := ptrace.PeekSiginfo(pid, true)
	if err != nil {
		return nil, err
	}
	for _, si := range shared {
		core.SharedPending = append(core.SharedPending, siginfo(si))
	}

	// cwd and root.
	cwd, err := img.files.addPath(pid, "cwd", "dir")
	if err != nil {
		return nil, err
	}
	core.CwdId = cwd
	root, err := img.files.addPath(pid, "root", "dir")
	if err != nil {
		return nil, err
	}
	core.RootId = root

	lap("threads")
	// Memory.
	if err := d.collectVmas(img); err != nil {
		return nil, err
	}
	lap("vmas")
	if err := d.dumpPages(ctx, img); err != nil {
		return nil, err
	}
	lap("pages")

	// Files.
	skip := -1
	if d.tracker != nil {
		skip = d.tracker.parked
	}
	img.files.cttyNr, img.files.cttyFg = stat.TtyNr, stat.Tpgid
	fds, err := img.files.collectFds(pid, d.opts.ShellJob, skip)
	if err != nil {
		return nil, err
	}
	img.fds = fds
	lap("files")

	// Last: a stop signal may have arrived during the remote calls.
	if ft := d.threads[0]; ft.groupStopped {
		core.State, core.StopSignal = "stopped", int32(ft.stopSig)
	}
	if pid == d.t.root {
		inv, err := d.inventory(img)
		if err != nil {
			return nil, err
		}
		img.inv = inv
		lap("inventory")
	}
	return img, nil
}

// collectRemote gathers what only the task itself can tell: sigactions,
// itimers, POSIX timer values, brk, and per-thread tid address and
// sigaltstack.
func (d *dumper) collectRemote(img *imageSet, main *compel.Task, sc *scratch, stat proc.Stat, status proc.Status) (*pb.MmCore, error) {
	pid := d.opts.Pid
	core := img.core
	// struct sigaction (kernel, x86_64): handler, flags, restorer, mask.
	// Only signals caught or ignored (status SigCgt, SigIgn) have an
	// action that is not the default; SIGCHLD's flags (SA_NOCLDSTOP,
	// SA_NOCLDWAIT) matter even with the default one.
	set := status.SigCgt | status.SigIgn | 1<<(unix.SIGCHLD-1)
	for sig := 1; sig <= 64; sig++ {
		if sig == int(unix.SIGKILL) || sig == int(unix.SIGSTOP) || set&(1<<(sig-1)) == 0 {
			continue
		}
		if _, err := main.Syscall(unix.SYS_RT_SIGACTION, uint64(sig), 0, sc.addr, 8); err != nil {
			return nil, err
		}
		b, err := sc.read(0, 32)
		if err != nil {
			return nil, err
		}
		sa := &pb.SigAction{Sig: uint32(sig), Handler: le64(b, 0), Flags: le64(b, 1), Restorer: le64(b, 2), Mask: le64(b, 3)}
		if sa.Handler == 0 && sa.Flags == 0 && sa.Mask == 0 {
			continue // SIG_DFL with nothing else set: the restored default
		}
		core.Sigactions = append(core.Sigactions, sa)
	}
	for which := 0; which < 3; which++ {
		if _, err := main.Syscall(unix.SYS_GETITIMER, uint64(which), sc.addr); err != nil {
			return nil, err
		}
		b, err := sc.read(0, 32)
		if err != nil {
			return nil, err
		}
		it := &pb.Itimer{Which: uint32(which),
			IntervalUs: int64(le64(b, 0))*1e6 + int64(le64(b, 1)),
			ValueUs:    int64(le64(b, 2))*1e6 + int64(le64(b, 3))}
		if it.IntervalUs != 0 || it.ValueUs != 0 {
			core.Itimers = append(core.Itimers, it)
		}
	}
	timers, err := proc.ReadTimers(pid)
	if err != nil {
		return nil, err
	}
	for _, t := range timers {
		if _, err := main.Syscall(unix.SYS_TIMER_GETTIME, uint64(t.ID), sc.addr); err != nil {
			return nil, fmt.Errorf("POSIX timer %d: %w", t.ID, err)
		}
		b, err := sc.read(0, 32)
		if err != nil {
			return nil, err
		}
		pt := &pb.PosixTimer{Id: int32(t.ID), ClockId: int32(t.ClockID), Signo: int32(t.Signo),
			SigevValue: t.SigevValue, NotifyTid: int32(t.NotifyTid),
			IntervalNs: int64(le64(b, 0))*1e9 + int64(le64(b, 1)),
			ValueNs:    int64(le64(b, 2))*1e9 + int64(le64(b, 3))}
		switch t.Notify {
		case "signal":
			pt.Notify = 0 // SIGEV_SIGNAL
		case "none":
			pt.Notify = 1 // SIGEV_NONE
		case "thread":
			pt.Notify = 2 // SIGEV_THREAD
		default:
			return nil, fmt.Errorf("POSIX timer %d: notify %q: %w", t.ID, t.Notify, ErrUnsupported)
		}
		if t.ToThread {
			pt.Notify |= 4 // SIGEV_THREAD_ID: to that thread, not the process
		}
		core.PosixTimers = append(core.PosixTimers, pt)
	}
	if v, err := main.Syscall(unix.SYS_PRCTL, unix.PR_GET_DUMPABLE); err == nil {
		core.Dumpable = int32(v)
	}
	if _, err := main.Syscall(unix.SYS_PRCTL, unix.PR_GET_PDEATHSIG, sc.addr); err == nil {
		b, _ := sc.read(0, 4)
		core.PdeathSignal = int32(binary.LittleEndian.Uint32(b))
	}
	if v, err := main.Syscall(unix.SYS_PRCTL, unix.PR_GET_THP_DISABLE); err == nil {
		core.ThpDisabled = v != 0
	}
	const membarrierGetRegistrations = 512 // since Linux 6.3
	if v, err := main.Syscall(unix.SYS_MEMBARRIER, membarrierGetRegistrations, 0, 0); err == nil {
		core.Membarrier = uint32(v)
	}
	if _, err := main.Syscall(unix.SYS_PRCTL, unix.PR_GET_CHILD_SUBREAPER, sc.addr); err == nil {
		b, _ := sc.read(0, 4)
		core.ChildSubreaper = int32(binary.LittleEndian.Uint32(b))
	}
	brk, err := main.Syscall(unix.SYS_BRK, 0)
	if err != nil {
		return nil, err
	}
	// Per-thread: tid address and sigaltstack.
	d.tidAddr = map[int]uint64{}
	d.altStack = map[int]*pb.SigAltStack{}
	for _, t := range d.threads {
		tk := d.task(t.tid)
		if _, err := tk.Syscall(unix.SYS_PRCTL, unix.PR_GET_TID_ADDRESS, sc.addr); err != nil {
			return nil, err
		}
		b, err := sc.read(0, 8)
		if err != nil {
			return nil, err
		}
		tidAddr := le64(b, 0)
		if _, err := tk.Syscall(unix.SYS_SIGALTSTACK, 0, sc.addr); err != nil {
			return nil, err
		}
		ss, err := sc.read(0, 24)
		if err != nil {
			return nil, err
		}
		d.tidAddr[t.tid] = tidAddr
		d.altStack[t.tid] = &pb.SigAltStack{Sp: le64(ss, 0), Flags: int32(binary.LittleEndian.Uint32(ss[8:])), Size: le64(ss, 2)}
	}

	auxv, err := proc.ReadAuxv(pid)
	if err != nil {
		return nil, err
	}
	mm := &pb.MmCore{
		Pid: int32(pid), StartCode: stat.StartCode, EndCode: stat.EndCode,
		StartData: stat.StartData, EndData: stat.EndData, StartBrk: stat.StartBrk, Brk: brk,
		StartStack: stat.StartStack, ArgStart: stat.ArgStart, ArgEnd: stat.ArgEnd,
		EnvStart: stat.EnvStart, EnvEnd: stat.EnvEnd, Auxv: auxv,
	}
	exe, err := img.files.addPath(pid, "exe", "reg")
	if err != nil {
		return nil, fmt.Errorf("executable: %w", err)
	}
	mm.ExeFileId = exe
	return mm, nil
}

func (d *dumper) collectThread(tid int) (*pb.ThreadCore, error) {
	r := d.saved[tid]
	tc := &pb.ThreadCore{Tid: int32(tid), Sigmask: d.masks[tid], ClearChildTid: d.tidAddr[tid], Sigaltstack: d.altStack[tid]}
	tc.RestartSyscall = restartFixup(&r, false)
	tc.Regs = regsToPB(&r)
	xs, err := ptrace.GetXstate(tid)
	if err != nil {
		return nil, fmt.Errorf("thread %d: %w", tid, err)
	}
	tc.Xstate = xs
	pend, err := ptrace.PeekSiginfo(tid, false)
	if err != nil {
		return nil, fmt.Errorf("thread %d: %w", tid, err)
	}
	for _, si := range pend {
		tc.Pending = append(tc.Pending, siginfo(si))
	}
	if rc, err := ptrace.GetRseqConfig(tid); err == nil && rc.Ptr != 0 {
		tc.Rseq = &pb.Rseq{Ptr: rc.Ptr, Len: rc.Size, Signature: rc.Signature, Flags: rc.Flags}
	}
	head, size, err := ptrace.GetRobustList(tid)
	if err != nil {
		return nil, fmt.Errorf("thread %d: %w", tid, err)
	}
	tc.RobustList, tc.RobustListLen = head, size
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", d.opts.Pid, tid)); err == nil {
		tc.Comm = strings.TrimSuffix(string(b), "\n")
	}
	a, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		return nil, fmt.Errorf("thread %d: sched_getattr: %w", tid, err)
	}
	// A real-time thread keeps a nice value for when it leaves its
	// policy; sched_getattr does not say it, stat does.
	st, err := proc.ReadStat(tid)
	if err != nil {
		return nil, fmt.Errorf("thread %d: %w", tid, err)
	}
	a.Nice = int32(st.Nice)
	if a.Policy != unix.SCHED_NORMAL || a.Flags != 0 || a.Nice != 0 || uclamped(a) {
		tc.Sched = &pb.SchedAttr{Policy: a.Policy, Flags: a.Flags, Nice: a.Nice, Priority: a.Priority,
			Runtime: a.Runtime, Deadline: a.Deadline, Period: a.Period, UtilMin: a.Util_min, UtilMax: a.Util_max}
	}
	return tc, nil
}

// uclamped tells whether a thread's utilization is clamped (a kernel
// without clamps reports 0 and 0; none set is 0 and 1024).
func uclamped(a *unix.SchedAttr) bool {
	return a.Util_max != 0 && (a.Util_min != 0 || a.Util_max != 1024)
}

func siginfo(raw []byte) *pb.SigInfo {
	return &pb.SigInfo{
		Signo: binary.LittleEndian.Uint32(raw[0:]),
		Code:  int32(binary.LittleEndian.Uint32(raw[8:])),
		Raw:   raw,
	}
}

func regsToPB(r *ptrace.Regs) *pb.GpRegs {
	return &pb.GpRegs{
		R15: r.R15, R14: r.R14, R13: r.R13, R12: r.R12, Rbp: r.Rbp, Rbx: r.Rbx,
		R11: r.R11, R10: r.R10, R9: r.R9, R8: r.R8, Rax: r.Rax, Rcx: r.Rcx,
		Rdx: r.Rdx, Rsi: r.Rsi, Rdi: r.Rdi, OrigRax: r.Orig_rax, Rip: r.Rip,
		Cs: r.Cs, Eflags: r.Eflags, Rsp: r.Rsp, Ss: r.Ss, FsBase: r.Fs_base,
		GsBase: r.Gs_base, Ds: r.Ds, Es: r.Es, Fs: r.Fs, Gs: r.Gs,
	}
}

// XstateFeatures returns the XCR0 feature mask and xstate size recorded in
// the software-reserved bytes of an NT_X86_XSTATE buffer
// (struct _fpx_sw_bytes at offset 464 of the FXSAVE area).
func XstateFeatures(xs []byte) (xfeatures uint64, size uint32) {
	if len(xs) < 488 {
		return 0, 0
	}
	return binary.LittleEndian.Uint64(xs[472:]), binary.LittleEndian.Uint32(xs[468:])
}

func (d *dumper) inventory(img *imageSet) (*pb.Inventory, error) {
	var uts unix.Utsname
	unix.Uname(&uts)
	inv := &pb.Inventory{
		FormatMajor:   images.FormatMajor,
		FormatMinor:   images.FormatMinor,
		FerryVersion:  d.opts.Version,
		RootPid:       int32(d.opts.Pid),
		KernelRelease: unix.ByteSliceToString(uts.Release[:]),
		CreatedUnixNs: time.Now().UnixNano(),
		PageSize:      uint64(os.Getpagesize()),
	}
	keep := d.opts.PreDump || d.opts.TrackMem && (d.opts.LeaveRunning || d.opts.LeaveStopped)
	for _, p := range d.t.procs {
		if p.parent != nil && p.dirty != nil {
			inv.ParentDir = p.parent.dir
		}
		t := p.tracker
		if t == nil || t.parked <= 0 || !keep {
			continue
		}
		if p == d {
			inv.TrackerFd, inv.TrackerIno = int32(t.parked), t.parkedIno
		} else {
			inv.Trackers = append(inv.Trackers, &pb.TrackerRef{Pid: int32(p.opts.Pid), Fd: int32(t.parked), Ino: t.parkedIno})
		}
	}
	inv.PreDump = d.opts.PreDump
	if img.core != nil && len(img.core.Threads) > 0 {
		xf, _ := XstateFeatures(img.core.Threads[0].Xstate)
		inv.Xfeatures = xf
		inv.XstateSize = uint32(len(img.core.Threads[0].Xstate))
	}
	for _, v := range d.vmas {
		switch v.Name {
		case "[vvar]", "[vvar_vclock]", "[vdso]":
			inv.VdsoLayout = append(inv.VdsoLayout, &pb.SpecialVma{Name: v.Name, Size: v.Size()})
		}
		if v.Name == "[vdso]" {
			buf := make([]byte, v.Size())
			if err := compel.ReadMem(d.opts.Pid, []compel.Segment{{Addr: v.Start, Local: buf}}); err != nil {
				return nil, err
			}
			h := sha256.Sum256(buf)
			inv.VdsoSha256 = h[:]
		}
	}
	return inv, nil
}

// write writes the process's own image files: core, mm, fdinfo, pagemap.
func (d *dumper) write(img *imageSet) error {
	dir := d.opts.ImagesDir
	pid := int(img.core.Pid) // as the tree sees it (translatePids)
	if err := images.WriteAll(dir, images.CoreName(pid), images.KindCore, img.core); err != nil {
		return err
	}
	if err := images.WriteAll(dir, images.MmName(pid), images.KindMm, img.mm); err != nil {
		return err
	}
	if err := images.WriteAll(dir, images.FdinfoName(pid), images.KindFdinfo, img.fds); err != nil {
		return err
	}
	return d.writePagemap(img)
}

// writePagemap writes pagemap-PID.img, locally and, with a page server,
// there too.
func (d *dumper) writePagemap(img *imageSet) error {
	img.pagemap = withParentRuns(img.pagemap, img.gaps, img.parentPages, d.stats)
	img.gaps = nil
	name := fmt.Sprintf("pagemap-%d.img", img.mm.Pid) // as the tree sees it
	w, err := images.Create(d.opts.ImagesDir, name, images.KindPagemap)
	if err != nil {
		return err
	}
	if err := d.writePagemapTo(w, img); err != nil {
		return err
	}
	if d.opts.PageSink == nil {
		return nil
	}
	wc, err := d.opts.PageSink.Create(name)
	if err != nil {
		return fmt.Errorf("page server: %w", err)
	}
	rw, err := images.NewWriter(wc, images.KindPagemap)
	if err != nil {
		return err
	}
	return d.writePagemapTo(rw, img)
}

func (d *dumper) writePagemapTo(pw *images.Writer, img *imageSet) error {
	head := &pb.PagemapHead{PagesId: uint32(d.opts.Pid), Unlisted: img.unlisted}
	if d.opts.Compress && d.opts.PageSink == nil {
		head.Compression = images.Zstd
	}
	return images.WritePagemap(pw, head, img.pagemap)
}

// collectSeccomp records the seccomp mode of thread tid in tc and its
// filters, each program once in core.
func collectSeccomp(core *pb.TaskCore, tc *pb.ThreadCore, tid int) error {
	st, err := proc.ReadStatus(tid)
	if err != nil {
		return err
	}
	tc.SeccompMode = int32(st.Seccomp)
	switch st.Seccomp {
	case 0, 1:
		return nil
	case 2:
	default:
		return fmt.Errorf("seccomp mode %d: %w", st.Seccomp, ErrUnsupported)
	}
	filters, err := ptrace.SeccompFilters(tid)
	if err != nil {
		return fmt.Errorf("seccomp filters: %w", err)
	}
	for _, f := range filters {
		if notifies(f.Prog) {
			// Its listener (a descriptor somewhere, often outside the
			// tree) is not restored with it.
			return fmt.Errorf("a seccomp filter that hands system calls to a listener (SECCOMP_RET_USER_NOTIF): %w", ErrUnsupported)
		}
		i := slices.IndexFunc(core.SeccompFilters, func(g *pb.SeccompFilter) bool {
			return g.Flags == f.Flags && bytes.Equal(g.Prog, f.Prog)
		})
		if i < 0 {
			i = len(core.SeccompFilters)
			core.SeccompFilters = append(core.SeccompFilters, &pb.SeccompFilter{Prog: f.Prog, Flags: f.Flags})
		}
		tc.SeccompChain = append(tc.SeccompChain, uint32(i))
	}
	return nil
}

// notifies tells whether a seccomp program can return
// SECCOMP_RET_USER_NOTIF: a BPF_RET with that constant, or one returning
// the accumulator (which it might hold).
func notifies(prog []byte) bool {
	const (
		bpfRet       = 0x06
		bpfClassMask = 0x07
		bpfRvalMask  = 0x18
		bpfK         = 0x00
		retUserNotif = 0x7fc00000
		actionMask   = 0xffff0000
	)
	for i := 0; i+8 <= len(prog); i += 8 {
		code := binary.LittleEndian.Uint16(prog[i:])
		k := binary.LittleEndian.Uint32(prog[i+4:])
		if code&bpfClassMask != bpfRet {
			continue
		}
		if code&bpfRvalMask != bpfK || k&actionMask == retUserNotif {
			return true
		}
	}
	return false
}

package restorecore

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// sigaltstack flags (include/uapi/linux/signal.h).
const (
	ssOnStack = 1
	ssDisable = 2
)

func readMem(pid int, addr uint64, buf []byte) error {
	return compel.ReadMem(pid, []compel.Segment{{Addr: addr, Local: buf}})
}

func (b *builder) restoreThreads() error {
	core := b.p.core
	for _, tc := range core.Threads[1:] {
		tid, err := remoteClone(b.main, b.scratch(), threadFlags, 0, int(tc.Tid))
		if err != nil {
			return fmt.Errorf("thread %d: %w", tc.Tid, err)
		}
		regs, err := ptrace.GetRegs(tid)
		if err != nil {
			return err
		}
		b.threads = append(b.threads, &compel.Task{Tid: tid, Regs: regs, Gadget: b.tramp, Int3: true, Stack: b.main.Stack})
	}
	for i, tc := range core.Threads {
		if err := b.threadState(b.threads[i], tc); err != nil {
			return fmt.Errorf("thread %d: %w", tc.Tid, err)
		}
		// The filters of its own, after the shared ones.
		if err := b.installSeccomp(b.threads[i], tc.SeccompChain[len(b.sharedSeccomp):]); err != nil {
			return fmt.Errorf("thread %d: %w", tc.Tid, err)
		}
		if tc.SeccompMode == 1 {
			if _, err := b.threads[i].Syscall(unix.SYS_PRCTL, unix.PR_SET_SECCOMP, 1); err != nil {
				return fmt.Errorf("thread %d: strict seccomp: %w", tc.Tid, err)
			}
		}
		if err := b.setSched(b.threads[i], tc.Sched); err != nil {
			return fmt.Errorf("thread %d: %w", tc.Tid, err)
		}
	}
	return nil
}

// setSched gives thread t its scheduling policy and parameters: set by
// ferry, which may (a real-time policy, a negative nice, whatever the
// process's credentials or user namespace would allow it by then); for a
// caller that is not root, by the thread itself, with the caller's
// rights.
func (b *builder) setSched(t *compel.Task, s *pb.SchedAttr) error {
	if s == nil {
		return nil
	}
	a := unix.SchedAttr{Policy: s.Policy, Flags: s.Flags, Nice: s.Nice, Priority: s.Priority,
		Runtime: s.Runtime, Deadline: s.Deadline, Period: s.Period, Util_min: s.UtilMin, Util_max: s.UtilMax}
	if s.UtilMax != 0 && (s.UtilMin != 0 || s.UtilMax != 1024) {
		a.Flags |= schedFlagUtilClamp
	}
	// A real-time or deadline policy leaves the nice value as it finds it
	// (the thread has it again when it leaves the policy): set first.
	niceFirst := a.Nice != 0 && a.Policy != unix.SCHED_NORMAL && a.Policy != unix.SCHED_BATCH && a.Policy != unix.SCHED_IDLE
	var err error
	if b.r.opts.Caller == nil {
		if niceFirst {
			err = unix.Setpriority(unix.PRIO_PROCESS, t.Tid, int(a.Nice))
		}
		if err == nil {
			err = unix.SchedSetAttr(t.Tid, &a, 0)
		}
	} else {
		if niceFirst {
			if _, err := t.Syscall(unix.SYS_SETPRIORITY, unix.PRIO_PROCESS, 0, uint64(int64(a.Nice))); err != nil {
				return fmt.Errorf("nice %d: %w", a.Nice, err)
			}
		}
		buf := make([]byte, unix.SizeofSchedAttr)
		le := binary.LittleEndian
		le.PutUint32(buf[0:], unix.SizeofSchedAttr)
		le.PutUint32(buf[4:], a.Policy)
		le.PutUint64(buf[8:], a.Flags)
		le.PutUint32(buf[16:], uint32(a.Nice))
		le.PutUint32(buf[20:], a.Priority)
		le.PutUint64(buf[24:], a.Runtime)
		le.PutUint64(buf[32:], a.Deadline)
		le.PutUint64(buf[40:], a.Period)
		le.PutUint32(buf[48:], a.Util_min)
		le.PutUint32(buf[52:], a.Util_max)
		var addr uint64
		if addr, err = b.put(0, buf); err == nil {
			_, err = t.Syscall(unix.SYS_SCHED_SETATTR, 0, addr, 0)
		}
	}
	if err != nil {
		return fmt.Errorf("scheduling policy %d, nice %d, priority %d: %w", s.Policy, s.Nice, s.Priority, err)
	}
	return nil
}

// schedFlagUtilClamp is SCHED_FLAG_UTIL_CLAMP_MIN | SCHED_FLAG_UTIL_CLAMP_MAX.
const schedFlagUtilClamp = 0x20 | 0x40

// restoreSeccomp installs in the main thread, before the others are made,
// the seccomp filters that begin every thread's chain: made after, the
// threads inherit them, and share them as they did (seccomp's TSYNC
// needs that). The rest of each chain, and strict mode, come once the
// threads are there (restoreThreads).
func (b *builder) restoreSeccomp() error {
	threads := b.p.core.Threads
	used := false
	for _, tc := range threads {
		used = used || tc.SeccompMode != 0
	}
	if !used {
		return nil
	}
	if !ptrace.SeccompSuspended(b.r.seed.Process.Pid) {
		return fmt.Errorf("the process uses seccomp and ferry cannot suspend its filters while it restores it (PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN, and ferry under no filter of its own)")
	}
	// A process without CAP_SYS_ADMIN installs filters only with
	// no_new_privs set, as the dumped one had it (restoreCreds sets it
	// again, it is set once and for all).
	if c := b.p.core.Creds; c != nil && c.NoNewPrivs {
		if _, err := b.sys(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	shared := threads[0].SeccompChain
	for _, tc := range threads[1:] {
		n := 0
		for n < len(shared) && n < len(tc.SeccompChain) && shared[n] == tc.SeccompChain[n] {
			n++
		}
		shared = shared[:n]
	}
	b.sharedSeccomp = shared
	return b.installSeccomp(b.main, shared)
}

// installSeccomp installs the filters of chain (indexes into the
// process's filters, oldest first) in thread t.
func (b *builder) installSeccomp(t *compel.Task, chain []uint32) error {
	filters := b.p.core.SeccompFilters
	for _, i := range chain {
		f := filters[i] // in range: validate
		prog, err := b.put(64, f.Prog)
		if err != nil {
			return err
		}
		fprog := make([]byte, 16) // struct sock_fprog: u16 len, then the pointer
		binary.LittleEndian.PutUint16(fprog, uint16(len(f.Prog)/8))
		binary.LittleEndian.PutUint64(fprog[8:], prog)
		a, err := b.put(0, fprog)
		if err != nil {
			return err
		}
		if _, err := t.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, f.Flags, a); err != nil {
			return fmt.Errorf("seccomp filter %d (%d instructions): %w", i, len(f.Prog)/8, err)
		}
	}
	return nil
}

// threadState restores what belongs to one thread, by remote syscalls in
// that thread.
func (b *builder) threadState(t *compel.Task, tc *pb.ThreadCore) error {
	if _, err := t.Syscall(unix.SYS_SET_TID_ADDRESS, tc.ClearChildTid); err != nil {
		return err
	}
	if tc.RobustList != 0 {
		if _, err := t.Syscall(unix.SYS_SET_ROBUST_LIST, tc.RobustList, tc.RobustListLen); err != nil {
			return err
		}
	}
	if rs := tc.Rseq; rs != nil && rs.Ptr != 0 {
		if _, err := t.Syscall(unix.SYS_RSEQ, rs.Ptr, uint64(rs.Len), 0, uint64(rs.Signature)); err != nil {
			return fmt.Errorf("rseq at %#x: %w", rs.Ptr, err)
		}
	}
	if ss := tc.Sigaltstack; ss != nil && ss.Flags&ssDisable == 0 {
		buf := make([]byte, 24)
		binary.LittleEndian.PutUint64(buf[0:], ss.Sp)
		binary.LittleEndian.PutUint32(buf[8:], uint32(ss.Flags)&^ssOnStack)
		binary.LittleEndian.PutUint64(buf[16:], ss.Size)
		a, err := b.put(256*uint64(len(b.threads)%64), buf)
		if err != nil {
			return err
		}
		if _, err := t.Syscall(unix.SYS_SIGALTSTACK, a, 0); err != nil {
			return fmt.Errorf("sigaltstack %#x+%d: %w", ss.Sp, ss.Size, err)
		}
	}
	if tc.Comm != "" {
		a, err := b.putString(0, tc.Comm)
		if err != nil {
			return err
		}
		if _, err := t.Syscall(unix.SYS_PRCTL, unix.PR_SET_NAME, a); err != nil {
			return err
		}
	}
	return nil
}

// restorePending queues the dumped pending signals again, with their
// siginfo, while every signal is still blocked.
func (b *builder) restorePending() error {
	pid := uint64(b.p.pstree.Pid) // as the process sees itself
	for i, tc := range b.p.core.Threads {
		for _, si := range tc.Pending {
			a, err := b.put(0, si.Raw)
			if err != nil {
				return err
			}
			// The thread queues it to itself: only then may the siginfo
			// say it came from tgkill (SI_TKILL), as the Go runtime's
			// preemption signals do, or from the kernel.
			if _, err := b.threads[i].Syscall(unix.SYS_RT_TGSIGQUEUEINFO, pid, uint64(tc.Tid), uint64(si.Signo), a); err != nil {
				return fmt.Errorf("queue signal %d to %d: %w", si.Signo, tc.Tid, err)
			}
		}
	}
	for _, si := range b.p.core.SharedPending {
		a, err := b.put(0, si.Raw)
		if err != nil {
			return err
		}
		if _, err := b.sys(unix.SYS_RT_SIGQUEUEINFO, pid, uint64(si.Signo), a); err != nil {
			return fmt.Errorf("queue signal %d: %w", si.Signo, err)
		}
	}
	return nil
}

// restoreCreds sets each thread's credentials (they are per thread in the
// kernel). It runs last: dropping root would forbid the steps before it.
// In a user namespace of the tree's own the IDs are the namespace's
// (inUserNs); the groups too for a tree born in it, else they were set
// before the process entered it (enterUserNs).
func (b *builder) restoreCreds() error {
	c := b.p.core.Creds
	if c == nil {
		return nil
	}
	ids := [8]uint32{c.Uid, c.Euid, c.Suid, c.Fsuid, c.Gid, c.Egid, c.Sgid, c.Fsgid}
	set := [2]bool{true, true} // the uids, the gids
	un := b.r.is.inv.UserNs
	if un != nil {
		var err error
		if ids, set, err = inUserNs(un, c); err != nil {
			return err
		}
	} else if ids == [8]uint32{} {
		set = [2]bool{} // root: as ferry made it
	}
	last, err := capLastCap()
	if err != nil {
		return err
	}
	// A caller's processes have its groups already (checkCaller).
	groups, setGroups := c.Groups, un == nil && (len(c.Groups) > 0 || set[0]) && b.r.opts.Caller == nil
	if un != nil && b.r.holder != nil && !un.SetgroupsDenied {
		// Born in the user namespace: its numbers (where setgroups is
		// denied, the groups are the ones the namespace was made with).
		if groups, err = groupsInUserNs(un, c.Groups); err != nil {
			return err
		}
		setGroups = true
	}
	for _, t := range b.threads {
		if setGroups {
			if err := b.setGroups(t, groups); err != nil {
				return err
			}
		}
		// The bounding set while the thread may still change it.
		for cp := 0; cp <= last; cp++ {
			if c.CapBnd&(1<<cp) == 0 {
				if _, err := t.Syscall(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, uint64(cp)); err != nil {
					return fmt.Errorf("drop capability %d from the bounding set: %w", cp, err)
				}
			}
		}
		if _, err := t.Syscall(unix.SYS_PRCTL, unix.PR_SET_KEEPCAPS, 1); err != nil {
			return err
		}
		if set[1] {
			if _, err := t.Syscall(unix.SYS_SETRESGID, uint64(ids[4]), uint64(ids[5]), uint64(ids[6])); err != nil {
				return fmt.Errorf("setresgid %v: %w", ids[4:7], err)
			}
			t.Syscall(unix.SYS_SETFSGID, uint64(ids[7]))
		}
		if set[0] {
			if _, err := t.Syscall(unix.SYS_SETRESUID, uint64(ids[0]), uint64(ids[1]), uint64(ids[2])); err != nil {
				return fmt.Errorf("setresuid %v: %w", ids[0:3], err)
			}
			t.Syscall(unix.SYS_SETFSUID, uint64(ids[3]))
		}
		a, err := b.put(0, capData(c.CapEff, c.CapPrm, c.CapInh))
		if err != nil {
			return err
		}
		if _, err := t.Syscall(unix.SYS_CAPSET, a, a+8); err != nil {
			return fmt.Errorf("capset: %w", err)
		}
		for cp := 0; cp <= last; cp++ {
			if c.CapAmb&(1<<cp) != 0 {
				if _, err := t.Syscall(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uint64(cp)); err != nil {
					return fmt.Errorf("raise ambient capability %d: %w", cp, err)
				}
			}
		}
		t.Syscall(unix.SYS_PRCTL, unix.PR_SET_KEEPCAPS, 0)
	}
	if c.NoNewPrivs {
		for _, t := range b.threads {
			t.Syscall(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
		}
	}
	return nil
}

// capData is capset(2)'s arguments, version 3: the header {version, pid
// 0}, then two data {effective, permitted, inheritable} (low words, high
// words); the data start 8 bytes in.
func capData(eff, prm, inh uint64) []byte {
	buf := make([]byte, 8+24)
	le := binary.LittleEndian
	le.PutUint32(buf[0:], unix.LINUX_CAPABILITY_VERSION_3)
	for i, v := range []uint64{eff, prm, inh} {
		le.PutUint32(buf[8+4*i:], uint32(v))
		le.PutUint32(buf[20+4*i:], uint32(v>>32))
	}
	return buf
}

// setGroups sets t's supplementary groups.
func (b *builder) setGroups(t *compel.Task, groups []uint32) error {
	buf := make([]byte, 4*len(groups)+4)
	for i, g := range groups {
		binary.LittleEndian.PutUint32(buf[4*i:], g)
	}
	a, err := b.put(0, buf)
	if err != nil {
		return err
	}
	if _, err := t.Syscall(unix.SYS_SETGROUPS, uint64(len(groups)), a); err != nil {
		return fmt.Errorf("setgroups %v: %w", groups, err)
	}
	return nil
}

// capLastCap is the highest capability this kernel knows.
func capLastCap() (int, error) {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// stopSignal is the signal that stops the process at the end of its
// restore: the one that had stopped it, if that signal still stops it
// (no handler), else SIGSTOP.
func (b *builder) stopSignal() unix.Signal {
	sig := unix.Signal(b.p.core.StopSignal)
	if b.r.opts.LeaveStopped || sig == 0 {
		return unix.SIGSTOP
	}
	for _, sa := range b.p.core.Sigactions {
		if unix.Signal(sa.Sig) == sig && sa.Handler != 0 {
			return unix.SIGSTOP
		}
	}
	return sig
}

func pbToRegs(g *pb.GpRegs) ptrace.Regs {
	return ptrace.Regs{
		R15: g.R15, R14: g.R14, R13: g.R13, R12: g.R12, Rbp: g.Rbp, Rbx: g.Rbx,
		R11: g.R11, R10: g.R10, R9: g.R9, R8: g.R8, Rax: g.Rax, Rcx: g.Rcx,
		Rdx: g.Rdx, Rsi: g.Rsi, Rdi: g.Rdi, Orig_rax: g.OrigRax, Rip: g.Rip,
		Cs: g.Cs, Eflags: g.Eflags, Rsp: g.Rsp, Ss: g.Ss, Fs_base: g.FsBase,
		Gs_base: g.GsBase, Ds: g.Ds, Es: g.Es, Fs: g.Fs, Gs: g.Gs,
	}
}

// finish loads the final registers, xstate and signal masks, has the main
// thread unmap the trampoline under PTRACE_SYSCALL (its final registers are
// loaded at the syscall-exit stop), and detaches every thread.
func (b *builder) finish() error {
	core := b.p.core
	if sa := b.trapIgnored; sa != nil {
		t := *b.main
		t.Int3 = false // stopped at the syscall's exit, before the int3
		if err := b.setSigaction(&t, sa); err != nil {
			return fmt.Errorf("SIGTRAP ignored: %w", err)
		}
	}
	for _, t := range b.threads {
		unix.SchedSetaffinity(t.Tid, &b.r.affinity)
	}
	load := func(t *compel.Task, tc *pb.ThreadCore) error {
		regs := pbToRegs(tc.Regs)
		regs.Orig_rax = ^uint64(0)
		if err := ptrace.SetRegs(t.Tid, &regs); err != nil {
			return err
		}
		if err := ptrace.SetXstate(t.Tid, tc.Xstate); err != nil {
			return err
		}
		return ptrace.SetSigmask(t.Tid, tc.Sigmask)
	}
	for i, t := range b.threads[1:] {
		if err := load(t, core.Threads[i+1]); err != nil {
			return fmt.Errorf("thread %d: %w", t.Tid, err)
		}
	}
	// Main thread: munmap(trampoline) and stop at its exit.
	r := b.main.Regs
	r.Rip = b.tramp
	r.Rax = unix.SYS_MUNMAP
	r.Orig_rax = ^uint64(0)
	r.Rdi, r.Rsi = b.tramp, trampSize
	if err := ptrace.SetRegs(b.pid, &r); err != nil {
		return err
	}
	for stops := 0; stops < 2; {
		if err := ptrace.Syscall(b.pid, 0); err != nil {
			return err
		}
		st, err := ptrace.Wait(b.pid)
		if err != nil {
			return err
		}
		if st.Exited() {
			return fmt.Errorf("main thread: %v", st)
		}
		if st.SyscallStop() {
			stops++
		}
	}
	if out, err := ptrace.GetRegs(b.pid); err != nil {
		return err
	} else if out.Rax != 0 {
		return fmt.Errorf("unmap trampoline: %w", unix.Errno(-int64(out.Rax)))
	}
	if err := load(b.main, core.Threads[0]); err != nil {
		return fmt.Errorf("thread %d: %w", b.pid, err)
	}
	if b.r.opts.LeaveStopped || core.State == "stopped" {
		unix.Kill(b.pid, b.stopSignal())
	}
	for _, t := range b.threads {
		if err := ptrace.Detach(t.Tid, 0); err != nil {
			return fmt.Errorf("detach %d: %w", t.Tid, err)
		}
	}
	if b.r.opts.LeaveStopped || core.State == "stopped" {
		// Return only once it is stopped, not while SIGSTOP is pending.
		proc.WaitState(b.pid, "Tt", 2*time.Second)
	}
	return nil
}

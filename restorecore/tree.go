package restorecore

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
	"github.com/ferrycr/ferry/internal/treeplan"
)

// createTree makes every process of the images, each a copy of the seed
// with its PID, following the tree plan (internal/treeplan): the root
// cloned from the seed, every other process from its parent or a
// sibling, sessions and groups as the plan orders, helpers for dead
// session and group leaders made and reaped; then the zombies die. It
// returns the live processes' main threads.
func (r *restorer) createTree(seed *compel.Task) (map[int32]*compel.Task, error) {
	procs := make([]treeplan.Proc, len(r.is.procs))
	for i, p := range r.is.procs {
		pt := p.pstree
		procs[i] = treeplan.Proc{Pid: pt.Pid, Ppid: pt.Ppid, Pgid: pt.Pgid, Sid: pt.Sid, ExitSignal: p.core.ExitSignal,
			FilesWith: p.core.FilesSharedWith, FsWith: p.core.FsSharedWith, Subreaper: p.core.ChildSubreaper != 0,
			Init: i == 0 && r.is.inv.PidNs}
	}
	// local holds the PIDs of helpers with any PID, as their parents see
	// them (to reap them).
	local := map[int32]int{}
	plan, err := treeplan.Make(procs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", images.PstreeName, err)
	}
	tasks := map[int32]*compel.Task{}
	for _, s := range plan.Steps {
		switch s.Op {
		case treeplan.Clone:
			from, flags, elsewhere := seed, s.Flags, false
			if s.From != 0 {
				from = tasks[s.From]
			} else {
				// The seed's children enter the PID namespace it joined.
				elsewhere = r.is.joinsPidNs
				if r.holder != nil {
					// Born in its user namespace (makeUserNs).
					from, elsewhere = r.holder, r.nsMade&unix.CLONE_NEWPID != 0
				}
				// The root: in new namespaces where the tree had its own.
				if r.is.inv.PidNs {
					flags |= unix.CLONE_NEWPID // its init
				}
				if r.is.inv.UtsNs != nil {
					flags |= unix.CLONE_NEWUTS
				}
				if r.is.inv.NetNs != nil {
					flags |= unix.CLONE_NEWNET
				}
				if r.is.inv.IpcNs {
					flags |= unix.CLONE_NEWIPC
				}
				if r.is.inv.MntNs != nil {
					flags |= unix.CLONE_NEWNS
				}
				if r.is.inv.CgroupNs {
					flags |= unix.CLONE_NEWCGROUP
				}
				// Those made in the tree's user namespace the seed has
				// joined (makeUserNs).
				flags &^= r.nsMade
			}
			want := int(s.Pid)
			if want < 0 {
				want = 0 // a helper with any PID
			}
			pid, lpid, err := remoteCloneInto(from, stackScratch(from), flags, uint64(s.ExitSignal), want, elsewhere || flags&unix.CLONE_NEWPID != 0)
			if err != nil {
				what := "process"
				if s.Helper {
					what = "helper"
				}
				return nil, fmt.Errorf("create %s %d: %w", what, s.Pid, err)
			}
			r.created = append(r.created, pid)
			local[s.Pid] = lpid
			regs, err := ptrace.GetRegs(pid)
			if err != nil {
				return nil, err
			}
			tasks[s.Pid] = &compel.Task{Tid: pid, Regs: regs, Gadget: seedGadget, Int3: true}
			if u := r.is.inv.UtsNs; s.From == 0 && u != nil {
				if err := setUts(tasks[s.Pid], u); err != nil {
					return nil, fmt.Errorf("process %d: UTS namespace: %w", s.Pid, err)
				}
			}
		case treeplan.Setsid:
			if _, err := tasks[s.Pid].Syscall(unix.SYS_SETSID); err != nil {
				return nil, fmt.Errorf("process %d: setsid: %w", s.Pid, err)
			}
		case treeplan.Setpgid:
			if _, err := tasks[s.Pid].Syscall(unix.SYS_SETPGID, 0, uint64(s.Pgid)); err != nil {
				return nil, fmt.Errorf("process %d: join group %d: %w", s.Pid, s.Pgid, err)
			}
		case treeplan.Subreaper:
			if _, err := tasks[s.Pid].Syscall(unix.SYS_PRCTL, unix.PR_SET_CHILD_SUBREAPER, 1); err != nil {
				return nil, fmt.Errorf("process %d: subreaper: %w", s.Pid, err)
			}
		case treeplan.Exit:
			hp := tasks[s.Pid].Tid
			if err := die(tasks[s.Pid], int32(local[s.Pid]), 0); err != nil {
				return nil, fmt.Errorf("helper %d: %w", s.Pid, err)
			}
			delete(tasks, s.Pid)
			if err := reap(tasks[s.From], int32(local[s.Pid]), unix.Signal(s.ExitSignal)); err != nil {
				return nil, fmt.Errorf("process %d: reap helper %d: %w", s.From, s.Pid, err)
			}
			// Reaped: its PID is no longer this restore's to kill.
			r.created = slices.DeleteFunc(r.created, func(pid int) bool { return pid == hp })
		}
	}
	for _, p := range r.is.procs {
		if !p.zombie {
			continue
		}
		pt := p.pstree
		if err := die(tasks[pt.Pid], pt.Pid, p.core.ExitCode); err != nil {
			return nil, fmt.Errorf("zombie %d: %w", pt.Pid, err)
		}
		delete(tasks, pt.Pid)
		// Its parent was told (SIGCHLD, blocked): that signal was not
		// pending at the dump unless the images say so (restorePending).
		if err := flushSignal(tasks[pt.Ppid], unix.SIGCHLD); err != nil {
			return nil, fmt.Errorf("process %d: %w", pt.Ppid, err)
		}
	}
	return tasks, nil
}

// setUts names t's (new) UTS namespace.
func setUts(t *compel.Task, u *pb.UtsNs) error {
	addr := stackScratch(t)
	for _, n := range []struct {
		nr   uintptr
		name string
	}{{unix.SYS_SETHOSTNAME, u.Hostname}, {unix.SYS_SETDOMAINNAME, u.Domainname}} {
		if n.name != "" {
			if err := compel.WriteMem(t.Tid, []compel.Segment{{Addr: addr, Local: []byte(n.name)}}); err != nil {
				return err
			}
		}
		if _, err := t.Syscall(n.nr, addr, uint64(len(n.name))); err != nil {
			return fmt.Errorf("name %q: %w", n.name, err)
		}
	}
	return nil
}

// reap waits in parent for its dead child pid, and takes the signal the
// death sent out of parent's pending signals.
func reap(parent *compel.Task, pid int32, sig unix.Signal) error {
	if _, err := parent.Syscall(unix.SYS_WAIT4, uint64(pid), 0, unix.WALL, 0); err != nil {
		return err
	}
	if sig == 0 {
		return nil
	}
	return flushSignal(parent, sig)
}

// stackScratch is scratch memory below the stack pointer of a copy of
// the seed.
func stackScratch(t *compel.Task) uint64 { return (t.Regs.Rsp - 4096) &^ 15 }

// die ends t, which is pid in its PID namespace, with the wait status
// status: exit_group for an exit, the signal itself (no core file) for a
// death by signal.
func die(t *compel.Task, pid, status int32) error {
	sig := status & 0x7f
	r := t.Regs
	r.Rip = t.Gadget
	r.Orig_rax = ^uint64(0)
	if sig == 0 {
		r.Rax, r.Rdi = unix.SYS_EXIT_GROUP, uint64(status>>8&0xff)
	} else {
		// No core file; the signal unblocked and at its default action
		// (a copy of the seed has every signal blocked).
		lim := make([]byte, 16)
		addr := stackScratch(t)
		if err := compel.WriteMem(t.Tid, []compel.Segment{{Addr: addr, Local: lim}}); err != nil {
			return err
		}
		if _, err := t.Syscall(unix.SYS_PRLIMIT64, 0, unix.RLIMIT_CORE, addr, 0); err != nil {
			return err
		}
		if err := ptrace.SetSigmask(t.Tid, 0); err != nil {
			return err
		}
		r.Rax, r.Rdi, r.Rsi = unix.SYS_KILL, uint64(pid), uint64(sig)
	}
	if err := ptrace.SetRegs(t.Tid, &r); err != nil {
		return err
	}
	if err := ptrace.Cont(t.Tid, 0); err != nil {
		return err
	}
	for {
		st, err := ptrace.Wait(t.Tid)
		if err != nil {
			return err
		}
		if st.Exited() {
			return nil
		}
		// The signal's delivery stop: deliver it. Anything else (the
		// int3 after a kill that did not kill): go on.
		next := 0
		if st.Event() == 0 && st.Sig() == int(sig) {
			next = int(sig)
		}
		if err := ptrace.Cont(t.Tid, next); err != nil {
			return err
		}
	}
}

// flushSignal takes sig out of t's pending signals (it is blocked there).
func flushSignal(t *compel.Task, sig unix.Signal) error {
	addr := stackScratch(t)
	buf := make([]byte, 24) // sigset, then a zero timespec
	binary.LittleEndian.PutUint64(buf, 1<<(uint(sig)-1))
	if err := compel.WriteMem(t.Tid, []compel.Segment{{Addr: addr, Local: buf}}); err != nil {
		return err
	}
	for {
		if _, err := t.Syscall(unix.SYS_RT_SIGTIMEDWAIT, addr, 0, addr+8, 8); err != nil {
			return nil // EAGAIN: none left
		}
	}
}

// Sharing between processes. An open file description that several
// processes hold is made in the first and held by ferry until the others
// take it (pidfd_getfd); so are pipes whose ends are in several processes
// and shared anonymous memory.

// planSharing counts which file ids and pipes more than one process uses.
func (r *restorer) planSharing() {
	r.held = map[uint32]int{}
	r.heldPipes = map[uint64][2]int{}
	r.heldShmem = map[uint64]int{}
	users := map[uint32]int{}
	pipeUsers := map[uint64]map[int32]bool{}
	for _, p := range r.is.procs {
		if p.zombie {
			continue
		}
		seen := map[uint32]bool{}
		for _, e := range p.fds.Fds {
			if !seen[e.FileId] {
				seen[e.FileId] = true
				users[e.FileId]++
			}
			if f := r.is.files[e.FileId]; f != nil && f.Type == "pipe" {
				if pipeUsers[f.Ino] == nil {
					pipeUsers[f.Ino] = map[int32]bool{}
				}
				pipeUsers[f.Ino][p.pstree.Pid] = true
			}
		}
	}
	r.multi = map[uint32]bool{}
	for id, n := range users {
		if n > 1 {
			r.multi[id] = true
		}
	}
	// Shared anonymous memory that several VMAs map: the size the object
	// needs to cover them all.
	r.shmemSize = map[uint64]uint64{}
	vmas := map[uint64]int{}
	for _, p := range r.is.procs {
		if p.zombie {
			continue
		}
		for _, v := range p.mm.Vmas {
			if v.Kind == "shared-anon" && v.ShmemIno != 0 && !v.Sysv {
				vmas[v.ShmemIno]++
				r.shmemSize[v.ShmemIno] = max(r.shmemSize[v.ShmemIno], v.Pgoff+v.End-v.Start)
			}
		}
	}
	for ino, n := range vmas {
		if n < 2 {
			delete(r.shmemSize, ino)
		}
	}
	r.multiPipes = map[uint64]bool{}
	for ino, ps := range pipeUsers {
		if len(ps) > 1 {
			r.multiPipes[ino] = true
		}
	}
	// A unix socket whose peer is in another process: the pair is made
	// in the first and the peer's end held for the other.
	for _, f := range r.is.files {
		if f.Unix != nil && f.Unix.PeerIno != 0 {
			if o := r.unixByIno(f.Unix.PeerIno); o != nil && users[o.Id] > 0 {
				r.multi[o.Id] = true
			}
		}
	}
}

// dropHeld closes what ferry held for sharing.
func (r *restorer) dropHeld() {
	for _, fd := range r.held {
		unix.Close(fd)
	}
	for _, ends := range r.heldPipes {
		unix.Close(ends[0])
		unix.Close(ends[1])
	}
	for _, fd := range r.heldShmem {
		unix.Close(fd)
	}
}

// take gives the process a copy of ferry's fd h and returns its number
// there (close-on-exec).
func (b *builder) take(h int) (uint64, error) {
	if b.ferryPidfd == 0 && b.r.seedKeepsFerry() {
		// ferry is not in the process's PID namespace: the pidfd the
		// seed was given, where the fd table has it.
		b.ferryPidfd = seedFerryPidfd
		if with := b.p.core.FilesSharedWith; with != 0 {
			fd, ok := b.r.ferryFd[with]
			if !ok {
				return 0, fmt.Errorf("ferry's pidfd in the fd table of %d: not found", with)
			}
			b.ferryPidfd = fd
		}
	}
	if b.ferryPidfd == 0 {
		fd, err := b.sys(unix.SYS_PIDFD_OPEN, uint64(os.Getpid()), 0)
		if err != nil {
			return 0, err
		}
		b.ferryPidfd = fd
	}
	if b.r.channel != nil {
		return b.receive(h)
	}
	return b.sys(unix.SYS_PIDFD_GETFD, b.ferryPidfd, uint64(h), 0)
}

// dropFerryPidfd closes the process's pidfd of ferry; in a new PID
// namespace it stays, for processes sharing the fd table, until
// dropFerryPidfds.
func (b *builder) dropFerryPidfd() {
	if b.ferryPidfd != 0 && !b.r.seedKeepsFerry() {
		b.sys(unix.SYS_CLOSE, b.ferryPidfd)
		b.ferryPidfd = 0
	}
}

// seedFerryPidfd is where the seed, and every process cloned from it,
// has a pidfd of ferry when the tree is in another PID namespace than
// ferry's (ferryHidden: pidfd_open of ferry's PID cannot work from
// inside it).
const seedFerryPidfd = 4

// ferryHidden tells whether the tree's processes are in a PID namespace
// where ferry has no PID: one of the tree's own, or one it joins.
func (r *restorer) ferryHidden() bool { return r.is.inv.PidNs || r.is.joinsPidNs }

// seedKeepsFerry tells whether every fd table of the tree keeps a
// descriptor of ferry's from the seed (seedFerryPidfd): where ferry is
// hidden, or where the processes could not take one themselves (a
// caller's restore: ferryChannel).
func (r *restorer) seedKeepsFerry() bool { return r.ferryHidden() || r.opts.Caller != nil }

// dropFerryPidfds closes, once every process is built, the pidfd of
// ferry that each fd table of a new PID namespace kept (clearFds).
func (r *restorer) dropFerryPidfds(builders []*builder) {
	for _, b := range builders {
		if fd, ok := r.ferryFd[b.p.pstree.Pid]; ok {
			b.sys(unix.SYS_CLOSE, fd)
		}
	}
}

// makeShmem makes, in this process, each shared anonymous memory object
// that several VMAs of the tree map and that no process made yet, and
// hands it to ferry (restoreMemory then maps it by its fd).
func (b *builder) makeShmem() error {
	for _, v := range b.p.mm.Vmas {
		ino := v.ShmemIno
		if v.Kind != "shared-anon" || ino == 0 || b.r.shmemSize[ino] == 0 {
			continue
		}
		if _, ok := b.r.heldShmem[ino]; ok {
			continue
		}
		size := b.r.shmemSize[ino]
		addr, err := b.sys(unix.SYS_MMAP, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS, ^uint64(0), 0)
		if err != nil {
			return fmt.Errorf("shared memory of %d bytes: %w", size, err)
		}
		f, err := os.OpenFile(fmt.Sprintf("/proc/%d/map_files/%x-%x", b.pid, addr, addr+size), os.O_RDWR, 0)
		if _, uerr := b.sys(unix.SYS_MUNMAP, addr, size); err == nil && uerr != nil {
			err = uerr
		}
		if err != nil {
			return fmt.Errorf("shared memory of %d bytes: %w", size, err)
		}
		h, err := unix.Dup(int(f.Fd()))
		f.Close()
		if err != nil {
			return err
		}
		b.r.heldShmem[ino] = h
	}
	return nil
}

// deadProcess returns the PID of a stand-in for the dead process whose
// pidfds had inode ino: a child of ferry that has exited and stays
// unreaped until the restore ends, so that pidfds opened of it now are
// pidfds of a dead process then (and, opened by several processes, of
// the same one).
func (r *restorer) deadProcess(ino uint64) (int, error) {
	if pid, ok := r.dead[ino]; ok {
		return pid, nil
	}
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("stand-in for a dead process: %w", err)
	}
	pid := cmd.Process.Pid
	r.cleanup = append(r.cleanup, func() { cmd.Wait() })
	if !proc.WaitState(pid, "Z", 5*time.Second) {
		return 0, fmt.Errorf("stand-in for a dead process: %d did not exit", pid)
	}
	if r.dead == nil {
		r.dead = map[uint64]int{}
	}
	r.dead[ino] = pid
	return pid, nil
}

// unixByIno returns the unix socket with inode ino in the images, if any
// (indexed on first use).
func (r *restorer) unixByIno(ino uint64) *pb.FileEntry {
	if r.unixSockets == nil {
		r.unixSockets = map[uint64]*pb.FileEntry{}
		for _, f := range r.is.files {
			if f.Unix != nil {
				r.unixSockets[f.Ino] = f
			}
		}
	}
	return r.unixSockets[ino]
}

// ghostByIno returns the deleted file with inode ino in the images, if
// any.
func (r *restorer) ghostByIno(ino uint64) *pb.FileEntry {
	for _, f := range r.is.files {
		if f.Ghost && f.Ino == ino {
			return f
		}
	}
	return nil
}

// ptyMaster returns the master of pty index in the images, if any.
func (r *restorer) ptyMaster(index int32) *pb.FileEntry {
	for _, f := range r.is.files {
		if f.Type == "ptmx" && f.Tty != nil && f.Tty.Index == index {
			return f
		}
	}
	return nil
}

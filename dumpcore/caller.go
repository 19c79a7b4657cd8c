package dumpcore

import (
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/ferrycr/ferry/internal/proc"
)

// checkCaller refuses, for a caller that is not root (Options.Caller),
// a process that is not its own: every thread's real, effective, saved
// and filesystem IDs must be the caller's, and the process dumpable (the
// kernel gives the /proc directory of one that is not, after a set-ID
// program, to root). before tells the check on the root alone, before
// the freeze, from the one on the frozen tree.
func (t *tree) checkCaller(before bool) error {
	c := t.opts.Caller
	if c == nil {
		return nil
	}
	if before {
		if err := t.checkCallerTree(c); err != nil {
			return err
		}
	}
	pids := []int{t.root}
	if !before {
		pids = pids[:0]
		for _, d := range t.procs {
			pids = append(pids, d.opts.Pid)
		}
	}
	for _, pid := range pids {
		var st syscall.Stat_t
		if err := syscall.Stat(proc.Path(pid, ""), &st); err != nil {
			return fmt.Errorf("process %d: %w", pid, ErrNoProcess)
		}
		if st.Uid != c.Uid {
			return fmt.Errorf("process %d is not the caller's (uid %d): its /proc directory belongs to uid %d: %w", pid, c.Uid, st.Uid, ErrPermission)
		}
		// In ferry's namespaces (checked again once frozen: it could
		// have made some of its own meanwhile). The mount and user ones,
		// which matter most (a mount namespace of its own would be read
		// as root), are the same for every thread of a process.
		for _, kind := range nsKinds {
			mine, err := os.Readlink("/proc/self/ns/" + kind)
			if err != nil {
				continue
			}
			if ns, err := proc.Namespace(pid, kind); err != nil || ns != mine {
				return fmt.Errorf("process %d is in a %s namespace of its own (%s), which a caller that is not root may not dump: %w", pid, kind, ns, ErrPermission)
			}
		}
		tids, err := proc.Tids(pid)
		if err != nil {
			return fmt.Errorf("process %d: %w", pid, ErrNoProcess)
		}
		for _, tid := range tids {
			s, err := proc.ReadThreadStatus(pid, tid)
			if err != nil {
				return fmt.Errorf("thread %d: %w (%v)", tid, ErrNoProcess, err)
			}
			for i := range 4 {
				if s.Uid[i] != c.Uid || s.Gid[i] != c.Gid {
					return fmt.Errorf("thread %d of process %d runs as uids %v, gids %v, not as the caller's %d:%d: %w",
						tid, pid, s.Uid, s.Gid, c.Uid, c.Gid, ErrPermission)
				}
			}
			if s.CapPrm != 0 {
				return fmt.Errorf("thread %d of process %d has capabilities (%#x), which the caller may not take: %w", tid, pid, s.CapPrm, ErrPermission)
			}
		}
	}
	return nil
}

// checkCallerTree refuses, for a caller, where Yama restricts ptrace, a
// tree the caller could not trace itself: not its descendant
// (ptrace_scope 1), or any (2 and up).
func (t *tree) checkCallerTree(c *proc.Caller) error {
	b, err := os.ReadFile("/proc/sys/kernel/yama/ptrace_scope")
	if err != nil {
		return nil // no Yama
	}
	switch strings.TrimSpace(string(b)) {
	case "0":
		return nil
	case "1":
		for pid := t.root; pid > 1; {
			st, err := proc.ReadStat(pid)
			if err != nil {
				break
			}
			if pid = st.Ppid; pid == c.Pid {
				return nil
			}
		}
		return fmt.Errorf("process %d is not a descendant of the caller %d, which Yama (ptrace_scope 1) lets it trace only: %w", t.root, c.Pid, ErrPermission)
	}
	return fmt.Errorf("Yama's ptrace_scope forbids the caller to trace: %w", ErrPermission)
}

// checkCallerFiles refuses, for a caller, files whose contents ferry
// reads as root: deleted files (their contents go in the images) and
// FIFOs (their queued data).
func (t *tree) checkCallerFiles() error {
	if t.opts.Caller == nil {
		return nil
	}
	for _, f := range t.files.entries {
		if f.Ghost || f.FifoDeleted || f.DirDeleted || f.SymlinkDeleted || f.Type == "fifo" {
			return fmt.Errorf("%s (%s): a deleted file or a FIFO, whose contents a caller that is not root may not have ferry read: %w", f.Path, f.Type, ErrPermission)
		}
	}
	return nil
}

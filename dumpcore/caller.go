package dumpcore

import (
	"fmt"
	"os"
	"strconv"
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
		tids, err := proc.Tids(pid)
		if err != nil {
			return fmt.Errorf("process %d: %w", pid, ErrNoProcess)
		}
		for _, tid := range tids {
			name := proc.Path(pid, "task/"+strconv.Itoa(tid)+"/status")
			b, err := os.ReadFile(name)
			if err != nil {
				return fmt.Errorf("thread %d: %w", tid, ErrNoProcess)
			}
			s, err := proc.ParseStatus(name, b)
			if err != nil {
				return err
			}
			for i := range 4 {
				if s.Uid[i] != c.Uid || s.Gid[i] != c.Gid {
					return fmt.Errorf("thread %d of process %d runs as uids %v, gids %v, not as the caller's %d:%d: %w",
						tid, pid, s.Uid, s.Gid, c.Uid, c.Gid, ErrPermission)
				}
			}
		}
	}
	return nil
}

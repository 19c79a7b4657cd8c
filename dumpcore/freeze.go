package dumpcore

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// frozenThread is a seized thread in a ptrace stop.
type frozenThread struct {
	tid int
	// groupStopped: the thread was in (or entered) a group stop, by
	// stopSig (SIGSTOP, SIGTSTP, SIGTTIN or SIGTTOU).
	groupStopped bool
	stopSig      int
}

// freeze seizes and stops every thread of pid, repeating until no new
// thread appears. Preconditions: runs on the tracer thread.
func freeze(pid int, deadline time.Time) ([]*frozenThread, error) {
	seized := map[int]*frozenThread{}
	var order []int
	release := func() {
		for _, tid := range order {
			ptrace.Detach(tid, 0)
		}
	}
	for round := 0; ; round++ {
		tids, err := proc.Tids(pid)
		if err != nil {
			release()
			return nil, fmt.Errorf("list threads of %d: %w", pid, ErrNoProcess)
		}
		var fresh []int
		for _, tid := range tids {
			if seized[tid] != nil {
				continue
			}
			if err := ptrace.Seize(tid, ptrace.OptsDump); err != nil {
				if errors.Is(err, unix.ESRCH) {
					continue // exited meanwhile
				}
				release()
				if errors.Is(err, unix.EPERM) {
					return nil, fmt.Errorf("seize %d: %w (already traced, or not permitted)", tid, err)
				}
				return nil, fmt.Errorf("seize %d: %w", tid, err)
			}
			seized[tid] = &frozenThread{tid: tid}
			order = append(order, tid)
			if err := ptrace.Interrupt(tid); err != nil && !errors.Is(err, unix.ESRCH) {
				release()
				return nil, fmt.Errorf("interrupt %d: %w", tid, err)
			}
			fresh = append(fresh, tid)
		}
		if len(fresh) == 0 {
			break
		}
		for _, tid := range fresh {
			gone, err := waitInterrupted(seized[tid], deadline)
			if err != nil {
				release()
				return nil, err
			}
			if gone {
				delete(seized, tid)
				for i, t := range order {
					if t == tid {
						order = append(order[:i], order[i+1:]...)
						break
					}
				}
			}
		}
	}
	if len(order) == 0 {
		return nil, fmt.Errorf("process %d: %w", pid, ErrNoProcess)
	}
	out := make([]*frozenThread, 0, len(order))
	// Main thread first.
	if ft := seized[pid]; ft != nil {
		out = append(out, ft)
	}
	for _, tid := range order {
		if tid != pid {
			out = append(out, seized[tid])
		}
	}
	return out, nil
}

// waitInterrupted waits for the PTRACE_EVENT_STOP that PTRACE_INTERRUPT
// causes, passing on signals that arrive first. gone reports the thread
// exited before stopping.
func waitInterrupted(ft *frozenThread, deadline time.Time) (gone bool, err error) {
	for {
		st, ok, err := ptrace.WaitNohang(ft.tid)
		if err != nil {
			if errors.Is(err, unix.ECHILD) {
				return true, nil
			}
			return false, fmt.Errorf("wait for %d: %w", ft.tid, err)
		}
		if !ok {
			if time.Now().After(deadline) {
				return false, fmt.Errorf("thread %d did not stop: %w", ft.tid, ErrTimeout)
			}
			time.Sleep(50 * time.Microsecond)
			continue
		}
		switch {
		case st.Exited():
			return true, nil
		case st.Event() == ptrace.EventStop:
			switch unix.Signal(st.Sig()) {
			case unix.SIGSTOP, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU:
				ft.groupStopped, ft.stopSig = true, st.Sig()
			}
			return false, nil
		case st.Event() != 0:
			// Another event (exec, exit): let it proceed and keep waiting.
			if err := ptrace.Cont(ft.tid, 0); err != nil {
				return false, err
			}
		default:
			// Signal-delivery stop: the signal was dequeued, so deliver it
			// (it was about to be) and wait for the interrupt stop.
			if err := ptrace.Cont(ft.tid, st.Sig()); err != nil {
				return false, err
			}
		}
	}
}

// freezeCgroup is freeze with the tree's cgroup freezer (--freeze-cgroup):
// frozen, the cgroup's tasks can neither fork nor exit, so the tree is
// walked from the root down once, every thread seized and interrupted;
// then the cgroup thaws, and each thread stops in ptrace as it runs. A
// cgroup that was frozen already (a paused container) is frozen again
// once the dump lets the tree go (t.refreeze, in run).
func (t *tree) freezeCgroup(deadline time.Time) error {
	fz, err := cgroups.OpenFreezer(t.opts.FreezeCgroup)
	if err != nil {
		return fmt.Errorf("--freeze-cgroup: %w", err)
	}
	was, err := fz.Frozen()
	if err != nil {
		return fmt.Errorf("--freeze-cgroup: %w", err)
	}
	if !was {
		if err := fz.Set(true, deadline); err != nil {
			fz.Set(false, time.Now().Add(time.Second))
			return fmt.Errorf("--freeze-cgroup: freeze: %w", err)
		}
	}
	var seized []int
	fail := func(err error) error {
		for _, tid := range seized {
			ptrace.Detach(tid, 0)
		}
		// As it was: a paused container stays paused.
		fz.Set(was, time.Now().Add(time.Second))
		return err
	}
	queue := []int{t.root}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		st, err := proc.ReadStat(pid)
		if err != nil {
			if pid == t.root {
				return fail(fmt.Errorf("process %d: %w", pid, ErrNoProcess))
			}
			continue
		}
		if st.State == 'Z' && pid != t.root {
			t.zombies = append(t.zombies, st)
			continue
		}
		tids, err := proc.Tids(pid)
		if err != nil {
			return fail(fmt.Errorf("list threads of %d: %w", pid, ErrNoProcess))
		}
		// The main thread first.
		if i := slices.Index(tids, pid); i > 0 {
			tids[0], tids[i] = tids[i], tids[0]
		}
		var threads []*frozenThread
		for _, tid := range tids {
			if err := ptrace.Seize(tid, ptrace.OptsDump); err != nil {
				return fail(fmt.Errorf("seize %d: %w", tid, err))
			}
			seized = append(seized, tid)
			if err := ptrace.Interrupt(tid); err != nil {
				return fail(fmt.Errorf("interrupt %d: %w", tid, err))
			}
			threads = append(threads, &frozenThread{tid: tid})
		}
		queue = append(queue, t.frozen(pid, threads)...)
	}
	if err := fz.Set(false, deadline); err != nil {
		return fail(fmt.Errorf("--freeze-cgroup: thaw: %w", err))
	}
	for _, d := range t.procs {
		for _, ft := range d.threads {
			// Frozen, a thread cannot have been on its way out.
			if gone, err := waitInterrupted(ft, deadline); err != nil || gone {
				if err == nil {
					err = fmt.Errorf("thread %d exited: %w", ft.tid, ErrNoProcess)
				}
				t.procs = t.procs[:1]
				return fail(err)
			}
		}
	}
	if was {
		t.refreeze = fz
	}
	t.log.Debug("frozen with the cgroup freezer", "cgroup", t.opts.FreezeCgroup, "was frozen", was)
	return nil
}

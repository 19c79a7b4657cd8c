package dumpcore

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

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

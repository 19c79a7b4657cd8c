package compel

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/ptrace"
)

// Task is a traced thread that runs remote syscalls.
type Task struct {
	Tid int
	// Regs is the register template each call starts from; callers set it
	// to the task's saved registers (dump) or anything sane (restore).
	Regs ptrace.Regs
	// Gadget is the address of a syscall instruction in the task.
	Gadget uint64
	// Int3 reports that the gadget is followed by int3 (trampoline mode).
	Int3 bool
	// Stack, when non-zero, is the rsp used during calls.
	Stack uint64
	// OnEvent, when set, is told about ptrace event stops met during a call
	// (clone events carry the new tid); the call then continues.
	OnEvent func(tid, event int, msg uint)
	// OnSignal, when set, is told about a signal the task dequeued during
	// a call (only SIGSTOP can be, the others being blocked); if it
	// returns true the signal is discarded and the call goes on, else the
	// call fails.
	OnSignal func(tid, sig int) bool
}

// swallow tells whether st is a signal-delivery stop that OnSignal takes.
func (t *Task) swallow(st ptrace.Stop) bool {
	return t.OnSignal != nil && st.Event() == 0 && st.Sig() != 0 && !st.SyscallStop() &&
		st.Sig() != int(unix.SIGTRAP) && t.OnSignal(t.Tid, st.Sig())
}

// ErrUnexpectedStop reports a stop a remote call did not expect.
var ErrUnexpectedStop = errors.New("unexpected stop during remote syscall")

// Syscall runs syscall nr with args in the task and returns rax. A return
// value in [-4095,-1] becomes an error wrapping the errno.
func (t *Task) Syscall(nr uintptr, args ...uint64) (uint64, error) {
	r := t.Regs
	r.Rip = t.Gadget
	r.Rax = uint64(nr)
	r.Orig_rax = ^uint64(0)
	a := [6]uint64{}
	copy(a[:], args)
	r.Rdi, r.Rsi, r.Rdx, r.R10, r.R8, r.R9 = a[0], a[1], a[2], a[3], a[4], a[5]
	if t.Stack != 0 {
		r.Rsp = t.Stack
	}
	if err := ptrace.SetRegs(t.Tid, &r); err != nil {
		return 0, err
	}
	var err error
	if t.Int3 {
		err = t.runInt3()
	} else {
		err = t.runSyscallStops()
	}
	if err != nil {
		return 0, fmt.Errorf("remote %s in %d: %w", Name(nr), t.Tid, err)
	}
	out, err := ptrace.GetRegs(t.Tid)
	if err != nil {
		return 0, err
	}
	if v := int64(out.Rax); v < 0 && v >= -4095 {
		return out.Rax, fmt.Errorf("remote %s in %d: %w", Name(nr), t.Tid, unix.Errno(-v))
	}
	return out.Rax, nil
}

func (t *Task) handleEvent(st ptrace.Stop) error {
	msg, _ := ptrace.EventMsg(t.Tid)
	if t.OnEvent != nil {
		t.OnEvent(t.Tid, st.Event(), msg)
	}
	return nil
}

func (t *Task) runInt3() error {
	if err := ptrace.Cont(t.Tid, 0); err != nil {
		return err
	}
	for {
		st, err := ptrace.Wait(t.Tid)
		if err != nil {
			return err
		}
		switch {
		case st.Exited():
			return fmt.Errorf("%v: %w", st, ErrUnexpectedStop)
		case st.Event() != 0:
			t.handleEvent(st)
			if err := ptrace.Cont(t.Tid, 0); err != nil {
				return err
			}
		case st.Sig() == int(unix.SIGTRAP):
			return nil
		case t.swallow(st):
			if err := ptrace.Cont(t.Tid, 0); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%v: %w", st, ErrUnexpectedStop)
		}
	}
}

func (t *Task) runSyscallStops() error {
	stops := 0
	if err := ptrace.Syscall(t.Tid, 0); err != nil {
		return err
	}
	for {
		st, err := ptrace.Wait(t.Tid)
		if err != nil {
			return err
		}
		switch {
		case st.Exited():
			return fmt.Errorf("%v: %w", st, ErrUnexpectedStop)
		case st.SyscallStop():
			stops++
			if stops == 2 {
				return nil
			}
		case st.Event() != 0:
			t.handleEvent(st)
		case t.swallow(st):
		default:
			return fmt.Errorf("%v: %w", st, ErrUnexpectedStop)
		}
		if err := ptrace.Syscall(t.Tid, 0); err != nil {
			return err
		}
	}
}

// Name returns a syscall's name for messages.
func Name(nr uintptr) string {
	if n, ok := names[nr]; ok {
		return n
	}
	return fmt.Sprintf("syscall %d", nr)
}

var names = map[uintptr]string{
	unix.SYS_MMAP: "mmap", unix.SYS_MUNMAP: "munmap", unix.SYS_MPROTECT: "mprotect",
	unix.SYS_MREMAP: "mremap", unix.SYS_MADVISE: "madvise", unix.SYS_BRK: "brk",
	unix.SYS_RT_SIGACTION: "rt_sigaction", unix.SYS_SIGALTSTACK: "sigaltstack",
	unix.SYS_GETITIMER: "getitimer", unix.SYS_SETITIMER: "setitimer",
	unix.SYS_TIMER_GETTIME: "timer_gettime", unix.SYS_TIMER_SETTIME: "timer_settime",
	unix.SYS_TIMER_CREATE: "timer_create", unix.SYS_PRCTL: "prctl",
	unix.SYS_OPENAT: "openat", unix.SYS_CLOSE: "close", unix.SYS_DUP3: "dup3",
	unix.SYS_LSEEK: "lseek", unix.SYS_FCNTL: "fcntl", unix.SYS_CLONE3: "clone3",
	unix.SYS_CHDIR: "chdir", unix.SYS_CHROOT: "chroot", unix.SYS_UMASK: "umask",
	unix.SYS_PERSONALITY: "personality", unix.SYS_SETSID: "setsid",
	unix.SYS_SETPGID: "setpgid", unix.SYS_SET_TID_ADDRESS: "set_tid_address",
	unix.SYS_SET_ROBUST_LIST: "set_robust_list", unix.SYS_RSEQ: "rseq",
	unix.SYS_RT_TGSIGQUEUEINFO: "rt_tgsigqueueinfo", unix.SYS_RT_SIGQUEUEINFO: "rt_sigqueueinfo",
	unix.SYS_PRLIMIT64: "prlimit64", unix.SYS_SETRESUID: "setresuid",
	unix.SYS_SETRESGID: "setresgid", unix.SYS_SETGROUPS: "setgroups",
	unix.SYS_CAPSET: "capset", unix.SYS_SETFSUID: "setfsuid", unix.SYS_SETFSGID: "setfsgid",
	unix.SYS_CLOSE_RANGE: "close_range", unix.SYS_PIPE2: "pipe2", unix.SYS_EXIT: "exit",
	unix.SYS_EVENTFD2: "eventfd2", unix.SYS_EPOLL_CREATE1: "epoll_create1", unix.SYS_EPOLL_CTL: "epoll_ctl",
	unix.SYS_WRITE: "write", unix.SYS_GETPID: "getpid",
}

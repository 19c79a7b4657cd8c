package ptrace

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Regs is the x86_64 general-purpose register file (struct user_regs_struct).
type Regs = unix.PtraceRegs

// Options used by ferry for every tracee.
const (
	// OptsDump are the options for seized dump targets. Their seccomp
	// filters are suspended while ferry traces them: the system calls it
	// makes in them are its own, not theirs to filter (a filter could
	// refuse them, or kill the process for them).
	OptsDump = unix.PTRACE_O_TRACESYSGOOD | OSuspendSeccomp
	// OptsRestore additionally follows every clone so that threads and
	// children created by remote clone3 are traced from their first
	// instant (with the options of their creator: the suspension of the
	// filters the restore gives them too).
	OptsRestore = unix.PTRACE_O_TRACESYSGOOD | unix.PTRACE_O_TRACECLONE |
		unix.PTRACE_O_TRACEFORK | unix.PTRACE_O_TRACEVFORK | unix.PTRACE_O_EXITKILL | OSuspendSeccomp
	// OSuspendSeccomp is PTRACE_O_SUSPEND_SECCOMP (CAP_SYS_ADMIN).
	OSuspendSeccomp = 1 << 21
)

// Event numbers (include/uapi/linux/ptrace.h).
const (
	EventClone = unix.PTRACE_EVENT_CLONE
	EventFork  = unix.PTRACE_EVENT_FORK
	EventVfork = unix.PTRACE_EVENT_VFORK
	EventStop  = unix.PTRACE_EVENT_STOP
	EventExit  = unix.PTRACE_EVENT_EXIT
)

func retry(f func() error) error {
	for {
		err := f()
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

func wrap(name string, err error) error {
	if err == nil {
		return nil
	}
	return os.NewSyscallError(name, err)
}

// Seize attaches to tid without stopping it. Where the kernel refuses to
// suspend seccomp filters (ferry without CAP_SYS_ADMIN, or under a filter
// itself), it attaches without (SeccompSuspended tells).
func Seize(tid int, opts int) error {
	err := retry(func() error { return rawPtrace(unix.PTRACE_SEIZE, tid, 0, uintptr(opts)) })
	if opts&OSuspendSeccomp != 0 && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EINVAL)) {
		if err = retry(func() error { return rawPtrace(unix.PTRACE_SEIZE, tid, 0, uintptr(opts&^OSuspendSeccomp)) }); err == nil {
			unsuspended.Store(tid, true)
		}
	} else if err == nil {
		unsuspended.Delete(tid)
	}
	return wrap("ptrace(SEIZE)", err)
}

// unsuspended holds the tracees seized without OSuspendSeccomp.
var unsuspended sync.Map

// SeccompSuspended tells whether tid was seized with its seccomp filters
// suspended (see Seize).
func SeccompSuspended(tid int) bool {
	_, no := unsuspended.Load(tid)
	return !no
}

// Interrupt asks a seized tracee to stop (PTRACE_EVENT_STOP).
func Interrupt(tid int) error {
	return wrap("ptrace(INTERRUPT)", retry(func() error { return unix.PtraceInterrupt(tid) }))
}

// Cont resumes a stopped tracee, delivering sig (0 for none).
func Cont(tid, sig int) error {
	return wrap("ptrace(CONT)", retry(func() error { return unix.PtraceCont(tid, sig) }))
}

// Syscall resumes a tracee until the next syscall entry or exit.
func Syscall(tid, sig int) error {
	return wrap("ptrace(SYSCALL)", retry(func() error { return unix.PtraceSyscall(tid, sig) }))
}

// Detach detaches from a stopped tracee, delivering sig (0 for none).
func Detach(tid, sig int) error {
	return wrap("ptrace(DETACH)", retry(func() error { return rawPtrace(unix.PTRACE_DETACH, tid, 0, uintptr(sig)) }))
}

// SetOptions sets PTRACE_O_* options.
func SetOptions(tid, opts int) error {
	return wrap("ptrace(SETOPTIONS)", retry(func() error { return unix.PtraceSetOptions(tid, opts) }))
}

// GetRegs reads the general-purpose registers.
func GetRegs(tid int) (Regs, error) {
	var r Regs
	err := retry(func() error { return unix.PtraceGetRegs(tid, &r) })
	return r, wrap("ptrace(GETREGS)", err)
}

// SetRegs writes the general-purpose registers.
func SetRegs(tid int, r *Regs) error {
	return wrap("ptrace(SETREGS)", retry(func() error { return unix.PtraceSetRegs(tid, r) }))
}

// EventMsg returns PTRACE_GETEVENTMSG (the new tid at a clone event).
func EventMsg(tid int) (uint, error) {
	var m uint
	err := retry(func() (e error) { m, e = unix.PtraceGetEventMsg(tid); return })
	return m, wrap("ptrace(GETEVENTMSG)", err)
}

// Stop describes what a wait4 reported for a tracee.
type Stop struct {
	Tid    int
	Status unix.WaitStatus
}

// Exited reports whether the task is gone (exited or killed).
func (s Stop) Exited() bool { return s.Status.Exited() || s.Status.Signaled() }

// Event returns the PTRACE_EVENT_* of an event stop, 0 otherwise.
func (s Stop) Event() int {
	if !s.Status.Stopped() {
		return 0
	}
	return int(s.Status) >> 16
}

// Sig returns the stop signal (SIGTRAP|0x80 for syscall stops with TRACESYSGOOD).
func (s Stop) Sig() int {
	if !s.Status.Stopped() {
		return 0
	}
	return int(s.Status>>8) & 0xff
}

// SyscallStop reports a syscall-entry or -exit stop.
func (s Stop) SyscallStop() bool { return s.Sig() == int(unix.SIGTRAP)|0x80 && s.Event() == 0 }

func (s Stop) String() string {
	switch {
	case s.Status.Exited():
		return fmt.Sprintf("tid %d exited with %d", s.Tid, s.Status.ExitStatus())
	case s.Status.Signaled():
		return fmt.Sprintf("tid %d killed by %v", s.Tid, s.Status.Signal())
	case s.Event() != 0:
		return fmt.Sprintf("tid %d event stop %d (sig %d)", s.Tid, s.Event(), s.Sig())
	case s.SyscallStop():
		return fmt.Sprintf("tid %d syscall stop", s.Tid)
	default:
		return fmt.Sprintf("tid %d stopped by signal %d", s.Tid, s.Sig())
	}
}

// Wait waits for a state change of tid (any thread: __WALL).
func Wait(tid int) (Stop, error) {
	var ws unix.WaitStatus
	var got int
	err := retry(func() (e error) { got, e = unix.Wait4(tid, &ws, unix.WALL, nil); return })
	if err != nil {
		return Stop{Tid: tid}, wrap("wait4", err)
	}
	return Stop{Tid: got, Status: ws}, nil
}

// WaitNohang polls tid without blocking; ok is false if nothing was reported.
func WaitNohang(tid int) (st Stop, ok bool, err error) {
	var ws unix.WaitStatus
	var got int
	err = retry(func() (e error) { got, e = unix.Wait4(tid, &ws, unix.WALL|unix.WNOHANG, nil); return })
	if err != nil || got == 0 {
		return Stop{Tid: tid}, false, wrap("wait4", err)
	}
	return Stop{Tid: got, Status: ws}, true, nil
}

// Thread runs functions on one locked OS thread, the tracer of everything
// attached from it. The thread is never unlocked: when Close ends its
// goroutine the thread exits, and the kernel detaches whatever it still
// traces (or kills it, with PTRACE_O_EXITKILL).
type Thread struct {
	work chan func()
	done chan struct{}
}

// NewThread starts a tracer thread.
func NewThread() *Thread {
	t := &Thread{work: make(chan func()), done: make(chan struct{})}
	go func() {
		runtime.LockOSThread()
		defer close(t.done)
		for f := range t.work {
			f()
		}
	}()
	return t
}

// Do runs f on the tracer thread and waits for it.
func (t *Thread) Do(f func() error) error {
	var err error
	ch := make(chan struct{})
	t.work <- func() { err = f(); close(ch) }
	<-ch
	return err
}

// Close ends the tracer thread.
func (t *Thread) Close() {
	close(t.work)
	<-t.done
}

// ReapAll waits, as their tracer, until every thread of tids has exited
// (killed by the caller), reaping them in whatever order they become
// ready: a leader's exit is reported only after its other threads', and
// the last thread of a PID namespace's init to exit waits until every
// other task of the namespace is reaped, so waiting on each in a fixed
// order can wait forever.
func ReapAll(tids []int) {
	pending := slices.Clone(tids)
	for delay := 50 * time.Microsecond; len(pending) > 0; delay = min(2*delay, 10*time.Millisecond) {
		progress := false
		pending = slices.DeleteFunc(pending, func(tid int) bool {
			st, ok, err := WaitNohang(tid)
			if err != nil || ok && st.Exited() {
				progress = true
				return true
			}
			progress = progress || ok
			return false
		})
		if progress {
			delay = 50 * time.Microsecond
			continue
		}
		time.Sleep(delay)
	}
}

package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/ptrace"
)

// The probe child: a process that does nothing, for the probes that need
// another task to look at (ptrace, pidfd_getfd, process_vm_readv, kcmp).
//
//	tracer thread (locked)                probe child
//	----------------------                -----------
//	memfd_create, write ELF, reopen RO
//	os/exec /proc/self/fd/N  ──fork+exec──▶ pause() loop
//	PTRACE_SEIZE, PTRACE_INTERRUPT ───────▶ interrupt stop
//	wait4 ◀──────────────────── PTRACE_EVENT_STOP
//	probe (GETREGSET, PEEKSIGINFO, ...)
//	PTRACE_DETACH ────────────────────────▶ runs again
//	kill(pid, SIGKILL), wait4(pid) ───────▶ gone
//
// Everything happens on one locked OS thread: it forks the child (so
// Pdeathsig fires if that thread dies, and never earlier) and is its
// tracer. The PID is signalled only while the child is unreaped, so it
// cannot name another process.

// childName is argv[0] and the memfd name of the probe child.
const childName = "ferry-probe"

// probeELF returns a minimal static x86_64 executable (include/uapi/linux/elf.h)
// that loops on pause(2): one PT_LOAD segment at 0x400000 holding the ELF
// header, the program header and 9 bytes of code.
func probeELF() []byte {
	const (
		base     = 0x400000
		ehdrSize = 64 // sizeof(Elf64_Ehdr)
		phdrSize = 56 // sizeof(Elf64_Phdr)
	)
	code := []byte{
		0xb8, sysPause, 0, 0, 0, // mov eax, SYS_pause
		0x0f, 0x05, // syscall
		0xeb, 0xf7, // jmp -9 (back to the mov)
	}
	b := make([]byte, ehdrSize+phdrSize+len(code))
	le := binary.LittleEndian
	copy(b, "\x7fELF")
	b[4], b[5], b[6] = 2, 1, 1                   // ELFCLASS64, ELFDATA2LSB, EV_CURRENT
	le.PutUint16(b[16:], 2)                      // e_type = ET_EXEC
	le.PutUint16(b[18:], 62)                     // e_machine = EM_X86_64
	le.PutUint32(b[20:], 1)                      // e_version = EV_CURRENT
	le.PutUint64(b[24:], base+ehdrSize+phdrSize) // e_entry
	le.PutUint64(b[32:], ehdrSize)               // e_phoff
	le.PutUint16(b[52:], ehdrSize)               // e_ehsize
	le.PutUint16(b[54:], phdrSize)               // e_phentsize
	le.PutUint16(b[56:], 1)                      // e_phnum
	ph := b[ehdrSize:]
	le.PutUint32(ph[0:], 1)               // p_type = PT_LOAD
	le.PutUint32(ph[4:], 5)               // p_flags = PF_R|PF_X
	le.PutUint64(ph[16:], base)           // p_vaddr
	le.PutUint64(ph[24:], base)           // p_paddr
	le.PutUint64(ph[32:], uint64(len(b))) // p_filesz
	le.PutUint64(ph[40:], uint64(len(b))) // p_memsz
	le.PutUint64(ph[48:], 0x1000)         // p_align
	copy(b[ehdrSize+phdrSize:], code)
	return b
}

// child is a running probe child.
type child struct {
	cmd       *exec.Cmd
	pid       int
	fromMemfd bool // the in-memory ELF (else sleep(1))
	traced    bool
	reaped    bool // a wait already collected it: its PID is no longer ours
}

// memfdCreate creates the memfd for the probe child, executable where the
// kernel knows MFD_EXEC (6.3+, and required when vm.memfd_noexec=1).
func memfdCreate() (int, error) {
	fd, err := unix.MemfdCreate(childName, unix.MFD_CLOEXEC|unix.MFD_EXEC)
	if errors.Is(err, unix.EINVAL) {
		fd, err = unix.MemfdCreate(childName, unix.MFD_CLOEXEC)
	}
	if err != nil {
		return -1, os.NewSyscallError("memfd_create", err)
	}
	return fd, nil
}

// startMemfdChild runs probeELF from a memfd. Call it on a locked thread.
func startMemfdChild() (*child, error) {
	fd, err := memfdCreate()
	if err != nil {
		return nil, err
	}
	elf := probeELF()
	n, err := unix.Write(fd, elf)
	if err == nil && n != len(elf) {
		err = fmt.Errorf("short write of %d bytes", n)
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("write probe ELF to memfd: %w", err)
	}
	// Execute a read-only reopening: while a writable fd is open, exec
	// fails with ETXTBSY on kernels that deny write access to running
	// binaries.
	ro, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", fd))
	unix.Close(fd)
	if err != nil {
		return nil, err
	}
	defer ro.Close()
	cmd := exec.Command(fmt.Sprintf("/proc/self/fd/%d", ro.Fd()))
	cmd.Args = []string{childName}
	c, err := start(cmd)
	if err != nil {
		return nil, err
	}
	c.fromMemfd = true
	return c, nil
}

// startSleepChild runs sleep(1) from PATH, for machines that refuse to
// execute memfds.
func startSleepChild() (*child, error) {
	path, err := exec.LookPath("sleep")
	if err != nil {
		return nil, err
	}
	return start(exec.Command(path, "1000"))
}

func start(cmd *exec.Cmd) (*child, error) {
	// Stdin, stdout and stderr are /dev/null (os/exec opens them).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start probe child: %w", err)
	}
	return &child{cmd: cmd, pid: cmd.Process.Pid}, nil
}

// startChild starts the in-memory probe child, or sleep(1) if that fails.
// Call it on a locked thread.
func startChild() (*child, error) {
	c, err := startMemfdChild()
	if err == nil {
		return c, nil
	}
	c, err2 := startSleepChild()
	if err2 != nil {
		return nil, fmt.Errorf("%w; fallback: %w", err, err2)
	}
	return c, nil
}

// seize attaches to the child and stops it in a PTRACE_EVENT_STOP.
// Errors are the raw ptrace errors, so callers can tell EIO (no such
// request) from the rest.
func (c *child) seize() error {
	if err := ptrace.Seize(c.pid, 0); err != nil {
		return err
	}
	c.traced = true
	if err := ptrace.Interrupt(c.pid); err != nil {
		return err
	}
	for {
		st, err := ptrace.Wait(c.pid)
		if err != nil {
			return err
		}
		switch {
		case st.Exited():
			c.reaped = true
			return fmt.Errorf("probe child %d: %v", c.pid, st)
		case st.Event() == ptrace.EventStop:
			return nil
		}
		// A signal-delivery stop: deliver it and wait for the interrupt.
		if err := ptrace.Cont(c.pid, st.Sig()); err != nil {
			return err
		}
	}
}

// stop detaches (if traced), kills and reaps the child. It must run on the
// thread that started it.
func (c *child) stop() {
	if c.traced && !c.reaped {
		// Fails harmlessly if the child is not in a ptrace stop; SIGKILL
		// and the wait below work either way.
		_ = ptrace.Detach(c.pid, 0)
	}
	if c.reaped {
		// Our wait4 collected it; os/exec's Wait would fail. Let go of
		// the os.Process (and its pidfd).
		_ = c.cmd.Process.Release()
		return
	}
	_ = unix.Kill(c.pid, unix.SIGKILL)
	_ = c.cmd.Wait() // "signal: killed"
}

// withChild starts a probe child on a fresh locked thread, seizes and
// stops it if trace is set, runs fn on that thread, and removes the child.
func withChild(trace bool, fn func(c *child) (string, error)) (string, error) {
	th := ptrace.NewThread()
	defer th.Close()
	var detail string
	err := th.Do(func() error {
		c, err := startChild()
		if err != nil {
			return err
		}
		defer c.stop()
		if trace {
			if err := c.seize(); err != nil {
				return fmt.Errorf("seize probe child %d: %w", c.pid, err)
			}
		}
		detail, err = fn(c)
		return err
	})
	return detail, err
}

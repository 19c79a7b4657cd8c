package dumpcore

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// findSyscallGadget returns the address of a "syscall" instruction in the
// task's vDSO, which every process has mapped executable.
func findSyscallGadget(pid int, vmas []proc.Vma) (uint64, error) {
	for _, v := range vmas {
		if v.Name != "[vdso]" {
			continue
		}
		buf := make([]byte, v.Size())
		if err := compel.ReadMem(pid, []compel.Segment{{Addr: v.Start, Local: buf}}); err != nil {
			return 0, fmt.Errorf("read vDSO: %w", err)
		}
		if i := bytes.Index(buf, []byte{0x0f, 0x05}); i >= 0 {
			return v.Start + uint64(i), nil
		}
	}
	// No vDSO (unmapped, or vdso=0): any executable mapping will do.
	for _, v := range vmas {
		if v.Perms[2] != 'x' || v.Name == "[vsyscall]" {
			continue
		}
		const chunk = 1 << 20
		for a := v.Start; a < v.End; a += chunk - 1 {
			buf := make([]byte, min(chunk, v.End-a))
			if compel.ReadMem(pid, []compel.Segment{{Addr: a, Local: buf}}) != nil {
				break
			}
			if i := bytes.Index(buf, []byte{0x0f, 0x05}); i >= 0 {
				return a + uint64(i), nil
			}
		}
	}
	return 0, fmt.Errorf("no syscall instruction in any executable mapping of %d: %w", pid, ErrUnsupported)
}

// scratch is a temporary anonymous mapping in the target for remote
// syscall arguments. It is unmapped before memory is collected.
type scratch struct {
	pid  int
	addr uint64
	size uint64
}

const scratchSize = 64 << 10

func mapScratch(t *compel.Task, pid int) (*scratch, error) {
	addr, err := t.Syscall(unix.SYS_MMAP, 0, scratchSize, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uint64(0), 0)
	if err != nil {
		return nil, err
	}
	return &scratch{pid: pid, addr: addr, size: scratchSize}, nil
}

// gadgetCode is "syscall; int3": a remote call through it stops once, at
// the int3, where one through the program's own syscall instruction
// stops twice (syscall entry and exit).
var gadgetCode = []byte{0x0f, 0x05, 0xcc}

// gadget puts gadgetCode at the end of the scratch area, made executable,
// and returns its address; 0 when the process refuses executable memory
// (PR_SET_MDWE, say), and the program's own syscall instruction serves.
func (s *scratch) gadget(t *compel.Task) uint64 {
	at := s.addr + s.size - pageSize
	if s.write(s.size-pageSize, gadgetCode) != nil {
		return 0
	}
	if _, err := t.Syscall(unix.SYS_MPROTECT, at, pageSize, unix.PROT_READ|unix.PROT_EXEC); err != nil {
		return 0
	}
	return at
}

func (s *scratch) unmap(t *compel.Task) error {
	_, err := t.Syscall(unix.SYS_MUNMAP, s.addr, s.size)
	return err
}

func (s *scratch) read(off uint64, n int) ([]byte, error) {
	b := make([]byte, n)
	err := compel.ReadMem(s.pid, []compel.Segment{{Addr: s.addr + off, Local: b}})
	return b, err
}

func (s *scratch) write(off uint64, b []byte) error {
	return compel.WriteMem(s.pid, []compel.Segment{{Addr: s.addr + off, Local: b}})
}

func le64(b []byte, i int) uint64 { return binary.LittleEndian.Uint64(b[i*8:]) }

// Restart error codes a syscall returns when a signal interrupts it
// (include/linux/errno.h, kernel-internal).
const (
	errRestartSys     = 512
	errRestartNoIntr  = 513
	errRestartNoHand  = 514
	errRestartBlock   = 516
	sysRestartSyscall = 219 // __NR_restart_syscall
)

// restartFixup turns the registers of a thread stopped inside an
// interrupted syscall into registers that re-run it when the thread
// resumes. live says the same task will resume (dump -R), which can use
// restart_syscall for -ERESTART_RESTARTBLOCK; a restored task has no
// restart block, so it re-runs the original syscall with its original
// arguments (still in rdi..r9).
func restartFixup(r *ptrace.Regs, live bool) (restarted int64) {
	if int64(r.Orig_rax) < 0 {
		return -1
	}
	switch -int64(r.Rax) {
	case errRestartSys, errRestartNoIntr, errRestartNoHand:
		r.Rax = r.Orig_rax
	case errRestartBlock:
		if live {
			r.Rax = sysRestartSyscall
		} else {
			r.Rax = r.Orig_rax
		}
	default:
		return -1
	}
	restarted = int64(r.Orig_rax)
	r.Rip -= 2
	r.Orig_rax = ^uint64(0)
	return restarted
}

package restorecore

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
)

// The seed is a tiny static ELF that closes its inherited fds (from
// seedCode[1] on) and waits in
// pause(2). Restored processes are remote clone3 children of it, so their
// address space starts out holding almost nothing. Its code ends with the
// "syscall; int3" gadget remote syscalls use until a process has its own
// trampoline.
const (
	seedBase  = 0x10000
	ehdrSize  = 64
	phdrSize  = 56
	codeStart = ehdrSize + phdrSize
)

var seedCode = []byte{
	0xbf, 0x03, 0x00, 0x00, 0x00, // mov edi, 3
	0xbe, 0xff, 0xff, 0xff, 0xff, // mov esi, ~0
	0x31, 0xd2, // xor edx, edx
	0xb8, 0xb4, 0x01, 0x00, 0x00, // mov eax, 436 (close_range)
	0x0f, 0x05, // syscall
	// pause loop:
	0xb8, 0x22, 0x00, 0x00, 0x00, // mov eax, 34 (pause)
	0x0f, 0x05, // syscall
	0xeb, 0xf7, // jmp pause loop
	// gadget:
	0x0f, 0x05, // syscall
	0xcc, // int3
}

// seedGadget is the address of the seed's "syscall; int3".
const seedGadget = seedBase + codeStart + 28

// seedELF returns the seed, closing its fds from firstClosed on.
func seedELF(firstClosed byte) []byte {
	total := codeStart + len(seedCode)
	b := make([]byte, total)
	le := binary.LittleEndian
	copy(b, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0}) // 64-bit, LE, version 1, SysV
	le.PutUint16(b[16:], 2)                          // ET_EXEC
	le.PutUint16(b[18:], 0x3e)                       // EM_X86_64
	le.PutUint32(b[20:], 1)                          // EV_CURRENT
	le.PutUint64(b[24:], seedBase+codeStart)         // e_entry
	le.PutUint64(b[32:], ehdrSize)                   // e_phoff
	le.PutUint16(b[52:], ehdrSize)                   // e_ehsize
	le.PutUint16(b[54:], phdrSize)                   // e_phentsize
	le.PutUint16(b[56:], 1)                          // e_phnum
	p := b[ehdrSize:]
	le.PutUint32(p[0:], 1)              // PT_LOAD
	le.PutUint32(p[4:], 5)              // PF_R|PF_X
	le.PutUint64(p[8:], 0)              // p_offset
	le.PutUint64(p[16:], seedBase)      // p_vaddr
	le.PutUint64(p[24:], seedBase)      // p_paddr
	le.PutUint64(p[32:], uint64(total)) // p_filesz
	le.PutUint64(p[40:], uint64(total)) // p_memsz
	le.PutUint64(p[48:], 0x1000)        // p_align
	copy(b[codeStart:], seedCode)
	b[codeStart+1] = firstClosed
	return b
}

// startSeed execs the seed from a memfd, untraced; the caller seizes it.
//
// With ferryFd the seed also has that file at fd 4 (seedFerryPidfd), for
// a tree in a PID namespace of its own: a pidfd of ferry, or the
// socket ferry hands files over (a tree that is born in a user namespace
// of its own, see makeUserNs). With sibling the seed, and so the root
// cloned from it with CLONE_PARENT, is a child of ferry's parent.
//
// For a caller that is not root the seed runs as the caller, with
// CAP_CHECKPOINT_RESTORE and CAP_SETPCAP (ambient: kept through the
// exec) and no other capability (see caller.go).
func startSeed(ferryFd *os.File, sibling bool, caller *proc.Caller) (*exec.Cmd, error) {
	fd, err := unix.MemfdCreate("ferry-seed", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("memfd_create", err)
	}
	f := os.NewFile(uintptr(fd), "ferry-seed")
	defer f.Close()
	firstClosed := byte(3)
	if ferryFd != nil {
		firstClosed = seedFerryPidfd + 1
	}
	if _, err := f.Write(seedELF(firstClosed)); err != nil {
		return nil, fmt.Errorf("write seed: %w", err)
	}
	cmd := exec.Command("/proc/self/fd/3")
	cmd.Args = []string{"ferry-seed"}
	cmd.ExtraFiles = []*os.File{f}
	if ferryFd != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, ferryFd)
	}
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if sibling {
		cmd.SysProcAttr.Cloneflags = unix.CLONE_PARENT
	}
	if caller != nil {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: caller.Uid, Gid: caller.Gid, Groups: caller.Groups}
		// CAP_AUDIT_CONTROL only to write its loginuid (seedAsCaller).
		cmd.SysProcAttr.AmbientCaps = []uintptr{unix.CAP_CHECKPOINT_RESTORE, unix.CAP_SETPCAP, unix.CAP_AUDIT_CONTROL}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start seed: %w", err)
	}
	return cmd, nil
}

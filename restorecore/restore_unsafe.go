package restorecore

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// getcpu returns the CPU the calling thread runs on.
func getcpu(cpu *uint32) {
	unix.RawSyscall(unix.SYS_GETCPU, uintptr(unsafe.Pointer(cpu)), 0, 0)
}

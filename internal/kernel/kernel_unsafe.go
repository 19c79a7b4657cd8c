package kernel

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The raw syscalls of the probes. Each retries on EINTR and returns an
// *os.SyscallError naming the call.

// Build-time ABI checks: an index out of range or an overflowing constant
// fails compilation if a struct size or an ioctl number in abi.go is off.
func _() {
	var x [1]struct{}
	_ = x[unsafe.Sizeof(cloneArgs{})-unix.CLONE_ARGS_SIZE_VER2]
}

func syscallErr(name string, e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return os.NewSyscallError(name, e)
}

func retry(f func() (uintptr, unix.Errno)) (uintptr, unix.Errno) {
	for {
		r, e := f()
		if !errors.Is(e, unix.EINTR) {
			return r, e
		}
	}
}

func ioctl(name string, fd int, req uintptr, arg unsafe.Pointer) (int, error) {
	r, e := retry(func() (uintptr, unix.Errno) {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		return r, e
	})
	return int(r), syscallErr("ioctl("+name+")", e)
}

// addrOf returns the address of b's first byte; b must not be empty. The
// probes use it only for memory from unix.Mmap, which the Go runtime never
// moves.
func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) }

// clone3 calls clone3(args, size). The probes only pass arguments the
// kernel must reject: a return of 0 or a PID would mean a forked Go runtime,
// so any success is reported as an error (and cannot happen with the
// arguments clone3SetTidProbe passes, see there).
func clone3(args *cloneArgs, size uintptr) error {
	r, e := retry(func() (uintptr, unix.Errno) {
		r, _, e := unix.Syscall(unix.SYS_CLONE3, uintptr(unsafe.Pointer(args)), size, 0)
		return r, e
	})
	if e != 0 {
		return os.NewSyscallError("clone3", e)
	}
	return fmt.Errorf("clone3 accepted invalid arguments (returned %d)", int(r))
}

// prctlMMMapSizeQuery asks prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE) for the size of
// struct prctl_mm_map the kernel expects.
func prctlMMMapSizeQuery() (uint32, error) {
	var size uint32
	_, e := retry(func() (uintptr, unix.Errno) {
		r, _, e := unix.Syscall6(unix.SYS_PRCTL, unix.PR_SET_MM, unix.PR_SET_MM_MAP_SIZE,
			uintptr(unsafe.Pointer(&size)), 0, 0, 0)
		return r, e
	})
	return size, syscallErr("prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)", e)
}

// kcmp compares a resource of two tasks: 0 equal, 1 or 2 ordered, 3 unequal
// but not ordered.
func kcmp(pid1, pid2, typ, idx1, idx2 int) (int, error) {
	r, e := retry(func() (uintptr, unix.Errno) {
		r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid1), uintptr(pid2), uintptr(typ),
			uintptr(idx1), uintptr(idx2), 0)
		return r, e
	})
	return int(r), syscallErr("kcmp", e)
}

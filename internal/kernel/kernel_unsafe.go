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
	_ = x[unsafe.Sizeof(pmScanArg{})-96]
	_ = x[unsafe.Sizeof(pageRegion{})-24]
	_ = x[unsafe.Sizeof(cloneArgs{})-unix.CLONE_ARGS_SIZE_VER2]
	_ = x[unsafe.Sizeof(uffdioAPI{})-24]
	_ = x[unsafe.Sizeof(uffdioRegister{})-32]
	_ = x[unsafe.Sizeof(uffdioWriteprotect{})-24]
	_ = x[ioctlPagemapScan-((iocRead|iocWrite)<<30|unsafe.Sizeof(pmScanArg{})<<16|'f'<<8|16)]
	_ = x[ioctlUffdioAPI-((iocRead|iocWrite)<<30|unsafe.Sizeof(uffdioAPI{})<<16|uffdAPI<<8|0x3F)]
	_ = x[ioctlUffdioRegister-((iocRead|iocWrite)<<30|unsafe.Sizeof(uffdioRegister{})<<16|uffdAPI<<8|0x00)]
	_ = x[ioctlUffdioWriteprotect-((iocRead|iocWrite)<<30|unsafe.Sizeof(uffdioWriteprotect{})<<16|uffdAPI<<8|0x06)]
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

// userfaultfd creates a userfaultfd with flags (O_CLOEXEC, O_NONBLOCK,
// UFFD_USER_MODE_ONLY).
func userfaultfd(flags int) (int, error) {
	r, e := retry(func() (uintptr, unix.Errno) {
		r, _, e := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
		return r, e
	})
	return int(r), syscallErr("userfaultfd", e)
}

// uffdAPIHandshake performs UFFDIO_API asking for features and returns the
// kernel's answer (the features it enabled and the ioctls it offers).
func uffdAPIHandshake(fd int, features uint64) (uffdioAPI, error) {
	api := uffdioAPI{API: uffdAPI, Features: features}
	_, err := ioctl("UFFDIO_API", fd, ioctlUffdioAPI, unsafe.Pointer(&api))
	return api, err
}

// uffdRegister registers [start, start+length) with the given
// UFFDIO_REGISTER_MODE_* and returns the ioctls allowed on it.
func uffdRegister(fd int, start, length, mode uint64) (uint64, error) {
	reg := uffdioRegister{Range: uffdioRange{Start: start, Len: length}, Mode: mode}
	_, err := ioctl("UFFDIO_REGISTER", fd, ioctlUffdioRegister, unsafe.Pointer(&reg))
	return reg.Ioctls, err
}

// uffdWriteprotect sets (mode UFFDIO_WRITEPROTECT_MODE_WP) or clears (0)
// write protection on [start, start+length).
func uffdWriteprotect(fd int, start, length, mode uint64) error {
	wp := uffdioWriteprotect{Range: uffdioRange{Start: start, Len: length}, Mode: mode}
	_, err := ioctl("UFFDIO_WRITEPROTECT", fd, ioctlUffdioWriteprotect, unsafe.Pointer(&wp))
	return err
}

// pagemapScan runs PAGEMAP_SCAN on the pagemap file fd with arg, writing
// regions to vec, and returns how many it filled. It sets arg's Size, Vec
// and VecLen.
func pagemapScan(fd int, arg *pmScanArg, vec []pageRegion) (int, error) {
	arg.Size = uint64(unsafe.Sizeof(*arg))
	arg.Vec, arg.VecLen = 0, 0
	if len(vec) > 0 {
		arg.Vec = uint64(uintptr(unsafe.Pointer(&vec[0])))
		arg.VecLen = uint64(len(vec))
	}
	return ioctl("PAGEMAP_SCAN", fd, ioctlPagemapScan, unsafe.Pointer(arg))
}

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

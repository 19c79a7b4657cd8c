package dumpcore

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The raw system calls that hand the kernel a buffer of ferry's memory.

// getsockoptRaw calls getsockopt(fd, level, name) into b with the given
// optlen (in bytes, or in the option's own unit, as SO_GET_FILTER counts
// instructions); b may be empty (a NULL optval, to learn the length). It
// returns the optlen the kernel wrote back.
func getsockoptRaw(fd, level, name int, b []byte, optlen uint32) (uint32, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name),
		uintptr(p), uintptr(unsafe.Pointer(&optlen)), 0)
	if e != 0 {
		return 0, e
	}
	return optlen, nil
}

// sockaddrRaw calls getsockname or getpeername (nr) into b and returns the
// address's length.
func sockaddrRaw(fd int, nr uintptr, b []byte) (uint32, error) {
	l := uint32(len(b))
	_, _, e := unix.Syscall(nr, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)))
	if e != 0 {
		return 0, e
	}
	return l, nil
}

// ioctlBuf calls ioctl(fd, req, b).
func ioctlBuf(fd int, req uintptr, b []byte) error {
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&b[0]))); e != 0 {
		return e
	}
	return nil
}

// kcmpEpollTfd tells whether fd of process pid is the file that epoll fd
// efd of process epid registered under number tfd (the toff-th
// registration under that number): kcmp(KCMP_EPOLL_TFD).
func kcmpEpollTfd(pid, fd, epid, efd, tfd, toff int) bool {
	const kcmpEpollTFD = 7
	slot := [3]uint32{uint32(efd), uint32(tfd), uint32(toff)}
	r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid), uintptr(epid), kcmpEpollTFD,
		uintptr(fd), uintptr(unsafe.Pointer(&slot[0])), 0)
	return e == 0 && r == 0
}

// getOwnerEx is fcntl(fd, F_GETOWN_EX): struct f_owner_ex {int type;
// pid_t pid;}.
func getOwnerEx(fd int) (typ, pid int32, err error) {
	var own [2]int32
	_, _, e := unix.Syscall(unix.SYS_FCNTL, uintptr(fd), unix.F_GETOWN_EX, uintptr(unsafe.Pointer(&own[0])))
	if e != 0 {
		return 0, 0, e
	}
	return own[0], own[1], nil
}

// kcmpSame tells whether processes a and b share the kernel object of
// kcmp type typ (KCMP_FILES, KCMP_FS, ...).
func kcmpSame(a, b, typ int) bool {
	r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(a), uintptr(b), uintptr(typ), 0, 0, 0)
	return e == 0 && r == 0
}

// currentCPU returns the CPU the calling thread runs on.
func currentCPU() int {
	var c uint32
	unix.RawSyscall(unix.SYS_GETCPU, uintptr(unsafe.Pointer(&c)), 0, 0)
	return int(c)
}

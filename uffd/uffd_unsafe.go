package uffd

import (
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Encodings of the ioctl numbers, checked at compile time against the
// constants in abi.go (include/uapi/asm-generic/ioctl.h).
var _ = [1]struct{}{}[ioctlAPI-(3<<30|unsafe.Sizeof(apiArgs{})<<16|0xAA<<8|0x3F)]
var _ = [1]struct{}{}[ioctlRegister-(3<<30|unsafe.Sizeof(registerArgs{})<<16|0xAA<<8|0x00)]
var _ = [1]struct{}{}[ioctlUnregister-(2<<30|unsafe.Sizeof(Range{})<<16|0xAA<<8|0x01)]
var _ = [1]struct{}{}[ioctlWake-(2<<30|unsafe.Sizeof(Range{})<<16|0xAA<<8|0x02)]
var _ = [1]struct{}{}[ioctlCopy-(3<<30|unsafe.Sizeof(copyArgs{})<<16|0xAA<<8|0x03)]
var _ = [1]struct{}{}[ioctlZeropage-(3<<30|unsafe.Sizeof(zeropageArgs{})<<16|0xAA<<8|0x04)]
var _ = [1]struct{}{}[ioctlWriteprotect-(3<<30|unsafe.Sizeof(writeprotectArgs{})<<16|0xAA<<8|0x06)]
var _ = [1]struct{}{}[ioctlPagemapScan-(3<<30|unsafe.Sizeof(scanArgs{})<<16|'f'<<8|16)]
var _ = [1]struct{}{}[unsafe.Sizeof(Region{})-24]

func sysUserfaultfd(flags int) (int, error) {
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

func ptrOf[T any](p *T) unsafe.Pointer { return unsafe.Pointer(p) }

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// ioctl retries EINTR.
func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if e == 0 {
			return nil
		}
		if !errors.Is(e, unix.EINTR) {
			return e
		}
	}
}

// ioctlKeep is ioctl without retry, for COPY and ZEROPAGE whose partial
// progress the caller must see.
func ioctlKeep(fd int, req uintptr, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}

// scanIoctl runs PAGEMAP_SCAN on pagemapFd into vec; it returns the number
// of regions filled and walk_end.
func scanIoctl(pagemapFd int, a *scanArgs, vec []Region) (int, uint64, error) {
	a.Size = uint64(unsafe.Sizeof(*a))
	a.Vec = uint64(uintptr(unsafe.Pointer(&vec[0])))
	a.VecLen = uint64(len(vec))
	for {
		n, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(pagemapFd), ioctlPagemapScan, uintptr(unsafe.Pointer(a)))
		if e == 0 {
			return int(n), a.WalkEnd, nil
		}
		if !errors.Is(e, unix.EINTR) {
			return 0, a.WalkEnd, e
		}
	}
}

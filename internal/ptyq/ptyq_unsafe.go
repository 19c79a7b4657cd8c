package ptyq

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlBuf calls ioctl(fd, req, b).
func ioctlBuf(fd int, req uintptr, b []byte) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&b[0])))
	if errno != 0 {
		return errno
	}
	return nil
}

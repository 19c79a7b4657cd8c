package kernel

import (
	"encoding/binary"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

func clone3Invalid() error {
	// struct clone_args, 88 bytes: set_tid (offset 64) NULL with
	// set_tid_size (offset 72) 1.
	var args [88]byte
	binary.LittleEndian.PutUint64(args[72:], 1)
	_, _, e := unix.RawSyscall(unix.SYS_CLONE3, uintptr(unsafe.Pointer(&args[0])), uintptr(len(args)), 0)
	if e != 0 {
		return e
	}
	return nil
}

func mmMapSize() (int, error) {
	var size uint32
	_, _, e := unix.RawSyscall6(unix.SYS_PRCTL, unix.PR_SET_MM, unix.PR_SET_MM_MAP_SIZE, uintptr(unsafe.Pointer(&size)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(size), nil
}

func kcmpSelf(pid int) error {
	const kcmpFile = 0
	r, _, e := unix.Syscall6(unix.SYS_KCMP, uintptr(pid), uintptr(pid), kcmpFile, 1, 1, 0)
	if e != 0 {
		return os.NewSyscallError("kcmp", e)
	}
	if r != 0 {
		return os.NewSyscallError("kcmp", unix.EINVAL)
	}
	return nil
}

// uffdAPIFeatures opens a userfaultfd, performs the UFFDIO_API handshake
// asking for every feature, and returns what the kernel offers.
func uffdAPIFeatures() (uint64, error) {
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if e != 0 {
		// Unprivileged callers may only have user-mode faults.
		fd, _, e = unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK|uffdUserModeOnly, 0, 0)
		if e != 0 {
			return 0, os.NewSyscallError("userfaultfd", e)
		}
	}
	defer unix.Close(int(fd))
	// struct uffdio_api { u64 api; u64 features; u64 ioctls; }. Asking for
	// no features returns the full set the kernel supports.
	api := [3]uint64{uffdAPI, 0, 0}
	const uffdioAPI = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, uffdioAPI, uintptr(unsafe.Pointer(&api[0]))); e != 0 {
		return 0, os.NewSyscallError("ioctl(UFFDIO_API)", e)
	}
	return api[1], nil
}

// struct pm_scan_arg (include/uapi/linux/fs.h, 6.7).
type pmScanArg struct {
	size, flags, start, end, walkEnd, vec, vecLen, maxPages       uint64
	categoryInverted, categoryMask, categoryAnyofMask, returnMask uint64
}

const (
	pagemapScan   = 0xc0606610 // _IOWR('f', 16, struct pm_scan_arg)
	pageIsPresent = 1 << 3
)

func probePagemapScan() error {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return err
	}
	defer f.Close()
	page := make([]byte, 4*4096)
	for i := range page {
		page[i] = 1
	}
	var vec [4][3]uint64 // struct page_region {start, end, categories}
	base := uint64(uintptr(unsafe.Pointer(&page[0])))
	arg := pmScanArg{
		size: uint64(unsafe.Sizeof(pmScanArg{})), start: base &^ 4095, end: (base + uint64(len(page))) &^ 4095,
		vec: uint64(uintptr(unsafe.Pointer(&vec[0]))), vecLen: uint64(len(vec)),
		categoryAnyofMask: pageIsPresent, returnMask: pageIsPresent,
	}
	n, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), pagemapScan, uintptr(unsafe.Pointer(&arg)))
	if e != 0 {
		if e == unix.ENOTTY || e == unix.EINVAL {
			return missing("ioctl(PAGEMAP_SCAN)", e)
		}
		return os.NewSyscallError("ioctl(PAGEMAP_SCAN)", e)
	}
	if n == 0 || vec[0][2]&pageIsPresent == 0 {
		return os.NewSyscallError("ioctl(PAGEMAP_SCAN)", unix.EIO)
	}
	return nil
}

// softDirty clears the soft-dirty bits of this process, writes a page and
// checks pagemap bit 55 for it.
func softDirty() error {
	if err := os.WriteFile("/proc/self/clear_refs", []byte("4"), 0); err != nil {
		return missing("clear_refs 4", err)
	}
	page := make([]byte, 2*4096)
	addr := (uint64(uintptr(unsafe.Pointer(&page[0]))) + 4095) &^ 4095
	off := addr - uint64(uintptr(unsafe.Pointer(&page[0])))
	page[off] = 1
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return err
	}
	defer f.Close()
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(addr/4096*8)); err != nil {
		return err
	}
	if binary.LittleEndian.Uint64(e[:])&(1<<55) == 0 {
		return missing("soft-dirty bit not set after a write (CONFIG_MEM_SOFT_DIRTY off)", unix.EOPNOTSUPP)
	}
	return nil
}

package kernel

// Kernel ABI the probes use that golang.org/x/sys/unix does not define.
// Each value cites the uapi header it comes from; the ioctl numbers are
// checked against their _IOWR encoding at compile time (kernel_unsafe.go).

// include/uapi/asm-generic/ioctl.h
const (
	iocWrite = 1
	iocRead  = 2
)

// include/uapi/linux/userfaultfd.h
const (
	uffdAPI = 0xAA // UFFD_API

	uffdUserModeOnly = 1 // UFFD_USER_MODE_ONLY, userfaultfd(2) flag

	uffdFeatureWPAsync = 1 << 15 // UFFD_FEATURE_WP_ASYNC

	uffdioRegisterModeWP     = 1 << 1 // UFFDIO_REGISTER_MODE_WP
	uffdioWriteprotectModeWP = 1 << 0 // UFFDIO_WRITEPROTECT_MODE_WP

	ioctlUffdioAPI          = 0xC018AA3F // _IOWR(UFFDIO, _UFFDIO_API (0x3F), struct uffdio_api)
	ioctlUffdioRegister     = 0xC020AA00 // _IOWR(UFFDIO, _UFFDIO_REGISTER (0x00), struct uffdio_register)
	ioctlUffdioWriteprotect = 0xC018AA06 // _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT (0x06), struct uffdio_writeprotect)
)

// uffdioAPI is struct uffdio_api.
type uffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// uffdioRange is struct uffdio_range.
type uffdioRange struct {
	Start uint64
	Len   uint64
}

// uffdioRegister is struct uffdio_register.
type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64 // out
}

// uffdioWriteprotect is struct uffdio_writeprotect.
type uffdioWriteprotect struct {
	Range uffdioRange
	Mode  uint64
}

// include/uapi/linux/fs.h (PAGEMAP_SCAN, Linux 6.7)
const (
	ioctlPagemapScan = 0xC0606610 // _IOWR('f', 16, struct pm_scan_arg)

	pageIsPresent = 1 << 3 // PAGE_IS_PRESENT
)

// pmScanArg is struct pm_scan_arg: twelve __u64, 96 bytes.
type pmScanArg struct {
	Size              uint64 // sizeof(struct pm_scan_arg)
	Flags             uint64 // PM_SCAN_WP_MATCHING, PM_SCAN_CHECK_WPASYNC
	Start             uint64
	End               uint64
	WalkEnd           uint64 // out: where the walk stopped
	Vec               uint64 // address of a struct page_region array
	VecLen            uint64 // its length in entries
	MaxPages          uint64 // 0: no limit
	CategoryInverted  uint64
	CategoryMask      uint64
	CategoryAnyofMask uint64
	ReturnMask        uint64
}

// pageRegion is struct page_region (24 bytes).
type pageRegion struct {
	Start      uint64
	End        uint64 // exclusive
	Categories uint64 // PAGE_IS_*
}

// Documentation/admin-guide/mm/pagemap.rst, fs/proc/task_mmu.c: bits of a
// /proc/PID/pagemap entry.
const (
	pmSoftDirty = 1 << 55 // PM_SOFT_DIRTY
	pmUffdWP    = 1 << 57 // PM_UFFD_WP: pte is uffd-wp write-protected
	pmPresent   = 1 << 63 // PM_PRESENT
)

// fs/proc/task_mmu.c: enum clear_refs_types, CLEAR_REFS_SOFT_DIRTY.
const clearRefsSoftDirty = "4"

// include/uapi/linux/sched.h: struct clone_args, CLONE_ARGS_SIZE_VER2.
type cloneArgs struct {
	Flags      uint64
	Pidfd      uint64
	ChildTid   uint64
	ParentTid  uint64
	ExitSignal uint64
	Stack      uint64
	StackSize  uint64
	TLS        uint64
	SetTid     uint64 // pointer to a pid_t array (5.5)
	SetTidSize uint64
	Cgroup     uint64 // 5.7
}

// include/uapi/linux/prctl.h: sizeof(struct prctl_mm_map) on x86_64:
// eleven __u64 (start_code ... env_end), the auxv pointer, and the __u32
// auxv_size and exe_fd.
const prctlMMMapSize = 104

// include/uapi/linux/kcmp.h
const kcmpFile = 0 // KCMP_FILE

// The probe child's code: pause() in a loop (arch/x86/entry/syscalls/syscall_64.tbl).
const sysPause = 34

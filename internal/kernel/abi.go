package kernel

// Kernel ABI the probes use that golang.org/x/sys/unix does not define.
// Each value cites the uapi header it comes from; the ioctl numbers are
// checked against their _IOWR encoding at compile time (kernel_unsafe.go).

// userfaultfd and PAGEMAP_SCAN: see package uffd.

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

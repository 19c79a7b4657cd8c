package uffd

// include/uapi/linux/userfaultfd.h
const (
	API = 0xAA // UFFD_API

	// userfaultfd(2) flag: only faults from user mode (what unprivileged
	// callers may have with vm.unprivileged_userfaultfd=0).
	UserModeOnly = 1 // UFFD_USER_MODE_ONLY

	// Features (struct uffdio_api.features).
	FeaturePagefaultFlagWP  = 1 << 0  // UFFD_FEATURE_PAGEFAULT_FLAG_WP
	FeatureEventFork        = 1 << 1  // UFFD_FEATURE_EVENT_FORK
	FeatureEventRemap       = 1 << 2  // UFFD_FEATURE_EVENT_REMAP
	FeatureEventRemove      = 1 << 3  // UFFD_FEATURE_EVENT_REMOVE
	FeatureMissingHugetlbfs = 1 << 4  // UFFD_FEATURE_MISSING_HUGETLBFS
	FeatureMissingShmem     = 1 << 5  // UFFD_FEATURE_MISSING_SHMEM
	FeatureEventUnmap       = 1 << 6  // UFFD_FEATURE_EVENT_UNMAP
	FeatureSigbus           = 1 << 7  // UFFD_FEATURE_SIGBUS
	FeatureThreadID         = 1 << 8  // UFFD_FEATURE_THREAD_ID
	FeatureMinorHugetlbfs   = 1 << 9  // UFFD_FEATURE_MINOR_HUGETLBFS
	FeatureMinorShmem       = 1 << 10 // UFFD_FEATURE_MINOR_SHMEM
	FeatureExactAddress     = 1 << 11 // UFFD_FEATURE_EXACT_ADDRESS
	FeatureWPHugetlbfsShmem = 1 << 12 // UFFD_FEATURE_WP_HUGETLBFS_SHMEM
	FeatureWPUnpopulated    = 1 << 13 // UFFD_FEATURE_WP_UNPOPULATED
	FeaturePoison           = 1 << 14 // UFFD_FEATURE_POISON
	FeatureWPAsync          = 1 << 15 // UFFD_FEATURE_WP_ASYNC
	FeatureMove             = 1 << 16 // UFFD_FEATURE_MOVE

	// Register modes (struct uffdio_register.mode).
	RegisterMissing = 1 << 0 // UFFDIO_REGISTER_MODE_MISSING
	RegisterWP      = 1 << 1 // UFFDIO_REGISTER_MODE_WP
	RegisterMinor   = 1 << 2 // UFFDIO_REGISTER_MODE_MINOR

	copyModeDontWake = 1 << 0 // UFFDIO_COPY_MODE_DONTWAKE
	copyModeWP       = 1 << 1 // UFFDIO_COPY_MODE_WP
	zeropageDontWake = 1 << 0 // UFFDIO_ZEROPAGE_MODE_DONTWAKE
	wpModeWP         = 1 << 0 // UFFDIO_WRITEPROTECT_MODE_WP
	wpModeDontWake   = 1 << 1 // UFFDIO_WRITEPROTECT_MODE_DONTWAKE

	// Events (struct uffd_msg.event).
	EventPagefault = 0x12 // UFFD_EVENT_PAGEFAULT
	EventFork      = 0x13 // UFFD_EVENT_FORK
	EventRemap     = 0x14 // UFFD_EVENT_REMAP
	EventRemove    = 0x15 // UFFD_EVENT_REMOVE
	EventUnmap     = 0x16 // UFFD_EVENT_UNMAP

	// Page fault flags (uffd_msg.arg.pagefault.flags).
	PagefaultWrite = 1 << 0 // UFFD_PAGEFAULT_FLAG_WRITE
	PagefaultWP    = 1 << 1 // UFFD_PAGEFAULT_FLAG_WP
	PagefaultMinor = 1 << 2 // UFFD_PAGEFAULT_FLAG_MINOR

	// ioctl numbers: _IOWR(UFFDIO=0xAA, nr, struct) or _IOR for the
	// ones without output; checked against the encoding in uffd_unsafe.go.
	ioctlAPI          = 0xC018AA3F // _IOWR(0xAA, 0x3F, struct uffdio_api)
	ioctlRegister     = 0xC020AA00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	ioctlUnregister   = 0x8010AA01 // _IOR(0xAA, 0x01, struct uffdio_range)
	ioctlWake         = 0x8010AA02 // _IOR(0xAA, 0x02, struct uffdio_range)
	ioctlCopy         = 0xC028AA03 // _IOWR(0xAA, 0x03, struct uffdio_copy)
	ioctlZeropage     = 0xC020AA04 // _IOWR(0xAA, 0x04, struct uffdio_zeropage)
	ioctlWriteprotect = 0xC018AA06 // _IOWR(0xAA, 0x06, struct uffdio_writeprotect)

	// MsgSize is sizeof(struct uffd_msg).
	MsgSize = 32
)

// apiArgs is struct uffdio_api.
type apiArgs struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// Range is struct uffdio_range.
type Range struct {
	Start uint64
	Len   uint64
}

// registerArgs is struct uffdio_register.
type registerArgs struct {
	Range  Range
	Mode   uint64
	Ioctls uint64 // out
}

// copyArgs is struct uffdio_copy.
type copyArgs struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64 // out: bytes copied or -errno
}

// zeropageArgs is struct uffdio_zeropage.
type zeropageArgs struct {
	Range    Range
	Mode     uint64
	Zeropage int64 // out
}

// writeprotectArgs is struct uffdio_writeprotect.
type writeprotectArgs struct {
	Range Range
	Mode  uint64
}

// include/uapi/linux/fs.h (PAGEMAP_SCAN, Linux 6.7)
const (
	ioctlPagemapScan = 0xC0606610 // _IOWR('f', 16, struct pm_scan_arg)

	// Scan flags.
	ScanWPMatching   = 1 << 0 // PM_SCAN_WP_MATCHING: write-protect what matched
	ScanCheckWPAsync = 1 << 1 // PM_SCAN_CHECK_WPASYNC

	// Page categories.
	PageWPAllowed = 1 << 0 // PAGE_IS_WPALLOWED
	PageWritten   = 1 << 1 // PAGE_IS_WRITTEN
	PageFile      = 1 << 2 // PAGE_IS_FILE
	PagePresent   = 1 << 3 // PAGE_IS_PRESENT
	PageSwapped   = 1 << 4 // PAGE_IS_SWAPPED
	PagePFNZero   = 1 << 5 // PAGE_IS_PFNZERO
	PageHuge      = 1 << 6 // PAGE_IS_HUGE
	PageSoftDirty = 1 << 7 // PAGE_IS_SOFT_DIRTY
)

// scanArgs is struct pm_scan_arg: twelve __u64, 96 bytes.
type scanArgs struct {
	Size              uint64
	Flags             uint64
	Start             uint64
	End               uint64
	WalkEnd           uint64 // out
	Vec               uint64
	VecLen            uint64
	MaxPages          uint64
	CategoryInverted  uint64
	CategoryMask      uint64
	CategoryAnyofMask uint64
	ReturnMask        uint64
}

// Region is struct page_region: [Start, End) with its categories.
type Region struct {
	Start      uint64
	End        uint64
	Categories uint64
}

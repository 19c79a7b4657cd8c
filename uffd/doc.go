// Package uffd wraps userfaultfd(2) and the PAGEMAP_SCAN ioctl, the two
// kernel mechanisms of ferry's memory pipeline:
//
//	pre-dump:  userfaultfd in write-protect async mode on the target's
//	           writable private VMAs + PAGEMAP_SCAN with PM_SCAN_WP_MATCHING
//	           = "which pages were written since the last scan", re-armed
//	           in the same call.
//	post-copy: userfaultfd in missing mode inside the restored process,
//	           faults served with UFFDIO_COPY / UFFDIO_ZEROPAGE; FORK,
//	           REMAP, REMOVE and UNMAP events tell the daemon about
//	           address-space changes.
//
// An FD owns its file descriptor (Close is idempotent). Every ioctl wrapper
// retries EINTR and returns *os.SyscallError naming the ioctl. The ABI is
// mirrored in abi.go, citing include/uapi/linux/userfaultfd.h and
// include/uapi/linux/fs.h; the unsafe parts live in uffd_unsafe.go.
//
// Scan handles two kernel traps measured on 6.18 (DESIGN.md, last section):
// a scan with PM_SCAN_CHECK_WPASYNC that crosses from a registered into an
// unregistered VMA fails with EPERM after re-protecting the first part (so
// callers scan one VMA at a time), and walk_end can be stale when the
// kernel's internal buffer overflows (so a full output buffer continues
// from max(walk_end, end of the last region)).
package uffd

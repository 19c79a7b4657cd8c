// Package kernel probes the kernel features ferry relies on, by name, once.
//
// Each Feature ("ptrace-seize", "uffd-wp-async", "pagemap-scan", ...) has a
// probe that exercises the mechanism itself: it seizes and interrupts a
// throwaway child, opens a userfaultfd and write-protects a page, runs a
// PAGEMAP_SCAN over pages it touched. No probe compares version numbers; the
// kernel release that introduced a feature (MinKernel) is only used to explain
// a failure, and by tests to decide that a missing feature is a bug.
//
// A missing feature is reported as a *FeatureError that names the feature,
// the kernel release that has it and the running one, and satisfies
// errors.Is(err, ErrNotSupported). A probe that failed for another reason
// (EPERM from a sandbox, a probe child that could not start) gives a
// *FeatureError that does not: callers and tests must not mistake a broken
// environment for an old kernel.
//
// Invariants:
//
//   - Results are cached per Probes value, one sync.Once per feature; nothing
//     is cached in package variables except the Default instance.
//   - Every probe cleans up what it creates before returning: fds are closed,
//     mappings unmapped, and probe children killed and reaped by PID while
//     they are still unreaped children of ferry (so the PID cannot have been
//     reused).
//   - Probe children are started and traced from one locked OS thread
//     (internal/ptrace.Thread); ptrace requests come only from that thread.
//   - The one lasting effect of a probe: "soft-dirty" writes 4 to
//     /proc/self/clear_refs, which clears the soft-dirty bits of ferry's own
//     memory (where the kernel has them). Nothing in ferry reads them.
//   - A probe may depend on other features through (*Probes).Check; the
//     dependency graph has no cycles ("dirty-tracker" is the only user).
//
// The probe child is a 129-byte static ELF built in memory and executed from
// a memfd (the "memfd-exec" feature exercises the same path); its only code is
// a pause() loop. Where memfd execution is not allowed (vm.memfd_noexec=2),
// the ptrace probes fall back to sleep(1) from PATH.
//
// Raw syscalls the probes need and internal/ptrace does not offer (clone3,
// userfaultfd ioctls, PAGEMAP_SCAN, prctl with a pointer) live in
// sys_unsafe.go; the ABI they use, with the header each value comes from, is
// in abi.go.
package kernel

// Package restorecore rebuilds processes from an image set: same PIDs and
// TIDs, same memory at the same addresses, same registers, files, signals
// and timers.
//
// Sequence (DESIGN.md, "Restore, step by step"):
//
//	load + validate every image      (nothing touched yet; any error ends here)
//	seed: static ELF from a memfd, seized
//	seed --clone3(CLONE_PARENT, set_tid=[pid])--> root (traced, stopped)
//	root: trampoline page; unmap the seed; move [vvar]/[vdso]; map VMAs;
//	      fill pages; PR_SET_MM_MAP; rlimits; fds; cwd; sigactions; timers
//	root --clone3(CLONE_THREAD, set_tid=[tid])--> each thread
//	per thread: tid address, robust list, rseq, sigaltstack, comm
//	pending signals; creds; final registers+xstate+sigmask;
//	the last thread unmaps the trampoline under PTRACE_SYSCALL;
//	detach all ──> the process continues where it was frozen.
//
// Invariant: until the final detach, any failure kills everything this
// restore created (PTRACE_O_EXITKILL covers ferry itself dying), so a
// failed restore never leaves a half-built process running.
package restorecore

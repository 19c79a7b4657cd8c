// Package dumpcore freezes a process tree and writes its complete state as
// an image set (see package images).
//
// Sequence (DESIGN.md, "Dump, step by step"):
//
//	seize+interrupt every thread  ──> frozen (ptrace stops only)
//	block all signals, remote syscalls through the vDSO's "syscall"
//	    (sigactions, timers, brk, tid address, sigaltstack, prctls)
//	registers + xstate, syscall-restart fix-up
//	memory: smaps + pagemap + process_vm_readv, zero pages skipped
//	files: /proc/PID/fd + fdinfo + pidfd_getfd
//	write images ──> kill (default) | detach (-R) | detach stopped (-s)
//
// Invariant: until the images are complete, any failure detaches the tree
// with its registers, signal mask and memory as they were, so a failed dump
// leaves the workload running.
package dumpcore

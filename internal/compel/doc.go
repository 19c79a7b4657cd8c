// Package compel runs system calls inside a stopped, traced task without
// injecting any code blob ("remote syscalls"), and moves memory in and out of
// it with process_vm_readv/writev.
//
// Two gadgets drive a remote call:
//
//	dump:    rip -> any "syscall" (0f 05) already mapped executable in the
//	         target (ferry uses the vDSO's); PTRACE_SYSCALL to the entry
//	         stop, PTRACE_SYSCALL to the exit stop, read rax.
//	restore: rip -> "syscall; int3" on ferry's trampoline page; PTRACE_CONT,
//	         the int3 traps, read rax. One stop per call.
//
// Preconditions for every call: the task is in a ptrace stop, traced from the
// calling OS thread, with every signal blocked (SetSigmask), so a pending
// signal cannot interrupt the call or be consumed by it.
package compel

// Package ptrace is the one place where ferry issues ptrace(2) and wait4(2).
//
// Every wrapper retries on EINTR and returns *os.SyscallError values that
// name the request, so callers can wrap them with the tid and compare the
// errno with errors.Is.
//
// Invariant (kernel rule, not ours): every request for a tracee must come
// from the OS thread that attached it. Callers run a whole traced tree on one
// goroutine that has called runtime.LockOSThread and never unlocks it; see
// Thread for a helper that does exactly that.
package ptrace

package proc

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Namespace names the namespace of kind ("uts", "ipc", "net", ...) that
// pid is in, as /proc/PID/ns/KIND reads ("uts:[4026531838]").
func Namespace(pid int, kind string) (string, error) {
	return os.Readlink(Path(pid, "ns/"+kind))
}

// nsFlags are the setns(2) types of the namespaces InNamespace joins (not
// mnt or user: a multi-threaded process cannot join those).
var nsFlags = map[string]int{"uts": unix.CLONE_NEWUTS, "ipc": unix.CLONE_NEWIPC, "net": unix.CLONE_NEWNET}

// InNamespace runs f on an OS thread of its own that has joined pid's
// namespace of kind; the thread ends with f (it is never handed back to
// the Go scheduler in that namespace).
func InNamespace(pid int, kind string, f func() error) error {
	flag, ok := nsFlags[kind]
	if !ok {
		return fmt.Errorf("joining a %s namespace: not supported", kind)
	}
	name := Path(pid, "ns/"+kind)
	nsf, err := os.Open(name)
	if err != nil {
		return err
	}
	defer nsf.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if err := unix.Setns(int(nsf.Fd()), flag); err != nil {
			done <- fmt.Errorf("setns %s: %w", name, err)
			return
		}
		done <- f()
	}()
	return <-done
}

package restorecore

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/compel"
)

// joinFlags are the namespaces --join-ns can put the tree in.
var joinFlags = map[string]uint64{
	"net": unix.CLONE_NEWNET, "uts": unix.CLONE_NEWUTS, "ipc": unix.CLONE_NEWIPC,
	"pid": unix.CLONE_NEWPID, "mnt": unix.CLONE_NEWNS, "cgroup": unix.CLONE_NEWCGROUP, "time": unix.CLONE_NEWTIME,
}

// checkJoin refuses --join-ns kinds ferry does not join, and joining a
// namespace the images make new.
func (r *restorer) checkJoin() error {
	inv := r.is.inv
	for kind := range r.opts.JoinNs {
		if _, ok := joinFlags[kind]; !ok {
			return fmt.Errorf("%w: --join-ns %s: want net, uts, ipc, pid, mnt, cgroup or time", ErrValidation, kind)
		}
		if own := map[string]bool{"pid": inv.PidNs, "net": inv.NetNs != nil, "uts": inv.UtsNs != nil,
			"ipc": inv.IpcNs, "mnt": inv.MntNs != nil}[kind]; own {
			return fmt.Errorf("%w: --join-ns %s: the images hold a %s namespace of the tree's own, which the restore makes", ErrValidation, kind, kind)
		}
	}
	return nil
}

// joinNamespaces puts the seed, and so every process cloned from it, in
// the namespaces --join-ns names (setns inside the seed; for a PID
// namespace, its children's).
func (r *restorer) joinNamespaces(seed *compel.Task) error {
	for kind, path := range r.opts.JoinNs {
		addr := stackScratch(seed)
		if err := compel.WriteMem(seed.Tid, []compel.Segment{{Addr: addr, Local: append([]byte(path), 0)}}); err != nil {
			return err
		}
		fd, err := seed.Syscall(unix.SYS_OPENAT, ^uint64(99), addr, // AT_FDCWD (-100)
			unix.O_RDONLY|unix.O_CLOEXEC)
		if err != nil {
			return fmt.Errorf("--join-ns %s:%s: %w", kind, path, err)
		}
		_, err = seed.Syscall(unix.SYS_SETNS, fd, joinFlags[kind])
		seed.Syscall(unix.SYS_CLOSE, fd)
		if err != nil {
			return fmt.Errorf("--join-ns %s:%s: setns: %w", kind, path, err)
		}
		r.log.Info("joined a namespace", "kind", kind, "path", path)
	}
	return nil
}

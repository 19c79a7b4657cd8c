package restorecore

import (
	"fmt"
	"os"

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
	// Namespaces left out of the images: the caller gives each with
	// --inherit-fd, and the seed joins it through ferry's descriptor.
	for _, e := range inv.ExternalNs {
		fd, ok := r.opts.InheritFds[e.Key]
		if !ok {
			return fmt.Errorf("%w: the images leave the %s namespace out (key %q): give one with --inherit-fd fd[N]:%s", ErrValidation, e.Kind, e.Key, e.Key)
		}
		if r.opts.JoinNs == nil {
			r.opts.JoinNs = map[string]string{}
		}
		r.opts.JoinNs[e.Kind] = fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), fd)
	}
	for kind := range r.opts.JoinNs {
		if _, ok := joinFlags[kind]; !ok {
			return fmt.Errorf("%w: --join-ns %s: want net, uts, ipc, pid, mnt, cgroup or time", ErrValidation, kind)
		}
		if own := map[string]bool{"pid": inv.PidNs, "net": inv.NetNs != nil, "uts": inv.UtsNs != nil,
			"ipc": inv.IpcNs, "mnt": inv.MntNs != nil, "time": inv.TimeNs != nil, "cgroup": inv.CgroupNs}[kind]; own {
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

// makeTimeNs gives the seed's children a new time namespace with the
// images' clock offsets (unshare inside the seed: its children enter it;
// the offsets are written before any of them exists).
func (r *restorer) makeTimeNs(seed *compel.Task) error {
	if r.is.inv.TimeNs == nil || r.is.inv.UserNs != nil { // made in it (makeUserNs)
		return nil
	}
	if _, err := seed.Syscall(unix.SYS_UNSHARE, unix.CLONE_NEWTIME); err != nil {
		return fmt.Errorf("time namespace: unshare: %w", err)
	}
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/timens_offsets", seed.Tid), []byte(r.timeOffsets()), 0); err != nil {
		return fmt.Errorf("time namespace: offsets: %w", err)
	}
	return nil
}

// timeOffsets is what timens_offsets of the tree's new time namespace
// gets.
func (r *restorer) timeOffsets() string {
	tn := r.is.inv.TimeNs
	// Moved by how far this host's clocks are from the dumping host's
	// at the dump: the tree's clocks go on from where they were.
	shift := func(sec, nsec, hostThen int64, id int32) (int64, int64) {
		if hostThen == 0 {
			return sec, nsec
		}
		var ts unix.Timespec
		unix.ClockGettime(id, &ts)
		ns := sec*1e9 + nsec + hostThen - ts.Nano()
		s, n := ns/1e9, ns%1e9
		if n < 0 {
			s, n = s-1, n+1e9
		}
		return s, n
	}
	ms, mn := shift(tn.MonotonicSec, tn.MonotonicNsec, tn.HostMonotonicNs, unix.CLOCK_MONOTONIC)
	bs, bn := shift(tn.BoottimeSec, tn.BoottimeNsec, tn.HostBoottimeNs, unix.CLOCK_BOOTTIME)
	return fmt.Sprintf("monotonic %d %d\nboottime %d %d\n", ms, mn, bs, bn)
}

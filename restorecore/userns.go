package restorecore

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/ptrace"
)

// A tree with a user namespace of its own gets a new one with the same
// ID maps, and its other namespaces of its own are made from inside it,
// so that they belong to it as the originals did (the tree's root can
// mount in its mount namespace, configure its network, name its host).
//
// The processes themselves are made, and take their files, as ferry's
// root: a process in a child user namespace could no longer take
// descriptors from ferry (pidfd_getfd needs ptrace rights over ferry) nor
// choose PIDs in a PID namespace that user namespace does not own. So a
// holder, cloned from the seed into the new user namespace, makes the
// namespaces (unshare inside it: it has every capability there), the
// seed joins them (its children, the tree, are born in them), and each
// process enters the user namespace itself late in its build: after its
// files, before its threads (setns to a user namespace wants a process
// of one thread), then takes its credentials as the namespace numbers
// them.

// makeUserNs makes the tree's user namespace and, from inside it, the
// tree's other namespaces of its own, and puts the seed in those (the
// PID and time namespaces for its children). It records in r.nsMade the
// namespaces the root's clone must no longer make, and keeps the user
// namespace open in r.userNs for the processes to enter.
func (r *restorer) makeUserNs(seed *compel.Task) error {
	un := r.is.inv.UserNs
	holder, _, err := remoteCloneIn(seed, stackScratch(seed), unix.CLONE_NEWUSER, 0, 0)
	if err != nil {
		return fmt.Errorf("user namespace: %w", err)
	}
	r.cleanup = append(r.cleanup, func() {
		unix.Kill(holder, unix.SIGKILL)
		for {
			if st, err := ptrace.Wait(holder); err != nil || st.Exited() {
				return
			}
		}
	})
	if un.SetgroupsDenied {
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/setgroups", holder), []byte("deny"), 0); err != nil {
			return fmt.Errorf("user namespace: setgroups: %w", err)
		}
	}
	for _, m := range []struct {
		file string
		maps []*pb.IdMap
	}{{"uid_map", un.UidMap}, {"gid_map", un.GidMap}} {
		if len(m.maps) == 0 {
			continue
		}
		var b strings.Builder
		for _, e := range m.maps {
			fmt.Fprintf(&b, "%d %d %d\n", e.Inner, e.Outer, e.Count)
		}
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/%s", holder, m.file), []byte(b.String()), 0); err != nil {
			return fmt.Errorf("user namespace: %s %q: %w", m.file, b.String(), err)
		}
	}
	regs, err := ptrace.GetRegs(holder)
	if err != nil {
		return err
	}
	h := &compel.Task{Tid: holder, Regs: regs, Gadget: seedGadget, Int3: true}
	inv := r.is.inv
	var flags uint64
	var join []string // the holder's namespace files the seed joins
	for _, k := range []struct {
		own  bool
		flag uint64
		file string
	}{
		{inv.MntNs != nil, unix.CLONE_NEWNS, "mnt"},
		{inv.UtsNs != nil, unix.CLONE_NEWUTS, "uts"},
		{inv.IpcNs, unix.CLONE_NEWIPC, "ipc"},
		{inv.NetNs != nil, unix.CLONE_NEWNET, "net"},
		{inv.CgroupNs, unix.CLONE_NEWCGROUP, "cgroup"},
		{inv.TimeNs != nil, unix.CLONE_NEWTIME, "time_for_children"},
		// Not the PID namespace: one with no process yet cannot be
		// joined (its pid_for_children does not open before it has an
		// init), and its init must be the seed's child. The seed makes
		// it (createTree), and so the initial user namespace owns it.
	} {
		if k.own {
			flags |= k.flag
			join = append(join, k.file)
		}
	}
	if flags != 0 {
		if _, err := h.Syscall(unix.SYS_UNSHARE, flags); err != nil {
			return fmt.Errorf("user namespace: unshare %#x in it: %w", flags, err)
		}
	}
	if inv.TimeNs != nil {
		// Before anything is in the time namespace.
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/timens_offsets", holder), []byte(r.timeOffsets()), 0); err != nil {
			return fmt.Errorf("time namespace: offsets: %w", err)
		}
	}
	for _, name := range append(join, "user") {
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", holder, name))
		if err != nil {
			return fmt.Errorf("user namespace: %w", err)
		}
		if name == "user" {
			r.userNs = f // ferry's, for each process to take (enterUserNs)
			r.cleanup = append(r.cleanup, func() { f.Close() })
			break
		}
		err = setnsIn(seed, f)
		f.Close()
		if err != nil {
			return fmt.Errorf("user namespace: join the %s namespace made in it: %w", name, err)
		}
	}
	r.nsMade = flags
	r.log.Info("made a user namespace", "holder", holder, "namespaces", join)
	return nil
}

// setnsIn makes t join the namespace ferry has open as f (setns with
// the nstype 0: whatever f is).
func setnsIn(t *compel.Task, f *os.File) error {
	pidfd, err := t.Syscall(unix.SYS_PIDFD_OPEN, uint64(os.Getpid()), 0)
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	defer t.Syscall(unix.SYS_CLOSE, pidfd)
	fd, err := t.Syscall(unix.SYS_PIDFD_GETFD, pidfd, uint64(f.Fd()), 0)
	if err != nil {
		return fmt.Errorf("pidfd_getfd: %w", err)
	}
	defer t.Syscall(unix.SYS_CLOSE, fd)
	if _, err := t.Syscall(unix.SYS_SETNS, fd, 0); err != nil {
		return fmt.Errorf("setns: %w", err)
	}
	return nil
}

// enterUserNs puts the process in the tree's user namespace, where it
// has every capability until its credentials are set (restoreCreds).
func (b *builder) enterUserNs() error {
	if b.r.userNs == nil {
		return nil
	}
	fd, err := b.take(int(b.r.userNs.Fd()))
	if err != nil {
		return err
	}
	defer b.sys(unix.SYS_CLOSE, fd)
	// The supplementary groups first, as the kernel numbers them: inside,
	// setgroups could name only those the namespace maps, and not at all
	// where it is denied.
	if err := b.setGroups(b.main, b.p.core.Creds.GetGroups()); err != nil {
		return err
	}
	if _, err := b.sys(unix.SYS_SETNS, fd, unix.CLONE_NEWUSER); err != nil {
		return fmt.Errorf("setns: %w", err)
	}
	return nil
}

// inUserNs returns the IDs of creds as the tree's user namespace numbers
// them (the images hold the dumping host's kernel IDs), the uids first;
// ok says whether the namespace maps them. IDs it does not map are only
// the kernel's 0 as ferry's processes start with (a process of a user
// namespace never given maps): those are left as they are, ok false.
func inUserNs(un *pb.UserNs, c *pb.Creds) (ids [8]uint32, ok [2]bool, err error) {
	from := [8]uint32{c.Uid, c.Euid, c.Suid, c.Fsuid, c.Gid, c.Egid, c.Sgid, c.Fsgid}
	for half, maps := range [][]*pb.IdMap{un.UidMap, un.GidMap} {
		mapped, zero := 0, 0
		for i := half * 4; i < half*4+4; i++ {
			id := from[i]
			for _, m := range maps {
				if id >= m.Outer && id-m.Outer < m.Count {
					ids[i] = m.Inner + id - m.Outer
					mapped++
					break
				}
			}
			if id == 0 {
				zero++
			}
		}
		what := [2]string{"uids", "gids"}[half]
		switch {
		case mapped == 4:
			ok[half] = true
		case zero == 4:
		default:
			return ids, ok, fmt.Errorf("%s %v: not all mapped in the tree's user namespace", what, from[half*4:half*4+4])
		}
	}
	return ids, ok, nil
}

package restorecore

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"strconv"
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
// A holder, cloned from the seed into the new user namespace (with
// every capability there), makes them: unshare inside it.
//
// With a PID namespace of its own, the tree is born in the user
// namespace: the holder clones the root (CLONE_PARENT: ferry's child
// still), which is PID 1 of the PID namespace the holder unshared for
// its children (one with no process yet cannot be joined from outside),
// so that namespace belongs to the user namespace too and processes
// inside it can choose their children's and threads' PIDs. Those
// processes cannot take files from ferry with pidfd_getfd (it wants
// ptrace rights over ferry, in its user namespace): ferry hands them
// over a socket instead, at the fd where others have ferry's pidfd
// (ferryChannel, receive).
//
// Without one, the tree is in a PID namespace that the initial user
// namespace owns, where only ferry's side can choose PIDs: the
// processes are made as ferry's root, the seed having joined the
// holder's namespaces, and each process enters the user namespace late
// in its build (enterUserNs): after its files, before its threads (a
// process must have one thread to change user namespace, and so only
// single-threaded processes can be restored this way; the dump refuses
// the others).

// makeUserNs makes the tree's user namespace and, from inside it, the
// tree's other namespaces of its own. Born in it (a PID namespace of
// its own), the root is cloned from r.holder; else the seed joins those
// namespaces (the time namespace for its children) and r.userNs keeps
// the user namespace open for the processes to enter. r.nsMade are the
// namespaces the root's clone must no longer make.
func (r *restorer) makeUserNs(seed *compel.Task) error {
	un := r.is.inv.UserNs
	holder, _, err := remoteCloneIn(seed, stackScratch(seed), unix.CLONE_NEWUSER|unix.CLONE_PARENT, 0, 0)
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
		{inv.PidNs, unix.CLONE_NEWPID, ""},
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
	r.nsMade = flags
	if inv.PidNs {
		r.holder = h
		r.log.Info("made a user namespace for the tree to be born in", "holder", holder, "flags", fmt.Sprintf("%#x", flags))
		return nil
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
	r.log.Info("made a user namespace", "holder", holder, "namespaces", join)
	return nil
}

// ferryChannel returns what the seed gets at seedFerryPidfd
// (seedKeepsFerry): a pidfd of ferry, or, for a tree born in a user
// namespace or restored for a caller (neither may take descriptors from
// ferry), one end of a socket whose other (r.channel) ferry sends files
// through.
func (r *restorer) ferryChannel() (*os.File, error) {
	if (r.is.inv.UserNs == nil || !r.is.inv.PidNs) && r.opts.Caller == nil {
		fd, err := unix.PidfdOpen(os.Getpid(), 0)
		if err != nil {
			return nil, os.NewSyscallError("pidfd_open", err)
		}
		return os.NewFile(uintptr(fd), "ferry-pidfd"), nil
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socketpair", err)
	}
	r.channel = os.NewFile(uintptr(fds[0]), "ferry-channel")
	r.cleanup = append(r.cleanup, func() { r.channel.Close() })
	return os.NewFile(uintptr(fds[1]), "ferry-channel-seed"), nil
}

// receive is take through r.channel: ferry sends h, the process
// receives it (recvmsg, SCM_RIGHTS, close-on-exec) at b.ferryPidfd.
func (b *builder) receive(h int) (uint64, error) {
	if err := unix.Sendmsg(int(b.r.channel.Fd()), []byte{0}, unix.UnixRights(h), nil, 0); err != nil {
		return 0, os.NewSyscallError("sendmsg", err)
	}
	// struct msghdr, its iovec, one byte of data and a cmsg with one fd,
	// at the end of the scratch area.
	const off = scratchSize - 256
	base := b.scratch() + off
	buf := make([]byte, 128)
	le := binary.LittleEndian
	le.PutUint64(buf[16:], base+64) // msg_iov
	le.PutUint64(buf[24:], 1)       // msg_iovlen
	le.PutUint64(buf[32:], base+96) // msg_control
	le.PutUint64(buf[40:], 24)      // msg_controllen: CMSG_SPACE(4)
	le.PutUint64(buf[64:], base+80) // iov_base
	le.PutUint64(buf[72:], 1)       // iov_len
	if _, err := b.put(off, buf); err != nil {
		return 0, err
	}
	if _, err := b.sys(unix.SYS_RECVMSG, b.ferryPidfd, base, unix.MSG_CMSG_CLOEXEC); err != nil {
		return 0, fmt.Errorf("recvmsg on ferry's socket (fd %d): %w", b.ferryPidfd, err)
	}
	cmsg := make([]byte, 24)
	if err := compel.ReadMem(b.pid, []compel.Segment{{Addr: base + 96, Local: cmsg}}); err != nil {
		return 0, err
	}
	if le.Uint64(cmsg[0:]) != 20 || le.Uint32(cmsg[8:]) != unix.SOL_SOCKET || le.Uint32(cmsg[12:]) != unix.SCM_RIGHTS {
		return 0, fmt.Errorf("recvmsg on ferry's socket: no descriptor (cmsg % x)", cmsg)
	}
	return uint64(le.Uint32(cmsg[16:])), nil
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
			id, ok := innerID(maps, from[i])
			if ok {
				ids[i] = id
				mapped++
			}
			if from[i] == 0 {
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

// groupsInUserNs returns groups as the tree's user namespace numbers
// them.
func groupsInUserNs(un *pb.UserNs, groups []uint32) ([]uint32, error) {
	out := make([]uint32, 0, len(groups))
	for _, g := range groups {
		id, ok := innerID(un.GidMap, g)
		if !ok {
			return nil, fmt.Errorf("group %d is not mapped in the tree's user namespace", g)
		}
		out = append(out, id)
	}
	return out, nil
}

// innerID is outer ID id as maps number it inside the namespace; ok is
// false if they do not map it.
func innerID(maps []*pb.IdMap, id uint32) (inner uint32, ok bool) {
	for _, m := range maps {
		if id >= m.Outer && id-m.Outer < m.Count {
			return m.Inner + id - m.Outer, true
		}
	}
	return 0, false
}

// mountData returns a mount's options as the tree's root gives them:
// born in its user namespace, it names owners (tmpfs's and devpts's
// uid= and gid=, which mountinfo shows as the host's kernel IDs) as the
// namespace numbers them.
func (r *restorer) mountData(data string) string {
	un := r.is.inv.UserNs
	if r.holder == nil || data == "" {
		return data
	}
	return mapOptions(data, func(k, v string) string {
		maps := map[string][]*pb.IdMap{"uid": un.UidMap, "gid": un.GidMap}[k]
		if id, err := strconv.ParseUint(v, 10, 32); err == nil && maps != nil {
			if inner, ok := innerID(maps, uint32(id)); ok {
				return strconv.FormatUint(uint64(inner), 10)
			}
		}
		return v
	})
}

// mapOptions returns mount options data with the value of each key=value
// option replaced by f(key, value).
func mapOptions(data string, f func(k, v string) string) string {
	opts := strings.Split(data, ",")
	for i, o := range opts {
		if k, v, ok := strings.Cut(o, "="); ok {
			opts[i] = k + "=" + f(k, v)
		}
	}
	return strings.Join(opts, ",")
}

// inUserNsFs runs f where ferry can make files on the filesystems the
// tree mounted from inside its user namespace: on a thread of its own
// whose filesystem IDs the namespace maps (the kernel refuses to make an
// inode whose owner that filesystem's namespace cannot name), with the
// capabilities that change of IDs takes away given back. The thread
// ends with f. Outside a user namespace it just runs f.
func (r *restorer) inUserNsFs(f func() error) error {
	un := r.is.inv.UserNs
	if r.holder == nil || len(un.UidMap) == 0 || len(un.GidMap) == 0 {
		return f()
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var caps [2]unix.CapUserData
		if err := unix.Capget(&hdr, &caps[0]); err != nil {
			done <- os.NewSyscallError("capget", err)
			return
		}
		unix.Setfsgid(int(un.GidMap[0].Outer))
		unix.Setfsuid(int(un.UidMap[0].Outer))
		if err := unix.Capset(&hdr, &caps[0]); err != nil {
			done <- os.NewSyscallError("capset", err)
			return
		}
		done <- f()
	}()
	return <-done
}

package dumpcore

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
)

// nsKinds are the namespaces a tree may have of its own.
var nsKinds = []string{"pid", "uts", "ipc", "net", "mnt", "user", "cgroup", "time"}

// checkNamespaces compares the tree's namespaces with ferry's. Every
// process must be in the root's. Those of the root that are not ferry's
// are the tree's own, and the dump must save them: a PID namespace whose
// init is the root (pidNamespace), a UTS namespace (utsNamespace), a
// network namespace (netNamespace), an IPC namespace (ipcNamespace), a
// mount namespace (mntNamespace), time and cgroup namespaces, and a user
// namespace (userNamespace).
func (t *tree) checkNamespaces() error {
	t.ownNs = map[string]string{}
	for _, kind := range nsKinds {
		mine, err := os.Readlink("/proc/self/ns/" + kind)
		if err != nil {
			continue // a kernel without it
		}
		ns, err := proc.Namespace(t.root, kind)
		if err != nil {
			return err
		}
		for _, d := range t.procs[1:] {
			if other, err := proc.Namespace(d.opts.Pid, kind); err != nil {
				return err
			} else if other != ns {
				return fmt.Errorf("process %d is in %s, not in the root's %s: %w", d.opts.Pid, other, ns, ErrUnsupported)
			}
		}
		if ns == mine {
			continue
		}
		if ext, ok := t.opts.ExternalNs[kind]; ok {
			if ns != fmt.Sprintf("%s:[%d]", kind, ext.Ino) {
				return fmt.Errorf("--external %s[%d]: the tree's %s namespace is %s", kind, ext.Ino, kind, ns)
			}
			t.extNs = append(t.extNs, &pb.ExternalNs{Kind: kind, Key: ext.Key})
			continue // left out: the restore joins the caller's
		}
		switch kind {
		case "pid", "uts", "net", "ipc", "mnt", "time", "cgroup", "user":
			t.ownNs[kind] = ns
		default:
			return fmt.Errorf("process %d has a %s namespace of its own (%s), which ferry does not save yet: %w", t.root, kind, ns, ErrUnsupported)
		}
	}
	return nil
}

// checkNamespaceHolders refuses a namespace of the tree's own that a
// process outside the tree is in too (one joined with nsenter or docker
// exec, a pod's other containers): the restore would make it new, for
// the tree alone. The root's ancestors may share all but the PID
// namespace (unshare(1) makes them and forks the root). A user namespace
// may be shared (rootless podman's pause process holds the one of its
// containers): it is nothing but ID maps, which a new one has the same.
func (t *tree) checkNamespaceHolders() error {
	if len(t.ownNs) == 0 {
		return nil
	}
	in := map[int]bool{}
	for _, d := range t.procs {
		in[d.opts.Pid] = true
	}
	for _, z := range t.zombies {
		in[z.Pid] = true
	}
	ancestor := map[int]bool{}
	for pid := t.root; pid > 1; {
		st, err := proc.ReadStat(pid)
		if err != nil {
			break
		}
		pid = st.Ppid
		ancestor[pid] = true
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || in[pid] {
			continue
		}
		for kind, ns := range t.ownNs {
			if kind == "user" || kind != "pid" && ancestor[pid] {
				continue
			}
			if other, err := proc.Namespace(pid, kind); err == nil && other == ns {
				return fmt.Errorf("process %d, outside the tree of %d, is in its %s namespace (%s) too: %w",
					pid, t.root, kind, ns, ErrUnsupported)
			}
		}
	}
	return nil
}

// userNamespace reads the ID maps of the tree's user namespace, if it
// has one of its own. The restore makes the tree's other namespaces of
// its own from inside the new one, so each of them must belong to it (a
// namespace made before the user namespace, which its parent owns, is
// refused by name), and so must the PID namespace the tree is in.
func (t *tree) userNamespace() (*pb.UserNs, error) {
	user := t.ownNs["user"]
	if user == "" {
		return nil, nil
	}
	for kind := range t.ownNs {
		if kind == "user" {
			continue
		}
		owner, err := proc.NamespaceOwner(t.root, kind)
		if err != nil {
			return nil, err
		}
		if owner != user {
			return nil, fmt.Errorf("the %s namespace of %d belongs to %s, not to the tree's %s (made before it): %w",
				kind, t.root, owner, user, ErrUnsupported)
		}
	}
	if t.ownNs["pid"] == "" {
		// Threads are made in the user namespace, with their TIDs,
		// which only a PID namespace it owns lets it choose.
		for _, d := range t.procs {
			if len(d.threads) > 1 {
				return nil, fmt.Errorf("process %d has %d threads in a user namespace of the tree's own (%s) but no PID namespace of its own: %w",
					d.opts.Pid, len(d.threads), user, ErrUnsupported)
			}
		}
	}
	out := &pb.UserNs{}
	for _, f := range []struct {
		file string
		to   *[]*pb.IdMap
	}{{"uid_map", &out.UidMap}, {"gid_map", &out.GidMap}} {
		maps, err := proc.ReadIDMap(t.root, f.file)
		if err != nil {
			return nil, err
		}
		for _, m := range maps {
			*f.to = append(*f.to, &pb.IdMap{Inner: m.Inner, Outer: m.Outer, Count: m.Count})
		}
	}
	b, err := os.ReadFile(proc.Path(t.root, "setgroups"))
	if err != nil {
		return nil, err
	}
	out.SetgroupsDenied = strings.TrimSpace(string(b)) == "deny"
	return out, nil
}

// utsNamespace reads the names of the tree's UTS namespace, if it has
// one of its own.
func (t *tree) utsNamespace() (*pb.UtsNs, error) {
	if t.ownNs["uts"] == "" {
		return nil, nil
	}
	var u unix.Utsname
	if err := proc.InNamespace(t.root, "uts", func() error { return unix.Uname(&u) }); err != nil {
		return nil, err
	}
	return &pb.UtsNs{Hostname: unix.ByteSliceToString(u.Nodename[:]), Domainname: unix.ByteSliceToString(u.Domainname[:])}, nil
}

// timeNamespace reads the clock offsets of the tree's time namespace, if
// it has one of its own.
func (t *tree) timeNamespace() (*pb.TimeNs, error) {
	if t.ownNs["time"] == "" {
		return nil, nil
	}
	name := proc.Path(t.root, "timens_offsets")
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	out := &pb.TimeNs{HostMonotonicNs: clockNs(unix.CLOCK_MONOTONIC), HostBoottimeNs: clockNs(unix.CLOCK_BOOTTIME)}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var clock string
		var sec, nsec int64
		if _, err := fmt.Sscan(line, &clock, &sec, &nsec); err != nil {
			return nil, fmt.Errorf("%s: %q: %w", name, line, err)
		}
		switch clock {
		case "monotonic":
			out.MonotonicSec, out.MonotonicNsec = sec, nsec
		case "boottime":
			out.BoottimeSec, out.BoottimeNsec = sec, nsec
		}
	}
	return out, nil
}

// clockNs reads clock id (in ferry's time namespace, the host's).
func clockNs(id int32) int64 {
	var ts unix.Timespec
	unix.ClockGettime(id, &ts)
	return ts.Nano()
}

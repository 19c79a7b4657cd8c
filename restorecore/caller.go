package restorecore

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
)

// A restore for a caller that is not root (Options.Caller, a client of
// ferry's RPC service) restores only the caller's own processes, and
// with the caller's rights: the images, which the caller wrote, are
// refused if their processes are not the caller's (IDs, groups, no
// capabilities) or if they would have ferry make anything as root on
// their say-so (namespaces, deleted files' stand-ins, SysV segments,
// cgroups: left alone). The seed, and so every process cloned from it,
// runs as the caller with CAP_CHECKPOINT_RESTORE (to choose PIDs and its
// memory map) and CAP_SETPCAP (to shrink its bounding set) added; each
// file is opened with the caller's permissions; ferry's own descriptors
// come over a socket (ferryChannel), which needs no ptrace rights over
// ferry; and the restore drops those two capabilities with the rest at
// the end (restoreCreds).

// checkCaller refuses images the caller may not restore.
func (is *imageSet) checkCaller(c *proc.Caller) error {
	inv := is.inv
	for _, ns := range []struct {
		own  bool
		name string
	}{{inv.PidNs, "PID"}, {inv.UserNs != nil, "user"}, {inv.NetNs != nil, "network"}, {inv.MntNs != nil, "mount"},
		{inv.IpcNs, "IPC"}, {inv.UtsNs != nil, "UTS"}, {inv.TimeNs != nil, "time"}, {inv.CgroupNs, "cgroup"},
		{len(inv.ExternalNs) > 0, "external"}} {
		if ns.own {
			return refuse("the images hold a %s namespace, which a caller that is not root (uid %d) may not restore", ns.name, c.Uid)
		}
	}
	if inv.NetworkLock != "" {
		return refuse("the images hold a network lock, which a caller that is not root (uid %d) may not remove", c.Uid)
	}
	if inv.ParentDir != "" {
		return refuse("the images have a parent (%s), which a caller that is not root may not name", inv.ParentDir)
	}
	for _, p := range is.procs {
		pid, cr := p.pstree.Pid, p.core.Creds
		if p.zombie {
			continue
		}
		if cr == nil {
			return refuse("process %d: no credentials in the images", pid)
		}
		for _, id := range []uint32{cr.Uid, cr.Euid, cr.Suid, cr.Fsuid} {
			if id != c.Uid {
				return refuse("process %d runs as uid %d in the images, not as the caller's %d", pid, id, c.Uid)
			}
		}
		for _, id := range []uint32{cr.Gid, cr.Egid, cr.Sgid, cr.Fsgid} {
			if id != c.Gid {
				return refuse("process %d runs as gid %d in the images, not as the caller's %d", pid, id, c.Gid)
			}
		}
		if !slices.Equal(slices.Sorted(slices.Values(cr.Groups)), slices.Sorted(slices.Values(c.Groups))) {
			return refuse("process %d has groups %v in the images, not the caller's %v", pid, cr.Groups, c.Groups)
		}
		if cr.CapPrm|cr.CapEff|cr.CapInh|cr.CapAmb != 0 {
			return refuse("process %d has capabilities in the images (permitted %#x), which a caller that is not root may not restore", pid, cr.CapPrm)
		}
		if int(p.core.OomScoreAdj) < c.OomScoreAdj {
			return refuse("process %d has oom_score_adj %d in the images, below the caller's %d", pid, p.core.OomScoreAdj, c.OomScoreAdj)
		}
		for _, v := range p.mm.GetVmas() {
			if v.Sysv {
				return refuse("process %d attaches a SysV shared memory segment, which a caller that is not root may not restore", pid)
			}
		}
		// /proc/PID/exe, set with CAP_CHECKPOINT_RESTORE: not a program
		// that runs with more rights than its caller's.
		if exe, ok := is.files[p.mm.GetExeFileId()]; ok {
			var st unix.Stat_t
			if err := unix.Stat(exe.Path, &st); err == nil && st.Mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
				return refuse("process %d runs %s, a set-ID program, which a caller that is not root may not restore", pid, exe.Path)
			}
			if _, err := unix.Getxattr(exe.Path, "security.capability", nil); err == nil {
				return refuse("process %d runs %s, a program with file capabilities, which a caller that is not root may not restore", pid, exe.Path)
			}
		}
	}
	for _, f := range is.files {
		if f.Ghost || f.FifoDeleted || f.DirDeleted || f.SymlinkDeleted || f.LinkRemap {
			return refuse("%s (deleted) would be made again by ferry, which a caller that is not root may not have done", f.Path)
		}
		if f.Type == "fifo" || f.Type == "userfaultfd" {
			// A FIFO's data is written from ferry's side; a userfaultfd's
			// features are asked for from ferry's side.
			return refuse("%s (%s): a caller that is not root may not have ferry restore it", f.Path, f.Type)
		}
		if u := f.Unix; u != nil && len(u.Queue) > 0 {
			// Refilled from ferry's side, with its credentials.
			return refuse("unix socket %s has messages queued, which a caller that is not root may not have ferry send", f.Path)
		}
	}
	return nil
}

// seedAsCaller puts the seed, and so the tree, in the caller's context
// before anything is cloned from it: its cgroups, no higher limits than
// its, no lower OOM score adjustment, its loginuid (written with
// CAP_AUDIT_CONTROL, which the seed then drops) and its no_new_privs.
func (r *restorer) seedAsCaller(seed *compel.Task) error {
	c := r.opts.Caller
	if c == nil {
		return nil
	}
	refs, err := cgroups.Parse(c.Cgroups)
	if err != nil {
		return err
	}
	mounts, err := r.cgroupMounts()
	if err != nil {
		return err
	}
	for _, ref := range refs {
		if mnt, ok := mounts[ref.Controllers]; ok {
			if err := cgroups.Move(filepath.Join(mnt, filepath.Clean("/"+ref.Path)), seed.Tid); err != nil {
				return fmt.Errorf("the caller's cgroups: %w", err)
			}
		}
	}
	mine, err := proc.ReadLimits(seed.Tid)
	if err != nil {
		return err
	}
	addr := stackScratch(seed)
	for _, l := range c.Limits {
		i := slices.IndexFunc(mine, func(m proc.Rlimit) bool { return m.Resource == l.Resource })
		if i < 0 || l.Cur >= mine[i].Cur && l.Max >= mine[i].Max {
			continue
		}
		lim := binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, min(l.Cur, mine[i].Cur)), min(l.Max, mine[i].Max))
		if err := compel.WriteMem(seed.Tid, []compel.Segment{{Addr: addr, Local: lim}}); err != nil {
			return err
		}
		if _, err := seed.Syscall(unix.SYS_PRLIMIT64, 0, uint64(l.Resource), addr, 0); err != nil {
			return fmt.Errorf("the caller's limit %d: %w", l.Resource, err)
		}
	}
	oom := fmt.Sprintf("/proc/%d/oom_score_adj", seed.Tid)
	if b, err := os.ReadFile(oom); err == nil {
		if v, _ := strconv.Atoi(strings.TrimSpace(string(b))); v < c.OomScoreAdj {
			if err := os.WriteFile(oom, []byte(strconv.Itoa(c.OomScoreAdj)), 0); err != nil {
				return fmt.Errorf("the caller's oom_score_adj: %w", err)
			}
		}
	}
	if c.Loginuid != ^uint32(0) {
		path, val := append([]byte("/proc/self/loginuid"), 0), []byte(strconv.FormatUint(uint64(c.Loginuid), 10))
		if err := compel.WriteMem(seed.Tid, []compel.Segment{{Addr: addr, Local: path}, {Addr: addr + 64, Local: val}}); err != nil {
			return err
		}
		fd, err := seed.Syscall(unix.SYS_OPENAT, atFdcwd, addr, unix.O_WRONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			_, err = seed.Syscall(unix.SYS_WRITE, fd, addr+64, uint64(len(val)))
			seed.Syscall(unix.SYS_CLOSE, fd)
		}
		if err != nil {
			return fmt.Errorf("the caller's loginuid %d: %w", c.Loginuid, err)
		}
	}
	// CAP_AUDIT_CONTROL goes (with its ambient bit).
	keep := uint64(1)<<unix.CAP_CHECKPOINT_RESTORE | 1<<unix.CAP_SETPCAP
	if err := compel.WriteMem(seed.Tid, []compel.Segment{{Addr: addr, Local: capData(keep, keep, keep)}}); err != nil {
		return err
	}
	if _, err := seed.Syscall(unix.SYS_CAPSET, addr, addr+8); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	if c.NoNewPrivs {
		if _, err := seed.Syscall(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("no_new_privs: %w", err)
		}
	}
	return nil
}

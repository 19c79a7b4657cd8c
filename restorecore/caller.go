package restorecore

import (
	"slices"

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
	}
	for _, f := range is.files {
		if f.Ghost || f.FifoDeleted || f.DirDeleted || f.SymlinkDeleted {
			return refuse("%s (deleted) would be made again by ferry, which a caller that is not root may not have done", f.Path)
		}
	}
	return nil
}

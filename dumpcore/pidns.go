package dumpcore

import (
	"fmt"

	"github.com/ferrycr/ferry/internal/proc"
)

// A tree whose root is the init of a PID namespace of its own (a
// container's init, `unshare --pid --fork`) is saved with the PIDs it sees
// itself: every PID in the images is one of that namespace, and the
// restore makes a new PID namespace with the root as its init again. The
// dump works with ferry's PIDs throughout and translates them as the
// images are written (translatePids).

// pidNamespace finds whether the tree is in a PID namespace other than
// ferry's and, if so, maps each of its processes and threads to its PID
// there (t.vpids). The root must be that namespace's init, and every
// process of the tree must be in it.
//
// With --external pid[INODE]:KEY the tree is in a PID namespace that is
// not its own to save (a pod's, which its containers join): its PIDs are
// translated the same, and the restore makes the tree inside the one its
// caller gives for KEY; the root is not that namespace's init.
func (t *tree) pidNamespace() error {
	ns := t.ownNs["pid"]
	if _, ok := t.opts.ExternalNs["pid"]; ok && ns == "" {
		var err error
		if ns, err = proc.Namespace(t.root, "pid"); err != nil {
			return err
		}
		t.pidNsExternal = true
	}
	if ns == "" {
		return nil
	}
	// Each task's PID there, and each process's group and session there
	// (NSpid, NSpgid, NSsid: the last is the innermost; they name a dead
	// leader too), from its status.
	status := func(pid, tid int) (proc.Status, error) {
		st, err := proc.ReadThreadStatus(pid, tid)
		if err == nil && (len(st.NSpid) < 2 || len(st.NSpgid) != len(st.NSpid) || len(st.NSsid) != len(st.NSpid)) {
			err = fmt.Errorf("the status of thread %d of %d shows no PID namespace of its own", tid, pid)
		}
		return st, err
	}
	inner := func(ids []int) int { return ids[len(ids)-1] }
	rst, err := status(t.root, t.root)
	if err != nil {
		return err
	}
	if v := inner(rst.NSpid); v != 1 && !t.pidNsExternal {
		return fmt.Errorf("process %d is PID %d of %s, not its init: %w (dump the namespace's init)", t.root, v, ns, ErrUnsupported)
	} else if v == 1 && t.pidNsExternal {
		return fmt.Errorf("--external pid: process %d is the init of %s, which a restore cannot join as its init: %w", t.root, ns, ErrUnsupported)
	}
	if t.opts.FlagsBeforeFreeze && t.opts.LeaveRunning {
		return fmt.Errorf("process %d is the init of %s, which background snapshots do not take yet: %w",
			t.root, ns, ErrUnsupported)
	}
	t.vpids, t.vgroups, t.vpgids = map[int]int{}, map[int][2]int32{}, map[int]int32{}
	process := func(pid int) error {
		st, err := status(pid, pid)
		if err != nil {
			return err
		}
		t.vpids[pid] = inner(st.NSpid)
		t.vgroups[pid] = [2]int32{int32(inner(st.NSpgid)), int32(inner(st.NSsid))}
		// Groups named by ferry's PIDs elsewhere (a terminal's
		// foreground group, an fd's owner) map through the members'.
		t.vpgids[st.NSpgid[0]] = int32(inner(st.NSpgid))
		return nil
	}
	for _, d := range t.procs {
		pid := d.opts.Pid
		if err := process(pid); err != nil {
			return err
		}
		for _, th := range d.threads {
			if th.tid == pid {
				continue
			}
			st, err := status(pid, th.tid)
			if err != nil {
				return err
			}
			t.vpids[th.tid] = inner(st.NSpid)
		}
	}
	for _, z := range t.zombies {
		if err := process(z.Pid); err != nil {
			return fmt.Errorf("zombie %d: %w", z.Pid, err)
		}
	}
	if t.pidNsExternal {
		t.log.Info("the tree is in an external PID namespace", "ns", ns, "root", t.root, "pid there", t.vpids[t.root])
		return nil
	}
	t.log.Info("the tree has a PID namespace of its own", "ns", ns, "init", t.root)
	return nil
}

// imagePid is the PID the images give pid: its own in a PID namespace of
// its own (the innermost of /proc/PID/status NSpid), else pid.
func imagePid(pid int) int {
	st, err := proc.ReadStatus(pid)
	if err != nil || len(st.NSpid) == 0 {
		return pid
	}
	return st.NSpid[len(st.NSpid)-1]
}

// vpid is pid as the tree sees it: itself without a PID namespace of the
// tree's, else its PID there (0 for a process outside it).
func (t *tree) vpid(pid int) int32 {
	if t.vpids == nil {
		return int32(pid)
	}
	return int32(t.vpids[pid])
}

// translatePids rewrites the PIDs of the images, and of the zombies, as
// the tree sees them (vpid).
func (t *tree) translatePids(imgs []*imageSet) {
	if t.vpids == nil {
		return
	}
	v := func(p *int32) {
		if *p > 0 {
			*p = t.vpid(int(*p))
		}
	}
	imgs[0].inv.PidNs = !t.pidNsExternal
	v(&imgs[0].inv.RootPid)
	for _, img := range imgs {
		ps := img.pstree
		g := t.vgroups[int(ps.Pid)]
		for _, p := range []*int32{&ps.Pid, &ps.Ppid} {
			v(p)
		}
		ps.Pgid, ps.Sid = g[0], g[1]
		for i := range ps.Threads {
			v(&ps.Threads[i])
		}
		c := img.core
		for _, p := range []*int32{&c.Pid, &c.FilesSharedWith, &c.FsSharedWith} {
			v(p)
		}
		if c.CttyFg > 0 {
			c.CttyFg = t.vpgids[int(c.CttyFg)]
		}
		for _, th := range c.Threads {
			v(&th.Tid)
		}
		for _, tm := range c.PosixTimers {
			v(&tm.NotifyTid)
		}
		v(&img.mm.Pid)
		v(&img.fds.Pid)
	}
	const ownerPgrp = 2 // F_OWNER_PGRP
	for _, f := range t.files.entries {
		v(&f.PidfdPid)
		if f.OwnerType == ownerPgrp && f.OwnerPid > 0 {
			f.OwnerPid = t.vpgids[int(f.OwnerPid)]
		} else {
			v(&f.OwnerPid)
		}
		if f.Tty != nil && f.Tty.FgPgrp > 0 {
			f.Tty.FgPgrp = t.vpgids[int(f.Tty.FgPgrp)]
		}
	}
	for i := range t.zombies {
		z := &t.zombies[i]
		g := t.vgroups[z.Pid]
		z.Pid, z.Ppid = int(t.vpid(z.Pid)), int(t.vpid(z.Ppid))
		z.Pgid, z.Sid = int(g[0]), int(g[1])
	}
}

package restorecore

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/compel"
)

// Cgroup modes (--manage-cgroups), as criu(8) names them.
const (
	CgroupsIgnore = "ignore" // leave the processes where ferry is
	CgroupsNone   = "none"   // move them; the cgroups must exist
	CgroupsProps  = "props"  // move them; the cgroups must exist; set the properties
	CgroupsSoft   = "soft"   // make missing cgroups, with their properties (the default)
	CgroupsFull   = "full"   // make missing cgroups; set every cgroup's properties
	CgroupsStrict = "strict" // as full, and a property that cannot be set fails the restore
)

// cgroupPath is where the images' cgroup path goes here: under the
// --cgroup-root given for its controllers (or for all), else unchanged.
func (r *restorer) cgroupPath(controllers, path string) string {
	for _, c := range strings.Split(controllers, ",") {
		if root, ok := r.opts.CgroupRoot[c]; ok {
			return filepath.Join(root, path)
		}
	}
	if root, ok := r.opts.CgroupRoot[""]; ok {
		return filepath.Join(root, path)
	}
	return path
}

// placeCgroups puts every live process of the tree into its cgroups, as
// the mode says, before any of them is built (the memory they are given
// is then charged where it was). Cgroups it made go again if the restore
// fails. Hierarchies not mounted here are skipped.
func (r *restorer) placeCgroups(tasks map[int32]*compel.Task) error {
	mode := r.opts.ManageCgroups
	if mode == "" {
		mode = CgroupsSoft
	}
	if mode == CgroupsIgnore || len(r.is.inv.CgroupDirs) == 0 || r.opts.Caller != nil {
		return nil // a caller's processes stay in its cgroups (seedAsCaller)
	}
	switch mode {
	case CgroupsNone, CgroupsProps, CgroupsSoft, CgroupsFull, CgroupsStrict:
	default:
		return fmt.Errorf("%w: --manage-cgroups %q: want none, props, soft, full, strict or ignore", ErrValidation, mode)
	}
	mounts, err := r.cgroupMounts()
	if err != nil {
		return err
	}
	dirs := map[[2]string][]cgroups.Prop{}
	for _, d := range r.is.inv.CgroupDirs {
		var ps []cgroups.Prop
		for _, p := range d.Props {
			ps = append(ps, cgroups.Prop{Name: p.Name, Value: p.Value})
		}
		dirs[[2]string{d.Controllers, d.Path}] = ps
	}
	ready := map[string]bool{}
	for _, p := range r.is.procs {
		t := tasks[p.pstree.Pid]
		if p.zombie || t == nil {
			continue
		}
		// Where it is now (ferry's cgroups, inherited): writing
		// cgroup.procs costs a few milliseconds per v1 hierarchy even
		// when nothing moves.
		now := map[string]string{}
		if refs, err := cgroups.Read(t.Tid); err == nil {
			for _, ref := range refs {
				now[ref.Controllers] = filepath.Clean("/" + ref.Path)
			}
		}
		for _, ref := range p.core.Cgroups {
			mnt, ok := mounts[ref.Controllers]
			if !ok {
				r.log.Debug("cgroup hierarchy not mounted here", "controllers", ref.Controllers, "path", ref.Path)
				continue
			}
			// Cleaned as an absolute path, it stays below the mount
			// whatever the image says.
			rel := filepath.Clean("/" + r.cgroupPath(ref.Controllers, ref.Path))
			dir := filepath.Join(mnt, rel)
			if !ready[dir] {
				if err := r.makeCgroup(mode, dir, ref.Controllers, dirs[[2]string{ref.Controllers, ref.Path}]); err != nil {
					return err
				}
				ready[dir] = true
			}
			if cur, ok := now[ref.Controllers]; ok && cur == rel {
				continue
			}
			if err := cgroups.Move(dir, t.Tid); err != nil {
				return fmt.Errorf("process %d: %w", p.pstree.Pid, err)
			}
		}
	}
	return nil
}

// makeCgroup makes (or finds) cgroup dir and sets its properties as mode
// says.
func (r *restorer) makeCgroup(mode, dir, controllers string, props []cgroups.Prop) error {
	var made []string
	switch mode {
	case CgroupsNone, CgroupsProps:
		if _, err := os.Stat(dir); err != nil {
			return fmt.Errorf("%w: cgroup %s is not there (--manage-cgroups %s does not make cgroups)", ErrValidation, dir, mode)
		}
	default:
		var err error
		made, err = cgroups.Ensure(dir, controllers)
		if len(made) > 0 {
			r.cleanup = append(r.cleanup, func() {
				if r.cgroupsKept {
					return
				}
				for i := len(made) - 1; i >= 0; i-- {
					os.Remove(made[i]) // empty again once the tree is gone
				}
			})
		}
		if err != nil {
			return err
		}
	}
	created := len(made) > 0
	if mode == CgroupsNone || mode == CgroupsSoft && !created {
		return nil
	}
	if err := cgroups.SetProps(dir, props); err != nil {
		if mode == CgroupsStrict {
			return err
		}
		r.log.Warn("cgroup property not set", "err", err)
	}
	return nil
}

// seedCgroupNsRoots puts the seed in the roots of the tree's cgroup
// namespace (made if missing), so that the root, cloned from it with
// CLONE_NEWCGROUP, gets a namespace rooted there as the tree had;
// placeCgroups then moves every process where it was.
func (r *restorer) seedCgroupNsRoots(seed int) error {
	if !r.is.inv.CgroupNs {
		return nil
	}
	mounts, err := r.cgroupMounts()
	if err != nil {
		return err
	}
	for _, ref := range r.is.inv.CgroupNsRoots {
		mnt, ok := mounts[ref.Controllers]
		if !ok {
			continue
		}
		dir := filepath.Join(mnt, filepath.Clean("/"+r.cgroupPath(ref.Controllers, ref.Path)))
		if err := r.makeCgroup(CgroupsSoft, dir, ref.Controllers, nil); err != nil {
			return err
		}
		if err := cgroups.Move(dir, seed); err != nil {
			return fmt.Errorf("cgroup namespace root: %w", err)
		}
	}
	return nil
}

// cgroupMounts is where the hierarchies are mounted: in --cgroup-yard if
// given, else wherever ferry sees them.
func (r *restorer) cgroupMounts() (map[string]string, error) {
	m, err := cgroups.MountsUnder(r.opts.CgroupYard)
	if err == nil && r.opts.CgroupYard != "" && len(m) == 0 {
		err = fmt.Errorf("%w: --cgroup-yard %s: no cgroup hierarchy is mounted there", ErrValidation, r.opts.CgroupYard)
	}
	return m, err
}

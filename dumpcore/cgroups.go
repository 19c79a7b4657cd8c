package dumpcore

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/proc"
)

// collectCgroups records each process's cgroups (core.cgroups) and,
// once per cgroup, its properties where its hierarchy is mounted here
// (inventory cgroup_dirs). Options.CgroupControllers, when set, keeps
// only the hierarchies holding one of those controllers (criu's
// --cgroup-dump-controller).
func (t *tree) collectCgroups(imgs []*imageSet) error {
	mounts, err := cgroups.MountsUnder(t.opts.CgroupYard)
	if err != nil {
		return err
	}
	if t.opts.CgroupYard != "" && len(mounts) == 0 {
		return fmt.Errorf("--cgroup-yard %s: no cgroup hierarchy is mounted there", t.opts.CgroupYard)
	}
	keep := func(controllers string) bool {
		if len(t.opts.CgroupControllers) == 0 {
			return true
		}
		for _, want := range t.opts.CgroupControllers {
			if slices.Contains(strings.Split(controllers, ","), want) {
				return true
			}
		}
		return false
	}
	seen := map[[2]string]bool{}
	for _, img := range imgs {
		refs, err := cgroups.Read(int(img.pstree.Pid))
		if err != nil {
			return fmt.Errorf("cgroups of %d: %w", img.pstree.Pid, err)
		}
		for _, r := range refs {
			c := cgroups.Normalize(r.Controllers)
			if !keep(c) {
				continue
			}
			img.core.Cgroups = append(img.core.Cgroups, &pb.CgroupRef{Controllers: c, Path: r.Path})
			k := [2]string{c, r.Path}
			if seen[k] {
				continue
			}
			seen[k] = true
			d := &pb.CgroupDir{Controllers: c, Path: r.Path}
			if mnt, ok := mounts[c]; ok {
				ps, err := cgroups.ReadProps(filepath.Join(mnt, r.Path), c, t.opts.CgroupProps)
				if err != nil {
					return fmt.Errorf("cgroup %s of %s: %w", r.Path, c, err)
				}
				for _, p := range ps {
					d.Props = append(d.Props, &pb.CgroupProp{Name: p.Name, Value: p.Value})
				}
			}
			imgs[0].inv.CgroupDirs = append(imgs[0].inv.CgroupDirs, d)
		}
	}
	return nil
}

// cgroupNamespace finds the root, in each hierarchy, of the tree's cgroup
// namespace, if it has one of its own: the root process's cgroup as ferry
// sees it, less the part the process sees (read from a thread that joins
// the namespace).
func (t *tree) cgroupNamespace() ([]*pb.CgroupRef, error) {
	if t.ownNs["cgroup"] == "" {
		return nil, nil
	}
	outside, err := cgroups.Read(t.root)
	if err != nil {
		return nil, err
	}
	var inside []cgroups.Ref
	if err := proc.InNamespace(t.root, "cgroup", func() error {
		var err error
		inside, err = cgroups.Read(t.root)
		return err
	}); err != nil {
		return nil, fmt.Errorf("cgroup namespace of %d: %w", t.root, err)
	}
	in := map[string]string{}
	for _, r := range inside {
		in[cgroups.Normalize(r.Controllers)] = r.Path
	}
	var roots []*pb.CgroupRef
	for _, r := range outside {
		c := cgroups.Normalize(r.Controllers)
		rel, ok := in[c]
		root := strings.TrimSuffix(r.Path, strings.TrimSuffix(rel, "/"))
		if !ok || !strings.HasSuffix(r.Path, strings.TrimSuffix(rel, "/")) || strings.HasPrefix(rel, "/..") {
			return nil, fmt.Errorf("process %d is in cgroup %s of %q, which its cgroup namespace shows as %q: %w",
				t.root, r.Path, c, rel, ErrUnsupported)
		}
		if root == "" {
			root = "/"
		}
		roots = append(roots, &pb.CgroupRef{Controllers: c, Path: root})
	}
	return roots, nil
}

package cgroups

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Ref is one line of /proc/PID/cgroup: a hierarchy, named by its
// controllers ("cpu,cpuacct", "name=systemd"; "" for v2), and the
// process's cgroup in it.
type Ref struct {
	Controllers string
	Path        string
}

// Read reads /proc/PID/cgroup.
func Read(pid int) ([]Ref, error) {
	name := fmt.Sprintf("/proc/%d/cgroup", pid)
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return parse(name, b)
}

// Parse parses the contents of a /proc/PID/cgroup.
func Parse(b []byte) ([]Ref, error) { return parse("cgroup", b) }

func parse(name string, b []byte) ([]Ref, error) {
	var out []Ref
	sc := bufio.NewScanner(bytes.NewReader(b))
	for ln := 1; sc.Scan(); ln++ {
		f := strings.SplitN(sc.Text(), ":", 3)
		if len(f) != 3 {
			return nil, fmt.Errorf("%s:%d: %q", name, ln, sc.Text())
		}
		out = append(out, Ref{Controllers: f[1], Path: f[2]})
	}
	return out, sc.Err()
}

// Mounts maps each hierarchy mounted here (by its controllers, "" for
// v2) to a mount point of its root.
func Mounts() (map[string]string, error) { return MountsUnder("") }

// MountsUnder is Mounts for hierarchies mounted in directory yard only
// (criu's --cgroup-yard: a directory with them mounted, one each); ""
// is anywhere.
func MountsUnder(yard string) (map[string]string, error) {
	const name = "/proc/self/mountinfo"
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	known := map[string]bool{}
	if cg, err := os.ReadFile("/proc/cgroups"); err == nil {
		for _, l := range strings.Split(string(cg), "\n") {
			if f := strings.Fields(l); len(f) > 0 && !strings.HasPrefix(f[0], "#") {
				known[f[0]] = true
			}
		}
	}
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 3 || f[3] != "/" {
			continue // not a hierarchy's root
		}
		if yard != "" && filepath.Dir(f[4]) != filepath.Clean(yard) {
			continue
		}
		switch g[0] {
		case "cgroup2":
			if _, seen := out[""]; !seen {
				out[""] = f[4]
			}
		case "cgroup":
			var ctrl []string
			for _, o := range strings.Split(g[2], ",") {
				if known[o] || strings.HasPrefix(o, "name=") {
					ctrl = append(ctrl, o)
				}
			}
			key := Normalize(strings.Join(ctrl, ","))
			if _, seen := out[key]; !seen {
				out[key] = f[4]
			}
		}
	}
	return out, sc.Err()
}

// Normalize orders a controllers list the way /proc/PID/cgroup does not
// promise to ("cpuacct,cpu" and "cpu,cpuacct" are one hierarchy).
func Normalize(controllers string) string {
	c := strings.Split(controllers, ",")
	sort.Strings(c)
	return strings.Join(c, ",")
}

// props are the properties saved and set again, by controller ("" for
// v2's core files). Order matters where the kernel checks one against
// another (cpuset.cpus before cpuset.mems is fine; quota after period).
var props = map[string][]string{
	"cpu":     {"cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.weight", "cpu.max", "cpu.idle"},
	"cpuset":  {"cpuset.cpus", "cpuset.mems"},
	"memory":  {"memory.limit_in_bytes", "memory.soft_limit_in_bytes", "memory.swappiness", "memory.max", "memory.high", "memory.low", "memory.min"},
	"pids":    {"pids.max"},
	"blkio":   {"blkio.weight"},
	"io":      {"io.weight"},
	"hugetlb": nil,
}

// Prop is one property file of a cgroup and its value.
type Prop struct{ Name, Value string }

// ReadProps reads the properties of cgroup dir of a hierarchy of
// controllers (v2: the controllers enabled there): ferry's, or as spec
// says (nil: ferry's).
func ReadProps(dir, controllers string, spec PropsSpec) ([]Prop, error) {
	var ctrls []string
	if controllers == "" {
		b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
		if err != nil {
			return nil, err
		}
		ctrls = strings.Fields(string(b))
	} else {
		ctrls = strings.Split(controllers, ",")
	}
	var out []Prop
	for _, c := range ctrls {
		for _, p := range propsOf(c, spec) {
			b, err := os.ReadFile(filepath.Join(dir, p))
			if errors.Is(err, os.ErrNotExist) {
				continue // not on this kernel, or not in this version
			}
			if err != nil {
				return nil, err
			}
			out = append(out, Prop{Name: p, Value: strings.TrimSpace(string(b))})
		}
	}
	return out, nil
}

// known tells whether name is a property ferry saves (and so may set).
func known(name string) bool {
	for _, ps := range props {
		for _, p := range ps {
			if p == name {
				return true
			}
		}
	}
	return false
}

// SetProps writes props into cgroup dir. A name that is not a
// controller's property (an image may say anything: "release_agent") is
// refused (Settable).
func SetProps(dir string, ps []Prop) error {
	for _, p := range ps {
		if !Settable(p.Name) {
			return fmt.Errorf("cgroup %s: property %q is not one ferry sets", dir, p.Name)
		}
		if err := os.WriteFile(filepath.Join(dir, p.Name), []byte(p.Value), 0); err != nil {
			return fmt.Errorf("cgroup %s: %s = %q: %w", dir, p.Name, p.Value, err)
		}
	}
	return nil
}

// Ensure makes cgroup dir (and its parents) if it is not there, and
// returns the directories it made, parents first. On v1 cpuset
// hierarchies a new cgroup gets its parent's cpus and mems, without
// which it takes no process.
func Ensure(dir, controllers string) ([]string, error) {
	if _, err := os.Stat(dir); err == nil {
		return nil, nil
	}
	parent := filepath.Dir(dir)
	made, err := Ensure(parent, controllers)
	if err != nil {
		return made, err
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return made, fmt.Errorf("cgroup %s: %w", dir, err)
	}
	made = append(made, dir)
	if strings.Contains(","+controllers+",", ",cpuset,") {
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if v, err := os.ReadFile(filepath.Join(parent, f)); err == nil {
				os.WriteFile(filepath.Join(dir, f), v, 0)
			}
		}
	}
	return made, nil
}

// Move moves process pid (all its threads) into cgroup dir.
func Move(dir string, pid int) error {
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("move %d into cgroup %s: %w", pid, dir, err)
	}
	return nil
}

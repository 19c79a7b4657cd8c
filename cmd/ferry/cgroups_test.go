package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/testutil"
)

// testCgroups returns the mounted hierarchies' roots and the test
// process's own cgroup path in each, both by controller list ("" for v2).
func testCgroups(t *testing.T) (mounts, base map[string]string) {
	t.Helper()
	mounts, err := cgroups.Mounts()
	if err != nil {
		t.Fatal(err)
	}
	mine, err := cgroups.Read(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	base = map[string]string{}
	for _, r := range mine {
		base[cgroups.Normalize(r.Controllers)] = r.Path
	}
	return mounts, base
}

func TestDumpRestoreCgroups(t *testing.T) {
	// A process in cgroups of its own (cpu, pids and memory hierarchies)
	// with properties set: the cgroups are removed after the dump, and the
	// restore (--manage-cgroups soft, the default) makes them again with
	// their properties and puts the process in them; --cgroup-root puts
	// its pids cgroup under another path.
	needRoot(t)
	mounts, base := testCgroups(t)
	want := map[string]cgroups.Prop{"cpu": {Name: "cpu.shares", Value: "512"}, "pids": {Name: "pids.max", Value: "77"},
		"memory": {Name: "memory.limit_in_bytes", Value: "268435456"}}
	name := fmt.Sprintf("ferry-test-%d", os.Getpid())
	dirs := map[string]string{}
	for ctrl := range want {
		if _, ok := mounts[ctrl]; !ok {
			t.Fatalf("no %s hierarchy mounted (cgroup v1 expected on this machine)", ctrl)
		}
		dirs[ctrl] = filepath.Join(mounts[ctrl], base[ctrl], name)
	}
	alt := filepath.Join(base["pids"], name+"-alt")
	t.Cleanup(func() {
		for _, d := range dirs {
			os.Remove(d)
		}
		os.Remove(filepath.Join(mounts["pids"], alt, base["pids"], name))
		for p := filepath.Join(alt, base["pids"]); p != filepath.Dir(alt); p = filepath.Dir(p) {
			os.Remove(filepath.Join(mounts["pids"], p))
		}
	})
	w := startSelfCheck(t, "guard.py")
	before := w.Report(t)
	for ctrl, d := range dirs {
		if _, err := cgroups.Ensure(d, ctrl); err != nil {
			t.Fatal(err)
		}
		if err := cgroups.SetProps(d, []cgroups.Prop{want[ctrl]}); err != nil {
			t.Fatal(err)
		}
		if err := cgroups.Move(d, w.Pid); err != nil {
			t.Fatal(err)
		}
	}
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-v4", "-o", "dump.log")
	w.Reap(t)
	for _, d := range dirs {
		if err := os.Remove(d); err != nil {
			t.Fatalf("remove %s after the dump: %v", d, err)
		}
	}
	mustFerry(t, "restore", "-D", img, "-d", "-v4", "-o", "restore.log", "--cgroup-root", "pids:"+alt)
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	got, err := cgroups.Read(w.Pid)
	if err != nil {
		t.Fatal(err)
	}
	in := map[string]string{}
	for _, g := range got {
		in[cgroups.Normalize(g.Controllers)] = g.Path
	}
	for ctrl, p := range want {
		path := filepath.Join(base[ctrl], name)
		if ctrl == "pids" {
			path = filepath.Join(alt, path)
		}
		if in[ctrl] != path {
			t.Fatalf("restored process in %s cgroup %s, want %s", ctrl, in[ctrl], path)
		}
		b, err := os.ReadFile(filepath.Join(mounts[ctrl], path, p.Name))
		if err != nil || strings.TrimSpace(string(b)) != p.Value {
			t.Fatalf("%s = %q (%v), want %s", p.Name, b, err, p.Value)
		}
	}
	checkSelf(t, r)
	r.Kill()
	os.Remove(filepath.Join(mounts["pids"], alt, base["pids"], name))
}

func TestDumpRestoreCgroupV2(t *testing.T) {
	// The same on the cgroup v2 hierarchy (this machine mounts one beside
	// the v1 controllers): the process's v2 cgroup, removed after the
	// dump, is made again and the restored process put in it.
	needRoot(t)
	mounts, bases := testCgroups(t)
	v2, ok := mounts[""]
	if !ok {
		t.Fatal("no cgroup2 hierarchy mounted")
	}
	base, ok := bases[""]
	if !ok {
		base = "/"
	}
	path := filepath.Join(base, fmt.Sprintf("ferry-test-v2-%d", os.Getpid()))
	dir := filepath.Join(v2, path)
	t.Cleanup(func() { os.Remove(dir) })
	w := startSelfCheck(t, "guard.py")
	before := w.Report(t)
	if _, err := cgroups.Ensure(dir, ""); err != nil {
		t.Fatal(err)
	}
	if err := cgroups.Move(dir, w.Pid); err != nil {
		t.Fatal(err)
	}
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	if err := os.Remove(dir); err != nil {
		t.Fatalf("remove %s after the dump: %v", dir, err)
	}
	mustFerry(t, "restore", "-D", img, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	got, _ := cgroups.Read(w.Pid)
	for _, g := range got {
		if g.Controllers == "" && g.Path != path {
			t.Fatalf("restored process in v2 cgroup %s, want %s", g.Path, path)
		}
	}
	r.Kill()
}

func TestDumpRestoreCgroupNamespace(t *testing.T) {
	// The init of its own PID and cgroup namespaces, started in cgroups
	// of its own (pids, memory): its cgroup namespace is rooted there. The
	// restore makes a new cgroup namespace rooted in the same cgroups
	// (made again: they are removed after the dump), and the workload
	// still sees itself at "/" everywhere.
	needRoot(t)
	mounts, base := testCgroups(t)
	name := fmt.Sprintf("ferry-cgns-%d", os.Getpid())
	var dirs []string
	join := ""
	for _, ctrl := range []string{"pids", "memory"} {
		d := filepath.Join(mounts[ctrl], base[ctrl], name)
		if _, err := cgroups.Ensure(d, ctrl); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, d)
		join += "echo $$ > " + filepath.Join(d, "cgroup.procs") + "; "
	}
	t.Cleanup(func() {
		for _, d := range dirs {
			os.Remove(d)
		}
	})
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "cgns.py")
	u := testutil.Start(t, "", "sh", "-c", join+`exec unshare --cgroup --pid --fork --kill-child python3 `+script+` "$@" 2>/dev/null`, "sh")
	w := onlyChild(t, u)
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	u.Kill()
	for _, d := range dirs {
		if err := os.Remove(d); err != nil {
			t.Fatalf("remove %s after the dump: %v", d, err)
		}
	}
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
	r.Kill()
}

func TestCgroupYardAndProps(t *testing.T) {
	// A yard (a directory with the memory hierarchy mounted in it, as
	// criu's --cgroup-yard) that dump and restore use instead of the
	// host's mounts, and --cgroup-props replacing the memory properties
	// saved by memory.swappiness alone: the restore puts the process back
	// in its cgroup (through the yard) with its swappiness, and its memory
	// limit, not saved, is not set again.
	needRoot(t)
	yard := t.TempDir()
	mem := filepath.Join(yard, "memory")
	os.Mkdir(mem, 0o755)
	if out, err := exec.Command("mount", "-t", "cgroup", "-o", "memory", "ferry-yard", mem).CombinedOutput(); err != nil {
		t.Fatalf("mount the memory hierarchy in the yard: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", mem).Run() })
	cg := filepath.Join(mem, fmt.Sprintf("ferry-yard-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(cg) })
	if err := cgroups.SetProps(cg, []cgroups.Prop{{Name: "memory.swappiness", Value: "33"}, {Name: "memory.limit_in_bytes", Value: "268435456"}}); err != nil {
		t.Fatal(err)
	}
	w := startSelfCheck(t, "guard.py")
	before := w.Report(t)
	if err := cgroups.Move(cg, w.Pid); err != nil {
		t.Fatal(err)
	}
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-v4", "-o", "dump.log", "--cgroup-yard", yard,
		"--cgroup-props", `"memory": - "strategy": "replace" - "properties": ["memory.swappiness"]`)
	w.Reap(t)
	var inv pb.Inventory
	if err := images.ReadOne(img, "inventory.img", images.KindInventory, &inv); err != nil {
		t.Fatal(err)
	}
	saved := ""
	for _, d := range inv.CgroupDirs {
		if d.Controllers == "memory" {
			for _, p := range d.Props {
				saved += p.Name + "=" + p.Value + " "
			}
		}
	}
	if saved != "memory.swappiness=33 " {
		t.Fatalf("memory properties saved: %q, want the swappiness alone", saved)
	}
	if err := os.Remove(cg); err != nil {
		t.Fatal(err)
	}
	mustFerry(t, "restore", "-D", img, "-d", "-v4", "-o", "restore.log", "--cgroup-yard", yard)
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	if b, err := os.ReadFile(filepath.Join(cg, "cgroup.procs")); err != nil || !strings.Contains(string(b), strconv.Itoa(w.Pid)) {
		t.Fatalf("the restored process is not in %s (%q, %v)", cg, b, err)
	}
	if b, _ := os.ReadFile(filepath.Join(cg, "memory.swappiness")); strings.TrimSpace(string(b)) != "33" {
		t.Fatalf("swappiness %q, want 33", b)
	}
	if b, _ := os.ReadFile(filepath.Join(cg, "memory.limit_in_bytes")); strings.TrimSpace(string(b)) == "268435456" {
		t.Fatal("the memory limit, not saved, was set again")
	}
}

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrycr/ferry/internal/cgroups"
	"github.com/ferrycr/ferry/internal/proc"
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
	kids := proc.Children(u.Pid)
	if len(kids) != 1 {
		t.Fatalf("unshare %d has children %v", u.Pid, kids)
	}
	w := testutil.Attach(t, kids[0], u.ReportPath)
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

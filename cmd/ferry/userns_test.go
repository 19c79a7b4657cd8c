package main

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
)

// startInUserNs starts userns.py, which makes its namespaces and runs
// as their init (a grandchild), and returns that init by its PID here.
func startInUserNs(t *testing.T) *testutil.Workload {
	t.Helper()
	needRoot(t)
	u := testutil.Start(t, "", "python3", filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "userns.py"))
	mid := proc.Children(u.Pid)
	if len(mid) != 1 {
		t.Fatalf("userns.py %d has children %v", u.Pid, mid)
	}
	kids := proc.Children(mid[0])
	if len(kids) != 1 {
		t.Fatalf("userns.py %d has children %v", mid[0], kids)
	}
	return testutil.Attach(t, kids[0], u.ReportPath)
}

// userNsState is what a process of a user namespace should keep across
// a restore, as the host sees it: its credentials and the maps.
func userNsState(t *testing.T, pid int) string {
	t.Helper()
	maps := ""
	for _, f := range []string{"uid_map", "gid_map", "setgroups"} {
		b, err := os.ReadFile(proc.Path(pid, f))
		if err != nil {
			t.Fatal(err)
		}
		maps += f + ": " + string(b)
	}
	return credLines(t, pid) + "\n" + maps
}

func TestDumpRestoreUserNamespace(t *testing.T) {
	// A tree whose user namespace maps its root to the host's uid 100000,
	// with PID, mount, UTS, IPC and network namespaces of its own, and a
	// process W with two threads that dropped to uid 1000 with two groups.
	// Dumped with -R (it runs on) and restored while the original still
	// holds its PIDs: a new user namespace with the same maps, owning the
	// new PID, mount, UTS, IPC and network namespaces; each process has its IDs, groups and
	// capabilities again, as the host sees them; the tree checks itself,
	// its root using its capabilities on those namespaces.
	w := startInUserNs(t)
	before := w.Report(t)
	kids := proc.Children(w.Pid)
	if len(kids) != 1 {
		t.Fatalf("the root %d has children %v", w.Pid, kids)
	}
	rootWant, wWant := userNsState(t, w.Pid), userNsState(t, kids[0])
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-R", "-v4", "-o", "dump.log")
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	if got := userNsState(t, r.Pid); got != rootWant {
		t.Errorf("the restored root:\n%s\nthe original:\n%s", got, rootWant)
	}
	rkids := proc.Children(r.Pid)
	if len(rkids) != 1 {
		t.Fatalf("the restored root %d has children %v", r.Pid, rkids)
	}
	if n := len(tids(t, rkids[0])); n != 2 {
		t.Errorf("the restored W has %d threads, want 2", n)
	}
	if got := userNsState(t, rkids[0]); got != wWant {
		t.Errorf("the restored W:\n%s\nthe original:\n%s", got, wWant)
	}
	mine, _ := proc.Namespace(os.Getpid(), "user")
	orig, _ := proc.Namespace(w.Pid, "user")
	user, _ := proc.Namespace(r.Pid, "user")
	if user == mine || user == orig {
		t.Fatalf("the restored tree is in %s (ours %s, the original's %s)", user, mine, orig)
	}
	for _, kind := range []string{"pid", "mnt", "uts", "ipc", "net"} {
		if owner, err := proc.NamespaceOwner(r.Pid, kind); err != nil || owner != user {
			t.Errorf("the restored %s namespace belongs to %s (%v), not to the tree's %s", kind, owner, err, user)
		}
	}
	checkSelf(t, r)
}

func TestDumpRestoreUserNamespaceOnly(t *testing.T) {
	// A process in a user namespace of its own mapping root to root
	// (unshare --user --map-root-user), in the host's PID namespace: it
	// comes back with its PID in a new user namespace with the same maps,
	// its memory verified. With two threads it is refused at the dump
	// (its threads' TIDs would have to be chosen from inside the user
	// namespace), and runs on.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", "unshare", "--user", "--map-root-user", bin, "-m", "16")
	before := w.Report(t)
	want := userNsState(t, w.Pid)
	orig, _ := proc.Namespace(w.Pid, "user")
	r := dumpRestore(t, w)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	if got := userNsState(t, r.Pid); got != want {
		t.Errorf("restored:\n%s\nthe original:\n%s", got, want)
	}
	mine, _ := proc.Namespace(os.Getpid(), "user")
	if user, _ := proc.Namespace(r.Pid, "user"); user == mine || user == orig {
		t.Errorf("the restored process is in %s (ours %s, the original's %s)", user, mine, orig)
	}

	w2 := testutil.Start(t, "-r", "unshare", "--user", "--map-root-user", bin, "-m", "16", "-t", "1")
	checkRefused(t, w2, "2 threads", "user namespace of the tree's own", "no PID namespace")
	checkRunsOn(t, w2)
}

func TestLazyRestoreUserNamespaceSameHost(t *testing.T) {
	// Post-copy on one host of a tree born in a user namespace of its own
	// (userns.py): its processes make their userfaultfds through
	// /dev/userfaultfd, the system call being refused inside the user
	// namespace; the copy checks itself once every page is there.
	lazySameHost(t, startInUserNs(t))
}

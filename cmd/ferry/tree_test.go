package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/testutil"
)

// treePids returns the PIDs a tree workload reports (its "pids" field)
// and ends them at cleanup: a restored tree is not the test's child.
func treePids(t *testing.T, r testutil.Report) []int {
	t.Helper()
	var pids []int
	for _, s := range strings.Split(r.Fields["pids"], ",") {
		p, err := strconv.Atoi(s)
		if err != nil || p <= 0 {
			t.Fatalf("report field pids=%q", r.Fields["pids"])
		}
		pids = append(pids, p)
	}
	t.Cleanup(func() {
		for _, p := range pids {
			unix.Kill(p, unix.SIGKILL)
		}
	})
	return pids
}

// treeCheckAcross is checkAcross for a selfcheck workload that is a tree:
// its processes (the report's pids) are ended at cleanup too.
func treeCheckAcross(t *testing.T, script string) {
	t.Helper()
	w := startSelfCheck(t, script)
	treePids(t, w.Report(t))
	checkAcross(t, w)
}

func TestDumpRestoreTree(t *testing.T) {
	// A root with children and a grandchild, in groups and sessions of
	// their own (one with a controlling terminal it holds no fd of), a
	// zombie, a pipe pair and shared memory between two of
	// them, and a file description they share: every process comes back
	// with its PID, parent, group and session, the zombie stays one, and
	// what was shared stays shared.
	treeCheckAcross(t, "tree.py")
}

func TestDumpRestoreTreeState(t *testing.T) {
	// Children whose state goes with them: one stopped by SIGTSTP stays
	// stopped by it, one keeps its parent-death signal; the parent's
	// pidfds of a live child and of a reaped one, its open
	// /proc/CHILD/stat, and a pipe's SIGIO owner and signal, come back
	// naming the same.
	treeCheckAcross(t, "tree2.py")
}

func TestDumpRestoreSharedFdTable(t *testing.T) {
	// A child cloned with CLONE_FILES|CLONE_FS: after restore an fd it
	// opens is in its parent's table and its chdir moves the parent's
	// working directory, as before. Two siblings share a table of their
	// own (the second cloned by the first with CLONE_PARENT): it stays
	// theirs.
	w, before := startC(t, "fdshare")
	treePids(t, before)
	r := dumpRestore(t, w)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
}

func TestDumpRestorePreforkServer(t *testing.T) {
	// A master and four workers accepting on one listening socket: after
	// restore the socket is one again, shared by all, and every worker
	// answers (with the token it drew before the dump).
	treeCheckAcross(t, "prefork.py")
}

func TestPreDumpChainTree(t *testing.T) {
	// Pre-dump rounds of a tree: every process gets its dirty tracker,
	// later rounds copy what each wrote since, and the final dump of the
	// chain restores the whole tree.
	w := startSelfCheck(t, "tree.py")
	before := w.Report(t)
	pids := treePids(t, before)
	dirs := chainDirs(t, 3)
	d1, d2, d3 := dirs[0], dirs[1], dirs[2]
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d1)
	var inv pb.Inventory
	if err := images.ReadOne(d1, "inventory.img", images.KindInventory, &inv); err != nil {
		t.Fatal(err)
	}
	// A, its child G and B are tracked (the zombie has no memory).
	if inv.TrackerFd <= 0 || len(inv.Trackers) != len(pids)-1 {
		t.Fatalf("pre-dump of a tree of %d live processes: root tracker fd %d, %d other trackers", len(pids), inv.TrackerFd, len(inv.Trackers))
	}
	s1 := dumpStats(t, d1)
	time.Sleep(100 * time.Millisecond)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d2, "--prev-images-dir", "../1")
	s2 := dumpStats(t, d2)
	if s2.PagesSkippedParent < s1.PagesWritten/2 || s2.PagesWritten >= s1.PagesWritten {
		t.Fatalf("second round wrote %d pages (first %d), %d from the parent: not incremental",
			s2.PagesWritten, s1.PagesWritten, s2.PagesSkippedParent)
	}
	for _, p := range pids[:3] { // A, G, B: pages of their own in the parent
		head, entries, err := images.ReadPagemap(d2, int32(p))
		if err != nil {
			t.Fatal(err)
		}
		inParent := 0
		for _, e := range entries {
			if e.InParent {
				inParent++
			}
		}
		if inParent == 0 {
			t.Fatalf("process %d: no page of the second round refers to the first (%v)", p, head)
		}
	}
	mid := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", d3, "--prev-images-dir", "../2")
	w.Reap(t)
	mustFerry(t, "restore", "-D", d3, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, mid, r.Report(t))
	checkSelf(t, r)
}

func TestFailedTreeDumpLeavesTreeRunning(t *testing.T) {
	// A child holds what the dump cannot take (a netlink socket): the dump
	// fails naming the child, its fd and the object, and every process of
	// the tree runs on, untraced and not stopped.
	w := startSelfCheck(t, "treebad.py")
	before := w.Report(t)
	child := treePids(t, before)[0]
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir())
	if code != 1 || !strings.Contains(out, "of "+strconv.Itoa(child)) || !strings.Contains(out, "socket") {
		t.Fatalf("dump of a tree with a netlink socket in a child: exit %d\n%s", code, out)
	}
	for _, p := range []int{w.Pid, child} {
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if !bytes.Contains(st, []byte("TracerPid:\t0\n")) || bytes.Contains(st, []byte("State:\tT")) {
			t.Fatalf("process %d not released:\n%s", p, st)
		}
	}
	checkContinued(t, before, w.Report(t))
	checkSelf(t, w)
}

func TestLazyRestoreTree(t *testing.T) {
	// A tree restored lazily: every process with memory hands its
	// userfaultfd to one lazy-pages daemon, which serves them all until
	// every page is there; the tree checks itself.
	w := startSelfCheck(t, "tree.py")
	before := w.Report(t)
	treePids(t, before)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	done := startDaemon(t, "lazy-pages", "-D", img, "-v4", "-o", "lazy.log")
	mustFerry(t, "restore", "-D", img, "-d", "--lazy-pages")
	rw := testutil.Attach(t, w.Pid, w.ReportPath)
	defer rw.Kill()
	checkContinued(t, before, rw.Report(t))
	checkSelf(t, rw)
	waitLazyPages(t, done, 30*time.Second)
	log, _ := os.ReadFile(img + "/lazy.log")
	if n := bytes.Count(log, []byte(`msg="serving lazy pages"`)); n != 4 {
		t.Fatalf("the daemon served %d processes, want 4 (root, A, G, B):\n%s", n, log)
	}
}

func TestDumpRestoreSysvShm(t *testing.T) {
	// A SysV shared memory segment attached by a process and its child
	// is attached again by both: the same segment, shared.
	testSysvShm(t, false)
}

func TestDumpRestoreSysvShmGone(t *testing.T) {
	// The same, with the segments gone between dump and restore (as on
	// another host): they are made again with their ids, key, mode and
	// contents, and the removed one is removed again.
	testSysvShm(t, true)
}

func testSysvShm(t *testing.T, gone bool) {
	w := startSelfCheck(t, "sysvshm.py")
	before := w.Report(t)
	treePids(t, before)
	id := int(before.Int("shmid"))
	t.Cleanup(func() { unix.SysvShmCtl(id, unix.IPC_RMID, nil) })
	var between func()
	if gone {
		between = func() {
			if _, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil); err != nil {
				t.Fatal(err)
			}
			removed := int(before.Int("removed"))
			if _, err := unix.SysvShmCtl(removed, unix.IPC_STAT, &unix.SysvShmDesc{}); err == nil {
				t.Fatalf("segment %d outlived the tree", removed)
			}
		}
	}
	rw := dumpRestoreHook(t, w, nil, nil, between)
	defer rw.Kill()
	checkContinued(t, before, rw.Report(t))
	checkSelf(t, rw)
}

func TestDumpRestoreTreeDeadLeaders(t *testing.T) {
	// Sessions and groups whose leaders are dead (orphans kept by a
	// subreaper root) and a session left two levels up: every process
	// comes back with its parent, session and group, made through
	// helper processes that are gone once the restore is done.
	treeCheckAcross(t, "tree3.py")
}

func TestDumpRestoreOwnUserfaultfd(t *testing.T) {
	// A process serving its own memory through a userfaultfd (a handler
	// thread): missing pages are still served by its handler after the
	// restore, write-protected pages still fault, others do not, and the
	// userfaultfd keeps its features.
	w, before := startC(t, "uffdself")
	r := dumpRestore(t, w)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

func TestDumpRestoreSigtrap(t *testing.T) {
	// A root that handles SIGTRAP and a child that ignores it: remote
	// calls end on int3, and a forced SIGTRAP that is blocked or ignored
	// has its disposition reset by the kernel. A dump that leaves the tree
	// running (-R) leaves both as they were, and the restored tree too.
	w := startSelfCheck(t, "sigtrap.py")
	treePids(t, w.Report(t))
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "-R")
	checkSelf(t, w)
	w2 := startSelfCheck(t, "sigtrap.py")
	treePids(t, w2.Report(t))
	checkAcross(t, w2)
}

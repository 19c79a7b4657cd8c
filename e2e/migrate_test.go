package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
)

// checkSame fails unless after is the process of before, gone on: same
// token (kept only in its memory), counters that went on, memory verified.
func checkSame(t testing.TB, before, after testutil.Report) {
	t.Helper()
	if after.Status != "ok" {
		t.Fatalf("the workload's self-check failed: %v", after)
	}
	if after.Token != before.Token || after.Pid != before.Pid {
		t.Fatalf("not the same process: before %v, after %v", before, after)
	}
	if after.Counter < before.Counter {
		t.Fatalf("counter went back: %d -> %d (re-run, not restored?)", before.Counter, after.Counter)
	}
}

func TestMigratePrecopy(t *testing.T) { testMigrate(t, "precopy") }
func TestMigrateHybrid(t *testing.T) {
	c := testMigrate(t, "hybrid", "--metrics", "127.0.0.1:9127")
	// B's metrics count the committed migration and its downtime.
	out := run(t, "ip", "netns", "exec", c.b.netns, "python3", "-c",
		"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9127/metrics').read().decode())")
	for _, want := range []string{
		`ferry_migrations_total{outcome="committed",role="target"} 1`,
		"ferry_migration_downtime_seconds_count 1",
		"ferry_migrations_in_flight 0",
		`ferry_migration_step_seconds_count{step="post-copy"} 1`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("B's metrics lack %q:\n%s", want, out)
		}
	}
}
func TestMigratePostcopy(t *testing.T) { testMigrate(t, "postcopy") }

// testMigrate moves a workload A -> B -> A in mode; after each hop the
// workload verifies its memory, its token is unchanged and its counters
// went on.
func testMigrate(t testing.TB, mode string, agentArgsB ...string) *cluster {
	c := newCluster(t, agentArgsB...)
	// 64 MiB, two threads, rewriting memory at 20 MiB/s all along.
	w, pid := c.startWorkload("-m", "64", "-t", "2", "-C", "-c", "20")
	before := w.Report(t)
	for _, hop := range []struct{ from, to *host }{{c.a, c.b}, {c.b, c.a}} {
		code, evs := c.migrate(pid, "--mode", mode, "--from", hop.from.ip, "--to", hop.to.ip)
		res := evs[len(evs)-1]
		if code != 0 || res["outcome"] != "committed" {
			t.Fatalf("migrate %s -> %s: exit %d, result %v", hop.from.name, hop.to.name, code, res)
		}
		rounds, pages := 0, false
		for _, e := range evs {
			switch e["event"] {
			case "round":
				rounds++
			case "pages":
				pages = true
			}
		}
		switch {
		case mode != "postcopy" && (rounds < 1 || res["rounds"].(float64) != float64(rounds+1)):
			t.Fatalf("want pre-copy rounds then a final one: %d round events, result %v", rounds, res)
		case mode == "postcopy" && (rounds != 0 || res["rounds"].(float64) != 1):
			t.Fatalf("post-copy: want only the final round: %d round events, result %v", rounds, res)
		case pages != (mode != "precopy"):
			t.Fatalf("mode %s: post-copy pages event: %v", mode, pages)
		}
		if int(res["restored_pid"].(float64)) != pid {
			t.Fatalf("restored as PID %v on %s, want %d", res["restored_pid"], hop.to.name, pid)
		}
		t.Logf("%s %s -> %s: downtime %.1f ms (frozen %.1f ms), post-copy %v ms, total %.0f ms, %.1f MiB in %v rounds",
			mode, hop.from.name, hop.to.name, res["downtime_ms"], res["frozen_ms"], res["postcopy_ms"], res["total_ms"],
			res["bytes"].(float64)/(1<<20), res["rounds"])

		// Gone from the source; the same process runs on the target, in
		// the target's namespaces.
		if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
			t.Fatalf("the source still runs on %s: %v", hop.from.name, err)
		}
		// Reaped too (its PID is needed back on the next hop).
		gone := w.Pid
		waitFor(t, "the source to be reaped", 10*time.Second, func() bool { return procState(gone) == 0 })
		here := hop.to.find(pid)
		if here == 0 {
			t.Fatalf("no process with PID %d on %s", pid, hop.to.name)
		}
		w = testutil.Attach(t, here, w.ReportPath)
		after := w.Report(t)
		checkSame(t, before, after)
		if ns, _ := readlink("/proc/%d/ns/net", here); ns != mustReadlink(t, fmt.Sprintf("/proc/%d/ns/net", hop.to.initPid)) {
			t.Fatalf("the restored process is not in %s's network namespace (%q)", hop.to.name, ns)
		}
		time.Sleep(200 * time.Millisecond)
		if again := w.Report(t); again.Counter <= after.Counter {
			t.Fatalf("the migrated process does not run: counter %d -> %d", after.Counter, again.Counter)
		}
		before = after
	}
	return c
}

func TestMigrateRollbackAfterRestore(t *testing.T) {
	// B fails with the tree already restored and running: its copy is
	// killed, and the source resumes where it was frozen.
	c := newCluster(t, "--fault", "after-restore")
	w, pid := c.startWorkload("-m", "32", "-t", "1", "-C", "-c", "10")
	before := w.Report(t)
	code, evs := c.migrate(pid)
	res := evs[len(evs)-1]
	if code != 1 || res["outcome"] != "rolled-back" {
		t.Fatalf("migrate: exit %d, result %v; want exit 1, rolled-back", code, res)
	}
	c.runsOnA(w, pid, before)
	if n := uffdWatched(w.Pid); n > 0 {
		t.Fatalf("%d areas of the rolled-back source are still write-protected by a tracker", n)
	}
}

func TestMigrateFlagsMovedInPostcopy(t *testing.T) {
	// The final round's check of the VMA flags read before the freeze
	// fails (as when the process changed a mapping just then) while the
	// tree already runs on B: B's copy is stopped, nothing commits, and
	// the source resumes where it was frozen. In postcopy the lazy memory
	// is unlisted; in hybrid the images list it, and B's daemon waits for
	// the source's word all the same.
	c := newClusterWith(t, []string{"--fault", "flags-moved"}, nil)
	for _, mode := range []string{"postcopy", "hybrid"} {
		w, pid := c.startWorkload("-m", "32", "-t", "1", "-C", "-c", "10")
		before := w.Report(t)
		code, evs := c.migrate(pid, "--mode", mode)
		res := evs[len(evs)-1]
		if code != 1 || res["outcome"] != "rolled-back" || !strings.Contains(fmt.Sprint(res["error"]), "mapping changed") {
			t.Fatalf("%s: exit %d, result %v; want exit 1, rolled-back, the check's error", mode, code, res)
		}
		c.runsOnA(w, pid, before)
		w.Kill()
	}
}

func TestMigrateRefused(t *testing.T) {
	c := newCluster(t)
	w, pid := c.startWorkload("-m", "8")
	// A PID that does not exist: refused, exit 2, nothing touched.
	code, evs := c.migrate(4194000)
	if res := evs[len(evs)-1]; code != 2 || res["outcome"] != "refused" {
		t.Fatalf("migrate of a missing PID: exit %d, result %v; want exit 2, refused", code, res)
	}
	// A target without an agent: refused, exit 2.
	code, evs = c.migrate(pid, "--to", "10.78.0.9")
	if res := evs[len(evs)-1]; code != 2 || res["outcome"] != "refused" {
		t.Fatalf("migrate to a host without an agent: exit %d, result %v; want exit 2, refused", code, res)
	}
	if st := procState(w.Pid); st == 0 || st == 'T' {
		t.Fatalf("source state %q after a refusal", st)
	}
}

func TestMigrateCoordinatorGone(t *testing.T) {
	// migrate is killed right after the final round (B restores slowly).
	// Both leases run out: B rolls back its copy, A asks B, learns it was
	// not committed, and only then resumes the source. At no moment do
	// both copies run.
	c := newCluster(t, "--fault", "slow-restore")
	w, pid := c.startWorkload("-m", "16", "-C", "-c", "5")
	before := w.Report(t)
	frozen := false
	c.migrateWatch(pid, func(cmd *exec.Cmd, e map[string]any) {
		if e["event"] == "final" {
			cmd.Process.Kill()
			frozen = true
		}
	}, "--lease", "1500ms")
	if !frozen {
		t.Fatal("migrate ended without a final round")
	}
	if st := procState(w.Pid); st != 'T' {
		t.Fatalf("source state %q after the final round; want stopped (T)", st)
	}
	// Both copies never run at once: while the source is stopped, B may
	// hold a copy; once the source runs, B's must be gone.
	deadline := time.Now().Add(20 * time.Second)
	for procState(w.Pid) == 'T' {
		if time.Now().After(deadline) {
			t.Fatal("the source was not resumed 20 s after its coordinator went silent")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if p := c.b.find(pid); p != 0 {
		t.Fatalf("the source resumed while B's copy (PID %d here) exists", p)
	}
	checkSame(t, before, w.Report(t))
}

func TestMigrateSourceAgentDiesInPostcopy(t *testing.T) {
	// A's agent dies while the tree, resumed on B, still fetches pages
	// from it. B cannot go on: it kills its copy. The source stays
	// stopped (its agent is gone: nobody may resume it without knowing
	// what B did) and migrate says "unresolved". A's agent, restarted on
	// the same state directory, finds the frozen migration, asks B when
	// the lease runs out, and resumes the source.
	c := newClusterWith(t, []string{"--fault", "slow-pages"}, nil)
	w, pid := c.startWorkload("-m", "64", "-C", "-c", "5")
	before := w.Report(t)
	code, last := c.migrateWatch(pid, func(_ *exec.Cmd, e map[string]any) {
		if e["event"] == "restored" {
			c.stopAgent(c.a)
		}
	}, "--mode", "postcopy", "--lease", "2s")
	if code != 3 || last["outcome"] != "unresolved" {
		t.Fatalf("migrate: exit %d, result %v; want exit 3, unresolved", code, last)
	}
	if st := procState(w.Pid); st != 'T' {
		t.Fatalf("source state %q with its agent gone; want stopped (T)", st)
	}
	waitFor(t, "B's copy to be gone", 10*time.Second, func() bool { return c.b.find(pid) == 0 })

	c.startAgent(c.a, nil)
	waitFor(t, "the restarted agent to resume the source", 20*time.Second, func() bool { return procState(w.Pid) != 'T' })
	checkSame(t, before, w.Report(t))
}

func TestMigrateByNodeName(t *testing.T) {
	// The agents form a cluster (encrypted gossip); ferry nodes lists it,
	// and migrate --via resolves node names through it.
	key := "{pki}/gossip.key"
	argsB := []string{"--gossip", "10.78.0.2:7946", "--gossip-key", key, "--join", "10.78.0.1:7946"}
	c := newClusterWith(t, []string{"--gossip", "10.78.0.1:7946", "--gossip-key", key}, argsB)
	type node struct {
		Name, Address, State string
	}
	var nodes []node
	// alive lists the alive nodes, as A's agent sees the cluster.
	alive := func() []string {
		args := append([]string{"netns", "exec", c.a.netns, c.ferry, "nodes", "--agent", c.a.ip, "--json"}, c.tls("operator")...)
		out, err := exec.Command("ip", args...).Output()
		if err != nil {
			return nil
		}
		nodes = nil
		json.Unmarshal(out, &nodes)
		var names []string
		for _, n := range nodes {
			if n.State == "alive" {
				names = append(names, n.Name)
			}
		}
		return names
	}
	waitFor(t, "both agents in the cluster", 20*time.Second, func() bool { return len(alive()) == 2 })
	if nodes[0].Name != "host-a" || nodes[0].Address != c.a.ip+":27100" || nodes[1].Name != "host-b" || nodes[1].Address != c.b.ip+":27100" {
		t.Fatalf("ferry nodes: %+v", nodes)
	}
	w, pid := c.startWorkload("-m", "16", "-C", "-c", "5")
	before := w.Report(t)
	code, evs := c.migrate(pid, "--via", c.a.ip, "--from", "host-a", "--to", "host-b")
	if res := evs[len(evs)-1]; code != 0 || res["outcome"] != "committed" {
		t.Fatalf("migrate --via: exit %d, result %v", code, res)
	}
	pidB := c.b.find(pid)
	if pidB == 0 {
		t.Fatalf("no process with PID %d on B", pid)
	}
	checkSame(t, before, testutil.Attach(t, pidB, w.ReportPath).Report(t))

	// A node leaving and joining shows in ferry nodes.
	c.stopAgent(c.b)
	waitFor(t, "host-b to be seen gone", 60*time.Second, func() bool { a := alive(); return len(a) == 1 && a[0] == "host-a" })
	t.Logf("after host-b left: %+v", nodes)
	c.startAgent(c.b, argsB)
	waitFor(t, "host-b to be seen back", 60*time.Second, func() bool { return len(alive()) == 2 })
}

func TestMigrateDetached(t *testing.T) {
	// migrate --detach: A's agent coordinates; the caller leaves at once
	// and reads the result later with --result.
	c := newCluster(t)
	w, pid := c.startWorkload("-m", "16", "-C", "-c", "5")
	before := w.Report(t)
	code, evs := c.migrateRaw(pid, "--detach", "--json")
	if code != 0 || evs[0]["event"] != "started" || evs[0]["id"] == "" {
		t.Fatalf("migrate --detach: exit %d, %v", code, evs)
	}
	id := evs[0]["id"].(string)
	code, evs = c.migrateRaw(0, "--result", id, "--wait", "--json")
	if res := evs[len(evs)-1]; code != 0 || res["outcome"] != "committed" || res["id"] != id {
		t.Fatalf("migrate --result %s --wait: exit %d, %v", id, code, res)
	}
	// The result outlives the agent that coordinated it.
	c.stopAgent(c.a)
	c.startAgent(c.a, nil)
	code, evs = c.migrateRaw(0, "--result", id, "--json")
	if res := evs[len(evs)-1]; code != 0 || res["outcome"] != "committed" || res["downtime_ms"] == nil {
		t.Fatalf("migrate --result %s after A's agent restarted: exit %d, %v", id, code, res)
	}
	pidB := c.b.find(pid)
	if pidB == 0 {
		t.Fatalf("no process with PID %d on B", pid)
	}
	checkSame(t, before, testutil.Attach(t, pidB, w.ReportPath).Report(t))
}

// TestMigrateTree moves a process tree (testdata/workloads/tree.py:
// children and a grandchild in groups and sessions of their own, a
// zombie, shared memory, pipes and a shared file description) from A to B
// with the default mode (pre-copy rounds with a dirty tracker in every
// process, then post-copy: one lazy-pages daemon serves every process),
// and back with --mode postcopy. After each hop every process has its PID
// and the tree checks itself.
func TestMigrateTree(t *testing.T) {
	c := newCluster(t)
	dir := t.TempDir()
	report := filepath.Join(dir, "report")
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "tree.py")
	c.a.daemon(t, filepath.Join(dir, "log"), "python3", script, "nopty", report)
	var r testutil.Report
	var err error
	waitFor(t, "the tree's first report", 30*time.Second, func() bool {
		r, err = testutil.ParseReport(report)
		return err == nil && r.Pid > 0
	})
	w := testutil.Attach(t, c.a.find(r.Pid), report)
	before := w.Report(t)
	for _, hop := range []struct {
		from, to *host
		args     []string
	}{{c.a, c.b, nil}, {c.b, c.a, []string{"--mode", "postcopy"}}} {
		code, evs := c.migrate(r.Pid, append([]string{"--from", hop.from.ip, "--to", hop.to.ip}, hop.args...)...)
		res := evs[len(evs)-1]
		if code != 0 || res["outcome"] != "committed" {
			t.Fatalf("migrate %s -> %s: exit %d, result %v", hop.from.name, hop.to.name, code, res)
		}
		pages := false
		for _, e := range evs {
			pages = pages || e["event"] == "pages"
		}
		if !pages {
			t.Fatalf("migrate %s -> %s: no post-copy: %v", hop.from.name, hop.to.name, evs)
		}
		// A, G and B (the zombie Z has no namespaces to be found by;
		// the tree checks it itself).
		for _, p := range strings.Split(before.Fields["pids"], ",")[:3] {
			n, _ := strconv.Atoi(p)
			waitFor(t, "process "+p+" on "+hop.to.name, 10*time.Second, func() bool { return hop.to.find(n) != 0 })
		}
		w = testutil.Attach(t, hop.to.find(r.Pid), report)
		checkSame(t, before, w.Report(t))
		checks := w.Report(t).Int("checks")
		w.Signal(unix.SIGUSR2)
		waitFor(t, "the tree's check", 10*time.Second, func() bool { return w.Report(t).Int("checks") > checks })
		if got := w.Report(t).Fields["check"]; got != "ok" {
			t.Fatalf("on %s: %s", hop.to.name, got)
		}
	}
}

func TestMigratePidNamespace(t *testing.T) {
	// A tree that is the init of its own PID namespace (pidns.py under
	// unshare --pid --fork), migrated A -> B in post-copy: the source
	// serves its pages by the PIDs the images give (the namespace's), and
	// the tree goes on and checks itself on B.
	c := newCluster(t)
	dir := t.TempDir()
	report := filepath.Join(dir, "report")
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "pidns.py")
	c.a.daemon(t, filepath.Join(dir, "log"), "unshare", "--pid", "--fork", "python3", script, report)
	migrateInit(t, c, report, -1)
}

func TestMigrateUserNamespace(t *testing.T) {
	// A tree in a user namespace of its own that maps its root to an
	// unprivileged uid, with PID, mount, UTS, IPC and network namespaces
	// of its own (userns.py, as a rootless container is), migrated A -> B
	// in post-copy: born on B in a new user namespace with the same maps,
	// its pages pulled through userfaultfds its processes made through
	// /dev/userfaultfd; it goes on and checks itself there.
	c := newCluster(t)
	dir := t.TempDir()
	report := filepath.Join(dir, "report")
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "userns.py")
	c.a.daemon(t, filepath.Join(dir, "log"), "python3", script, report)
	migrateInit(t, c, report, 0)
}

// migrateInit migrates the init of a PID namespace that reports to
// report from A to B in post-copy, and has it check itself there. onA
// is its PID on A: 0 reads it from REPORT.init, -1 from its NSpid.
func migrateInit(t *testing.T, c *cluster, report string, onA int) {
	t.Helper()
	var init int
	waitFor(t, "the workload's first report", 30*time.Second, func() bool {
		r, err := testutil.ParseReport(report)
		if err == nil && r.Pid > 0 {
			init = initOf(t, report, 0)
		}
		return init != 0
	})
	switch onA {
	case 0:
		b, err := os.ReadFile(report + ".init")
		if err != nil {
			t.Fatal(err)
		}
		onA, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	case -1:
		st, err := proc.ReadStatus(init)
		if err != nil || len(st.NSpid) != 3 {
			t.Fatalf("the init %d: NSpid %v (%v)", init, st.NSpid, err)
		}
		onA = st.NSpid[1]
	}
	w := testutil.Attach(t, init, report)
	before := w.Report(t)
	code, evs := c.migrate(onA, "--from", c.a.ip, "--to", c.b.ip, "--mode", "postcopy")
	if res := evs[len(evs)-1]; code != 0 || res["outcome"] != "committed" {
		t.Fatalf("migrate: exit %d, result %v", code, res)
	}
	var moved int
	waitFor(t, "the tree on B", 10*time.Second, func() bool { moved = initOf(t, report, init); return moved != 0 })
	w = testutil.Attach(t, moved, report)
	after := w.Report(t)
	if after.Token != before.Token || after.Counter <= before.Counter {
		t.Fatalf("on B: %v, before %v", after, before)
	}
	w.Signal(unix.SIGUSR2)
	waitFor(t, "the tree's check", 10*time.Second, func() bool { return w.Report(t).Fields["check"] != "unchecked" })
	if got := w.Report(t).Fields["check"]; got != "ok" {
		t.Fatalf("on B: %s", got)
	}
}

// initOf finds, by its PID here, the init of userns.py's PID namespace
// reporting to report (its command line names it), but not not.
func initOf(t testing.TB, report string, not int) int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == not {
			continue
		}
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if !strings.Contains(string(cmd), report) || !testutil.PidAlive(pid) {
			continue
		}
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		for _, l := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(l, "NSpid:"); ok {
				if f := strings.Fields(v); len(f) == 3 && f[2] == "1" {
					return pid
				}
			}
		}
	}
	return 0
}

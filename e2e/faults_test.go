package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferrycr/ferry/internal/testutil"
)

// migrateWatch runs migrate like migrate does, calling on with each event
// as it comes; it returns the exit status and the last event.
func (c *cluster) migrateWatch(pid int, on func(cmd *exec.Cmd, e map[string]any), extra ...string) (int, map[string]any) {
	t := c.t
	t.Helper()
	cmd := c.migrateCmd(pid, extra...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var last map[string]any
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("migrate --json printed %q", sc.Text())
		}
		last = e
		if on != nil {
			on(cmd, e)
		}
	}
	err = cmd.Wait()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), last
	} else if err != nil {
		t.Fatal(err)
	}
	return 0, last
}

// setLink brings the veth between the hosts up or down (both ends).
func (c *cluster) setLink(up bool) {
	state := "down"
	if up {
		state = "up"
	}
	run(c.t, "ip", "-n", c.a.netns, "link", "set", c.links[0], state)
	run(c.t, "ip", "-n", c.b.netns, "link", "set", c.links[1], state)
}

func TestMigrateTargetAgentDiesInRounds(t *testing.T) {
	// B's agent is killed once the first pre-copy round is done: the next
	// round fails, and the source, never frozen, runs on.
	c := newCluster(t)
	w, pid := c.startWorkload("-m", "64", "-t", "2", "-C", "-c", "40")
	before := w.Report(t)
	code, last := c.migrateWatch(pid, func(_ *exec.Cmd, e map[string]any) {
		if e["event"] == "round" && e["round"] == 1.0 {
			c.stopAgent(c.b)
		}
	}, "--mode", "precopy", "--max-downtime", "1ms", "--max-rounds", "20")
	if code != 1 || last["outcome"] != "rolled-back" || !strings.Contains(last["error"].(string), "round") {
		t.Fatalf("migrate: exit %d, result %v; want exit 1, rolled back in a round", code, last)
	}
	t.Logf("rolled back: %s", last["error"])
	c.runsOnA(w, pid, before)
	// The pre-copy rounds' dirty tracker no longer watches its memory.
	if n := uffdWatched(w.Pid); n > 0 {
		t.Fatalf("%d areas of the rolled-back source are still write-protected by a tracker", n)
	}
}

// uffdWatched counts the areas of pid a userfaultfd write-protects.
func uffdWatched(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if f, ok := strings.CutPrefix(l, "VmFlags:"); ok && slices.Contains(strings.Fields(f), "uw") {
			n++
		}
	}
	return n
}

func TestMigrateNetworkCutBeforeRestore(t *testing.T) {
	// The link between the hosts goes down once the source is frozen and
	// its images are on B, before the restore (an action script cuts it
	// at post-dump). migrate learns it within seconds (keepalive), cannot
	// tell B to roll back, and leaves the source frozen: unresolved. When
	// the link is back, B (lease run out) has rolled back, and A, asking
	// it, resumes the source. It never runs on both hosts.
	c := newCluster(t)
	w, pid := c.startWorkload("-m", "32", "-C", "-c", "10")
	before := w.Report(t)
	script := filepath.Join(t.TempDir(), "cut")
	os.WriteFile(script, []byte(fmt.Sprintf("#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\nip -n %s link set %s down\nip -n %s link set %s down\n",
		c.a.netns, c.links[0], c.b.netns, c.links[1])), 0o755)
	smp := c.sample(pid)
	code, last := c.migrateWatch(pid, nil, "--mode", "precopy", "--lease", "2s", "--action-script", script)
	if code != 3 || last["outcome"] != "unresolved" {
		t.Fatalf("migrate: exit %d, result %v; want exit 3, unresolved", code, last)
	}
	t.Logf("unresolved: %s", last["error"])
	frozen(t, w)
	time.Sleep(3 * time.Second) // past the lease: the source must stay frozen all the same
	frozen(t, w)
	c.setLink(true)
	waitFor(t, "A's agent to resume the source", 30*time.Second, func() bool { return procState(w.Pid) != 'T' })
	smp.check(t)
	c.runsOnA(w, pid, before)
}

func TestMigrateNetworkCutInPostcopy(t *testing.T) {
	// The link goes down while the process, resumed on B, still pulls
	// pages from A (served slowly). B's page stream fails (it gives up on
	// a silent peer within transport.DeadPeer) and B kills its copy; A's
	// source stays frozen until it learns that from B, once the link is
	// back. It never runs on both hosts.
	c := newClusterWith(t, []string{"--fault", "slow-pages"}, nil)
	w, pid := c.startWorkload("-m", "64", "-C", "-c", "5")
	before := w.Report(t)
	smp := c.sample(pid)
	code, last := c.migrateWatch(pid, func(_ *exec.Cmd, e map[string]any) {
		if e["event"] == "restored" {
			c.setLink(false)
		}
	}, "--mode", "postcopy", "--lease", "2s")
	if code != 3 || last["outcome"] != "unresolved" {
		t.Fatalf("migrate: exit %d, result %v; want exit 3, unresolved", code, last)
	}
	t.Logf("unresolved: %s", last["error"])
	waitFor(t, "B to kill its copy", 40*time.Second, func() bool { return c.b.find(pid) == 0 })
	frozen(t, w)
	c.setLink(true)
	waitFor(t, "A's agent to resume the source", 30*time.Second, func() bool { return procState(w.Pid) != 'T' })
	smp.check(t)
	c.runsOnA(w, pid, before)
}

// frozen fails t unless the source w is stopped (SIGSTOP).
func frozen(t testing.TB, w *testutil.Workload) {
	t.Helper()
	if st := procState(w.Pid); st != 'T' {
		t.Fatalf("the source is %q while B cannot be asked; want it stopped (T)", st)
	}
}

// runsOnA fails unless the workload w runs on A, the process it was
// (before), and nothing of it (PID pid) runs on B.
func (c *cluster) runsOnA(w *testutil.Workload, pid int, before testutil.Report) {
	t := c.t
	t.Helper()
	if st := procState(w.Pid); st == 0 || st == 'T' {
		t.Fatalf("the source on A is %q; want it running", st)
	}
	checkSame(t, before, w.Report(t))
	if p := c.b.find(pid); p != 0 {
		t.Fatalf("a copy runs on B (PID %d here)", p)
	}
}

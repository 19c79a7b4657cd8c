package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/testutil"
)

// A service network: the client's namespace C, joined by a veth pair to
// the interface that carries the service address (svcIP). That interface
// starts on host A and moves to host B with the workload, as a service
// address moves with its service: its MAC goes with it, so the client
// keeps talking to the same neighbour.
const (
	svcIP    = "10.78.1.100"
	clientIP = "10.78.1.2"
)

type serviceNet struct {
	client string // the client's network namespace
	svc    string // the service interface (on A, then on B)
}

func (c *cluster) newServiceNet() *serviceNet {
	t := c.t
	t.Helper()
	tag := fmt.Sprintf("%d-%d", os.Getpid(), seq.Add(1))
	s := &serviceNet{client: "ferry-e2e-c-" + tag, svc: "fes" + tag}
	cli := "fec" + tag
	if len(s.svc) > 15 {
		s.svc, cli = s.svc[:15], cli[:15]
	}
	run(t, "ip", "netns", "add", s.client)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", s.client).Run() })
	run(t, "ip", "-n", s.client, "link", "set", "lo", "up")
	run(t, "ip", "link", "add", cli, "netns", s.client, "type", "veth", "peer", "name", s.svc, "netns", c.a.netns)
	run(t, "ip", "-n", s.client, "addr", "add", clientIP+"/24", "dev", cli)
	run(t, "ip", "-n", s.client, "link", "set", cli, "up")
	run(t, "ip", "-n", c.a.netns, "addr", "add", svcIP+"/24", "dev", s.svc)
	run(t, "ip", "-n", c.a.netns, "link", "set", s.svc, "up")
	return s
}

// moveScript writes the action script that moves the service interface
// from A to B at post-dump, and back at rollback.
func (s *serviceNet) moveScript(t testing.TB, a, b *host) string {
	move := func(from, to *host) string {
		return fmt.Sprintf("ip -n %s link set %s netns %s && ip -n %s addr add %s/24 dev %s && ip -n %s link set %s up",
			from.netns, s.svc, to.netns, to.netns, svcIP, s.svc, to.netns, s.svc)
	}
	p := filepath.Join(t.TempDir(), "move-address")
	script := fmt.Sprintf(`#!/bin/sh
set -e
echo "action script: $CRTOOLS_SCRIPT_ACTION ($FERRY_MIGRATION_ID, pid $FERRY_PID)" >&2
case "$CRTOOLS_SCRIPT_ACTION" in
post-dump) %s ;;
rollback) %s ;;
esac
`, move(a, b), move(b, a))
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// sampler watches a migrated PID on both hosts and records every instant
// it runs on both.
type sampler struct {
	stop     chan struct{}
	done     sync.WaitGroup
	samples  int
	overlaps []string
}

func alive(pid int) bool {
	st := procState(pid)
	return st != 0 && st != 'Z'
}

func running(pid int) bool {
	switch procState(pid) {
	case 'R', 'S', 'D':
		return true
	}
	return false
}

func (c *cluster) sample(nspid int) *sampler {
	s := &sampler{stop: make(chan struct{})}
	s.done.Add(1)
	go func() {
		defer s.done.Done()
		for {
			select {
			case <-s.stop:
				return
			default:
			}
			pa, pb := c.a.find(nspid), c.b.find(nspid)
			if pa != 0 && pb != 0 && running(pa) && running(pb) {
				what := fmt.Sprintf("%s: %s has %d (%c), %s has %d (%c)",
					time.Now().Format("15:04:05.000"), c.a.name, pa, procState(pa), c.b.name, pb, procState(pb))
				// A copy killed at the commit or the rollback runs its
				// exit (R) for a moment: one that is gone soon after was
				// dying, not running the workload.
				time.Sleep(300 * time.Millisecond)
				if alive(pa) && alive(pb) {
					s.overlaps = append(s.overlaps, what)
				}
			}
			s.samples++
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return s
}

// check stops s and fails t if the process ever ran on both hosts.
func (s *sampler) check(t testing.TB) {
	t.Helper()
	close(s.stop)
	s.done.Wait()
	if len(s.overlaps) > 0 {
		t.Fatalf("the workload ran on both hosts at once (%d of %d samples): %s", len(s.overlaps), s.samples, strings.Join(s.overlaps, "; "))
	}
	t.Logf("never on both hosts at once (%d samples)", s.samples)
}

// noLocks fails t if a ferry network lock is left in namespace netns.
func noLocks(t testing.TB, netns string) {
	t.Helper()
	ns, err := os.Open("/run/netns/" + netns)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	nc, err := nftables.New(nftables.WithNetNSFd(int(ns.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	tables, err := nc.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if strings.HasPrefix(tb.Name, "ferry-lock-") {
			t.Errorf("network lock %s left in %s", tb.Name, netns)
		}
	}
}

func TestMigrateRedisTCPEstablished(t *testing.T) {
	// redis-server with 100k keys on A, serving the service address; a
	// client in its own namespace issues commands on one connection all
	// through the migration. The address moves to B at post-dump
	// (migrate --action-script); --tcp-established moves the connection
	// with it. The client must see no error and every key.
	testRedis(t, false)
}

func TestMigrateRedisRollback(t *testing.T) {
	// The same in pre-copy, but B fails after its restore: the address
	// moves back (the rollback stage), B's copy goes without a word to
	// the client, and A's redis resumes with its connection released
	// from repair mode. The client sees no error.
	testRedis(t, true)
}

func testRedis(t testing.TB, fail bool) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Skip("redis-server is not installed (make deps installs it)")
	}
	var c *cluster
	if fail {
		c = newCluster(t, "--fault", "after-restore")
	} else {
		c = newCluster(t)
	}
	sn := c.newServiceNet()
	dir := t.TempDir()
	c.a.daemon(t, filepath.Join(dir, "redis.out"), "redis-server", "--bind", svcIP, "--port", "6379", "--protected-mode", "no",
		"--save", "", "--appendonly", "no", "--dir", dir, "--logfile", filepath.Join(dir, "redis.log"),
		"--pidfile", filepath.Join(dir, "redis.pid"))
	var nspid int
	waitFor(t, "redis-server's pidfile", 20*time.Second, func() bool {
		b, err := os.ReadFile(filepath.Join(dir, "redis.pid"))
		nspid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil && nspid > 0
	})
	here := c.a.find(nspid)
	if here == 0 {
		t.Fatalf("redis-server (PID %d on A) not found", nspid)
	}
	// End it by PID wherever it runs when the test ends.
	t.Cleanup(func() {
		for _, h := range []*host{c.a, c.b} {
			if p := h.find(nspid); p != 0 {
				unix.Kill(p, unix.SIGKILL)
				testutil.WaitGone(p, 5*time.Second)
			}
		}
	})

	stop, report := filepath.Join(dir, "stop"), filepath.Join(dir, "client.json")
	client := exec.Command("ip", "netns", "exec", sn.client, "python3", "../testdata/workloads/redisclient.py",
		svcIP, "6379", "100000", stop, report)
	client.Stderr = os.Stderr
	waitFor(t, "redis-server to listen", 20*time.Second, func() bool {
		return exec.Command("ip", "netns", "exec", sn.client, "python3", "-c",
			fmt.Sprintf("import socket; socket.create_connection(('%s', 6379), timeout=1)", svcIP)).Run() == nil
	})
	if err := client.Start(); err != nil {
		t.Fatal(err)
	}
	cpid := client.Process.Pid
	t.Cleanup(func() { unix.Kill(cpid, unix.SIGKILL); client.Wait() })
	waitFor(t, "the client to load its keys", 60*time.Second, func() bool {
		if procState(cpid) == 'Z' {
			t.Fatal("the redis client ended before it was ready")
		}
		b, _ := os.ReadFile(report)
		return string(b) == "ready\n"
	})
	time.Sleep(300 * time.Millisecond) // commands under way

	smp := c.sample(nspid)
	args := []string{"--tcp-established", "--action-script", sn.moveScript(t, c.a, c.b)}
	if fail {
		// In pre-copy the copy on B stays stopped, its connections held,
		// until the commit: a rollback loses nothing. (In post-copy it
		// runs at once, and what it said is lost with it.)
		args = append(args, "--mode", "precopy")
	}
	code, evs := c.migrate(nspid, args...)
	smp.check(t)
	res := evs[len(evs)-1]
	switch {
	case fail:
		if code != 1 || res["outcome"] != "rolled-back" {
			t.Fatalf("migrate with a failing restore: exit %d, result %v", code, res)
		}
		t.Logf("rolled back: %v", res["error"])
		if p := c.a.find(nspid); p != here || !running(here) {
			t.Fatalf("redis-server does not run on A after the rollback (state %c)", procState(here))
		}
		waitFor(t, "B's copy to go", 10*time.Second, func() bool { return c.b.find(nspid) == 0 })
	default:
		if code != 0 || res["outcome"] != "committed" {
			t.Fatalf("migrate: exit %d, result %v", code, res)
		}
		t.Logf("redis migrated: downtime %.1f ms, total %.0f ms, %.1f MiB in %v rounds",
			res["downtime_ms"], res["total_ms"], res["bytes"].(float64)/(1<<20), res["rounds"])
		if p := c.b.find(nspid); p == 0 {
			t.Fatalf("redis-server (PID %d) does not run on B", nspid)
		}
		if err := testutil.WaitGone(here, 10*time.Second); err != nil {
			t.Fatalf("redis-server still runs on A: %v", err)
		}
	}
	noLocks(t, c.a.netns)
	noLocks(t, c.b.netns)

	// The client goes on for a while, then checks every key.
	time.Sleep(time.Second)
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := client.Wait(); err != nil {
		t.Fatalf("the redis client: %v", err)
	}
	var r struct {
		Ops         int      `json:"ops"`
		Errors      int      `json:"errors"`
		FirstErrors []string `json:"first_errors"`
		LongestMs   float64  `json:"longest_wait_ms"`
		Missing     int      `json:"missing_keys"`
	}
	b, _ := os.ReadFile(report)
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("the client's report %q: %v", b, err)
	}
	t.Logf("client: %d operations, longest wait %.0f ms, %d errors, %d keys missing", r.Ops, r.LongestMs, r.Errors, r.Missing)
	if r.Errors != 0 || r.Missing != 0 || r.Ops == 0 {
		t.Fatalf("the client saw %d errors (%v) and %d missing keys in %d operations", r.Errors, r.FirstErrors, r.Missing, r.Ops)
	}
}

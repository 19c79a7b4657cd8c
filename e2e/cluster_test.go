// Package e2e runs multi-host tests. Each host is a network, PID and mount
// namespace (its own /proc), joined to the other by a veth pair, with its
// own ferry agent and state directory; its PIDs start in a range of its
// own (ns_last_pid), so that a migrated PID is free on the other host and
// free again when the process comes back.
package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/testutil"
)

func needRoot(t testing.TB) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("e2e tests need root (network and PID namespaces, ptrace)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("e2e tests need ip(8) (iproute2)")
	}
}

// host is one simulated host.
type host struct {
	name    string // also its certificate's name
	netns   string
	ip      string
	pidBase int    // its PIDs start above this
	state   string // the agent's --state-dir
	run     string // the agent's --run-dir (a tmpfs)
	log     string
	init    *exec.Cmd // unshare holding the PID and mount namespaces
	initPid int       // their PID 1 (a shell), as seen from here
	pidns   string    // /proc/PID/ns/pid of the host
	agent   *exec.Cmd // nsenter running the agent
	retries int       // restarts of an agent that found its address in use
}

// cluster is two hosts and the certificates of their agents and of the
// operator.
type cluster struct {
	t     testing.TB
	ferry string
	mig   string
	pki   string
	a, b  *host
	links [2]string // the veth between them: A's end, B's end
}

var seq atomic.Int32

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newCluster makes hosts A (10.78.0.1) and B (10.78.0.2) and starts their
// agents; agentArgsB are extra options of B's agent.
func newCluster(t testing.TB, agentArgsB ...string) *cluster {
	t.Helper()
	return newClusterWith(t, nil, agentArgsB)
}

// newClusterWith is newCluster with extra options for both agents.
func newClusterWith(t testing.TB, agentArgsA, agentArgsB []string) *cluster {
	t.Helper()
	needRoot(t)
	n := seq.Add(1)
	dir := t.TempDir()
	c := &cluster{t: t, ferry: testutil.BuildCmd(t, "ferry"), mig: testutil.BuildCmd(t, "migrate"), pki: filepath.Join(dir, "pki")}
	tag := fmt.Sprintf("%d-%d", os.Getpid(), n)
	c.a = &host{name: "host-a", netns: "ferry-e2e-a-" + tag, ip: "10.78.0.1", pidBase: 10000, state: filepath.Join(dir, "a"), log: filepath.Join(dir, "a.log")}
	c.b = &host{name: "host-b", netns: "ferry-e2e-b-" + tag, ip: "10.78.0.2", pidBase: 20000, state: filepath.Join(dir, "b"), log: filepath.Join(dir, "b.log")}
	for _, h := range []*host{c.a, c.b} {
		// Records on a tmpfs, as /run/ferry would be (--run-dir).
		h.run = filepath.Join("/dev/shm", "ferry-e2e-"+tag+"-"+h.name)
		t.Cleanup(func() { os.RemoveAll(h.run) })
		run(t, "ip", "netns", "add", h.netns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", h.netns).Run() })
		run(t, "ip", "-n", h.netns, "link", "set", "lo", "up")
		c.startHost(h)
	}
	va, vb := "fea"+tag, "feb"+tag
	if len(va) > 15 {
		va, vb = va[:15], vb[:15]
	}
	c.links = [2]string{va, vb}
	run(t, "ip", "link", "add", va, "netns", c.a.netns, "type", "veth", "peer", "name", vb, "netns", c.b.netns)
	run(t, "ip", "-n", c.a.netns, "addr", "add", c.a.ip+"/24", "dev", va)
	run(t, "ip", "-n", c.b.netns, "addr", "add", c.b.ip+"/24", "dev", vb)
	run(t, "ip", "-n", c.a.netns, "link", "set", va, "up")
	run(t, "ip", "-n", c.b.netns, "link", "set", vb, "up")

	run(t, c.ferry, "certs", "init", "--dir", c.pki)
	run(t, c.ferry, "certs", "issue", "--dir", c.pki, c.a.name, "--host", c.a.ip)
	run(t, c.ferry, "certs", "issue", "--dir", c.pki, c.b.name, "--host", c.b.ip)
	run(t, c.ferry, "certs", "issue", "--dir", c.pki, "operator")

	for _, args := range [][]string{agentArgsA, agentArgsB} {
		for i := range args {
			args[i] = strings.ReplaceAll(args[i], "{pki}", c.pki)
		}
	}
	c.startAgent(c.a, agentArgsA)
	c.startAgent(c.b, agentArgsB)
	return c
}

// startHost makes h's PID and mount namespaces (inside its network
// namespace): their PID 1 is a shell that reaps what is left to it and
// sets where the host's PIDs start. Killing it (at cleanup) ends every
// process of the host.
func (c *cluster) startHost(h *host) {
	t := c.t
	t.Helper()
	h.init = exec.Command("ip", "netns", "exec", h.netns, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
		"sh", "-c", fmt.Sprintf("echo %d > /proc/sys/kernel/ns_last_pid && while :; do sleep 3600 & wait; done", h.pidBase))
	h.init.Stderr = os.Stderr
	if err := h.init.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.init.Process.Kill()
		h.init.Wait()
	})
	self := mustReadlink(t, "/proc/self/ns/pid")
	waitFor(t, h.name+"'s PID namespace", 10*time.Second, func() bool {
		for _, p := range descendants(h.init.Process.Pid)[1:] {
			if ns, err := readlink("/proc/%d/ns/pid", p); err == nil && ns != self {
				h.initPid, h.pidns = p, ns
				// ns_last_pid is set once the shell runs its loop.
				b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
				return bytes.HasPrefix(b, []byte("sh\x00"))
			}
		}
		return false
	})
	waitFor(t, h.name+"'s PID range", 10*time.Second, func() bool {
		return len(descendants(h.initPid)) > 1 // the loop's sleep: ns_last_pid is set
	})
}

// in returns the command line that runs argv on h (in its namespaces).
func (h *host) in(argv ...string) []string {
	return append([]string{"--target", strconv.Itoa(h.initPid), "--pid", "--mount", "--net", "--"}, argv...)
}

// find returns the PID, as seen from here, of the process that has PID
// nspid on h (0 if there is none).
func (h *host) find(nspid int) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ns, _ := readlink("/proc/%d/ns/pid", pid); ns != h.pidns {
			continue
		}
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "NSpid:"); ok {
				f := strings.Fields(v)
				if len(f) > 0 && f[len(f)-1] == strconv.Itoa(nspid) && testutil.PidAlive(pid) {
					return pid
				}
			}
		}
	}
	return 0
}

func (c *cluster) tls(name string) []string {
	return []string{"--tls-cacert", filepath.Join(c.pki, "ca.crt"),
		"--tls-cert", filepath.Join(c.pki, name+".crt"), "--tls-key", filepath.Join(c.pki, name+".key")}
}

// startAgent runs h's agent on h and waits until it serves.
func (c *cluster) startAgent(h *host, extra []string) {
	t := c.t
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{c.ferry, "agent", "--listen", h.ip + ":27100", "--state-dir", h.state, "--run-dir", h.run,
		"--node-name", h.name, "--status-fd", "3", "-v4", "-o", h.log}
	args = append(args, c.tls(h.name)...)
	args = append(args, extra...)
	h.agent = exec.Command("nsenter", h.in(args...)...)
	h.agent.ExtraFiles = []*os.File{w}
	var stderr bytes.Buffer
	h.agent.Stderr = io.MultiWriter(os.Stderr, &stderr)
	if err := h.agent.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() { c.stopAgent(h) })
	ready := make(chan error, 1)
	go func() {
		var b [1]byte
		_, err := r.Read(b[:])
		r.Close()
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			h.agent.Wait()
			h.agent = nil
			// A restarted agent may find its address still held a
			// moment by the one before (seen under load): try again.
			b, _ := os.ReadFile(h.log)
			b = append(b, stderr.Bytes()...)
			if bytes.Contains(b, []byte("address already in use")) && h.retries < 20 {
				h.retries++
				os.Remove(h.log)
				time.Sleep(250 * time.Millisecond)
				c.startAgent(h, extra)
				return
			}
			held, _ := exec.Command("ip", "netns", "exec", h.netns, "ss", "-tanp").CombinedOutput()
			t.Fatalf("agent %s did not start: %v\n%s\nsockets on %s:\n%s", h.name, err, b, h.name, held)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("agent %s: not ready after 30 s", h.name)
	}
	h.retries = 0
}

// stopAgent kills h's agent by PID (the processes it restored stay, as
// they would on a real host; the host's cleanup ends them).
func (c *cluster) stopAgent(h *host) {
	if h.agent == nil || h.agent.Process == nil {
		return
	}
	var killed []int
	for _, p := range descendants(h.agent.Process.Pid)[1:] {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p)); bytes.HasPrefix(b, []byte(c.ferry+"\x00agent")) {
			if os.Getenv("FERRY_CPUPROFILE") != "" {
				// Profiling agents: let them end and write the profile.
				unix.Kill(p, unix.SIGTERM)
				if testutil.WaitGone(p, 5*time.Second) == nil {
					continue
				}
			}
			unix.Kill(p, unix.SIGKILL)
			killed = append(killed, p)
		}
	}
	h.agent.Process.Kill()
	h.agent.Wait()
	h.agent = nil
	// Gone for good, its sockets closed: an agent started next must be
	// able to listen on the same address.
	for _, p := range killed {
		if err := testutil.WaitGone(p, 10*time.Second); err != nil {
			c.t.Logf("%s's agent: %v", h.name, err)
		}
	}
	if c.t.Failed() {
		if b, err := os.ReadFile(h.log); err == nil {
			c.t.Logf("%s's agent log:\n%s", h.name, tail(b, 60))
		}
	}
}

func tail(b []byte, lines int) []byte {
	l := bytes.Split(b, []byte("\n"))
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return bytes.Join(l, []byte("\n"))
}

func descendants(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", out[i], out[i]))
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// daemon starts argv on h as a service would run there: in a session of
// its own, a child of the host's PID 1, its output in log (a pipe would be
// held open by it).
func (h *host) daemon(t testing.TB, log string, argv ...string) {
	t.Helper()
	cmd := exec.Command("nsenter", h.in(append([]string{"setsid", "--fork"}, argv...)...)...)
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Run(); err != nil {
		t.Fatalf("starting %s on %s: %v", argv[0], h.name, err)
	}
}

// startWorkload runs memcheck on host A, as a service would run there: in
// a session of its own, a child of the host's PID 1. The Workload's Pid is
// the PID seen from here; nspid is the one on A (what migrate is given).
func (c *cluster) startWorkload(args ...string) (w *testutil.Workload, nspid int) {
	t := c.t
	t.Helper()
	bin := testutil.BuildC(t, "memcheck")
	dir := t.TempDir()
	report := filepath.Join(dir, "report")
	c.a.daemon(t, filepath.Join(dir, "log"), append(append([]string{bin}, args...), "-r", report)...)
	var r testutil.Report
	var err error
	waitFor(t, "the workload's first report", 30*time.Second, func() bool {
		r, err = testutil.ParseReport(report)
		return err == nil && r.Pid > 0
	})
	here := c.a.find(r.Pid)
	if here == 0 {
		t.Fatalf("workload PID %d not found on A", r.Pid)
	}
	w = testutil.Attach(t, here, report)
	if r.Pid <= c.a.pidBase || r.Pid >= c.b.pidBase {
		t.Fatalf("workload PID %d on A: want it in A's range above %d", r.Pid, c.a.pidBase)
	}
	return w, r.Pid
}

// migrate runs migrate on host A (the operator's shell) with --json and
// returns its exit status and events, the result last.
func (c *cluster) migrate(pid int, extra ...string) (int, []map[string]any) {
	c.t.Helper()
	cmd := c.migrateCmd(pid, extra...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatal(err)
	}
	return code, parseEvents(c.t, out.Bytes())
}

// migrateRaw runs migrate on host A without --json of its own; pid 0
// passes no PID. Output lines are parsed as JSON events.
func (c *cluster) migrateRaw(pid int, extra ...string) (int, []map[string]any) {
	c.t.Helper()
	args := []string{"netns", "exec", c.a.netns, c.mig, "--from", c.a.ip, "--to", c.b.ip}
	args = append(args, c.tls("operator")...)
	args = append(args, extra...)
	if pid > 0 {
		args = append(args, strconv.Itoa(pid))
	}
	cmd := exec.Command("ip", args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatal(err)
	}
	var evs []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			c.t.Fatalf("migrate printed a line that is not JSON: %q", sc.Text())
		}
		evs = append(evs, e)
	}
	if len(evs) == 0 {
		c.t.Fatalf("migrate printed nothing (exit %d)", code)
	}
	return code, evs
}

func (c *cluster) migrateCmd(pid int, extra ...string) *exec.Cmd {
	args := []string{"netns", "exec", c.a.netns, c.mig, "--from", c.a.ip, "--to", c.b.ip, "--json"}
	args = append(args, c.tls("operator")...)
	args = append(args, extra...)
	args = append(args, strconv.Itoa(pid))
	return exec.Command("ip", args...)
}

func parseEvents(t testing.TB, b []byte) []map[string]any {
	var evs []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("migrate --json printed a line that is not JSON: %q: %v", sc.Text(), err)
		}
		evs = append(evs, e)
	}
	if len(evs) == 0 || evs[len(evs)-1]["event"] != "result" {
		t.Fatalf("migrate --json: no result line in:\n%s", b)
	}
	return evs
}

// procState is the state letter of pid (0 if gone).
func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0
	}
	return b[i+2]
}

func waitFor(t testing.TB, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func readlink(format string, args ...any) (string, error) {
	return os.Readlink(fmt.Sprintf(format, args...))
}

func mustReadlink(t testing.TB, path string) string {
	s, err := os.Readlink(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

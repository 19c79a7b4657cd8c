package main

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
)

// startInPidNs starts the selfcheck workload script as the init of a new
// PID namespace (unshare --pid --fork, and the other unshare options given)
// and returns the init, by its PID
// here. The workload's own PIDs are the namespace's: never signal them
// from here.
func startInPidNs(t *testing.T, unshare []string, script string, args ...string) *testutil.Workload {
	t.Helper()
	needRoot(t)
	cmd := append([]string{"-c", `exec unshare "$@" 2>/dev/null`, "sh", "--pid", "--fork", "--kill-child"}, unshare...)
	cmd = append(cmd, "python3", filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", script))
	// unshare's stderr goes nowhere: it complains when its child is
	// killed, and the log is a file the tree holds, which must not change
	// between dump and restore.
	u := testutil.Start(t, "", "sh", append(cmd, args...)...)
	return onlyChild(t, u)
}

// onlyChild attaches to u's one child (the init unshare forked), which
// reports where u does.
func onlyChild(t *testing.T, u *testutil.Workload) *testutil.Workload {
	t.Helper()
	kids := proc.Children(u.Pid)
	if len(kids) != 1 {
		t.Fatalf("unshare %d has children %v", u.Pid, kids)
	}
	return testutil.Attach(t, kids[0], u.ReportPath)
}

// restoreInPidNs restores the images in dir detached and returns the
// restored root, by its PID here, after checking it is PID 1 of a PID
// namespace of its own.
func restoreInPidNs(t *testing.T, dir, reportPath string, args ...string) *testutil.Workload {
	t.Helper()
	pidfile := filepath.Join(t.TempDir(), "pid")
	mustFerry(t, append([]string{"restore", "-D", dir, "-d", "--pidfile", pidfile, "-v4", "-o", "restore.log"}, args...)...)
	r := attachPidfile(t, pidfile, reportPath)
	root := r.Pid
	if ns := nsPids(t, root); len(ns) != 2 || ns[1] != 1 {
		t.Fatalf("restored root %d has PIDs %v, want PID 1 of a namespace of its own", root, ns)
	}
	return r
}

// attachPidfile attaches to the restored root that pidfile names, whose
// reports go to reportPath.
func attachPidfile(t *testing.T, pidfile, reportPath string) *testutil.Workload {
	t.Helper()
	b, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return testutil.Attach(t, root, reportPath)
}

// testNetns makes a network namespace of the test's (ip netns add),
// removed at cleanup, and returns its name, its file and the file's inode
// (what /proc/PID/ns/net shows for a process in it).
func testNetns(t *testing.T, prefix string) (name, file string, ino uint64) {
	t.Helper()
	name = fmt.Sprintf("%s%d", prefix, os.Getpid())
	if b, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, b)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	file = "/run/netns/" + name
	var st unix.Stat_t
	if err := unix.Stat(file, &st); err != nil {
		t.Fatal(err)
	}
	return name, file, st.Ino
}

// nsPids returns pid's PIDs from ferry's namespace inward (NSpid).
func nsPids(t *testing.T, pid int) []int {
	t.Helper()
	st, err := proc.ReadStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	return st.NSpid
}

func TestDumpRestorePidNamespace(t *testing.T) {
	// A tree whose root is the init of its own PID namespace, and has a
	// UTS namespace of its own, dumped with -R so that it keeps running:
	// the restore makes a second tree in new PID and UTS namespaces, with
	// the same PIDs inside (the first still holds them in its own), the
	// root its init again, the zombie still one, the same host and domain
	// names, and it checks itself.
	w := startInPidNs(t, []string{"--uts"}, "pidns.py", "uts")
	before := w.Report(t)
	if before.Pid != 1 {
		t.Fatalf("the workload is PID %d in its namespace", before.Pid)
	}
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-R", "-v4", "-o", "dump.log")
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	root := r.Pid
	if root == w.Pid {
		t.Fatalf("restored root %d is the original", root)
	}
	mine, _ := os.Readlink("/proc/self/ns/pid")
	orig, _ := os.Readlink(proc.Path(w.Pid, "ns/pid"))
	got, _ := os.Readlink(proc.Path(root, "ns/pid"))
	if got == mine || got == orig {
		t.Fatalf("restored tree is in %s (ours %s, the original's %s)", got, mine, orig)
	}
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
	if len(proc.Children(root)) != 2 { // A and the zombie Z
		t.Fatalf("restored root has children %v", proc.Children(root))
	}
}

func TestLazyRestorePidNamespaceSameHost(t *testing.T) {
	// Post-copy on one host: `dump --lazy-pages` keeps the source frozen
	// (holding its PIDs) and serves its memory; the restore makes the
	// tree again in a new PID namespace meanwhile, running at once, its
	// pages coming from the frozen source on demand; once they are all
	// there the source dies, and the copy checks itself.
	lazySameHost(t, startInPidNs(t, nil, "pidns.py"))
}

// lazySameHost migrates w, the init of a PID namespace of its own, on
// this host by post-copy (dump --lazy-pages, lazy-pages, restore
// --lazy-pages) and has the copy check itself once every page is there.
func lazySameHost(t *testing.T, w *testutil.Workload) {
	t.Helper()
	before := w.Report(t)
	img, port := t.TempDir(), freePort(t)
	dumpDone := startDaemon(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--lazy-pages", "--address", "127.0.0.1", "--port", port, "-v4", "-o", "dump.log")
	// The target's images: all but the page data (which the dump did not
	// write: the source serves it).
	tgt := t.TempDir()
	ents, _ := os.ReadDir(img)
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "pages-") {
			b, _ := os.ReadFile(filepath.Join(img, e.Name()))
			os.WriteFile(filepath.Join(tgt, e.Name()), b, 0o600)
		}
	}
	lzDone := startDaemon(t, "lazy-pages", "-D", tgt, "--page-server", "--address", "127.0.0.1", "--port", port, "-v4", "-o", "lazy.log")
	r := restoreInPidNs(t, tgt, w.ReportPath, "--lazy-pages")
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	waitLazyPages(t, lzDone, 30*time.Second)
	select {
	case code := <-dumpDone:
		if code != 0 {
			t.Fatalf("dump --lazy-pages exited %d", code)
		}
	case <-time.After(30 * time.Second):
		log, _ := os.ReadFile(filepath.Join(img, "dump.log"))
		lz, _ := os.ReadFile(filepath.Join(tgt, "lazy.log"))
		t.Fatalf("dump --lazy-pages did not finish:\n%s\nlazy-pages:\n%s", log[max(0, len(log)-1000):], lz[max(0, len(lz)-3000):])
	}
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatalf("the source: %v", err)
	}
	checkSelf(t, r)
}

func TestDumpRefusesOtherNamespaces(t *testing.T) {
	// A process with a network namespace made before its user namespace
	// (which the user namespace does not own), one that is not its PID
	// namespace's init, and one whose network namespace a process outside
	// the tree joined: each dump fails naming the namespace, and the
	// process runs on.
	needRoot(t)
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "guard.py")
	w := testutil.Start(t, "", "unshare", "--net", "unshare", "--user", "--map-root-user", "python3", script)
	checkRefused(t, w, "net namespace of", "belongs to", "made before it")
	checkRunsOn(t, w)
	u := testutil.Start(t, "", "unshare", "--pid", "--fork", "--kill-child", "sh", "-c", "python3 "+script+" \"$0\"; :")
	kids := proc.Children(u.Pid)
	if len(kids) != 1 {
		t.Fatalf("unshare %d has children %v", u.Pid, kids)
	}
	sh := testutil.Attach(t, kids[0], u.ReportPath)
	py := proc.Children(sh.Pid)
	if len(py) != 1 {
		t.Fatalf("sh %d has children %v", sh.Pid, py)
	}
	w2 := testutil.Attach(t, py[0], u.ReportPath)
	checkRefused(t, w2, "not its init")
	checkRunsOn(t, w2)
	// A network namespace of its own that another process (outside the
	// tree) joined too.
	w3 := testutil.Start(t, "", "unshare", "--net", "python3", script)
	other := exec.Command("nsenter", "-t", strconv.Itoa(w3.Pid), "-n", "sleep", "600")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Process.Kill(); other.Wait() })
	want, _ := proc.Namespace(w3.Pid, "net")
	if !waitFor(5*time.Second, func() bool { got, _ := proc.Namespace(other.Process.Pid, "net"); return got == want }) {
		t.Fatal("nsenter did not join the namespace")
	}
	checkRefused(t, w3, fmt.Sprintf("process %d, outside the tree", other.Process.Pid), "net namespace")
	checkRunsOn(t, w3)
}

// checkRunsOn fails t unless w still answers and is not stopped.
func checkRunsOn(t *testing.T, w *testutil.Workload) {
	t.Helper()
	if r := w.Report(t); r.Status != "ok" {
		t.Fatalf("after the refusal: %v", r)
	}
	if st, err := proc.ReadStat(w.Pid); err != nil || st.State == 'T' || st.State == 't' {
		t.Fatalf("after the refusal, process %d: state %c, %v", w.Pid, st.State, err)
	}
}

func TestDumpRestoreNetNamespace(t *testing.T) {
	// A server that is the init of its own PID, network, UTS, IPC and
	// mount (its own /proc) namespaces, reached through a veth from a
	// "host" namespace the test
	// makes (its end in a bridge there): dumped, and restored with
	// --external veth[eth0]:vh@br0, it has its link, address, MTU and
	// route, a bridge of its own with a VXLAN port, sysctls and nftables
	// table again, and the host reaches it through the bridge.
	needRoot(t)
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	hostNs, _, _ := testNetns(t, "fyh")
	sh("ip", "-n", hostNs, "link", "set", "lo", "up")
	sh("ip", "-n", hostNs, "link", "add", "br0", "type", "bridge")
	sh("ip", "-n", hostNs, "addr", "add", "10.99.0.1/24", "dev", "br0")
	sh("ip", "-n", hostNs, "link", "set", "br0", "up")
	w := startInPidNs(t, []string{"--net", "--uts", "--ipc", "--mount", "--mount-proc"}, "netns.py")
	init := strconv.Itoa(w.Pid)
	sh("ip", "link", "add", "vh", "netns", hostNs, "type", "veth", "peer", "name", "eth0", "netns", init)
	sh("ip", "-n", hostNs, "link", "set", "vh", "master", "br0", "up")
	// A macvlan too, on a link of the host namespace (one end of a veth:
	// this kernel has no dummy links).
	sh("ip", "-n", hostNs, "link", "add", "dm0", "type", "veth", "peer", "name", "dm1")
	sh("ip", "-n", hostNs, "link", "set", "dm0", "up")
	sh("ip", "-n", hostNs, "link", "add", "mv0", "link", "dm0", "type", "macvlan", "mode", "private")
	sh("ip", "-n", hostNs, "link", "set", "mv0", "netns", init)
	for _, c := range [][]string{{"link", "set", "lo", "up"}, {"addr", "add", "10.99.0.2/24", "dev", "eth0"},
		{"link", "set", "eth0", "mtu", "1400", "up"}, {"route", "add", "default", "via", "10.99.0.1"},
		{"addr", "add", "10.98.0.2/24", "dev", "mv0"}, {"link", "set", "mv0", "up"},
		// A gateway off every subnet (onlink, as some CNIs route pods)
		// and a route with metrics.
		{"route", "add", "10.96.0.0/16", "via", "10.95.0.1", "dev", "eth0", "onlink"},
		{"route", "add", "10.94.0.0/16", "via", "10.99.0.1", "mtu", "lock", "1300", "advmss", "1200", "initcwnd", "10", "quickack", "1"},
		// Policy routing: rules to tables of their own, routes there and
		// ones that drop, and a default rule removed.
		{"rule", "add", "fwmark", "0x10/0xff", "table", "100", "priority", "100"},
		{"rule", "add", "from", "10.99.0.0/24", "to", "10.50.0.0/16", "ipproto", "tcp", "dport", "80-90", "lookup", "101", "priority", "200"},
		{"rule", "del", "priority", "32767"},
		{"route", "add", "default", "via", "10.99.0.1", "table", "100"},
		{"route", "add", "unreachable", "10.92.0.0/16", "table", "101"},
		{"route", "add", "blackhole", "10.93.0.0/16"},
		// And a multipath route.
		{"route", "add", "10.91.0.0/16", "nexthop", "via", "10.99.0.1", "dev", "eth0", "weight", "1",
			"nexthop", "via", "10.99.0.3", "dev", "eth0", "weight", "3"}} {
		sh(append([]string{"nsenter", "-t", init, "-n", "ip"}, c...)...)
	}
	macvlan := func(pid string) string {
		var keep []string
		for _, what := range []string{"link", "addr"} {
			out, err := exec.Command("nsenter", "-t", pid, "-n", "ip", "-d", "-o", what, "show", "mv0").CombinedOutput()
			if err != nil {
				t.Fatalf("ip %s show mv0: %v\n%s", what, err, out)
			}
			f := strings.Fields(string(out))
			for i, w := range f {
				switch {
				case w == "macvlan" && i+2 < len(f) && f[i+1] == "mode":
					keep = append(keep, w, f[i+1], f[i+2])
				case (w == "link/ether" || w == "inet") && i+1 < len(f):
					keep = append(keep, w, f[i+1])
				}
			}
		}
		return strings.Join(keep, " ")
	}
	mvBefore := macvlan(init)
	// A bridge of the namespace's own with settings that are not the
	// defaults, and a VXLAN over eth0 as its port (this kernel has no
	// dummy or VLAN links, nor VLAN filtering in bridges).
	for _, c := range [][]string{
		{"link", "add", "br1", "type", "bridge", "ageing_time", "12345", "mcast_snooping", "0"},
		{"link", "add", "vx1", "type", "vxlan", "id", "42", "dev", "eth0", "remote", "10.99.0.1", "local", "10.99.0.2", "dstport", "4789", "ttl", "7", "nolearning"},
		{"link", "set", "vx1", "master", "br1"}, {"addr", "add", "10.97.0.2/24", "dev", "br1"},
		{"link", "set", "br1", "up"}, {"link", "set", "vx1", "up"}} {
		sh(append([]string{"nsenter", "-t", init, "-n", "ip"}, c...)...)
	}
	bridged := func(pid string) string {
		out, err := exec.Command("nsenter", "-t", pid, "-n", "ip", "-d", "-j", "addr", "show").CombinedOutput()
		if err != nil {
			t.Fatalf("ip -d -j addr show: %v\n%s", err, out)
		}
		var links []struct {
			Name     string `json:"ifname"`
			Master   string `json:"master"`
			Address  string `json:"address"`
			Flags    []string
			AddrInfo []struct {
				Local  string `json:"local"`
				Prefix int    `json:"prefixlen"`
			} `json:"addr_info"`
			Info struct {
				Kind string         `json:"info_kind"`
				Data map[string]any `json:"info_data"`
			} `json:"linkinfo"`
		}
		if err := json.Unmarshal(out, &links); err != nil {
			t.Fatalf("ip -j: %v\n%s", err, out)
		}
		var keep []string
		for _, l := range links {
			if l.Name != "br1" && l.Name != "vx1" {
				continue
			}
			if l.Name == "br1" {
				// Its timers and STP state run on: the settings saved.
				d := map[string]any{}
				for _, k := range []string{"ageing_time", "hello_time", "mcast_snooping", "vlan_filtering", "vlan_default_pvid", "group_fwd_mask"} {
					d[k] = l.Info.Data[k]
				}
				l.Info.Data = d
			}
			b, _ := json.Marshal(l)
			keep = append(keep, string(b))
		}
		return strings.Join(keep, "\n")
	}
	routes := func(pid string) string {
		var all []string
		for _, c := range [][]string{{"-4", "route", "show", "table", "all"}, {"rule", "show"}, {"-6", "rule", "show"}} {
			out, err := exec.Command("nsenter", append([]string{"-t", pid, "-n", "ip"}, c...)...).CombinedOutput()
			if err != nil {
				t.Fatalf("ip %s: %v\n%s", strings.Join(c, " "), err, out)
			}
			all = append(all, string(out))
		}
		return strings.Join(all, "")
	}
	routesBefore := routes(init)
	if !strings.Contains(routesBefore, "onlink") || !strings.Contains(routesBefore, "initcwnd 10") ||
		!strings.Contains(routesBefore, "lookup 101") || strings.Contains(routesBefore, "32767:") ||
		!strings.Contains(routesBefore, "weight 3") {
		t.Fatalf("routes before the dump:\n%s", routesBefore)
	}
	// Sysctls of the namespace, its own and one of a link's.
	sysctls := map[string]string{"net/ipv4/ip_forward": "1", "net/core/somaxconn": "777",
		"net/ipv4/ip_local_port_range": "20000\t30000", "net/ipv4/conf/eth0/rp_filter": "2", "net/ipv6/conf/eth0/disable_ipv6": "1",
		// IPv6 off on the bridge and its port: with the sysctls set before
		// the links are up, the restored namespace sends nothing (its
		// OUTPUT counters, compared below, stay as they were).
		"net/ipv6/conf/br1/disable_ipv6": "1", "net/ipv6/conf/vx1/disable_ipv6": "1"}
	readSysctls := func(pid string) map[string]string {
		got := map[string]string{}
		for name := range sysctls {
			out, err := exec.Command("nsenter", "-t", pid, "-n", "cat", "/proc/sys/"+name).Output()
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			got[name] = strings.TrimSuffix(string(out), "\n")
		}
		return got
	}
	for name, v := range sysctls {
		sh("nsenter", "-t", init, "-n", "sh", "-c", fmt.Sprintf("printf '%s' > /proc/sys/%s", strings.ReplaceAll(v, "\t", " "), name))
	}
	if got := readSysctls(init); !maps.Equal(got, sysctls) {
		t.Fatalf("sysctls before the dump: %v, want %v", got, sysctls)
	}
	brBefore := bridged(init)
	if !strings.Contains(brBefore, `"master":"br1"`) || !strings.Contains(brBefore, `"mcast_snooping":0`) || !strings.Contains(brBefore, "10.97.0.2") {
		t.Fatalf("bridge and VXLAN before the dump:\n%s", brBefore)
	}
	// An nftables table with a set, a chain and a rule.
	for _, c := range [][]string{{"add", "table", "inet", "filt"},
		{"add", "set", "inet", "filt", "blocked", "{ type ipv4_addr; elements = { 10.1.2.3 } }"},
		{"add", "chain", "inet", "filt", "input", "{ type filter hook input priority 0; policy accept; }"},
		{"add", "rule", "inet", "filt", "input", "ip saddr @blocked tcp dport 7778 counter drop"}} {
		sh(append([]string{"nsenter", "-t", init, "-n", "nft"}, c...)...)
	}
	nftRuleset := func(pid string) string {
		// The table of its own (iptables-restore makes every chain of
		// its table, which iptables -A did not: compared through it).
		out, err := exec.Command("nsenter", "-t", pid, "-n", "nft", "list", "table", "inet", "filt").CombinedOutput()
		if err != nil {
			t.Fatalf("nft list table: %v\n%s", err, out)
		}
		return string(out)
	}
	// And an iptables rule (iptables-nft: a table nft must not save).
	sh("nsenter", "-t", init, "-n", "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8081", "-j", "DROP")
	iptables := func(pid string) string {
		out, err := exec.Command("nsenter", "-t", pid, "-n", "iptables-save").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables-save: %v\n%s", err, out)
		}
		var keep []string
		for _, l := range strings.Split(string(out), "\n") {
			if !strings.HasPrefix(l, "#") {
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "\n")
	}
	iptBefore := iptables(init)
	rulesBefore := nftRuleset(init)
	fromHost := func() string {
		t.Helper()
		out, err := exec.Command("ip", "netns", "exec", hostNs, "python3", "-c",
			"import socket; print(socket.create_connection(('10.99.0.2', 7777), timeout=5).recv(64).decode().strip())").CombinedOutput()
		if err != nil {
			t.Fatalf("connecting from %s: %v\n%s", hostNs, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	before := w.Report(t)
	if got := fromHost(); got != before.Token {
		t.Fatalf("the server answers %q before the dump, want %q", got, before.Token)
	}
	bin := testutil.BuildCmd(t, "ferry")
	inHost := func(args ...string) {
		t.Helper()
		cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + hostNs, bin}, args...)...)
		out, err := cmd.CombinedOutput()
		t.Logf("ferry %s (in %s):\n%s", strings.Join(args, " "), hostNs, out)
		if err != nil {
			t.Fatalf("ferry %s: %v", strings.Join(args, " "), err)
		}
	}
	img := t.TempDir()
	inHost("dump", "-t", init, "-D", img, "-v4", "-o", "dump.log")
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// The old veth goes when the kernel gets round to the dead namespace.
	if !waitFor(10*time.Second, func() bool { return exec.Command("ip", "-n", hostNs, "link", "show", "vh").Run() != nil }) {
		t.Fatal("the dead namespace's veth stays")
	}
	pidfile := filepath.Join(t.TempDir(), "pid")
	inHost("restore", "-D", img, "-d", "--pidfile", pidfile, "--external", "veth[eth0]:vh@br0", "--external", "macvlan[mv0]:dm0", "-v4", "-o", "restore.log")
	r := attachPidfile(t, pidfile, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	if got := readSysctls(strconv.Itoa(r.Pid)); !maps.Equal(got, sysctls) {
		t.Fatalf("sysctls after the restore: %v, want %v", got, sysctls)
	}
	if got := macvlan(strconv.Itoa(r.Pid)); got != mvBefore || !strings.Contains(got, "private") {
		t.Fatalf("macvlan after the restore: %q, before %q", got, mvBefore)
	}
	if got := routes(strconv.Itoa(r.Pid)); got != routesBefore {
		t.Fatalf("routes after the restore:\n%s\nbefore:\n%s", got, routesBefore)
	}
	if got := bridged(strconv.Itoa(r.Pid)); got != brBefore {
		t.Fatalf("bridge and VXLAN after the restore:\n%s\nbefore:\n%s", got, brBefore)
	}
	if got := iptables(strconv.Itoa(r.Pid)); got != iptBefore || !strings.Contains(got, "--dport 8081 -j DROP") {
		t.Fatalf("iptables after the restore:\n%s\nbefore:\n%s", got, iptBefore)
	}
	if got := nftRuleset(strconv.Itoa(r.Pid)); got != rulesBefore {
		t.Fatalf("nftables after the restore:\n%s\nbefore:\n%s", got, rulesBefore)
	}
	if got := fromHost(); got != before.Token {
		t.Fatalf("the server answers %q after the restore, want %q", got, before.Token)
	}
	checkSelf(t, r)
}

func TestDumpRestoreIpcNamespace(t *testing.T) {
	// A process with an IPC namespace of its own: its segments (attached
	// or not, one removed while attached), its message queue and its
	// semaphores come back in a new IPC namespace with their ids, keys,
	// modes and contents.
	needRoot(t)
	w := testutil.Start(t, "", "unshare", "--ipc", "python3", filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "ipcns.py"))
	checkAcross(t, w)
}

func TestDumpRestoreMountNamespace(t *testing.T) {
	// The init of its own PID and mount namespaces, with its own /proc, a
	// tmpfs holding files (one open, the working directory there) and a
	// read-only bind mount: dumped and restored, the namespace has them
	// again (the tmpfs with its files and options), and it checks itself.
	top := t.TempDir()
	if err := os.MkdirAll(filepath.Join(top, "src"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(top, "src", "file"), []byte("from src"), 0o644); err != nil {
		t.Fatal(err)
	}
	w := startInPidNs(t, []string{"--mount", "--mount-proc"}, "mntns.py", top)
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-v4", "-o", "dump.log")
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(top, "t", "a.txt")); err == nil {
		t.Fatal("the tmpfs's file shows outside its namespace")
	}
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

func TestDumpRestoreMountNamespaceRoot(t *testing.T) {
	// A mount namespace with a root of its own, as containers have: an
	// empty directory made the root (pivot_root) with the host's /usr,
	// /lib and /etc bound read-only, a proc, a tmpfs with a file and the
	// report's directory bound in. The dump finds where ferry sees that
	// root; the restore binds it, makes every mount under it and pivots
	// into it; the workload checks itself.
	root := t.TempDir()
	w := startInPidNs(t, []string{"--mount"}, "mntroot.py", root)
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-v4", "-o", "dump.log")
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

func TestPreDumpPidNamespace(t *testing.T) {
	// Pre-dump rounds of the init of its own PID namespace, then the final
	// dump of the chain: the images, every round's, carry the PIDs the
	// tree sees; the last round refers to the first for what was not
	// written since, and the chain restores in a new PID namespace.
	w := startInPidNs(t, nil, "pidns.py")
	before := w.Report(t)
	dirs := chainDirs(t, 2)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[0])
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[1], "--prev-images-dir", "../1", "-v4", "-o", "dump.log")
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if _, _, err := images.ReadPagemap(d, 1); err != nil {
			t.Fatalf("%s: no pagemap of PID 1 (the tree's own PID): %v", d, err)
		}
	}
	_, entries, _ := images.ReadPagemap(dirs[1], 1)
	inParent := 0
	for _, e := range entries {
		if e.InParent {
			inParent++
		}
	}
	if inParent == 0 {
		t.Fatal("the final round refers to no page of the pre-dump")
	}
	r := restoreInPidNs(t, dirs[1], w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

func TestRestoreJoinNs(t *testing.T) {
	// --join-ns net:FILE restores a process into an existing network
	// namespace (one made with ip netns add) instead of ferry's.
	needRoot(t)
	_, file, ino := testNetns(t, "fyj")
	w := startSelfCheck(t, "guard.py")
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	if code, out := ferry(t, "restore", "-D", img, "-d", "--join-ns", "user:"+file); code == 0 || !strings.Contains(out, "--join-ns user") {
		t.Fatalf("--join-ns user: exit %d\n%s", code, out)
	}
	mustFerry(t, "restore", "-D", img, "-d", "--join-ns", "net:"+file)
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	if got, _ := proc.Namespace(w.Pid, "net"); got != fmt.Sprintf("net:[%d]", ino) {
		t.Fatalf("restored process in %s, want %s (net:[%d])", got, file, ino)
	}
	checkSelf(t, r)
}

func TestDumpRestoreTimeNamespace(t *testing.T) {
	// The init of its own PID and time namespaces, whose clocks run with
	// offsets (unshare --time --monotonic --boottime): restored in a new
	// time namespace with the same offsets. The workload checks its
	// offsets and that CLOCK_MONOTONIC did not go back.
	w := startInPidNs(t, []string{"--time", "--monotonic", "86400", "--boottime", "172800"}, "timens.py")
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

func TestExternalNetNs(t *testing.T) {
	// A process in a network namespace that is not its own to save (made
	// with ip netns add, entered with nsenter): dumped with --external
	// net[INODE]:KEY it is left out, and the restore joins the one the
	// caller gives for KEY with --inherit-fd (refused without it).
	needRoot(t)
	_, file, ino := testNetns(t, "fyx")
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "guard.py")
	w := testutil.Start(t, "", "nsenter", "--net="+file, "python3", script)
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--external", fmt.Sprintf("net[%d]:thenet", ino))
	w.Reap(t)
	if code, out := ferry(t, "restore", "-D", img, "-d"); code == 0 || !strings.Contains(out, "--inherit-fd fd[N]:thenet") {
		t.Fatalf("restore without the namespace: exit %d\n%s", code, out)
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mustFerry(t, "restore", "-D", img, "-d", "--inherit-fd", fmt.Sprintf("fd[%d]:thenet", f.Fd()))
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	if got, _ := proc.Namespace(w.Pid, "net"); got != fmt.Sprintf("net:[%d]", ino) {
		t.Fatalf("restored process in %s, want net:[%d]", got, ino)
	}
	checkSelf(t, r)
}

func TestExternalPidNs(t *testing.T) {
	// A process that joined a PID namespace it does not own (nsenter
	// into one whose init is another process, as a pod's containers join
	// its PID namespace): dumped with --external pid[INODE]:KEY, it comes
	// back inside the namespace the caller gives with --inherit-fd, with
	// the PID it had there.
	needRoot(t)
	holder := exec.Command("unshare", "--pid", "--fork", "--kill-child", "sleep", "600")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	var inits []int
	waitFor(5*time.Second, func() bool { inits = proc.Children(holder.Process.Pid); return len(inits) == 1 })
	if len(inits) != 1 {
		t.Fatalf("unshare %d has children %v", holder.Process.Pid, inits)
	}
	var st unix.Stat_t
	nsFile := proc.Path(inits[0], "ns/pid")
	if err := unix.Stat(nsFile, &st); err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "guard.py")
	u := testutil.Start(t, "", "nsenter", "-t", strconv.Itoa(inits[0]), "-p", "--", "setsid", "python3", script)
	kids := proc.Children(u.Pid)
	if len(kids) != 1 {
		t.Fatalf("nsenter %d has children %v", u.Pid, kids)
	}
	w := testutil.Attach(t, kids[0], u.ReportPath)
	before := w.Report(t)
	inner := nsPids(t, w.Pid)
	if len(inner) != 2 || inner[1] == 1 {
		t.Fatalf("the workload has PIDs %v", inner)
	}
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--external", fmt.Sprintf("pid[%d]:thepid", st.Ino), "-v4", "-o", "dump.log")
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(nsFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pidfile := filepath.Join(t.TempDir(), "pid")
	mustFerry(t, "restore", "-D", img, "-d", "--pidfile", pidfile, "--inherit-fd", fmt.Sprintf("fd[%d]:thepid", f.Fd()), "-v4", "-o", "restore.log")
	r := attachPidfile(t, pidfile, w.ReportPath)
	root := r.Pid
	defer r.Kill()
	if got := nsPids(t, root); len(got) != 2 || got[1] != inner[1] {
		t.Fatalf("restored with PIDs %v, want PID %d of the namespace", got, inner[1])
	}
	if got, _ := proc.Namespace(root, "pid"); got != fmt.Sprintf("pid:[%d]", st.Ino) {
		t.Fatalf("restored in %s, want pid:[%d]", got, st.Ino)
	}
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

func TestDumpRestoreTun(t *testing.T) {
	// A process holding a tun device of its own network namespace (not
	// persistent: it goes with the descriptor), its address set: the
	// restore makes the device again with its address, attaches the
	// descriptor to it, leaves it as transient as it was, and the process
	// pings through it (tunself.py).
	w := startInPidNs(t, []string{"--net"}, "tunself.py")
	init := strconv.Itoa(w.Pid)
	for _, c := range [][]string{{"addr", "add", "10.77.0.1/24", "dev", "tun7"}, {"link", "set", "tun7", "up"}} {
		if out, err := exec.Command("nsenter", append([]string{"-t", init, "-n", "ip"}, c...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", c, err, out)
		}
	}
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", init, "-D", img, "-v4", "-o", "dump.log")
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	out, err := exec.Command("nsenter", "-t", strconv.Itoa(r.Pid), "-n", "ip", "-d", "addr", "show", "tun7").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "10.77.0.1/24") || strings.Contains(string(out), "persist on") {
		t.Fatalf("tun7 after the restore (%v):\n%s", err, out)
	}
	checkSelf(t, r)
}

func TestDumpRestoreThreadedPidNsInit(t *testing.T) {
	// The init of a PID namespace with threads (a container whose PID 1
	// is a Go or Java program): the dump kills it and returns (the last of
	// its threads to exit waits for the others to be reaped, so ferry
	// reaps them in whatever order they become ready), and the restore
	// makes it again with its threads.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	// unshare's stderr goes nowhere: it complains when its child is
	// killed, into the log the process holds.
	u := testutil.Start(t, "-r", "sh", "-c", `exec unshare --pid --fork --kill-child setsid "$@" 2>/dev/null`, "sh", bin, "-m", "16", "-t", "2")
	w := onlyChild(t, u)
	before := w.Report(t)
	img := t.TempDir()
	done := make(chan struct{})
	go func() {
		mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-v4", "-o", "dump.log")
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the dump of a threaded PID namespace init did not return")
	}
	if err := testutil.WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	r := restoreInPidNs(t, img, w.ReportPath)
	defer r.Kill()
	if n := len(tids(t, r.Pid)); n != 3 {
		t.Fatalf("restored init has %d threads, want 3", n)
	}
	checkContinued(t, before, r.Report(t))
}

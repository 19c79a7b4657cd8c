package main

// Core dump/restore tests. They run ferry's command line in-process (as a
// user types it) against workloads that verify their own memory, threads
// and files and report a token that lives only in their memory: a process
// that was re-run instead of restored has another token and counters that
// start from zero, and fails every test here.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/pageserver"
	"github.com/ferrycr/ferry/transport"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("dump/restore tests need root (ptrace of any task, clone3 set_tid)")
	}
}

// ferry runs one command line and returns its exit status and output.
func ferry(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var out bytes.Buffer
	code := runIO(args, &out, &out)
	t.Logf("ferry %s -> %d\n%s", strings.Join(args, " "), code, out.String())
	return code, out.String()
}

func mustFerry(t *testing.T, args ...string) string {
	t.Helper()
	code, out := ferry(t, args...)
	if code != 0 {
		t.Fatalf("ferry %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	return out
}

func tids(t *testing.T, pid int) []string {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// dumpRestore dumps w (killing it), restores it detached, and returns the
// restored workload, checking it has the same PID and thread IDs.
func dumpRestore(t *testing.T, w *testutil.Workload, dumpArgs ...string) *testutil.Workload {
	t.Helper()
	return dumpRestoreWith(t, w, dumpArgs, nil)
}

// dumpRestoreWith is dumpRestore with options for the restore too.
func dumpRestoreWith(t *testing.T, w *testutil.Workload, dumpArgs, restoreArgs []string) *testutil.Workload {
	t.Helper()
	return dumpRestoreHook(t, w, dumpArgs, restoreArgs, nil)
}

// dumpRestoreHook is dumpRestoreWith that runs between (when not nil)
// after the dump, before the restore.
func dumpRestoreHook(t *testing.T, w *testutil.Workload, dumpArgs, restoreArgs []string, between func()) *testutil.Workload {
	t.Helper()
	before := tids(t, w.Pid)
	img := t.TempDir()
	mustFerry(t, append([]string{"dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-v4", "-o", "dump.log"}, dumpArgs...)...)
	w.Reap(t)
	if testutil.PidAlive(w.Pid) {
		t.Fatalf("process %d still runs after dump", w.Pid)
	}
	if between != nil {
		between()
	}
	pidfile := filepath.Join(t.TempDir(), "pid")
	mustFerry(t, append([]string{"restore", "-D", img, "-d", "--pidfile", pidfile, "-v4", "-o", "restore.log"}, restoreArgs...)...)
	b, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := strconv.Atoi(strings.TrimSpace(string(b))); got != w.Pid {
		t.Fatalf("restored PID %d, want %d", got, w.Pid)
	}
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	if after := tids(t, w.Pid); strings.Join(after, ",") != strings.Join(before, ",") {
		t.Fatalf("thread IDs %v after restore, %v before", after, before)
	}
	return r
}

// dumpRestorePython runs a Python workload (python3 -c script args...,
// the report path last), dumps and restores it, checks that it continued,
// and returns its reports from before the dump and after the restore. The
// restored process is killed at cleanup.
func dumpRestorePython(t *testing.T, script string, args ...string) (before, after testutil.Report) {
	t.Helper()
	w := testutil.Start(t, "", "python3", append([]string{"-c", script}, args...)...)
	time.Sleep(300 * time.Millisecond)
	before = w.Report(t)
	r := dumpRestore(t, w)
	t.Cleanup(r.Kill)
	after = r.Report(t)
	checkContinued(t, before, after)
	return before, after
}

// startC builds and starts the C workload name (testdata/workloads) with
// -r REPORT, and returns it with its first report, which must be ok.
func startC(t *testing.T, name string) (*testutil.Workload, testutil.Report) {
	t.Helper()
	needRoot(t)
	w := testutil.Start(t, "-r", testutil.BuildC(t, name))
	before := w.Report(t)
	if before.Status != "ok" {
		t.Fatalf("%s before the dump: %v", name, before)
	}
	return w, before
}

func checkContinued(t *testing.T, before, after testutil.Report) {
	t.Helper()
	if after.Status != "ok" {
		t.Fatalf("workload reports failure after restore: %v", after)
	}
	if after.Pid != before.Pid {
		t.Fatalf("pid %d after restore, %d before", after.Pid, before.Pid)
	}
	if after.Token != before.Token {
		t.Fatalf("token %s after restore, %s before: the program was re-run, not restored", after.Token, before.Token)
	}
	if after.Counter <= before.Counter {
		t.Fatalf("counter %d after restore, %d before: it did not continue", after.Counter, before.Counter)
	}
}

func TestDumpRestoreMemory(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "64")
	time.Sleep(100 * time.Millisecond)
	before := w.Report(t)
	r := dumpRestore(t, w)
	after := r.Report(t)
	checkContinued(t, before, after)
}

func TestDumpRestoreThreadsSyscallsSIMD(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	out := filepath.Join(t.TempDir(), "lines")
	w := testutil.Start(t, "-r", bin, "-m", "16", "-t", "4", "-p", "-n", "-s", "-f", out)
	time.Sleep(200 * time.Millisecond)
	// One byte through the pipe first: the reader thread is then blocked
	// in read() again when the dump comes.
	w.Signal(unix.SIGUSR2)
	time.Sleep(50 * time.Millisecond)
	before := w.Report(t)
	if before.Int("piperead") != 1 {
		t.Fatalf("piperead before dump: %v", before)
	}
	r := dumpRestore(t, w)
	time.Sleep(200 * time.Millisecond)
	r.Signal(unix.SIGUSR2)
	time.Sleep(50 * time.Millisecond)
	after := r.Report(t)
	checkContinued(t, before, after)
	for i := 0; i < 4; i++ {
		k := fmt.Sprintf("thread%d", i)
		if after.Int(k) <= before.Int(k) {
			t.Errorf("%s: %d after restore, %d before", k, after.Int(k), before.Int(k))
		}
	}
	if after.Int("piperead") != 2 {
		t.Errorf("the thread blocked in read() did not get the byte written after restore: %v", after)
	}
	if after.Int("wakeups") <= before.Int("wakeups") {
		t.Errorf("the nanosleep thread did not continue: %v -> %v", before.Int("wakeups"), after.Int("wakeups"))
	}
	if after.Int("lines") <= before.Int("lines") {
		t.Errorf("lines: %d -> %d", before.Int("lines"), after.Int("lines"))
	}
}

func TestDumpRestorePython(t *testing.T) {
	needRoot(t)
	out := filepath.Join(t.TempDir(), "numbered")
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "lines.py")
	w := testutil.Start(t, "", "python3", script, out)
	time.Sleep(300 * time.Millisecond)
	before := w.Report(t)
	r := dumpRestore(t, w)
	time.Sleep(300 * time.Millisecond)
	after := r.Report(t)
	checkContinued(t, before, after)
	r.Kill()
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	for i, l := range lines {
		f := strings.Fields(l)
		if len(f) != 2 || f[0] != strconv.Itoa(i+1) || f[1] != before.Token {
			t.Fatalf("line %d of %s is %q: numbering has a gap, a restart or a foreign token", i+1, out, l)
		}
	}
	if int64(len(lines)) < after.Counter {
		t.Fatalf("%d lines in the file, the process wrote %d", len(lines), after.Counter)
	}
}

func TestDumpRestoreGo(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildGo(t, "gowork")
	w := testutil.Start(t, "", bin)
	time.Sleep(300 * time.Millisecond)
	before := w.Report(t)
	if len(tids(t, w.Pid)) < 4 {
		t.Fatalf("Go workload has only %d threads", len(tids(t, w.Pid)))
	}
	r := dumpRestore(t, w)
	time.Sleep(300 * time.Millisecond)
	after := r.Report(t)
	checkContinued(t, before, after)
	if after.Int("pongs") <= before.Int("pongs") {
		t.Errorf("goroutine ping-pong stopped: %d -> %d", before.Int("pongs"), after.Int("pongs"))
	}
}

func procState(t *testing.T, pid int) byte {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.LastIndexByte(b, ')')
	return b[i+2]
}

func TestLeaveRunningThenRestore(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8", "-t", "2")
	img := t.TempDir()
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-R")
	mid := w.Report(t)
	checkContinued(t, before, mid)
	// The PID is taken: restore must refuse and leave the original alone.
	code, out := ferry(t, "restore", "-D", img, "-d")
	if code != 1 || !strings.Contains(out, fmt.Sprintf("PID %d is in use", w.Pid)) {
		t.Fatalf("restore over a live PID: exit %d, %q", code, out)
	}
	checkContinued(t, mid, w.Report(t))
	// Once the original is gone, the snapshot restores.
	w.Kill()
	mustFerry(t, "restore", "-D", img, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	after := r.Report(t)
	if after.Status != "ok" || after.Token != before.Token || after.Counter < mid.Counter-1000000 {
		t.Fatalf("restored snapshot: %v", after)
	}
}

func TestLeaveStopped(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8", "-t", "1")
	img := t.TempDir()
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-s")
	if s := procState(t, w.Pid); s != 'T' {
		t.Fatalf("state %c after dump -s, want T (stopped)", s)
	}
	w.Signal(unix.SIGCONT)
	checkContinued(t, before, w.Report(t))
	w.Kill()
	w.Reap(t)
	mustFerry(t, "restore", "-D", img, "-d", "-s")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	deadline := time.Now().Add(5 * time.Second)
	for procState(t, w.Pid) != 'T' && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if s := procState(t, w.Pid); s != 'T' {
		t.Fatalf("state %c after restore -s, want T", s)
	}
	r.Signal(unix.SIGCONT)
	checkContinued(t, before, r.Report(t))
}

func TestRestoreWaitsAndReturnsExitCode(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "4", "-x", "7")
	img := t.TempDir()
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	done := make(chan int, 1)
	go func() {
		code, _ := ferry(t, "restore", "-D", img)
		done <- code
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !testutil.PidAlive(w.Pid) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	checkContinued(t, before, r.Report(t))
	r.Signal(unix.SIGINT)
	select {
	case code := <-done:
		if code != 7 {
			t.Fatalf("restore exited %d, want the workload's 7", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("restore did not return after the workload exited")
	}
}

func TestShow(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "4")
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-R")
	out := mustFerry(t, "show", img)
	for _, want := range []string{"inventory.img", fmt.Sprintf("core-%d.img", w.Pid), `"vmas"`, `"xstate"`, "stats-dump"} {
		if !strings.Contains(out, want) {
			t.Errorf("show output lacks %s", want)
		}
	}
	out = mustFerry(t, "show", filepath.Join(img, "pstree.img"))
	if !strings.Contains(out, fmt.Sprintf(`"pid": %d`, w.Pid)) {
		t.Errorf("show pstree: %s", out)
	}
}

// Negative paths: each gives a clear one-line error, exit status 1, and
// leaves no process behind; a failed dump leaves its target running.

func TestDumpNoSuchProcess(t *testing.T) {
	needRoot(t)
	code, out := ferry(t, "dump", "-t", "999999999", "-D", t.TempDir())
	if code != 1 || !strings.Contains(out, "no such process") {
		t.Fatalf("exit %d, %q", code, out)
	}
}

func TestRestoreMissingDir(t *testing.T) {
	needRoot(t)
	code, out := ferry(t, "restore", "-D", "/nonexistent/ferry-images", "-d")
	if code != 1 || !strings.Contains(out, "/nonexistent/ferry-images") {
		t.Fatalf("exit %d, %q", code, out)
	}
}

func TestFailedDumpLeavesTaskRunning(t *testing.T) {
	needRoot(t)
	// A netlink socket is beyond what this dump supports: the dump fails
	// after the freeze, and the task must come back exactly as it was.
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	sk := os.NewFile(uintptr(fd), "netlink")
	defer sk.Close()
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.StartWith(t, []*os.File{sk}, "-r", bin, "-m", "8", "-t", "2", "-p", "-n")
	time.Sleep(100 * time.Millisecond)
	before := w.Report(t)
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir())
	if code != 1 || !strings.Contains(out, "socket") {
		t.Fatalf("dump with a socket: exit %d, %q", code, out)
	}
	time.Sleep(100 * time.Millisecond)
	if s := procState(t, w.Pid); s == 'T' || s == 't' {
		t.Fatalf("task left in state %c", s)
	}
	st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", w.Pid))
	if !bytes.Contains(st, []byte("TracerPid:\t0\n")) {
		t.Fatalf("task still traced:\n%s", st)
	}
	after := w.Report(t)
	checkContinued(t, before, after)
	w.Signal(unix.SIGUSR2)
	time.Sleep(50 * time.Millisecond)
	if r := w.Report(t); r.Int("piperead") != before.Int("piperead")+1 || r.Int("wakeups") <= before.Int("wakeups") {
		t.Fatalf("threads in syscalls did not resume properly: %v -> %v", before, r)
	}
}

// dumpKilled dumps a small workload and returns its image dir and PID,
// with the process gone.
func dumpKilled(t *testing.T, args ...string) (string, *testutil.Workload) {
	t.Helper()
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, append([]string{"-m", "4"}, args...)...)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	return img, w
}

func expectRefused(t *testing.T, img string, pid int, want ...string) {
	t.Helper()
	code, out := ferry(t, "restore", "-D", img, "-d")
	if code != 1 {
		t.Fatalf("restore exit %d, want 1: %s", code, out)
	}
	for _, s := range want {
		if !strings.Contains(out, s) {
			t.Errorf("error %q lacks %q", out, s)
		}
	}
	if n := strings.Count(strings.TrimSpace(out), "\n"); n > 0 {
		t.Errorf("error is %d lines, want one: %q", n+1, out)
	}
	time.Sleep(20 * time.Millisecond)
	if testutil.PidAlive(pid) {
		unix.Kill(pid, unix.SIGKILL)
		t.Fatalf("a failed restore left PID %d behind", pid)
	}
}

func TestRestoreTruncatedImage(t *testing.T) {
	needRoot(t)
	img, w := dumpKilled(t)
	core := filepath.Join(img, fmt.Sprintf("core-%d.img", w.Pid))
	st, _ := os.Stat(core)
	if err := os.Truncate(core, st.Size()/2); err != nil {
		t.Fatal(err)
	}
	expectRefused(t, img, w.Pid, core, "offset", "truncated")
}

func TestRestoreBitFlippedImage(t *testing.T) {
	needRoot(t)
	img, w := dumpKilled(t)
	mm := filepath.Join(img, fmt.Sprintf("mm-%d.img", w.Pid))
	b, _ := os.ReadFile(mm)
	b[len(b)/2] ^= 0x04
	os.WriteFile(mm, b, 0o600)
	expectRefused(t, img, w.Pid, mm, "offset", "corrupt")
}

func TestRestoreVmasOutOfOrder(t *testing.T) {
	needRoot(t)
	img, w := dumpKilled(t)
	name := images.MmName(int32(w.Pid))
	var mm pb.MmCore
	if err := images.ReadOne(img, name, images.KindMm, &mm); err != nil {
		t.Fatal(err)
	}
	mm.Vmas[1], mm.Vmas[2] = mm.Vmas[2], mm.Vmas[1]
	if err := images.WriteAll(img, name, images.KindMm, &mm); err != nil {
		t.Fatal(err)
	}
	expectRefused(t, img, w.Pid, filepath.Join(img, name), "VMA 2", "out of order")
}

func TestRestoreFutureVersion(t *testing.T) {
	needRoot(t)
	img, w := dumpKilled(t)
	inv := filepath.Join(img, "inventory.img")
	b, _ := os.ReadFile(inv)
	b[12] = 9 // major version
	os.WriteFile(inv, b, 0o600)
	expectRefused(t, img, w.Pid, inv, fmt.Sprintf("format version 9.%d", images.FormatMinor))
}

func TestRestoreChangedFile(t *testing.T) {
	needRoot(t)
	out := filepath.Join(t.TempDir(), "lines")
	img, w := dumpKilled(t, "-f", out)
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("someone else wrote here\n")
	f.Close()
	expectRefused(t, img, w.Pid, out, "changed since the dump")
}

func TestRestoreSnapshotTwice(t *testing.T) {
	// The same images restore again after the first restored copy is gone:
	// restore does not consume or alter them.
	needRoot(t)
	img, w := dumpKilled(t)
	for i := 0; i < 2; i++ {
		mustFerry(t, "restore", "-D", img, "-d")
		r := testutil.Attach(t, w.Pid, w.ReportPath)
		if rep := r.Report(t); rep.Status != "ok" {
			t.Fatalf("round %d: %v", i, rep)
		}
		r.Kill()
	}
}

func TestMain(m *testing.M) {
	// Tests restore processes as children of this test binary; their exit
	// must not be swallowed by anything but wait4 by PID.
	syscall.Umask(0o022)
	if os.Getenv(rpcClientEnv) != "" {
		os.Exit(rpcClient()) // a client of ferry service (caller_test.go)
	}
	os.Exit(m.Run())
}

func TestCheck(t *testing.T) {
	needRoot(t)
	if code, out := ferry(t, "check"); code != 0 || !strings.Contains(out, "Looks good.") {
		t.Fatalf("check: exit %d, %q", code, out)
	}
	code, out := ferry(t, "check", "--all", "--json")
	if code != 0 || !strings.Contains(out, `"name": "clone3-set-tid"`) {
		t.Fatalf("check --all --json: exit %d, %q", code, out)
	}
	if code, out := ferry(t, "check", "--feature", "no-such-feature"); code != 1 || !strings.Contains(out, "unknown kernel feature") {
		t.Fatalf("unknown feature: exit %d, %q", code, out)
	}
}

// openPty returns the master and slave of a new pseudo-terminal.
func openPty(t *testing.T) (*os.File, *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); s.Close() })
	return m, s
}

func TestShellJob(t *testing.T) {
	needRoot(t)
	_, slave := openPty(t)
	bin := testutil.BuildC(t, "memcheck")
	report := filepath.Join(t.TempDir(), "report")
	// A job of a shell: in our session and process group, stdio on a
	// terminal.
	cmd := exec.Command(bin, "-m", "4", "-t", "1", "-r", report)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := testutil.Attach(t, cmd.Process.Pid, report)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(report); err == nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	before := w.Report(t)
	img := t.TempDir()
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	if code != 1 || !strings.Contains(out, "--shell-job") {
		t.Fatalf("dump of a shell job without -j: exit %d, %q", code, out)
	}
	checkContinued(t, before, w.Report(t))
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "-j")
	w.Reap(t)
	mustFerry(t, "restore", "-D", img, "-d", "-j")
	r := testutil.Attach(t, w.Pid, report)
	checkContinued(t, before, r.Report(t))
	// Its terminal, one open file description behind fds 0-2, is now
	// ferry's own standard input.
	want, _ := os.Readlink("/proc/self/fd/0")
	for fd := 0; fd <= 2; fd++ {
		got, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", w.Pid, fd))
		if got != want {
			t.Errorf("fd %d of the restored job is %q, want ferry's %q", fd, got, want)
		}
	}
}

// readMaps returns /proc/PID/maps with the inode numbers of shared
// anonymous memory blanked: restore recreates that memory as a new object.
func readMaps(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for i, l := range lines {
		f := strings.Fields(l)
		if len(f) >= 6 && f[5] == "/dev/zero" {
			f[4] = "SHMEM"
		}
		lines[i] = strings.Join(f, " ")
	}
	return strings.Join(lines, "\n")
}

func TestDumpRestoreMappingsGhostTimers(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "4", "-t", "2", "-M", "-g", t.TempDir(), "-T")
	time.Sleep(100 * time.Millisecond)
	before := w.Report(t)
	if before.Int("rtpending") != 1 || before.Int("alarms") == 0 || before.Int("ticks") == 0 {
		t.Fatalf("workload setup: %v", before)
	}
	mapsBefore := readMaps(t, w.Pid)
	r := dumpRestore(t, w)
	if got := readMaps(t, w.Pid); got != mapsBefore {
		t.Errorf("/proc/PID/maps differs after restore:\nbefore:\n%s\nafter:\n%s", mapsBefore, got)
	}
	time.Sleep(100 * time.Millisecond)
	after := r.Report(t)
	checkContinued(t, before, after)
	if after.Int("alarms") <= before.Int("alarms") || after.Int("ticks") <= before.Int("ticks") {
		t.Errorf("timers stopped: alarms %d -> %d, POSIX timer ticks %d -> %d",
			before.Int("alarms"), after.Int("alarms"), before.Int("ticks"), after.Int("ticks"))
	}
	if after.Int("tticks") <= before.Int("tticks") || after.Int("tmisses") != 0 {
		t.Errorf("the timer of worker 0 (SIGEV_THREAD_ID): ticks %d -> %d, %d signals to other threads",
			before.Int("tticks"), after.Int("tticks"), after.Int("tmisses"))
	}
	if after.Fields["timerid"] != before.Fields["timerid"] {
		t.Errorf("POSIX timer id %s after restore, %s before", after.Fields["timerid"], before.Fields["timerid"])
	}
	if after.Int("urgpending") != 1 {
		t.Fatalf("the SIGURG pending on worker 0 (SI_TKILL) is gone: %v", after)
	}
	if after.Int("rtpending") != 1 || after.Int("rtsigs") != 0 {
		t.Fatalf("the blocked queued signals were not pending after restore: %v", after)
	}
	r.Signal(unix.SIGUSR2) // unblocks them
	time.Sleep(50 * time.Millisecond)
	got := r.Report(t)
	if got.Int("rtsigs") != 2 || got.Int("rtsum") != 1234 {
		t.Fatalf("queued signals or their values lost: %d delivered, values sum %d (want 2, 1234)", got.Int("rtsigs"), got.Int("rtsum"))
	}
}

func TestGhostLimit(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "4", "-g", t.TempDir(), "-G", "2048")
	before := w.Report(t)
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir())
	if code != 1 || !strings.Contains(out, "--ghost-limit") {
		t.Fatalf("a 2 MiB deleted file under the default 1 MiB limit: exit %d, %q", code, out)
	}
	checkContinued(t, before, w.Report(t))
	r := dumpRestore(t, w, "--ghost-limit", "4M")
	if after := r.Report(t); after.Status != "ok" || after.Token != before.Token {
		t.Fatalf("after restore: %v", after)
	}
}

// rewrite replaces the single record of an image file after edit.
func rewrite[M proto.Message](t *testing.T, dir, name string, kind images.Kind, m M, edit func(M)) {
	t.Helper()
	if err := images.ReadOne(dir, name, kind, m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	if err := images.WriteAll(dir, name, kind, m); err != nil {
		t.Fatal(err)
	}
}

func TestRestoreOtherVdso(t *testing.T) {
	needRoot(t)
	img, w := dumpKilled(t)
	rewrite(t, img, "inventory.img", images.KindInventory, &pb.Inventory{}, func(inv *pb.Inventory) {
		inv.VdsoSha256[0] ^= 1
		inv.KernelRelease = "4.0.0-other"
	})
	expectRefused(t, img, w.Pid, "vDSO", "4.0.0-other")
	rewrite(t, img, "inventory.img", images.KindInventory, &pb.Inventory{}, func(inv *pb.Inventory) {
		inv.VdsoLayout[0].Size *= 2
	})
	expectRefused(t, img, w.Pid, "vDSO layout")
}

func TestRestoreMissingCPUFeatures(t *testing.T) {
	needRoot(t)
	img, w := dumpKilled(t)
	rewrite(t, img, "inventory.img", images.KindInventory, &pb.Inventory{}, func(inv *pb.Inventory) {
		inv.Xfeatures |= 1 << 62
	})
	expectRefused(t, img, w.Pid, "CPU state components", "0x4000000000000000")
}

func TestRestoreFailingMidwayLeavesNothing(t *testing.T) {
	// Valid-looking images whose pages point outside every mapping pass
	// validation and fail while the process is being built: the half-built
	// process must be gone when restore returns.
	needRoot(t)
	img, w := dumpKilled(t)
	head, entries, err := images.ReadPagemap(img, int32(w.Pid))
	if err != nil {
		t.Fatal(err)
	}
	entries[len(entries)-1].Vaddr = 0x10000000000 // no VMA there
	pw, err := images.Create(img, images.PagemapName(w.Pid), images.KindPagemap)
	if err != nil {
		t.Fatal(err)
	}
	if err := images.WritePagemap(pw, head, entries); err != nil {
		t.Fatal(err)
	}
	code, out := ferry(t, "restore", "-D", img, "-d")
	if code != 1 || !strings.Contains(out, "restoring failed") {
		t.Fatalf("exit %d, %q", code, out)
	}
	if testutil.PidAlive(w.Pid) {
		unix.Kill(w.Pid, unix.SIGKILL)
		t.Fatalf("a restore that failed midway left PID %d running", w.Pid)
	}
}

func TestRestoreFailingAfterThreadsLeavesNothing(t *testing.T) {
	// A failure once the threads exist (here: a pending signal the kernel
	// refuses): the whole thread group is killed and reaped, threads
	// before their leader, and the restore returns.
	needRoot(t)
	img, w := dumpKilled(t, "-t", "3")
	core := &pb.TaskCore{}
	name := images.CoreName(w.Pid)
	if err := images.ReadOne(img, name, images.KindCore, core); err != nil {
		t.Fatal(err)
	}
	core.SharedPending = append(core.SharedPending, &pb.SigInfo{Signo: 99, Raw: make([]byte, 128)})
	if err := images.WriteAll(img, name, images.KindCore, core); err != nil {
		t.Fatal(err)
	}
	code, out := ferry(t, "restore", "-D", img, "-d")
	if code != 1 || !strings.Contains(out, "queue signal 99") {
		t.Fatalf("exit %d, %q", code, out)
	}
	if testutil.PidAlive(w.Pid) {
		unix.Kill(w.Pid, unix.SIGKILL)
		t.Fatalf("a restore that failed after creating threads left PID %d running", w.Pid)
	}
}

func TestDumpRestoreNonRoot(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	dir, err := os.MkdirTemp("", "ferry-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	report := filepath.Join(dir, "report")
	cmd := exec.Command(bin, "-m", "4", "-t", "2", "-r", report)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{65534, 100}}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w := testutil.Attach(t, cmd.Process.Pid, report)
	for i := 0; i < 1000; i++ {
		if _, err := os.Stat(report); err == nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	before := w.Report(t)
	statusBefore := credLines(t, w.Pid)
	r := dumpRestore(t, w)
	checkContinued(t, before, r.Report(t))
	if got := credLines(t, w.Pid); got != statusBefore {
		t.Fatalf("credentials after restore:\n%s\nbefore:\n%s", got, statusBefore)
	}
	for _, tid := range tids(t, w.Pid) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", w.Pid, tid))
		if !strings.Contains(string(b), "Uid:\t65534\t65534\t65534\t65534") {
			t.Errorf("thread %s is not running as nobody", tid)
		}
	}
}

// credLines returns the credential lines of /proc/PID/status.
func credLines(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, k := range []string{"Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:"} {
			if strings.HasPrefix(l, k) {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}

func dumpStats(t *testing.T, dir string) *pb.DumpStats {
	t.Helper()
	var st pb.Stats
	if err := images.ReadOne(dir, "stats-dump", images.KindStats, &st); err != nil {
		t.Fatal(err)
	}
	return st.Dump
}

func TestPreDumpChain(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "64", "-t", "2", "-p", "-n", "-W", "-Z")
	dirs := chainDirs(t, 3)
	d1, d2, d3 := dirs[0], dirs[1], dirs[2]
	before := w.Report(t)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d1)
	// The process runs on, with the tracker parked inside it.
	checkContinued(t, before, w.Report(t))
	var inv pb.Inventory
	if err := images.ReadOne(d1, "inventory.img", images.KindInventory, &inv); err != nil {
		t.Fatal(err)
	}
	if !inv.PreDump || inv.TrackerFd <= 0 {
		t.Fatalf("pre-dump inventory: %v", &inv)
	}
	if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", w.Pid, inv.TrackerFd)); l != "anon_inode:[userfaultfd]" {
		t.Fatalf("fd %d of the process is %q, want the parked tracker", inv.TrackerFd, l)
	}
	s1 := dumpStats(t, d1)
	// Rewrites 10 buffer pages, drops 10 others (MADV_DONTNEED: they must
	// come back as zeros, not as the parent's copy), writes the pipe.
	w.Signal(unix.SIGUSR2)
	time.Sleep(100 * time.Millisecond)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d2, "--prev-images-dir", "../1")
	s2 := dumpStats(t, d2)
	if s2.PagesWritten >= s1.PagesWritten/10 || s2.PagesWritten < 10 || s2.PagesSkippedParent < s1.PagesWritten/2 {
		t.Fatalf("second round wrote %d pages (first %d), %d from the parent: not incremental",
			s2.PagesWritten, s1.PagesWritten, s2.PagesSkippedParent)
	}
	mid := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", d3, "--prev-images-dir", "../2")
	w.Reap(t)
	s3 := dumpStats(t, d3)
	if s3.PagesWritten >= s1.PagesWritten/10 {
		t.Fatalf("final dump wrote %d pages of %d", s3.PagesWritten, s1.PagesWritten)
	}
	t.Logf("pages written per round: %d, %d, %d; final dump frozen %d us", s1.PagesWritten, s2.PagesWritten, s3.PagesWritten, s3.FrozenTimeUs)
	mustFerry(t, "restore", "-D", d3, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	after := r.Report(t)
	checkContinued(t, mid, after)
	if after.Int("piperead") != mid.Int("piperead") {
		t.Fatalf("piperead %d, was %d", after.Int("piperead"), mid.Int("piperead"))
	}
	// The tracker is not part of the restored process.
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", w.Pid))
	for _, e := range ents {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", w.Pid, e.Name())); l == "anon_inode:[userfaultfd]" {
			t.Fatalf("restored process has a userfaultfd at fd %s", e.Name())
		}
	}
}

func TestPreDumpTrackerLost(t *testing.T) {
	// If the parked tracker is gone, the next round copies everything and
	// the result still restores.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "16")
	dirs := chainDirs(t, 2)
	d1, d2 := dirs[0], dirs[1]
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d1)
	var inv pb.Inventory
	if err := images.ReadOne(d1, "inventory.img", images.KindInventory, &inv); err != nil {
		t.Fatal(err)
	}
	// An incremental dump -R without --track-mem uses the tracker and then
	// takes it out of the process.
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "--prev-images-dir", d1, "-R")
	if _, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", w.Pid, inv.TrackerFd)); err == nil {
		t.Fatalf("the tracker is still at fd %d after dump -R", inv.TrackerFd)
	}
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", d2, "--prev-images-dir", "../1")
	w.Reap(t)
	if s := dumpStats(t, d2); s.PagesSkippedParent != 0 {
		t.Fatalf("%d pages taken from the parent without a tracker", s.PagesSkippedParent)
	}
	mustFerry(t, "restore", "-D", d2, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	checkContinued(t, before, r.Report(t))
}

func TestFreshPreDumpTakesOverStaleTracker(t *testing.T) {
	// A pre-dump without a parent, in a process an earlier pre-dump left
	// its tracker in, takes that tracker over: otherwise the old one keeps
	// every VMA registered, the new one gets none, and once the old one is
	// removed nothing is tracked any more.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32")
	dirs := chainDirs(t, 3)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir())
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[0])
	trackers := 0
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", w.Pid))
	for _, e := range ents {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", w.Pid, e.Name())); l == "anon_inode:[userfaultfd]" {
			trackers++
		}
	}
	if trackers != 1 {
		t.Fatalf("%d userfaultfds in the process after two pre-dumps, want 1", trackers)
	}
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[1], "--prev-images-dir", "../1", "-R", "--track-mem")
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[2], "--prev-images-dir", "../2")
	w.Reap(t)
	if s1, s3 := dumpStats(t, dirs[0]), dumpStats(t, dirs[2]); s3.PagesWritten >= s1.PagesWritten/10 {
		t.Fatalf("last round wrote %d pages of %d: tracking was lost", s3.PagesWritten, s1.PagesWritten)
	}
	mustFerry(t, "restore", "-D", dirs[2], "-d")
	checkContinued(t, before, testutil.Attach(t, w.Pid, w.ReportPath).Report(t))
}

func TestPlainDumpAfterPreDump(t *testing.T) {
	// A plain dump of a pre-dumped process ignores ferry's parked tracker
	// (and removes it from a process left running).
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8")
	d1 := t.TempDir()
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d1)
	var inv pb.Inventory
	if err := images.ReadOne(d1, "inventory.img", images.KindInventory, &inv); err != nil {
		t.Fatal(err)
	}
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "-R")
	if _, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", w.Pid, inv.TrackerFd)); err == nil {
		t.Fatalf("the stale tracker is still at fd %d", inv.TrackerFd)
	}
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	mustFerry(t, "restore", "-D", img, "-d")
	checkContinued(t, before, testutil.Attach(t, w.Pid, w.ReportPath).Report(t))
}

func TestRestoreMissingParentRefusedUpFront(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8")
	dirs := chainDirs(t, 2)
	d1, d2 := dirs[0], dirs[1]
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d1)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", d2, "--prev-images-dir", "../1")
	w.Reap(t)
	if err := os.RemoveAll(d1); err != nil {
		t.Fatal(err)
	}
	code, out := ferry(t, "restore", "-D", d2, "-d")
	if code != 1 || !strings.Contains(out, "parent images") || !strings.Contains(out, d1) {
		t.Fatalf("exit %d, %q", code, out)
	}
	if strings.Contains(out, "restore "+strconv.Itoa(w.Pid)+":") {
		t.Fatalf("the missing parent was found only while building the process: %q", out)
	}
	if testutil.PidAlive(w.Pid) {
		t.Fatalf("PID %d left behind", w.Pid)
	}
}

func TestDumpTrackMemSnapshots(t *testing.T) {
	// dump -R --track-mem: periodic snapshots, each storing only what
	// changed since the previous one.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-W")
	dirs := chainDirs(t, 2)
	d1, d2 := dirs[0], dirs[1]
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", d1, "-R", "--track-mem")
	w.Signal(unix.SIGUSR2)
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", d2, "--prev-images-dir", "../1", "-R", "--track-mem")
	s1, s2 := dumpStats(t, d1), dumpStats(t, d2)
	if s2.PagesWritten*10 > s1.PagesWritten || s2.PagesSkippedParent == 0 {
		t.Fatalf("second snapshot wrote %d pages (first %d), %d from the parent", s2.PagesWritten, s1.PagesWritten, s2.PagesSkippedParent)
	}
	checkContinued(t, before, w.Report(t))
	w.Kill()
	mustFerry(t, "restore", "-D", d2, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	if rep := r.Report(t); rep.Status != "ok" || rep.Token != before.Token {
		t.Fatalf("restored snapshot: %v", rep)
	}
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestDedup(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "16", "-W")
	dirs := chainDirs(t, 2)
	d1, d2 := dirs[0], dirs[1]
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", d1)
	w.Signal(unix.SIGUSR2) // rewrites 10 pages of the buffer
	before := w.Report(t)
	pages1 := filepath.Join(d1, fmt.Sprintf("pages-%d.img", w.Pid))
	size1 := allocated(t, pages1)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", d2, "--prev-images-dir", "../1", "--auto-dedup")
	w.Reap(t)
	freed := size1 - allocated(t, pages1)
	if freed < 10*4096 {
		t.Fatalf("--auto-dedup freed %d bytes of the parent's pages, want at least the 10 rewritten pages", freed)
	}
	out := mustFerry(t, "dedup", "-D", d2)
	if !strings.Contains(out, "freed") {
		t.Fatalf("dedup: %q", out)
	}
	mustFerry(t, "restore", "-D", d2, "-d")
	checkContinued(t, before, testutil.Attach(t, w.Pid, w.ReportPath).Report(t))
}

// chainDirs makes sibling image directories 1..n for an incremental chain
// (each round refers to the previous one as ../N).
func chainDirs(t *testing.T, n int) []string {
	t.Helper()
	root := t.TempDir()
	var out []string
	for i := 1; i <= n; i++ {
		d := filepath.Join(root, strconv.Itoa(i))
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		out = append(out, d)
	}
	return out
}

func TestPreDumpChainUnderChurn(t *testing.T) {
	// The workload rewrites its whole 32 MiB churn buffer continuously,
	// also while pages are copied during pre-dumps. The restored process
	// checks that every page holds the pass it was last written in: an
	// incremental chain that missed a write, or mixed pages of different
	// instants, fails that check.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-C")
	dirs := chainDirs(t, 3)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[0])
	time.Sleep(100 * time.Millisecond)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[1], "--prev-images-dir", "../1")
	time.Sleep(100 * time.Millisecond)
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[2], "--prev-images-dir", "../2")
	w.Reap(t)
	if s := dumpStats(t, dirs[2]); s.PagesSkippedParent == 0 {
		t.Fatalf("final dump took nothing from its parent: %+v", s)
	}
	mustFerry(t, "restore", "-D", dirs[2], "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	time.Sleep(200 * time.Millisecond) // a few full passes
	after := r.Report(t)
	checkContinued(t, before, after)
	if after.Int("passes") <= before.Int("passes") {
		t.Fatalf("churn passes %d -> %d", before.Int("passes"), after.Int("passes"))
	}
}

func TestLazyRestore(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "64", "-t", "2", "-p", "-n", "-T")
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	// Without a daemon, a lazy restore is refused before anything starts.
	if code, out := ferry(t, "restore", "-D", img, "-d", "--lazy-pages"); code != 1 || !strings.Contains(out, "no lazy-pages daemon") {
		t.Fatalf("lazy restore without a daemon: exit %d, %q", code, out)
	}
	done := startDaemon(t, "lazy-pages", "-D", img, "-v4", "-o", "lazy.log")
	mustFerry(t, "restore", "-D", img, "-d", "--lazy-pages")
	rw := testutil.Attach(t, w.Pid, w.ReportPath)
	after := rw.Report(t) // verifies all its memory, faulting pages in
	checkContinued(t, before, after)
	rw.Signal(unix.SIGUSR2)
	waitLazyPages(t, done, 30*time.Second)
	// SIGUSR2 wrote to the pipe and unblocked the two queued RT signals.
	if rep := rw.Report(t); rep.Status != "ok" || rep.Int("piperead") != before.Int("piperead")+1 ||
		rep.Int("rtsigs") != 2 || rep.Int("rtsum") != 1234 {
		t.Fatalf("after post-copy: %v", rep)
	}
}

// TestLazyRestoreChildExits: a process of the tree that exits during
// post-copy (a shell's "sleep" caught in the dump) is no failure: its
// pages are no longer needed, the others are delivered.
func TestLazyRestoreChildExits(t *testing.T) {
	needRoot(t)
	// 1 MB of shell variable: pages enough to outlast the sleep by far.
	cmd := exec.Command("sh", "-c", `x=$(head -c 1000000 /dev/zero | tr '\0' a); while :; do sleep 0.1; done`)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() { unix.Kill(-pid, unix.SIGKILL); cmd.Wait() })
	sleeping := func() bool { // the variable is made, the loop runs
		for _, c := range proc.Children(pid) {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c)); string(b) == "sleep\n" {
				return true
			}
		}
		return false
	}
	for deadline := time.Now().Add(10 * time.Second); !sleeping(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the shell started no sleep")
		}
	}
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(pid), "-D", img)
	cmd.Wait()
	// Slow enough that the sleep ends long before the last page (~4 s).
	done := startDaemon(t, "lazy-pages", "-D", img, "--prefetch-rate", "256K", "-v4", "-o", "lazy.log")
	pidfile := filepath.Join(img, "restored.pid")
	mustFerry(t, "restore", "-D", img, "-d", "--lazy-pages", "--pidfile", pidfile)
	b, _ := os.ReadFile(pidfile)
	root, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pidfile: %q", b)
	}
	t.Cleanup(func() { unix.Kill(-root, unix.SIGKILL); testutil.WaitGone(root, 10*time.Second) })
	lazyLog := filepath.Join(img, "lazy.log")
	waitLazyPages(t, done, 60*time.Second, lazyLog)
	if log, _ := os.ReadFile(lazyLog); !bytes.Contains(log, []byte("a process exited during post-copy")) {
		t.Fatalf("no process exited during post-copy (was it too short?):\n%s", log)
	}
	if err := unix.Kill(root, 0); err != nil {
		t.Fatalf("the restored shell is gone: %v", err)
	}
}

// waitLazyPages fails t unless the lazy-pages daemon started by
// startDaemon (done) exits 0, having delivered every page, within timeout;
// on a failure it shows the logs named.
func waitLazyPages(t *testing.T, done chan int, timeout time.Duration, logs ...string) {
	t.Helper()
	select {
	case code := <-done:
		if code != 0 {
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, b)
			}
			t.Fatalf("lazy-pages exited %d", code)
		}
	case <-time.After(timeout):
		t.Fatal("lazy-pages did not finish delivering")
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

// startDaemon runs a ferry daemon command (page-server, lazy-pages)
// in-process with --status-fd and waits for its readiness byte; the
// returned channel yields its exit status.
func startDaemon(t *testing.T, args ...string) chan int {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	status, err := unix.Dup(int(w.Fd())) // the daemon closes its status fd
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	done := make(chan int, 1)
	go func() {
		code, _ := ferry(t, append(args, "--status-fd", strconv.Itoa(status))...)
		done <- code
	}()
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 1)
	if n, _ := r.Read(b); n != 1 || b[0] != 0 {
		t.Fatalf("%s did not report ready", args[0])
	}
	return done
}

func startPageServer(t *testing.T, dir, port string) chan int {
	return startDaemon(t, "page-server", "-D", dir, "--address", "127.0.0.1", "--port", port)
}

func TestPageServerDump(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-t", "2")
	srv, img := t.TempDir(), t.TempDir()
	port := freePort(t)
	done := startPageServer(t, srv, port)
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--page-server", "--address", "127.0.0.1", "--port", port, "--compress")
	w.Reap(t)
	if code := <-done; code != 0 {
		t.Fatalf("page-server exited %d", code)
	}
	if _, err := os.Stat(filepath.Join(img, fmt.Sprintf("pages-%d.img", w.Pid))); err == nil {
		t.Fatal("pages were written locally despite --page-server")
	}
	completeFrom(srv, img)
	mustFerry(t, "restore", "-D", srv, "-d")
	checkContinued(t, before, testutil.Attach(t, w.Pid, w.ReportPath).Report(t))
}

// completeFrom copies into dst the files of src it lacks: a page server
// holds pages and pagemap, the dump's -D the rest.
func completeFrom(dst, src string) {
	ents, _ := os.ReadDir(src)
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(dst, e.Name())); err == nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join(src, e.Name()))
		os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600)
	}
}

func TestPageServerOnInheritedSocket(t *testing.T) {
	// --ps-socket: both ends use a connection somebody else set up.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "16")
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Each ferry command takes its end over and closes it, as the binary
	// does with an inherited descriptor.
	srv, img := t.TempDir(), t.TempDir()
	done := make(chan int, 1)
	go func() {
		code, _ := ferry(t, "page-server", "-D", srv, "--ps-socket", strconv.Itoa(fds[0]))
		done <- code
	}()
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--ps-socket", strconv.Itoa(fds[1]))
	w.Reap(t)
	if code := <-done; code != 0 {
		t.Fatalf("page-server exited %d", code)
	}
	completeFrom(srv, img)
	mustFerry(t, "restore", "-D", srv, "-d")
	checkContinued(t, before, testutil.Attach(t, w.Pid, w.ReportPath).Report(t))
	if code, out := ferry(t, "page-server", "-D", srv, "--ps-socket", "999"); code != 1 || !strings.Contains(out, "--ps-socket 999") {
		t.Fatalf("a closed --ps-socket: exit %d\n%s", code, out)
	}
}

func TestDumpWithDeadPageServerKeepsTask(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8")
	before := w.Report(t)
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "--page-server", "--address", "127.0.0.1", "--port", freePort(t))
	if code != 1 || !strings.Contains(out, "page server") {
		t.Fatalf("exit %d, %q", code, out)
	}
	checkContinued(t, before, w.Report(t))
}

func TestPageServerDyingMidDumpKeepsTask(t *testing.T) {
	needRoot(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		s, err := transport.Server(c)
		if err == nil {
			s.ReadFrame(nil) // one frame, then the "server" dies
		}
		c.Close()
	}()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-t", "2")
	before := w.Report(t)
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "--page-server", "--address", "127.0.0.1", "--port", port)
	if code != 1 {
		t.Fatalf("dump to a dying page server: exit %d, %q", code, out)
	}
	checkContinued(t, before, w.Report(t))
}

// TestLazyRestoreFromPageServer: every page of a post-copy restore comes
// from a page server, through a lazy-pages daemon or through the restore
// itself (restore --page-server).
func TestLazyRestoreFromPageServer(t *testing.T) {
	needRoot(t)
	for _, way := range []string{"daemon", "restore"} {
		t.Run(way, func(t *testing.T) { testLazyRestoreFromPageServer(t, way) })
	}
}

func testLazyRestoreFromPageServer(t *testing.T, way string) {
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-t", "2", "-p")
	before := w.Report(t)
	img, tgt := t.TempDir(), t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	copyButPages(t, img, tgt)
	port := freePort(t)
	psDone := startDaemon(t, "page-server", "--lazy-pages", "-D", img, "--address", "127.0.0.1", "--port", port)
	var lzDone chan int
	if way == "daemon" {
		lzDone = startDaemon(t, "lazy-pages", "-D", tgt, "--page-server", "--address", "127.0.0.1", "--port", port, "--compress")
		mustFerry(t, "restore", "-D", tgt, "-d", "--lazy-pages")
	} else {
		// Ready once the process runs; it exits once every page is in.
		lzDone = startDaemon(t, "restore", "-D", tgt, "-d", "--lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port, "--compress")
	}
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	checkContinued(t, before, r.Report(t))
	for name, ch := range map[string]chan int{way: lzDone, "page-server": psDone} {
		select {
		case code := <-ch:
			if code != 0 {
				t.Fatalf("%s exited %d", name, code)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s did not finish", name)
		}
	}
	r.Signal(unix.SIGUSR2)
	if rep := r.Report(t); rep.Int("piperead") != before.Int("piperead")+1 {
		t.Fatalf("after post-copy: %v", rep)
	}
}

// copyButPages copies the images in dir to tgt, but for the page data:
// what a post-copy target has.
func copyButPages(t *testing.T, dir, tgt string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "pages-") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err == nil {
			err = os.WriteFile(filepath.Join(tgt, e.Name()), b, 0o600)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestLazyRestoreSourceFailure: when the page source fails during
// post-copy, the restored process must not go on with zeros where its
// memory was not delivered: the daemon fails and ends it.
func TestLazyRestoreSourceFailure(t *testing.T) {
	needRoot(t)
	for _, way := range []string{"daemon", "restore"} {
		t.Run(way, func(t *testing.T) { testLazyRestoreSourceFailure(t, way) })
	}
}

func testLazyRestoreSourceFailure(t *testing.T, way string) {
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "64")
	img, tgt := t.TempDir(), t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	copyButPages(t, img, tgt)
	// A page server that serves the dump until told to fail.
	l, err := transport.Listen("127.0.0.1:0", transport.TLS{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var broken atomic.Bool
	read, closeImages := lazypages.ImageReader(img)
	defer closeImages()
	go func() {
		s, err := pageserver.Accept(context.Background(), l, nil)
		if err != nil {
			return
		}
		defer s.Close()
		lazypages.ServePages(s, func(pid int, va uint64, buf []byte) error {
			if broken.Load() {
				return errors.New("source lost")
			}
			return read(pid, va, buf)
		}, nil)
	}()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	var done chan int
	if way == "daemon" {
		done = startDaemon(t, "lazy-pages", "-D", tgt, "--page-server", "--address", "127.0.0.1", "--port", port,
			"--prefetch-rate", "1M")
		mustFerry(t, "restore", "-D", tgt, "-d", "--lazy-pages")
	} else {
		done = startDaemon(t, "restore", "-D", tgt, "-d", "--lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
			"--prefetch-rate", "1M")
	}
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	// Stopped, it cannot notice zeros and exit by itself: it must be
	// ended by the daemon.
	r.Signal(unix.SIGSTOP)
	broken.Store(true)
	select {
	case code := <-done:
		if code != 1 {
			t.Fatalf("%s exited %d after its source failed, want 1", way, code)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not fail when its source did", way)
	}
	if err := testutil.WaitGone(r.Pid, 10*time.Second); err != nil {
		t.Fatalf("the restored process outlived its failed post-copy: %v", err)
	}
}

func lazyClient(t *testing.T, port string) *lazypages.RemoteSource {
	t.Helper()
	c, err := transport.Dial(context.Background(), net.JoinHostPort("127.0.0.1", port), transport.TLS{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := transport.Client(c, false)
	if err != nil {
		t.Fatal(err)
	}
	return lazypages.NewRemoteSource(s)
}

func TestDumpLazyPagesServesFrozenMemory(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "16")
	img, port := t.TempDir(), freePort(t)
	done := startDaemon(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--lazy-pages", "--address", "127.0.0.1", "--port", port)
	// While it serves, the process is frozen: what it sends is what is in
	// memory, page for page. The pagemap leaves the anonymous memory
	// unlisted: the page server lists it when asked.
	head, entries, err := images.ReadPagemap(img, int32(w.Pid))
	if err != nil || !head.Unlisted {
		t.Fatalf("pagemap: %v %v", head, err)
	}
	src := lazyClient(t, port)
	ranges, err := src.List(w.Pid)
	if err != nil || len(ranges) == 0 {
		t.Fatalf("list: %v %v", ranges, err)
	}
	// The list (PAGEMAP_SCAN runs) holds exactly the present pages of
	// the anonymous mappings, as /proc/PID/pagemap shows them page by page,
	// and the pagemap none of them.
	var mm pb.MmCore
	if err := images.ReadOne(img, images.MmName(w.Pid), images.KindMm, &mm); err != nil {
		t.Fatal(err)
	}
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", w.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	for _, v := range mm.Vmas {
		if v.Kind != "anon" && v.Kind != "heap" && v.Kind != "stack" {
			continue
		}
		var present, listed uint64
		e := make([]byte, 8*((v.End-v.Start)/4096))
		pm.ReadAt(e, int64(v.Start/4096*8))
		for i := 0; i < len(e); i += 8 {
			if binary.LittleEndian.Uint64(e[i:])&(3<<62) != 0 {
				present++
			}
		}
		for _, r := range ranges {
			if a, b := max(r[0], v.Start), min(r[1], v.End); a < b {
				listed += (b - a) / 4096
			}
		}
		if present != listed {
			t.Fatalf("VMA %#x-%#x: %d pages present, %d listed", v.Start, v.End, present, listed)
		}
		for _, e := range entries {
			if e.Vaddr < v.End && e.End() > v.Start {
				t.Fatalf("VMA %#x-%#x: the pagemap lists %#x+%d", v.Start, v.End, e.Vaddr, e.NrPages)
			}
		}
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", w.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	got, want := make([]byte, 4096), make([]byte, 4096)
	for _, r := range ranges[:min(len(ranges), 20)] {
		if err := src.Read(w.Pid, r[0], got); err != nil {
			t.Fatal(err)
		}
		mem.ReadAt(want, int64(r[0]))
		if !bytes.Equal(got, want) {
			t.Fatalf("page %#x differs from the process's memory", r[0])
		}
	}
	src.Close() // the daemon is done: the source may go
	if code := <-done; code != 0 {
		t.Fatalf("dump --lazy-pages exited %d", code)
	}
	w.Reap(t)
}

func TestDumpLazyPagesDaemonGoneResumes(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8", "-t", "1")
	before := w.Report(t)
	port := freePort(t)
	done := startDaemon(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "--lazy-pages", "--address", "127.0.0.1", "--port", port)
	src := lazyClient(t, port)
	// The daemon goes away without saying it is done: post-copy failed
	// before commit, so the source must run on.
	src.Abort()
	if code := <-done; code != 1 {
		t.Fatalf("dump --lazy-pages exited %d, want 1", code)
	}
	checkContinued(t, before, w.Report(t))
}

func TestInterruptedDumpReleasesTheProcess(t *testing.T) {
	// SIGINT/SIGTERM cancel ferry's context (run): a dump holding the
	// process frozen (here, waiting for a lazy-pages daemon) puts it back
	// as it was, its signal mask included, and fails.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8", "-t", "1")
	before := w.Report(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var out bytes.Buffer
	go func() {
		done <- runContext(ctx, []string{"dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "--lazy-pages",
			"--address", "127.0.0.1", "--port", freePort(t)}, &out, &out)
	}()
	if !waitFor(5*time.Second, func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", w.Pid))
		return strings.Contains(string(b), "(tracing stop)")
	}) {
		t.Fatal("the dump never froze the process")
	}
	cancel()
	if code := <-done; code != 1 || !strings.Contains(out.String(), "interrupted") {
		t.Fatalf("interrupted dump exited %d:\n%s", code, out.String())
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", w.Pid))
	if !strings.Contains(string(b), "SigBlk:\t0000000000000000") || !strings.Contains(string(b), "TracerPid:\t0") {
		t.Fatalf("process not released as it was:\n%s", b)
	}
	checkContinued(t, before, w.Report(t))
}

func TestPageServerQUICWithTLS(t *testing.T) {
	needRoot(t)
	pki := t.TempDir()
	ca := testutil.NewCA(t, "ferry-test-ca")
	caPath := ca.Write(t, pki, "ca.pem")
	sc, sk := ca.Issue(t, pki, "target", 2)
	cc, ck := ca.Issue(t, pki, "source", 3)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "16", "-t", "2")
	srv, img := t.TempDir(), t.TempDir()
	port := freePort(t)
	done := startDaemon(t, "page-server", "-D", srv, "--address", "127.0.0.1", "--port", port,
		"--transport", "quic", "--tls", "--tls-cacert", caPath, "--tls-cert", sc, "--tls-key", sk)
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--page-server", "--address", "127.0.0.1", "--port", port,
		"--transport", "quic", "--tls", "--tls-cacert", caPath, "--tls-cert", cc, "--tls-key", ck, "--compress")
	w.Reap(t)
	if code := <-done; code != 0 {
		t.Fatalf("page-server exited %d", code)
	}
	ents, _ := os.ReadDir(img)
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(srv, e.Name())); err != nil {
			b, _ := os.ReadFile(filepath.Join(img, e.Name()))
			os.WriteFile(filepath.Join(srv, e.Name()), b, 0o600)
		}
	}
	mustFerry(t, "restore", "-D", srv, "-d")
	checkContinued(t, before, testutil.Attach(t, w.Pid, w.ReportPath).Report(t))
	// Without TLS, QUIC is refused with a clear error.
	code, out := ferry(t, "page-server", "-D", srv, "--port", port, "--transport", "quic")
	if code != 1 || !strings.Contains(out, "needs --tls") {
		t.Fatalf("quic without tls: exit %d, %q", code, out)
	}
}

func TestLazyRestoreForkDuringPostCopy(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-t", "1", "-K")
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	// A slow background copy (32 MiB at 16 MiB/s) keeps post-copy going
	// while the process forks.
	done := startDaemon(t, "lazy-pages", "-D", img, "-v4", "-o", "lazy.log", "--prefetch-rate", "16M")
	mustFerry(t, "restore", "-D", img, "-d", "--lazy-pages")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	// Fork at once, while nearly every page is still pending: the child
	// verifies all of its (copy-on-write) memory.
	r.Signal(unix.SIGUSR2)
	child := w.ReportPath + ".child"
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(child); err == nil && len(b) > 0 {
			if !strings.HasPrefix(string(b), "child=ok") {
				t.Fatalf("child forked during post-copy: %s", b)
			}
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(child); err != nil {
		t.Fatal("the forked child never reported")
	}
	waitLazyPages(t, done, 60*time.Second)
	checkContinued(t, before, r.Report(t))
	log, _ := os.ReadFile(filepath.Join(img, "lazy.log"))
	if !strings.Contains(string(log), "forked during post-copy") {
		t.Fatalf("the fork happened after post-copy ended; the test proves nothing:\n%s", log)
	}
}

func TestLazyRestoreMremapMunmapDuringPostCopy(t *testing.T) {
	// While its pages are still pending, the process moves half of its
	// buffer (mremap) and unmaps 1 MiB of the other half: the moved pages
	// must arrive at their new address, the unmapped ones never.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-V")
	before := w.Report(t)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	done := startDaemon(t, "lazy-pages", "-D", img, "-v4", "-o", "lazy.log", "--prefetch-rate", "16M")
	mustFerry(t, "restore", "-D", img, "-d", "--lazy-pages")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	r.Signal(unix.SIGUSR2)
	after := r.Report(t) // verifies every page still mapped, moved ones at their new place
	checkContinued(t, before, after)
	waitLazyPages(t, done, 60*time.Second)
	checkContinued(t, before, r.Report(t))
	log, _ := os.ReadFile(filepath.Join(img, "lazy.log"))
	if !strings.Contains(string(log), "a mapping moved during post-copy") || strings.Contains(string(log), "dropped=0 ") {
		t.Fatalf("no mremap or munmap seen during post-copy; the test proves nothing:\n%s", log)
	}
}

func TestLazyRestore1GiB(t *testing.T) {
	// A 1 GiB process restored lazily verifies all of its memory. Images
	// go to tmpfs when there is one: this is about post-copy, not disks.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "1024", "-t", "2")
	before := w.Report(t)
	img := t.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "ferry-lazy-"); err == nil {
		img = d
		defer os.RemoveAll(d)
	}
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img)
	w.Reap(t)
	done := startDaemon(t, "lazy-pages", "-D", img)
	mustFerry(t, "restore", "-D", img, "-d", "--lazy-pages")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	waitLazyPages(t, done, 120*time.Second)
	checkContinued(t, before, r.Report(t))
}

func TestLazyHybridSendsOnlyNewPages(t *testing.T) {
	// Hybrid migration's memory path on one host: a pre-dump round's pages
	// are already on the target (dirs[0]); the final round (dirs[1]) is
	// served lazily by a page server, and the target (dirs[2], images
	// without page data, parent ../1) takes only the final round's own
	// pages from it.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-t", "2", "-W")
	dirs := chainDirs(t, 3)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[0])
	w.Signal(unix.SIGUSR2) // rewrite 10 pages
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[1], "--prev-images-dir", "../1")
	w.Reap(t)
	ents, _ := os.ReadDir(dirs[1])
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "pages-") {
			b, _ := os.ReadFile(filepath.Join(dirs[1], e.Name()))
			os.WriteFile(filepath.Join(dirs[2], e.Name()), b, 0o600)
		}
	}
	port := freePort(t)
	psDone := startDaemon(t, "page-server", "--lazy-pages", "-D", dirs[1], "--address", "127.0.0.1", "--port", port)
	lzDone := startDaemon(t, "lazy-pages", "-D", dirs[2], "--page-server", "--address", "127.0.0.1", "--port", port, "-v3", "-o", "lazy.log")
	mustFerry(t, "restore", "-D", dirs[2], "-d", "--lazy-pages")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	checkContinued(t, before, r.Report(t))
	for _, ch := range []chan int{lzDone, psDone} {
		select {
		case code := <-ch:
			if code != 0 {
				t.Fatalf("daemon exited %d", code)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("daemon did not finish")
		}
	}
	log, _ := os.ReadFile(filepath.Join(dirs[2], "lazy.log"))
	own := dumpStats(t, dirs[1]).PagesWritten
	var remote, local uint64
	for _, f := range strings.Fields(string(log)) {
		if v, ok := strings.CutPrefix(f, "remote="); ok {
			remote, _ = strconv.ParseUint(v, 10, 64)
		}
		if v, ok := strings.CutPrefix(f, "local="); ok {
			local, _ = strconv.ParseUint(v, 10, 64)
		}
	}
	if remote > own || local == 0 {
		t.Fatalf("post-copy fetched %d pages remotely (the final round stored %d) and %d locally:\n%s", remote, own, local, log)
	}
	t.Logf("final round stored %d pages; post-copy fetched %d remotely, %d from the pre-dump on disk", own, remote, local)
}

// waitFor polls cond every millisecond until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) bool {
	for end := time.Now().Add(timeout); time.Now().Before(end); time.Sleep(time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

func TestCompressedImages(t *testing.T) {
	// --compress without a page server: pages-*.img is one zstd stream.
	// A chain mixes a compressed pre-dump with a plain final dump; the
	// memory (a churn buffer of repeated words) shrinks on disk.
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "16", "-C")
	dirs := chainDirs(t, 2)
	mustFerry(t, "pre-dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[0], "--compress")
	head, _, err := images.ReadPagemap(dirs[0], int32(w.Pid))
	if err != nil || head.Compression != images.Zstd {
		t.Fatalf("pagemap head %v, %v", head, err)
	}
	st, err := os.Stat(filepath.Join(dirs[0], images.PagesName(w.Pid)))
	if err != nil {
		t.Fatal(err)
	}
	if raw := int64(dumpStats(t, dirs[0]).PagesWritten) * 4096; st.Size() > raw/2 {
		t.Fatalf("compressed pages file %d bytes for %d bytes of pages", st.Size(), raw)
	}
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", dirs[1], "--prev-images-dir", "../1")
	w.Reap(t)
	if n, err := images.Dedup(dirs[1]); err != nil || n != 0 {
		t.Fatalf("dedup over a compressed parent freed %d: %v", n, err)
	}
	mustFerry(t, "restore", "-D", dirs[1], "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	checkContinued(t, before, r.Report(t))
	r.Kill()

	// Lazily, from a compressed dump; then a corrupted stream is refused
	// with the file named.
	w = testutil.Start(t, "-r", bin, "-m", "16", "-C")
	img := t.TempDir()
	before = w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--compress")
	w.Reap(t)
	pages := filepath.Join(img, images.PagesName(w.Pid))
	good, _ := os.ReadFile(pages)
	done := startDaemon(t, "lazy-pages", "-D", img)
	mustFerry(t, "restore", "-D", img, "-d", "--lazy-pages")
	r = testutil.Attach(t, w.Pid, w.ReportPath)
	if code := <-done; code != 0 {
		t.Fatalf("lazy-pages exited %d", code)
	}
	checkContinued(t, before, r.Report(t))
	r.Kill()
	bad := bytes.Clone(good)
	bad[len(bad)/2] ^= 0xff
	os.WriteFile(pages, bad, 0o600)
	if code, out := ferry(t, "restore", "-D", img, "-d"); code != 1 || !strings.Contains(out, images.PagesName(w.Pid)) {
		if code == 0 {
			testutil.Attach(t, w.Pid, w.ReportPath).Kill()
		}
		t.Fatalf("corrupted compressed pages: exit %d\n%s", code, out)
	}
}

func TestCertsForPageServer(t *testing.T) {
	// ferry certs makes a CA and node certificates a TLS page server and
	// its client accept; a revoked node is refused.
	needRoot(t)
	dir := filepath.Join(t.TempDir(), "pki")
	mustFerry(t, "certs", "init", "--dir", dir)
	if code, out := ferry(t, "certs", "init", "--dir", dir); code != 1 || !strings.Contains(out, "already holds a CA") {
		t.Fatalf("second init: exit %d\n%s", code, out)
	}
	for _, n := range []string{"server", "client", "intruder"} {
		mustFerry(t, "certs", "issue", "--dir", dir, n, "--host", "127.0.0.1")
	}
	if st, err := os.Stat(filepath.Join(dir, "ca.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("ca.key: %v %v", st, err)
	}
	mustFerry(t, "certs", "revoke", "--dir", dir, "intruder")
	tlsArgs := func(node string) []string {
		return []string{"--tls", "--tls-cacert", filepath.Join(dir, "ca.crt"), "--tls-cacrl", filepath.Join(dir, "crl.pem"),
			"--tls-cert", filepath.Join(dir, node+".crt"), "--tls-key", filepath.Join(dir, node+".key")}
	}
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "8")
	srv, port := t.TempDir(), freePort(t)
	done := startDaemon(t, append([]string{"page-server", "-D", srv, "--address", "127.0.0.1", "--port", port}, tlsArgs("server")...)...)
	args := append([]string{"dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "-R", "--page-server", "--address", "127.0.0.1", "--port", port}, tlsArgs("intruder")...)
	if code, _ := ferry(t, args...); code != 1 {
		t.Fatalf("a revoked certificate was accepted")
	}
	args = append([]string{"dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir(), "-R", "--page-server", "--address", "127.0.0.1", "--port", port}, tlsArgs("client")...)
	mustFerry(t, args...)
	if code := <-done; code != 0 {
		t.Fatalf("page-server exited %d", code)
	}
}

func TestDumpRestoreFileLocks(t *testing.T) {
	// POSIX, flock and OFD locks come back (--file-locks): another process
	// still cannot take conflicting ones after the restore; so does a read
	// lease. Without --file-locks the dump refuses, naming the lock.
	needRoot(t)
	dir := t.TempDir()
	script := filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", "locks.py")
	w := testutil.Start(t, "", "python3", script, dir)
	time.Sleep(300 * time.Millisecond)
	before := w.Report(t)
	if code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir()); code != 1 || !strings.Contains(out, "--file-locks") {
		t.Fatalf("dump of a process holding locks without --file-locks: exit %d\n%s", code, out)
	}
	r := dumpRestore(t, w, "--file-locks")
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	conflicts := func() []string {
		var held []string
		f, _ := os.OpenFile(filepath.Join(dir, "posix"), os.O_RDWR, 0)
		defer f.Close()
		lk := unix.Flock_t{Type: unix.F_WRLCK, Start: 12, Len: 1}
		if err := unix.FcntlFlock(f.Fd(), unix.F_SETLK, &lk); err != nil {
			held = append(held, "posix")
		}
		g, _ := os.OpenFile(filepath.Join(dir, "flock"), os.O_RDWR, 0)
		defer g.Close()
		if err := unix.Flock(int(g.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			held = append(held, "flock")
		}
		h, _ := os.OpenFile(filepath.Join(dir, "ofd"), os.O_RDWR, 0)
		defer h.Close()
		lk = unix.Flock_t{Type: unix.F_WRLCK}
		if err := unix.FcntlFlock(h.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
			held = append(held, "ofd")
		}
		return held
	}
	if got := conflicts(); strings.Join(got, ",") != "posix,flock,ofd" {
		t.Fatalf("locks held after restore: %v, want posix, flock and ofd", got)
	}
	if l := r.Report(t).Fields["lease"]; before.Fields["lease"] != "0" || l != "0" {
		t.Fatalf("F_GETLEASE %s before, %s after restore: want 0 (F_RDLCK) both", before.Fields["lease"], l)
	}
}

func TestDumpRestoreLeasesBeingBroken(t *testing.T) {
	// Two leases being broken (leasebreak.py): a read lease going away
	// and a write lease downgrading. After the restore each is still
	// being broken, not gone and not plain: an open that conflicts still
	// waits (EWOULDBLOCK), the workload was not sent its lease-break
	// signal again, and once it completes the breaks (releasing the
	// leases) the files open.
	dir := t.TempDir()
	w := startSelfCheck(t, "leasebreak.py", dir)
	time.Sleep(300 * time.Millisecond)
	before := w.Report(t)
	if f := before.Fields; f["sigio"] != "2" || f["lease_a"] != "2" || f["lease_b"] != "0" {
		t.Fatalf("before the dump: %v", f)
	}
	r := dumpRestore(t, w, "--file-locks")
	defer r.Kill()
	after := r.Report(t)
	checkContinued(t, before, after)
	if f := after.Fields; f["sigio"] != "2" || f["lease_a"] != "2" || f["lease_b"] != "0" {
		t.Fatalf("after the restore: sigio %s (want 2: no second break signal), F_GETLEASE %s and %s (want 2 and 0)", f["sigio"], f["lease_a"], f["lease_b"])
	}
	waits := func(name string, mode int) bool {
		fd, err := unix.Open(filepath.Join(dir, name), mode|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err == nil {
			unix.Close(fd)
		}
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	if !waits("a", unix.O_WRONLY) || !waits("b", unix.O_RDONLY) {
		t.Fatalf("after the restore an open of a for writing waits: %v, of b for reading: %v; want both (the leases are still being broken)",
			waits("a", unix.O_WRONLY), waits("b", unix.O_RDONLY))
	}
	if f := r.Report(t).Fields; f["sigio"] != "2" {
		t.Fatalf("the opens sent %s lease-break signals, want 2 (the breaks were under way)", f["sigio"])
	}
	checkSelf(t, r) // completes the breaks
	if !waitFor(10*time.Second, func() bool { return !waits("a", unix.O_WRONLY) && !waits("b", unix.O_RDONLY) }) {
		t.Fatal("the files still wait for their leases after the workload completed the breaks")
	}
}

func children(pid int) []int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	var out []int
	for _, f := range strings.Fields(string(b)) {
		n, _ := strconv.Atoi(f)
		out = append(out, n)
	}
	return out
}

func TestDumpRestorePipeDescriptions(t *testing.T) {
	// Two open file descriptions of one pipe end (the second opened
	// through /proc/self/fd) keep their own flags: O_NONBLOCK on one
	// must not appear on the other.
	needRoot(t)
	script := `import os, fcntl, signal, sys, time
r, w = os.pipe()
w2 = os.open("/proc/self/fd/%d" % w, os.O_WRONLY)
fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
os.write(w, b"one")
os.write(w2, b"two")
tok = os.urandom(8).hex()
want = [True]
def usr1(*a): want[0] = True
signal.signal(signal.SIGUSR1, usr1)
seq = 0
while True:
    if want[0]:
        want[0] = False
        seq += 1
        nb = lambda fd: bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
        ok = nb(w) and not nb(w2) and os.fstat(w).st_ino == os.fstat(w2).st_ino
        open(sys.argv[1] + ".tmp", "w").write("status=%s\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\n" % ("ok" if ok else "fail", os.getpid(), tok, seq, seq))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(0.01)
`
	before, _ := dumpRestorePython(t, script)
	if before.Status != "ok" {
		t.Fatalf("before: %v", before)
	}
}

func TestDumpRestoreScheduling(t *testing.T) {
	// Per-thread scheduling (sched.py): the main thread SCHED_BATCH at
	// nice 7, a second thread SCHED_RR at real-time priority 5 with
	// reset-on-fork, and nice -3 (kept for when it leaves SCHED_RR). Set
	// as asked before the dump, and so after the restore.
	w := startSelfCheck(t, "sched.py")
	time.Sleep(300 * time.Millisecond)
	// policy/priority/nice: SCHED_BATCH 3; SCHED_RR 2 | SCHED_RESET_ON_FORK.
	if got, want := w.Report(t).Fields["sched"], "3/0/7,1073741826/5/-3"; got != want {
		t.Fatalf("scheduling before the dump: %s, want %s", got, want)
	}
	checkAcross(t, w)
}

func TestDumpRestoreSignalfdTimerfd(t *testing.T) {
	// A signalfd and two timerfds (periodic; one-shot due in 600 s): after
	// restore a raised signal arrives through the signalfd, the periodic
	// timer keeps expiring (its count goes on), the one-shot one is still
	// armed for about what was left.
	needRoot(t)
	bin := testutil.BuildC(t, "evfds")
	w := testutil.Start(t, "-r", bin)
	time.Sleep(200 * time.Millisecond)
	before := w.Report(t)
	if before.Status != "ok" {
		t.Fatalf("before: %v", before)
	}
	r := dumpRestore(t, w)
	time.Sleep(200 * time.Millisecond)
	checkContinued(t, before, r.Report(t))
}

func TestDumpRestoreSeccomp(t *testing.T) {
	// Seccomp filters per thread (seccheck.c): one the threads inherited,
	// one of a thread's own, one the main thread added after (with
	// SECCOMP_FILTER_FLAG_LOG). After restore each thread's system calls
	// are filtered as before, and a second dump finds the same filters,
	// flags and chains: the kernel state was made again, not imitated.
	needRoot(t)
	bin := testutil.BuildC(t, "seccheck")
	w := testutil.Start(t, "-r", bin)
	time.Sleep(200 * time.Millisecond)
	before := w.Report(t)
	if before.Status != "ok" {
		t.Fatalf("before: %v", before)
	}
	r := dumpRestore(t, w)
	defer r.Kill()
	after := r.Report(t)
	checkContinued(t, before, after)
	for _, k := range []string{"main", "u", "t", "filters"} {
		if after.Fields[k] != before.Fields[k] {
			t.Errorf("%s: %s after restore, %s before", k, after.Fields[k], before.Fields[k])
		}
	}
	img := t.TempDir()
	if code, out := ferry(t, "dump", "-t", strconv.Itoa(r.Pid), "-D", img, "-R"); code != 0 {
		t.Fatalf("second dump: exit %d\n%s", code, out)
	}
	core := &pb.TaskCore{}
	if err := images.ReadOne(img, images.CoreName(r.Pid), images.KindCore, core); err != nil {
		t.Fatal(err)
	}
	var chains []string
	for _, th := range core.Threads {
		var c []string
		for _, i := range th.SeccompChain {
			f := core.SeccompFilters[i]
			c = append(c, fmt.Sprintf("%d:%d", len(f.Prog)/8, f.Flags))
		}
		chains = append(chains, fmt.Sprintf("mode %d [%s]", th.SeccompMode, strings.Join(c, " ")))
	}
	// main: A, C (LOG); then u: A; t: A, B.
	want := "mode 2 [4:0 4:2]; mode 2 [4:0]; mode 2 [4:0 4:0]"
	if got := strings.Join(chains, "; "); got != want || len(core.SeccompFilters) != 3 {
		t.Fatalf("filters after restore: %s (%d distinct), want %s (3)", got, len(core.SeccompFilters), want)
	}
}

func TestDumpRestoreFifos(t *testing.T) {
	// A named pipe with a read end (nonblocking) and a write end and bytes
	// queued, and an unlinked one with only its write end open: after
	// restore the reader gets the queued bytes, flags are as they were,
	// and the unlinked one is still a FIFO with its bytes.
	needRoot(t)
	dir := t.TempDir()
	script := `import os, fcntl, signal, sys, time
d = sys.argv[1]
p, q = os.path.join(d, "named"), os.path.join(d, "gone")
os.mkfifo(p); os.mkfifo(q)
r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
w = os.open(p, os.O_WRONLY)
os.write(w, b"queued")
qr = os.open(q, os.O_RDONLY | os.O_NONBLOCK)
qw = os.open(q, os.O_WRONLY)
os.write(qw, b"in the gone one")
os.close(qr)
os.unlink(q)
tok = os.urandom(8).hex()
want = [True]
def usr1(*a): want[0] = True
signal.signal(signal.SIGUSR1, usr1)
seq, checked = 0, ""
while True:
    if want[0]:
        want[0] = False
        seq += 1
        if seq == 3:
            ok = os.read(r, 100) == b"queued" and fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK and fcntl.fcntl(w, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
            r2 = os.open("/proc/self/fd/%d" % qw, os.O_RDONLY | os.O_NONBLOCK)
            ok = ok and os.read(r2, 100) == b"in the gone one"
            checked = "fifos=%s\n" % ("ok" if ok else "fail")
        open(sys.argv[2] + ".tmp", "w").write("status=ok\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\n%s" % (os.getpid(), tok, seq, seq, checked))
        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(0.01)
`
	_, after := dumpRestorePython(t, script, dir) // the third report checks the FIFOs
	if after.Fields["fifos"] != "ok" {
		t.Fatalf("FIFOs after restore: %v", after)
	}
	if st, err := os.Stat(filepath.Join(dir, "named")); err != nil || st.Mode()&os.ModeNamedPipe == 0 {
		t.Fatalf("the named FIFO: %v %v", st, err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("%d entries in the FIFO directory, want only the named one (the gone one's stand-in must be unlinked)", len(ents))
	}
}

func TestDumpRestoreRemovedCwd(t *testing.T) {
	// A process whose working directory was removed: after restore its cwd
	// is again a removed directory, and nothing is left on disk.
	needRoot(t)
	parent := t.TempDir()
	script := `import os, signal, sys, time
d = os.path.join(sys.argv[1], "gone")
os.mkdir(d); os.chdir(d); os.rmdir(d)
tok = os.urandom(8).hex()
want = [True]
def usr1(*a): want[0] = True
signal.signal(signal.SIGUSR1, usr1)
seq = 0
while True:
    if want[0]:
        want[0] = False
        seq += 1
        cwd = os.readlink("/proc/self/cwd")
        ok = cwd.endswith("(deleted)") and not os.path.exists(d)
        open(sys.argv[2] + ".tmp", "w").write("status=%s\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\n" % ("ok" if ok else "fail", os.getpid(), tok, seq, seq))
        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(0.01)
`
	dumpRestorePython(t, script, parent)
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Fatalf("left on disk: %v", ents)
	}
}

func TestDumpRestoreDeletedMappings(t *testing.T) {
	// Private and shared mappings of files unlinked after mmap: their
	// contents come back from the images, and nothing is left on disk.
	needRoot(t)
	dir := t.TempDir()
	script := `import os, mmap, signal, sys, time
d = sys.argv[1]
tok = os.urandom(8).hex()
maps = []
for name, flags in (("private", mmap.MAP_PRIVATE), ("shared", mmap.MAP_SHARED)):
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write((name + tok).encode() * 512)
    fd = os.open(p, os.O_RDWR)
    m = mmap.mmap(fd, 0, flags=flags)
    os.close(fd)
    os.unlink(p)
    maps.append((name, m))
maps[0][1][0:7] = b"changed"  # a private copy-on-write page
want = [True]
def usr1(*a): want[0] = True
signal.signal(signal.SIGUSR1, usr1)
seq = 0
while True:
    if want[0]:
        want[0] = False
        seq += 1
        ok = maps[0][1][0:7] == b"changed" and maps[0][1][4096:4096+7] == (("private" + tok) * 512).encode()[4096:4096+7]
        ok = ok and maps[1][1][:6+16] == ("shared" + tok).encode()
        open(sys.argv[2] + ".tmp", "w").write("status=%s\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\n" % ("ok" if ok else "fail", os.getpid(), tok, seq, seq))
        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(0.01)
`
	before, _ := dumpRestorePython(t, script, dir)
	if before.Status != "ok" {
		t.Fatalf("before: %v", before)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("left on disk: %v", ents)
	}
}

func TestDumpRestoreInotify(t *testing.T) {
	// An inotify fd with watches 1 and 3 (2 was removed): after restore, a
	// file created in each watched directory is reported under the same
	// watch descriptor.
	needRoot(t)
	dir := t.TempDir()
	script := `import ctypes, os, select, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
d = sys.argv[1]
for n in ("a", "b", "c"):
    os.mkdir(os.path.join(d, n))
fd = libc.inotify_init1(os.O_NONBLOCK)
wa = libc.inotify_add_watch(fd, os.path.join(d, "a").encode(), 0x100)
wb = libc.inotify_add_watch(fd, os.path.join(d, "b").encode(), 0x100)
wc = libc.inotify_add_watch(fd, os.path.join(d, "c").encode(), 0x100)
libc.inotify_rm_watch(fd, wb)
time.sleep(0.05)
try:
    os.read(fd, 4096)  # the IN_IGNORED of the removed watch
except BlockingIOError:
    pass
tok = os.urandom(8).hex()
want = [True]
def usr1(*a): want[0] = True
signal.signal(signal.SIGUSR1, usr1)
seq, result = 0, ""
while True:
    if want[0]:
        want[0] = False
        seq += 1
        if seq == 3:
            open(os.path.join(d, "a", "x"), "w").close()
            open(os.path.join(d, "c", "y"), "w").close()
            time.sleep(0.05)
            buf = os.read(fd, 4096)
            wds = []
            while buf:
                wd, mask, cookie, ln = struct.unpack("iIII", buf[:16])
                wds.append(wd)
                buf = buf[16 + ln:]
            result = "wds=%s\n" % ",".join(map(str, wds))
        open(sys.argv[2] + ".tmp", "w").write("status=ok\npid=%d\ntoken=%s\ncounter=%d\nseq=%d\n%s" % (os.getpid(), tok, seq, seq, result))
        os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(0.01)
`
	_, after := dumpRestorePython(t, script, dir) // the third report creates the files and reads the events
	if after.Fields["wds"] != "1,3" {
		t.Fatalf("events came with watch descriptors %q, want 1,3", after.Fields["wds"])
	}
}

func TestDumpRestoreSymlinkDescriptor(t *testing.T) {
	// A descriptor opened on a symbolic link itself (O_PATH|O_NOFOLLOW)
	// is opened the same way again.
	selfCheckAcross(t, "symlinkfd.py")
}

// selfCheckAcross dumps and restores the Python workload script (one
// using testdata/workloads/selfcheck.py) and has it check itself.
func selfCheckAcross(t *testing.T, script string, dumpArgs ...string) {
	t.Helper()
	checkAcross(t, startSelfCheck(t, script), dumpArgs...)
}

// startSelfCheck starts the Python workload script (with args before its
// report path).
func startSelfCheck(t *testing.T, script string, args ...string) *testutil.Workload {
	t.Helper()
	needRoot(t)
	return testutil.Start(t, "", "python3", append([]string{filepath.Join(testutil.RepoRoot(t), "testdata", "workloads", script)}, args...)...)
}

// checkAcross dumps and restores the selfcheck workload w and has it
// check itself.
func checkAcross(t *testing.T, w *testutil.Workload, dumpArgs ...string) {
	t.Helper()
	before := w.Report(t)
	rw := dumpRestore(t, w, dumpArgs...)
	defer rw.Kill()
	checkContinued(t, before, rw.Report(t))
	checkSelf(t, rw)
}

// checkRefused fails t unless a dump of w without options fails with a
// message holding each of want (w runs on).
func checkRefused(t *testing.T, w *testutil.Workload, want ...string) {
	t.Helper()
	code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", t.TempDir())
	if code == 0 {
		t.Fatalf("dump without options: exit 0, want a refusal naming %q", want)
	}
	for _, s := range want {
		if !strings.Contains(out, s) {
			t.Fatalf("dump without options: exit %d, the refusal does not name %q:\n%s", code, s, out)
		}
	}
}

// checkSelf has a selfcheck workload (testdata/workloads/selfcheck.py)
// check itself, and fails t unless it answers ok.
func checkSelf(t *testing.T, w *testutil.Workload) {
	t.Helper()
	w.Signal(unix.SIGUSR2)
	if !waitFor(10*time.Second, func() bool { return w.Report(t).Fields["check"] != "unchecked" }) {
		t.Fatal("the workload did not check itself")
	}
	if got := w.Report(t).Fields["check"]; got != "ok" {
		t.Fatalf("after the restore: %s", got)
	}
}

func TestDumpRestoreDeletedFileAttributes(t *testing.T) {
	// A deleted file comes back with its mode (set-id bits included), its
	// modification time and its holes, not only its contents; open by two
	// names (hard links), it comes back as one file.
	selfCheckAcross(t, "ghostattr.py")
}

func TestDumpRestoreRemovedDirectory(t *testing.T) {
	// A removed working directory, also open as a descriptor: both come
	// back as that removed directory (its name and "(deleted)"), and as
	// one directory.
	selfCheckAcross(t, "rmdircwd.py")
}

func TestDumpRestoreLinkRemap(t *testing.T) {
	// A file open by a removed name but alive under another: refused
	// without --link-remap (a copy would part from the file); with it,
	// the restored descriptor is the very file, and the name the dump
	// gave it is gone again.
	w := startSelfCheck(t, "linkremap.py")
	checkRefused(t, w, "--link-remap")
	checkAcross(t, w, "--link-remap")
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(w.ReportPath), ".ferry-link-remap*")); len(left) > 0 {
		t.Fatalf("the dump's names are left: %v", left)
	}
}

func TestDumpRestoreMembarrier(t *testing.T) {
	// A process registered for private expedited membarriers is
	// registered again.
	selfCheckAcross(t, "membarrier.py")
}

func TestDumpRestoreVmFlags(t *testing.T) {
	// Locked, advised (sequential, random, not in cores) and droppable
	// areas come back so.
	selfCheckAcross(t, "vmflags.py")
}

func TestDumpRestorePidfdSelf(t *testing.T) {
	// A pidfd of the process itself comes back as one.
	selfCheckAcross(t, "pidfdself.py")
}

func TestDumpRestoreEpollMovedTarget(t *testing.T) {
	// An epoll registration made through a descriptor closed since (its
	// file open under another) is made again and still wakes the epoll.
	selfCheckAcross(t, "epollmoved.py")
}

func TestDumpRestoreNamespaceFiles(t *testing.T) {
	// Descriptors of the process's own namespace files (/proc/self/ns/*)
	// come back naming its namespaces.
	selfCheckAcross(t, "nsfd.py")
}

func TestDumpRestoreSharedMappingMprotect(t *testing.T) {
	// A shared file mapping mapped read-only and then made writable in
	// part: the restore opens the file for writing, so both the writable
	// page and a later mprotect work.
	selfCheckAcross(t, "mapprot.py")
}

func TestDumpRestoreMemfd(t *testing.T) {
	// A memfd comes back as a memfd (same name, contents, offset, flags,
	// mode, seals), still mapped, and still executable.
	selfCheckAcross(t, "memfd.py")
}

func TestDumpRestoreTmpfile(t *testing.T) {
	// A file made with O_TMPFILE comes back with its contents and offset,
	// still nameless and writable.
	checkAcross(t, startSelfCheck(t, "tmpfile.py", t.TempDir()))
}

func TestDumpRestoreCwdOfDeadProcess(t *testing.T) {
	// A working directory in the /proc of a process that is gone: after
	// restore it is such a directory again (getcwd fails with ENOENT).
	selfCheckAcross(t, "deadproccwd.py")
}

func TestDumpRestoreGuardRegions(t *testing.T) {
	// Guard pages (MADV_GUARD_INSTALL) are not read (they fault) and come
	// back as guard pages; the pages around them keep their contents.
	selfCheckAcross(t, "guard.py")
}

func TestDumpRestoreFanotify(t *testing.T) {
	// A fanotify group comes back with its flags and its inode and mount
	// marks (masks and ignored masks), and reports events again.
	checkAcross(t, startSelfCheck(t, "fanotify.py", t.TempDir()))
}

func TestDumpRestorePtyQueues(t *testing.T) {
	// What waits in a pty comes back: lines written to the master for the
	// slave to read (canonical mode), and the echo and output waiting for
	// the master, byte for byte. /dev/tty is the pty again.
	selfCheckAcross(t, "ptyqueue.py")
}

func TestDumpRestoreHungUpPty(t *testing.T) {
	// Two slaves of a pty whose master is closed come back hung up, as
	// slaves of one pty.
	selfCheckAcross(t, "hungpty.py")
}

func TestDumpRestoreInotifyRemovedFile(t *testing.T) {
	// A watch on a file removed since but still open comes back on that
	// very file (its ghost): closing it is reported on the watch.
	checkAcross(t, startSelfCheck(t, "inotifyrm.py", t.TempDir()))
}

func TestDumpRestoreAioRing(t *testing.T) {
	// An AIO context with completions waiting: after restore its ring has
	// the same head and tail, the waiting completions are reaped, and a
	// new write completes through it (the kernel's tail agrees).
	needRoot(t)
	bin := testutil.BuildC(t, "aioring")
	w := testutil.Start(t, "-r", bin)
	before := w.Report(t)
	r := dumpRestore(t, w)
	defer r.Kill()
	r.Signal(unix.SIGUSR2)
	time.Sleep(100 * time.Millisecond)
	after := r.Report(t)
	checkContinued(t, before, after)
	if after.Int("checked") != 1 {
		t.Fatalf("the workload did not check its ring: %v", after)
	}
}

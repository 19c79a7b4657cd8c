package testutil

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RepoRoot returns the directory holding go.mod.
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	dir := filepath.Dir(file)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above " + file)
		}
		dir = parent
	}
}

var (
	buildMu  sync.Mutex
	buildDir string
	built    = map[string]string{}
)

func cacheDir(t testing.TB) string {
	if buildDir == "" {
		// One directory per test binary, named by its PID; those of test
		// binaries that are gone are removed here (nothing else would).
		stale, _ := filepath.Glob(filepath.Join(os.TempDir(), "ferry-workloads-*"))
		for _, d := range stale {
			pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "ferry-workloads-"))
			if err != nil || (pid != os.Getpid() && unix.Kill(pid, 0) == unix.ESRCH) {
				os.RemoveAll(d)
			}
		}
		d := filepath.Join(os.TempDir(), "ferry-workloads-"+strconv.Itoa(os.Getpid()))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		// Workloads may run as another user.
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
		buildDir = d
	}
	return buildDir
}

// BuildC compiles testdata/workloads/NAME.c once per test binary and
// returns the executable's path.
func BuildC(t testing.TB, name string) string {
	t.Helper()
	return buildOnce(t, name, name, func(out string) *exec.Cmd {
		src := filepath.Join(RepoRoot(t), "testdata", "workloads", name+".c")
		return exec.Command("gcc", "-O2", "-Wall", "-pthread", "-mavx2", "-o", out, src)
	})
}

// buildOnce runs, once per key and test binary, the build that makes the
// executable out (named name in the cache directory), and returns out.
func buildOnce(t testing.TB, key, name string, build func(out string) *exec.Cmd) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[key]; ok {
		return p
	}
	out := filepath.Join(cacheDir(t), name)
	cmd := build(out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s (in %s): %v\n%s", strings.Join(cmd.Args, " "), cmd.Dir, err, b)
	}
	built[key] = out
	return out
}

// BuildGo builds the Go workload in testdata/workloads/DIR (its own module).
func BuildGo(t testing.TB, dir string) string {
	t.Helper()
	return buildOnce(t, "go:"+dir, dir, func(out string) *exec.Cmd {
		cmd := exec.Command("go", "build", "-o", out, ".")
		cmd.Dir = filepath.Join(RepoRoot(t), "testdata", "workloads", dir)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=")
		return cmd
	})
}

// Report is a parsed workload report.
type Report struct {
	Fields  map[string]string
	Status  string
	Reason  string
	Pid     int
	Token   string
	Counter int64
	Seq     int64
}

// Int returns a numeric field (0 when absent).
func (r Report) Int(key string) int64 {
	v, _ := strconv.ParseInt(r.Fields[key], 10, 64)
	return v
}

func (r Report) String() string {
	return fmt.Sprintf("status=%s reason=%q pid=%d token=%s counter=%d seq=%d %v", r.Status, r.Reason, r.Pid, r.Token, r.Counter, r.Seq, r.Fields)
}

// ParseReport reads a report file.
func ParseReport(path string) (Report, error) {
	f, err := os.Open(path)
	if err != nil {
		return Report{}, err
	}
	defer f.Close()
	r := Report{Fields: map[string]string{}}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok {
			r.Fields[k] = v
		}
	}
	r.Status, r.Reason, r.Token = r.Fields["status"], r.Fields["reason"], r.Fields["token"]
	r.Pid = int(r.Int("pid"))
	r.Counter, r.Seq = r.Int("counter"), r.Int("seq")
	return r, sc.Err()
}

// Workload is a running (or restored) workload process.
type Workload struct {
	Pid        int
	ReportPath string
	Dir        string
	lastSeq    int64
	child      bool
}

// Start runs bin with args in a new session, stdin from /dev/null and
// stdout/stderr to a log file, and waits for its first report. The report
// path is passed with reportFlag (e.g. "-r"); "" means the report path is
// appended as the last argument.
func Start(t testing.TB, reportFlag, bin string, args ...string) *Workload {
	t.Helper()
	return StartWith(t, nil, reportFlag, bin, args...)
}

// StartWith is Start with extra open files passed to the workload as
// fds 3, 4, ...
func StartWith(t testing.TB, extra []*os.File, reportFlag, bin string, args ...string) *Workload {
	t.Helper()
	dir := t.TempDir()
	w := &Workload{ReportPath: filepath.Join(dir, "report"), Dir: dir, child: true}
	if reportFlag != "" {
		args = append(args, reportFlag, w.ReportPath)
	} else {
		args = append(args, w.ReportPath)
	}
	log, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.ExtraFiles = extra
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Never cmd.Wait in the background: a wait in the tracer's process
	// (we are also its parent) would consume the ptrace stops ferry
	// waits for. Reap and Kill wait by PID when asked.
	w.Pid = cmd.Process.Pid
	t.Cleanup(func() { w.Kill() })
	if err := w.waitSeq(1, 30*time.Second); err != nil {
		b, _ := os.ReadFile(filepath.Join(dir, "log"))
		t.Fatalf("workload %s did not report: %v\nlog:\n%s", bin, err, b)
	}
	return w
}

// Attach returns a Workload for a process ferry restored (not our child).
func Attach(t testing.TB, pid int, reportPath string) *Workload {
	w := &Workload{Pid: pid, ReportPath: reportPath}
	if r, err := ParseReport(reportPath); err == nil {
		w.lastSeq = r.Seq
	}
	t.Cleanup(func() { w.Kill() })
	return w
}

func (w *Workload) waitSeq(min int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		r, err := ParseReport(w.ReportPath)
		if err == nil && r.Seq >= min && r.Status != "" {
			w.lastSeq = r.Seq
			return nil
		}
		if !PidAlive(w.Pid) {
			return fmt.Errorf("process %d is gone", w.Pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("no report with seq >= %d after %v", min, timeout)
}

// Report asks for a fresh report (SIGUSR1) and returns it.
func (w *Workload) Report(t testing.TB) Report {
	t.Helper()
	r, err := w.TryReport(10 * time.Second)
	if err != nil {
		t.Fatalf("report from %d: %v", w.Pid, err)
	}
	return r
}

// TryReport is Report without failing the test. The old report file is
// removed first and the new one awaited, so a restored snapshot (whose
// report counter may be older than the file's) is read correctly.
func (w *Workload) TryReport(timeout time.Duration) (Report, error) {
	os.Remove(w.ReportPath)
	if err := unix.Kill(w.Pid, unix.SIGUSR1); err != nil {
		return Report{}, fmt.Errorf("signal %d: %w", w.Pid, err)
	}
	if err := w.waitSeq(0, timeout); err != nil {
		return Report{}, err
	}
	return ParseReport(w.ReportPath)
}

// Signal sends sig to the workload.
func (w *Workload) Signal(sig unix.Signal) error { return unix.Kill(w.Pid, sig) }

// Reap waits until the process started by Start has exited and been
// reaped (after a dump killed it), so its PID is free again.
func (w *Workload) Reap(t testing.TB) {
	t.Helper()
	if err := WaitGone(w.Pid, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// Kill ends the process by PID and reaps it if it is our child.
func (w *Workload) Kill() {
	if w.Pid <= 0 {
		return
	}
	unix.Kill(w.Pid, unix.SIGKILL)
	WaitGone(w.Pid, 5*time.Second)
}

// PidAlive reports whether pid exists and is not a zombie.
func PidAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// WaitGone waits until pid no longer runs, reaping it if it is our child.
func WaitGone(pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		var ws unix.WaitStatus
		if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err == nil && got == pid {
			return nil
		} else if errors.Is(err, unix.ECHILD) && !PidAlive(pid) {
			return nil
		}
		time.Sleep(2 * time.Millisecond)
	}
	return fmt.Errorf("process %d still running after %v", pid, timeout)
}

// BuildCmd builds the project's command ./cmd/NAME once per test binary
// and returns the executable's path.
func BuildCmd(t testing.TB, name string) string {
	t.Helper()
	return buildOnce(t, "cmd:"+name, "cmd-"+name, func(out string) *exec.Cmd {
		cmd := exec.Command("go", "build", "-o", out, "./cmd/"+name)
		cmd.Dir = RepoRoot(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		return cmd
	})
}

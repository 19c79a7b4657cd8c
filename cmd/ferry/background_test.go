package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/dumpcore"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
)

// readWord reads the 8-byte word at addr in pid's memory.
func readWord(pid int, addr uint64) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], int64(addr)); err != nil {
		return 0, err
	}
	return int64(binary.LittleEndian.Uint64(b[:])), nil
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func TestBackgroundSnapshot(t *testing.T) {
	// A background snapshot of a workload that rewrites memory without
	// pause: its worker's counter keeps moving while the memory is copied,
	// and the restored process holds exactly the counter of the freeze
	// instant, its token, and churn memory that is consistent (a snapshot
	// mixing instants fails memcheck's pass check).
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "128", "-t", "1", "-C")
	defer w.Kill()
	before := w.Report(t)
	addr, err := strconv.ParseUint(before.Fields["counters_at"], 16, 64)
	if err != nil {
		t.Fatalf("report has no counters_at: %v", before)
	}

	var (
		mu      sync.Mutex
		samples []int64
		stop    = make(chan struct{})
		done    = make(chan struct{})
	)
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if v, err := readWord(w.Pid, addr); err == nil {
				mu.Lock()
				samples = append(samples, v)
				mu.Unlock()
			}
		}
	}()
	atFreeze := int64(-1)
	img := t.TempDir()
	res, err := dumpcore.Background(context.Background(), dumpcore.Options{
		Pid: w.Pid, ImagesDir: img, LeaveRunning: true,
		Frozen: func() { atFreeze, _ = readWord(w.Pid, addr) },
		Logger: slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	close(stop)
	<-done
	if err != nil {
		t.Fatal(err)
	}
	moves := 0
	for i := 1; i < len(samples); i++ {
		if samples[i] != samples[i-1] {
			moves++
		}
	}
	t.Logf("frozen %d us of %d us; the counter moved %d times in %d samples", res.Stats.FrozenTimeUs, res.Stats.TotalTimeUs, moves, len(samples))
	if moves < 3 {
		t.Fatalf("the worker's counter moved %d times during the snapshot: the process was kept frozen", moves)
	}
	if _, err := os.Stat(filepath.Join(img, "precopy-1")); err != nil {
		t.Fatalf("no pre-copy round: %v", err)
	}
	// It runs on, without ferry's tracker.
	checkContinued(t, before, w.Report(t))
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", w.Pid))
	for _, e := range ents {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", w.Pid, e.Name())); l == "anon_inode:[userfaultfd]" {
			t.Fatalf("the dirty tracker is still in the process (fd %s)", e.Name())
		}
	}

	w.Kill()
	mustFerry(t, "restore", "-D", img, "-d", "-s")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	got, err := readWord(w.Pid, addr)
	if err != nil {
		t.Fatal(err)
	}
	if got != atFreeze {
		t.Fatalf("restored counter %d, %d at the freeze: the image is not the freeze instant", got, atFreeze)
	}
	unix.Kill(w.Pid, unix.SIGCONT)
	after := r.Report(t)
	checkContinued(t, before, after)
	if after.Int("passes") < before.Int("passes") {
		t.Fatalf("churn passes %d after restore, %d before", after.Int("passes"), before.Int("passes"))
	}
}

func TestBackgroundSnapshotCLI(t *testing.T) {
	needRoot(t)
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "32", "-C")
	defer w.Kill()
	img := t.TempDir()
	if code, out := ferry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--background", "-s"); code != 1 || !strings.Contains(out, "--background") {
		t.Fatalf("--background with -s: exit %d\n%s", code, out)
	}
	before := w.Report(t)
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--background", "--display-stats")
	w.Kill()
	mustFerry(t, "restore", "-D", img, "-d")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
}

func TestBackgroundSnapshotTree(t *testing.T) {
	// A background snapshot of a tree: every process runs on, with no
	// dirty tracker left in it; the tree restored from the snapshot is
	// the same tree (PIDs, sessions, groups, zombie, what its processes
	// share) and checks itself.
	w := startSelfCheck(t, "tree.py")
	before := w.Report(t)
	pids := treePids(t, before)
	img := t.TempDir()
	mustFerry(t, "dump", "-t", strconv.Itoa(w.Pid), "-D", img, "--background", "-v4", "-o", "dump.log")
	for _, pid := range append([]int{w.Pid}, pids...) {
		st, err := proc.ReadStat(pid)
		if err != nil {
			t.Fatalf("process %d is gone after the snapshot", pid)
		}
		if st.State == 't' || st.State == 'T' {
			t.Fatalf("process %d is stopped (%c) after the snapshot", pid, st.State)
		}
		fds, _ := os.ReadDir(proc.Path(pid, "fd"))
		for _, fd := range fds {
			if l, _ := os.Readlink(proc.Path(pid, "fd/"+fd.Name())); l == "anon_inode:[userfaultfd]" {
				t.Fatalf("process %d keeps a dirty tracker at fd %s", pid, fd.Name())
			}
		}
	}
	if after := w.Report(t); after.Int("seq") <= before.Int("seq") && after.Int("counter") <= before.Int("counter") {
		t.Fatalf("the root does not run on: %v", after)
	}
	w.Kill()
	for _, pid := range pids {
		unix.Kill(pid, unix.SIGKILL)
	}
	if !waitFor(5*time.Second, func() bool {
		for _, pid := range append([]int{w.Pid}, pids...) {
			if testutil.PidAlive(pid) {
				return false
			}
		}
		return true
	}) {
		t.Fatal("the tree did not end")
	}
	mustFerry(t, "restore", "-D", img, "-d", "-v4", "-o", "restore.log")
	r := testutil.Attach(t, w.Pid, w.ReportPath)
	defer r.Kill()
	checkContinued(t, before, r.Report(t))
	checkSelf(t, r)
}

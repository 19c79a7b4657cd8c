package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// treeResult is the tree benchmark: dump and restore of a wide tree of
// processes with threads and descriptors (testdata/workloads/treebench.c).
type treeResult struct {
	Processes        int     `json:"processes"`
	ThreadsPer       int     `json:"threads_per_process"`
	Fds              int     `json:"fds_total"`
	Runs             int     `json:"runs"`
	DumpWallMs       float64 `json:"dump_wall_ms"`
	DumpFrozenMs     float64 `json:"dump_frozen_ms"`
	RestoreWallMs    float64 `json:"restore_wall_ms"`
	DumpTasksPerSec  float64 `json:"dump_tasks_per_s"`
	DumpFdsPerSec    float64 `json:"dump_fds_per_s"`
	RestoreTasksPerS float64 `json:"restore_tasks_per_s"`
	RestoreFdsPerSec float64 `json:"restore_fds_per_s"`
	TargetMs         float64 `json:"target_ms"`
	DumpMeets        bool    `json:"dump_meets_target"`
	RestoreMeets     bool    `json:"restore_meets_target"`
}

// measureTree dumps and restores a tree of procs processes with threads
// threads each and fds descriptors in total, runs times.
func measureTree(tool, dir string, procs, threads, fds, runs int) (treeResult, error) {
	r := treeResult{Processes: procs, ThreadsPer: threads, Runs: runs, TargetMs: 1000}
	wl := filepath.Join(dir, "treebench")
	if b, err := exec.Command("gcc", "-O2", "-pthread", "-o", wl, "testdata/workloads/treebench.c").CombinedOutput(); err != nil {
		return r, fmt.Errorf("gcc: %v\n%s", err, b)
	}
	perProc := fds/procs - 5 // each also holds stdin, stdout, stderr and two of the harness's
	var dump, frozen, restore []float64
	for i := 0; i < runs; i++ {
		img := filepath.Join(dir, "tree-img")
		os.RemoveAll(img)
		if err := os.MkdirAll(img, 0o755); err != nil {
			return r, err
		}
		ready := filepath.Join(dir, "tree-ready")
		os.Remove(ready)
		cmd := exec.Command(wl, "-p", strconv.Itoa(procs), "-t", strconv.Itoa(threads), "-f", strconv.Itoa(perProc), "-r", ready)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			return r, err
		}
		root := cmd.Process.Pid
		pids := []int{root}
		end := func() {
			for _, p := range pids {
				unix.Kill(p, unix.SIGKILL)
			}
			cmd.Wait()
			for _, p := range pids {
				waitGone(p)
			}
		}
		if err := waitFile(ready, 60*time.Second); err != nil {
			end()
			return r, err
		}
		pids = append(pids, descendants(root)...)
		r.Fds = countFds(pids)
		t0 := time.Now()
		if b, err := exec.Command(tool, "dump", "-t", strconv.Itoa(root), "-D", img).CombinedOutput(); err != nil {
			end()
			return r, fmt.Errorf("dump: %v\n%s", err, b)
		}
		dump = append(dump, ms(time.Since(t0)))
		frozen = append(frozen, frozenMs(img, dump[len(dump)-1]))
		cmd.Wait()
		for _, p := range pids {
			waitGone(p)
		}
		t0 = time.Now()
		b, err := exec.Command(tool, "restore", "-D", img, "-d").CombinedOutput()
		restore = append(restore, ms(time.Since(t0)))
		alive := len(descendants(root)) + 1
		end()
		if err != nil {
			return r, fmt.Errorf("restore: %v\n%s", err, b)
		}
		if alive != len(pids) {
			return r, fmt.Errorf("restored %d processes, want %d", alive, len(pids))
		}
	}
	r.DumpWallMs, r.DumpFrozenMs, r.RestoreWallMs = median(dump), median(frozen), median(restore)
	tasks := float64(procs * threads)
	r.DumpTasksPerSec = tasks / (r.DumpWallMs / 1000)
	r.RestoreTasksPerS = tasks / (r.RestoreWallMs / 1000)
	r.DumpFdsPerSec = float64(r.Fds) / (r.DumpWallMs / 1000)
	r.RestoreFdsPerSec = float64(r.Fds) / (r.RestoreWallMs / 1000)
	r.DumpMeets, r.RestoreMeets = r.DumpWallMs < r.TargetMs, r.RestoreWallMs < r.TargetMs
	return r, nil
}

// descendants lists pid's descendants, read from /proc.
func descendants(pid int) []int {
	var out []int
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	for _, f := range strings.Fields(string(b)) {
		if c, err := strconv.Atoi(f); err == nil {
			out = append(out, c)
			out = append(out, descendants(c)...)
		}
	}
	return out
}

// countFds counts the open descriptors of pids.
func countFds(pids []int) int {
	n := 0
	for _, p := range pids {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p))
		n += len(ents)
	}
	return n
}

// Command bench measures ferry's dump and restore against the physical
// limit of this machine: the time a plain write loop takes to write the
// same number of bytes to the same filesystem. Baseline and ferry runs are
// interleaved and repeated, and medians reported, because first touch of
// fresh memory varies a lot between runs on this VM.
//
//	go run ./bench -ferry bin/ferry -sizes 64,1024,4096 -out bench/results.json
//
// With -criu PATH it measures criu side by side.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
)

type result struct {
	Tool           string  `json:"tool"`
	SizeMiB        int     `json:"size_mib"`
	Runs           int     `json:"runs"`
	ImageBytes     int64   `json:"image_bytes"`
	BaselineMs     float64 `json:"baseline_write_ms"`
	BaselineBefore float64 `json:"baseline_before_dump_ms"`
	BaselineAfter  float64 `json:"baseline_after_dump_ms"`
	DumpWallMs     float64 `json:"dump_wall_ms"`
	DumpFrozenMs   float64 `json:"dump_frozen_ms"`
	DumpMBps       float64 `json:"dump_throughput_mb_s"`
	RestoreWallMs  float64 `json:"restore_wall_ms"`
	RestoreMBps    float64 `json:"restore_throughput_mb_s"`
	DumpRatio      float64 `json:"dump_vs_baseline"`
	RestoreRatio   float64 `json:"restore_vs_baseline"`
	Target         float64 `json:"target_ratio"`
	DumpMeets      bool    `json:"dump_meets_target"`
	RestoreMeets   bool    `json:"restore_meets_target"`
}

func main() {
	ferry := flag.String("ferry", "bin/ferry", "ferry binary")
	criu := flag.String("criu", "", "criu binary to measure side by side (criu 4.x; older ones fail on new kernels)")
	sizes := flag.String("sizes", "64,1024,4096", "workload sizes in MiB")
	runs := flag.Int("runs", 3, "repetitions per size")
	dir := flag.String("dir", "/dev/shm/ferry-bench", "working directory (tmpfs)")
	out := flag.String("out", "bench/results.json", "JSON results")
	suites := flag.String("suites", "core,predump,background,lazy,stream,tree", "which measurements: core (dump/restore), predump, background (snapshot), lazy, stream (page server), tree (100 processes x 10 threads, 2000 fds)")
	flag.Parse()
	want := map[string]bool{}
	for _, s := range strings.Split(*suites, ",") {
		want[strings.TrimSpace(s)] = true
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fail(err)
	}
	defer os.RemoveAll(*dir)
	wl := filepath.Join(*dir, "memcheck")
	if b, err := exec.Command("gcc", "-O2", "-pthread", "-mavx2", "-o", wl, "testdata/workloads/memcheck.c").CombinedOutput(); err != nil {
		fail(fmt.Errorf("gcc: %v\n%s", err, b))
	}
	all := map[string]any{}
	var results []result
	for _, s := range strings.Split(*sizes, ",") {
		if !want["core"] {
			break
		}
		mib, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			fail(err)
		}
		tools := []string{*ferry}
		if *criu != "" {
			tools = append(tools, *criu)
		}
		for _, tool := range tools {
			r, err := measure(tool, wl, *dir, mib, *runs)
			if err != nil {
				fail(fmt.Errorf("%s at %d MiB: %w", filepath.Base(tool), mib, err))
			}
			fmt.Printf("%-6s %5d MiB: image %6.0f MB  write limit %7.1f ms (before %.1f, after %.1f) | dump %7.1f ms (frozen %7.1f, %.2fx) | restore %7.1f ms (%.2fx)\n",
				r.Tool, r.SizeMiB, float64(r.ImageBytes)/1e6, r.BaselineMs, r.BaselineBefore, r.BaselineAfter, r.DumpWallMs, r.DumpFrozenMs, r.DumpRatio, r.RestoreWallMs, r.RestoreRatio)
			results = append(results, r)
		}
	}
	all["dump_restore"] = results
	var sizeList []int
	for _, s := range strings.Split(*sizes, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil && n >= 1024 {
			sizeList = append(sizeList, n)
		}
	}
	if want["predump"] {
		var pre []preDumpResult
		for _, mib := range sizeList {
			r, err := benchPreDump(*ferry, wl, *dir, mib)
			if err != nil {
				fail(fmt.Errorf("pre-dump at %d MiB: %w", mib, err))
			}
			fmt.Printf("pre-dump %5d MiB: rounds frozen %v ms (pages %v), final dump frozen %.1f ms\n", mib, r.RoundsFrozen, r.RoundsPages, r.FinalFrozen)
			pre = append(pre, r)
		}
		all["pre_dump"] = pre
	}
	if want["background"] {
		var bg []backgroundResult
		for _, mib := range sizeList {
			r, err := benchBackground(*ferry, wl, *dir, mib)
			if err != nil {
				fail(fmt.Errorf("background snapshot at %d MiB: %w", mib, err))
			}
			fmt.Printf("background %5d MiB, %d MiB/s dirty: frozen %.1f ms of %.0f ms (final round %d pages); plain dump -R frozen %.1f ms\n",
				mib, r.DirtyMiBs, r.FrozenMs, r.TotalMs, r.FinalPages, r.PlainFrozenMs)
			bg = append(bg, r)
		}
		all["background_snapshot"] = bg
	}
	if want["lazy"] {
		var lz []lazyResult
		for _, mib := range sizeList {
			for _, flow := range []string{"daemon", "restore"} {
				r, err := benchLazy(*ferry, wl, *dir, mib, flow)
				if err != nil {
					fail(fmt.Errorf("lazy (%s) at %d MiB: %w", flow, mib, err))
				}
				fmt.Printf("lazy     %5d MiB, pages via %-7s: running after %.1f ms (source %.1f + daemon %.1f + restore %.1f), all pages after %.1f ms"+
					" = %.2fx tcp copy (%.0f ms), %.2fx the slower of it and a fresh-memory fill (%.0f ms)\n",
					mib, flow, r.ToRunningMs, r.DumpLazyMs, r.DaemonMs, r.RestoreMs, r.ToAllPagesMs, r.VsTCP, r.TCPCopyMs, r.VsFloor, r.FillMs)
				lz = append(lz, r)
			}
		}
		all["lazy_restore"] = lz
	}
	if want["stream"] {
		st, err := benchStream(*dir, 1<<30)
		if err != nil {
			fail(fmt.Errorf("page-server stream: %w", err))
		}
		for _, r := range st {
			fmt.Printf("stream 1 GiB: %-22s %8.1f ms %8.0f MB/s (%.2fx plain)\n", r.Mode, r.Ms, r.MBps, r.VsPlain)
		}
		all["page_server_stream"] = st
	}
	if want["tree"] {
		tr, err := measureTree(*ferry, *dir, 100, 10, 2000, *runs)
		if err != nil {
			fail(fmt.Errorf("tree: %w", err))
		}
		fmt.Printf("tree %d processes x %d threads, %d fds: dump %.0f ms (%.0f tasks/s, %.0f fds/s), restore %.0f ms (%.0f tasks/s, %.0f fds/s); target < %.0f ms each\n",
			tr.Processes, tr.ThreadsPer, tr.Fds, tr.DumpWallMs, tr.DumpTasksPerSec, tr.DumpFdsPerSec,
			tr.RestoreWallMs, tr.RestoreTasksPerS, tr.RestoreFdsPerSec, tr.TargetMs)
		all["tree"] = tr
	}
	b, _ := json.MarshalIndent(all, "", "  ")
	if err := os.MkdirAll(filepath.Dir(*out), 0o755); err != nil {
		fail(err)
	}
	if err := os.WriteFile(*out, append(b, '\n'), 0o644); err != nil {
		fail(err)
	}
	fmt.Println("results:", *out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

func median(v []float64) float64 {
	sort.Float64s(v)
	return v[len(v)/2]
}

func measure(tool, wl, dir string, mib, runs int) (result, error) {
	r := result{Tool: filepath.Base(tool), SizeMiB: mib, Runs: runs, Target: 1.3}
	var base, baseAfter, dump, frozen, restore []float64
	for i := 0; i < runs; i++ {
		img := filepath.Join(dir, "img")
		os.RemoveAll(img)
		if err := os.MkdirAll(img, 0o755); err != nil {
			return r, err
		}
		report := filepath.Join(dir, "report")
		os.Remove(report)
		cmd := exec.Command(wl, "-m", strconv.Itoa(mib), "-r", report)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			return r, err
		}
		pid := cmd.Process.Pid
		kill := func() { unix.Kill(pid, unix.SIGKILL); cmd.Wait() }
		if err := waitFile(report, 60*time.Second); err != nil {
			kill()
			return r, err
		}
		// Baseline first, in the state the dump meets: the workload's memory
		// taken, the image's pages to be allocated fresh. (After the dump,
		// the killed workload's freed memory makes writes look faster.)
		est := int64(mib) << 20
		if r.ImageBytes > 0 {
			est = r.ImageBytes
		}
		bt, err := writeLoop(filepath.Join(dir, "baseline"), est)
		if err != nil {
			kill()
			return r, err
		}
		base = append(base, bt)
		t0 := time.Now()
		if b, err := exec.Command(tool, "dump", "-t", strconv.Itoa(pid), "-D", img).CombinedOutput(); err != nil {
			kill()
			return r, fmt.Errorf("dump: %v\n%s", err, b)
		}
		dump = append(dump, ms(time.Since(t0)))
		cmd.Wait() // reap: the PID must be free for restore
		size := dirSize(img)
		r.ImageBytes = size
		frozen = append(frozen, frozenMs(img, dump[len(dump)-1]))
		// And after the dump, when the killed workload's memory is free:
		// writes are often faster then. The smaller median is the limit.
		bt, err = writeLoop(filepath.Join(dir, "baseline"), size)
		if err != nil {
			return r, err
		}
		baseAfter = append(baseAfter, bt)
		t0 = time.Now()
		if b, err := exec.Command(tool, "restore", "-D", img, "-d").CombinedOutput(); err != nil {
			return r, fmt.Errorf("restore: %v\n%s", err, b)
		}
		restore = append(restore, ms(time.Since(t0)))
		os.Remove(report)
		unix.Kill(pid, unix.SIGUSR1)
		if err := waitFile(report, 60*time.Second); err != nil {
			unix.Kill(pid, unix.SIGKILL)
			return r, fmt.Errorf("restored workload did not report: %w", err)
		}
		b, _ := os.ReadFile(report)
		unix.Kill(pid, unix.SIGKILL)
		waitGone(pid)
		if !strings.Contains(string(b), "status=ok") {
			return r, fmt.Errorf("restored workload failed its check:\n%s", b)
		}
	}
	r.BaselineBefore, r.BaselineAfter = median(base), median(baseAfter)
	r.BaselineMs = min(r.BaselineBefore, r.BaselineAfter)
	r.DumpWallMs, r.DumpFrozenMs, r.RestoreWallMs = median(dump), median(frozen), median(restore)
	mb := float64(r.ImageBytes) / 1e6
	r.DumpMBps = mb / (r.DumpWallMs / 1000)
	r.RestoreMBps = mb / (r.RestoreWallMs / 1000)
	r.DumpRatio = r.DumpWallMs / r.BaselineMs
	r.RestoreRatio = r.RestoreWallMs / r.BaselineMs
	r.DumpMeets = r.DumpRatio <= r.Target
	r.RestoreMeets = r.RestoreRatio <= r.Target
	return r, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// frozenMs reads ferry's stats-dump; for other tools it falls back to the
// wall time.
func frozenMs(img string, wall float64) float64 {
	var st pb.Stats
	if err := images.ReadOne(img, "stats-dump", images.KindStats, &st); err == nil && st.Dump != nil {
		return float64(st.Dump.FrozenTimeUs) / 1000
	}
	return wall
}

func dirSize(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// writeLoop writes size bytes to a new file with 16 MiB writes: the
// physical limit a dump to this filesystem cannot beat.
func writeLoop(path string, size int64) (float64, error) {
	buf := make([]byte, 16<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	for left := size; left > 0; {
		n := min(left, int64(len(buf)))
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return 0, err
		}
		left -= n
	}
	d := time.Since(t0)
	f.Close()
	os.Remove(path)
	return ms(d), nil
}

func waitFile(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), "seq=") {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("no report at %s after %v", path, timeout)
}

func waitGone(pid int) {
	for i := 0; i < 2000; i++ {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

package dumpcore

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
	"github.com/ferrycr/ferry/uffd"
)

// bufferVMA finds memcheck's -m buffer: its largest anonymous mapping.
func bufferVMA(t *testing.T, pid int) proc.Vma {
	t.Helper()
	vmas, err := proc.ReadMaps(pid)
	if err != nil {
		t.Fatal(err)
	}
	var best proc.Vma
	for _, v := range vmas {
		if v.Name == "" && v.Size() > best.Size() {
			best = v
		}
	}
	return best
}

func pagesIn(rs []uffd.Region, start, end uint64) uint64 {
	var n uint64
	for _, r := range rs {
		s, e := max(r.Start, start), min(r.End, end)
		if e > s {
			n += (e - s) / pageSize
		}
	}
	return n
}

func TestTrackerSeesExactlyTheWrites(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := uffd.Supported(); err != nil {
		t.Skip(err)
	}
	bin := testutil.BuildC(t, "memcheck")
	w := testutil.Start(t, "-r", bin, "-m", "64", "-t", "2", "-W")
	buf := bufferVMA(t, w.Pid)
	if buf.Size() < 64<<20 {
		t.Fatalf("buffer VMA %+v", buf)
	}
	fdsBefore, _ := os.ReadDir(proc.Path(w.Pid, "fd"))
	tr, err := StartTracking(w.Pid, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Features()&uffd.FeatureWPAsync == 0 {
		t.Fatalf("features %#x lack WP_ASYNC", tr.Features())
	}
	if fdsAfter, _ := os.ReadDir(proc.Path(w.Pid, "fd")); len(fdsAfter) != len(fdsBefore) {
		t.Fatalf("the target has %d fds after arming, %d before", len(fdsAfter), len(fdsBefore))
	}
	time.Sleep(100 * time.Millisecond)
	written, fresh, err := tr.Dirty()
	if err != nil {
		t.Fatal(err)
	}
	if n := pagesIn(written, buf.Start, buf.End); n != 0 {
		t.Fatalf("%d pages of the untouched buffer reported written", n)
	}
	if uffd.Pages(written) == 0 {
		t.Fatal("the running workload's stacks and counters were not seen written")
	}
	t.Logf("after 100 ms: %d pages written, %d in new VMAs", uffd.Pages(written), uffd.Pages(fresh))
	// Rewrite 10 buffer pages with the same contents: still writes.
	w.Signal(unix.SIGUSR2)
	time.Sleep(50 * time.Millisecond)
	written, _, err = tr.Dirty()
	if err != nil {
		t.Fatal(err)
	}
	if n := pagesIn(written, buf.Start+100*pageSize, buf.Start+110*pageSize); n != 10 {
		t.Fatalf("%d of the 10 rewritten buffer pages reported", n)
	}
	if n := pagesIn(written, buf.Start, buf.End); n != 10 {
		t.Fatalf("%d buffer pages reported, want exactly the 10 rewritten", n)
	}
	// Re-armed: nothing in the buffer now.
	written, _, err = tr.Dirty()
	if err != nil {
		t.Fatal(err)
	}
	if n := pagesIn(written, buf.Start, buf.End); n != 0 {
		t.Fatalf("%d buffer pages after re-arming", n)
	}
	// The workload never noticed.
	if r := w.Report(t); r.Status != "ok" {
		t.Fatalf("workload under tracking: %v", r)
	}
	st, _ := os.ReadFile(proc.Path(w.Pid, "status"))
	if !containsLine(string(st), "TracerPid:\t0") {
		t.Fatal("workload left traced")
	}
}

func containsLine(s, l string) bool {
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != '\n' {
			i++
		}
		if s[:i] == l {
			return true
		}
		if i == len(s) {
			break
		}
		s = s[i+1:]
	}
	return false
}

package kernel

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("feature probes need root (ptrace, kcmp and userfaultfd of any kind)")
	}
}

// TestProbes runs every probe on this machine. Required features must be
// there; an optional one may be missing only on a kernel older than the
// release that introduced it (STYLE rule 15) — soft-dirty excepted, which
// depends on CONFIG_MEM_SOFT_DIRTY.
func TestProbes(t *testing.T) {
	needRoot(t)
	p := New()
	t.Logf("kernel %s", p.Kernel())
	for _, r := range p.Results() {
		if r.OK {
			t.Logf("%-24s ok      %s", r.Name, r.Detail)
			if r.Err != nil {
				t.Errorf("%s: OK with an error: %v", r.Name, r.Err)
			}
			continue
		}
		var fe *FeatureError
		if !errors.As(r.Err, &fe) || fe.Name != r.Name || fe.MinKernel != r.MinKernel || fe.Running != p.Kernel() {
			t.Errorf("%s: error is not a FeatureError for it: %#v", r.Name, r.Err)
		}
		msg := r.Err.Error()
		if !strings.Contains(msg, strconv.Quote(r.Name)) || !strings.Contains(msg, p.Kernel()) {
			t.Errorf("%s: error does not name the feature and the running kernel: %s", r.Name, msg)
		}
		switch {
		case !errors.Is(r.Err, ErrNotSupported):
			t.Errorf("%s: probe failed: %v", r.Name, r.Err)
		case r.Required:
			t.Errorf("%s: required feature missing: %v", r.Name, r.Err)
		case r.Name == "soft-dirty":
			t.Logf("%-24s absent  %v", r.Name, r.Err)
		case p.ShouldHave(r.Name):
			t.Errorf("%s: missing on %s, which should have it (since %s): %v", r.Name, p.Kernel(), r.MinKernel, r.Err)
		default:
			t.Logf("%-24s absent  %v", r.Name, r.Err)
			if !strings.Contains(msg, "needs Linux "+r.MinKernel) {
				t.Errorf("%s: error does not name the kernel that has it: %s", r.Name, msg)
			}
		}
	}
	want := TrackerFullCopy
	switch {
	case p.Check("uffd-wp-async") == nil && p.Check("pagemap-scan") == nil:
		want = TrackerUffdWP
	case p.Check("soft-dirty") == nil:
		want = TrackerSoftDirty
	}
	if got := p.DirtyTracker(); got != want {
		t.Errorf("dirty tracker %s, want %s", got, want)
	}
	if r := p.Result("dirty-tracker"); !r.OK || r.Detail != string(want) {
		t.Errorf("dirty-tracker feature: %+v, want ok with detail %s", r, want)
	}
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1 // the directory's own fd
}

// children lists the processes whose parent is this test process.
func children(t *testing.T) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := proc.ReadStat(pid)
		if err != nil {
			continue // gone meanwhile
		}
		if st.Ppid == os.Getpid() {
			out = append(out, pid)
		}
	}
	return out
}

// TestNoLeaks probes everything on a fresh Probes and checks that no fd,
// child process (running or zombie) or mapping is left behind.
func TestNoLeaks(t *testing.T) {
	needRoot(t)
	New().Results() // first use of os/exec, pidfds, ... allocates what stays
	fds, kids := fdCount(t), children(t)
	maps, err := proc.ReadMaps(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Three rounds: a leak shows up three times; the Go runtime may add a
	// small mapping or two of its own meanwhile (new threads under load).
	const rounds = 3
	for range rounds {
		New().Results()
	}
	if after := fdCount(t); after != fds {
		t.Errorf("probes leaked fds: %d before, %d after", fds, after)
	}
	if after := children(t); len(after) != len(kids) {
		t.Errorf("probe children left: %v before, %v after", kids, after)
	}
	after, err := proc.ReadMaps(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// The Go heap may grow; the probes' own mappings are small anonymous
	// ones and must be gone. Look for one of each size the probes map.
	ps := uint64(unix.Getpagesize())
	count := func(vmas []proc.Vma, size uint64) int {
		n := 0
		for _, v := range vmas {
			if v.Size() == size && v.Name == "" && v.Perms == "rw-p" {
				n++
			}
		}
		return n
	}
	for _, pages := range []uint64{1, 2, 4} {
		if b, a := count(maps, pages*ps), count(after, pages*ps); a-b >= rounds {
			t.Errorf("%d more anonymous %d-page mappings after %d rounds of probing", a-b, pages, rounds)
		}
	}
}

// TestCached checks each probe runs once, however many callers ask at once,
// and that failures are cached too.
func TestCached(t *testing.T) {
	var okRuns, badRuns atomic.Int32
	p := newProbes([]Feature{
		{Name: "good", MinKernel: "1.0", probe: func(*Probes) (string, error) {
			okRuns.Add(1)
			return "fine", nil
		}},
		{Name: "bad", MinKernel: "99.0", probe: func(*Probes) (string, error) {
			badRuns.Add(1)
			return "", absentOn(os.NewSyscallError("frob", unix.ENOSYS), unix.ENOSYS)
		}},
	})
	var wg sync.WaitGroup
	errs := make([]error, 16)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.Check("good"); err != nil {
				t.Errorf("good: %v", err)
			}
			errs[i] = p.Check("bad")
		}()
	}
	wg.Wait()
	if okRuns.Load() != 1 || badRuns.Load() != 1 {
		t.Fatalf("probes ran %d and %d times, want once each", okRuns.Load(), badRuns.Load())
	}
	for _, err := range errs {
		if err != errs[0] {
			t.Fatalf("cached error differs: %v vs %v", err, errs[0])
		}
	}
	if r := p.Result("good"); !r.OK || r.Detail != "fine" {
		t.Fatalf("good: %+v", r)
	}
	if got := p.Results("bad", "good"); len(got) != 2 || got[0].OK || !got[1].OK {
		t.Fatalf("Results: %+v", got)
	}
}

func TestFeatureError(t *testing.T) {
	missing := &FeatureError{Name: "uffd-wp-async", MinKernel: "6.7", Running: "6.1.0",
		Err: absentOn(os.NewSyscallError("ioctl(UFFDIO_API)", unix.EINVAL), unix.EINVAL)}
	want := `kernel feature "uffd-wp-async" is not available (needs Linux 6.7, running 6.1.0): ioctl(UFFDIO_API): invalid argument`
	if missing.Error() != want {
		t.Errorf("message\n got %s\nwant %s", missing.Error(), want)
	}
	var err error = fmt.Errorf("pre-dump: %w", missing)
	if !errors.Is(err, ErrNotSupported) || !errors.Is(err, unix.EINVAL) {
		t.Errorf("%v: want ErrNotSupported and EINVAL reachable", err)
	}
	failed := &FeatureError{Name: "userfaultfd", MinKernel: "4.3", Running: "6.1.0",
		Err: os.NewSyscallError("userfaultfd", unix.EPERM)}
	if errors.Is(failed, ErrNotSupported) {
		t.Errorf("%v: a probe that failed with EPERM must not read as not supported", failed)
	}
	if !strings.Contains(failed.Error(), "could not be probed") {
		t.Errorf("message %q", failed.Error())
	}
	if err := New().Check("no-such-feature"); !errors.Is(err, ErrUnknownFeature) {
		t.Errorf("unknown feature: %v", err)
	}
}

func TestTable(t *testing.T) {
	p := New()
	seen := map[string]bool{}
	for _, f := range p.All() {
		if seen[f.Name] {
			t.Errorf("duplicate feature %s", f.Name)
		}
		seen[f.Name] = true
		if f.Description == "" || f.probe == nil {
			t.Errorf("%s: no description or probe", f.Name)
		}
		if f.Name != "dirty-tracker" {
			if _, err := parseVersion(f.MinKernel); err != nil {
				t.Errorf("%s: %v", f.Name, err)
			}
		}
	}
	for _, name := range []string{"ptrace-seize", "clone3-set-tid", "uffd-wp-async", "pagemap-scan", "soft-dirty", "timer-cr-ids", "dirty-tracker"} {
		if !seen[name] {
			t.Errorf("feature %s missing from the table", name)
		}
	}
	if len(p.Names()) != len(p.All()) {
		t.Errorf("Names and All disagree")
	}
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string][3]int{
		"6.18.44-fc-v657":   {6, 18, 44},
		"6.7":               {6, 7, 0},
		"2.6.35":            {2, 6, 35},
		"5.15.0-91-generic": {5, 15, 0},
		"6.8.0-rc1":         {6, 8, 0},
	} {
		got, err := parseVersion(in)
		if err != nil || got != want {
			t.Errorf("parseVersion(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseVersion("unknown"); err == nil {
		t.Error("parseVersion(unknown) succeeded")
	}
	if !versionLess([3]int{6, 1, 0}, [3]int{6, 7, 0}) || versionLess([3]int{6, 18, 44}, [3]int{6, 7, 0}) {
		t.Error("versionLess")
	}
	p := newProbes(features())
	p.version = [3]int{6, 1, 0}
	if p.ShouldHave("uffd-wp-async") || !p.ShouldHave("pidfd-getfd") || p.ShouldHave("dirty-tracker") {
		t.Error("ShouldHave on 6.1")
	}
}

// TestProbeELF parses the probe child's executable with debug/elf.
func TestProbeELF(t *testing.T) {
	b := probeELF()
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Fatalf("header: %v %v %v", f.Class, f.Machine, f.Type)
	}
	if len(f.Progs) != 1 || f.Progs[0].Type != elf.PT_LOAD || f.Progs[0].Flags != elf.PF_R|elf.PF_X {
		t.Fatalf("program headers: %+v", f.Progs)
	}
	ph := f.Progs[0]
	if f.Entry < ph.Vaddr || f.Entry >= ph.Vaddr+ph.Filesz || ph.Filesz != uint64(len(b)) {
		t.Fatalf("entry %#x outside the segment %#x+%d", f.Entry, ph.Vaddr, ph.Filesz)
	}
}

// TestSleepChild exercises the fallback probe child (for machines that do
// not execute memfds): it can be seized, stopped and removed.
func TestSleepChild(t *testing.T) {
	needRoot(t)
	kids := children(t)
	th := ptrace.NewThread()
	defer th.Close()
	var pid int
	err := th.Do(func() error {
		c, err := startSleepChild()
		if err != nil {
			return err
		}
		defer c.stop()
		pid = c.pid
		if err := c.seize(); err != nil {
			return err
		}
		_, err = ptrace.GetXstate(c.pid)
		return err
	})
	if errors.Is(err, exec.ErrNotFound) {
		t.Skip("no sleep in PATH")
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(proc.Path(pid, "stat")); err == nil {
		t.Errorf("sleep child %d still exists", pid)
	}
	if after := children(t); len(after) != len(kids) {
		t.Errorf("children %v before, %v after", kids, after)
	}
}

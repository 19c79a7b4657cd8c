package dumpcore

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/testutil"
	"golang.org/x/sys/unix"
)

// flagsWorkload starts the memory workload (4 MiB) and returns it with
// its buffer's VMA, whose flags the tests alter.
func flagsWorkload(t *testing.T) (*testutil.Workload, proc.Vma) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	w := testutil.Start(t, "-r", testutil.BuildC(t, "memcheck"), "-m", "4")
	return w, bufferVMA(t, w.Pid)
}

// TestServeLazyReadsFlagsFrozen: dump --lazy-pages reads the VMA flags
// of the frozen tree (its tree stays frozen while it serves: flags read
// before the freeze would need a second smaps walk before the first page
// leaves), and serves pages at once.
func TestServeLazyReadsFlagsFrozen(t *testing.T) {
	w, buf := flagsWorkload(t)
	t.Cleanup(func() { testHookEarlyFlags = nil })
	testHookEarlyFlags = func(map[int]map[vmaKey][]string) { t.Error("dump --lazy-pages read VMA flags before the freeze") }
	var served int
	_, err := Dump(t.Context(), Options{Pid: w.Pid, ImagesDir: t.TempDir(), Logger: slog.New(slog.DiscardHandler),
		LazyServe: func(read func(int, uint64, []byte) error, _ func(int) ([][2]uint64, error)) error {
			page := make([]byte, pageSize)
			if err := read(w.Pid, buf.Start, page); err != nil {
				return err
			}
			served++
			return errors.New("served one page") // the dump fails: the process is resumed
		}})
	if err == nil || !strings.Contains(err.Error(), "served one page") || served != 1 {
		t.Fatalf("dump: %v, %d pages served", err, served)
	}
	if r := w.Report(t); r.Status != "ok" {
		t.Fatalf("the workload after the dump: %+v", r)
	}
}

// TestFinalRoundChecksEarlyFlags: a migration's final round (the tree left
// stopped) takes VMA flags read before the freeze and compares them with
// smaps of the stopped tree: a post-copy round hands the outcome to its
// caller (no page may leave before it passes), a pre-copy round fails.
func TestFinalRoundChecksEarlyFlags(t *testing.T) {
	w, buf := flagsWorkload(t)
	t.Cleanup(func() { testHookEarlyFlags = nil })
	for _, tc := range []struct {
		name           string
		lazy, alter    bool
		wantDump, want error
	}{
		{"post-copy, same flags", true, false, nil, nil},
		{"post-copy, flags changed", true, true, nil, errFlagsMoved},
		{"pre-copy, same flags", false, false, nil, nil},
		{"pre-copy, flags changed", false, true, errFlagsMoved, nil},
	} {
		testHookEarlyFlags = func(early map[int]map[vmaKey][]string) {
			for k, f := range early[w.Pid] {
				if tc.alter && k.start == buf.Start {
					early[w.Pid][k] = append(slices.Clone(f), "lo")
				}
			}
		}
		res, err := Dump(t.Context(), Options{Pid: w.Pid, ImagesDir: t.TempDir(), LeaveStopped: true,
			NoPageData: tc.lazy, FlagsBeforeFreeze: true, Logger: slog.New(slog.DiscardHandler)})
		if st, e := proc.ReadStat(w.Pid); e != nil || st.State != 'T' {
			t.Fatalf("%s: the process is not left stopped (%v)", tc.name, e)
		}
		if err := unix.Kill(w.Pid, unix.SIGCONT); err != nil {
			t.Fatal(err)
		}
		if !errors.Is(err, tc.wantDump) {
			t.Fatalf("%s: dump: %v, want %v", tc.name, err, tc.wantDump)
		}
		if err != nil {
			continue
		}
		if (res.FlagsCheck != nil) != tc.lazy {
			t.Fatalf("%s: FlagsCheck set: %v", tc.name, res.FlagsCheck != nil)
		}
		if tc.lazy {
			if err := res.FlagsCheck(); !errors.Is(err, tc.want) {
				t.Fatalf("%s: check: %v, want %v", tc.name, err, tc.want)
			}
		}
	}
	if r := w.Report(t); r.Status != "ok" {
		t.Fatalf("the workload after four stopped dumps: %+v", r)
	}
}

// TestFinalRoundAfterPreDumpChecksEarlyFlags: the final round after a
// pre-dump round (its lazy memory listed) hands the round's dirty tracker
// over; closing it takes its write protection ("uw" in smaps) off, and
// VMAs may merge: no difference for the check.
func TestFinalRoundAfterPreDumpChecksEarlyFlags(t *testing.T) {
	w, _ := flagsWorkload(t)
	dir := t.TempDir()
	for _, d := range []string{"1", "2"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.DiscardHandler)
	if _, err := Dump(t.Context(), Options{Pid: w.Pid, ImagesDir: filepath.Join(dir, "1"), PreDump: true, TrackMem: true, Logger: log}); err != nil {
		t.Fatal(err)
	}
	res, err := Dump(t.Context(), Options{Pid: w.Pid, ImagesDir: filepath.Join(dir, "2"), PrevImagesDir: "../1", TrackMem: true,
		LeaveStopped: true, NoPageData: true, FlagsBeforeFreeze: true, Logger: log})
	if err != nil {
		unix.Kill(w.Pid, unix.SIGCONT)
		t.Fatal(err)
	}
	if res.FlagsCheck == nil || res.Release == nil || res.Unlisted {
		t.Fatalf("a listed final round: FlagsCheck set %v, Release set %v, unlisted %v", res.FlagsCheck != nil, res.Release != nil, res.Unlisted)
	}
	res.Release()
	if err := res.FlagsCheck(); err != nil {
		unix.Kill(w.Pid, unix.SIGCONT)
		t.Fatalf("check: %v", err)
	}
	unix.Kill(w.Pid, unix.SIGCONT)
	if r := w.Report(t); r.Status != "ok" {
		t.Fatalf("the workload after the final round: %+v", r)
	}
}

// TestSameVma: a VMA found again inside a larger one of the same kind (it
// merged with a neighbour) is the same; one whose permissions, file or
// file offset differ is not.
func TestSameVma(t *testing.T) {
	anon := vmaKey{start: 0x2000, end: 0x3000, perms: "rw-p"}
	file := vmaKey{start: 0x2000, end: 0x3000, pgoff: 0x5000, inode: 7, perms: "r--p", dev: "fd:01", name: "/lib/x.so"}
	for _, tc := range []struct {
		k    vmaKey
		v    proc.Vma
		same bool
	}{
		{anon, proc.Vma{Start: 0x2000, End: 0x3000, Perms: "rw-p"}, true},
		{anon, proc.Vma{Start: 0x1000, End: 0x4000, Perms: "rw-p"}, true},
		{anon, proc.Vma{Start: 0x1000, End: 0x2800, Perms: "rw-p"}, false},
		{anon, proc.Vma{Start: 0x1000, End: 0x4000, Perms: "r--p"}, false},
		{anon, proc.Vma{Start: 0x1000, End: 0x4000, Perms: "rw-p", Name: "[heap]"}, false},
		{file, proc.Vma{Start: 0x1000, End: 0x4000, Pgoff: 0x4000, Inode: 7, Perms: "r--p", Dev: "fd:01", Name: "/lib/x.so"}, true},
		{file, proc.Vma{Start: 0x1000, End: 0x4000, Pgoff: 0x5000, Inode: 7, Perms: "r--p", Dev: "fd:01", Name: "/lib/x.so"}, false},
		{file, proc.Vma{Start: 0x2000, End: 0x3000, Pgoff: 0x5000, Inode: 8, Perms: "r--p", Dev: "fd:01", Name: "/lib/x.so"}, false},
	} {
		if got := sameVma(tc.k, &tc.v); got != tc.same {
			t.Errorf("%+v in %+v: same %v, want %v", tc.k, tc.v, got, tc.same)
		}
	}
}

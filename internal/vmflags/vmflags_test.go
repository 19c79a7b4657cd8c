package vmflags

import (
	"bufio"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/proc"
)

func TestMain(m *testing.M) {
	if os.Getenv("VMFLAGS_CHILD") != "" {
		child()
		return
	}
	os.Exit(m.Run())
}

// child makes mappings with many flags and combinations of them, some
// not among the probes' (a file mapping, hugetlb if the kernel has pages
// for it), and waits to be killed.
func child() {
	rw := unix.PROT_READ | unix.PROT_WRITE
	m := func(prot, flags int) []byte {
		b, err := unix.Mmap(-1, 0, 8*os.Getpagesize(), prot, flags|unix.MAP_ANONYMOUS)
		if err != nil {
			panic(err)
		}
		return b
	}
	b := m(rw, unix.MAP_PRIVATE)
	unix.Madvise(b[:4096], unix.MADV_DONTDUMP)
	unix.Madvise(b[8192:16384], unix.MADV_HUGEPAGE)
	unix.Madvise(b[8192:12288], unix.MADV_DONTFORK)
	unix.Mlock(b[16384:20480])
	s := m(rw, unix.MAP_SHARED)
	unix.Madvise(s[4096:8192], unix.MADV_DONTDUMP)
	m(unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_NORESERVE)
	w := m(rw, unix.MAP_PRIVATE)
	unix.Madvise(w, unix.MADV_WIPEONFORK)
	unix.Madvise(w[:4096], unix.MADV_RANDOM)
	if f, err := os.Open("/bin/sh"); err == nil {
		unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ, unix.MAP_PRIVATE)
		unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ, unix.MAP_SHARED)
	}
	unix.Mmap(-1, 0, 2<<20, rw, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_HUGETLB)
	os.Stdout.Write([]byte("ready\n"))
	select {}
}

func startChild(t *testing.T) int {
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), "VMFLAGS_CHILD=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if l, err := bufio.NewReader(out).ReadString('\n'); err != nil || l != "ready\n" {
		t.Fatalf("child: %q %v", l, err)
	}
	return cmd.Process.Pid
}

func TestKernelInfo(t *testing.T) {
	b, err := os.ReadFile(BTFPath)
	if err != nil {
		t.Skip(err)
	}
	ki, err := kernelInfoFrom(b)
	if err != nil {
		t.Fatal(err)
	}
	if ki.iterFunc == 0 || ki.vmEnd != ki.vmStart+8 || ki.vmFlags == 0 {
		t.Fatalf("implausible: %+v", ki)
	}
	// Cut anywhere, the blob is refused, never a panic.
	for _, n := range []int{0, 3, 24, 25, len(b) / 3, len(b) - 1} {
		if _, err := kernelInfoFrom(b[:n]); err == nil {
			t.Errorf("BTF cut at %d bytes accepted", n)
		}
	}
}

func needIterator(t *testing.T) {
	t.Helper()
	if err := Prepare(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal(err) // the CI machine has BTF and CAP_BPF
		}
		t.Skip(err)
	}
}

// The iterator's answer is smaps', for a stopped process with many kinds
// of mappings and for every process of the machine that holds still.
func TestReadMatchesSmaps(t *testing.T) {
	needIterator(t)
	t.Log(Source())
	pid := startChild(t)
	syscall.Kill(pid, syscall.SIGSTOP)
	defer syscall.Kill(pid, syscall.SIGCONT)
	got, err := Read(pid)
	if err != nil {
		t.Fatal(err)
	}
	want, err := proc.ReadSmaps(pid)
	if err != nil {
		t.Fatal(err)
	}
	if !sameVmas(got, want) {
		t.Fatalf("stopped child: iterator and smaps differ:\n%v\n%v", got, want)
	}
	if recs, _ := state.it.read(pid); fill(slices.Clone(want), recs) != filled {
		t.Errorf("the child's VMAs were not all named by the iterator: %v", Source())
	}

	t.Log("named:", learned())
	ents, _ := os.ReadDir("/proc")
	compared, byIterator := 0, 0
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == os.Getpid() {
			continue
		}
		for range 3 {
			before, err1 := proc.ReadSmaps(p)
			got, err2 := Read(p)
			after, err3 := proc.ReadSmaps(p)
			if err1 != nil || err2 != nil || err3 != nil {
				break // gone, or a kernel thread
			}
			if !sameVmas(before, after) {
				continue // it changes its mappings: try again
			}
			if !sameVmas(got, before) {
				t.Errorf("pid %d: iterator and smaps differ", p)
			}
			if recs, err := state.it.read(p); err == nil && fill(slices.Clone(before), recs) == filled {
				byIterator++
			}
			compared++
			break
		}
	}
	t.Logf("%d processes compared, %d of them named by the iterator alone", compared, byIterator)
	if byIterator == 0 {
		t.Error("no process was named by the iterator alone")
	}
}

func sameVmas(a, b []proc.Vma) bool {
	return slices.EqualFunc(a, b, func(x, y proc.Vma) bool {
		return x.Start == y.Start && x.End == y.End && x.Perms == y.Perms && x.Name == y.Name &&
			slices.Equal(x.VmFlags, y.VmFlags)
	})
}

func TestNames(t *testing.T) {
	var n names
	if err := n.learn(0b1011, strings.Fields("rd wr sh")); err != nil {
		t.Fatal(err)
	}
	n.learn(0b111, strings.Fields("rd wr")) // a bit smaps does not name: nothing learned
	if f, ok := n.flags(0b1001); !ok || !slices.Equal(f, []string{"rd", "sh"}) {
		t.Fatalf("flags: %v %v", f, ok)
	}
	if _, ok := n.flags(0b100); ok {
		t.Fatal("a bit never learned was named")
	}
	if err := n.learn(0b1, []string{"wr"}); err == nil {
		t.Fatal("a bit with two names was accepted")
	}
}

// BenchmarkRead reads the VMAs of the benchmark, or of the process
// VMFLAGS_BENCH_PID names (a large one shows what smaps costs).
func BenchmarkRead(b *testing.B) {
	if err := Prepare(); err != nil {
		b.Skip(err)
	}
	pid := os.Getpid()
	if p, err := strconv.Atoi(os.Getenv("VMFLAGS_BENCH_PID")); err == nil {
		pid = p
	}
	for _, src := range []string{"iterator", "smaps"} {
		b.Run(src, func(b *testing.B) {
			for b.Loop() {
				var err error
				if src == "smaps" {
					_, err = proc.ReadSmaps(pid)
				} else {
					_, err = Read(pid)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// What Prepare learns comes back the same from the cache, for this boot
// only; a damaged cache is refused.
func TestCache(t *testing.T) {
	needIterator(t)
	ki, _, n, gate, err := learnAll()
	if err != nil {
		t.Fatal(err)
	}
	path := t.TempDir() + "/sub/vmflags.json"
	if err := writeCache(path, newCache("boot-a", ki, n, gate)); err != nil {
		t.Fatal(err)
	}
	c, err := readCache(path, "boot-a")
	if err != nil {
		t.Fatal(err)
	}
	if c.kernelInfo() != ki || c.names() != n || !slices.Equal(c.Gate, gate) {
		t.Fatalf("cache round trip: %+v %+v", c.kernelInfo(), ki)
	}
	if _, err := readCache(path, "boot-b"); err == nil {
		t.Fatal("another boot's cache accepted")
	}
	for _, bad := range []string{`{"boot_id":"boot-a"}`, `{"boot_id":"boot-a","IterFunc":1,"Start":0,"End":8,"FlagsOff":32,"names":{"70":"rd"}}`, `{`} {
		os.WriteFile(path, []byte(bad), 0o600)
		if _, err := readCache(path, "boot-a"); err == nil {
			t.Errorf("cache %s accepted", bad)
		}
	}
}

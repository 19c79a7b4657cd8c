package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptrace"
	"github.com/ferrycr/ferry/internal/vmflags"
	"github.com/ferrycr/ferry/uffd"
)

// features returns the feature table in report order: what every dump and
// restore needs first, then what pre-dump, lazy pages and timers use.
func features() []Feature {
	return []Feature{
		{Name: "ptrace-seize", MinKernel: "3.4", Required: true, probe: probePtraceSeize,
			Description: "PTRACE_SEIZE + PTRACE_INTERRUPT: freeze a tree without signals"},
		{Name: "ptrace-getregset-xstate", MinKernel: "2.6.35", Required: true, probe: probeXstate,
			Description: "PTRACE_GETREGSET NT_X86_XSTATE: FPU/SSE/AVX register state"},
		{Name: "ptrace-sigmask", MinKernel: "3.11", Required: true, probe: probeSigmask,
			Description: "PTRACE_GETSIGMASK/SETSIGMASK: blocked-signal masks"},
		{Name: "ptrace-peeksiginfo", MinKernel: "3.10", Required: true, probe: probePeekSiginfo,
			Description: "PTRACE_PEEKSIGINFO: pending signals, read without dequeuing"},
		{Name: "ptrace-rseq-config", MinKernel: "5.13", probe: probeRseq,
			Description: "PTRACE_GET_RSEQ_CONFIGURATION: a thread's rseq registration"},
		{Name: "seccomp-suspend", MinKernel: "4.3", probe: probeSeccompSuspend,
			Description: "PTRACE_O_SUSPEND_SECCOMP and PTRACE_SECCOMP_GET_FILTER: processes with seccomp filters (containers) dumped and restored"},
		{Name: "process-vm-rw", MinKernel: "3.2", Required: true, probe: probeProcessVM,
			Description: "process_vm_readv/writev: bulk copy of a target's memory"},
		{Name: "pidfd-getfd", MinKernel: "5.6", Required: true, probe: probePidfdGetfd,
			Description: "pidfd_open + pidfd_getfd: duplicate a target's fds without a parasite"},
		{Name: "kcmp", MinKernel: "3.5", Required: true, probe: probeKcmp,
			Description: "kcmp(KCMP_FILE): fds sharing one open file description"},
		{Name: "clone3-set-tid", MinKernel: "5.5", Required: true, probe: probeClone3SetTid,
			Description: "clone3 with set_tid: recreate processes and threads with their IDs"},
		{Name: "prctl-mm-map", MinKernel: "3.18", Required: true, probe: probeMMMap,
			Description: "prctl(PR_SET_MM, PR_SET_MM_MAP): restore mm fields, auxv and exe link"},
		{Name: "memfd-exec", MinKernel: "3.17", Required: true, probe: probeMemfdExec,
			Description: "memfd_create and exec of a memfd: the restore seed"},
		{Name: "mremap-vdso", MinKernel: "4.6", probe: probeVdso,
			Description: "[vdso]/[vvar] mappings that restore moves to the dumped addresses with mremap"},
		{Name: "timer-cr-ids", MinKernel: "6.15", probe: probeTimerIDs,
			Description: "prctl(PR_TIMER_CREATE_RESTORE_IDS): POSIX timers with chosen ids"},
		{Name: "userfaultfd", MinKernel: "4.3", probe: probeUserfaultfd,
			Description: "userfaultfd with the UFFDIO_API handshake: lazy pages (post-copy)"},
		{Name: "uffd-wp-async", MinKernel: "6.7", probe: probeUffdWPAsync,
			Description: "userfaultfd async write-protect (UFFD_FEATURE_WP_ASYNC): dirty tracking for pre-dump"},
		{Name: "pagemap-scan", MinKernel: "6.7", probe: probePagemapScan,
			Description: "PAGEMAP_SCAN ioctl: read and re-arm written pages in one call"},
		{Name: "soft-dirty", MinKernel: "3.11", probe: probeSoftDirty,
			Description: "soft-dirty pte bits (clear_refs 4): fallback dirty tracking, needs CONFIG_MEM_SOFT_DIRTY"},
		{Name: "vma-flags-iter", MinKernel: "6.1", probe: probeVmaFlags,
			Description: "BPF task_vma iterator: VMA flags without smaps' walk of every page (~20 ms per GiB frozen); needs BTF and CAP_BPF"},
		{Name: "dirty-tracker", probe: probeDirtyTracker,
			Description: "the dirty-page tracker pre-dump uses here (informational)"},
	}
}

// absentOn returns err marked as absent if it carries one of errnos (the
// answers of a kernel that lacks the call or request), else err as is.
func absentOn(err error, errnos ...unix.Errno) error {
	for _, e := range errnos {
		if errors.Is(err, e) {
			return absent(err)
		}
	}
	return err
}

// --- ptrace, on a probe child ---

func probePtraceSeize(*Probes) (string, error) {
	return withChild(false, func(c *child) (string, error) {
		// An unknown ptrace request is EIO.
		if err := c.seize(); err != nil {
			return "", absentOn(err, unix.EIO)
		}
		if c.fromMemfd {
			return "seized and interrupted a probe child", nil
		}
		return "seized and interrupted sleep(1)", nil
	})
}

func probeSeccompSuspend(*Probes) (string, error) {
	return withChild(false, func(c *child) (string, error) {
		if err := ptrace.Seize(c.pid, ptrace.OSuspendSeccomp); err != nil {
			return "", err
		}
		c.traced = true
		if !ptrace.SeccompSuspended(c.pid) {
			return "", absent(errors.New("the kernel refused PTRACE_O_SUSPEND_SECCOMP (it needs CAP_SYS_ADMIN, and ferry under no seccomp filter of its own)"))
		}
		return "seized a probe child with its filters suspended", nil
	})
}

func probeXstate(*Probes) (string, error) {
	return withChild(true, func(c *child) (string, error) {
		xs, err := ptrace.GetXstate(c.pid)
		if err != nil {
			// EIO: no PTRACE_GETREGSET; EINVAL: no such regset; ENODEV: no XSAVE.
			return "", absentOn(err, unix.EIO, unix.EINVAL, unix.ENODEV)
		}
		// The legacy FXSAVE region and the XSAVE header come first.
		if len(xs) < 576 {
			return "", fmt.Errorf("XSAVE area of %d bytes is shorter than its 576-byte header", len(xs))
		}
		return fmt.Sprintf("XSAVE area %d bytes", len(xs)), nil
	})
}

func probeSigmask(*Probes) (string, error) {
	return withChild(true, func(c *child) (string, error) {
		orig, err := ptrace.GetSigmask(c.pid)
		if err != nil {
			return "", absentOn(err, unix.EIO)
		}
		want := orig ^ 1<<(unix.SIGUSR2-1)
		if err := ptrace.SetSigmask(c.pid, want); err != nil {
			return "", absentOn(err, unix.EIO)
		}
		got, err := ptrace.GetSigmask(c.pid)
		if err != nil {
			return "", err
		}
		if got != want {
			return "", fmt.Errorf("PTRACE_SETSIGMASK %#x, then GETSIGMASK read %#x", want, got)
		}
		return "", ptrace.SetSigmask(c.pid, orig)
	})
}

func probePeekSiginfo(*Probes) (string, error) {
	return withChild(true, func(c *child) (string, error) {
		// A stopped tracee leaves the signal queued (process-wide queue,
		// since kill(2) targets the process).
		if err := unix.Kill(c.pid, unix.SIGUSR1); err != nil {
			return "", os.NewSyscallError("kill", err)
		}
		infos, err := ptrace.PeekSiginfo(c.pid, true)
		if err != nil {
			return "", absentOn(err, unix.EIO)
		}
		for _, si := range infos {
			if len(si) >= 4 && unix.Signal(binary.LittleEndian.Uint32(si)) == unix.SIGUSR1 {
				return "read back a queued SIGUSR1", nil
			}
		}
		return "", fmt.Errorf("PTRACE_PEEKSIGINFO returned %d signals, none the SIGUSR1 just sent", len(infos))
	})
}

func probeRseq(*Probes) (string, error) {
	return withChild(true, func(c *child) (string, error) {
		rc, err := ptrace.GetRseqConfig(c.pid)
		if err != nil {
			return "", absentOn(err, unix.EIO)
		}
		if rc.Ptr == 0 {
			return "probe child has no rseq area", nil
		}
		return fmt.Sprintf("rseq area %#x, %d bytes", rc.Ptr, rc.Size), nil
	})
}

// --- other access to a target ---

func probeProcessVM(*Probes) (string, error) {
	return withChild(false, func(c *child) (string, error) {
		vmas, err := proc.ReadMaps(c.pid)
		if err != nil {
			return "", err
		}
		// The first mapping of an ELF executable starts with its header.
		var magic [4]byte
		if err := vmRead(c.pid, vmas[0].Start, magic[:]); err != nil {
			return "", absentOn(err, unix.ENOSYS)
		}
		if string(magic[:]) != "\x7fELF" {
			return "", fmt.Errorf("process_vm_readv read %q at %#x of %d, not an ELF header", magic, vmas[0].Start, c.pid)
		}
		// Write a pattern to the top of the child's stack, read it back,
		// and put the original bytes back.
		var stack *proc.Vma
		for i := range vmas {
			if vmas[i].Name == "[stack]" {
				stack = &vmas[i]
			}
		}
		if stack == nil {
			return "", fmt.Errorf("probe child %d has no [stack]", c.pid)
		}
		at := stack.End - 8
		var orig, back [8]byte
		pattern := [8]byte{'f', 'e', 'r', 'r', 'y', 0xa5, 0x5a, 0}
		if err := vmRead(c.pid, at, orig[:]); err != nil {
			return "", err
		}
		if err := vmWrite(c.pid, at, pattern[:]); err != nil {
			return "", absentOn(err, unix.ENOSYS)
		}
		err = vmRead(c.pid, at, back[:])
		if werr := vmWrite(c.pid, at, orig[:]); err == nil {
			err = werr
		}
		if err != nil {
			return "", err
		}
		if back != pattern {
			return "", fmt.Errorf("process_vm_writev wrote %x at %#x of %d, read back %x", pattern, at, c.pid, back)
		}
		return "", nil
	})
}

func vmRead(pid int, addr uint64, b []byte) error {
	return compel.ReadMem(pid, []compel.Segment{{Addr: addr, Local: b}})
}

func vmWrite(pid int, addr uint64, b []byte) error {
	return compel.WriteMem(pid, []compel.Segment{{Addr: addr, Local: b}})
}

func probePidfdGetfd(*Probes) (string, error) {
	return withChild(false, func(c *child) (string, error) {
		pidfd, err := unix.PidfdOpen(c.pid, 0)
		if err != nil {
			return "", absentOn(os.NewSyscallError("pidfd_open", err), unix.ENOSYS)
		}
		defer unix.Close(pidfd)
		fd, err := unix.PidfdGetfd(pidfd, 0, 0)
		if err != nil {
			return "", absentOn(os.NewSyscallError("pidfd_getfd", err), unix.ENOSYS)
		}
		defer unix.Close(fd)
		// os/exec gave the child /dev/null as fd 0.
		link := fmt.Sprintf("/proc/self/fd/%d", fd)
		target, err := os.Readlink(link)
		if err != nil {
			return "", err
		}
		if target != os.DevNull {
			return "", fmt.Errorf("pidfd_getfd of fd 0 of %d gave %s, want %s", c.pid, target, os.DevNull)
		}
		return "", nil
	})
}

func probeKcmp(*Probes) (string, error) {
	return withChild(false, func(c *child) (string, error) {
		same, err := kcmp(c.pid, c.pid, kcmpFile, 0, 0)
		if err != nil {
			return "", absentOn(err, unix.ENOSYS)
		}
		// A /dev/null of our own is another open file description.
		mine, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return "", &os.PathError{Op: "open", Path: os.DevNull, Err: err}
		}
		defer unix.Close(mine)
		other, err := kcmp(os.Getpid(), c.pid, kcmpFile, mine, 0)
		if err != nil {
			return "", err
		}
		if same != 0 || other == 0 {
			return "", fmt.Errorf("kcmp(KCMP_FILE) says %d for one file and %d for two", same, other)
		}
		return "", nil
	})
}

// --- restore primitives ---

func probeClone3SetTid(*Probes) (string, error) {
	// Never fork from Go: pass arguments every kernel rejects, and tell
	// kernels apart by how. A set_tid_size of 1 with a NULL set_tid is
	// EINVAL where clone3 knows set_tid (5.5+); clone3 without set_tid
	// (5.3, 5.4) sees non-zero bytes past its 64-byte struct: E2BIG; no
	// clone3 at all: ENOSYS. Should the kernel get past these checks,
	// CLONE_THREAD|CLONE_SIGHAND without CLONE_VM still fails (EINVAL)
	// before anything is created.
	args := cloneArgs{Flags: unix.CLONE_THREAD | unix.CLONE_SIGHAND, SetTidSize: 1}
	err := clone3(&args, unix.CLONE_ARGS_SIZE_VER1)
	switch {
	case errors.Is(err, unix.EINVAL):
		return "clone3 checks set_tid", nil
	case errors.Is(err, unix.E2BIG), errors.Is(err, unix.ENOSYS):
		return "", absent(err)
	}
	return "", err
}

func probeMMMap(*Probes) (string, error) {
	size, err := prctlMMMapSizeQuery()
	if err != nil {
		// EINVAL: before 3.18, or no CONFIG_CHECKPOINT_RESTORE.
		return "", absentOn(err, unix.EINVAL)
	}
	if size != prctlMMMapSize {
		return "", fmt.Errorf("kernel's struct prctl_mm_map is %d bytes, ferry's is %d", size, prctlMMMapSize)
	}
	return fmt.Sprintf("struct prctl_mm_map %d bytes", size), nil
}

func probeMemfdExec(*Probes) (string, error) {
	th := ptrace.NewThread()
	defer th.Close()
	var detail string
	err := th.Do(func() error {
		c, err := startMemfdChild()
		if err != nil {
			return absentOn(err, unix.ENOSYS)
		}
		defer c.stop()
		exe, err := os.Readlink(proc.Path(c.pid, "exe"))
		if err != nil {
			return err
		}
		if !strings.HasPrefix(exe, "/memfd:"+childName) {
			return fmt.Errorf("probe child %d runs %s, not the memfd", c.pid, exe)
		}
		detail = fmt.Sprintf("ran a %d-byte ELF from a memfd", len(probeELF()))
		return nil
	})
	return detail, err
}

func probeVdso(*Probes) (string, error) {
	vmas, err := proc.ReadMaps(os.Getpid())
	if err != nil {
		return "", err
	}
	var parts []string
	vdso := false
	for _, v := range vmas {
		switch v.Name {
		case "[vdso]":
			vdso = true
			fallthrough
		case "[vvar]", "[vvar_vclock]":
			parts = append(parts, fmt.Sprintf("%s %d pages", v.Name, v.Size()/uint64(unix.Getpagesize())))
		}
	}
	if !vdso {
		return "", absentf("no [vdso] in /proc/self/maps (booted with vdso=0?)")
	}
	return strings.Join(parts, ", "), nil
}

func probeTimerIDs(*Probes) (string, error) {
	mode, err := unix.PrctlRetInt(unix.PR_TIMER_CREATE_RESTORE_IDS, unix.PR_TIMER_CREATE_RESTORE_IDS_GET, 0, 0, 0)
	if err != nil {
		// An unknown prctl option is EINVAL.
		return "", absentOn(os.NewSyscallError("prctl(PR_TIMER_CREATE_RESTORE_IDS)", err), unix.EINVAL)
	}
	switch mode {
	case unix.PR_TIMER_CREATE_RESTORE_IDS_OFF:
		return "restore mode off", nil
	case unix.PR_TIMER_CREATE_RESTORE_IDS_ON:
		return "restore mode on", nil
	}
	return "", fmt.Errorf("prctl(PR_TIMER_CREATE_RESTORE_IDS_GET) returned %d", mode)
}

// --- userfaultfd and dirty tracking, on ferry's own memory ---

func probeUserfaultfd(*Probes) (string, error) {
	// Asking for no feature returns every feature the kernel has.
	f, err := uffd.Supported()
	if err != nil {
		return "", absentOn(err, unix.ENOSYS)
	}
	return fmt.Sprintf("features %#x", f), nil
}

// pageMem maps n private anonymous pages and writes to each of the given
// ones. The caller unmaps it.
func pageMem(n int, touch ...int) ([]byte, error) {
	ps := unix.Getpagesize()
	mem, err := unix.Mmap(-1, 0, n*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, os.NewSyscallError("mmap", err)
	}
	for _, i := range touch {
		mem[i*ps] = 1
	}
	return mem, nil
}

// pagemapEntry reads the /proc/self/pagemap entry of the page at addr.
func pagemapEntry(fd int, addr uint64) (uint64, error) {
	var b [8]byte
	off := int64(addr / uint64(unix.Getpagesize()) * 8)
	n, err := unix.Pread(fd, b[:], off)
	if err != nil {
		return 0, &os.PathError{Op: "read", Path: "/proc/self/pagemap", Err: err}
	}
	if n != len(b) {
		return 0, fmt.Errorf("/proc/self/pagemap: short read at %d", off)
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

func openPagemap() (int, error) {
	fd, err := unix.Open("/proc/self/pagemap", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: "/proc/self/pagemap", Err: err}
	}
	return fd, nil
}

func probeUffdWPAsync(*Probes) (string, error) {
	u, err := uffd.Open(uffd.FeatureWPAsync)
	if err != nil {
		if errors.Is(err, uffd.ErrNotSupported) {
			return "", absentf("UFFDIO_API refused UFFD_FEATURE_WP_ASYNC: %v", err)
		}
		return "", absentOn(err, unix.ENOSYS)
	}
	defer u.Close() // closing unregisters the range
	ps := uint64(unix.Getpagesize())
	mem, err := pageMem(2, 0, 1)
	if err != nil {
		return "", err
	}
	defer unix.Munmap(mem)
	addr := addrOf(mem)
	if _, err := u.Register(addr, 2*ps, uffd.RegisterWP); err != nil {
		return "", err
	}
	if err := u.WriteProtect(addr, 2*ps, true); err != nil {
		return "", err
	}
	pm, err := openPagemap()
	if err != nil {
		return "", err
	}
	defer unix.Close(pm)
	before, err := pagemapEntry(pm, addr)
	if err != nil {
		return "", err
	}
	// In async mode the kernel resolves this fault itself: no message, no
	// waiting (in sync mode this write would block until someone served
	// the fault, which is why the handshake is checked first).
	mem[0] = 2
	after0, err := pagemapEntry(pm, addr)
	if err != nil {
		return "", err
	}
	after1, err := pagemapEntry(pm, addr+ps)
	if err != nil {
		return "", err
	}
	if before&pmUffdWP == 0 || after0&pmUffdWP != 0 || after1&pmUffdWP == 0 {
		return "", fmt.Errorf("pagemap uffd-wp bits: %t before a write, %t after it, %t on the untouched page; want true, false, true",
			before&pmUffdWP != 0, after0&pmUffdWP != 0, after1&pmUffdWP != 0)
	}
	return "write to a protected page resolved by the kernel", nil
}

func probePagemapScan(*Probes) (string, error) {
	ps := uint64(unix.Getpagesize())
	mem, err := pageMem(4, 0, 2)
	if err != nil {
		return "", err
	}
	defer unix.Munmap(mem)
	sc, err := uffd.OpenScanner(0)
	if err != nil {
		return "", err
	}
	defer sc.Close()
	addr := addrOf(mem)
	rs, err := sc.Scan(addr, addr+4*ps, uffd.Query{Mask: uffd.PagePresent, ReturnMask: uffd.PagePresent})
	if err != nil {
		// pagemap has no ioctls before 6.7.
		return "", absentOn(err, unix.ENOTTY)
	}
	want := []uffd.Region{{Start: addr, End: addr + ps, Categories: uffd.PagePresent}, {Start: addr + 2*ps, End: addr + 3*ps, Categories: uffd.PagePresent}}
	if len(rs) != len(want) || rs[0] != want[0] || rs[1] != want[1] {
		return "", fmt.Errorf("PAGEMAP_SCAN of 4 pages with pages 0 and 2 written: %x; want %x", rs, want)
	}
	return "", nil
}

func probeSoftDirty(*Probes) (string, error) {
	mem, err := pageMem(1, 0)
	if err != nil {
		return "", err
	}
	defer unix.Munmap(mem)
	pm, err := openPagemap()
	if err != nil {
		return "", err
	}
	defer unix.Close(pm)
	// Clears the soft-dirty bits of all of ferry's memory; nothing else
	// in ferry uses them.
	f, err := os.OpenFile("/proc/self/clear_refs", os.O_WRONLY, 0)
	if err != nil {
		return "", err
	}
	_, err = f.WriteString(clearRefsSoftDirty)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", absentOn(err, unix.EINVAL)
	}
	addr := addrOf(mem)
	cleared, err := pagemapEntry(pm, addr)
	if err != nil {
		return "", err
	}
	mem[0] = 2
	written, err := pagemapEntry(pm, addr)
	if err != nil {
		return "", err
	}
	switch {
	case cleared&pmPresent == 0:
		return "", errors.New("pagemap: written page not present")
	case cleared&pmSoftDirty != 0:
		return "", errors.New("pagemap: soft-dirty bit still set after clear_refs 4")
	case written&pmSoftDirty == 0:
		return "", absentf("pagemap bit 55 stays clear after a write (kernel built without CONFIG_MEM_SOFT_DIRTY?)")
	}
	return "", nil
}

func probeVmaFlags(*Probes) (string, error) {
	if err := vmflags.Prepare(); err != nil {
		return "", absent(err)
	}
	return vmflags.Source(), nil
}

func probeDirtyTracker(p *Probes) (string, error) {
	return string(p.DirtyTracker()), nil
}

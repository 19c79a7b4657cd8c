package restorecore

import (
	"errors"
	"fmt"
	"os"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/lazypages"
	"github.com/ferrycr/ferry/uffd"
)

// lazy reports whether a VMA's pages are left to the lazy-pages daemon:
// private anonymous memory, with --lazy-pages.
func (b *builder) lazy(v *pb.Vma) bool {
	return b.r.opts.LazyPages && lazypages.Lazy(v)
}

// eachEager calls fn with each part of run r that the restore fills
// itself: all of it, or with --lazy-pages the parts outside lazy VMAs.
func (b *builder) eachEager(r images.PageRun, fn func(images.PageRun)) {
	if !b.r.opts.LazyPages {
		fn(r)
		return
	}
	eachOverlap(b.p.mm.Vmas, r.Vaddr, r.Vaddr+uint64(len(r.Data)), func(v *pb.Vma, a, e uint64) {
		if !b.lazy(v) {
			fn(images.PageRun{Vaddr: a, Data: r.Data[a-r.Vaddr : e-r.Vaddr]})
		}
	})
}

// eachOverlap calls fn with each VMA (vmas in address order, disjoint)
// meeting [start, end), and the part of the range inside it.
func eachOverlap(vmas []*pb.Vma, start, end uint64, fn func(v *pb.Vma, a, e uint64)) {
	i := sort.Search(len(vmas), func(i int) bool { return vmas[i].End > start })
	for ; i < len(vmas) && vmas[i].Start < end; i++ {
		fn(vmas[i], max(vmas[i].Start, start), min(vmas[i].End, end))
	}
}

// eagerFilter picks the pagemap entries a lazy restore needs the data of:
// those meeting a VMA the lazy-pages daemon does not serve. Entries come
// in address order (a new pass starts over).
func eagerFilter(vmas []*pb.Vma) func(images.PageEntry) bool {
	lazy := make([]bool, len(vmas))
	for i, v := range vmas {
		lazy[i] = lazypages.Lazy(v)
	}
	i := 0
	var last uint64
	return func(e images.PageEntry) bool {
		if e.Vaddr < last {
			i = 0
		}
		last = e.Vaddr
		for i < len(vmas) && vmas[i].End <= e.Vaddr {
			i++
		}
		for k := i; k < len(vmas) && vmas[k].Start < e.End(); k++ {
			if !lazy[k] {
				return true
			}
		}
		return false
	}
}

// setupLazy creates a userfaultfd inside the process, registers its lazy
// VMAs in missing mode and hands it to the lazy-pages daemon; from then
// on the daemon serves their pages.
func (b *builder) setupLazy() error {
	if !b.r.opts.LazyPages {
		return nil
	}
	var lazy []*pb.Vma
	for _, v := range b.p.mm.Vmas {
		if b.lazy(v) {
			lazy = append(lazy, v)
		}
	}
	if len(lazy) == 0 {
		return nil
	}
	rfd, err := b.userfaultfd(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		return fmt.Errorf("userfaultfd in the restored process: %w", err)
	}
	defer b.sys(unix.SYS_CLOSE, rfd)
	pidfd, err := unix.PidfdOpen(b.pid, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	fd, err := unix.PidfdGetfd(pidfd, int(rfd), 0)
	if err != nil {
		return os.NewSyscallError("pidfd_getfd", err)
	}
	// The handshake on ferry's side: the features (fork events) want
	// CAP_SYS_PTRACE, which a process in a user namespace of its own
	// does not have; the userfaultfd serves the memory of the process
	// that made it, whoever asks.
	u, err := uffd.Adopt(fd, lazypages.Features)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("userfaultfd of the restored process: %w", err)
	}
	defer u.Close()
	for _, v := range lazy {
		if _, err := u.Register(v.Start, v.End-v.Start, uffd.RegisterMissing); err != nil {
			return fmt.Errorf("VMA %#x-%#x: %w", v.Start, v.End, err)
		}
	}
	return lazypages.Handover(b.r.opts.LazySocket, int(b.p.pstree.Pid), b.pid, u.Fd())
}

// userfaultfd makes a userfaultfd in the process (flags O_CLOEXEC,
// O_NONBLOCK, UFFD_USER_MODE_ONLY). Where the system call is refused (in
// a user namespace of the tree's own it wants CAP_SYS_PTRACE in the
// initial one, unless vm.unprivileged_userfaultfd), the process asks
// /dev/userfaultfd, which ferry opens for it (USERFAULTFD_IOC_NEW makes
// one for the memory of the process that asks).
func (b *builder) userfaultfd(flags uint64) (uint64, error) {
	fd, err := b.sys(unix.SYS_USERFAULTFD, flags)
	if !errors.Is(err, unix.EPERM) || b.r.opts.Caller != nil {
		return fd, err
	}
	dev, derr := os.OpenFile("/dev/userfaultfd", os.O_RDWR|unix.O_CLOEXEC, 0)
	if derr != nil {
		return 0, fmt.Errorf("%w (and %v)", err, derr)
	}
	defer dev.Close()
	rdev, err := b.take(int(dev.Fd()))
	if err != nil {
		return 0, fmt.Errorf("/dev/userfaultfd: %w", err)
	}
	defer b.sys(unix.SYS_CLOSE, rdev)
	const userfaultfdIocNew = 0xaa00 // _IO(0xAA, 0x00)
	fd, err = b.sys(unix.SYS_IOCTL, rdev, userfaultfdIocNew, flags)
	if err != nil {
		return 0, fmt.Errorf("/dev/userfaultfd: USERFAULTFD_IOC_NEW: %w", err)
	}
	return fd, nil
}

package restorecore

import (
	"encoding/binary"
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
	rfd, err := b.sys(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK)
	if err != nil {
		return fmt.Errorf("userfaultfd in the restored process: %w", err)
	}
	defer b.sys(unix.SYS_CLOSE, rfd)
	api := make([]byte, 24)
	binary.LittleEndian.PutUint64(api[0:], uffd.API)
	binary.LittleEndian.PutUint64(api[8:], lazypages.Features)
	a, err := b.put(0, api)
	if err != nil {
		return err
	}
	const uffdioAPI = 0xC018AA3F
	if _, err := b.sys(unix.SYS_IOCTL, rfd, uffdioAPI, a); err != nil {
		return fmt.Errorf("UFFDIO_API in the restored process: %w", err)
	}
	pidfd, err := unix.PidfdOpen(b.pid, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	fd, err := unix.PidfdGetfd(pidfd, int(rfd), 0)
	if err != nil {
		return os.NewSyscallError("pidfd_getfd", err)
	}
	u := uffd.AdoptNoHandshake(fd, lazypages.Features)
	defer u.Close()
	for _, v := range lazy {
		if _, err := u.Register(v.Start, v.End-v.Start, uffd.RegisterMissing); err != nil {
			return fmt.Errorf("VMA %#x-%#x: %w", v.Start, v.End, err)
		}
	}
	return lazypages.Handover(b.r.opts.LazySocket, int(b.p.pstree.Pid), b.pid, u.Fd())
}

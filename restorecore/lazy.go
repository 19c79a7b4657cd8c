package restorecore

import (
	"encoding/binary"
	"fmt"
	"os"

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

// eagerParts returns the parts of run r restore fills itself.
func (b *builder) eagerParts(r images.PageRun) []images.PageRun {
	if !b.r.opts.LazyPages {
		return []images.PageRun{r}
	}
	var out []images.PageRun
	end := r.Vaddr + uint64(len(r.Data))
	for _, v := range b.p.mm.Vmas {
		a, e := max(v.Start, r.Vaddr), min(v.End, end)
		if a >= e || b.lazy(v) {
			continue
		}
		out = append(out, images.PageRun{Vaddr: a, Data: r.Data[a-r.Vaddr : e-r.Vaddr]})
	}
	return out
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

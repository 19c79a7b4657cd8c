package compel

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// maxIov is the kernel's UIO_MAXIOV.
const maxIov = 1024

// Segment is a piece of target memory paired with a local buffer.
type Segment struct {
	Addr  uint64
	Local []byte
}

// ReadMem fills each segment's Local buffer from pid's memory at Addr.
func ReadMem(pid int, segs []Segment) error { return moveMem(pid, segs, false) }

// WriteMem copies each segment's Local buffer into pid's memory at Addr.
func WriteMem(pid int, segs []Segment) error { return moveMem(pid, segs, true) }

func moveMem(pid int, segs []Segment, write bool) error {
	local := make([]unix.Iovec, 0, maxIov)
	remote := make([]unix.RemoteIovec, 0, maxIov)
	for len(segs) > 0 {
		local, remote = local[:0], remote[:0]
		want := 0
		n := 0
		for ; n < len(segs) && n < maxIov; n++ {
			s := segs[n]
			if len(s.Local) == 0 {
				continue
			}
			iov := unix.Iovec{Base: &s.Local[0]}
			iov.SetLen(len(s.Local))
			local = append(local, iov)
			remote = append(remote, unix.RemoteIovec{Base: uintptr(s.Addr), Len: len(s.Local)})
			want += len(s.Local)
		}
		var got int
		var err error
		for {
			if write {
				got, err = unix.ProcessVMWritev(pid, local, remote, 0)
			} else {
				got, err = unix.ProcessVMReadv(pid, local, remote, 0)
			}
			if err != unix.EINTR {
				break
			}
		}
		op := "process_vm_readv"
		if write {
			op = "process_vm_writev"
		}
		if err != nil {
			return fmt.Errorf("%s pid %d at %#x: %w", op, pid, segs[0].Addr, err)
		}
		if got != want {
			// A partial transfer stops at the first unreachable page: retry
			// the rest one segment at a time to name the address.
			done := 0
			for _, s := range segs[:n] {
				if done+len(s.Local) <= got {
					done += len(s.Local)
					continue
				}
				off := got - done
				if off < 0 {
					off = 0
				}
				return fmt.Errorf("%s pid %d: short transfer at %#x: %w", op, pid, s.Addr+uint64(off), unix.EFAULT)
			}
		}
		segs = segs[n:]
	}
	return nil
}

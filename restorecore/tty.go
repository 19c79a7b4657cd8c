package restorecore

import (
	"encoding/binary"
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
)

const (
	tcsets2     = 0x402c542b
	tiocsptlck  = 0x40045431
	tiocpkt     = 0x5420
	tiocgptpeer = 0x5441
)

// ctty is the terminal to make the process's controlling terminal once it
// leads its session again.
type ctty struct {
	fd     int // its number in the restored process
	parked int // where it sits while the files are being made
	fgPgrp int32
}

// openPtmx opens /dev/ptmx inside the process until the kernel hands out
// the dumped index (it gives the lowest free one), so that the slave is
// /dev/pts/N again; the masters opened on the way are closed.
func (b *builder) openPtmx(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	want := f.Tty.Index
	var extra []uint64
	defer func() {
		for _, fd := range extra {
			b.sys(unix.SYS_CLOSE, fd)
		}
	}()
	for {
		raw, err := b.openIn("/dev/ptmx", f)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_IOCTL, raw, unix.TIOCGPTN, b.scratch()); err != nil {
			b.sys(unix.SYS_CLOSE, raw)
			return 0, fmt.Errorf("TIOCGPTN: %w", err)
		}
		v := make([]byte, 4)
		if err := readMem(b.pid, b.scratch(), v); err != nil {
			return 0, err
		}
		got := int32(binary.LittleEndian.Uint32(v))
		if got == want {
			fd, err := park(raw)
			if err != nil {
				return 0, err
			}
			if err := b.ioctlInt(fd, tiocsptlck, 0); err != nil {
				return 0, fmt.Errorf("unlock pty %d: %w", want, err)
			}
			if f.Tty.Packet {
				if err := b.ioctlInt(fd, tiocpkt, 1); err != nil {
					return 0, fmt.Errorf("packet mode: %w", err)
				}
			}
			return fd, nil
		}
		extra = append(extra, raw)
		if got > want || len(extra) > 1024 {
			return 0, fmt.Errorf("/dev/pts/%d is taken on this host (the kernel handed out %d)", want, got)
		}
	}
}

// openPts opens the slave /dev/pts/N and puts its settings back.
func (b *builder) openPts(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	raw, err := b.openIn(fmt.Sprintf("/dev/pts/%d", f.Tty.Index), f)
	if err != nil {
		return 0, err
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	for _, s := range []struct {
		req  uint64
		data []byte
	}{{tcsets2, f.Tty.Termios}, {unix.TIOCSWINSZ, f.Tty.Winsize}} {
		if len(s.data) == 0 {
			continue
		}
		a, err := b.put(scratchOptVal, s.data)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_IOCTL, uint64(fd), s.req, a); err != nil {
			return 0, fmt.Errorf("terminal settings of %s: %w", f.Path, err)
		}
	}
	return fd, nil
}

// ioctlInt runs an ioctl whose argument points to an int.
func (b *builder) ioctlInt(fd int, req uint64, v int32) error {
	a, err := b.put(scratchOptVal, binary.LittleEndian.AppendUint32(nil, uint32(v)))
	if err != nil {
		return err
	}
	_, err = b.sys(unix.SYS_IOCTL, uint64(fd), req, a)
	return err
}

// takeCttyNow takes the controlling terminal while the files are still
// being made (for /dev/tty), through the slave's parked fd.
func (b *builder) takeCttyNow() error {
	if b.ctty == nil {
		return b.takeCtty()
	}
	c := *b.ctty
	defer func() { b.ctty = &c }()
	b.ctty = &ctty{fd: c.parked, fgPgrp: c.fgPgrp}
	return b.takeCtty()
}

// takeCtty makes the remembered terminal the controlling terminal of the
// process (which leads its session by now) with its foreground group.
func (b *builder) takeCtty() error {
	c := b.ctty
	if c == nil && b.p.core.CttyPts != 0 {
		// No fd of the process refers to it: opened for the ioctl.
		a, err := b.putString(0, fmt.Sprintf("/dev/pts/%d", b.p.core.CttyPts-1))
		if err != nil {
			return err
		}
		fd, err := b.sys(unix.SYS_OPENAT, atFdcwd, a, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("controlling terminal /dev/pts/%d: %w", b.p.core.CttyPts-1, err)
		}
		defer b.sys(unix.SYS_CLOSE, fd)
		c = &ctty{fd: int(fd), fgPgrp: b.p.core.CttyFg}
	}
	if c == nil {
		return nil
	}
	if _, err := b.sys(unix.SYS_IOCTL, uint64(c.fd), unix.TIOCSCTTY, 0); err != nil {
		return fmt.Errorf("controlling terminal (fd %d): %w", c.fd, err)
	}
	if c.fgPgrp > 0 {
		if err := b.ioctlInt(c.fd, unix.TIOCSPGRP, c.fgPgrp); err != nil {
			return fmt.Errorf("foreground group %d: %w", c.fgPgrp, err)
		}
	}
	return nil
}

// makeOrphanPtys makes, for each pty slave of the images whose master was
// outside the dump (Tty.Orphan), a new pty in the tree's own devpts: the
// root opens its ptmx (the devpts's own, once mounted) until the kernel
// hands out the slave's index
// (the lowest free one), unlocks it, and ferry keeps the master
// (r.orphans) for Options.OrphanPtsMaster. The processes then open the
// slave by its path, as any other.
func (r *restorer) makeOrphanPtys(root *compel.Task, ptmx string) error {
	if r.orphansMade {
		return nil
	}
	r.orphansMade = true
	var want []int32
	for _, f := range r.is.files {
		if f.Type == "pts" && f.GetTty().GetOrphan() && !slices.Contains(want, f.Tty.Index) {
			want = append(want, f.Tty.Index)
		}
	}
	if len(want) == 0 {
		return nil
	}
	if r.opts.OrphanPtsMaster == nil {
		return fmt.Errorf("%w: /dev/pts/%d's master was outside the dump (--orphan-pts-master): restore it for a client to hand the new master to (criu's RPC, orphan_pts_master)", ErrValidation, want[0])
	}
	slices.Sort(want)
	pidfd, err := unix.PidfdOpen(root.Tid, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	addr := stackScratch(root)
	ptn := addr + uint64(len(ptmx)+8)&^7 // TIOCGPTN's answer, past the path
	if err := compel.WriteMem(root.Tid, []compel.Segment{{Addr: addr, Local: append([]byte(ptmx), 0)}}); err != nil {
		return err
	}
	var opened []uint64 // in the root, closed at the end
	defer func() {
		for _, fd := range opened {
			root.Syscall(unix.SYS_CLOSE, fd)
		}
	}()
	for _, index := range want {
		for {
			fd, err := root.Syscall(unix.SYS_OPENAT, atFdcwd, addr, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("the tree's %s: %w", ptmx, err)
			}
			opened = append(opened, fd)
			if _, err := root.Syscall(unix.SYS_IOCTL, fd, unix.TIOCGPTN, ptn); err != nil {
				return fmt.Errorf("TIOCGPTN: %w", err)
			}
			v := make([]byte, 4)
			if err := compel.ReadMem(root.Tid, []compel.Segment{{Addr: ptn, Local: v}}); err != nil {
				return err
			}
			got := int32(binary.LittleEndian.Uint32(v))
			if got > index || len(opened) > 1024 {
				return fmt.Errorf("/dev/pts/%d is taken in the tree's devpts (the kernel handed out %d)", index, got)
			}
			if got < index {
				continue // kept open until the end: its index stays taken
			}
			local, err := unix.PidfdGetfd(pidfd, int(fd), 0)
			if err != nil {
				return os.NewSyscallError("pidfd_getfd", err)
			}
			m := os.NewFile(uintptr(local), fmt.Sprintf("/dev/pts/%d's master", index))
			r.orphans = append(r.orphans, m)
			r.cleanup = append(r.cleanup, func() { m.Close() })
			if err := unix.IoctlSetPointerInt(local, tiocsptlck, 0); err != nil {
				return fmt.Errorf("unlock /dev/pts/%d: %w", index, err)
			}
			break
		}
	}
	r.log.Info("terminals made for masters outside the dump", "slaves", want)
	return nil
}

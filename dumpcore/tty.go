package dumpcore

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/internal/ptyq"
)

// Unix98 ptys: the master multiplexer /dev/ptmx (5, 2) and slaves
// /dev/pts/N on majors 136-143.
const (
	ptmxMajor, ptmxMinor = 5, 2
	ptsMajorFirst        = 136
	ptsMajorLast         = 143
	tcgets2              = 0x802c542a
	tiocgpkt             = 0x80045438
)

func isPtmx(rdev uint64) bool { return unix.Major(rdev) == ptmxMajor && unix.Minor(rdev) == ptmxMinor }

func isPts(rdev uint64) bool {
	m := unix.Major(rdev)
	return m >= ptsMajorFirst && m <= ptsMajorLast
}

func ptsIndex(rdev uint64) int32 {
	return int32((unix.Major(rdev)-ptsMajorFirst)*256 + unix.Minor(rdev))
}

// describeTty records a pty master or slave (dup is ferry's duplicate of
// the target's fd): its index, and the slave's termios and window size.
func (ft *fileTable) describeTty(e *pb.FileEntry, rdev uint64, dup int, info proc.FdInfo) error {
	t := &pb.Tty{}
	slave := dup
	if isPtmx(rdev) {
		n, err := strconv.Atoi(info.Extra["tty-index"])
		if err != nil {
			return fmt.Errorf("pty master without tty-index in fdinfo: %w", ErrUnsupported)
		}
		t.Index = int32(n)
		pkt, err := unix.IoctlGetInt(dup, tiocgpkt)
		if err != nil {
			return os.NewSyscallError("ioctl TIOCGPKT", err)
		}
		t.Packet = pkt != 0
		// The settings live on the slave side: open it from the master.
		s, err := ptyq.Peer(dup)
		if err != nil {
			return err
		}
		slave = s
		defer unix.Close(slave)
		e.Type = "ptmx"
		if m, err := unix.Dup(dup); err == nil {
			ft.ptyMasters = append(ft.ptyMasters, ptyMaster{e: e, fd: m})
		}
	} else {
		t.Index = ptsIndex(rdev)
		t.Ctty = ft.cttyNr != 0 && rdev == ft.cttyNr
		if t.Ctty {
			// TIOCGPGRP answers only a member of the terminal's session.
			t.FgPgrp = int32(ft.cttyFg)
		}
		e.Type = "pts"
	}
	t.Termios = make([]byte, 44) // struct termios2
	if err := ioctlBuf(slave, tcgets2, t.Termios); errors.Is(err, unix.EIO) && e.Type == "pts" {
		// Its master is closed: it is hung up, and has no settings.
		t.HungUp, t.Termios = true, nil
		e.Tty = t
		return nil
	} else if err != nil {
		return os.NewSyscallError("ioctl TCGETS2", err)
	}
	ws, err := unix.IoctlGetWinsize(slave, unix.TIOCGWINSZ)
	if err != nil {
		return os.NewSyscallError("ioctl TIOCGWINSZ", err)
	}
	t.Winsize = []byte{byte(ws.Row), byte(ws.Row >> 8), byte(ws.Col), byte(ws.Col >> 8),
		byte(ws.Xpixel), byte(ws.Xpixel >> 8), byte(ws.Ypixel), byte(ws.Ypixel >> 8)}
	e.Tty = t
	return nil
}

// checkTtys pairs every pty slave with its master in the dump. A slave
// whose master is elsewhere is the terminal of a shell job: with
// --shell-job the restored process gets ferry's own instead; otherwise the
// dump is refused.
//
// With orphan (--orphan-pts-master) such a slave is kept as it is and
// marked: the restore makes a new pty for it and hands over its master.
func (ft *fileTable) checkTtys(table *pb.FdTable, shellJob, orphan bool) error {
	masters := map[int32]bool{}
	for _, f := range ft.entries {
		if f.Type == "ptmx" {
			masters[f.Tty.Index] = true
		}
	}
	for _, fd := range table.Fds {
		f := ft.entries[fd.FileId-1]
		if f.Type != "pts" || masters[f.Tty.Index] || f.Tty.HungUp {
			continue
		}
		if orphan {
			f.Tty.Orphan = true
			continue
		}
		if !shellJob {
			return fmt.Errorf("fd %d of %d: terminal %s: %w (its master is outside the process; use --shell-job to dump a job attached to a terminal)",
				fd.Fd, table.Pid, f.Path, ErrUnsupported)
		}
		f.Type, f.ShellJobTty, f.Tty = "chr", true, nil
	}
	return nil
}

// ptyMaster is ferry's duplicate of a pty master of the dump, kept for
// reading its queues (takePtyQueues).
type ptyMaster struct {
	e  *pb.FileEntry
	fd int
}

// takePtyQueues reads what waits in each pty of the dump, both ways, into
// its master's entry. Reading takes it out of the ptys: a dump that then
// lets the tree go on puts it back first (putPtyQueuesBack).
func (ft *fileTable) takePtyQueues() error {
	for _, m := range ft.ptyMasters {
		s, err := ptyq.Peer(m.fd)
		if err != nil {
			return err
		}
		out, err := ptyq.ReadQueued(m.fd)
		if err == nil {
			m.e.Tty.InData, err = ptyq.ReadInput(s)
		}
		unix.Close(s)
		m.e.Tty.OutData = out
		if err != nil {
			return fmt.Errorf("pty %d: %w", m.e.Tty.Index, err)
		}
	}
	return nil
}

// putPtyQueuesBack undoes takePtyQueues.
func (ft *fileTable) putPtyQueuesBack() {
	for _, m := range ft.ptyMasters {
		if err := ptyq.Refill(m.fd, m.e.Tty); err != nil {
			continue // best effort: the tree goes on either way
		}
		m.e.Tty.InData, m.e.Tty.OutData = nil, nil
	}
}

// closePtyMasters closes ferry's duplicates of the masters.
func (ft *fileTable) closePtyMasters() {
	for _, m := range ft.ptyMasters {
		unix.Close(m.fd)
	}
	ft.ptyMasters = nil
}

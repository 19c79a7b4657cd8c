// Package ptyq reads and refills what waits in a pseudo-terminal's
// queues: the input its slave side has to read and the output its master
// side has to read. The dump takes them out; the restore (or a dump that
// lets the process go on) puts them back.
package ptyq

import (
	"encoding/binary"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
)

const (
	tiocGPTPeer = 0x5441
	tcgets2     = 0x802c542a
)

// Peer opens the slave of master fd (TIOCGPTPEER): a description of
// ferry's own.
func Peer(master int) (int, error) {
	s, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(master), tiocGPTPeer, uintptr(unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC))
	if errno != 0 {
		return 0, os.NewSyscallError("ioctl TIOCGPTPEER", errno)
	}
	return int(s), nil
}

// ReadQueued reads what fd's tty has to read now (TIOCINQ), in as many
// reads as it takes (canonical mode hands out a line per read).
func ReadQueued(fd int) ([]byte, error) {
	n, err := unix.IoctlGetInt(fd, unix.TIOCINQ)
	if err != nil || n <= 0 {
		return nil, err
	}
	buf := make([]byte, n)
	for got := 0; got < n; {
		k, err := unix.Read(fd, buf[got:])
		if err != nil {
			return nil, os.NewSyscallError("read", err)
		}
		if k == 0 {
			return buf[:got], nil
		}
		got += k
	}
	return buf, nil
}

// ReadInput reads what the slave fd s has to read: in canonical mode the
// whole lines, then, with ICANON off for a moment (the line discipline
// then hands out all it holds), the partial line after them.
func ReadInput(s int) ([]byte, error) {
	data, err := ReadQueued(s)
	if err != nil {
		return nil, err
	}
	orig := make([]byte, 44)
	if err := ioctlBuf(s, tcgets2, orig); err != nil {
		return nil, os.NewSyscallError("ioctl TCGETS2", err)
	}
	le := binary.LittleEndian
	if le.Uint32(orig[offLflag:])&unix.ICANON == 0 {
		return data, nil
	}
	raw := append([]byte(nil), orig...)
	le.PutUint32(raw[offLflag:], le.Uint32(raw[offLflag:])&^uint32(unix.ICANON))
	raw[offCc+unix.VMIN], raw[offCc+unix.VTIME] = 0, 0
	if err := ioctlBuf(s, tcsets2, raw); err != nil {
		return nil, os.NewSyscallError("ioctl TCSETS2", err)
	}
	rest, err := ReadQueued(s)
	if serr := ioctlBuf(s, tcsets2, orig); serr != nil && err == nil {
		err = os.NewSyscallError("ioctl TCSETS2", serr)
	}
	return append(data, rest...), err
}

// termios2 offsets and flags (asm-generic/termbits.h).
const (
	tcsets2                      = 0x402c542b
	offIflag, offOflag, offLflag = 0, 4, 12
	offCc                        = 17
	iflagXlate                   = unix.IXON | unix.ICRNL | unix.INLCR | unix.IGNCR | unix.ISTRIP
	lflagEcho                    = unix.ECHO | unix.ECHOE | unix.ECHOK | unix.ECHONL | unix.ISIG | unix.IEXTEN
)

// Refill queues t's data again in the pty of master fd: the input
// written to the master and the output to its slave, with translation,
// echo and signals off meanwhile (the line discipline had done all that
// already), then the settings of t (or the pty's own) back.
func Refill(master int, t *pb.Tty) error {
	if len(t.InData) == 0 && len(t.OutData) == 0 {
		return nil
	}
	s, err := Peer(master)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	orig := make([]byte, 44)
	if err := ioctlBuf(s, tcgets2, orig); err != nil {
		return os.NewSyscallError("ioctl TCGETS2", err)
	}
	if len(t.Termios) == 44 {
		orig = t.Termios
	}
	raw := append([]byte(nil), orig...)
	le := binary.LittleEndian
	le.PutUint32(raw[offIflag:], le.Uint32(raw[offIflag:])&^uint32(iflagXlate))
	le.PutUint32(raw[offOflag:], le.Uint32(raw[offOflag:])&^uint32(unix.OPOST))
	le.PutUint32(raw[offLflag:], le.Uint32(raw[offLflag:])&^uint32(lflagEcho))
	if err := ioctlBuf(s, tcsets2, raw); err != nil {
		return os.NewSyscallError("ioctl TCSETS2", err)
	}
	defer ioctlBuf(s, tcsets2, orig)
	// In canonical mode the slave can read (TIOCINQ) the whole lines
	// only: a partial line after them goes in on its own.
	lines, tail := t.InData, []byte(nil)
	if le.Uint32(raw[offLflag:])&unix.ICANON != 0 {
		eol, eol2 := raw[offCc+unix.VEOL], raw[offCc+unix.VEOL2]
		end := len(lines)
		for end > 0 {
			if c := lines[end-1]; c == '\n' || (c != 0 && (c == eol || c == eol2)) {
				break
			}
			end--
		}
		lines, tail = lines[:end], lines[end:]
	}
	if err := writeAll(master, lines); err != nil {
		return err
	}
	// The line discipline takes input in from a work queue: the settings
	// go back only once it has (else it would echo it after all).
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if n, err := unix.IoctlGetInt(s, unix.TIOCINQ); err != nil || n >= len(lines) {
			break
		}
	}
	// The partial line: TIOCSTI hands it to the line discipline at once
	// (there is nothing to wait for that would tell it had arrived).
	for i := range tail {
		if err := ioctlBuf(s, unix.TIOCSTI, tail[i:i+1]); err != nil {
			return os.NewSyscallError("ioctl TIOCSTI", err)
		}
	}
	return writeAll(s, t.OutData)
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err != nil {
			return os.NewSyscallError("write", err)
		}
		b = b[n:]
	}
	return nil
}

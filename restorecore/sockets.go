package restorecore

import (
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
)

// Scratch offsets for socket calls: an option value, then a sockaddr.
const (
	scratchOptVal = 0
	scratchAddr   = 256
)

// newInetSocket makes an inet socket again inside the process: socket,
// its options, bind, connect (UDP) or listen, in that order. SO_REUSEADDR
// is on while binding, so that connections of the dumped process still in
// TIME_WAIT do not keep the port, and set to its dumped value afterwards.
func (b *builder) newInetSocket(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	s := f.Inet
	if s == nil {
		return 0, fmt.Errorf("socket without its description")
	}
	typ := uint64(s.Type) | unix.SOCK_CLOEXEC
	if f.Flags&unix.O_NONBLOCK != 0 {
		typ |= unix.SOCK_NONBLOCK
	}
	raw, err := b.sys(unix.SYS_SOCKET, uint64(s.Family), typ, uint64(s.Protocol))
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	reuse := []byte{0, 0, 0, 0}
	for _, o := range s.Opts {
		if o.Level == unix.SOL_SOCKET && o.Name == unix.SO_REUSEADDR {
			reuse = o.Value
			continue
		}
		if err := b.setsockopt(fd, int(o.Level), int(o.Name), o.Value); err != nil {
			return 0, err
		}
	}
	if err := b.setsockopt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, []byte{1, 0, 0, 0}); err != nil {
		return 0, err
	}
	if bound(s.Addr) {
		a, err := b.put(scratchAddr, s.Addr)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_BIND, uint64(fd), a, uint64(len(s.Addr))); err != nil {
			return 0, fmt.Errorf("bind %s: %w", f.Path, err)
		}
	}
	if len(s.Peer) > 0 {
		a, err := b.put(scratchAddr, s.Peer)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_CONNECT, uint64(fd), a, uint64(len(s.Peer))); err != nil {
			return 0, fmt.Errorf("connect %s: %w", f.Path, err)
		}
	}
	if s.Listening {
		if _, err := b.sys(unix.SYS_LISTEN, uint64(fd), uint64(s.Backlog)); err != nil {
			return 0, fmt.Errorf("listen %s: %w", f.Path, err)
		}
	}
	if err := b.setsockopt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, reuse); err != nil {
		return 0, err
	}
	return fd, nil
}

func (b *builder) setsockopt(fd, level, name int, v []byte) error {
	a, err := b.put(scratchOptVal, v)
	if err != nil {
		return err
	}
	if _, err := b.sys(unix.SYS_SETSOCKOPT, uint64(fd), uint64(level), uint64(name), a, uint64(len(v))); err != nil {
		return fmt.Errorf("setsockopt(%d, %d): %w", level, name, err)
	}
	return nil
}

// bound reports whether a raw inet sockaddr has a port (unbound sockets
// report port 0).
func bound(addr []byte) bool {
	return len(addr) >= 4 && (addr[2] != 0 || addr[3] != 0)
}

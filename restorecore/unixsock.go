package restorecore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
)

// newUnixSocket makes a unix socket that is not one end of a pair in the
// dump: bound to its name again (a socket file the dumped process left at
// the path is removed first), listening, or connected to an external peer
// by name (--ext-unix-sk).
func (b *builder) newUnixSocket(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	s := f.Unix
	raw, err := b.sys(unix.SYS_SOCKET, unix.AF_UNIX, uint64(s.Type)|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	if len(s.Name) > 0 {
		if s.Name[0] != 0 {
			// A relative name is the process's: relative to its working
			// directory (entered already; see restoreCwd).
			path := string(s.Name)
			if !filepath.IsAbs(path) {
				if cwd, ok := b.r.is.files[b.p.core.CwdId]; ok {
					path = filepath.Join(cwd.Path, path)
				}
			}
			var st unix.Stat_t
			if err := unix.Lstat(path, &st); err == nil && b.r.opts.Caller != nil {
				// Not ferry's, as root, to remove on a caller's say-so.
				return 0, fmt.Errorf("%s exists: the socket cannot be bound there again", path)
			} else if err == nil {
				if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
					return 0, fmt.Errorf("%s exists and is not a socket", path)
				}
				if err := os.Remove(path); err != nil {
					return 0, err
				}
			}
		}
		addr := binary.LittleEndian.AppendUint16(nil, unix.AF_UNIX)
		addr = append(addr, s.Name...)
		a, err := b.put(scratchAddr, addr)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_BIND, uint64(fd), a, uint64(len(addr))); err != nil {
			if errors.Is(err, unix.EADDRINUSE) {
				return 0, fmt.Errorf("bind %s: %w%s", f.Path, err, unixHolder(s.Name))
			}
			return 0, fmt.Errorf("bind %s: %w", f.Path, err)
		}
	}
	if s.Listening {
		if _, err := b.sys(unix.SYS_LISTEN, uint64(fd), uint64(s.Backlog)); err != nil {
			return 0, fmt.Errorf("listen %s: %w", f.Path, err)
		}
	}
	if len(s.ExternalPeer) > 0 {
		addr := binary.LittleEndian.AppendUint16(nil, unix.AF_UNIX)
		addr = append(addr, s.ExternalPeer...)
		a, err := b.put(scratchAddr, addr)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(unix.SYS_CONNECT, uint64(fd), a, uint64(len(addr))); err != nil {
			return 0, fmt.Errorf("connect %s: %w", f.Path, err)
		}
	}
	return fd, b.setFlags(fd, f)
}

// newUnixPair makes a connected pair for f and its peer p, and refills
// what each had received by sending it from the other end.
func (b *builder) newUnixPair(f, p *pb.FileEntry, park func(uint64) (int, error), inFlight rightsFunc) (int, int, error) {
	if _, err := b.sys(unix.SYS_SOCKETPAIR, unix.AF_UNIX, uint64(f.Unix.Type)|unix.SOCK_CLOEXEC, 0, b.scratch()); err != nil {
		return 0, 0, fmt.Errorf("socketpair: %w", err)
	}
	raw := make([]byte, 8)
	if err := readMem(b.pid, b.scratch(), raw); err != nil {
		return 0, 0, err
	}
	fa, err := park(uint64(binary.LittleEndian.Uint32(raw)))
	if err != nil {
		return 0, 0, err
	}
	fb, err := park(uint64(binary.LittleEndian.Uint32(raw[4:])))
	if err != nil {
		return 0, 0, err
	}
	for _, side := range []struct {
		recv *pb.FileEntry
		from int
	}{{f, fb}, {p, fa}} {
		if err := b.refill(side.from, side.recv.Unix, inFlight); err != nil {
			return 0, 0, fmt.Errorf("%s: refilling its queue: %w", side.recv.Path, err)
		}
	}
	for _, e := range []struct {
		f  *pb.FileEntry
		fd int
	}{{f, fa}, {p, fb}} {
		if err := b.unixShutdown(e.fd, e.f.Unix.Shutdown); err != nil {
			return 0, 0, err
		}
		if err := b.unixBuffers(e.fd, e.f.Unix); err != nil {
			return 0, 0, err
		}
		if err := b.setFlags(e.fd, e.f); err != nil {
			return 0, 0, err
		}
	}
	return fa, fb, nil
}

// newUnixOrphan makes a connected socket whose peer has closed: one end of
// a new pair, its queue refilled from the other end, which is then closed.
func (b *builder) newUnixOrphan(f *pb.FileEntry, park func(uint64) (int, error), inFlight rightsFunc) (int, error) {
	if _, err := b.sys(unix.SYS_SOCKETPAIR, unix.AF_UNIX, uint64(f.Unix.Type)|unix.SOCK_CLOEXEC, 0, b.scratch()); err != nil {
		return 0, fmt.Errorf("socketpair: %w", err)
	}
	raw := make([]byte, 8)
	if err := readMem(b.pid, b.scratch(), raw); err != nil {
		return 0, err
	}
	other := uint64(binary.LittleEndian.Uint32(raw[4:]))
	fd, err := park(uint64(binary.LittleEndian.Uint32(raw)))
	if err != nil {
		return 0, err
	}
	if err := b.refill(int(other), f.Unix, inFlight); err != nil {
		return 0, err
	}
	if _, err := b.sys(unix.SYS_CLOSE, other); err != nil {
		return 0, err
	}
	if err := b.unixBuffers(fd, f.Unix); err != nil {
		return 0, err
	}
	return fd, b.setFlags(fd, f)
}

// connectUnix connects the process's socket fd to the unix name.
func (b *builder) connectUnix(fd int, name []byte) error {
	addr := binary.LittleEndian.AppendUint16(nil, unix.AF_UNIX)
	addr = append(addr, name...)
	a, err := b.put(scratchAddr, addr)
	if err != nil {
		return err
	}
	_, err = b.sys(unix.SYS_CONNECT, uint64(fd), a, uint64(len(addr)))
	return err
}

// connectPending makes again the connections that waited on listener f
// (at fd), in order: each client connects to the listener's name (a
// client that had closed: a stand-in that connects and closes). The
// clients' sockets go to objFds (and to ferry, for other processes).
func (b *builder) connectPending(fd int, f *pb.FileEntry, park func(uint64) (int, error)) error {
	for i, peer := range f.Unix.Pending {
		raw, err := b.sys(unix.SYS_SOCKET, unix.AF_UNIX, uint64(f.Unix.Type)|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		if err := b.connectUnix(int(raw), f.Unix.Name); err != nil {
			b.sys(unix.SYS_CLOSE, raw)
			return fmt.Errorf("pending connection %d: connect: %w", i, err)
		}
		c := b.r.unixByIno(peer)
		if peer == 0 || c == nil {
			b.sys(unix.SYS_CLOSE, raw) // its client had closed
			continue
		}
		cfd, err := park(raw)
		if err != nil {
			return err
		}
		if err := b.setFlags(cfd, c); err != nil {
			return err
		}
		b.madeHere(c.Id, cfd)
	}
	return nil
}

// madeHere records that file id was made in this process, at (parked)
// fd; if another process of the tree has it instead, ferry keeps a copy
// for that one (see restoreFiles).
func (b *builder) madeHere(id uint32, fd int) {
	b.objFds[id] = fd
	b.r.multi[id] = b.r.multi[id] || !b.uses(id)
}

// made tells whether file id exists already: made in this process, or
// held by ferry for it.
func (b *builder) made(id uint32) bool {
	_, here := b.objFds[id]
	_, held := b.r.held[id]
	return here || held
}

// uses tells whether the process has an fd of file id.
func (b *builder) uses(id uint32) bool {
	for _, e := range b.p.fds.Fds {
		if e.FileId == id {
			return true
		}
	}
	return false
}

// refillByName refills the queue of the bound datagram socket fd from a
// socket of the process's own that sends to its name.
func (b *builder) refillByName(fd int, u *pb.UnixSocket, inFlight rightsFunc) error {
	if len(u.Queue) == 0 {
		return nil
	}
	tmp, err := b.sys(unix.SYS_SOCKET, unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer b.sys(unix.SYS_CLOSE, tmp)
	if err := b.connectUnix(int(tmp), u.Name); err != nil {
		return fmt.Errorf("connect to refill: %w", err)
	}
	return b.refill(int(tmp), u, inFlight)
}

// rightsFunc makes the files in flight with a message (by files.img id)
// inside the process and returns their fds there.
type rightsFunc func(ids []uint32) ([]int, error)

// refill sends what u had received, in order, on the process's socket fd
// (from ferry, through a duplicate): each message with the descriptors it
// carried, made first inside the process. The buffer is made room for.
func (b *builder) refill(fd int, u *pb.UnixSocket, inFlight rightsFunc) error {
	msgs := u.Queue
	if len(msgs) == 0 {
		return nil
	}
	rights := map[int][]uint32{}
	for _, in := range u.InFlight {
		rights[int(in.Msg)] = in.FileIds
	}
	dup, err := b.localFd(fd)
	if err != nil {
		return err
	}
	defer unix.Close(dup)
	total := 0
	for _, m := range msgs {
		total += len(m)
	}
	if err := unix.SetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 2*total+(64<<10)); err != nil {
		return os.NewSyscallError("setsockopt SO_SNDBUFFORCE", err)
	}
	for i, m := range msgs {
		var oob []byte
		if ids := rights[i]; len(ids) > 0 {
			fds, err := inFlight(ids)
			if err != nil {
				return fmt.Errorf("files in flight: %w", err)
			}
			local := make([]int, 0, len(fds))
			for _, f := range fds {
				l, err := b.localFd(f)
				if err != nil {
					return err
				}
				local = append(local, l)
				defer unix.Close(l)
			}
			oob = unix.UnixRights(local...)
		}
		for off := 0; off < len(m) || len(m) == 0; {
			n, err := unix.SendmsgN(dup, m[off:], oob, nil, unix.MSG_DONTWAIT)
			if err != nil {
				return os.NewSyscallError("send", err)
			}
			oob = nil // the descriptors go with the first part
			off += n
			if len(m) == 0 {
				break
			}
		}
	}
	return nil
}

// unixShutdown shuts an end down again as sock_diag reported it (bit 0:
// no more receiving, bit 1: no more sending), once its queue is refilled.
func (b *builder) unixShutdown(fd int, how int32) error {
	var op uint64
	switch how & 3 {
	case 0:
		return nil
	case 1:
		op = unix.SHUT_RD
	case 2:
		op = unix.SHUT_WR
	case 3:
		op = unix.SHUT_RDWR
	}
	if _, err := b.sys(unix.SYS_SHUTDOWN, uint64(fd), op); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// unixBuffers puts the dumped buffer sizes back (the kernel doubles what
// is set, and reported the doubled value).
func (b *builder) unixBuffers(fd int, s *pb.UnixSocket) error {
	dup, err := b.localFd(fd)
	if err != nil {
		return err
	}
	defer unix.Close(dup)
	snd, rcv := unix.SO_SNDBUFFORCE, unix.SO_RCVBUFFORCE
	if b.r.opts.Caller != nil {
		snd, rcv = unix.SO_SNDBUF, unix.SO_RCVBUF // within the system's maximums
	}
	for _, o := range []struct{ name, v int }{{snd, int(s.Sndbuf)}, {rcv, int(s.Rcvbuf)}} {
		if o.v > 0 {
			if err := unix.SetsockoptInt(dup, unix.SOL_SOCKET, o.name, o.v/2); err != nil {
				return os.NewSyscallError("setsockopt", err)
			}
		}
	}
	return nil
}

// localFd duplicates the process's fd into ferry.
func (b *builder) localFd(fd int) (int, error) {
	pidfd, err := unix.PidfdOpen(b.pid, 0)
	if err != nil {
		return -1, os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	dup, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return -1, os.NewSyscallError("pidfd_getfd", err)
	}
	return dup, nil
}

// setFlags applies the file status flags (O_NONBLOCK) of f to fd.
func (b *builder) setFlags(fd int, f *pb.FileEntry) error {
	if f.Flags&unix.O_NONBLOCK == 0 {
		return nil
	}
	if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETFL, unix.O_NONBLOCK); err != nil {
		return fmt.Errorf("fcntl O_NONBLOCK: %w", err)
	}
	return nil
}

var errNoPeer = errors.New("the other end of this unix socket is not in the images")

// unixHolder names the processes holding a socket bound to name, for an
// error message (empty if it cannot tell).
func unixHolder(name []byte) string {
	want := string(name)
	if len(name) > 0 && name[0] == 0 {
		want = "@" + string(name[1:])
	}
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		return ""
	}
	var inodes []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 8 && f[7] == want {
			inodes = append(inodes, "socket:["+f[6]+"]")
		}
	}
	var who []string
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		fds, err := os.ReadDir("/proc/" + p.Name() + "/fd")
		if err != nil {
			continue
		}
		for _, fd := range fds {
			l, _ := os.Readlink("/proc/" + p.Name() + "/fd/" + fd.Name())
			for _, in := range inodes {
				if l == in {
					who = append(who, p.Name())
				}
			}
		}
	}
	if len(who) == 0 {
		return fmt.Sprintf(" (%d sockets bound to it, no process holds one)", len(inodes))
	}
	return " (held by process " + strings.Join(who, ", ") + ")"
}

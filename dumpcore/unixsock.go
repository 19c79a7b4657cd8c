package dumpcore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/proc"
	"github.com/ferrycr/ferry/netlock"
)

// sock_diag for AF_UNIX (include/uapi/linux/sock_diag.h, unix_diag.h).
const (
	sockDiagByFamily = 20
	udiagShowName    = 1 << 0
	udiagShowPeer    = 1 << 2
	udiagShowIcons   = 1 << 3
	unixDiagIcons    = 3
	udiagShowRQLen   = 1 << 4
	udiagShowShut    = 1 << 6
	unixDiagName     = 0
	unixDiagPeer     = 2
	unixDiagRQLen    = 4
	unixDiagShutdown = 6
	unixListen       = 10 // TCP_LISTEN, as unix sockets report it
	unixEstablished  = 1
)

// unixDiag is what sock_diag tells about one unix socket.
type unixDiag struct {
	state          uint8
	name           []byte
	peer           uint32
	rqueue, wqueue uint32 // listener: pending connections, backlog
	shutdown       uint8
	icons          []uint32 // listener: the pending connections' inodes
}

// diagUnix asks sock_diag, in the network namespace of pid, about the unix
// socket with inode ino.
func diagUnix(pid int, ino uint64) (*unixDiag, error) {
	c, err := dialDiag(pid)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	// struct unix_diag_req: family, protocol, pad, states, ino, show, cookie.
	req := make([]byte, 24)
	req[0] = unix.AF_UNIX
	binary.LittleEndian.PutUint32(req[4:], ^uint32(0))
	binary.LittleEndian.PutUint32(req[8:], uint32(ino))
	binary.LittleEndian.PutUint32(req[12:], udiagShowName|udiagShowPeer|udiagShowRQLen|udiagShowShut|udiagShowIcons)
	binary.LittleEndian.PutUint32(req[16:], ^uint32(0)) // no cookie
	binary.LittleEndian.PutUint32(req[20:], ^uint32(0))
	msgs, err := c.Execute(netlink.Message{Header: netlink.Header{Type: sockDiagByFamily, Flags: netlink.Request}, Data: req})
	if err != nil {
		return nil, fmt.Errorf("sock_diag of unix socket %d: %w", ino, err)
	}
	if len(msgs) != 1 || len(msgs[0].Data) < 16 {
		return nil, fmt.Errorf("sock_diag of unix socket %d: %d answers", ino, len(msgs))
	}
	// struct unix_diag_msg: family, type, state, pad, ino, cookie; then
	// attributes.
	d := &unixDiag{state: msgs[0].Data[2]}
	ad, err := netlink.NewAttributeDecoder(msgs[0].Data[16:])
	if err != nil {
		return nil, err
	}
	for ad.Next() {
		switch ad.Type() {
		case unixDiagName:
			d.name = append([]byte(nil), ad.Bytes()...)
			if len(d.name) > 0 && d.name[0] != 0 {
				d.name = bytes.TrimRight(d.name, "\x00") // a path: the kernel keeps its NUL
			}
		case unixDiagPeer:
			d.peer = ad.Uint32()
		case unixDiagRQLen:
			if b := ad.Bytes(); len(b) >= 8 {
				d.rqueue, d.wqueue = binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:])
			}
		case unixDiagShutdown:
			d.shutdown = ad.Uint8()
		case unixDiagIcons:
			b := ad.Bytes()
			for i := 0; i+4 <= len(b); i += 4 {
				d.icons = append(d.icons, binary.LittleEndian.Uint32(b[i:]))
			}
		}
	}
	return d, ad.Err()
}

// dialDiag opens sock_diag in the network namespace of pid.
func dialDiag(pid int) (*netlink.Conn, error) {
	ns, err := netlock.OpenNS(pid)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, &netlink.Config{NetNS: int(ns.Fd())})
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	return c, nil
}

// describeUnix describes the unix socket with inode ino of process pid
// (dup is ferry's duplicate of it). A connected socket's peer must be in
// the dump too; that is checked once every fd is known (checkUnixPeers).
func (ft *fileTable) describeUnix(pid int, dup int, ino uint64) (*pb.UnixSocket, error) {
	typ, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil, os.NewSyscallError("getsockopt SO_TYPE", err)
	}
	d, err := diagUnix(pid, ino)
	if err != nil {
		return nil, err
	}
	s := &pb.UnixSocket{Type: int32(typ), Name: d.name, PeerIno: uint64(d.peer), Shutdown: int32(d.shutdown)}
	for _, b := range []struct {
		name int
		v    *int32
	}{{unix.SO_SNDBUF, &s.Sndbuf}, {unix.SO_RCVBUF, &s.Rcvbuf}} {
		v, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, b.name)
		if err != nil {
			return nil, os.NewSyscallError("getsockopt", err)
		}
		*b.v = int32(v)
	}
	name := unixName(d.name)
	switch {
	case d.state == unixListen:
		s.Listening, s.Backlog = true, int32(d.wqueue)
		// Connections waiting to be accepted are made again by their
		// clients connecting to the name (checkUnixPeers pairs them),
		// so long as nothing was sent on them yet.
		// (sock_diag names each by its client's inode; what a client
		// sent and nobody read is its write queue.)
		for _, icon := range d.icons {
			if icon != 0 {
				e, err := diagUnix(pid, uint64(icon))
				if err != nil {
					return nil, fmt.Errorf("unix listener %s: a pending connection: %w", name, err)
				}
				if e.wqueue > 0 {
					return nil, fmt.Errorf("unix listener %s: a connection waiting to be accepted holds %d bytes: %w", name, e.wqueue, ErrUnsupported)
				}
			}
			s.Pending = append(s.Pending, uint64(icon))
		}
		return s, nil
	case d.peer != 0 && len(d.name) > 0 && typ != unix.SOCK_DGRAM:
		// A connection's end with a name: an accepted one shows its
		// listener's (checkUnixPeers tells); it comes back unnamed.
	case d.peer == 0 && d.state == unixEstablished:
		// Its peer has closed (an accepted connection whose client left,
		// say): what it still has to read must stay readable.
		s.PeerClosed = true
	}
	var rights [][]int
	s.Queue, rights, err = peekQueue(dup, typ, d.shutdown&1 != 0)
	defer func() {
		for _, fds := range rights {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}()
	if err != nil {
		return nil, fmt.Errorf("unix socket %s: %w", name, err)
	}
	for i, fds := range rights {
		if len(fds) == 0 {
			continue
		}
		in := &pb.InFlight{Msg: int32(i)}
		for _, fd := range fds {
			ft.inFlightOwner = pid
			id, err := ft.inFlight(fd)
			ft.inFlightOwner = 0
			if err != nil {
				return nil, fmt.Errorf("unix socket %s: a descriptor in flight: %w", name, err)
			}
			in.FileIds = append(in.FileIds, id)
		}
		s.InFlight = append(s.InFlight, in)
	}
	return s, nil
}

// inFlight describes a file received (peeked) from a socket's queue into
// ferry as fd: regular files, pipes, FIFOs, eventfds.
func (ft *fileTable) inFlight(fd int) (uint32, error) {
	self := os.Getpid()
	info, err := proc.ReadFdInfo(self, fd)
	if err != nil {
		return 0, err
	}
	pidfd, err := unix.PidfdOpen(self, 0)
	if err != nil {
		return 0, os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFSOCK {
		return 0, fmt.Errorf("a socket: %w", ErrUnsupported)
	}
	e, err := ft.describeFd(self, pidfd, fd, info, false)
	if err != nil {
		return 0, err
	}
	switch e.Type {
	case "reg", "pipe", "fifo", "eventfd", "epoll":
	default:
		return 0, fmt.Errorf("a %s: %w", e.Type, ErrUnsupported)
	}
	return ft.add(e), nil
}

// peekQueue reads what socket fd has received without consuming it,
// message by message, walking with SO_PEEK_OFF, which is put back
// afterwards. A stream comes in the pieces a reader would get: a piece
// that carries descriptors also holds the bytes queued before it (the
// kernel joins them when peeking, and no peek shows where they part). The descriptors a message carries are received into
// ferry (rights[i] for queue[i]); the caller closes them.
//
// A message socket shut down for reading (its peer gone) answers an empty
// queue with the end of the stream, a read of 0 bytes, not EAGAIN: an
// empty read there ends the walk. The walk is bounded all the same.
func peekQueue(fd, typ int, rcvShut bool) (queue [][]byte, rights [][]int, err error) {
	n, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	if err != nil {
		return nil, nil, os.NewSyscallError("ioctl SIOCINQ", err)
	}
	if typ == unix.SOCK_STREAM && n == 0 {
		return nil, nil, nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, 0); err != nil {
		return nil, nil, os.NewSyscallError("setsockopt SO_PEEK_OFF", err)
	}
	defer unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PEEK_OFF, -1)
	max := 1 << 20
	if typ == unix.SOCK_STREAM {
		max = n
	}
	for {
		if len(queue) >= maxQueued {
			return queue, rights, fmt.Errorf("more than %d messages queued: %w", maxQueued, ErrUnsupported)
		}
		b, fds, err := peekOne(fd, max)
		if errors.Is(err, unix.EAGAIN) || (errors.Is(err, unix.ENOTCONN) && len(queue) == 0) {
			return queue, rights, nil // (a seqpacket socket never connected has no queue)
		}
		if err != nil {
			return queue, append(rights, fds), err
		}
		if len(b) == 0 && len(fds) == 0 && rcvShut && typ != unix.SOCK_STREAM {
			return queue, rights, nil
		}
		queue, rights = append(queue, b), append(rights, fds)
		if typ == unix.SOCK_STREAM {
			if n -= len(b); n <= 0 {
				return queue, rights, nil
			}
		}
	}
}

// maxQueued bounds the messages a socket's queue is read for (a queue
// that cannot be walked must not hang the dump).
const maxQueued = 1 << 16

func peekOne(fd, max int) ([]byte, []int, error) {
	b := make([]byte, max)
	oob := make([]byte, unix.CmsgSpace(4*253))
	n, oobn, flags, _, err := unix.Recvmsg(fd, b, oob, unix.MSG_PEEK|unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, nil, err
	}
	var fds []int
	if oobn > 0 {
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if got, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, got...)
				}
			}
		}
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return nil, fds, fmt.Errorf("more descriptors in flight than ferry takes at once: %w", ErrUnsupported)
	}
	if flags&unix.MSG_TRUNC != 0 {
		return nil, fds, fmt.Errorf("a message larger than %d bytes: %w", max, ErrUnsupported)
	}
	return b[:n], fds, nil
}

// unixName prints a sun_path for messages.
func unixName(b []byte) string {
	switch {
	case len(b) == 0:
		return "(unnamed)"
	case b[0] == 0:
		return "@" + string(b[1:])
	}
	return string(b)
}

// udpShutdown asks sock_diag, in the network namespace of pid, how the
// UDP socket with inode ino, bound to local and connected to peer (raw
// sockaddrs; peer nil when unconnected), was shut down: the kernel's
// sk_shutdown (1 receiving, 2 sending).
func udpShutdown(pid int, ino uint64, family int, local, peer []byte) (uint8, error) {
	c, err := dialDiag(pid)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	// struct inet_diag_req_v2: family, protocol, ext, pad, states, then
	// struct inet_diag_sockid: sport, dport (big endian), src[4], dst[4],
	// if, cookie[2]. For a UDP lookup "src" is the remote end.
	req := make([]byte, 56)
	req[0], req[1] = byte(family), unix.IPPROTO_UDP
	binary.LittleEndian.PutUint32(req[4:], ^uint32(0))
	put := func(portOff, addrOff int, sa []byte) {
		if len(sa) < 4 {
			return
		}
		copy(req[portOff:portOff+2], sa[2:4]) // the port, already big endian
		switch {
		case family == unix.AF_INET && len(sa) >= 8:
			copy(req[addrOff:], sa[4:8])
		case family == unix.AF_INET6 && len(sa) >= 24:
			copy(req[addrOff:], sa[8:24])
		}
	}
	put(8, 12, peer)                                    // sport and src: the remote end
	put(10, 28, local)                                  // dport and dst: this socket
	binary.LittleEndian.PutUint32(req[48:], ^uint32(0)) // no cookie
	binary.LittleEndian.PutUint32(req[52:], ^uint32(0))
	msgs, err := c.Execute(netlink.Message{Header: netlink.Header{Type: sockDiagByFamily, Flags: netlink.Request}, Data: req})
	if err != nil {
		return 0, fmt.Errorf("sock_diag of UDP socket %d: %w", ino, err)
	}
	// struct inet_diag_msg is 72 bytes, its inode at 68; then attributes.
	if len(msgs) != 1 || len(msgs[0].Data) < 72 {
		return 0, fmt.Errorf("sock_diag of UDP socket %d: %d answers", ino, len(msgs))
	}
	if got := binary.LittleEndian.Uint32(msgs[0].Data[68:]); uint64(got) != ino {
		return 0, fmt.Errorf("sock_diag of UDP socket %d: found socket %d", ino, got)
	}
	ad, err := netlink.NewAttributeDecoder(msgs[0].Data[72:])
	if err != nil {
		return 0, err
	}
	const inetDiagShutdown = 8
	var shut uint8
	for ad.Next() {
		if ad.Type() == inetDiagShutdown {
			shut = ad.Uint8()
		}
	}
	return shut, ad.Err()
}

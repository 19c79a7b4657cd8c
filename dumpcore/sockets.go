package dumpcore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/netlock"
)

// sockOpt names a socket option ferry carries across a checkpoint.
type sockOpt struct {
	level, name int
	size        int // bytes getsockopt returns (4 for int options)
}

// Options a program sets on inet sockets. Only those whose value differs
// from a fresh socket's are recorded, so a restored socket has exactly the
// settings its program chose (and defaults that follow sysctls stay so).
var (
	socketOpts = []sockOpt{
		{unix.SOL_SOCKET, unix.SO_REUSEADDR, 4},
		{unix.SOL_SOCKET, unix.SO_REUSEPORT, 4},
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 4},
		{unix.SOL_SOCKET, unix.SO_BROADCAST, 4},
		{unix.SOL_SOCKET, unix.SO_OOBINLINE, 4},
		{unix.SOL_SOCKET, unix.SO_PRIORITY, 4},
		{unix.SOL_SOCKET, unix.SO_MARK, 4},
		{unix.SOL_SOCKET, unix.SO_RCVLOWAT, 4},
		{unix.SOL_SOCKET, unix.SO_LINGER, 8},
		{unix.SOL_SOCKET, unix.SO_RCVTIMEO, 16},
		{unix.SOL_SOCKET, unix.SO_SNDTIMEO, 16},
		{unix.SOL_SOCKET, unix.SO_BINDTODEVICE, unix.IFNAMSIZ},
		{unix.SOL_SOCKET, unix.SO_DONTROUTE, 4},
		{unix.SOL_SOCKET, unix.SO_NO_CHECK, 4},
		// Buffer sizes the program set (see lockedBuffers), then which
		// of them stay as set.
		{unix.SOL_SOCKET, unix.SO_SNDBUF, 4},
		{unix.SOL_SOCKET, unix.SO_RCVBUF, 4},
		{unix.SOL_SOCKET, unix.SO_BUF_LOCK, 4},
	}
	ipOpts = []sockOpt{
		{unix.IPPROTO_IP, unix.IP_TOS, 4},
		{unix.IPPROTO_IP, unix.IP_TTL, 4},
		{unix.IPPROTO_IP, unix.IP_FREEBIND, 4},
		{unix.IPPROTO_IP, unix.IP_TRANSPARENT, 4},
	}
	ipv6Opts = []sockOpt{
		{unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 4},
		{unix.IPPROTO_IPV6, unix.IPV6_TCLASS, 4},
		{unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, 4},
		{unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 4},
		{unix.IPPROTO_IPV6, unix.IPV6_TRANSPARENT, 4},
	}
	tcpOpts = []sockOpt{
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 4},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 4},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 4},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 4},
		{unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 4},
		{unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 4},
		{unix.IPPROTO_TCP, unix.TCP_FASTOPEN, 4},
		{unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, 4},
		{unix.IPPROTO_TCP, unix.TCP_SYNCNT, 4},
		{unix.IPPROTO_TCP, unix.TCP_LINGER2, 4},
		{unix.IPPROTO_TCP, unix.TCP_WINDOW_CLAMP, 4},
		{unix.IPPROTO_TCP, unix.TCP_CONGESTION, 16},
		{unix.IPPROTO_TCP, unix.TCP_CORK, 4},
	}
)

// tcpListen and tcpClose are TCP states (tcpi_state).
const (
	tcpEstablished = 1
	tcpFinWait1    = 4
	tcpFinWait2    = 5
	tcpCloseWait   = 8
	tcpLastAck     = 9
	tcpClosing     = 11
	tcpClose       = 7
	tcpListen      = 10
)

// dumpSocket describes the socket at fd of the target (dup is ferry's
// duplicate of it). With ft.tcpEstablished, an established TCP connection
// is put in repair mode and read; ft.repaired then keeps dup open (the
// caller must not close it).
func (ft *fileTable) dumpSocket(e *pb.FileEntry, pid, dup int) (keep bool, err error) {
	if family, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil && family == unix.AF_UNIX {
		u, err := ft.describeUnix(pid, dup, e.Ino)
		if err != nil {
			return false, err
		}
		e.Type, e.Unix, e.Path = "unix", u, "unix:"+unixName(u.Name)
		return false, nil
	}
	s, err := ft.describeSocket(pid, e.Ino, dup)
	if err != nil {
		return false, err
	}
	e.Type, e.Inet = "inet", s
	e.Path = fmt.Sprintf("%s %s", protoName(int(s.Type), int(s.Protocol)), sockaddrString(s.Addr))
	if s.Tcp != nil {
		e.Path += " -> " + sockaddrString(s.Peer)
		ft.repaired = append(ft.repaired, dup)
		return true, nil
	}
	return false, nil
}

func (ft *fileTable) describeSocket(pid int, ino uint64, dup int) (*pb.InetSocket, error) {
	family, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return nil, os.NewSyscallError("getsockopt SO_DOMAIN", err)
	}
	if family != unix.AF_INET && family != unix.AF_INET6 {
		return nil, fmt.Errorf("socket of family %d: %w", family, ErrUnsupported)
	}
	typ, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil, os.NewSyscallError("getsockopt SO_TYPE", err)
	}
	proto, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return nil, os.NewSyscallError("getsockopt SO_PROTOCOL", err)
	}
	s := &pb.InetSocket{Family: int32(family), Type: int32(typ), Protocol: int32(proto)}
	if s.Addr, err = rawName(dup, unix.SYS_GETSOCKNAME); err != nil {
		return nil, err
	}
	if typ == unix.SOCK_STREAM && proto == unix.IPPROTO_TCP {
		info, err := unix.GetsockoptTCPInfo(dup, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return nil, os.NewSyscallError("getsockopt TCP_INFO", err)
		}
		switch info.State {
		case tcpListen:
			// For a listener TCP_INFO reports the backlog in tcpi_sacked
			// and the connections waiting to be accepted in tcpi_unacked.
			s.Listening, s.Backlog = true, int32(info.Sacked)
			if info.Unacked > 0 && !ft.skipInFlight {
				return nil, fmt.Errorf("TCP listener %s with %d connections waiting to be accepted: %w (--skip-in-flight leaves them behind)",
					sockaddrString(s.Addr), info.Unacked, ErrUnsupported)
			}
		case tcpClose:
			// A connection that ended (its socket still open) reads the
			// end of the stream; a socket never connected, ENOTCONN.
			var b [1]byte
			if n, _, err := unix.Recvfrom(dup, b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT); err == nil && n == 0 {
				s.Closed = true
			}
		default:
			peer, _ := rawName(dup, unix.SYS_GETPEERNAME)
			what := fmt.Sprintf("TCP connection %s -> %s", sockaddrString(s.Addr), sockaddrString(peer))
			if ft.tcpClose {
				// --tcp-close: restored as a closed socket, bound nowhere.
				s.Addr, s.Closed = nil, true
				break
			}
			switch {
			case !ft.tcpEstablished:
				return nil, fmt.Errorf("%s: %w (dump established connections with --tcp-established)", what, ErrUnsupported)
			case !slices.Contains([]uint8{tcpEstablished, tcpFinWait1, tcpFinWait2, tcpCloseWait, tcpLastAck, tcpClosing}, info.State):
				return nil, fmt.Errorf("%s in state %s: %w", what, tcpStateName(info.State), ErrUnsupported)
			}
			s.Peer = peer
			if ft.lock != nil {
				cn, err := netlock.ConnOf(s.Addr, peer)
				if err != nil {
					return nil, fmt.Errorf("%s: %w", what, err)
				}
				if err := ft.lock(cn); err != nil {
					return nil, fmt.Errorf("%s: %w", what, err)
				}
			}
			if s.Tcp, err = repairRead(dup, info); err != nil {
				return nil, fmt.Errorf("%s: %w", what, err)
			}
		}
	} else if typ == unix.SOCK_DGRAM {
		if peer, err := rawName(dup, unix.SYS_GETPEERNAME); err == nil {
			s.Peer = peer
		}
		if proto == unix.IPPROTO_UDP {
			// sock_diag finds a socket by the addresses a datagram to it
			// would carry; one bound to a broadcast address it may not
			// find: such a socket is taken as not shut down.
			if shut, err := udpShutdown(pid, ino, family, s.Addr, s.Peer); err == nil {
				s.Shutdown = uint32(shut)
			}
		}
	} else {
		return nil, fmt.Errorf("inet socket of type %d, protocol %d: %w", typ, proto, ErrUnsupported)
	}
	opts := append([]sockOpt(nil), socketOpts...)
	if family == unix.AF_INET {
		opts = append(opts, ipOpts...)
	} else {
		opts = append(opts, ipv6Opts...)
	}
	if proto == unix.IPPROTO_TCP {
		opts = append(opts, tcpOpts...)
	}
	if s.Opts, err = changedOpts(dup, family, typ, proto, opts); err != nil {
		return nil, err
	}
	s.Opts = lockedBuffers(dup, s.Opts)
	if s.Filter, err = socketFilter(dup); err != nil {
		return nil, err
	}
	if len(s.Filter) > 0 {
		locked, _ := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_LOCK_FILTER)
		s.FilterLocked = locked != 0
	}
	return s, nil
}

// socketFilter reads a socket's classic BPF filter (SO_GET_FILTER: first
// its length in instructions, then the instructions, 8 bytes each).
func socketFilter(fd int) ([]byte, error) {
	n, err := getsockoptRaw(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, nil, 0)
	if err != nil || n == 0 {
		return nil, nil // no filter
	}
	b := make([]byte, 8*n)
	l, err := getsockoptRaw(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, b, n)
	if err != nil {
		return nil, os.NewSyscallError("getsockopt SO_GET_FILTER", err)
	}
	return b[:8*l], nil
}

// TCP repair (include/uapi/linux/tcp.h, sockios.h).
const (
	tcpRepair       = 19
	tcpRepairQueue  = 20
	tcpQueueSeq     = 21
	tcpRepairWindow = 29
	tcpTimestamp    = 24
	tcpRecvQueue    = 1
	tcpSendQueue    = 2
	siocInq         = 0x541b // FIONREAD
	siocOutq        = 0x5411 // TIOCOUTQ
	siocOutqNsd     = 0x894b
)

// repairRead puts an established connection in repair mode (it sends
// nothing from then on: killing the process closes it silently) and reads
// what rebuilding it takes: sequence numbers, both queues, options,
// window, timestamp, buffer sizes.
func repairRead(fd int, info *unix.TCPInfo) (*pb.TcpStream, error) {
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, tcpRepair, 1); err != nil {
		return nil, os.NewSyscallError("setsockopt TCP_REPAIR", err)
	}
	t := &pb.TcpStream{Options: uint32(info.Options), State: int32(info.State)}
	// An unacknowledged FIN of ours counts in the send queue's length.
	finSent := info.State == tcpFinWait1 || info.State == tcpClosing || info.State == tcpLastAck
	// tcpi_snd_wscale and tcpi_rcv_wscale are the two nibbles of the byte
	// after tcpi_options, which x/sys's TCPInfo leaves as padding.
	raw, err := rawOpt(fd, sockOpt{unix.IPPROTO_TCP, unix.TCP_INFO, unix.SizeofTCPInfo})
	if err != nil || len(raw) < 7 {
		return nil, fmt.Errorf("getsockopt TCP_INFO: %v", err)
	}
	t.SndWscale, t.RcvWscale = uint32(raw[6]&0xf), uint32(raw[6]>>4)
	queue := func(q int, ioc uint) (uint32, []byte, error) {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, tcpRepairQueue, q); err != nil {
			return 0, nil, os.NewSyscallError("setsockopt TCP_REPAIR_QUEUE", err)
		}
		seq, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, tcpQueueSeq)
		if err != nil {
			return 0, nil, os.NewSyscallError("getsockopt TCP_QUEUE_SEQ", err)
		}
		n, err := unix.IoctlGetInt(fd, ioc)
		if err != nil {
			return 0, nil, os.NewSyscallError("ioctl (queue length)", err)
		}
		if n == 0 {
			return uint32(seq), nil, nil
		}
		b := make([]byte, n)
		got, _, err := unix.Recvfrom(fd, b, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) && q == tcpSendQueue && finSent && n == 1 {
			return uint32(seq), nil, nil // only the FIN
		}
		if err != nil {
			return 0, nil, os.NewSyscallError("recv (peek queue)", err)
		}
		if got != n && !(q == tcpSendQueue && finSent && got == n-1) {
			return 0, nil, fmt.Errorf("queue holds %d bytes, %d could be read", n, got)
		}
		return uint32(seq), b[:got], nil
	}
	if t.RecvSeq, t.RecvQueue, err = queue(tcpRecvQueue, siocInq); err != nil {
		return nil, err
	}
	if t.SendSeq, t.SendQueue, err = queue(tcpSendQueue, siocOutq); err != nil {
		return nil, err
	}
	unsent, err := unix.IoctlGetInt(fd, siocOutqNsd)
	if err != nil {
		return nil, os.NewSyscallError("ioctl SIOCOUTQNSD", err)
	}
	t.Unsent = uint32(min(unsent, len(t.SendQueue)))
	mss, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG)
	if err != nil {
		return nil, os.NewSyscallError("getsockopt TCP_MAXSEG", err)
	}
	t.Mss = uint32(mss)
	if ts, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, tcpTimestamp); err == nil {
		t.Timestamp = uint32(ts)
	}
	if t.Window, err = rawOpt(fd, sockOpt{unix.IPPROTO_TCP, tcpRepairWindow, 20}); err != nil {
		return nil, os.NewSyscallError("getsockopt TCP_REPAIR_WINDOW", err)
	}
	for _, b := range []struct {
		name int
		v    *int32
	}{{unix.SO_SNDBUF, &t.Sndbuf}, {unix.SO_RCVBUF, &t.Rcvbuf}} {
		v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, b.name)
		if err != nil {
			return nil, os.NewSyscallError("getsockopt", err)
		}
		*b.v = int32(v)
	}
	return t, nil
}

func tcpStateName(st uint8) string {
	names := map[uint8]string{1: "established", 2: "syn-sent", 3: "syn-recv", 4: "fin-wait1", 5: "fin-wait2",
		6: "time-wait", 7: "close", 8: "close-wait", 9: "last-ack", 10: "listen", 11: "closing"}
	if n, ok := names[st]; ok {
		return n
	}
	return fmt.Sprintf("%d", st)
}

// unrepair takes connections out of repair mode (the dump failed or the
// process goes on): each sends a window probe and carries on.
func unrepair(fds []int) {
	for _, fd := range fds {
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, tcpRepair, 0)
		unix.Close(fd)
	}
}

// changedOpts returns the options of socket fd that differ from those of
// a fresh socket of the same kind.
func changedOpts(fd, family, typ, proto int, opts []sockOpt) ([]*pb.SockOpt, error) {
	fresh, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	defer unix.Close(fresh)
	var out []*pb.SockOpt
	for _, o := range opts {
		v, err := rawOpt(fd, o)
		if err != nil {
			continue // not supported on this kernel or socket
		}
		if d, err := rawOpt(fresh, o); err == nil && bytes.Equal(d, v) {
			continue
		}
		out = append(out, &pb.SockOpt{Level: int32(o.level), Name: int32(o.name), Value: v})
	}
	return out, nil
}

// lockedBuffers drops from opts the buffer sizes the program did not set:
// the kernel grows an unlocked buffer of a TCP connection by itself, and
// setting it again would fix it at that size. One the program set is
// locked (SO_BUF_LOCK: SOCK_SNDBUF_LOCK 1, SOCK_RCVBUF_LOCK 2).
func lockedBuffers(fd int, opts []*pb.SockOpt) []*pb.SockOpt {
	lock, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BUF_LOCK)
	if err != nil {
		lock = 0
	}
	return slices.DeleteFunc(opts, func(o *pb.SockOpt) bool {
		return o.Level == unix.SOL_SOCKET && (o.Name == unix.SO_SNDBUF && lock&1 == 0 || o.Name == unix.SO_RCVBUF && lock&2 == 0)
	})
}

func rawOpt(fd int, o sockOpt) ([]byte, error) {
	b := make([]byte, o.size)
	l, err := getsockoptRaw(fd, o.level, o.name, b, uint32(len(b)))
	if err != nil {
		return nil, err
	}
	return b[:l], nil
}

// rawName returns the raw struct sockaddr of getsockname or getpeername.
func rawName(fd int, nr uintptr) ([]byte, error) {
	b := make([]byte, unix.SizeofSockaddrAny)
	l, err := sockaddrRaw(fd, nr, b)
	if err != nil {
		return nil, err
	}
	return b[:l], nil
}

func protoName(typ, proto int) string {
	switch {
	case proto == unix.IPPROTO_TCP:
		return "tcp"
	case proto == unix.IPPROTO_UDP:
		return "udp"
	case proto == unix.IPPROTO_UDPLITE:
		return "udplite"
	case typ == unix.SOCK_DGRAM:
		return fmt.Sprintf("dgram/%d", proto)
	}
	return fmt.Sprintf("type %d/%d", typ, proto)
}

// sockaddrString prints a raw inet sockaddr as ADDR:PORT.
func sockaddrString(b []byte) string {
	if len(b) < 2 {
		return "?"
	}
	switch binary.LittleEndian.Uint16(b) {
	case unix.AF_INET:
		if len(b) >= 8 {
			return fmt.Sprintf("%d.%d.%d.%d:%d", b[4], b[5], b[6], b[7], binary.BigEndian.Uint16(b[2:]))
		}
	case unix.AF_INET6:
		if len(b) >= 24 {
			return fmt.Sprintf("[%s]:%d", netip.AddrFrom16([16]byte(b[8:24])), binary.BigEndian.Uint16(b[2:]))
		}
	}
	return "?"
}

// lockConn drops the packets of connection cn, both ways, in the
// process's network namespace (see package netlock), before the dump puts
// it in repair mode and reads it. The lock goes when the process goes on
// (resume); otherwise the inventory names it for the restore to remove.
func (d *dumper) lockConn(cn netlock.Conn) error {
	switch d.opts.NetworkLock {
	case "skip":
		return nil
	case "", "nftables", "iptables":
	default:
		return fmt.Errorf("--network-lock %q: want nftables, iptables or skip", d.opts.NetworkLock)
	}
	name := netlock.TableName(d.t.root)
	if err := netlock.Lock(d.t.root, name, []netlock.Conn{cn}); err != nil {
		return err
	}
	if d.t.locked == "" {
		d.t.locked = name
		d.log.Info("network locked", "table", name)
		return d.action("network-lock")
	}
	return nil
}

// lockNetwork names the network lock of a dump whose tree does not go
// on in the inventory, for the restore to remove.
func (t *tree) lockNetwork(inv *pb.Inventory) {
	if t.opts.NetworkLock == "skip" && len(t.files.repaired) > 0 {
		t.log.Info("--network-lock skip: the peers of the dumped connections may see resets until the restore")
	}
	if t.locked == "" || t.opts.LeaveRunning || (t.opts.LeaveStopped && !t.opts.HoldConnections) {
		return // no lock, or the tree keeps its connections (resume removes it)
	}
	inv.NetworkLock = t.locked
}

// ReleaseConnections undoes HoldConnections for the stopped process pid,
// before it resumes: its TCP connections leave repair mode and the network
// lock of its dump goes. Connections not in repair mode are left alone, so
// this is safe on any process, and again after an agent restart.
func ReleaseConnections(pid int) error {
	err := setRepair(pid, false)
	if uerr := netlock.Unlock(pid, netlock.TableName(pid)); uerr != nil {
		err = errors.Join(err, uerr)
	}
	if err != nil {
		return fmt.Errorf("releasing the connections of process %d: %w", pid, err)
	}
	return nil
}

// SilenceConnections puts the TCP connections of pid (listeners aside) in
// repair mode, where closing one sends nothing: a copy of a process that
// is being discarded (a migration's target rolling back) dies without
// resetting or closing connections that its original takes back.
func SilenceConnections(pid int) error {
	if err := setRepair(pid, true); err != nil {
		return fmt.Errorf("silencing the connections of process %d: %w", pid, err)
	}
	return nil
}

// setRepair switches repair mode on or off for the TCP sockets of pid
// that are not in that mode yet (listeners aside).
func setRepair(pid int, on bool) error {
	want := 0
	if on {
		want = 1
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return os.NewSyscallError("pidfd_open", err)
	}
	defer unix.Close(pidfd)
	fds, err := openFds(pid)
	if err != nil {
		return err
	}
	var errs []error
	for _, fd := range fds {
		if link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", pid, fd)); err != nil || !strings.HasPrefix(link, "socket:") {
			continue
		}
		dup, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			errs = append(errs, fmt.Errorf("fd %d: %w", fd, os.NewSyscallError("pidfd_getfd", err)))
			continue
		}
		cur, err := unix.GetsockoptInt(dup, unix.IPPROTO_TCP, tcpRepair)
		listening, _ := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		if err == nil && cur != want && listening == 0 {
			if err := unix.SetsockoptInt(dup, unix.IPPROTO_TCP, tcpRepair, want); err != nil {
				errs = append(errs, fmt.Errorf("fd %d: %w", fd, os.NewSyscallError("setsockopt TCP_REPAIR", err)))
			}
		}
		unix.Close(dup)
	}
	return errors.Join(errs...)
}

package dumpcore

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images/pb"
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
	}
)

// tcpListen and tcpClose are TCP states (tcpi_state).
const (
	tcpEstablished = 1
	tcpClose       = 7
	tcpListen      = 10
)

// dumpSocket describes the socket at fd of the target (dup is ferry's
// duplicate of it).
func dumpSocket(e *pb.FileEntry, dup int) error {
	family, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return os.NewSyscallError("getsockopt SO_DOMAIN", err)
	}
	if family != unix.AF_INET && family != unix.AF_INET6 {
		return fmt.Errorf("socket of family %d: %w", family, ErrUnsupported)
	}
	typ, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return os.NewSyscallError("getsockopt SO_TYPE", err)
	}
	proto, err := unix.GetsockoptInt(dup, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return os.NewSyscallError("getsockopt SO_PROTOCOL", err)
	}
	s := &pb.InetSocket{Family: int32(family), Type: int32(typ), Protocol: int32(proto)}
	if s.Addr, err = rawName(dup, unix.SYS_GETSOCKNAME); err != nil {
		return err
	}
	if typ == unix.SOCK_STREAM && proto == unix.IPPROTO_TCP {
		info, err := unix.GetsockoptTCPInfo(dup, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return os.NewSyscallError("getsockopt TCP_INFO", err)
		}
		switch info.State {
		case tcpListen:
			// For a listener TCP_INFO reports the backlog in tcpi_sacked
			// and the connections waiting to be accepted in tcpi_unacked.
			s.Listening, s.Backlog = true, int32(info.Sacked)
			if info.Unacked > 0 {
				return fmt.Errorf("TCP listener %s with %d connections waiting to be accepted: %w",
					sockaddrString(s.Addr), info.Unacked, ErrUnsupported)
			}
		case tcpClose:
		default:
			peer, _ := rawName(dup, unix.SYS_GETPEERNAME)
			return fmt.Errorf("TCP connection %s -> %s (state %d): %w (established connections need --tcp-established, not there yet)",
				sockaddrString(s.Addr), sockaddrString(peer), info.State, ErrUnsupported)
		}
	} else if typ == unix.SOCK_DGRAM {
		if peer, err := rawName(dup, unix.SYS_GETPEERNAME); err == nil {
			s.Peer = peer
		}
	} else {
		return fmt.Errorf("inet socket of type %d, protocol %d: %w", typ, proto, ErrUnsupported)
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
		return err
	}
	e.Type, e.Inet = "inet", s
	e.Path = fmt.Sprintf("%s %s", protoName(typ, proto), sockaddrString(s.Addr))
	return nil
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

func rawOpt(fd int, o sockOpt) ([]byte, error) {
	b := make([]byte, o.size)
	l := uint32(len(b))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(o.level), uintptr(o.name),
		uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return nil, e
	}
	return b[:l], nil
}

// rawName returns the raw struct sockaddr of getsockname or getpeername.
func rawName(fd int, nr uintptr) ([]byte, error) {
	b := make([]byte, unix.SizeofSockaddrAny)
	l := uint32(len(b))
	_, _, e := unix.Syscall(nr, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)))
	if e != 0 {
		return nil, e
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

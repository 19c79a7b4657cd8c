package restorecore

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/netlock"
)

// injectFin hands the socket bound to local, connected to peer, the FIN
// its peer sent before the dump: a TCP segment from peer to local with
// FIN and ACK, sequence number seq, acknowledging ack. A connection the
// peer closed (close-wait, last-ack, closing) cannot be rebuilt in repair
// mode with its FIN received; it is rebuilt without it, and the FIN
// arrives this way. The segment carries netlock.PassMark, which the
// network lock lets through.
func injectFin(local, peer netip.AddrPort, seq, ack uint32, window uint16) error {
	src, dst := peer.Addr().Unmap(), local.Addr().Unmap()
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], peer.Port())
	binary.BigEndian.PutUint16(tcp[2:], local.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], ack)
	tcp[12] = 5 << 4      // header length: 5 words, no options
	tcp[13] = 0x01 | 0x10 // FIN, ACK
	binary.BigEndian.PutUint16(tcp[14:], window)
	binary.BigEndian.PutUint16(tcp[16:], tcpChecksum(src, dst, tcp))

	family, level, hdrincl := unix.AF_INET, unix.IPPROTO_IP, unix.IP_HDRINCL
	if dst.Is6() {
		family, level, hdrincl = unix.AF_INET6, unix.IPPROTO_IPV6, ipv6Hdrincl
	}
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return os.NewSyscallError("socket (raw)", err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, level, hdrincl, 1); err != nil {
		return os.NewSyscallError("setsockopt HDRINCL", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, netlock.PassMark); err != nil {
		return os.NewSyscallError("setsockopt SO_MARK", err)
	}
	var pkt []byte
	var to unix.Sockaddr
	if dst.Is6() {
		ip := make([]byte, 40)
		ip[0] = 6 << 4
		binary.BigEndian.PutUint16(ip[4:], uint16(len(tcp)))
		ip[6], ip[7] = unix.IPPROTO_TCP, 64
		s16, d16 := src.As16(), dst.As16()
		copy(ip[8:], s16[:])
		copy(ip[24:], d16[:])
		pkt, to = append(ip, tcp...), &unix.SockaddrInet6{Addr: d16}
	} else {
		ip := make([]byte, 20)
		ip[0] = 4<<4 | 5
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(tcp)))
		ip[8], ip[9] = 64, unix.IPPROTO_TCP
		s4, d4 := src.As4(), dst.As4()
		copy(ip[12:], s4[:])
		copy(ip[16:], d4[:])
		binary.BigEndian.PutUint16(ip[10:], checksum(ip, 0))
		pkt, to = append(ip, tcp...), &unix.SockaddrInet4{Addr: d4}
	}
	if err := unix.Sendto(fd, pkt, 0, to); err != nil {
		return fmt.Errorf("sending the peer's FIN to %s: %w", local, os.NewSyscallError("sendto", err))
	}
	return nil
}

// ipv6Hdrincl is IPV6_HDRINCL (linux/in6.h), which x/sys does not name.
const ipv6Hdrincl = 36

// tcpChecksum is the checksum of segment tcp (its checksum field zero)
// from src to dst, over the pseudo-header.
func tcpChecksum(src, dst netip.Addr, tcp []byte) uint16 {
	var pseudo []byte
	if dst.Is6() {
		s, d := src.As16(), dst.As16()
		pseudo = append(append(pseudo, s[:]...), d[:]...)
		pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(tcp)))
		pseudo = append(pseudo, 0, 0, 0, unix.IPPROTO_TCP)
	} else {
		s, d := src.As4(), dst.As4()
		pseudo = append(append(pseudo, s[:]...), d[:]...)
		pseudo = append(pseudo, 0, unix.IPPROTO_TCP)
		pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(len(tcp)))
	}
	return checksum(tcp, sum(pseudo))
}

// checksum is the Internet checksum of b, starting from the partial sum
// initial.
func checksum(b []byte, initial uint32) uint16 {
	s := initial + sum(b)
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

func sum(b []byte) uint32 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

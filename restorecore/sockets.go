package restorecore

import (
	"encoding/binary"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/ferrycr/ferry/images"
	"github.com/ferrycr/ferry/images/pb"
	"github.com/ferrycr/ferry/internal/compel"
	"github.com/ferrycr/ferry/netlock"
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
	closed := s.Closed || (s.Tcp != nil && b.r.opts.TCPClose)
	if s.Tcp != nil && !closed {
		return b.newTCPStream(f, park)
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
	if closed {
		// A connection that is gone: a fresh socket shut down both ways
		// (the kernel answers ENOTCONN but marks it) reads the end of
		// the stream, polls POLLHUP and fails writes with EPIPE, as a
		// closed connection's socket does.
		b.sys(unix.SYS_SHUTDOWN, uint64(fd), unix.SHUT_RDWR)
		return fd, nil
	}
	// SO_REUSEADDR and SO_REUSEPORT are on while binding (a listener may
	// have turned SO_REUSEPORT off after binding next to another one),
	// and set to their dumped values afterwards.
	reuse, reusePort := []byte{0, 0, 0, 0}, []byte{0, 0, 0, 0}
	for _, o := range s.Opts {
		if o.Level == unix.SOL_SOCKET && o.Name == unix.SO_REUSEADDR {
			reuse = o.Value
			continue
		}
		if o.Level == unix.SOL_SOCKET && o.Name == unix.SO_REUSEPORT {
			reusePort = o.Value
			continue
		}
		if err := b.setsockopt(fd, int(o.Level), int(o.Name), o.Value); err != nil {
			return 0, err
		}
	}
	for _, o := range []int{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
		if err := b.setsockopt(fd, unix.SOL_SOCKET, o, []byte{1, 0, 0, 0}); err != nil {
			return 0, err
		}
	}
	// Binding must work as it did, whatever the socket's final options:
	// freebind lets it take an address that is not (or no longer) local,
	// and a TCP socket that is not listening binds in repair mode, which
	// may share a port with a listener (a closed connection's socket).
	freebind, freebindVal := unix.IP_FREEBIND, []byte{0, 0, 0, 0}
	level := unix.SOL_IP
	if s.Family == unix.AF_INET6 {
		freebind, level = unix.IPV6_FREEBIND, unix.SOL_IPV6
	}
	for _, o := range s.Opts {
		if int(o.Level) == level && int(o.Name) == freebind {
			freebindVal = o.Value
		}
	}
	repair := s.Protocol == unix.IPPROTO_TCP && !s.Listening && bound(s.Addr)
	if bound(s.Addr) {
		if err := b.setsockopt(fd, level, freebind, []byte{1, 0, 0, 0}); err != nil {
			return 0, err
		}
	}
	if repair {
		if err := b.setsockopt(fd, unix.IPPROTO_TCP, tcpRepair, []byte{1, 0, 0, 0}); err != nil {
			return 0, err
		}
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
	if repair {
		if err := b.setsockopt(fd, unix.IPPROTO_TCP, tcpRepair, []byte{0, 0, 0, 0}); err != nil {
			return 0, err
		}
	}
	if bound(s.Addr) {
		if err := b.setsockopt(fd, level, freebind, freebindVal); err != nil {
			return 0, err
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
	if how, ok := map[uint32]uint64{1: unix.SHUT_RD, 2: unix.SHUT_WR, 3: unix.SHUT_RDWR}[s.Shutdown]; ok {
		// An unconnected socket answers ENOTCONN, but is shut down.
		b.sys(unix.SYS_SHUTDOWN, uint64(fd), how)
	}
	if s.Listening {
		if _, err := b.sys(unix.SYS_LISTEN, uint64(fd), uint64(s.Backlog)); err != nil {
			return 0, fmt.Errorf("listen %s: %w", f.Path, err)
		}
	}
	if err := b.setsockopt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, reuse); err != nil {
		return 0, err
	}
	if err := b.setsockopt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, reusePort); err != nil {
		return 0, err
	}
	if err := b.attachFilter(fd, s.Filter, s.FilterLocked); err != nil {
		return 0, err
	}
	return fd, nil
}

// attachFilter puts a classic BPF socket filter back (SO_ATTACH_FILTER
// takes a struct sock_fprog: length, then a pointer to the instructions).
func (b *builder) attachFilter(fd int, prog []byte, locked bool) error {
	if len(prog) == 0 {
		return nil
	}
	insns, err := b.put(scratchAddr, prog)
	if err != nil {
		return err
	}
	fprog := binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, uint64(len(prog)/8)), insns)
	if err := b.setsockopt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, fprog); err != nil {
		return fmt.Errorf("socket filter: %w", err)
	}
	if locked {
		return b.setsockopt(fd, unix.SOL_SOCKET, unix.SO_LOCK_FILTER, []byte{1, 0, 0, 0})
	}
	return nil
}

func (b *builder) setsockopt(fd, level, name int, v []byte) error {
	if level == unix.SOL_SOCKET && (name == unix.SO_SNDBUF || name == unix.SO_RCVBUF) && len(v) == 4 {
		// getsockopt gave twice what was asked (the kernel's overhead
		// allowance); asking that much again would double it. Forced
		// past the sysctl limit the program's own request may have been
		// under (root: not for a caller).
		half := binary.LittleEndian.Uint32(v) / 2
		v = binary.LittleEndian.AppendUint32(nil, half)
		if b.r.opts.Caller == nil {
			name = map[int]int{unix.SO_SNDBUF: unix.SO_SNDBUFFORCE, unix.SO_RCVBUF: unix.SO_RCVBUFFORCE}[name]
		}
	}
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

// TCP repair (include/uapi/linux/tcp.h).
const (
	tcpRepair        = 19
	tcpRepairQueue   = 20
	tcpQueueSeq      = 21
	tcpRepairOptions = 22
	tcpTimestamp     = 24
	tcpRepairWindow  = 29
	tcpRecvQueue     = 1
	tcpSendQueue     = 2
	tcpFinWait1      = 4
	tcpFinWait2      = 5
	tcpCloseWait     = 8
	tcpLastAck       = 9
	tcpClosing       = 11

	tcpiOptTimestamps = 1
	tcpiOptSack       = 2
	tcpiOptWscale     = 4
	tcpoptMss         = 2
	tcpoptWindow      = 3
	tcpoptSackPerm    = 4
	tcpoptTimestamp   = 8
)

// newTCPStream rebuilds an established connection in repair mode, where
// nothing is sent: sequence numbers, bind and connect (no handshake),
// options, the receive queue, the part of the send queue the peer may
// already have, window and timestamp; then it leaves repair mode (one
// window probe) and writes the part never sent as ordinary data.
//
// A connection that shut down writing has its FIN after its data, one
// sequence number: it shuts down again in repair mode (fin-wait1, -2 and
// closing), or, in last-ack, once the peer's FIN is in. A connection
// whose peer closed (close-wait, last-ack, closing) has the peer's FIN
// after its receive queue: it is rebuilt without it, and ferry hands it
// that FIN once it is out of repair mode (injectFin).
func (b *builder) newTCPStream(f *pb.FileEntry, park func(uint64) (int, error)) (int, error) {
	s, t := f.Inet, f.Inet.Tcp
	st := t.State
	shut := st == tcpFinWait1 || st == tcpFinWait2 || st == tcpClosing
	shutLater := st == tcpLastAck
	theirFin := st == tcpCloseWait || st == tcpLastAck || st == tcpClosing
	fin, rfin := uint32(0), uint32(0)
	if shut || shutLater {
		fin = 1
	}
	if theirFin {
		rfin = 1
	}
	raw, err := b.sys(unix.SYS_SOCKET, uint64(s.Family), unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	fd, err := park(raw)
	if err != nil {
		return 0, err
	}
	setInt := func(level, name int, v uint32) error {
		return b.setsockopt(fd, level, name, binary.LittleEndian.AppendUint32(nil, v))
	}
	// In repair mode the socket may bind next to a listener on its port.
	if err := setInt(unix.IPPROTO_TCP, tcpRepair, 1); err != nil {
		return 0, err
	}
	for _, o := range s.Opts {
		if o.Level == unix.SOL_SOCKET && o.Name == unix.SO_REUSEADDR {
			continue // it would end the forced reuse repair mode grants
		}
		if err := b.setsockopt(fd, int(o.Level), int(o.Name), o.Value); err != nil {
			return 0, err
		}
	}
	b.r.log.Debug("repairing a TCP connection", "fd", fd, "conn", f.Path, "opts", len(s.Opts),
		"recv queue", len(t.RecvQueue), "send queue", len(t.SendQueue), "unsent", t.Unsent)
	// The queues must fit as they did (the kernel doubles what is set).
	if err := setInt(unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, uint32(t.Sndbuf/2)); err != nil {
		return 0, err
	}
	if err := setInt(unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, uint32(t.Rcvbuf/2)); err != nil {
		return 0, err
	}
	for _, q := range []struct {
		queue int
		seq   uint32
	}{{tcpRecvQueue, t.RecvSeq - uint32(len(t.RecvQueue)) - rfin}, {tcpSendQueue, t.SendSeq - uint32(len(t.SendQueue)) - fin}} {
		if err := setInt(unix.IPPROTO_TCP, tcpRepairQueue, uint32(q.queue)); err != nil {
			return 0, err
		}
		if err := setInt(unix.IPPROTO_TCP, tcpQueueSeq, q.seq); err != nil {
			return 0, err
		}
	}
	for _, c := range []struct {
		nr   uintptr
		addr []byte
	}{{unix.SYS_BIND, s.Addr}, {unix.SYS_CONNECT, s.Peer}} {
		a, err := b.put(scratchAddr, c.addr)
		if err != nil {
			return 0, err
		}
		if _, err := b.sys(c.nr, uint64(fd), a, uint64(len(c.addr))); err != nil {
			return 0, fmt.Errorf("%s: %w", map[uintptr]string{unix.SYS_BIND: "bind", unix.SYS_CONNECT: "connect"}[c.nr], err)
		}
	}
	opts := binary.LittleEndian.AppendUint32(nil, tcpoptMss)
	opts = binary.LittleEndian.AppendUint32(opts, t.Mss)
	if t.Options&tcpiOptWscale != 0 {
		opts = binary.LittleEndian.AppendUint32(opts, tcpoptWindow)
		opts = binary.LittleEndian.AppendUint32(opts, t.SndWscale|t.RcvWscale<<16)
	}
	if t.Options&tcpiOptSack != 0 {
		opts = binary.LittleEndian.AppendUint32(opts, tcpoptSackPerm)
		opts = binary.LittleEndian.AppendUint32(opts, 0)
	}
	if t.Options&tcpiOptTimestamps != 0 {
		opts = binary.LittleEndian.AppendUint32(opts, tcpoptTimestamp)
		opts = binary.LittleEndian.AppendUint32(opts, 0)
	}
	if err := b.setsockopt(fd, unix.IPPROTO_TCP, tcpRepairOptions, opts); err != nil {
		return 0, err
	}
	if t.Options&tcpiOptTimestamps != 0 {
		if err := setInt(unix.IPPROTO_TCP, tcpTimestamp, t.Timestamp); err != nil {
			return 0, err
		}
	}
	sent := t.SendQueue[:len(t.SendQueue)-int(t.Unsent)]
	unsent := t.SendQueue[len(sent):]
	if shut {
		// Nothing can be written after the FIN: all of it goes in now.
		sent, unsent = t.SendQueue, nil
	}
	if err := setInt(unix.IPPROTO_TCP, tcpRepairQueue, tcpRecvQueue); err != nil {
		return 0, err
	}
	if err := b.sendAll(fd, t.RecvQueue); err != nil {
		return 0, fmt.Errorf("receive queue: %w", err)
	}
	if err := setInt(unix.IPPROTO_TCP, tcpRepairQueue, tcpSendQueue); err != nil {
		return 0, err
	}
	// Nothing is acknowledged while the queue is rebuilt (repair mode,
	// then the network lock, which holds until the restore ends), and the
	// same bytes may take more buffer than they did (other packet
	// boundaries): with room to spare no write blocks. The dumped size
	// comes back once the queue is written.
	room := uint32(t.Sndbuf/2) + 4*uint32(len(t.SendQueue)) + 1<<20
	if err := setInt(unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, room); err != nil {
		return 0, err
	}
	if err := b.sendAll(fd, sent); err != nil {
		return 0, fmt.Errorf("send queue: %w", err)
	}
	if shut {
		if _, err := b.sys(unix.SYS_SHUTDOWN, uint64(fd), unix.SHUT_WR); err != nil {
			return 0, fmt.Errorf("shutdown: %w", err)
		}
	}
	if len(t.Window) > 0 {
		w := t.Window
		if theirFin && len(w) >= 20 && binary.LittleEndian.Uint32(w[16:]) == t.RecvSeq {
			// rcv_wup may not be past the rebuilt rcv_nxt, which the
			// peer's FIN is not in yet.
			w = binary.LittleEndian.AppendUint32(append([]byte(nil), w[:16]...), t.RecvSeq-1)
		}
		if err := b.setsockopt(fd, unix.IPPROTO_TCP, tcpRepairWindow, w); err != nil {
			return 0, err
		}
	}
	if err := setInt(unix.IPPROTO_TCP, tcpRepair, 0); err != nil {
		return 0, err
	}
	for _, o := range s.Opts { // leaving repair mode reset it
		if o.Level == unix.SOL_SOCKET && o.Name == unix.SO_REUSEADDR {
			if err := b.setsockopt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, o.Value); err != nil {
				return 0, err
			}
		}
	}
	if theirFin {
		cn, err := netlock.ConnOf(s.Addr, s.Peer)
		if err != nil {
			return 0, err
		}
		win := uint16(0xffff)
		if len(t.Window) >= 8 {
			win = uint16(min(binary.LittleEndian.Uint32(t.Window[4:])>>t.SndWscale, 0xffff))
		}
		sndUna := t.SendSeq - uint32(len(t.SendQueue)) - fin
		if err := injectFin(cn.Local, cn.Peer, t.RecvSeq-1, sndUna, win); err != nil {
			return 0, err
		}
	}
	if err := b.sendAll(fd, unsent); err != nil {
		return 0, fmt.Errorf("unsent data: %w", err)
	}
	if shutLater {
		if _, err := b.sys(unix.SYS_SHUTDOWN, uint64(fd), unix.SHUT_WR); err != nil {
			return 0, fmt.Errorf("shutdown: %w", err)
		}
	}
	if err := setInt(unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, uint32(t.Sndbuf/2)); err != nil {
		return 0, err
	}
	if f.Flags&unix.O_NONBLOCK != 0 {
		if _, err := b.sys(unix.SYS_FCNTL, uint64(fd), unix.F_SETFL, unix.O_NONBLOCK); err != nil {
			return 0, err
		}
	}
	return fd, nil
}

// sendAll writes data to socket fd of the process from a temporary
// mapping in it (queues can be megabytes).
func (b *builder) sendAll(fd int, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	size := (uint64(len(data)) + 4095) &^ 4095
	buf, err := b.sys(unix.SYS_MMAP, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uint64(0), 0)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	defer b.sys(unix.SYS_MUNMAP, buf, size)
	if err := compel.WriteMem(b.pid, []compel.Segment{{Addr: buf, Local: data}}); err != nil {
		return err
	}
	for off := uint64(0); off < uint64(len(data)); {
		n, err := b.sys(unix.SYS_SENDTO, uint64(fd), buf+off, uint64(len(data))-off, 0, 0, 0)
		if err != nil {
			return fmt.Errorf("send %d bytes at %d: %w", len(data), off, err)
		}
		if n == 0 {
			return fmt.Errorf("send %d bytes at %d: nothing taken", len(data), off)
		}
		off += n
	}
	return nil
}

// LockConnections drops, in this process's network namespace, the peers'
// packets of the TCP connections of the image set in dir, when its dump
// left them locked (a migration's final round): the connections' address
// may move here before the restore rebuilds them, and a packet reaching
// no socket would reset them. The restore removes the lock in every
// outcome. It returns the lock's name ("" when the images hold none).
func LockConnections(dir string) (string, error) {
	inv := &pb.Inventory{}
	if err := images.ReadOne(dir, "inventory.img", images.KindInventory, inv); err != nil {
		return "", err
	}
	if inv.NetworkLock == "" {
		return "", nil
	}
	var conns []netlock.Conn
	err := readFiles(dir, func(e *pb.FileEntry) error {
		if e.Inet == nil || e.Inet.Tcp == nil {
			return nil
		}
		cn, err := netlock.ConnOf(e.Inet.Addr, e.Inet.Peer)
		if err != nil {
			return fmt.Errorf("%s: file %d (%s): %w", filepath.Join(dir, "files.img"), e.Id, e.Path, err)
		}
		conns = append(conns, cn)
		return nil
	})
	if err != nil {
		return "", err
	}
	if err := netlock.Lock(0, inv.NetworkLock, conns); err != nil {
		return "", err
	}
	return inv.NetworkLock, nil
}

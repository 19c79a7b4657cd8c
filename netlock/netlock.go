// Package netlock keeps the peers of dumped TCP connections from seeing a
// reset while the connections have no socket: between the dump, which
// closes them silently, and the restore, which rebuilds them. It drops the
// peers' packets with an nftables table in the process's network
// namespace; the peers retransmit, and once the table is gone the restored
// sockets take the retransmissions.
package netlock

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Conn is one connection to lock, as the kernel names its ends.
type Conn struct {
	Local, Peer netip.AddrPort
}

// PassMark is the packet mark (SO_MARK) the lock lets through: segments
// ferry itself hands a socket it rebuilds (see restorecore).
const PassMark = 0x66657279 // "fery"

// TableName is the table a lock for process pid uses.
func TableName(pid int) string { return "ferry-lock-" + strconv.Itoa(pid) }

// OpenNS opens the network namespace of pid (0: ferry's own), to name it
// after pid is gone (see UnlockIn).
func OpenNS(pid int) (*os.File, error) {
	if pid == 0 {
		return os.Open("/proc/self/ns/net")
	}
	return os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
}

// conn opens nftables in the network namespace of pid (0: ferry's own).
func conn(pid int) (*nftables.Conn, func(), error) {
	if pid == 0 {
		c, err := nftables.New()
		return c, func() {}, err
	}
	ns, err := OpenNS(pid)
	if err != nil {
		return nil, nil, err
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(ns.Fd())))
	if err != nil {
		ns.Close()
		return nil, nil, err
	}
	return c, func() { ns.Close() }, nil
}

// Lock adds table name to the network namespace of pid, dropping every
// packet of conns, both ways.
func Lock(pid int, name string, conns []Conn) error {
	c, done, err := conn(pid)
	if err != nil {
		return fmt.Errorf("network lock: %w", err)
	}
	defer done()
	var in, out *nftables.Chain
	if t, err := c.ListTableOfFamily(name, nftables.TableFamilyINet); err == nil {
		// More connections for a lock already in place.
		in, out = &nftables.Chain{Name: "input", Table: t}, &nftables.Chain{Name: "output", Table: t}
	} else {
		t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: name})
		// Before anything else, so that no other rule lets them through.
		prio := nftables.ChainPriority(-300)
		in = c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookInput, Priority: &prio})
		out = c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookOutput, Priority: &prio})
		// First in each chain: what ferry itself hands a socket it
		// rebuilds (on its way out, and in).
		for _, ch := range []*nftables.Chain{out, in} {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
				&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.NativeEndian.AppendUint32(nil, PassMark)},
				&expr.Verdict{Kind: expr.VerdictAccept},
			}})
		}
	}
	t := in.Table
	for _, cn := range conns {
		c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: drop(cn.Peer, cn.Local)})
		// And what a copy of the process restored (but not yet
		// committed) would send them.
		c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: drop(cn.Local, cn.Peer)})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("network lock: nftables: %w", err)
	}
	return nil
}

// Unlock removes table name from the network namespace of pid (0:
// ferry's own); a table that is not there is no error.
func Unlock(pid int, name string) error {
	c, done, err := conn(pid)
	if err != nil {
		return fmt.Errorf("network unlock: %w", err)
	}
	defer done()
	return unlock(c, name)
}

// UnlockIn is Unlock in the network namespace ns (from OpenNS), which
// outlives the processes that were in it.
func UnlockIn(ns *os.File, name string) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(ns.Fd())))
	if err != nil {
		return fmt.Errorf("network unlock: %w", err)
	}
	return unlock(c, name)
}

func unlock(c *nftables.Conn, name string) error {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("network unlock: nftables: %w", err)
	}
	for _, t := range tables {
		if t.Name == name {
			c.DelTable(t)
			if err := c.Flush(); err != nil {
				return fmt.Errorf("network unlock: nftables: %w", err)
			}
		}
	}
	return nil
}

// ConnOf names a connection by its two raw socket addresses (struct
// sockaddr_in or sockaddr_in6, as the images keep them).
func ConnOf(local, peer []byte) (Conn, error) {
	l, err := sockaddr(local)
	if err != nil {
		return Conn{}, fmt.Errorf("local address: %w", err)
	}
	p, err := sockaddr(peer)
	if err != nil {
		return Conn{}, fmt.Errorf("peer address: %w", err)
	}
	return Conn{Local: l, Peer: p}, nil
}

func sockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) >= 8 && binary.LittleEndian.Uint16(b) == unix.AF_INET {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:])), nil
	}
	if len(b) >= 24 && binary.LittleEndian.Uint16(b) == unix.AF_INET6 {
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), binary.BigEndian.Uint16(b[2:])), nil
	}
	return netip.AddrPort{}, fmt.Errorf("not an inet socket address (%d bytes)", len(b))
}

// drop matches the TCP packets from src to dst.
func drop(src, dst netip.AddrPort) []expr.Any {
	proto, addrOff, addrLen := byte(unix.NFPROTO_IPV4), uint32(12), uint32(4)
	if dst.Addr().Is6() && !dst.Addr().Is4In6() {
		proto, addrOff, addrLen = unix.NFPROTO_IPV6, 8, 16
	}
	addr := func(a netip.Addr) []byte {
		if addrLen == 4 {
			b := a.Unmap().As4()
			return b[:]
		}
		b := a.As16()
		return b[:]
	}
	port := func(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }
	match := func(base expr.PayloadBase, off, n uint32, want []byte) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: base, Offset: off, Len: n},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: want},
		}
	}
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
	e = append(e, match(expr.PayloadBaseNetworkHeader, addrOff, addrLen, addr(src.Addr()))...)
	e = append(e, match(expr.PayloadBaseNetworkHeader, addrOff+addrLen, addrLen, addr(dst.Addr()))...)
	e = append(e, match(expr.PayloadBaseTransportHeader, 0, 2, port(src.Port()))...)
	e = append(e, match(expr.PayloadBaseTransportHeader, 2, 2, port(dst.Port()))...)
	return append(e, &expr.Verdict{Kind: expr.VerdictDrop})
}

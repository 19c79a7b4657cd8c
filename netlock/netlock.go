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

// TableName is the table a lock for process pid uses.
func TableName(pid int) string { return "ferry-lock-" + strconv.Itoa(pid) }

// conn opens nftables in the network namespace of pid (0: ferry's own).
func conn(pid int) (*nftables.Conn, func(), error) {
	if pid == 0 {
		c, err := nftables.New()
		return c, func() {}, err
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
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
// packet a peer sends to one of conns.
func Lock(pid int, name string, conns []Conn) error {
	c, done, err := conn(pid)
	if err != nil {
		return fmt.Errorf("network lock: %w", err)
	}
	defer done()
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: name})
	// Before anything else on input, so that no other rule lets them in.
	prio := nftables.ChainPriority(-300)
	ch := c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: &prio})
	for _, cn := range conns {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: dropFrom(cn)})
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

// dropFrom matches TCP packets from cn's peer to its local end.
func dropFrom(cn Conn) []expr.Any {
	proto, addrOff, addrLen := byte(unix.NFPROTO_IPV4), uint32(12), uint32(4)
	if cn.Local.Addr().Is6() && !cn.Local.Addr().Is4In6() {
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
	e = append(e, match(expr.PayloadBaseNetworkHeader, addrOff, addrLen, addr(cn.Peer.Addr()))...)
	e = append(e, match(expr.PayloadBaseNetworkHeader, addrOff+addrLen, addrLen, addr(cn.Local.Addr()))...)
	e = append(e, match(expr.PayloadBaseTransportHeader, 0, 2, port(cn.Peer.Port()))...)
	e = append(e, match(expr.PayloadBaseTransportHeader, 2, 2, port(cn.Local.Port()))...)
	return append(e, &expr.Verdict{Kind: expr.VerdictDrop})
}
